"""Registered model versions: finding them, listing them with their scores."""

from __future__ import annotations

from typing import Any

from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from anchorless.errors import AnchorlessError
from anchorless.platform.tracking.store import TAG_FORMATS


class RegistryError(AnchorlessError):
    """A registry request that cannot be carried out (unknown model, version, alias)."""


def format_metric(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def get_version(client: MlflowClient, name: str, version: str):
    try:
        return client.get_model_version(name, str(version))
    except MlflowException:
        raise RegistryError(f"model {name!r} has no version {version}") from None


def alias_version(client: MlflowClient, name: str, alias: str) -> str | None:
    try:
        return str(client.get_model_version_by_alias(name, alias).version)
    except MlflowException:
        return None


def list_models(client: MlflowClient, name: str | None = None) -> list[dict[str, Any]]:
    """One row per model version: aliases, key metrics (tags), source run."""
    if name is not None:
        try:
            models = [client.get_registered_model(name)]
        except MlflowException:
            raise RegistryError(f"no registered model named {name!r}") from None
    else:
        models = list(client.search_registered_models(max_results=1000))
    rows = []
    for model in models:
        aliases_by_version: dict[str, list[str]] = {}
        for alias, version in (model.aliases or {}).items():
            aliases_by_version.setdefault(str(version), []).append(alias)
        for version in client.search_model_versions(f"name='{model.name}'"):
            tags = version.tags or {}
            rows.append(
                {
                    "name": model.name,
                    "version": str(version.version),
                    "aliases": sorted(aliases_by_version.get(str(version.version), [])),
                    "AP": _float_or_none(tags.get("AP")),
                    "AP50": _float_or_none(tags.get("AP50")),
                    "duplicate_rate": _float_or_none(tags.get("duplicate_rate")),
                    "formats": tags.get(TAG_FORMATS, "pyfunc"),
                    "run_id": version.run_id,
                    "created": version.creation_timestamp,
                }
            )
    rows.sort(key=lambda row: (row["name"], int(row["version"])))
    return rows


def format_model_rows(rows: list[dict[str, Any]]) -> str:
    header = ("name", "version", "aliases", "AP", "AP50", "dup_rate", "formats", "run")
    body = [
        (r["name"], r["version"], ",".join(r["aliases"]) or "-", format_metric(r["AP"]), format_metric(r["AP50"]), format_metric(r["duplicate_rate"]), r["formats"], (r["run_id"] or "-")[:12])
        for r in rows
    ]
    if not body:
        return "no registered models"
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *body)]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(row, widths)) for row in (header, *body)]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _float_or_none(value: str | None) -> float | None:
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None
