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
