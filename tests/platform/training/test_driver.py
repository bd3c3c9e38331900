"""The driver's settings for Ray Train's controller."""

from __future__ import annotations

import os

from anchorless.platform.training.driver import CONTROLLER_POLL_ENV, poll_workers_often


def test_the_controller_polls_every_half_second_unless_the_user_set_it(monkeypatch):
    from ray.train.v2._internal.constants import ENV_VARS_TO_PROPAGATE, HEALTH_CHECK_INTERVAL_S_ENV_VAR

    # The name Ray Train reads, and copies from the calling process to its controller.
    assert CONTROLLER_POLL_ENV == HEALTH_CHECK_INTERVAL_S_ENV_VAR and CONTROLLER_POLL_ENV in ENV_VARS_TO_PROPAGATE
    monkeypatch.delenv(CONTROLLER_POLL_ENV, raising=False)
    poll_workers_often()
    assert os.environ[CONTROLLER_POLL_ENV] == "0.5"
    monkeypatch.setenv(CONTROLLER_POLL_ENV, "3")
    poll_workers_often()
    assert os.environ[CONTROLLER_POLL_ENV] == "3"
