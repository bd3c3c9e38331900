"""The training tricks: the schedule over a time budget, the EMA of the weights, label smoothing."""

from __future__ import annotations

import math
import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torchvision.ops import sigmoid_focal_loss

from anchorless.detectors import build_detector
from anchorless.detectors.losses.focal import FocalLoss
from anchorless.platform.config import ConfigError, EmaConfig, ScheduleConfig, TrainingConfig, build_config
from anchorless.platform.training.engine import (
    average_batchnorm_statistics,
    build_engine,
    deepspeed_config,
    load_engine,
    lr_scheduler_factory,
    model_state_dict,
    save_engine,
    set_schedule_clock,
)
from anchorless.platform.training.tricks import WeightEma, apply_label_smoothing, ema_decay

from tests.platform.conftest import tiny_model

# --- the schedule follows the budget -------------------------------------------------------------


def _run_on_a_fake_clock(schedule: ScheduleConfig, *, budget_s: float, seconds_per_step: float) -> list[tuple[float, float]]:
    """(clock, LR in force for the next step) after every step of a budgeted run, as the worker
    drives it: DeepSpeed steps the scheduler, then the agreed clock is applied."""
    parameter = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([parameter], lr=1.0)
    # total_steps is what `epochs` gives: far more steps than the budget allows.
    scheduler = lr_scheduler_factory(schedule, total_steps=1_000_000, budget_seconds=budget_s)(optimizer)
    clock, trace = 0.0, []
    while clock < budget_s:
        optimizer.step()
        scheduler.step()
        clock += seconds_per_step
        set_schedule_clock(scheduler, clock)
        trace.append((clock, optimizer.param_groups[0]["lr"]))
    return trace


def test_a_budgeted_cosine_schedule_decays_over_the_seconds_and_ends_at_its_floor_at_the_budget():
    schedule = ScheduleConfig(kind="cosine", warmup_steps=0, min_lr_ratio=0.05)
    trace = _run_on_a_fake_clock(schedule, budget_s=60.0, seconds_per_step=0.7)
    clock, last_lr = trace[-1]
    assert clock >= 60.0 and last_lr == pytest.approx(0.05)  # the final value once the budget is spent
    halfway = min(trace, key=lambda entry: abs(entry[0] - 30.0))
    assert halfway[1] == pytest.approx(0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * halfway[0] / 60)))
    lrs = [lr for _, lr in trace]
    assert all(later <= earlier for earlier, later in zip(lrs, lrs[1:]))
    # Over steps the same run would hardly have moved: 86 of a million steps.
    assert lrs[-1] < 0.1


def test_a_budgeted_step_schedule_drops_at_fractions_of_the_budget_and_warms_up_over_seconds():
    schedule = ScheduleConfig(kind="step", milestones=[0.5, 0.75], gamma=0.1, warmup_seconds=10.0, warmup_factor=0.2)
    trace = _run_on_a_fake_clock(schedule, budget_s=100.0, seconds_per_step=1.0)
    lr_at = dict((round(clock), lr) for clock, lr in trace)
    assert lr_at[5] == pytest.approx(0.6)  # halfway through the warmup seconds: between 0.2 and 1
    assert [lr_at[s] for s in (10, 49, 50, 74, 75)] == pytest.approx([1.0, 1.0, 0.1, 0.1, 0.01])
    assert trace[-1][1] == pytest.approx(0.01)


def test_without_warmup_seconds_a_budgeted_run_warms_up_over_its_steps():
    schedule = ScheduleConfig(kind="constant", warmup_steps=4, warmup_factor=0.2)
    trace = _run_on_a_fake_clock(schedule, budget_s=100.0, seconds_per_step=10.0)
    assert [lr for _, lr in trace[:5]] == pytest.approx([0.4, 0.6, 0.8, 1.0, 1.0])


