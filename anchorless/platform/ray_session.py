"""Starting or joining Ray: the one place the platform calls ``ray.init``.

Training, campaigns and offline evaluation all come through :func:`connect_ray`, so
they join the same clusters the same way and a local Ray is always one of our own.

A local Ray stays on this machine: it runs in Ray's single-machine mode (its default on
macOS and Windows, ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``), where the node address is
127.0.0.1 and the GCS, the raylet, the agents and every worker listen on loopback only;
no other node can join it. Ray reads that switch when it is imported, so the command
line sets it (:func:`keep_local_ray_on_loopback`) before anything imports ``ray``.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from anchorless.platform.progress import QUIET_WORKER_ENV, quiet_driver_console, quiet_ray_notices

log = logging.getLogger(__name__)

# Ray's switch for single-machine clusters (False by default only on macOS and Windows):
# off, the node address is 127.0.0.1 and Ray's servers bind there, not to every interface.
LOOPBACK_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}


def keep_local_ray_on_loopback() -> None:
    """Make a Ray started by this process (and its children) listen on 127.0.0.1 only.

    Only for a process that starts its own Ray: a driver joining a multi-node cluster must
    see the node's real address. Takes effect in this process when called before ``ray``
    is imported; children (raylet, agents, workers) always read it.
    """
    for name, value in LOOPBACK_ENV.items():
        os.environ.setdefault(name, value)


def _local_ray_is_on_loopback() -> bool:
    from ray._private import ray_constants  # where Ray keeps the switch it read at import

    return not ray_constants.ENABLE_RAY_CLUSTER


def connect_ray(address: str | None = None, *, cpus_needed: int = 0, verbose: bool = False) -> bool:
    """Join ``address`` (or ``$RAY_ADDRESS``), or start a local Ray; True when started here.

    A local Ray gets every core, and at least ``cpus_needed + 1`` logical CPUs.

    Unless ``verbose``, worker output is not forwarded to the driver (``log_to_driver``):
    Ray, Ray Data and DeepSpeed narrate every start-up, and what matters reaches the
    driver anyway (the progress display, our own warnings, a failing worker's exception).
    """
    address = address or os.environ.get("RAY_ADDRESS")
    if not address and "ray" not in sys.modules:
        keep_local_ray_on_loopback()  # before `import ray`, which reads it
    import ray

    if not verbose:
        quiet_driver_console()
    if ray.is_initialized():
        return False

    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    output = {"logging_level": logging.INFO if verbose else logging.WARNING, "log_to_driver": verbose}
    if address:
        # A cluster's job may carry its own runtime_env (working_dir, ...): leave it alone.
        ray.init(address=address, **output)
        return True
    quiet_ray_notices()
    if not _local_ray_is_on_loopback():
        log.warning(
            "ray was imported before keep_local_ray_on_loopback(): this local Ray listens on the "
            "machine's network address too (Ray's token auth still guards it)"
        )
    quiet = {} if verbose else {
        "env_vars": dict(QUIET_WORKER_ENV),
        "worker_process_setup_hook": "anchorless.platform.progress.quiet_worker_logs",
    }
    ray.init(
        address="local",  # a new Ray of our own, never one a `ray start` on this machine left behind
        # Logical CPUs: Ray Data's decode tasks must be schedulable beside the training workers
        # even when those take every core (the workers spend their time in torch's own threads).
        num_cpus=max(os.cpu_count() or 1, cpus_needed + 1),
        include_dashboard=False,
        runtime_env=quiet,
        **output,
    )
    return True


@dataclass(frozen=True)
class ImportedWhereCalled:
    """A module-level function that Ray pickles as its module's and its own name only, and
    imports in the process that calls it.

    Ray pickles a function by reference, and unpickling imports the function's module with
    everything it imports. Ray Data's dataset manager and split coordinators unpickle the
    whole plan of a dataset only to hand it on, so with the decode functions passed as they
    are each of those processes imported the pipeline, torch and the detectors: 3.5-5 CPU-s
    a process, three of them per Ray Train run (from Ray's worker logs with
    ``PYTHONPROFILEIMPORTTIME=1``). Wrapped, only the process that decodes imports them.
    """

    module: str
    qualname: str

    @classmethod
    def of(cls, function: Callable[..., Any]) -> ImportedWhereCalled:
        return cls(function.__module__, function.__qualname__)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return getattr(importlib.import_module(self.module), self.qualname)(*args, **kwargs)
