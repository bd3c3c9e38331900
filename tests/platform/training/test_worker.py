"""Rank 0's side work: tracking that never holds up a training step."""

from __future__ import annotations

import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

from anchorless.platform.training.worker import WorkerRun


def test_side_work_runs_in_order_off_the_calling_thread_and_a_failure_is_a_warning(caplog):
    run = SimpleNamespace(side_work=ThreadPoolExecutor(max_workers=1))
    store_back = threading.Event()
    done: list[str] = []

    def slow_store(what: str) -> None:  # an MLflow call in its retries while the store is down
        assert store_back.wait(10)
        done.append(what)

    def broken() -> None:
        raise RuntimeError("drawing failed")

    with caplog.at_level(logging.WARNING, logger="anchorless"):
        WorkerRun.beside(run, slow_store, "step 1")
        WorkerRun.beside(run, done.append, "step 2")
        WorkerRun.beside(run, broken)
        WorkerRun.beside(run, done.append, "epoch summary")
        assert done == []  # the caller went on while the first call waits for the store
        store_back.set()
        run.side_work.shutdown(wait=True)
    assert done == ["step 1", "step 2", "epoch summary"]  # in the order queued, past a failure
    failures = [record for record in caplog.records if "beside training failed" in record.getMessage()]
    assert len(failures) == 1 and "drawing failed" in str(failures[0].exc_info[1])
