"""Turns a config into a trained, evaluated, tracked model.

The config schema, the data path (COCO ingest, Parquet shards, the Ray Data
pipeline, synthetic data), the Ray Train + DeepSpeed training loop, evaluation,
Ray Tune campaigns, MLflow tracking and the model registry live here. It depends
on ``anchorless.detectors`` and never on ``anchorless.jobs``.
"""
