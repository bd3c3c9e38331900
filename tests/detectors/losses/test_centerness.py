import math

import pytest
import torch

from anchorless.detectors.losses import CenternessLoss, centerness_target

LN2 = math.log(2)


def test_centerness_target_and_its_bce_by_hand():
    ltrb = torch.tensor([[1.0, 2.0, 3.0, 4.0], [5.0, 5.0, 5.0, 5.0]])
    target = centerness_target(ltrb)
    assert target.tolist() == pytest.approx([math.sqrt(1 / 3 * 2 / 4), 1.0], rel=1e-6)
    loss = CenternessLoss(weight=1.0)(torch.zeros(2), target, normalizer=2.0)
    assert loss.item() == pytest.approx(LN2, rel=1e-6)  # BCE at logit 0 is ln 2 for any target
