"""The campaign -> registry -> cluster flow of the README, end to end with the real command line.

Every step is `python -m anchorless.jobs.cli ...` in a subprocess working in a scratch
directory, the way a user types it: a local cluster comes up (token auth, MLflow
server), a two-trial campaign runs to completion as a Ray job and registers its best
model in the cluster's registry, that version is promoted to champion with a gate table,
a weaker version trained by a second job is refused with the reason printed, and the
cluster goes down leaving nothing behind. On the way: the campaign's nested MLflow runs and
summary artifacts, and re-submitting the finished campaign restores it (no new trial, the
same registered version). The commands find the cluster through its
state file (``$ANCHORLESS_CLUSTER_DIR``), as the README's do.

Sizes: 64 px shapes, one Ray Train worker per trial, 6 epochs of 8 steps. Promotion is
gated on the training shards: a few dozen steps at 64 px start to memorise the training
images (AP ~0.01) but do not yet generalise (validation AP is noise-level, ~0.001), and the
test needs a champion that is clearly better than a barely trained model (AP < 0.001).
About ten minutes on a busy two-core machine, half of it the campaign's two trials.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Iterator

import psutil
import pytest
import yaml

from anchorless.cluster import local
from anchorless.jobs.cli import _submit_options_among_job_args, build_parser

MODEL = "flow-shapes"
EPOCHS = 6  # x 8 steps of 4 images: enough for the champion to start memorising the training shards


def test_submit_options_may_follow_the_commands_arguments():
    args = build_parser().parse_args(["submit", "tune", "campaign.yaml", "num_samples=2", "--follow", "--restart"])
    _submit_options_among_job_args(args)
    assert (args.args, args.follow, args.address) == (["campaign.yaml", "num_samples=2", "--restart"], True, None)
    args = build_parser().parse_args(["submit", "--follow", "train", "c.yaml", "--address=http://head:8265"])
    _submit_options_among_job_args(args)
    assert (args.args, args.follow, args.address) == (["c.yaml"], True, "http://head:8265")


def test_models_commands_find_the_local_clusters_mlflow_through_its_state_file(tmp_path, monkeypatch):
    from anchorless.jobs.cli import _tracking_uri

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv(local.STATE_DIR_ENV, str(tmp_path))
    args = build_parser().parse_args(["models", "list", "--workspace", str(tmp_path / "workspace")])
    assert _tracking_uri(args).startswith("sqlite:///")  # no cluster: the workspace's store
    local.write_state(tmp_path, {"version": local.STATE_VERSION, "mlflow_tracking_uri": "http://127.0.0.1:41002"})
    assert _tracking_uri(args) == "http://127.0.0.1:41002"


def test_the_cli_signs_in_to_the_local_clusters_mlflow_only_and_promotes_as_its_admin(tmp_path, monkeypatch):
    from anchorless.jobs.cli import _registry_signing_key, _sign_in_to_local_registry

    uri = "http://127.0.0.1:41002"
    user_file, _ = local._ensure_credentials(tmp_path / local.MLFLOW_USER_FILE, local.MLFLOW_USER)
    admin_file, _ = local._ensure_credentials(tmp_path / local.MLFLOW_ADMIN_FILE, local.MLFLOW_ADMIN)
    key_file = local._ensure_signing_key(tmp_path)
    state = {
        "version": local.STATE_VERSION,
        "mlflow_tracking_uri": uri,
        "mlflow": {"credentials": {"user": str(user_file), "admin": str(admin_file)}},
        "registry_signing_key_file": str(key_file),
    }
    local.write_state(tmp_path, state)
    monkeypatch.setenv(local.STATE_DIR_ENV, str(tmp_path))
    for name in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "ANCHORLESS_REGISTRY_KEY"):
        monkeypatch.setenv(name, "placeholder")  # so that the test's changes are undone
        monkeypatch.delenv(name)
    args = build_parser().parse_args(["models", "list"])
    signed_in = lambda: (os.environ.get("MLFLOW_TRACKING_USERNAME"), os.environ.get("MLFLOW_TRACKING_PASSWORD"))  # noqa: E731

    assert _sign_in_to_local_registry("http://mlflow.elsewhere:5000", args) is None
    assert signed_in() == (None, None)  # the cluster's credentials go to its own server only
    assert _sign_in_to_local_registry(uri + "/", args)["mlflow_tracking_uri"] == uri
    assert signed_in() == local.read_credentials(user_file)
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "me")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "mine")
    _sign_in_to_local_registry(uri, args)
    assert signed_in() == ("me", "mine")  # the user's own win, as $RAY_AUTH_TOKEN does
    _sign_in_to_local_registry(uri, args, account="admin")
    assert signed_in() == local.read_credentials(admin_file)  # promotion moves the alias: only the admin may

    assert _registry_signing_key(uri, state) == key_file.read_text().encode()
    assert key_file.stat().st_mode & 0o777 == 0o600
    monkeypatch.setenv("ANCHORLESS_REGISTRY_KEY", "from-the-environment")
    assert _registry_signing_key(uri, state) == b"from-the-environment"


def test_a_command_without_a_cluster_address_keeps_its_own_ray_on_loopback(monkeypatch, capsys):
    from anchorless.jobs.cli import main
    from anchorless.platform.ray_session import LOOPBACK_ENV

    (switch, value), = LOOPBACK_ENV.items()
    monkeypatch.setenv(switch, "placeholder")
    monkeypatch.delenv(switch)
    monkeypatch.setenv("RAY_ADDRESS", "http://head:8265")
    assert main(["config", "show"]) == 0
    assert switch not in os.environ  # a driver joining a cluster must see its node's real address
    monkeypatch.delenv("RAY_ADDRESS")
    assert main(["config", "show"]) == 0
    assert os.environ[switch] == value


# --------------------------------------------------------------------------- slow


@pytest.fixture(scope="module")
def scratch(tmp_path_factory, synthetic_shards, tiny_config) -> Path:
    """The user's directory: a base config and a campaign, with the shards under ``shards/``.

    The base config's paths are relative, as in the project's configs: the jobs, and the
    campaign's trials (which Ray Tune runs in directories of their own), must read them
    as they read in this directory.
    """
    work = tmp_path_factory.mktemp("flow-user")
    shards = synthetic_shards(num_images=40, seed=1)  # 32 train, 8 validation
    (work / "shards").mkdir()
    for split, path in shards.items():
        (work / "shards" / split).symlink_to(path)
    base = tiny_config(
        Path("workspace"),
        {split: Path("shards") / split for split in shards},
        "flow-base",
        tracking={"experiment": "flow", "registered_model": MODEL},
        epochs=EPOCHS,
        num_workers=1,
        zero_stage=0,
        optimizer={"lr": 3e-3},
        schedule={"warmup_steps": 2},
        checkpoint={"every_epochs": EPOCHS},  # only the last: no time spent saving the others
        log_every_steps=8,
    )
    (work / "base.yaml").write_text(yaml.safe_dump(base))
    campaign = {
        "name": "flow-campaign",
        "base": "base.yaml",
        "search_space": {"detector.assigner.cost_giou": {"grid": [1.0, 3.0]}},
        "search": {"algorithm": "grid"},
        "scheduler": {"kind": "fifo"},
        "num_samples": 1,
        "max_concurrent_trials": 2,  # both trials at once: five CPUs hold them and two decode tasks
        "metric": "AP",
        "mode": "max",
    }
    (work / "campaign.yaml").write_text(yaml.safe_dump(campaign))
    return work


@pytest.fixture(scope="module")
def user_env(tmp_path_factory) -> Iterator[dict[str, str]]:
    """A shell with no Ray or MLflow settings of its own; the cluster state in a scratch dir."""
    env = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith(("RAY_", "MLFLOW_", "ANCHORLESS_"))
    }
    env[local.STATE_DIR_ENV] = str(tmp_path_factory.mktemp("flow-cluster"))
    # A Ray started by a command (promote evaluates on a local Ray) keeps to its own temp
    # dir, where no other test's `ray.init()` would find it. Short: socket paths <= 107 bytes.
    env["RAY_TMPDIR"] = tempfile.mkdtemp(prefix="anl-flow-")
    yield env
    shutil.rmtree(env["RAY_TMPDIR"], ignore_errors=True)


@pytest.fixture(scope="module")
def stop_cluster_afterwards(user_env):
    yield
    local.cluster_down(user_env[local.STATE_DIR_ENV])  # a no-op when the test brought it down


def anchorless(*args: str, cwd: Path, env: dict[str, str], timeout: float, expect: int = 0) -> str:
    """Run `anchorless ARGS` as a user would; its stdout, after checking the exit code."""
    done = subprocess.run(
        [sys.executable, "-m", "anchorless.jobs.cli", *args],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip
    assert done.returncode == expect, (
        f"`anchorless {' '.join(args)}` exited {done.returncode}, expected {expect}\n"
        f"--- stdout\n{done.stdout[-4000:]}\n--- stderr\n{done.stderr[-4000:]}"
    )
    return done.stdout


def _json_lines(text: str) -> list[dict[str, Any]]:
    found = []
    for line in text.splitlines():
        if line.startswith("{"):
            try:
                found.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return found


def _gate_table(text: str) -> tuple[list[str], dict[str, list[str]], str]:
    """The promotion table: its header, its rows by metric, and its verdict line."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("metric "))
    header = re.split(r"\s{2,}", lines[start].strip())
    assert set(lines[start + 1].replace(" ", "")) == {"-"}
    rows = {}
    for line in lines[start + 2 :]:
        if line.startswith(("PROMOTED", "REFUSED")):
            return header, rows, line
        cells = re.split(r"\s{2,}", line.strip())
        rows[cells[0]] = cells
    raise AssertionError(f"no verdict line after the gate table:\n{text}")


