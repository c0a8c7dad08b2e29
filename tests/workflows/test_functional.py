"""torch.func: functional_call, grad and vmap (per-sample gradients) through constrained models."""

from __future__ import annotations

import pytest
import torch
from torch import nn


def _pinned(model: nn.Module) -> dict[str, torch.Tensor]:
    """For each trainable original stored in its tensor's shape: the entries its constraint pins."""
    pinned = {}
    for module_name, module in model.named_modules():
        for local, stack in getattr(module, "parametrizations", {}).items():
            constraint, original = stack[0], stack.original
            if original.requires_grad and not constraint.reshapes_original:
                pins = constraint.pins(original)
                if pins is not None:
                    name = f"{module_name}.parametrizations.{local}.original"
                    pinned[name] = pins.entries.expand(original.shape)
    return pinned


@pytest.mark.parametrize(
    "kind", ["mask", "mask-compact", "freeze", "triangular", "subspace-fastfood"]
)
def test_functional_call_grad_and_vmap_per_sample_gradients(constrained):
    model = constrained
    params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    buffers = dict(model.named_buffers())
    x, y = torch.randn(5, 6), torch.randn(5, 3)

    def loss(params, xi, yi):
        out = torch.func.functional_call(model, (params, buffers), (xi.unsqueeze(0),))
        return (out - yi).square().sum()

    per_sample = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0, 0))(params, x, y)
    for i in range(5):
        one = torch.func.grad(loss)(params, x[i], y[i])
        for name in params:
            torch.testing.assert_close(per_sample[name][i], one[name])
    # Pinned entries (masked, frozen, off the triangle) get exactly zero gradient, per sample
    # too. (A compact original holds only free entries; a subspace's θ₀ does not train.)
    for name, entries in _pinned(model).items():
        grads = per_sample[name]
        assert torch.equal(grads[:, entries], torch.zeros_like(grads[:, entries])), name
