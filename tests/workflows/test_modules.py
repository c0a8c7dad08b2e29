"""Standard torch modules and module patterns: conv, norm, embedding (sparse gradients refused)
and attention layers (the eval fast path included), weights tied between two modules, and deep
copies."""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
from helpers import assert_state_unchanged, state_of
from torch import nn

import maskparam as mp


def test_deepcopy_is_independent_and_identical(constrained):
    model = constrained
    clone = copy.deepcopy(model)
    x = torch.randn(4, 6)
    assert torch.equal(clone(x), model(x))
    with torch.no_grad():
        for p in clone.parameters():
            p.add_(1.0)
    assert not torch.equal(clone(x), model(x))


@pytest.mark.parametrize("kind", ["mask"])
def test_baking_or_constraining_a_deepcopy_leaves_the_original_intact(constrained):
    # torch gives a deep copy the same injected class; changing the copy must not change it.
    model = constrained
    x = torch.randn(3, 6)
    expected = model(x)
    baked = mp.remove_parametrizations(copy.deepcopy(model))
    assert torch.equal(model(x), expected)  # the original still computes the masked weight
    assert torch.equal(baked(x), expected)
    again = copy.deepcopy(model)
    mp.apply_mask(again, {"0.bias": mp.Freeze(dim=0, index=[0])})
    assert torch.equal(model(x), expected)
    assert not hasattr(type(model[0]), "bias")  # no property leaked into the original's class


class TiedLM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(12, 5)
        self.head = nn.Linear(5, 12, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.embed(tokens)))


def test_tied_weights_keep_their_tie(train):
    model = TiedLM()
    new_rows = [10, 11]
    frozen = [i for i in range(12) if i not in new_rows]
    before = model.embed.weight.detach().clone()
    # Train only the rows of two newly added tokens, on an embedding tied to the output layer.
    mp.apply_mask(model, {"embed.weight": mp.Freeze(dim=0, index=frozen)})
    assert model.head.parametrizations.weight[0] is model.embed.parametrizations.weight[0]
    tokens = torch.randint(0, 12, (4, 7))
    train(model, tokens, optimizer=lambda p: torch.optim.AdamW(p, lr=0.1, weight_decay=0.1))
    assert torch.equal(model.embed.weight, model.head.weight)  # both sides: one tensor
    assert torch.equal(model.embed.weight[frozen], before[frozen])
    assert not torch.equal(model.embed.weight[new_rows], before[new_rows])
    assert mp.verify(model) == []
    effective = model.embed.weight.detach().clone()
    mp.remove_parametrizations(model)
    assert model.head.weight is model.embed.weight  # the tie is back, baked once
    assert torch.equal(model.embed.weight, effective)


def test_multihead_attention_including_the_eval_fast_path(train):
    layer = nn.TransformerEncoderLayer(16, 4, dim_feedforward=32, batch_first=True, dropout=0.0)
    mp.apply_mask(layer, {
        "self_attn.in_proj_weight": mp.Mask(mp.masks.random(0.5)),
        "self_attn.out_proj.weight": mp.Triangular(),
        "linear1.weight": mp.Freeze(dim=0, index=[0, 1]),
    })  # fmt: skip
    x = torch.randn(2, 5, 16)
    train(layer, x, steps=2)
    assert bool((layer.self_attn.out_proj.weight.triu(1) == 0).all())
    assert mp.verify(layer) == []
    baked = mp.remove_parametrizations(copy.deepcopy(layer)).eval()
    layer.eval()
    with torch.no_grad():  # eval + no_grad: nn.MultiheadAttention's native fast path
        assert torch.equal(layer(x), baked(x))


@pytest.mark.parametrize(
    ("module", "shape"),
    [
        (lambda: nn.Conv1d(3, 4, 3), (2, 3, 9)),
        (lambda: nn.Conv2d(3, 4, 3), (2, 3, 9, 9)),
        (lambda: nn.Conv3d(3, 4, 3), (2, 3, 5, 5, 5)),
        (lambda: nn.ConvTranspose2d(3, 4, 3), (2, 3, 5, 5)),
        (lambda: nn.LayerNorm(7), (2, 7)),
        (lambda: nn.BatchNorm2d(3), (4, 3, 5, 5)),
    ],
    ids=["Conv1d", "Conv2d", "Conv3d", "ConvTranspose2d", "LayerNorm", "BatchNorm2d"],
)
def test_common_layers(module, shape, train):
    layer = module()
    with torch.no_grad():
        layer.weight.normal_()
    mp.apply_mask(
        layer, {"weight": mp.Mask(mp.masks.random(0.5)), "bias": mp.Freeze(mp.masks.random(0.5))}
    )
    kept = mp.kept_entries(layer, "weight")
    x = torch.randn(shape)
    train(layer, x, steps=2, optimizer=lambda p: torch.optim.AdamW(p, lr=0.1, weight_decay=0.1))
    assert torch.equal(layer.weight[~kept], torch.zeros(int((~kept).sum())))
    assert mp.verify(layer) == []
    with torch.no_grad():
        expected = layer(x)
    mp.remove_parametrizations(layer)
    with torch.no_grad():
        assert torch.equal(layer(x), expected)


def test_embedding(train):
    embedding = nn.Embedding(10, 4)
    mp.apply_mask(embedding, {"weight": mp.Freeze(dim=0, index=[0])})  # e.g. a padding row
    row = embedding.weight[0].detach().clone()
    train(
        embedding,
        torch.tensor([0, 1, 2]),
        steps=2,
        optimizer=lambda p: torch.optim.SGD(p, lr=1.0, momentum=0.9, weight_decay=0.1),
    )
    assert torch.equal(embedding.weight[0], row)


SPARSE_GRAD_SPECS: dict[str, Callable[[], mp.Spec]] = {
    "freeze_dim": lambda: mp.Freeze(dim=0, index=[1]),
    "mask_compact": lambda: mp.Mask(mp.masks.random(0.5), layout="compact"),
    "subspace": lambda: mp.Subspace(3),
    "triangular": mp.Triangular,
}


# from the no-silent-failure attack on 0.1 (crashes: nn.Embedding(sparse=True))
@pytest.mark.parametrize("kind", list(SPARSE_GRAD_SPECS))
def test_sparse_gradient_embedding_is_refused_at_apply(kind):
    embedding = nn.Embedding(6, 4, sparse=True)
    before = state_of(embedding)
    with pytest.raises(mp.MaskparamError, match="'weight'"):
        mp.apply_mask(embedding, {"weight": SPARSE_GRAD_SPECS[kind]()})
    assert_state_unchanged(embedding, before)