def test_warmup_seconds_need_a_budget_longer_than_them():
    with pytest.raises(ConfigError, match=r"schedule\.warmup_seconds needs time_budget_minutes"):
        build_config({"training": {"schedule": {"warmup_seconds": 30}}})
    with pytest.raises(ConfigError, match=r"schedule\.warmup_seconds=90 is not shorter"):
        build_config({"training": {"time_budget_minutes": 1, "schedule": {"warmup_seconds": 90}}})
    assert build_config({"training": {"time_budget_minutes": 1, "schedule": {"warmup_seconds": 30}}})


# --- EMA of the weights -------------------------------------------------------------------------


def test_ema_decay_warms_up_as_one_minus_exp_of_updates_over_tau():
    assert ema_decay(0.9998, 2000, 0) == 0.0
    assert ema_decay(0.9998, 2000, 2000) == pytest.approx(0.9998 * (1 - math.exp(-1)))
    assert ema_decay(0.9998, 2000, 10**6) == pytest.approx(0.9998)


def test_ema_copies_the_first_weights_then_averages_with_the_warmed_up_decay():
    model = torch.nn.Linear(2, 1)
    ema = WeightEma(model, EmaConfig(enabled=True, decay=0.9, tau=3.0))
    with torch.no_grad():
        model.weight.fill_(1.0)
    ema.update(model)  # the first update copies
    assert ema.updates == 1 and torch.equal(ema.module.weight, torch.ones(1, 2))
    with torch.no_grad():
        model.weight.fill_(3.0)
    ema.update(model)
    decay = 0.9 * (1 - math.exp(-1 / 3))
    torch.testing.assert_close(ema.module.weight, torch.full((1, 2), decay * 1.0 + (1 - decay) * 3.0))
    assert not ema.module.weight.requires_grad


def test_ema_of_a_bf16_model_is_kept_in_float32_and_counts_integer_buffers():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.BatchNorm2d(4)).to(torch.bfloat16)
    ema = WeightEma(model, EmaConfig(enabled=True, decay=0.99, tau=1.0))
    for _ in range(3):
        model(torch.randn(2, 3, 4, 4, dtype=torch.bfloat16))
        ema.update(model)
    assert ema.module[0].weight.dtype == torch.float32
    assert int(ema.module[1].num_batches_tracked) == 3  # copied, not averaged


def _ema_on_two_ranks(rank: int, init_file: str, results) -> None:
    """Data-parallel steps as DeepSpeed takes them (gradients all-reduced, then one optimizer step
    on every rank), each rank on its own batches; the EMA is updated after every step."""
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        torch.manual_seed(0)  # the same initial weights (DeepSpeed broadcasts rank 0's)
        model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Flatten(), torch.nn.LazyLinear(1))
        model(torch.zeros(1, 3, 6, 6))
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        ema = WeightEma(model, EmaConfig(enabled=True, decay=0.9, tau=2.0))
        data = torch.Generator().manual_seed(100 + rank)  # each rank its own batches
        for _ in range(5):
            optimizer.zero_grad()
            model(torch.randn(4, 3, 6, 6, generator=data)).pow(2).mean().backward()
            for parameter in model.parameters():
                dist.all_reduce(parameter.grad)
                parameter.grad /= 2
            optimizer.step()
            ema.update(model)
        statistics_differed = _differs_between_ranks(ema.module[1].running_mean)
        average_batchnorm_statistics(ema.module)  # what the worker does before scoring and saving
        flat = torch.cat([tensor.float().flatten() for tensor in ema.module.state_dict().values()])
        gathered = [torch.empty_like(flat) for _ in range(2)]
        dist.all_gather(gathered, flat)
        results[rank] = (statistics_differed, torch.equal(gathered[0], gathered[1]), ema.updates)
    finally:
        dist.destroy_process_group()


def _differs_between_ranks(tensor: torch.Tensor) -> bool:
    gathered = [torch.empty_like(tensor) for _ in range(2)]
    dist.all_gather(gathered, tensor)
    return not torch.equal(gathered[0], gathered[1])


