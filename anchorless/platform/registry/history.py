"""The champion history a rollback goes back through, signed so that nobody but promotion writes it.

The history of an alias is one tag of the registered model, ``anchorless.champion_history.<alias>``:
JSON ``{"champion": "7", "previous": ["2", "5"], "signature": "..."}``, the versions the alias
pointed at before (oldest first) and the version it was moved to when the record was written.
The signature covers (model, alias, champion, previous), so a record copied from another model
or alias, edited, or left behind by an alias moved outside the promotion path does not verify.
No tag is an empty history; anything else that does not verify is an error, never a guess.
"""

from __future__ import annotations

import json
import time

from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from anchorless.platform.registry.signing import sign, verify
from anchorless.platform.registry.versions import RegistryError, alias_version

HISTORY_TAG = "anchorless.champion_history"  # + ".<alias>"


def _record(name: str, alias: str, champion: str, previous: list[str]) -> tuple:
    return ("champion_history", name, alias, champion, previous)


def read_history(client: MlflowClient, name: str, alias: str, key: bytes) -> list[str]:
    """The versions ``alias`` pointed at before its current one, oldest first, once verified.

    Raises RegistryError naming the tag when the record is unsigned, altered or written for a
    champion the alias no longer points at.
    """
    tag = f"{HISTORY_TAG}.{alias}"
    text = (client.get_registered_model(name).tags or {}).get(tag)
    if text is None:
        return []
    current = alias_version(client, name, alias)
    where = f"{name}: tag {tag}"
    try:
        record = json.loads(text)
    except json.JSONDecodeError:
        raise RegistryError(f"{where} is not JSON; it was not written by `models promote`") from None
    if not isinstance(record, dict) or "signature" not in record:
        raise RegistryError(f"{where} is unsigned; it was not written by `models promote` and is not trusted")
    champion, previous = record.get("champion"), record.get("previous")
    well_formed = isinstance(champion, str) and isinstance(previous, list) and all(isinstance(v, str) for v in previous)
    if not well_formed or not verify(key, record["signature"], *_record(name, alias, champion, previous)):
        raise RegistryError(
            f"{where} does not match its signature: it was altered outside `models promote`/`rollback` "
            "(or signed with another key), so it is not trusted"
        )
    if champion != current:
        raise RegistryError(
            f"{where} was written when {alias} was v{champion}, but {alias} is v{current}: "
            "the alias was moved outside `models promote`/`rollback`"
        )
    return previous


def write_history(client: MlflowClient, name: str, alias: str, champion: str, previous: list[str], key: bytes) -> None:
    """Record that ``alias`` now points at ``champion`` after ``previous`` (signed)."""
    record = {"champion": str(champion), "previous": [str(v) for v in previous]}
    record["signature"] = sign(key, *_record(name, alias, record["champion"], record["previous"]))
    client.set_registered_model_tag(name, f"{HISTORY_TAG}.{alias}", json.dumps(record))


def move_alias(client: MlflowClient, name: str, alias: str, version: str) -> None:
    """Point the alias at ``version``; a refusal by the registry is a RegistryError that says why."""
    try:
        client.set_registered_model_alias(name, alias, version)
    except MlflowException as exc:
        if exc.error_code in ("PERMISSION_DENIED", "UNAUTHENTICATED") or "403" in str(exc) or "401" in str(exc):
            raise RegistryError(
                f"the registry refused to move {name}@{alias}: only its admin account may (the command line uses "
                "a local cluster's admin credentials; for another tracking server set MLFLOW_TRACKING_USERNAME/"
                "MLFLOW_TRACKING_PASSWORD to the account allowed to move aliases)"
            ) from None
        raise


def rollback(client: MlflowClient, name: str, *, alias: str = "champion", key: bytes) -> tuple[str | None, str]:
    """Point the alias back at the previous champion of its verified history; returns (from, to)."""
    try:
        client.get_registered_model(name)
    except MlflowException:
        raise RegistryError(f"no registered model named {name!r}") from None
    history = read_history(client, name, alias, key)
    current = alias_version(client, name, alias)
    if not history:
        raise RegistryError(f"{name}@{alias} has no previous version to roll back to")
    previous = history.pop()
    move_alias(client, name, alias, previous)  # first: a refused move leaves the history as it was
    write_history(client, name, alias, previous, history, key)
    if current:
        client.set_model_version_tag(name, current, f"promotion.{alias}.rolled_back", time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    return current, previous
