"""The DeepSpeed config builder, the learning-rate schedule, and a checkpoint round trip."""

from __future__ import annotations

import errno
import math
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from anchorless.platform.config import ScheduleConfig, TrainingConfig
from anchorless.platform.training.engine import (
    CheckpointError,
    WarmupSchedule,
    average_batchnorm_statistics,
    build_engine,
    deepspeed_config,
    load_checkpoint_file,
    load_engine,
    lr_scheduler_factory,
    model_state_dict,
    save_engine,
    use_this_environments_ninja,
)

from tests.platform.conftest import tiny_model


def test_deepspeed_config_carries_batch_accumulation_clipping_zero_and_fp32_on_cpu():
    training = TrainingConfig(zero_stage=2, grad_accum=3, grad_clip=0.5)
    ds = deepspeed_config(training, batch_size=4, world_size=2)
    assert ds["train_micro_batch_size_per_gpu"] == 4
    assert ds["gradient_accumulation_steps"] == 3
    assert ds["train_batch_size"] == 4 * 3 * 2
    assert ds["gradient_clipping"] == 0.5
    assert ds["zero_optimization"] == {"stage": 2}
    assert ds["bf16"] == {"enabled": False} and ds["fp16"] == {"enabled": False}


def test_deepspeed_config_turns_clipping_off_with_zero_and_enables_bf16_only_when_asked_on_gpu():
    assert deepspeed_config(TrainingConfig(grad_clip=None), batch_size=1, world_size=1)["gradient_clipping"] == 0.0
    ds = deepspeed_config(TrainingConfig(use_gpu=True, precision="bf16"), batch_size=1, world_size=1)
    assert ds["bf16"] == {"enabled": True} and ds["fp16"] == {"enabled": False}


def test_bf16_on_cpu_is_autocast_around_the_forward_not_deepspeeds_bf16_mode():
    import torch

    from anchorless.platform.training.engine import training_autocast

    cpu_bf16 = TrainingConfig(precision="bf16")
    assert deepspeed_config(cpu_bf16, batch_size=1, world_size=1)["bf16"] == {"enabled": False}
    with training_autocast(cpu_bf16, torch.device("cpu")):
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
    with training_autocast(TrainingConfig(), torch.device("cpu")):
        assert not torch.is_autocast_enabled("cpu")
    # On GPU DeepSpeed's bf16 mode casts the model; no autocast is added on top.
    gpu_bf16 = TrainingConfig(precision="bf16", use_gpu=True)
    with training_autocast(gpu_bf16, torch.device("cuda")):
        assert not torch.is_autocast_enabled("cpu")


def test_adamw_is_torch_adamw_without_a_compiled_op_and_sgd_keeps_momentum():
    adamw = deepspeed_config(
        TrainingConfig(optimizer={"name": "adamw", "lr": 2e-4, "weight_decay": 0.05, "betas": (0.9, 0.99)}),
        batch_size=2,
        world_size=1,
    )["optimizer"]
    assert adamw["type"] == "AdamW"
    assert adamw["params"] == {
        "lr": 2e-4, "betas": [0.9, 0.99], "weight_decay": 0.05, "torch_adam": True, "foreach": True
    }
    sgd = deepspeed_config(
        TrainingConfig(optimizer={"name": "sgd", "lr": 0.01, "momentum": 0.8, "weight_decay": 1e-4}),
        batch_size=2,
        world_size=1,
    )["optimizer"]
    assert sgd == {"type": "SGD", "params": {"lr": 0.01, "momentum": 0.8, "weight_decay": 1e-4}}


def test_warmup_rises_linearly_from_the_warmup_factor_then_cosine_reaches_the_floor():
    schedule = WarmupSchedule(total_steps=100, kind="cosine", warmup_steps=10, warmup_factor=0.1, min_lr_ratio=0.05)
    cosine = lambda step: 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * step / 100))  # noqa: E731
    assert schedule(0) == pytest.approx(0.1)
    assert schedule(5) == pytest.approx(cosine(5) * 0.55)  # halfway between 0.1 and 1
    assert schedule(10) == pytest.approx(cosine(10))
    assert schedule(50) == pytest.approx(0.05 + 0.95 * 0.5)
    assert schedule(100) == pytest.approx(0.05)
    assert schedule(250) == pytest.approx(0.05)  # past the end: stays at the floor


