"""mp.masks.fisher (FISH) and mp.masks.wanda: equal to transcriptions of the reference code, the
model left untouched, every refusal made before anything changes (a conv for wanda, frozen
parameters for fisher)."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import pytest
import torch
from helpers import mlp, pruning_inputs, same_snapshot_with_summary, snapshot_with_summary
from torch import Tensor, nn

import maskparam as mp


def _data(
    seed: int, shapes: list[tuple[int, ...]], classes: int = 3
) -> list[tuple[Tensor, Tensor]]:
    """Embedded random data: (inputs, labels) batches from a private generator."""
    generator = torch.Generator().manual_seed(seed)
    return [
        (
            torch.randn(shape, generator=generator),
            torch.randint(classes, shape[:1], generator=generator),
        )
        for shape in shapes
    ]


def _ce(model: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
    x, y = batch
    return nn.functional.cross_entropy(model(x), y)


def _members(model: nn.Module) -> list[tuple[str, Tensor]]:
    return [(name, param.detach()) for name, param in model.named_parameters()]


# --- FISH -------------------------------------------------------------------------------------


def reference_fish(
    model: nn.Module, batches: list[Any], loss: Callable[..., Tensor], keep_ratio: float
) -> dict[str, Tensor]:
    """varunnair18/FISH, transformers/examples/text-classification/run_glue_sparse_update.py:
    calculate_the_importance_label (grad_type="square") and create_mask_gradient, without the
    classifier exception (every parameter is ranked)."""
    gradients_dict = {}
    for name, param in model.named_parameters():
        gradients_dict[name] = torch.zeros_like(param)
    grad_method = torch.square
    for inputs in batches:
        loss(model, inputs).backward()
        for name, param in model.named_parameters():
            gradients_dict[name] += grad_method(param.grad).data
        model.zero_grad()
    sizes = {}
    tensors = []
    all_params_size = 0
    for k, v in gradients_dict.items():
        sizes[k] = v.shape
        tensors.append(v.view(-1))
        all_params_size += torch.prod(torch.tensor(v.shape)).item()
    flat = torch.cat(tensors, 0)
    keep_num = int(all_params_size * keep_ratio)
    top_pos = torch.topk(flat, keep_num)[1]
    masks = torch.zeros_like(flat)
    masks[top_pos] = 1
    mask_dict = {}
    now_idx = 0
    for k, v in sizes.items():
        end_idx = now_idx + torch.prod(torch.tensor(v))
        mask_dict[k] = masks[now_idx:end_idx].reshape(v).bool()
        now_idx = end_idx
    return mask_dict


@pytest.mark.parametrize("density", [0.05, 0.3, 0.7])
def test_fisher_equals_the_reference(density):
    model = mlp(6, 8, 8, 3, activation=nn.ReLU)
    with torch.no_grad():
        model[2].weight[:4] = -10.0  # dead units: whole rows and columns of exact-zero scores
    batches = _data(1, [(1, 6)] * 7)  # batch size 1, as FISH's data loader
    expected = reference_fish(copy.deepcopy(model), batches, _ce, density)
    fish = mp.masks.fisher(model, batches, _ce, density)
    got = dict(zip(expected, fish.build_joint(_members(model)), strict=True))
    for name, mask in expected.items():
        assert torch.equal(got[name], mask), name
    flat = torch.cat([s.reshape(-1) for s in fish.sums.values()])
    assert int(flat.eq(0).sum()) > 10  # ties, at 0.7 inside the selection's cut
    keep = int(flat.numel() * density)
    assert sum(int(m.sum()) for m in got.values()) == keep
    if density == 0.7:
        ranked = flat.sort(descending=True).values
        assert ranked[keep - 1] == ranked[keep] == 0


def test_fisher_scores_are_mean_squared_gradients_and_rank_across_tensors():
    model = mlp(6, 8, 8, 3, activation=nn.ReLU)
    batches = _data(2, [(4, 6), (3, 6)])
    fish = mp.masks.fisher(model, batches, _ce, 0.25)
    expected = {name: torch.zeros_like(p) for name, p in model.named_parameters()}
    for batch in batches:
        grads = torch.autograd.grad(_ce(model, batch), list(model.parameters()))
        for name, grad in zip(expected, grads, strict=True):
            expected[name] += grad.square()
    scores = fish.scores()
    for name, total in expected.items():
        torch.testing.assert_close(scores[name], total / 2, rtol=0, atol=0)
    # One ranking: the per-tensor shares differ from 25% each.
    model2 = copy.deepcopy(model)
    mp.apply_mask(model2, {"*": mp.Freeze(~fish)})
    free = {t.name: t.free for t in mp.summary(model2).tensors}
    total = sum(p.numel() for p in model.parameters())
    assert sum(free.values()) == int(total * 0.25)
    assert any(free[n] != int(p.numel() * 0.25) for n, p in model.named_parameters())


def test_fisher_count_is_int_of_density_times_n():
    model = nn.Sequential(nn.Linear(10, 100))  # 1,100 entries: 0.005 * 1100 = 5.5
    fish = mp.masks.fisher(model, _data(3, [(2, 10)], classes=100), _ce, 0.005)
    mp.apply_mask(model, {"*": mp.Freeze(~fish)})
    assert mp.summary(model).trainable == int(1100 * 0.005) == 5
    assert round(1100 * 0.005) == 6  # the count maskparam's random/magnitude would use


def _busy_model() -> nn.Sequential:
    """Dropout, BatchNorm in training mode, a frozen parameter, a submodule in eval mode."""
    model = nn.Sequential(
        nn.Linear(6, 8), nn.BatchNorm1d(8), nn.Dropout(0.5), nn.Linear(8, 8), nn.Linear(8, 3)
    )
    model.train()
    model[3].eval()
    model[4].bias.requires_grad_(False)
    return model


def test_fisher_and_wanda_leave_the_model_and_the_rng_untouched(snapshot):
    model = _busy_model()
    old = torch.ones(8, 6)
    model[0].weight.grad = old
    before = snapshot(model)
    grads = {name: p.grad for name, p in model.named_parameters()}
    modes = {name: m.training for name, m in model.named_modules()}
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    batches = _data(4, [(5, 6), (5, 6)])
    # A forward of its own moves the RNG (dropout) and BatchNorm's statistics: what is restored.
    probe = copy.deepcopy(model)
    rng = torch.get_rng_state()
    probe(batches[0][0])
    assert not torch.equal(torch.get_rng_state(), rng)
    assert not torch.equal(probe[1].running_mean, model[1].running_mean)

    rng = torch.get_rng_state()
    fish = mp.masks.fisher(model, batches, _ce, 0.5)
    wanda = mp.masks.wanda(model, [x for x, _ in batches], 0.5)
    assert torch.equal(torch.get_rng_state(), rng)
    before.assert_same(model)
    assert {name: p.grad for name, p in model.named_parameters()} == grads
    assert model[0].weight.grad is old
    assert torch.equal(old, torch.ones(8, 6))
    assert {name: m.training for name, m in model.named_modules()} == modes
    assert {name: p.requires_grad for name, p in model.named_parameters()} == flags
    assert all(not m._forward_pre_hooks for m in model.modules())
    assert "4.bias" not in fish.sums
    assert "0.weight" in fish.sums
    assert wanda.input_norms().keys() == {"0.weight", "3.weight", "4.weight"}


def test_fisher_restores_the_model_when_the_loss_fails(snapshot):
    model = _busy_model()
    before = snapshot(model)
    rng = torch.get_rng_state()
    calls = []

    def failing(model: nn.Module, batch: Any) -> Tensor:
        calls.append(1)
        if len(calls) == 2:
            raise KeyError("labels")
        return _ce(model, batch)

    with pytest.raises(mp.MaskparamError, match=r"raised KeyError on batch 1"):
        mp.masks.fisher(model, _data(5, [(3, 6)] * 3), failing, 0.5)
    assert torch.equal(torch.get_rng_state(), rng)
    before.assert_same(model)
    assert all(p.grad is None for p in model.parameters())


def test_freeze_of_the_complement_trains_exactly_the_selected_entries(train):
    model = mlp(6, 8, 8, 3, activation=nn.ReLU)
    fish = mp.masks.fisher(model, _data(6, [(1, 6)] * 5), _ce, 0.1)
    selected = dict(
        zip([n for n, _ in _members(model)], fish.build_joint(_members(model)), strict=True)
    )
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    mp.apply_mask(model, {"*": mp.Freeze(~fish)})
    train(model, torch.randn(4, 6), steps=3)  # AdamW with weight decay
    for name, mask in selected.items():
        now = getattr(model[int(name[0])], name.split(".")[1]).detach()
        changed = now.ne(before[name])
        assert torch.equal(changed, mask), name
        assert torch.equal(now[~mask], before[name][~mask])  # bit for bit
    total = sum(p.numel() for p in before.values())
    assert sum(int(m.sum()) for m in selected.values()) == int(0.1 * total) == 15


# --- Wanda ------------------------------------------------------------------------------------


class WrappedGPT:
    """locuslab/wanda, lib/layerwrapper.py (the statistics Wanda uses)."""

    def __init__(self, layer: nn.Linear) -> None:
        self.layer = layer
        self.dev = self.layer.weight.device
        self.rows = layer.weight.data.shape[0]
        self.columns = layer.weight.data.shape[1]
        self.scaler_row = torch.zeros((self.columns), device=self.dev)
        self.nsamples = 0

    def add_batch(self, inp: Tensor, out: Tensor) -> None:
        if len(inp.shape) == 2:
            inp = inp.unsqueeze(0)
        tmp = inp.shape[0]
        if isinstance(self.layer, nn.Linear):
            if len(inp.shape) == 3:
                inp = inp.reshape((-1, inp.shape[-1]))
            inp = inp.t()
        self.scaler_row *= self.nsamples / (self.nsamples + tmp)
        self.nsamples += tmp
        inp = inp.type(torch.float32)
        self.scaler_row += torch.norm(inp, p=2, dim=1) ** 2 / self.nsamples


def reference_wanda(model: nn.Module, batches: list[Tensor], sparsity: float) -> dict[str, Tensor]:
    """lib/prune.py::prune_wanda, unstructured (no variant, no n:m), one-shot: the statistics of
    every Linear from the dense model. Returns the kept entries per weight."""
    subset = {name: m for name, m in model.named_modules() if type(m) is nn.Linear}
    wrapped_layers = {name: WrappedGPT(subset[name]) for name in subset}

    def add_batch(name: str) -> Callable[..., None]:
        def tmp(_: nn.Module, inp: tuple[Tensor, ...], out: Tensor) -> None:
            wrapped_layers[name].add_batch(inp[0].data, out.data)

        return tmp

    handles = [subset[name].register_forward_hook(add_batch(name)) for name in wrapped_layers]
    with torch.no_grad():
        for batch in batches:
            model(batch)
    for h in handles:
        h.remove()
    kept = {}
    for name in subset:  # noqa: PLC0206 - the reference's loop, as written
        w_metric = torch.abs(subset[name].weight.data) * torch.sqrt(
            wrapped_layers[name].scaler_row.reshape((1, -1))
        )
        w_mask = torch.zeros_like(w_metric) == 1
        sort_res = torch.sort(w_metric, dim=-1, stable=True)
        indices = sort_res[1][:, : int(w_metric.shape[1] * sparsity)]
        w_mask.scatter_(1, indices, True)
        kept[f"{name}.weight"] = ~w_mask
    return kept


def _tied_model() -> nn.Sequential:
    """Weights from {±0.5, ±1}: many tied |w|."""
    model = nn.Sequential(nn.Linear(10, 12), nn.GELU(), nn.Linear(12, 7))
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for layer in (model[0], model[2]):
            levels = torch.tensor([-1.0, -0.5, 0.5, 1.0])
            layer.weight.copy_(levels[torch.randint(4, layer.weight.shape, generator=generator)])
    return model


@pytest.mark.parametrize("sparsity", [0.5, 0.3, 0.8])
def test_wanda_equals_the_reference_including_ties(sparsity):
    model = _tied_model()
    generator = torch.Generator().manual_seed(8)
    batches = []
    for shape in [(2, 5, 10), (3, 4, 10), (1, 6, 10)]:  # (samples, tokens, features)
        # Random signs: every input feature of the first layer has the same norm, so its scores
        # tie wherever |w| does; the second layer sees distinct norms.
        batches.append(torch.randint(2, shape, generator=generator) * 2.0 - 1.0)
    expected = reference_wanda(copy.deepcopy(model), batches, sparsity)
    wanda = mp.masks.wanda(model, batches, sparsity)
    got = wanda.build_joint([(name, model.get_parameter(name).detach()) for name in expected])
    for (name, mask), mine in zip(expected.items(), got, strict=True):
        assert torch.equal(mine, mask), name
        count = int(mask.shape[1] * sparsity)
        assert (mine.logical_not().sum(dim=1) == count).all()
    # The cut falls inside a tie in some row of the first layer: the stable sort decides.
    norms = wanda.input_norms()["0.weight"]
    metric = model[0].weight.detach().abs() * norms
    ranked = metric.sort(dim=-1, stable=True).values
    count = int(10 * sparsity)
    assert bool((ranked[:, count - 1] == ranked[:, count]).any())


def test_wanda_through_apply_mask_with_a_module_type_rule():
    model = _tied_model()
    batches = [torch.randn(4, 10), torch.randn(2, 10)]  # 2-d inputs: one sample per call
    expected = reference_wanda(copy.deepcopy(model), batches, 0.5)
    dense = {n: p.detach().clone() for n, p in model.named_parameters()}
    mp.apply_mask(model, {(nn.Linear, "weight"): mp.Mask(mp.masks.wanda(model, batches, 0.5))})
    for name, kept in expected.items():
        layer = model[int(name[0])]
        assert torch.equal(layer.weight.detach(), torch.where(kept, dense[name], 0.0))
    assert mp.summary(model).tensors[0].constraint.startswith("Mask(keeps all but the 50%")


def test_wanda_beats_magnitude_on_outlier_features():
    generator = torch.Generator().manual_seed(9)
    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))

    def inputs(n: int) -> Tensor:
        x = torch.randn(n, 16, generator=generator)
        x[:, 3] *= 100.0  # one outlier input feature
        return x

    calibration = [inputs(32) for _ in range(4)]
    test = inputs(256)
    with torch.no_grad():
        dense = model(test)
    errors = {}
    for name, source in {
        "wanda": mp.masks.wanda(model, calibration, 0.5),
        "magnitude": mp.masks.magnitude(0.5),
    }.items():
        pruned = copy.deepcopy(model)
        mp.apply_mask(pruned, {(nn.Linear, "weight"): mp.Mask(source)})
        with torch.no_grad():
            errors[name] = float((pruned(test) - dense).square().mean())
    assert errors["wanda"] < 0.5 * errors["magnitude"], errors


def test_wanda_reads_keyword_inputs_and_a_custom_forward():
    class KeywordNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(5, 3)

        def forward(self, *, features: Tensor) -> Tensor:
            return self.fc(input=features)

    model = KeywordNet()
    x = torch.randn(6, 5)
    wanda = mp.masks.wanda(model, [{"features": x}], 0.4, forward=lambda m, b: m(**b))
    torch.testing.assert_close(wanda.input_norms()["fc.weight"], x.norm(dim=0), rtol=1e-6, atol=0)
    kept = wanda(model.fc.weight)  # the Parameter itself is recognised
    assert (kept.logical_not().sum(dim=1) == 2).all()


# --- complements -------------------------------------------------------------------------------


def test_complement_of_generators():
    w = torch.randn(6, 5)
    gen = mp.masks.random(0.4, seed=3)
    assert torch.equal((~gen)(w), ~gen(w))
    assert ~~gen is gen
    assert (~gen).describe() == f"all but {gen.describe()}"
    assert torch.equal((~mp.masks.rows([1]))(w), ~mp.masks.rows([1])(w))  # broadcast shape
    joint = ~mp.masks.global_magnitude(0.7)
    assert isinstance(joint, mp.masks.JointMaskGenerator)
    a, b = nn.Linear(5, 4), nn.Linear(4, 3)
    model = nn.Sequential(a, b)
    members = _members(model)
    plain = mp.masks.global_magnitude(0.7).build_joint(members)
    for inverted, mask in zip(joint.build_joint(members), plain, strict=True):
        assert torch.equal(inverted, ~mask)
    mp.apply_mask(model, {"*": mp.Freeze(joint)})
    # Freeze(~selected) trains what global_magnitude selects: all but round(0.7 * 39).
    assert mp.summary(model).trainable == 39 - round(0.7 * 39) == 12


# --- refusals ----------------------------------------------------------------------------------


def _empty() -> Any:
    yield from ()


def _ce_with_backward(model: nn.Module, batch: Any, *, retain_graph: bool = False) -> Tensor:
    value = _ce(model, batch)
    value.backward(retain_graph=retain_graph)
    return value


@pytest.mark.parametrize(
    ("batches", "loss", "density", "message"),
    [
        ([], _ce, 0.5, "batches is empty"),
        (_empty(), _ce, 0.5, "batches is empty"),
        (torch.randn(3, 6), _ce, 0.5, "iterable of batches"),
        (None, _ce, 0.5, "iterable of batches"),
        ("batches", _ce, 1.5, "density must be a number between 0 and 1"),
        ("batches", "loss", 0.5, "loss must be a callable"),
        (
            "batches",
            lambda m, b: m(b[0]),
            0.5,
            "scalar floating-point tensor; on batch 0 it returned a tensor of shape",
        ),
        ("batches", lambda m, b: 1.0, 0.5, "it returned a float"),
        ("batches", lambda m, b: _ce(m, b).detach(), 0.5, "does not depend on any trainable"),
        ("batches", lambda m, b: _ce(m, b) * float("nan"), 0.5, "not finite"),
        ("batches", _ce_with_backward, 0.5, r"wrote .grad on batch 0: it called backward\(\)"),
        (
            "batches",
            lambda m, b: _ce_with_backward(m, b, retain_graph=True),
            0.5,
            r"it called backward\(\) itself",
        ),
    ],
)
def test_fisher_refusals_leave_the_model_unchanged(snapshot, batches, loss, density, message):
    model = mlp(6, 8, 8, 3, activation=nn.ReLU)
    if isinstance(batches, str):
        batches = _data(10, [(2, 6)] * 2)
    before = snapshot(model)
    rng = torch.get_rng_state()
    with pytest.raises(mp.MaskparamError, match=message):
        mp.masks.fisher(model, batches, loss, density)
    before.assert_same(model)
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(p.grad is None for p in model.parameters())


def test_fisher_refuses_tensors_its_scores_do_not_cover(snapshot):
    model = mlp(6, 8, 8, 3, activation=nn.ReLU)
    model[4].weight.requires_grad_(False)
    mp.apply_mask(model, {"0.weight": mp.Mask(mp.masks.magnitude(0.5))})
    fish = mp.masks.fisher(model, _data(11, [(2, 6)]), _ce, 0.5)
    before = snapshot(model)
    with pytest.raises(mp.MaskparamError, match=r"'4.weight'.*requires_grad=False"):
        mp.apply_mask(model, {"4.weight": mp.Freeze(~fish)})
    before.assert_same(model)
    with pytest.raises(mp.MaskparamError, match="compute the scores before apply_mask"):
        fish.build_joint([("0.weight", model[0].weight.detach())])
    with pytest.raises(mp.MaskparamError, match="has no such tensor"):
        fish.build_joint([("9.weight", torch.zeros(2))])
    with pytest.raises(mp.MaskparamError, match=r"scores have shape \(8, 8\)"):
        fish.build_joint([("2.weight", torch.zeros(8, 9))])
    mp.apply_mask(model, {"2.*": mp.Freeze(~fish)})  # what it covers still works
    assert mp.summary(model).tensors[-1].name == "2.bias"


def test_fisher_scores_tied_parameters_under_every_name():
    shared = nn.Linear(4, 4)
    model = nn.Sequential(shared, nn.Tanh(), shared, nn.Linear(4, 3))
    fish = mp.masks.fisher(model, [(torch.randn(3, 4), torch.tensor([0, 1, 2]))], _ce, 0.5)
    assert fish.sums["0.weight"] is fish.sums["2.weight"]
    assert fish(model[0].weight).shape == (4, 4)


@pytest.mark.parametrize(
    ("rules", "message"),
    [
        ({"*": "wanda"}, r"'0.bias'.*Wanda scores nn.Linear weights only"),
        ({"conv.weight": "wanda"}, r"'conv.weight'.*Wanda scores nn.Linear weights only"),
        ({"attn.out_proj.weight": "wanda"}, "no calibration input reached this Linear"),
    ],
)
def test_wanda_refusals_leave_the_model_unchanged(snapshot, rules, message):
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 4)
            self.conv = nn.Conv1d(4, 4, 1)
            self.attn = nn.MultiheadAttention(4, 1, batch_first=True)

        def forward(self, x: Tensor) -> Tensor:
            h = self.conv(self.fc(x).transpose(1, 2)).transpose(1, 2)
            return self.attn(h, h, h)[0]

    model = Net()
    model.fc.bias.requires_grad_(True)
    wanda = mp.masks.wanda(model, [torch.randn(2, 3, 4)], 0.5)
    if "*" in rules:
        model = nn.Sequential(nn.Linear(3, 3))
        wanda = mp.masks.wanda(model, [torch.randn(2, 3)], 0.5)
    before = snapshot(model)
    with pytest.raises(mp.MaskparamError, match=message):
        mp.apply_mask(model, {key: mp.Mask(wanda) for key in rules})
    before.assert_same(model)


@pytest.mark.parametrize(
    ("batches", "sparsity", "forward", "message"),
    [
        ([], 0.5, None, "batches is empty"),
        (torch.randn(2, 3), 0.5, None, "iterable of batches"),
        ("batches", -0.1, None, "sparsity must be a number between 0 and 1"),
        ("batches", 0.5, "model", "forward must be a callable"),
        ("batches", 0.5, lambda m, b: m(b, b), "raised TypeError on batch 0"),
    ],
)
def test_wanda_call_refusals(snapshot, batches, sparsity, forward, message):
    model = _busy_model()
    if isinstance(batches, str):
        batches = [torch.randn(4, 6)]
    before = snapshot(model)
    rng = torch.get_rng_state()
    with pytest.raises(mp.MaskparamError, match=message):
        mp.masks.wanda(model, batches, sparsity, forward=forward)
    before.assert_same(model)
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(not m._forward_pre_hooks for m in model.modules())


def test_wanda_refuses_a_weight_two_linears_share():
    first, second = nn.Linear(3, 3), nn.Linear(3, 3)
    second.weight = first.weight
    model = nn.Sequential(first, second)
    wanda = mp.masks.wanda(model, [torch.randn(2, 3)], 0.5)
    with pytest.raises(mp.MaskparamError, match="2 Linear layers use it"):
        mp.apply_mask(model, {"0.weight": mp.Mask(wanda)})
    assert not any(mp.summary(model).tensors)


def test_not_a_module_is_refused():
    with pytest.raises(mp.MaskparamError, match="must be a torch.nn.Module"):
        mp.masks.fisher("model", [1], _ce, 0.5)  # type: ignore[arg-type]
    with pytest.raises(mp.MaskparamError, match="must be a torch.nn.Module"):
        mp.masks.wanda("model", [1], 0.5)  # type: ignore[arg-type]


# from the attack on the pruning toolkit
def test_wanda_on_a_conv_is_refused_unchanged():
    """wanda with a rule selecting a Conv weight: MaskparamError, nothing changed."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(2 * 4 * 4, 3))
    x = torch.randn(2, 1, 6, 6)
    source = mp.masks.wanda(model, [x], 0.5)
    before = snapshot_with_summary(model)
    with pytest.raises(mp.MaskparamError, match="Linear"):
        mp.apply_mask(model, {"*.weight": mp.Mask(source)})
    assert same_snapshot_with_summary(before, snapshot_with_summary(model))