@pytest.mark.slow
def test_campaign_job_registers_the_best_model_promoted_to_champion_a_weaker_version_is_refused(
    scratch, user_env, stop_cluster_afterwards, monkeypatch
):
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    took: list[tuple[str, float]] = []  # printed at the end: where the minutes go

    def run(*args: str, timeout: float = 180, expect: int = 0) -> str:
        started = time.monotonic()
        out = anchorless(*args, cwd=scratch, env=user_env, timeout=timeout, expect=expect)
        took.append((" ".join(args[:2]), time.monotonic() - started))
        return out

    # 1. A local cluster: Ray head with token auth, job server, MLflow server.
    # Five logical CPUs on any machine: two one-worker trials at once (their start-ups overlap).
    out = run("cluster", "up", "--local", "--num-cpus", "5")
    assert out.startswith("cluster started")
    state = local.read_state(user_env[local.STATE_DIR_ENV])
    assert state["auth_mode"] == "token" and Path(state["token_file"]).stat().st_mode & 0o777 == 0o600
    # This test reads the registry as the user account, the one jobs hold (MLflow refuses anonymous requests).
    user = local.read_credentials(state["mlflow"]["credentials"]["user"])
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", user[0])
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", user[1])
    registry = MlflowClient(state["mlflow_tracking_uri"], registry_uri=state["mlflow_tracking_uri"])

    # 2. The campaign as a Ray job, followed to its end (`--follow` after the job's arguments).
    out = run("submit", "tune", "campaign.yaml", "--follow", timeout=600)
    job_id = out.splitlines()[0]
    assert out.rstrip().endswith(f"job {job_id}: SUCCEEDED"), out[-3000:]
    summary = next(line for line in _json_lines(out) if "campaign" in line)
    assert (summary["campaign"], summary["trials"], summary["completed"]) == ("flow-campaign", 2, 2)
    assert summary["tracking_uri"] == state["mlflow_tracking_uri"]  # the job logged to the cluster's MLflow
    assert summary["model_uri"] == f"models:/{MODEL}/1"

    # One MLflow parent run for the campaign, a finished child run per trial with its
    # params; the summary (table, best config, plots) on the parent; the best is the
    # child with the highest AP.
    parent = registry.get_run(summary["parent_run_id"])
    children = registry.search_runs(
        [parent.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'"
    )
    assert sorted(float(c.data.params["detector.assigner.cost_giou"]) for c in children) == [1.0, 3.0]
    assert all(c.info.status == "FINISHED" and c.data.metrics["epoch"] == EPOCHS for c in children)
    assert all(c.data.tags["anchorless.early_stopped"] == "false" for c in children)
    best = max(children, key=lambda c: (c.data.metrics["AP"], -c.info.start_time))
    assert summary["best_run_id"] == best.info.run_id
    assert summary["best_AP"] == pytest.approx(best.data.metrics["AP"], abs=1e-6)
    assert parent.data.metrics["best_AP"] == pytest.approx(summary["best_AP"], abs=1e-6)
    artifacts = {a.path for a in registry.list_artifacts(parent.info.run_id)}
    assert {"trials.json", "best_config.yaml", "metric_vs_params.png"} <= artifacts

    status = json.loads(run("jobs", "status", job_id))
    assert (status["status"], status["kind"]) == ("SUCCEEDED", "tune")
    assert summary in _json_lines(run("jobs", "logs", job_id))
    assert re.search(rf"^{job_id}\s+SUCCEEDED\s+tune\s", run("jobs", "list"), re.MULTILINE)

    # 3. The best trial's model is version 1 in the cluster's registry, tagged with its
    #    metrics, not yet champion.
    version = registry.get_model_version(MODEL, "1")
    assert version.run_id == summary["best_run_id"]
    assert float(version.tags["AP"]) == pytest.approx(summary["best_AP"], abs=1e-5)
    listing = run("models", "list", MODEL)
    assert re.search(rf"^{MODEL}\s+1\s+-\s", listing, re.MULTILINE), listing

    # 4. A weaker version: one epoch at a learning rate of ~0, trained by a second job from
    #    the relative paths of base.yaml while version 1 is promoted.
    weak_job = run("submit", "train", "base.yaml", "name=flow-weak", "training.epochs=1", "training.optimizer.lr=1e-7")
    weak_job = weak_job.strip()

    # 5. Version 1 becomes champion: no champion yet, so only the gate metric is shown.
    out = run("models", "promote", MODEL, "1", "--to", "champion", "--data", "shards/train", timeout=300)
    decision = _json_lines(out)[-1]
    champion_ap = f"{decision['candidate_metrics']['AP']:.4f}"
    header, rows, verdict = _gate_table(out)
    assert header == ["metric", "rule", "candidate v1", "champion", "verdict"]
    assert rows == {"AP": ["AP", "gate", champion_ap, "-", "pass"]}
    assert verdict == "PROMOTED: no champion yet"
    assert decision["promoted"] is True and decision["champion"] is None
    assert registry.get_model_version_by_alias(MODEL, "champion").version == "1"

    # 6. The weak job registered version 2; it does not beat the champion and is refused.
    run("jobs", "logs", weak_job, "--follow", timeout=300)
    assert json.loads(run("jobs", "status", weak_job))["status"] == "SUCCEEDED"
    assert registry.get_run(registry.get_model_version(MODEL, "2").run_id).info.run_name == "flow-weak"

    # 6a. As an attacker would: move the alias directly, anonymously and with the account jobs
    #     hold (both refused), then forge v2's cached scores on these shards (not signed: v2 is
    #     scored again below, and refused on its real scores).
    anonymous = urllib.request.Request(
        f"{state['mlflow_tracking_uri']}/api/2.0/mlflow/registered-models/alias", method="POST",
        data=json.dumps({"name": MODEL, "alias": "champion", "version": "2"}).encode(),
        headers={"Content-Type": "application/json"},
    )  # fmt: skip
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(anonymous, timeout=30)
    assert refused.value.code == 401
    with pytest.raises(MlflowException, match="only by `anchorless models promote`"):
        registry.set_registered_model_alias(MODEL, "champion", "2")
    cached = [key for key in registry.get_model_version(MODEL, "1").tags if key.startswith("eval.")]
    prefix = cached[0].rsplit(".", 1)[0]
    for metric, value in {"AP": "0.99", "AP50": "0.99", "duplicate_rate": "0", "latency_ms": "0.1"}.items():
        registry.set_model_version_tag(MODEL, "2", f"{prefix}.{metric}", value)

    out = run("models", "promote", MODEL, "2", "--to", "champion", "--data", "shards/train", timeout=300, expect=1)
    decision = _json_lines(out)[-1]
    weak_ap = f"{decision['candidate_metrics']['AP']:.4f}"
    header, rows, verdict = _gate_table(out)
    assert header == ["metric", "rule", "candidate v2", "champion v1", "verdict"]
    # The champion's scores on these shards are its own from step 5 (kept on the version).
    assert rows["AP"] == ["AP", "> champion + 0", weak_ap, champion_ap, "FAIL"]
    assert set(rows) == {"AP", "AP50", "duplicate_rate", "latency_ms"}
    assert float(weak_ap) < float(champion_ap) / 5, (weak_ap, champion_ap)
    assert verdict.startswith(f"REFUSED: AP {weak_ap} does not beat champion {champion_ap} by > 0")
    assert decision["promoted"] is False and decision["champion"] == "1"
    assert registry.get_model_version_by_alias(MODEL, "champion").version == "1"  # unchanged
    assert registry.get_model_version(MODEL, "2").tags["promotion.champion.decision"] == "refused"
    assert registry.get_model_version(MODEL, "2").tags[f"{prefix}.AP"] == repr(decision["candidate_metrics"]["AP"])

    # 6b. A rollback trusts only a champion history promotion signed: a forged one is refused.
    registry.set_registered_model_tag(MODEL, "anchorless.champion_history.champion", json.dumps(["2"]))
    run("models", "rollback", MODEL, expect=2)
    assert registry.get_model_version_by_alias(MODEL, "champion").version == "1"

    # 7. Submitting the finished campaign again restores it: no new trial, the same best,
    #    the same registered version.
    out = run("submit", "tune", "campaign.yaml", "--follow", timeout=300)
    again = next(line for line in _json_lines(out) if "campaign" in line)
    assert (again["best_run_id"], again["trials"], again["model_uri"]) == (summary["best_run_id"], 2, summary["model_uri"])
    assert len(registry.search_runs([parent.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")) == 2
    assert {v.version for v in registry.search_model_versions(f"name='{MODEL}'")} == {"1", "2"}

    # 8. Down: no process of the cluster left, no state file.
    assert run("cluster", "down").strip() == "stopped: ray, mlflow"
    assert not local.state_path(user_env[local.STATE_DIR_ENV]).exists()
    assert local._cluster_processes(state["cluster_id"]) == []
    assert not any(psutil.pid_exists(pid) for pid in state["pids"].values())
    run("cluster", "status", expect=1)
    print(f"AP on the training shards: champion {champion_ap}, weak {weak_ap}")
    print("seconds per command: " + ", ".join(f"{name} {seconds:.0f}" for name, seconds in took))
