"""CornerNet's associative-embedding loss: pull each object's two corner embeddings
together, push different objects' apart (Newell et al.'s associative embedding, 1-D).

Shapes: B images, M the most objects any of them has (padding masked out).
"""

from __future__ import annotations

import torch
from torch import nn


def pull_push_loss(
    tl: torch.Tensor, br: torch.Tensor, mask: torch.Tensor, margin: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """(pull, push), each summed over the images (as the official code).

    For an image with N objects, e_k = (e_tk + e_bk) / 2:
    pull = 1/N sum_k [(e_tk - e_k)^2 + (e_bk - e_k)^2];
    push = 1/(N(N-1)) sum_k sum_{j != k} max(0, margin - |e_k - e_j|).
    An image with no object adds nothing to either, one with a single object nothing to push.

    Args:
        tl, br: (B, M) the embeddings at each object's top-left and bottom-right corner.
        mask: (B, M) bool, which entries are objects.
    """
    mask = mask.bool()
    count = mask.sum(dim=1).to(tl.dtype)  # (B,)
    mean = (tl + br) / 2  # (B, M)
    pulled = ((tl - mean).square() + (br - mean).square()) * mask  # (B, M)
    pull = (pulled.sum(dim=1) / count.clamp(min=1)).sum()
    pairs = mask[:, :, None] & mask[:, None, :]  # (B, M, M)
    pairs &= ~torch.eye(mask.shape[1], dtype=torch.bool, device=mask.device)  # j != k
    gaps = (margin - (mean[:, :, None] - mean[:, None, :]).abs()).clamp(min=0) * pairs  # (B, M, M)
    push = (gaps.sum(dim=(1, 2)) / (count * (count - 1)).clamp(min=1)).sum()
    return pull, push


class EmbeddingLoss(nn.Module):
    """The weighted pull and push terms of :func:`pull_push_loss`.

    Args:
        pull, push: weights of the two terms (0.1 each, CornerNet).
        margin: the push margin Delta (1).
    """

    def __init__(self, *, pull: float = 0.1, push: float = 0.1, margin: float = 1.0) -> None:
        super().__init__()
        self.pull, self.push, self.margin = pull, push, margin

    def forward(self, tl: torch.Tensor, br: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pull, push = pull_push_loss(tl, br, mask, self.margin)
        return self.pull * pull, self.push * push