def test_step_schedule_multiplies_by_gamma_at_each_milestone_and_constant_stays_at_one():
    step = WarmupSchedule(total_steps=100, kind="step", milestones=(0.5, 0.8), gamma=0.1)
    assert [step(s) for s in (0, 49, 50, 79, 80, 100)] == pytest.approx([1, 1, 0.1, 0.1, 0.01, 0.01])
    constant = WarmupSchedule(total_steps=100, kind="constant", warmup_steps=4, warmup_factor=0.2)
    assert [constant(s) for s in (0, 2, 4, 60)] == pytest.approx([0.2, 0.6, 1.0, 1.0])


def test_lr_scheduler_factory_gives_a_lambda_lr_that_scales_the_optimizer_lr():
    parameter = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([parameter], lr=0.5)
    schedule = ScheduleConfig(kind="step", warmup_steps=2, warmup_factor=0.5, milestones=[0.5], gamma=0.1)
    scheduler = lr_scheduler_factory(schedule, total_steps=10)(optimizer)
    lrs = []
    for _ in range(7):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs == pytest.approx([0.25, 0.375, 0.5, 0.5, 0.5, 0.05, 0.05])


@pytest.mark.parametrize("zero_stage", [0, 1])
def test_checkpoint_round_trip_restores_weights_optimizer_and_schedule(process_group, tmp_path, monkeypatch, zero_stage):
    for key, value in {"DS_ACCELERATOR": "cpu", "LOCAL_RANK": "0", "RANK": "0", "WORLD_SIZE": "1"}.items():
        monkeypatch.setenv(key, value)  # what Ray Train sets on a worker
    training = TrainingConfig(zero_stage=zero_stage, schedule={"kind": "cosine", "warmup_steps": 3})
    ds = deepspeed_config(training, batch_size=2, world_size=1)
    engine, scheduler = build_engine(tiny_model(), ds, training.schedule, total_steps=20)
    assert engine.enable_backward_allreduce == (zero_stage > 0)  # one worker, ZeRO 0: no all-reduce with itself
    inputs = torch.randn(2, 4)
    for _ in range(5):
        engine.backward(engine(inputs).pow(2).mean())
        engine.step()
    save_engine(engine, tmp_path, {"epoch": 3})
    weights = {k: v.clone() for k, v in engine.module.state_dict().items()}
    lr_before = scheduler.get_last_lr()[0]

    fresh, fresh_scheduler = build_engine(tiny_model(), ds, training.schedule, total_steps=20)
    client_state = load_engine(fresh, tmp_path)
    assert client_state["epoch"] == 3
    assert fresh.global_steps == 5
    assert fresh_scheduler.get_last_lr()[0] == pytest.approx(lr_before)
    for name, tensor in fresh.module.state_dict().items():
        torch.testing.assert_close(tensor, weights[name])
    # One more step from either engine gives the same weights: the optimizer state came back too.
    for each in (engine, fresh):
        each.backward(each(inputs).pow(2).mean())
        each.step()
    for name, tensor in fresh.module.state_dict().items():
        torch.testing.assert_close(tensor, engine.module.state_dict()[name])
    # And the plain weights read back without DeepSpeed.
    for name, tensor in model_state_dict(tmp_path).items():
        torch.testing.assert_close(tensor, weights[name])


def _trained_engine(zero_stage: int, monkeypatch):
    for key, value in {"DS_ACCELERATOR": "cpu", "LOCAL_RANK": "0", "RANK": "0", "WORLD_SIZE": "1"}.items():
        monkeypatch.setenv(key, value)  # what Ray Train sets on a worker
    training = TrainingConfig(zero_stage=zero_stage)
    ds = deepspeed_config(training, batch_size=2, world_size=1)
    engine, _ = build_engine(tiny_model(), ds, training.schedule, total_steps=20)
    for _ in range(2):
        engine.backward(engine(torch.randn(2, 4)).pow(2).mean())
        engine.step()
    return engine, lambda: build_engine(tiny_model(), ds, training.schedule, total_steps=20)[0]


