"""Silent failures found by trying workflows a newcomer would try (attack on 0.2).

Each test asserts what the README promises (or an mp.MaskparamError that says why not) and is a
strict xfail until the library (or the README) is fixed.

Tried and found to work (no test added): apply then ``.to(float64/float16/bfloat16)`` then
train and ``mp.verify`` for every spec and two stacks; AdamW(fused=True) and AdamW training, then
``state_dict`` into a fresh model by torch and by mp, deepcopy, bake, plain reload into a
constrained model, for Mask, Freeze, Triangular, Subspace, both LearnableMasks, compact
layouts and three Freeze + Mask + Triangular stacks; ``torch.compile(backend="aot_eager")`` over
a stack + LearnableMask + Subspace model, then harden and bake under the compiled wrapper.
"""

from __future__ import annotations

import torch
from helpers import mlp

import maskparam as mp


def test_freeze_slices_applied_under_the_meta_device_context_materialises() -> None:
    torch.manual_seed(0)
    rules = {"0.weight": mp.Freeze(dim=0, index=[0, 3])}
    trained = mp.apply_mask(mlp(16, 16, 3), rules)
    with torch.device("meta"):
        model = mp.apply_mask(mlp(16, 16, 3), rules)
    model.to_empty(device="cpu")
    model.load_state_dict(trained.state_dict())
    x = torch.randn(4, 16)
    assert torch.equal(model(x), trained(x))
    assert mp.verify(model) == []
