"""Training on a Ray cluster of several nodes, all on this machine (``ray.cluster_utils.Cluster``).

A head of 1 CPU (the driver, Ray Train's controller, Ray Data's decode tasks) and two
worker nodes of 1 CPU each, with token authentication on, the way `anchorless cluster up`
runs a head. Two Ray Train workers of 1 CPU each cannot share a node, so a run spreads
over two of them; where each worker ran is read back from Ray's state API. The run
loses a node that holds one of its workers right after its first checkpoint, gets a
fresh node, and must finish from that checkpoint, with its COCO metrics. One `train()` call
(a clean two-node run proved nothing this one does not): about three minutes on a busy
two-core machine. The detector is CornerNet (tiny): the corner-keypoint family's run
through the platform, its checkpoint resumed on other nodes.
"""

from __future__ import annotations

import json
import math
import secrets
import shutil
import socket
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from anchorless.platform.config import build_config
from anchorless.platform.training.driver import train
from anchorless.platform.training.plan import plan_run
from anchorless.platform.training.worker import STATE_FILE
from tests.conftest import tiny_keypoint_detector

pytestmark = pytest.mark.slow

TRAIN_WORKER_CLASS = "RayTrainWorker"  # Ray Train V2's worker actor
EPOCHS_SURVIVING = 3  # the node goes after epoch 1's checkpoint: two epochs are left to resume


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def cluster():
    """Head (1 CPU) + two worker nodes (1 CPU each), token auth, in a private temp dir.

    Ray's temp dir is private (``RAY_TMPDIR``) because ``Cluster`` records its address as
    the machine's "current cluster", which a plain ``ray.init()`` elsewhere would join.
    """
    import ray
    from ray._raylet import AuthenticationTokenLoader, Config
    from ray.cluster_utils import Cluster

    if ray.is_initialized():  # left over by another module
        ray.shutdown()
    root = Path(tempfile.mkdtemp(prefix="anl-mn-"))  # short: Ray's socket paths are limited to 107 bytes
    token_file = root / "auth_token"
    token_file.write_text(secrets.token_hex(32))
    token_file.chmod(0o600)
    patch = pytest.MonkeyPatch()
    for name in ("RAY_ADDRESS", "RAY_AUTH_TOKEN", "MLFLOW_TRACKING_URI"):
        patch.delenv(name, raising=False)
    patch.setenv("RAY_TMPDIR", str(root))
    patch.setenv("RAY_AUTH_MODE", "token")
    patch.setenv("RAY_AUTH_TOKEN_PATH", str(token_file))
    Config.initialize("")  # this process reads the auth mode and token afresh
    AuthenticationTokenLoader.instance().reset_cache()

    cluster = None
    try:
        # The dashboard (Ray's state API) on a free port; the other ports Ray picks itself.
        head = {"num_cpus": 1, "include_dashboard": True, "dashboard_port": _free_port(), "dashboard_agent_listen_port": None}
        cluster = Cluster(initialize_head=True, head_node_args=head)
        for _ in range(2):
            cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        yield cluster
    finally:
        if ray.is_initialized():
            ray.shutdown()
        if cluster is not None:
            cluster.shutdown()
        patch.undo()
        Config.initialize("")
        AuthenticationTokenLoader.instance().reset_cache()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def shards(synthetic_shards) -> dict[str, Path]:
    """Synthetic shapes at 64 px: 38 train images (4 steps of 2 x 4 per epoch), 10 validation."""
    return synthetic_shards(num_images=48, seed=2)


@pytest.fixture(scope="module")
def make_cfg(tiny_config, tmp_path_factory, shards):
    workspace = tmp_path_factory.mktemp("multinode-workspace")

    def make(name: str, **training: Any):
        raw = tiny_config(workspace, shards, name, tracking={"experiment": "multinode-tests"}, **training)
        raw["detector"] = tiny_keypoint_detector("cornernet")  # the corner-keypoint family's platform run
        return build_config(raw)

    return make


@pytest.fixture(autouse=True)
def _no_fault_injection(monkeypatch):
    from anchorless.platform.training.plan import FAULT_ENV

    monkeypatch.delenv(FAULT_ENV, raising=False)


def _train_workers(address: str) -> dict[str, dict[str, Any]]:
    """Every Ray Train worker actor the cluster has seen, alive or dead: id -> node, state and
    placement group (one per worker group: a restart makes a new one)."""
    from ray.util.state import list_actors

    actors = list_actors(address=address, filters=[("class_name", "=", TRAIN_WORKER_CLASS)], detail=True, limit=1000)
    return {
        actor.actor_id: {"node_id": actor.node_id, "state": actor.state, "group": actor.placement_group_id}
        for actor in actors
    }


def _history(summary: dict, key: str) -> list[tuple[int, float]]:
    from mlflow import MlflowClient

    client = MlflowClient(summary["tracking_uri"])
    return sorted((m.step, m.value) for m in client.get_metric_history(summary["run_id"], key))


