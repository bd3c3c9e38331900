"""MLflow tracking: where the store is and the tags every run carries (``store``), and the
``Tracker`` that logs one training run from the driver and rank 0 (``tracker``)."""