def test_the_ema_is_identical_on_every_rank_once_its_batchnorm_statistics_are_averaged():
    with tempfile.TemporaryDirectory() as tmp:
        results = mp.get_context("spawn").Manager().dict()
        mp.start_processes(_ema_on_two_ranks, args=(os.path.join(tmp, "init"), results), nprocs=2, start_method="spawn")
        # Each rank's own BatchNorm statistics made the EMAs differ; after the average they are one model.
        assert dict(results) == {0: (True, True, 5), 1: (True, True, 5)}


@pytest.mark.parametrize("zero_stage", [0, 1])
def test_the_ema_is_checkpointed_resumed_and_is_what_is_exported(process_group, tmp_path, monkeypatch, zero_stage):
    for key, value in {"DS_ACCELERATOR": "cpu", "LOCAL_RANK": "0", "RANK": "0", "WORLD_SIZE": "1"}.items():
        monkeypatch.setenv(key, value)  # what Ray Train sets on a worker
    training = TrainingConfig(zero_stage=zero_stage, ema={"enabled": True, "decay": 0.9, "tau": 1.0})
    ds = deepspeed_config(training, batch_size=2, world_size=1)
    engine, _ = build_engine(tiny_model(), ds, training.schedule, total_steps=20)
    ema = WeightEma(engine.module, training.ema)
    for _ in range(4):
        engine.backward(engine(torch.randn(2, 4)).pow(2).mean())
        engine.step()
        ema.update(engine.module)
    save_engine(engine, tmp_path, {"epoch": 1, **ema.state()})

    exported = model_state_dict(tmp_path)  # what the driver exports and registers
    for name, tensor in ema.module.state_dict().items():
        torch.testing.assert_close(exported[name], tensor)
    assert not torch.equal(exported["0.weight"], engine.module.state_dict()["0.weight"])  # not the raw weights

    fresh, _ = build_engine(tiny_model(), ds, training.schedule, total_steps=20)
    resumed = WeightEma(fresh.module, training.ema)
    assert resumed.load_state(load_engine(fresh, tmp_path))
    assert resumed.updates == 4
    for name, tensor in ema.module.state_dict().items():
        torch.testing.assert_close(resumed.module.state_dict()[name], tensor)


def test_ema_settings_are_validated_naming_the_key():
    assert build_config({}).training.ema.enabled is False
    with pytest.raises(ConfigError, match=r"training\.ema\.decay"):
        build_config({"training": {"ema": {"enabled": True, "decay": 1.0}}})
    with pytest.raises(ConfigError, match=r"training\.ema\.tau"):
        build_config({"training": {"ema": {"tau": 0}}})


# --- label smoothing ----------------------------------------------------------------------------


def test_label_smoothing_trains_focal_targets_towards_eps_over_two_and_one_minus_eps_over_two():
    logits, targets = torch.randn(5, 3), torch.tensor([[1.0, 0, 0], [0, 1, 0], [0, 0, 0], [0, 0, 1], [1, 0, 0]])
    smoothed = FocalLoss(label_smoothing=0.1)(logits, targets, 1.0)
    expected = sigmoid_focal_loss(logits, targets * 0.9 + 0.05, alpha=0.25, gamma=2.0, reduction="sum")
    torch.testing.assert_close(smoothed, expected)
    assert not torch.allclose(FocalLoss()(logits, targets, 1.0), expected)


def test_label_smoothing_reaches_focal_detectors_and_is_refused_by_heatmap_ones():
    tiny = {"num_classes": 2, "backbone": {"depth": 18, "norm": "bn", "frozen_stages": 0}}
    onenet = build_detector({"name": "onenet", **tiny})
    assert apply_label_smoothing(onenet, 0.1) >= 1
    assert all(loss.label_smoothing == 0.1 for loss in onenet.modules() if isinstance(loss, FocalLoss))
    centernet = build_detector({"name": "centernet", **tiny})
    with pytest.raises(ConfigError, match=r"training\.label_smoothing=0\.1: CenterNet has no sigmoid focal"):
        apply_label_smoothing(centernet, 0.1)
    assert apply_label_smoothing(centernet, 0.0) == 0  # off: nothing to refuse
    with pytest.raises(ConfigError, match=r"training\.label_smoothing"):
        build_config({"training": {"label_smoothing": 1.0}})
