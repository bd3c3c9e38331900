"""Starting or joining Ray: the one place the platform calls ``ray.init``.

Training, campaigns and offline evaluation all come through :func:`connect_ray`, so
they join the same clusters the same way and a local Ray is always one of our own.
"""

from __future__ import annotations

import logging
import os

from anchorless.platform.progress import QUIET_WORKER_ENV, quiet_driver_console, quiet_ray_notices


def connect_ray(address: str | None = None, *, cpus_needed: int = 0, verbose: bool = False) -> bool:
    """Join ``address`` (or ``$RAY_ADDRESS``), or start a local Ray; True when started here.

    A local Ray gets every core, and at least ``cpus_needed + 1`` logical CPUs.

    Unless ``verbose``, worker output is not forwarded to the driver (``log_to_driver``):
    Ray, Ray Data and DeepSpeed narrate every start-up, and what matters reaches the
    driver anyway (the progress display, our own warnings, a failing worker's exception).
    """
    import ray

    if not verbose:
        quiet_driver_console()
    if ray.is_initialized():
        return False

    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    output = {"logging_level": logging.INFO if verbose else logging.WARNING, "log_to_driver": verbose}
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        # A cluster's job may carry its own runtime_env (working_dir, ...): leave it alone.
        ray.init(address=address, **output)
        return True
    quiet_ray_notices()
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