class _RunsCode:
    """A pickled callable: unpickling it with weights_only=False writes ``marker``."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (Path(self.marker), "code ran"))


@pytest.mark.parametrize("zero_stage", [0, 1])
def test_every_checkpoint_file_is_read_weights_only_and_one_carrying_a_callable_is_refused_unrun(
    process_group, tmp_path, monkeypatch, zero_stage
):
    engine, fresh_engine = _trained_engine(zero_stage, monkeypatch)
    save_engine(engine, tmp_path / "good", {"epoch": 1})
    files = sorted((tmp_path / "good").rglob("*.pt"))
    for path in files:  # DeepSpeed's own types pass the allow-list; nothing else is needed
        load_checkpoint_file(path)
    assert load_engine(fresh_engine(), tmp_path / "good")["epoch"] == 1

    marker = tmp_path / "marker"
    for path in files:  # each file in turn carries the payload beside what DeepSpeed wrote
        shutil.copytree(tmp_path / "good", tmp_path / "evil", dirs_exist_ok=True)
        evil = tmp_path / "evil" / path.relative_to(tmp_path / "good")
        saved = torch.load(path, weights_only=True, map_location="cpu") if path.name.startswith("mp_") else None
        torch.save({**(saved or {}), "payload": _RunsCode(marker)}, evil)
        with pytest.raises(CheckpointError, match=rf"{re.escape(str(evil))}: refused to load: .*Unsupported global"):
            load_engine(fresh_engine(), tmp_path / "evil")
        if path.name.startswith("mp_"):
            with pytest.raises(CheckpointError, match=re.escape(str(evil))):
                model_state_dict(tmp_path / "evil")
        assert not marker.exists()
    # The payload is live: loading it the old way would have run it.
    torch.load(evil, weights_only=False)
    assert marker.read_text() == "code ran"


def test_a_full_disk_while_writing_a_checkpoint_is_a_clear_error_and_the_previous_one_still_resumes(
    process_group, tmp_path, monkeypatch
):
    engine, fresh_engine = _trained_engine(1, monkeypatch)
    save_engine(engine, tmp_path / "epoch1", {"epoch": 1})
    weights = {k: v.clone() for k, v in engine.module.state_dict().items()}
    engine.backward(engine(torch.randn(2, 4)).pow(2).mean())
    engine.step()

    real_save = torch.save
    written = []

    def save_until_the_disk_fills(obj, path, *args, **kwargs):
        if written:  # the second file of the checkpoint finds the disk full, half-written
            Path(path).write_bytes(b"half")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        written.append(path)
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save_until_the_disk_fills)
    with pytest.raises(CheckpointError, match=r"epoch2: cannot write the training checkpoint \(the file system is full\); .*previous checkpoint is intact"):
        save_engine(engine, tmp_path / "epoch2", {"epoch": 2})
    monkeypatch.setattr(torch, "save", real_save)
    assert written and not (tmp_path / "epoch2" / "deepspeed").exists()  # nothing half-written looks like a checkpoint

    resumed = fresh_engine()
    assert load_engine(resumed, tmp_path / "epoch1")["epoch"] == 1 and resumed.global_steps == 2
    for name, tensor in resumed.module.state_dict().items():
        torch.testing.assert_close(tensor, weights[name])


def test_model_state_dict_names_a_directory_that_is_not_a_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a training checkpoint"):
        model_state_dict(tmp_path)


def _batchnorm_statistics_on_two_ranks(rank: int, init_file: str, results) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.BatchNorm2d(4), torch.nn.GroupNorm(2, 4))
        model[1].running_mean.fill_(float(rank))  # each rank saw its own batches
        model[1].running_var.fill_(1.0 + 2 * rank)
        weight = model[0].weight.clone()
        averaged = average_batchnorm_statistics(model)
        results[rank] = (averaged, model[1].running_mean.tolist(), model[1].running_var.tolist(), torch.equal(weight, model[0].weight))
    finally:
        dist.destroy_process_group()


def test_batchnorm_running_statistics_are_averaged_over_ranks_so_every_rank_holds_the_saved_model():
    # Spawned, not forked: a forked child would inherit this session's one-process group.
    with tempfile.TemporaryDirectory() as tmp:
        results = mp.get_context("spawn").Manager().dict()
        mp.start_processes(_batchnorm_statistics_on_two_ranks, args=(os.path.join(tmp, "init"), results), nprocs=2, start_method="spawn")
        expected = (2, [0.5] * 4, [2.0] * 4, True)  # means and variances averaged; weights untouched
        assert dict(results) == {0: expected, 1: expected}
    assert average_batchnorm_statistics(torch.nn.BatchNorm2d(4)) == 0  # one process: nothing to do


def test_deepspeeds_op_builds_use_the_ninja_of_this_environment_whatever_path_the_process_got(monkeypatch):
    scripts = os.path.dirname(sys.executable)
    if not os.path.isfile(os.path.join(scripts, "ninja")):
        pytest.skip("this environment has no ninja of its own")
    monkeypatch.setenv("PATH", os.pathsep.join(["/usr/bin", "/bin"]))
    use_this_environments_ninja()
    use_this_environments_ninja()  # once on PATH, not again
    assert os.environ["PATH"].split(os.pathsep) == [scripts, "/usr/bin", "/bin"]
    assert shutil.which("ninja") == os.path.join(scripts, "ninja")
