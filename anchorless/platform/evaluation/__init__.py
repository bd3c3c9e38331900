"""Scoring detections against COCO ground truth (``metrics``: pycocotools AP, duplicate
rate), offline evaluation of a model over shards on Ray Data (``offline``) and the
pictures logged with every evaluation (``plots``)."""