def _checkpoint_signal(path: Path) -> Any:
    """A Ray Train callback (run on the controller) that appends each registered checkpoint's
    directory name to ``path``: the moment a restart would resume from it."""
    import ray.train

    class CheckpointSignal(ray.train.UserCallback):  # local: pickled by value for the controller
        def after_report(self, run_context, metrics, checkpoint):
            if checkpoint is not None:
                with open(path, "a") as log:
                    log.write(Path(checkpoint.path).name + "\n")

    return CheckpointSignal()


def _registered(signal: Path) -> list[str]:
    return signal.read_text().split() if signal.exists() else []


def test_the_heads_job_server_refuses_a_request_without_the_token(cluster):
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(f"http://{cluster.webui_url}/api/jobs/", timeout=10)
    assert refused.value.code == 401


def test_cornernet_on_two_nodes_reports_coco_metrics_and_survives_losing_a_node_resuming_on_a_fresh_one(
    cluster, make_cfg, tmp_path
):
    import ray

    cfg = make_cfg("loses-a-node", epochs=EPOCHS_SURVIVING, max_failures=1)
    plan = plan_run(cfg)
    signal = tmp_path / "registered_checkpoints.txt"
    before = _train_workers(cluster.address)
    head_id = cluster.head_node.node_id
    outcome: dict[str, Any] = {}

    def run_training() -> None:  # in a thread: Cluster.add_node must run on the main thread
        try:
            outcome["summary"] = train(cfg, address=cluster.address, progress=False, callbacks=[_checkpoint_signal(signal)])
        except BaseException as exc:  # re-raised below
            outcome["error"] = exc

    training = threading.Thread(target=run_training, name="train", daemon=True)
    training.start()
    deadline = time.monotonic() + 600
    while not _registered(signal):
        assert training.is_alive(), f"training ended before its first checkpoint: {outcome}"
        assert time.monotonic() < deadline, "no checkpoint after 10 minutes"
        time.sleep(0.2)
    registered = _registered(signal)
    alive = [w for key, w in _train_workers(cluster.address).items() if key not in before and w["state"] == "ALIVE"]
    first_group_nodes = {w["node_id"] for w in alive}
    victim = next(node for node in cluster.worker_nodes if node.node_id in first_group_nodes)
    cluster.remove_node(victim, allow_graceful=False)  # as if the machine died
    cluster.add_node(num_cpus=1)  # so that two workers and the data tasks fit again
    training.join(timeout=600)
    assert not training.is_alive(), "training did not finish within 10 minutes of the node's removal"
    if "error" in outcome:
        raise outcome["error"]
    summary = outcome["summary"]

    # The node went while training still had epochs to run, after epoch 1's checkpoint was registered.
    assert registered and all(name.startswith("checkpoint_epoch0001_") for name in registered), registered
    assert victim.node_id != head_id and len(first_group_nodes) == 2

    # It finished every epoch ...
    spe = plan.steps_per_epoch
    assert summary["epoch"] == EPOCHS_SURVIVING and summary["step"] == EPOCHS_SURVIVING * spe
    assert _registered(signal)[-1].startswith(f"checkpoint_epoch{EPOCHS_SURVIVING:04d}_")
    # ... and resumed from epoch 1's checkpoint rather than from scratch: epoch 1 ended once
    # (MLflow's `epoch`) and its optimizer steps were logged once. The epoch in flight when
    # the node went may have ended before the loss showed (its checkpoint unregistered); it
    # then ran again from epoch 1's checkpoint: at most that one epoch ends twice.
    ended = [value for _, value in _history(summary, "epoch")]
    assert ended.count(1.0) == 1 and sorted(set(ended)) == [float(e) for e in range(1, EPOCHS_SURVIVING + 1)], ended
    assert ended == sorted(ended) and len(ended) - len(set(ended)) <= 1, ended
    assert [step for step, _ in _history(summary, "loss") if step <= spe] == list(range(1, spe + 1))
    for key in ("AP", "AP50", "AR100", "duplicate_rate"):  # scored on the cluster, reported back
        assert 0.0 <= summary[key] <= 1.0, (key, summary[key])
    assert all(math.isfinite(value) for _, value in _history(summary, "epoch_loss"))
    state = json.loads((Path(summary["checkpoint"]) / STATE_FILE).read_text())
    assert (state["epoch"], state["run_id"]) == (EPOCHS_SURVIVING, summary["run_id"])

    # Two worker groups: the first had a worker on the removed node; the replacement ran on
    # two nodes still in the cluster.
    groups: dict[str, set[str]] = {}
    for worker in _train_workers(cluster.address).values():
        if worker["group"] not in {w["group"] for w in before.values()}:
            groups.setdefault(worker["group"], set()).add(worker["node_id"])
    assert len(groups) == 2, groups
    first = next(nodes for nodes in groups.values() if victim.node_id in nodes)
    replacement = next(nodes for nodes in groups.values() if nodes is not first)
    assert first == first_group_nodes
    live = {node.node_id for node in cluster.list_all_nodes()}
    assert len(replacement) == 2 and replacement <= live and victim.node_id not in live, (replacement, live)
    assert not ray.is_initialized()  # train() joined the cluster and left it
