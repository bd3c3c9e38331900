"""Step 3 and 4 of an image's path: the driver that plans a run and builds the Ray Train
``TorchTrainer`` (``plan``, ``driver``), what it hands every worker (``handover``), the loop
every worker runs (``worker``) and the DeepSpeed engine it steps (``engine``)."""
