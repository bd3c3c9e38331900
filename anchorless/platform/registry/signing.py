"""What promotion may trust from the registry: records signed with a key the registry's clients lack.

Anyone who may edit a model version can write its tags, so a score cached in a tag is evidence
only when it carries an HMAC-SHA256 made with the registry's signing key, which only the
promotion path holds. The key, in order:

1. ``$ANCHORLESS_REGISTRY_KEY`` (any string; for an external tracking server, set it where
   ``models promote`` runs and nowhere else);
2. the key file a local cluster generated (``registry_signing_key`` in its state directory,
   0600), which the command line passes in when it talks to that cluster's server;
3. for the embedded SQLite store, a key file beside the database, created on first use
   (whoever can write that database can read it: it guards against nobody more than the
   file system does, and keeps the same rules everywhere).

A remote store with neither is an error: nothing could be trusted, or signed.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
from pathlib import Path
from typing import Any

from anchorless.files import write_atomic
from anchorless.platform.registry.versions import RegistryError

SIGNING_KEY_ENV = "ANCHORLESS_REGISTRY_KEY"
KEY_FILE = "registry_signing_key"


def registry_signing_key(registry_uri: str, *, key_file: str | os.PathLike[str] | None = None) -> bytes:
    """The key that signs and checks this registry's records (see the module docstring)."""
    from_env = os.environ.get(SIGNING_KEY_ENV, "").strip()
    if from_env:
        return from_env.encode()
    if key_file is not None:
        return _read_key(Path(key_file))
    if registry_uri.startswith("sqlite:///"):
        path = Path(registry_uri[len("sqlite:///"):]).parent / KEY_FILE
        if not path.exists():
            write_atomic(path, secrets.token_hex(32), mode=0o600)
        return _read_key(path)
    raise RegistryError(
        f"no signing key for the registry at {registry_uri}: set {SIGNING_KEY_ENV} where `models promote` "
        "runs (the same value every time), so that cached scores and the champion history can be verified"
    )


def _read_key(path: Path) -> bytes:
    try:
        key = path.read_text().strip()
    except OSError as exc:
        raise RegistryError(f"{path}: cannot read the registry's signing key ({exc.strerror})") from None
    if not key:
        raise RegistryError(f"{path}: the registry's signing key file is empty")
    return key.encode()


def sign(key: bytes, *record: Any) -> str:
    """Hex HMAC-SHA256 of ``record`` (JSON-serialisable parts, canonically encoded)."""
    message = json.dumps(record, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()
    return hmac.new(key, message, hashlib.sha256).hexdigest()


def verify(key: bytes, signature: str | None, *record: Any) -> bool:
    """Whether ``signature`` is ``sign(key, *record)``; compared in constant time."""
    return bool(signature) and hmac.compare_digest(sign(key, *record), str(signature))
