"""maskparam inside the PyTorch workflows users already have (issue: any existing model)."""

from __future__ import annotations

import copy
import io
import re

import pytest
import torch
from torch import nn

import maskparam as mp

ALL_SPECS = {
    "mask": lambda: mp.Mask(mp.masks.random(0.5)),
    "mask-compact": lambda: mp.Mask(mp.masks.random(0.5), layout="compact"),
    "freeze": lambda: mp.Freeze(mp.masks.random(0.5)),
    "freeze-slices": lambda: mp.Freeze(dim=0, index=[0, 2]),
    "triangular": mp.Triangular,
    "learnable": mp.LearnableMask,
    "subspace-fastfood": lambda: mp.Subspace(6, projection="fastfood", group="all"),
    "subspace-gaussian": lambda: mp.Subspace(6, group="all"),
}


def _mlp() -> nn.Sequential:
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))


def _constrained(kind: str) -> nn.Sequential:
    torch.manual_seed(0)
    return mp.apply_mask(_mlp(), {"*.weight": ALL_SPECS[kind]()})


@pytest.mark.parametrize("kind", list(ALL_SPECS))
def test_deepcopy_is_independent_and_identical(kind):
    model = _constrained(kind)
    clone = copy.deepcopy(model)
    x = torch.randn(4, 6)
    assert torch.equal(clone(x), model(x))
    with torch.no_grad():
        for p in clone.parameters():
            p.add_(1.0)
    assert not torch.equal(clone(x), model(x))


@pytest.mark.parametrize(
    "kind",
    [
        "mask",
        "mask-compact",
        "freeze",
        "freeze-slices",
        "triangular",
        "learnable",
        "subspace-fastfood",
    ],
)
def test_torch_compile_has_no_graph_breaks_and_keeps_constraints(kind):
    model = _constrained(kind)
    x = torch.randn(4, 6)
    explanation = torch._dynamo.explain(model)(x)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    eager = model(x)
    compiled = torch.compile(model, backend="aot_eager")
    torch.testing.assert_close(compiled(x), eager)
    before = model[0].weight.detach().clone()
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1, weight_decay=0.1)
    for _ in range(3):
        optimizer.zero_grad()
        compiled(x).square().sum().backward()
        optimizer.step()
    after = model[0].weight.detach()
    if kind in ("mask", "mask-compact"):
        kept = before != 0
        assert torch.equal(after[~kept], torch.zeros(int((~kept).sum())))
    if kind == "triangular":
        assert torch.equal(after.triu(1), torch.zeros(8, 6).triu(1))
    if kind == "freeze-slices":
        assert torch.equal(after[[0, 2]], before[[0, 2]])
    assert not torch.equal(after, before)


@pytest.mark.filterwarnings("ignore:`torch.jit.script:DeprecationWarning")  # inside inductor
def test_torch_compile_with_inductor():
    model = _constrained("freeze")
    x = torch.randn(4, 6)
    frozen_before = model[0].weight.detach().clone()
    keep = model[0].parametrizations.weight[0].keep.bool()
    compiled = torch.compile(model)
    torch.testing.assert_close(compiled(x), model(x))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=0.1)
    for _ in range(2):
        optimizer.zero_grad()
        compiled(x).square().sum().backward()
        optimizer.step()
    assert torch.equal(model[0].weight.detach()[~keep], frozen_before[~keep])


@pytest.mark.parametrize(
    "kind", ["mask", "mask-compact", "freeze", "triangular", "subspace-fastfood"]
)
def test_functional_call_grad_and_vmap_per_sample_gradients(kind):
    model = _constrained(kind)
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
    # Constrained entries get exactly zero gradient through functional_call too.
    if kind == "mask":
        kept = model[0].parametrizations.weight[0].mask.bool()
        grads = per_sample["0.parametrizations.weight.original"]
        assert torch.equal(grads[:, ~kept], torch.zeros(5, int((~kept).sum())))


@pytest.mark.parametrize(
    "kind",
    [
        "mask",
        "freeze",
        "freeze-slices",
        "learnable",
        "subspace-fastfood",
        "subspace-gaussian",
        "mask-compact",
    ],
)
def test_meta_device_construction_then_load(kind):
    trained = _constrained(kind)
    with torch.no_grad():
        for p in trained.parameters():
            p.add_(0.01)
    with torch.device("meta"):
        model = _mlp()
    if kind == "mask-compact":
        with pytest.raises(mp.MaskparamError, match="real tensors"):
            mp.apply_mask(model, {"*.weight": ALL_SPECS[kind]()})
        return
    mp.apply_mask(model, {"*.weight": ALL_SPECS[kind]()})
    model.to_empty(device="cpu")
    model.load_state_dict(trained.state_dict())
    x = torch.randn(4, 6)
    assert torch.equal(model(x), trained(x))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind", ["mask", "freeze", "triangular", "subspace-fastfood"])