# from the attack on the pruning toolkit
def test_fisher_on_a_model_with_frozen_params_is_clear():
    """fisher on a model whose first layer is frozen (requires_grad=False), rule over every
    weight: a MaskparamError naming the frozen tensor, or a mask for the trainable ones only."""
    model = mlp(8, 16, 4, seed=0)
    model[0].weight.requires_grad_(False)
    x, y = pruning_inputs(), torch.randn(16, 4)
    before = snapshot_with_summary(model)
    fish = mp.masks.fisher(model, [(x, y)], lambda m, b: ((m(b[0]) - b[1]) ** 2).mean(), 0.5)
    assert same_snapshot_with_summary(before, snapshot_with_summary(model))
    mp.apply_mask(model, {"*.weight": mp.Freeze(~fish)})
    # "*.weight" passes over frozen parameters: only 2.weight is ranked, half of it frozen.
    assert not hasattr(model[0], "parametrizations")
    frozen, _ = mp.frozen_entries(model, "2.weight")
    assert int(frozen.expand(4, 16).sum()) == 64 - int(0.5 * 64)


def test_fisher_accumulating_into_an_existing_grad_is_refused_and_the_grad_restored():
    model = mlp(6, 8, 8, 3, activation=nn.ReLU)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    saved = {name: p.grad for name, p in model.named_parameters()}
    with pytest.raises(mp.MaskparamError, match=r"called backward\(\) itself"):
        mp.masks.fisher(model, _data(10, [(2, 6)]), _ce_with_backward, 0.5)
    assert all(p.grad is saved[name] for name, p in model.named_parameters())
    assert all(not p.grad.any() for p in model.parameters())


