"""CornerNet's pull/push loss against its formula on hand-made embeddings."""

from __future__ import annotations

import pytest
import torch

from anchorless.detectors.losses import EmbeddingLoss, pull_push_loss


def _formula(tl: list[float], br: list[float], margin: float = 1.0) -> tuple[float, float]:
    """pull = 1/N sum_k (e_tk - e_k)^2 + (e_bk - e_k)^2; push = 1/(N(N-1)) sum_{j != k} max(0, margin - |e_k - e_j|)."""
    n = len(tl)
    means = [(t + b) / 2 for t, b in zip(tl, br)]
    pull = sum((t - e) ** 2 + (b - e) ** 2 for t, b, e in zip(tl, br, means)) / n if n else 0.0
    pairs = [max(0.0, margin - abs(means[k] - means[j])) for k in range(n) for j in range(n) if j != k]
    push = sum(pairs) / (n * (n - 1)) if n > 1 else 0.0
    return pull, push


def _batch(images: list[tuple[list[float], list[float]]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    most = max(1, *(len(tl) for tl, _ in images))
    tl = torch.full((len(images), most), 7.0)  # padding: any value, masked out
    br = torch.full((len(images), most), -7.0)
    mask = torch.zeros(len(images), most, dtype=torch.bool)
    for i, (t, b) in enumerate(images):
        tl[i, : len(t)], br[i, : len(b)], mask[i, : len(t)] = torch.tensor(t), torch.tensor(b), True
    return tl, br, mask


THREE = ([0.0, 1.0, 0.2], [0.4, 1.2, 0.6])  # means 0.2, 1.1, 0.4


def test_three_objects_match_the_formula_by_hand():
    pull, push = pull_push_loss(*_batch([THREE]))
    # pull: each pair is d/2 off its mean twice: (0.2^2 * 2 + 0.1^2 * 2 + 0.2^2 * 2) / 3 = 0.06
    # push: |0.2-1.1| = 0.9 -> 0.1, |0.2-0.4| = 0.2 -> 0.8, |1.1-0.4| = 0.7 -> 0.3; twice each, / (3*2)
    assert pull.item() == pytest.approx(0.06)
    assert push.item() == pytest.approx(2 * (0.1 + 0.8 + 0.3) / 6)
    assert (pull.item(), push.item()) == pytest.approx(_formula(*THREE))


def test_one_object_pulls_and_has_nothing_to_push_and_none_adds_nothing():
    pull, push = pull_push_loss(*_batch([([0.0], [1.0])]))
    assert pull.item() == pytest.approx(0.5) and push.item() == 0.0
    pull, push = pull_push_loss(*_batch([([], [])]))
    assert pull.item() == 0.0 and push.item() == 0.0


def test_two_images_with_different_counts_sum_their_own_normalised_terms():
    images = [THREE, ([0.0, 3.0], [0.2, 2.8]), ([], [])]
    pull, push = pull_push_loss(*_batch(images))
    want = [_formula(*image) for image in images]
    assert pull.item() == pytest.approx(sum(p for p, _ in want))
    assert push.item() == pytest.approx(sum(p for _, p in want))


def test_module_weights_the_terms_and_gradients_pull_pairs_together():
    tl, br, mask = _batch([THREE])
    tl.requires_grad_(True)
    pull, push = EmbeddingLoss(pull=0.1, push=0.5)(tl, br, mask)
    raw_pull, raw_push = _formula(*THREE)
    assert (pull.item(), push.item()) == pytest.approx((0.1 * raw_pull, 0.5 * raw_push))
    pull.backward()
    assert tl.grad[0, 0] < 0  # e_t0 = 0.0 below its partner 0.4: pulled up
