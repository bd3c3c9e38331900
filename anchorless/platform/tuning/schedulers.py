"""Tune's Population Based Training, without the exploit at a trial's last epoch.

At its last epoch a trial has nothing left to train: cloning a better trial into it
then only restarts its Train run (workers, DeepSpeed, model logging) to copy the
donor's final result, and the campaign's best is the donor either way. Stock PBT
does exactly that whenever the last epoch falls on a perturbation interval; this
one lets the trial finish with its own result.
"""

from __future__ import annotations

from typing import Any

from ray.tune.schedulers import PopulationBasedTraining, TrialScheduler


class PopulationBasedTrainingToTheEnd(PopulationBasedTraining):
    """``PopulationBasedTraining`` that never perturbs at ``last_epoch`` (in ``time_attr``
    units), or at the trial's own ``epochs_key`` value when its config searches it."""

    def __init__(self, *, last_epoch: int, epochs_key: str = "training.epochs", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._last_epoch = last_epoch
        self._epochs_key = epochs_key

    def on_trial_result(self, tune_controller: Any, trial: Any, result: dict[str, Any]) -> str:
        last = (trial.config or {}).get(self._epochs_key, self._last_epoch)
        if result.get(self._time_attr, 0) >= last:
            return TrialScheduler.CONTINUE
        return super().on_trial_result(tune_controller, trial, result)
