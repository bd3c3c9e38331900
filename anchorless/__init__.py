"""anchorless: train anchor-free, NMS-free object detectors on a Ray cluster.

Sub-packages, in dependency order: ``jobs`` (the CLI and Ray Jobs submission) ->
``platform`` (config, data, distributed training, evaluation, models, tracking, the
registry, tuning) -> ``detectors`` (pure PyTorch models). ``cluster`` brings up
clusters and services. Below them all, ``errors`` and ``files`` (the one atomic
writer) are shared by the platform and the cluster.
"""

__version__ = "0.1.0"