def test_fisher_scores_in_eval_mode_so_the_mask_does_not_depend_on_dropout():
    """A model in training mode with dropout: the scores are those of the model in eval mode,
    the same whatever the global RNG, and the model's modes come back."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Dropout(0.5), nn.Linear(16, 3))
    model.train()
    batches = _data(12, [(4, 6)] * 3)
    masks = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        fish = mp.masks.fisher(model, batches, _ce, 0.25)
        masks.append(fish.build_joint(_members(model)))
    evaluated = copy.deepcopy(model).eval()
    expected = reference_fish(evaluated, batches, _ce, 0.25)
    for first, second, name in zip(
        masks[0], masks[1], [n for n, _ in _members(model)], strict=True
    ):
        assert torch.equal(first, second)
        assert torch.equal(first, expected[name].bool())
    assert all(m.training for m in model.modules())


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), 1e30])
def test_wanda_refuses_calibration_input_with_non_finite_norms(snapshot, bad):
    """NaN (or inf, or a value whose square overflows) in the calibration input would rank its
    feature largest and keep whatever weights meet it."""
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    before = snapshot(model)
    good = torch.ones(2, 4)
    worse = torch.tensor([[1.0, bad, 1.0, 1.0]])
    with pytest.raises(
        mp.MaskparamError,
        match=r"masks.wanda for '0.weight': the input of this Linear on batch 1 makes 1 of its 4 "
        r"feature norms inf or NaN",
    ):
        mp.masks.wanda(model, [good, worse], 0.5)
    before.assert_same(model)
    assert all(not m._forward_pre_hooks for m in model.modules())


def test_a_fish_fine_tune_of_a_model_with_dropout_reloads_from_its_trainable_state():
    """The trainable state holds the trained entries only: reloading it recomputes the FISH
    mask on the base model, in another process (another global RNG state). Scored in eval mode,
    the mask is the same, so the state loads and the model computes the same."""

    def base() -> nn.Sequential:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Dropout(0.5), nn.Linear(16, 3))
        return model.train()

    batches = _data(13, [(4, 6)] * 3)
    model = base()
    torch.manual_seed(10)
    mp.apply_mask(model, {"*": mp.Freeze(~mp.masks.fisher(model, batches, _ce, 0.25))})
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for batch in batches:
        optimizer.zero_grad()
        _ce(model, batch).backward()
        optimizer.step()
    state = mp.trainable_state_dict(model)
    again = base()
    torch.manual_seed(99)  # a new process: dropout would draw otherwise
    mp.apply_mask(again, {"*": mp.Freeze(~mp.masks.fisher(again, batches, _ce, 0.25))})
    mp.load_trainable_state_dict(again, state)
    model.eval()
    again.eval()
    with torch.no_grad():
        assert torch.equal(again(batches[0][0]), model(batches[0][0]))
