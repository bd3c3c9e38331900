"""Starting a local Ray: it listens on loopback only."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile

import pytest

# Runs in a fresh interpreter, as `anchorless train` does: nothing has imported ray yet.
_PROBE = """
import json, psutil
from anchorless.platform.ray_session import connect_ray

connect_ray()
import ray
ray.get(ray.remote(lambda: 1).remote())  # a worker process too
sockets = []
for proc in [psutil.Process()] + psutil.Process().children(recursive=True):
    try:
        sockets += [(proc.name(), c.laddr.ip, c.laddr.port) for c in proc.net_connections("inet") if c.status == psutil.CONN_LISTEN]
    except psutil.Error:
        pass
print(json.dumps({"node": ray.util.get_node_ip_address(), "sockets": sockets}))
ray.shutdown()
"""


def _is_loopback(ip: str) -> bool:
    import ipaddress

    address = ipaddress.ip_address(ip)
    return (getattr(address, "ipv4_mapped", None) or address).is_loopback


@pytest.mark.slow
def test_a_local_ray_started_by_connect_ray_listens_on_loopback_only():
    env = {name: value for name, value in os.environ.items() if not name.startswith("RAY_")}
    # Its own temp dir (short: Ray's socket paths are limited to 107 bytes), so no other test's Ray is found.
    env["RAY_TMPDIR"] = tempfile.mkdtemp(prefix="anl-rs-")
    try:
        done = subprocess.run([sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True, timeout=300)
    finally:
        shutil.rmtree(env["RAY_TMPDIR"], ignore_errors=True)
    assert done.returncode == 0, done.stderr[-3000:]
    found = json.loads(done.stdout.strip().splitlines()[-1])
    assert found["node"] == "127.0.0.1"
    names = {name for name, _, _ in found["sockets"]}
    assert {"gcs_server", "raylet"} <= names, found["sockets"]
    exposed = [entry for entry in found["sockets"] if not _is_loopback(entry[1])]
    assert exposed == [], f"listening beyond loopback: {exposed}"


def test_what_ray_hands_its_coordinators_unpickles_without_importing_torch():
    """Ray's controller and data coordinators unpickle the decode functions and the worker plan
    only to pass them on: doing so must not import torch (3-5 CPU-s per process)."""
    import pickle

    from anchorless.platform.data.pipeline import _decode_stream_items, decode_and_transform
    from anchorless.platform.ray_session import ImportedWhereCalled
    from anchorless.platform.training.handover import Fault, WorkerPlan

    decode = ImportedWhereCalled.of(decode_and_transform)
    assert (decode.module, decode.qualname) == ("anchorless.platform.data.pipeline", "decode_and_transform") and decode(_empty_shard_block(), **_DECODE_KWARGS)["image"].shape[0] == 0
    plan = WorkerPlan("run", "sqlite://", {}, 10, 2, None, [1], fault=Fault("kill", 1, 3, None, "marker"))
    shipped = pickle.dumps([decode, ImportedWhereCalled.of(_decode_stream_items), plan])
    code = "import pickle, sys; pickle.loads(sys.stdin.buffer.read()); print(sorted(m for m in ('torch', 'anchorless.detectors', 'anchorless.platform.data.pipeline') if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], input=shipped, capture_output=True, check=True)
    assert result.stdout.decode().strip() == "[]"


_DECODE_KWARGS = {"image_size": 32, "max_boxes": 4, "augment": None, "seed": 0}


def _empty_shard_block():
    import pyarrow as pa

    return pa.table(
        {
            "image_id": pa.array([], pa.int64()),
            "width": pa.array([], pa.int32()),
            "height": pa.array([], pa.int32()),
            "image": pa.array([], pa.binary()),
            "boxes": pa.array([], pa.list_(pa.float32())),
            "labels": pa.array([], pa.list_(pa.int64())),
            "iscrowd": pa.array([], pa.list_(pa.int64())),
        }
    )
