"""anchorless: train anchor-free, NMS-free object detectors on a Ray cluster.

Sub-packages, in dependency order: ``jobs`` (the CLI and Ray Jobs submission) ->
``platform`` (config, data, distributed training, evaluation, tuning, tracking) ->
``detectors`` (pure PyTorch models). ``cluster`` brings up clusters and services.
"""

__version__ = "0.1.0"
