"""Training progress on the driver: rank 0 sends, the driver draws a tqdm bar.

Ray Train V2 calls its user callbacks in the controller actor and only when every
rank reports (once per epoch here), so per-step progress travels another way: rank 0
puts small dicts on a ``ray.util.queue.Queue`` and a thread on the driver drains it
into one bar (step, epoch, images/s, loss terms, ETA) and one line per evaluation.
"""

from __future__ import annotations

import logging
import threading
import warnings
from typing import Any

from tqdm import tqdm

log = logging.getLogger(__name__)

# Shown in the bar, in this order, when present.
_SHOWN_METRICS = ("AP", "AP50", "duplicate_rate")
# Loggers that narrate set-up at INFO in every Ray worker process (Ray Train's report
# lines, Ray Data's execution plans, DeepSpeed's config dump, torch's CUDA probe).
_CHATTY_LOGGERS = ("ray.train.v2", "ray.data", "DeepSpeed", "torch.distributed")
# Warnings with nothing to act on: torch finding no CUDA on a CPU worker.
_WARNING_ONLY_LOGGERS = (
    "torch.utils.cpp_extension",
    # Without the dashboard Ray's state API is off; the cleaner then warns every second.
    "ray.train.v2._internal.execution.controller.placement_group_cleaner",
)
# Environment for Ray worker processes: Ray Data reads its log level from here when it
# configures logging; Ray Train otherwise turns every print into an INFO log record, past
# any contextlib.redirect_stdout (pycocotools prints each stage of an evaluation).
QUIET_WORKER_ENV = {"RAY_DATA_LOG_LEVEL": "WARNING", "RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}


def quiet_worker_logs() -> None:
    """Keep Ray, Ray Data and DeepSpeed at WARNING in a worker process (a Ray ``worker_process_setup_hook``)."""
    # The root too: Ray Train logs each report at INFO through a logger named after its file.
    logging.getLogger().setLevel(logging.WARNING)
    for name in _CHATTY_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    for name in _WARNING_ONLY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    # Ray's own DataConfig copies a deprecated option on every split; nothing for a user to act on.
    warnings.filterwarnings("ignore", message=".*exclude_resources.*")


def quiet_driver_console() -> None:
    """Keep Ray Data's execution narration (INFO) off the driver's console; its log file
    in the Ray session directory still gets everything."""
    import ray.data  # noqa: F401 - configures the "ray.data" logger and its handlers

    for handler in logging.getLogger("ray.data").handlers:
        if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
            handler.setLevel(max(handler.level, logging.WARNING))


_NOTICES = {  # logger -> the start of the one message it should not print
    # Ray's default for a new local cluster, said on every start; its other auth warnings
    # (e.g. that auth is *off*) stay.
    "ray._private.authentication.authentication_token_setup": "Token authentication is enabled",
    # Ray Data's bars are off on purpose (the driver draws one bar of its own); no advice needed.
    "ray.data._internal.progress": "Progress bars disabled",
}


class _DropNotice(logging.Filter):
    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefix)


def quiet_ray_notices() -> None:
    """Drop two of Ray's console notices that say nothing a user of ours can act on: that a
    new local cluster uses token auth (its default), and that Ray Data's bars are off."""
    for name, prefix in _NOTICES.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropNotice) for f in logger.filters):
            logger.addFilter(_DropNotice(prefix))


def create_queue(maxsize: int = 0) -> Any:
    """A queue actor read by this process: no CPU reserved, so it never competes with
    training workers, and placed on this process's node, so that on a cluster every
    poll of the reader stays local (the workers' puts cross the network once)."""
    import ray
    from ray.util.queue import Queue
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=True)
    return Queue(maxsize=maxsize, actor_options={"num_cpus": 0, "scheduling_strategy": here})


class ProgressSender:
    """Rank 0's end: never blocks training for long and never raises."""

    def __init__(self, queue: Any | None) -> None:
        self.queue = queue

    def send(self, kind: str, **fields: Any) -> None:
        if self.queue is None:
            return
        try:
            self.queue.put_nowait({"kind": kind, **fields})
        except Exception as exc:  # the driver may be gone; progress is not worth a failure
            log.debug("progress dropped: %s", exc)
            self.queue = None


