"""The driver's progress bar: planned steps, or the training seconds of a time budget."""

from __future__ import annotations

from anchorless.platform.progress import ProgressDisplay


def _step(step: int, train_seconds: float) -> dict:
    return {"kind": "step", "epoch": 3, "step": step, "losses": {"loss_cls": 1.0}, "lr": 1e-3,
            "images_per_s": 8.0, "train_seconds": train_seconds}  # fmt: skip


def test_the_bar_counts_planned_steps():
    display = ProgressDisplay(None, total_steps=480, epochs=20)
    display._show({"kind": "start", "epoch": 0, "step": 0, "resumed": False, "train_seconds": 0.0})
    display._show(_step(77, 61.4))
    assert (display._bar.total, display._bar.n, display._bar.unit) == (480, 77, "step")
    assert display._bar.desc.startswith("epoch 3/20")
    display._bar.close()


def test_under_a_time_budget_the_bar_counts_training_seconds_and_names_the_step():
    # The epochs of a budgeted run are a ceiling it never reaches: its planned steps mean nothing.
    display = ProgressDisplay(None, total_steps=250_000, epochs=10_000, budget_minutes=2)
    display._show({"kind": "start", "epoch": 0, "step": 0, "resumed": False, "train_seconds": 0.0})
    display._show(_step(77, 61.4))
    assert (display._bar.total, display._bar.n, display._bar.unit) == (120, 61, "s")
    assert display._bar.desc.startswith("epoch 3") and "/" not in display._bar.desc
    assert "step 77" in display._bar.postfix
    display._show(_step(150, 121.9))  # the step that crosses the budget
    assert display._bar.n == 120
    display._bar.close()


def test_the_token_auth_and_progress_bar_notices_are_dropped_and_other_warnings_stay(caplog):
    import logging

    from anchorless.platform.progress import quiet_ray_notices

    quiet_ray_notices()
    quiet_ray_notices()  # idempotent: one filter per logger
    auth = logging.getLogger("ray._private.authentication.authentication_token_setup")
    bars = logging.getLogger("ray.data._internal.progress")
    assert len(auth.filters) == 1 and len(bars.filters) == 1
    with caplog.at_level(logging.WARNING):
        auth.warning("Token authentication is enabled for this Ray cluster. Set RAY_AUTH_MODE=disabled to opt out.")
        auth.warning("Token authentication is disabled for this Ray cluster. Anyone with network access ...")
        bars.warning("Progress bars disabled. To enable, set `ray.data.DataContext.get_current().enable_progress_bars = True`.")
        bars.warning("Progress bars for operators disabled. To enable, ...")
    assert [r.getMessage().split(".")[0] for r in caplog.records] == [
        "Token authentication is disabled for this Ray cluster",
        "Progress bars for operators disabled",
    ]
