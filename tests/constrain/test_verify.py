"""``verify``: a constraint's state changed in place is reported, never raised."""

from __future__ import annotations

import torch
from torch import nn

import maskparam as mp


def _compact() -> nn.Linear:
    layer = nn.Linear(4, 4)
    with torch.no_grad():
        layer.weight.copy_(torch.arange(16.0).reshape(4, 4))
    return mp.apply_mask(layer, {"weight": mp.Mask(mp.masks.magnitude(0.75), layout="compact")})


def test_verify_reports_a_compact_mask_changed_in_place():
    layer = _compact()
    assert mp.verify(layer) == []
    with torch.no_grad():
        layer.parametrizations.weight[0].free.fill_(1)  # 16 selected, 4 stored
    expected = (
        "'weight': Mask(keeps the 25% largest |w|, compact): the checkpoint stores 4 free "
        "entries, its mask selects 16"
    )
    assert mp.verify(layer) == [expected]


def test_verify_reports_a_stored_original_that_no_longer_fits():
    layer = _compact()
    layer.parametrizations.weight.original.data = torch.zeros(3)
    expected = (
        "'weight': Mask(keeps the 25% largest |w|, compact): the checkpoint stores 3 free "
        "entries, its mask selects 4"
    )
    assert mp.verify(layer) == [expected]


def test_verify_reports_a_stack_that_cannot_compute_the_tensor():
    class Broken(nn.Module):
        broken = False

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if self.broken:
                raise RuntimeError("broken on purpose")
            return x

    layer = mp.apply_mask(nn.Linear(4, 4), {"weight": mp.Mask(mp.masks.magnitude(0.5))})
    broken = Broken()
    torch.nn.utils.parametrize.register_parametrization(layer, "weight", broken)
    broken.broken = True
    assert mp.verify(layer) == [
        "'weight': the constraints cannot compute the tensor (RuntimeError: broken on purpose)"
    ]
