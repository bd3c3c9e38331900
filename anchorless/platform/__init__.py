"""Turns a config into a trained, evaluated, tracked and shippable model.

A wing per stage of an image's path, each importing only the wings before it:
``data`` (ingest, shards, the Ray Data pipeline) ← ``tracking`` (MLflow runs) ←
``models`` (the portable file, loading, prediction, the MLflow pyfunc) ←
``evaluation`` (scoring, offline evaluation, plots) ← ``registry`` (versions,
promotion) and ``training`` (the driver, the worker loop, DeepSpeed) ← ``tuning``
(campaigns on Ray Tune). At the top, the common ground every wing may use:
``config``, ``progress`` and ``ray_session``. It depends on ``anchorless.detectors``
and never on ``anchorless.jobs``.
"""
