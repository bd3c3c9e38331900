"""Tiny CornerNet-Lite configs for the detector tests: the papers' structure (two Squeeze
stacks, three Hourglass-54 modules), a few channels wide. Their trunks are hourglass-only, so
``conftest.small_config``'s ResNet-18 does not apply to them."""

from __future__ import annotations

TINY_LITE = {
    "cornernet_squeeze": {
        "backbone": {"channels": [8, 8, 12, 12, 16], "out_channels": 8, "stem_channels": 8},
        "head": {"channels": 8, "pool_channels": 8},
    },
    "cornernet_saccade": {
        "backbone": {"channels": [8, 8, 12, 16], "out_channels": 8, "stem_channels": 8},
        "head": {"channels": 8, "pool_channels": 8, "attention_channels": 8},
    },
}


def lite_config(name: str, **sections) -> dict:
    """A tiny 3-class config of a CornerNet-Lite detector, plus overrides per section."""
    cfg = {"name": name, "num_classes": 3, **{section: dict(values) for section, values in TINY_LITE[name].items()}}
    for section, values in sections.items():
        cfg.setdefault(section, {}).update(values)
    return cfg
