"""Step 1 and 2 of an image's path: ingest and validation of COCO (``coco``), Pascal VOC
(``voc``) and YOLO (``yolo``) sources into the same records (what the folder formats share:
``labels``), Parquet shards and their manifest (``shards``), the Ray Data pipeline that
decodes, augments and batches them (``pipeline``, ``transforms``), image decoding and box
drawing shared with prediction (``images``, ``drawing``), synthetic data (``synth``) and
shard inspection (``inspect``). Imports nothing else of the platform but its common ground."""
