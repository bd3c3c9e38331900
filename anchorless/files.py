"""Atomic file writes: a reader sees the old file or the new one, never half of one.

The one writer of the project: the platform (exports, run records, predictions,
campaign summaries) and the cluster (its state file, token and rendered templates)
both write through it, so it lives below both.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str], *, mode: int | None = None) -> Iterator[Path]:
    """A temporary name beside ``path`` to write to; renamed into place when the block
    succeeds, removed when it raises. Writers that pick a format from the suffix must be told it.

    The file is created private (0600, as ``mkstemp`` makes it) unless ``mode`` says otherwise.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(handle)
    try:
        yield Path(tmp)
        if mode is not None:
            os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_atomic(path: str | os.PathLike[str], data: bytes | str, *, mode: int | None = None) -> Path:
    """Write ``data`` to ``path`` atomically, flushed to disk before the rename."""
    with atomic_path(path, mode=mode) as tmp:
        with open(tmp, "wb") as handle:
            handle.write(data.encode() if isinstance(data, str) else data)
            handle.flush()
            os.fsync(handle.fileno())
    return Path(path)


def write_json_atomic(path: str | os.PathLike[str], document: Any, *, indent: int = 2, **dumps: Any) -> Path:
    """``document`` as JSON (a trailing newline), written atomically; ``dumps`` go to ``json.dumps``."""
    return write_atomic(path, json.dumps(document, indent=indent, **dumps) + "\n")
