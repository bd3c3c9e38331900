"""What every detector shares: the loss normaliser, building from the components table."""

import os
import tempfile

import pytest
import torch.distributed as dist
import torch.multiprocessing as mp

from anchorless.detectors import DETECTORS, build_detector
from anchorless.detectors.base import SECTIONS, reduce_normalizer

from .conftest import small_config
from .lite_configs import TINY_LITE, lite_config


def test_normaliser_is_clamped_to_one_on_a_single_process():
    assert reduce_normalizer(0).item() == 1.0
    assert reduce_normalizer(7).item() == 7.0
    assert reduce_normalizer(0.25, min_value=1e-6).item() == 0.25


def _average_on_two_ranks(rank: int, init_file: str, results) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        results[rank] = reduce_normalizer([3.0, 0.0][rank]).item()
    finally:
        dist.destroy_process_group()


def test_normaliser_is_averaged_across_ranks_then_clamped():
    # Rank 0 has 3 positives, rank 1 none: both divide by (3 + 0) / 2 = 1.5.
    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "init")
        results = mp.get_context("fork").Manager().dict()
        # Fresh interpreters: a forked rank would inherit the default process group of an
        # earlier test in this process (the platform tests open one) and could not open its own.
        mp.start_processes(_average_on_two_ranks, args=(init_file, results), nprocs=2, start_method="spawn")
        assert dict(results) == {0: 1.5, 1: 1.5}


@pytest.mark.parametrize("name", sorted(DETECTORS))
def test_every_section_is_built_from_the_detectors_components_table(name):
    model = build_detector(lite_config(name) if name in TINY_LITE else small_config(name))
    for section in SECTIONS:
        assert type(getattr(model, section)) is DETECTORS[name].components[section], section
