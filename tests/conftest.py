"""Fixtures shared across test packages: tiny synthetic data sets and a config that trains on them."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import pytest

TINY_IMAGE_SIZE = 64  # pixels: a training step takes a fraction of a second on a CPU

# The corner-keypoint detectors at the platform tests' cost, on the same 64 px shapes: their
# own heads, losses and decoding (Soft-NMS included). CornerNet and the triplets on the
# ResNet-18 variant with narrow upsampler and branches, pairing the top 20 corners;
# CornerNet-Lite with the papers' structures a few channels wide, Saccade's views and crops
# scaled to the shapes (views of 64 and 48 px, 64 px crops, at most two an image).
_CORNERS_ON_RESNET18 = {
    "backbone": {"depth": 18, "upsample_channels": [32, 32, 32]},
    "head": {"channels": 32, "pool_channels": 32},
    "postprocess": {"corner_topk": 20},
}
TINY_KEYPOINT_DETECTORS = {
    "cornernet": _CORNERS_ON_RESNET18,
    "centernet_triplets": _CORNERS_ON_RESNET18,
    "cornernet_squeeze": {
        "backbone": {"channels": [16, 16, 24, 24, 32], "out_channels": 16, "stem_channels": 16},
        "head": {"channels": 16, "pool_channels": 16},
    },
    "cornernet_saccade": {
        "backbone": {"channels": [16, 16, 24, 32], "out_channels": 16, "stem_channels": 16},
        "head": {"channels": 16, "pool_channels": 16, "attention_channels": 16},
        "postprocess": {"init_sizes": [64, 48], "crop_size": 64, "k_max": 2},
    },
}


def tiny_keypoint_detector(name: str, num_classes: int = 3) -> dict[str, Any]:
    """The ``detector`` section of a config training ``name`` (a key of TINY_KEYPOINT_DETECTORS)."""
    return {"name": name, "num_classes": num_classes, **TINY_KEYPOINT_DETECTORS[name]}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Under parallel workers, test files with slow tests first, each file's tests in their own order.

    `make test` on a machine with four cores or more hands whole files to parallel workers
    (pytest-xdist, ``--dist loadfile``) in this order: the minutes-long end-to-end files
    start at once, and the many quick files fill the gaps, instead of one long file
    starting last and running alone. One process keeps the collection order.
    """
    if config.getoption("dist", "no") == "no":
        return
    slow_files = {item.path for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: item.path not in slow_files)  # stable: order within a file kept


@pytest.fixture(scope="session")
def synthetic_shards(tmp_path_factory) -> Callable[..., dict[str, Path]]:
    """``synthetic_shards(num_images=90, seed=0)`` -> ``{"train": dir, "val": dir}``.

    Synthetic shapes (3 classes) at 64 px, generated and sharded once per session for
    each ``(num_images, seed)``; 80 % of the images are the train split.
    """
    from anchorless.platform.data.shards import write_shards
    from anchorless.platform.data.synth import generate_synthetic_coco

    made: dict[tuple[int, int], dict[str, Path]] = {}

    def make(num_images: int = 90, seed: int = 0) -> dict[str, Path]:
        if (num_images, seed) not in made:
            root = tmp_path_factory.mktemp(f"shapes-{num_images}-{seed}")
            files = generate_synthetic_coco(root / "synth", num_images=num_images, size=TINY_IMAGE_SIZE, seed=seed, progress=False)
            for split, annotations in files.items():
                write_shards(annotations, root / "synth" / "images", root / "shards" / split, progress=False)
            made[num_images, seed] = {split: root / "shards" / split for split in files}
        return made[num_images, seed]

    return make


@pytest.fixture(scope="session")
def tiny_config() -> Callable[..., dict[str, Any]]:
    """``tiny_config(workspace, shards, name, tracking={...}, **training)`` -> a raw config dict.

    OneNet with a narrow neck on the 64 px shapes of ``synthetic_shards``: two DeepSpeed
    workers (ZeRO-1, so each rank writes its own optimizer partition), two epochs, every
    step logged. ``training`` keys replace the defaults; ``tracking`` is merged into
    ``{"experiment": "tests"}``. Pass the dict to ``build_config`` or write it as YAML.
    """

    def make(workspace: Path, shards: dict[str, Path], name: str, *, tracking: dict[str, Any] | None = None, **training: Any) -> dict[str, Any]:
        return {
            "name": name,
            "workspace": str(workspace),
            "data": {
                "train": str(shards["train"]),
                "val": str(shards["val"]),
                "image_size": TINY_IMAGE_SIZE,
                "batch_size": 4,
                "augment": {"enabled": False},
            },
            "detector": {"name": "onenet", "num_classes": 3, "neck": {"channels": [32, 32, 32]}},
            "training": {
                "epochs": 2,
                "num_workers": 2,
                "zero_stage": 1,
                "optimizer": {"lr": 2e-3},
                "schedule": {"warmup_steps": 3},
                "max_failures": 1,
                "log_every_steps": 1,
                **training,
            },
            "tracking": {"experiment": "tests", **(tracking or {})},
        }

    return make


class ObjectStore:
    """A running S3-compatible server: its ``endpoint``, and ``bucket(name)`` to create a bucket."""

    def __init__(self, endpoint: str) -> None:
        self.endpoint = endpoint

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint)

    def bucket(self, name: str) -> str:
        """Create bucket ``name`` (if new); returns ``s3://name``."""
        client = self.client()
        if name not in {bucket["Name"] for bucket in client.list_buckets()["Buckets"]}:
            client.create_bucket(Bucket=name)
        return f"s3://{name}"

    def keys(self, bucket: str, prefix: str = "") -> list[str]:
        pages = self.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        return sorted(item["Key"] for page in pages for item in page.get("Contents", []))


@pytest.fixture(scope="session")
def object_store():
    """One local S3 server for the whole session: moto in server mode on a free loopback port.

    Clients find it as they would find any S3: the endpoint in ``$AWS_ENDPOINT_URL`` (boto3,
    MLflow's artifact client and pyarrow's S3FileSystem all read it) and credentials in the
    standard AWS variables, set for the session so that a Ray started afterwards hands them
    to its workers. Tests use buckets of their own.
    """
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # a line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    patch = pytest.MonkeyPatch()
    for name, value in {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "anchorless-test",
        "AWS_SECRET_ACCESS_KEY": "anchorless-test",
        "AWS_DEFAULT_REGION": "us-east-1",
    }.items():
        patch.setenv(name, value)
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "MLFLOW_S3_ENDPOINT_URL"):
        patch.delenv(name, raising=False)
    try:
        yield ObjectStore(endpoint)
    finally:
        patch.undo()
        server.stop()
