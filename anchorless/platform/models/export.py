"""A trained model as one portable file.

The export is a single ``.pt`` file holding only plain data, so it loads with
``torch.load(path, weights_only=True)``::

    {"format": "anchorless-model", "format_version": 1,
     "state_dict": {...},            # the detector's plain state_dict (CPU tensors)
     "config": {...},                # the resolved experiment config
     "categories": [{"label", "coco_id", "name"}, ...],
     "manifest_sha256": "...",       # the training data's manifest checksum
     "anchorless_version": "..."}

:func:`export_checkpoint` writes it, :func:`read_export` reads it back and
:func:`model_from_export` rebuilds the detector it describes. Finding one by path or
MLflow URI is :mod:`.loading`; the MLflow model it is logged as is :mod:`.pyfunc`.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

import torch

from anchorless.errors import ModelError
from anchorless.files import atomic_path
from anchorless.platform.data.shards import manifest_checksum

if TYPE_CHECKING:
    from anchorless.platform.config import ExperimentConfig

FORMAT = "anchorless-model"
FORMAT_VERSION = 1
EXPORT_FILE = "model.pt"


# --- the export file ------------------------------------------------------------------------------


def category_table(manifest: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The manifest's categories as plain ``{"label", "coco_id", "name"}`` dicts, by label."""
    try:
        table = [
            {"label": int(c["label"]), "coco_id": int(c["coco_id"]), "name": str(c["name"])}
            for c in manifest["categories"]
        ]
    except (KeyError, TypeError, ValueError) as exc:
        raise ModelError(f"data manifest: no usable category table ({exc!r})") from None
    table.sort(key=lambda c: c["label"])
    if [c["label"] for c in table] != list(range(len(table))):
        raise ModelError(f"data manifest: labels are not contiguous 0..{len(table) - 1}: {[c['label'] for c in table]}")
    return table


def plain_state_dict(state_dict_or_model: Any) -> dict[str, torch.Tensor]:
    """A CPU ``state_dict`` of a model, a DeepSpeed engine / DDP wrapper, or a state dict."""
    if isinstance(state_dict_or_model, Mapping):
        state = dict(state_dict_or_model)
    else:
        module = getattr(state_dict_or_model, "module", state_dict_or_model)  # DeepSpeed engine, DDP
        state = module.state_dict()
    if state and all(key.startswith("module.") for key in state):
        state = {key[len("module."):]: value for key, value in state.items()}
    # clone(): a view would drag its whole storage into the file.
    return {key: value.detach().cpu().clone() for key, value in state.items()}


def export_checkpoint(
    state_dict_or_model: Any,
    cfg: "ExperimentConfig | Mapping[str, Any]",
    manifest: Mapping[str, Any],
    out_path: str | os.PathLike[str],
) -> Path:
    """Write the single-file export (see the module docstring) atomically; returns its path.

    ``out_path`` may be a directory, which then gets ``model.pt``. The detector's
    class count must match the manifest's category table.
    """
    config = cfg.to_dict() if hasattr(cfg, "to_dict") else copy.deepcopy(dict(cfg))
    categories = category_table(manifest)
    num_classes = config.get("detector", {}).get("num_classes")
    if num_classes != len(categories):
        raise ModelError(
            f"detector.num_classes is {num_classes} but the data manifest has {len(categories)} categories "
            f"({', '.join(c['name'] for c in categories)})"
        )
    from anchorless import __version__

    payload = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "state_dict": plain_state_dict(state_dict_or_model),
        "config": config,
        "categories": categories,
        "manifest_sha256": manifest_checksum(manifest),
        "anchorless_version": __version__,
    }
    path = Path(out_path)
    if path.is_dir():
        path = path / EXPORT_FILE
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)
    return path


def read_export(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The export's payload, loaded with ``weights_only=True``; a clear error for anything else."""
    import pickle

    path = Path(path)
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ModelError(f"{path}: no such model file") from None
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError) as exc:
        reason = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        raise ModelError(f"{path}: not a loadable model export ({reason})") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ModelError(f"{path}: not an {FORMAT} export (a raw checkpoint? export it with export_checkpoint)")
    if payload.get("format_version") != FORMAT_VERSION:
        raise ModelError(
            f"{path}: export format_version {payload.get('format_version')!r}; this version reads {FORMAT_VERSION}"
        )
    return payload


def model_from_export(
    payload: Mapping[str, Any], *, device: torch.device | str = "cpu", fold_batchnorm: bool = True
) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Build the detector the export describes and load its weights; (model in eval mode, meta).

    With ``fold_batchnorm`` (the default: the model is for inference) its BatchNorms are
    folded into the convolutions before them: the same detections up to float rounding,
    and a faster forward. Such a model must not train; pass False to fine-tune it.
    """
    from anchorless.detectors import build_detector
    from anchorless.detectors.layers import fold_batchnorm as fold

    detector_cfg = copy.deepcopy(payload["config"]["detector"])
    backbone = detector_cfg.setdefault("backbone", {})
    if backbone.get("pretrained") is not None:  # the export holds every weight; not every backbone takes the key
        backbone["pretrained"] = None
    model = build_detector(detector_cfg)
    missing, unexpected = model.load_state_dict(payload["state_dict"], strict=False)
    if missing or unexpected:
        raise ModelError(
            f"export does not fit detector {detector_cfg.get('name')!r}: "
            f"missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}"
        )
    model.to(device).eval()
    return (fold(model) if fold_batchnorm else model), export_meta(payload)


def export_meta(payload: Mapping[str, Any]) -> dict[str, Any]:
    """Everything about an export but its weights."""
    return {
        "config": payload["config"],
        "categories": [dict(c) for c in payload["categories"]],
        "manifest_sha256": payload.get("manifest_sha256"),
        "anchorless_version": payload.get("anchorless_version"),
        "image_size": int(payload["config"]["data"]["image_size"]),
    }