def test_half_precision_models(dtype, kind):
    torch.manual_seed(0)
    model = _mlp().to(dtype)
    x = torch.randn(4, 6, dtype=dtype)
    before_out = model(x)
    before = model[0].weight.detach().clone()
    mp.apply_mask(model, {"*.weight": ALL_SPECS[kind]()})
    assert model[0].weight.dtype == dtype
    if kind in ("freeze", "subspace-fastfood"):
        assert torch.equal(model(x), before_out)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for _ in range(2):
        optimizer.zero_grad()
        model(x).float().square().sum().backward()
        optimizer.step()
    after = model[0].weight.detach()
    if kind == "freeze":
        keep = model[0].parametrizations.weight[0].keep.bool()
        assert torch.equal(after[~keep], before[~keep])
    if kind == "triangular":
        assert bool((after.triu(1) == 0).all())


@pytest.mark.parametrize("kind", list(ALL_SPECS))
def test_apply_under_autocast_and_train_under_autocast(kind):
    torch.manual_seed(0)
    model = _mlp()
    x = torch.randn(4, 6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mp.apply_mask(model, {"*.weight": ALL_SPECS[kind]()})
        out = model(x)
    assert model[0].weight.dtype == torch.float32  # the constraint did not change the dtype
    out.float().sum().backward()


def test_plain_checkpoint_into_constrained_model():
    pretrained = _mlp()
    plain_state = pretrained.state_dict()
    model = mp.apply_mask(_mlp(), {
        "0.weight": mp.Freeze(dim=0, index=[1, 2]),
        "2.weight": mp.Mask(mp.masks.random(0.5, seed=3)),
        "0.bias": mp.Freeze(torch.tensor([True] + [False] * 7)),
    })  # fmt: skip
    mp.load_state_dict(model, plain_state)
    # As if the rules had been applied to the pretrained model: frozen values are the new ones.
    assert torch.equal(model[0].weight, plain_state["0.weight"])
    assert torch.equal(model[0].bias, plain_state["0.bias"])
    kept = model[2].parametrizations.weight[0].mask.bool()
    assert torch.equal(model[2].weight, plain_state["2.weight"] * kept)
    assert torch.equal(model[2].bias, plain_state["2.bias"])
    # and training keeps them frozen from there
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1, weight_decay=0.1)
    optimizer.zero_grad()
    model(torch.randn(3, 6)).sum().backward()
    optimizer.step()
    assert torch.equal(model[0].weight[[1, 2]], plain_state["0.weight"][[1, 2]])


def test_constrained_checkpoint_into_plain_model_names_the_fix():
    constrained = mp.apply_mask(_mlp(), {"0.weight": mp.Triangular()})
    with pytest.raises(
        mp.MaskparamError,
        match=r"(?s)holds constraints.*'0.parametrizations.weight.original'.*apply the same rules.*remove_parametrizations",
    ):
        mp.load_state_dict(_mlp(), constrained.state_dict())


def test_load_state_dict_strict_reports_missing_keys():
    model = mp.apply_mask(_mlp(), {"0.weight": mp.Triangular()})
    state = _mlp().state_dict()
    del state["2.bias"]
    with pytest.raises(mp.MaskparamError, match=re.escape("missing keys: ['2.bias']")):
        mp.load_state_dict(model, state)
    assert mp.load_state_dict(model, state, strict=False).missing_keys == ["2.bias"]


def test_torch_save_of_the_module_names_the_fix():
    model = _constrained("mask")
    with pytest.raises(
        mp.MaskparamError,
        match=r"(?s)torch.save.*model.state_dict\(\).*remove_parametrizations\(copy.deepcopy",
    ):
        torch.save(model, io.BytesIO())
    baked = mp.remove_parametrizations(copy.deepcopy(model))
    buffer = io.BytesIO()
    torch.save(baked, buffer)  # the fix works
    buffer.seek(0)
    x = torch.randn(2, 6)
    assert torch.equal(torch.load(buffer, weights_only=False)(x), model(x))


class TiedLM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(12, 5)
        self.head = nn.Linear(5, 12, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.embed(tokens)))