class ForwardWarnings(logging.Handler):
    """Send this worker's ``anchorless`` warnings to the driver's display (Ray's own log
    forwarding is off unless verbose, so the driver shows our bar, not every Ray line)."""

    def __init__(self, sender: ProgressSender, rank: int) -> None:
        super().__init__(level=logging.WARNING)
        self.sender, self.rank = sender, rank

    def emit(self, record: logging.LogRecord) -> None:
        self.sender.send("message", text=f"[rank {self.rank}] {record.levelname.lower()}: {record.getMessage()}")


def forward_worker_warnings(queue: Any | None, rank: int) -> None:
    if queue is not None:
        logging.getLogger("anchorless").addHandler(ForwardWarnings(ProgressSender(queue), rank))


def format_losses(losses: dict[str, float]) -> str:
    return " ".join(f"{name.removeprefix('loss_')}={value:.3f}" for name, value in losses.items())


class ProgressDisplay:
    """The driver's end: a context manager running the draining thread."""

    def __init__(
        self, queue: Any, *, total_steps: int, epochs: int, enabled: bool = True, budget_minutes: float | None = None
    ) -> None:
        self.queue = queue
        self.total_steps = total_steps
        # A time budget ends the run before its planned steps: the bar then counts training seconds.
        self.budget_s = round(budget_minutes * 60) if budget_minutes else None
        self.epochs = epochs
        self.enabled = enabled
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="anchorless-progress", daemon=True)
        self._bar: tqdm | None = None
        self.last_evaluation: dict[str, Any] | None = None

    def __enter__(self) -> "ProgressDisplay":
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._drain()
        if self._bar is not None:
            self._bar.close()

    def _run(self) -> None:
        from ray.util.queue import Empty

        while not self._stop.is_set():
            try:
                item = self.queue.get(block=True, timeout=0.5)
            except Empty:
                continue
            except Exception:  # the queue actor died with the cluster: nothing more to show
                return
            self._show(item)

    def _drain(self) -> None:
        try:
            while not self.queue.empty():
                self._show(self.queue.get_nowait())
        except Exception:
            pass

    def _position(self, item: dict[str, Any]) -> int:
        """Where the bar stands: training seconds under a time budget, else the step."""
        if self.budget_s:
            return min(self.budget_s, round(item.get("train_seconds", 0.0)))
        return item.get("step", 0)

    def _show(self, item: dict[str, Any]) -> None:
        if not self.enabled:
            if item.get("kind") == "evaluation":
                self.last_evaluation = item
            return
        kind = item.get("kind")
        if kind == "start" and self._bar is not None:  # Ray Train restarted the workers
            self._bar.n = self._position(item)
            self._bar.write(f"workers restarted: continuing from epoch {item['epoch']}, step {item['step']}")
            self._bar.refresh()
        elif kind == "start":
            self._bar = tqdm(
                total=self.budget_s or self.total_steps,
                initial=self._position(item),
                desc="train",
                unit="s" if self.budget_s else "step",
                dynamic_ncols=True,
                leave=True,
            )
            if item.get("resumed"):
                self._bar.write(f"resumed at epoch {item['epoch']}, step {item['step']}")
        elif kind == "step" and self._bar is not None:
            self._bar.n = self._position(item)
            where = f"epoch {item['epoch']}" if self.budget_s else f"epoch {item['epoch']}/{self.epochs}"
            self._bar.set_description(where, refresh=False)
            step = f"step {item['step']} " if self.budget_s else ""
            self._bar.set_postfix_str(
                f"{step}{format_losses(item['losses'])} lr={item['lr']:.2e} {item['images_per_s']:.1f} img/s", refresh=False
            )
            self._bar.refresh()
        elif kind == "evaluation":
            self.last_evaluation = item
            shown = " ".join(f"{key}={item['metrics'][key]:.3f}" for key in _SHOWN_METRICS if key in item["metrics"])
            line = f"epoch {item['epoch']}/{self.epochs} step {item['step']}: {shown}"
            if self._bar is not None:
                self._bar.write(line)
            else:
                print(line, flush=True)
        elif kind == "message":
            (self._bar.write if self._bar is not None else print)(item["text"])