def test_tied_weights_keep_their_tie():
    model = TiedLM()
    new_rows = [10, 11]
    frozen = [i for i in range(12) if i not in new_rows]
    before = model.embed.weight.detach().clone()
    # Train only the rows of two newly added tokens, on an embedding tied to the output layer.
    mp.apply_mask(model, {"embed.weight": mp.Freeze(dim=0, index=frozen)})
    assert model.head.parametrizations.weight[0] is model.embed.parametrizations.weight[0]
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1, weight_decay=0.1)
    tokens = torch.randint(0, 12, (4, 7))
    for _ in range(3):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(tokens).reshape(-1, 12), tokens.reshape(-1)).backward()
        optimizer.step()
    assert torch.equal(model.embed.weight, model.head.weight)  # both sides: one tensor
    assert torch.equal(model.embed.weight[frozen], before[frozen])
    assert not torch.equal(model.embed.weight[new_rows], before[new_rows])
    effective = model.embed.weight.detach().clone()
    mp.remove_parametrizations(model)
    assert model.head.weight is model.embed.weight  # the tie is back, baked once
    assert torch.equal(model.embed.weight, effective)


def test_a_rule_naming_the_tied_side_constrains_both():
    model = TiedLM()
    mp.apply_mask(model, {"head.weight": mp.Mask(mp.masks.rows([0, 1]))})
    assert torch.equal(model.embed.weight[2:], torch.zeros(10, 5))


def test_multihead_attention_including_the_eval_fast_path():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 4, dim_feedforward=32, batch_first=True, dropout=0.0)
    mp.apply_mask(layer, {
        "self_attn.in_proj_weight": mp.Mask(mp.masks.random(0.5)),
        "self_attn.out_proj.weight": mp.Triangular(),
        "linear1.weight": mp.Freeze(dim=0, index=[0, 1]),
    })  # fmt: skip
    x = torch.randn(2, 5, 16)
    optimizer = torch.optim.AdamW(layer.parameters(), lr=0.05, weight_decay=0.1)
    for _ in range(2):
        optimizer.zero_grad()
        layer(x).square().mean().backward()
        optimizer.step()
    assert bool((layer.self_attn.out_proj.weight.triu(1) == 0).all())
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
)
def test_common_layers(module, shape):
    torch.manual_seed(0)
    layer = module()
    with torch.no_grad():
        layer.weight.normal_()
    mp.apply_mask(
        layer, {"weight": mp.Mask(mp.masks.random(0.5)), "bias": mp.Freeze(mp.masks.random(0.5))}
    )
    kept = layer.parametrizations.weight[0].mask.bool()
    optimizer = torch.optim.AdamW(layer.parameters(), lr=0.1, weight_decay=0.1)
    x = torch.randn(shape)
    for _ in range(2):
        optimizer.zero_grad()
        layer(x).square().mean().backward()
        optimizer.step()
    assert torch.equal(layer.weight[~kept], torch.zeros(int((~kept).sum())))
    with torch.no_grad():
        expected = layer(x)
    mp.remove_parametrizations(layer)
    with torch.no_grad():
        assert torch.equal(layer(x), expected)


def test_embedding():
    embedding = nn.Embedding(10, 4)
    mp.apply_mask(embedding, {"weight": mp.Freeze(dim=0, index=[0])})  # e.g. a padding row
    row = embedding.weight[0].detach().clone()
    optimizer = torch.optim.SGD(embedding.parameters(), lr=1.0, momentum=0.9, weight_decay=0.1)
    for _ in range(2):
        optimizer.zero_grad()
        embedding(torch.tensor([0, 1, 2])).sum().backward()
        optimizer.step()
    assert torch.equal(embedding.weight[0], row)


def test_baking_or_constraining_a_deepcopy_leaves_the_original_intact():
    # torch gives a deep copy the same injected class; changing the copy must not change it.
    model = _constrained("mask")
    x = torch.randn(3, 6)
    expected = model(x)
    baked = mp.remove_parametrizations(copy.deepcopy(model))
    assert torch.equal(model(x), expected)  # the original still computes the masked weight
    assert torch.equal(baked(x), expected)
    again = copy.deepcopy(model)
    mp.apply_mask(again, {"0.bias": mp.Freeze(dim=0, index=[0])})
    assert torch.equal(model(x), expected)
    assert not hasattr(type(model[0]), "bias")  # no property leaked into the original's class


def test_loading_a_plain_checkpoint_does_not_alias_it():
    pretrained = _mlp()
    state = pretrained.state_dict()
    reference = {k: v.clone() for k, v in state.items()}
    model = mp.apply_mask(_mlp(), {"*.weight": mp.Mask(mp.masks.random(0.5))})
    mp.load_state_dict(model, state)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    optimizer.zero_grad()
    model(torch.randn(2, 6)).sum().backward()
    optimizer.step()
    for key, value in pretrained.state_dict().items():
        assert torch.equal(value, reference[key]), key  # training did not write into it
