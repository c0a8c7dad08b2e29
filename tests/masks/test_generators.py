"""Mask generators (masks.py): reproducible, exact counts (ties too), broadcast shapes, the same
masks users know from torch.nn.utils.prune, and bad arguments refused when the generator is made
or when it meets a tensor it does not fit."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import same_snapshot_with_summary, snapshot_with_summary
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn
from torch.nn.utils import parametrize, prune

import maskparam as mp


def test_random_is_reproducible_and_ignores_the_global_rng():
    shape = torch.empty(7, 9)
    torch.manual_seed(1)
    first = mp.masks.random(0.3, seed=5)(shape)
    state = torch.get_rng_state()
    torch.manual_seed(2)
    second = mp.masks.random(0.3, seed=5)(shape)
    assert torch.equal(first, second)
    torch.manual_seed(1)
    mp.masks.random(0.3, seed=5)(shape)
    assert torch.equal(torch.get_rng_state(), state)  # drawing left the global RNG untouched
    assert not torch.equal(first, mp.masks.random(0.3, seed=6)(shape))


def _masks(model: nn.Module) -> list[Tensor]:
    return [mp.kept_entries(model, name).expand(4, 6).bool() for name in ("0.weight", "1.weight")]


def _pair() -> nn.Sequential:
    return nn.Sequential(nn.Linear(6, 4), nn.Linear(6, 4))  # two weights of the same shape


def test_random_gives_every_tensor_a_mask_of_its_own_from_the_seed_and_its_name():
    seeded = mp.masks.random(0.5, seed=3)
    model = mp.apply_mask(_pair(), {"*.weight": mp.Mask(seeded, layout="dense")})
    first, second = _masks(model)
    assert not torch.equal(first, second)
    assert int(first.sum()) == int(second.sum()) == 12
    # Derived from (seed, name): the same whatever the order tensors are visited in, one rule
    # or one per tensor, and what build gives for that name.
    apart = _pair()
    mp.apply_mask(apart, {"1.weight": mp.Mask(seeded, layout="dense")})
    mp.apply_mask(apart, {"0.weight": mp.Mask(seeded, layout="dense")})
    assert all(torch.equal(a, b) for a, b in zip(_masks(apart), [first, second], strict=True))
    assert torch.equal(seeded.build(torch.empty(4, 6), "0.weight"), first)
    # Whatever the global generator, which it leaves untouched.
    torch.manual_seed(123)
    again = _pair()
    state = torch.get_rng_state()
    mp.apply_mask(again, {"*.weight": mp.Mask(seeded, layout="dense")})
    assert all(torch.equal(a, b) for a, b in zip(_masks(again), [first, second], strict=True))
    assert torch.equal(torch.get_rng_state(), state)
    other = mp.apply_mask(_pair(), {"*.weight": mp.Mask(mp.masks.random(0.5, seed=4))})
    assert not torch.equal(_masks(other)[0], first)


def test_random_with_a_seed_keeps_what_a_lower_density_kept():
    w = torch.empty(10, 10)
    low = mp.masks.random(0.2, seed=7).build(w, "fc.weight")
    high = mp.masks.random(0.6, seed=7).build(w, "fc.weight")
    assert int(low.sum()) == 20
    assert int(high.sum()) == 60
    assert bool((high | ~low).all())


def test_random_without_a_seed_draws_from_torchs_global_generator():
    """torch.manual_seed governs it: five seeds give five baselines, one seed repeats one."""
    runs = []
    for seed in (0, 1, 0):
        torch.manual_seed(seed)
        model = mp.apply_mask(_pair(), {"*.weight": mp.Mask(mp.masks.random(0.5), layout="dense")})
        runs.append(_masks(model))
    assert all(torch.equal(a, b) for a, b in zip(runs[0], runs[2], strict=True))
    assert not torch.equal(runs[0][0], runs[1][0])
    assert not torch.equal(runs[0][0], runs[0][1])  # and per tensor
    assert "seed" not in mp.summary(model).tensors[0].constraint


@given(st.floats(0.0, 1.0), st.integers(1, 40), st.integers(1, 40))
def test_magnitude_equals_prune_l1_unstructured(sparsity, rows, cols):
    layer = nn.Linear(cols, rows)
    ours = mp.masks.magnitude(sparsity)(layer.weight)
    prune.l1_unstructured(layer, "weight", amount=sparsity)
    assert torch.equal(ours, layer.weight_mask.bool())


def test_magnitude_with_ties_matches_prune_too():
    layer = nn.Linear(4, 4)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([1.0, -1.0, 2.0, 0.0]).repeat(4, 1))
    ours = mp.masks.magnitude(0.5)(layer.weight)
    prune.l1_unstructured(layer, "weight", amount=0.5)
    assert torch.equal(ours, layer.weight_mask.bool())


def _large_weight(kind: str, dtype: torch.dtype) -> torch.Tensor:
    """300 x 300 = 90,000 entries: above the size where magnitude selects by radix, not topk."""
    generator = torch.Generator().manual_seed(3)
    weight = torch.randn(300, 300, generator=generator, dtype=torch.float64) * 0.02
    if kind == "ties":  # few distinct magnitudes, each held by thousands of entries
        weight = (weight * 200).round()
    elif kind == "zeros":  # a third exactly zero, some of them -0.0
        weight[:100] = 0.0
        weight[:10] = -0.0
    elif kind == "non-finite":
        weight[0, :3] = torch.tensor([float("nan"), float("inf"), -float("inf")])
    return weight.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kind", ["continuous", "ties", "zeros", "non-finite"])
@pytest.mark.parametrize("sparsity", [0.1, 0.5, 0.9])
def test_magnitude_on_large_tensors_equals_prune(dtype, kind, sparsity):
    layer = nn.Linear(300, 300, bias=False, dtype=dtype)
    with torch.no_grad():
        layer.weight.copy_(_large_weight(kind, dtype))
    ours = mp.masks.magnitude(sparsity)(layer.weight)
    prune.l1_unstructured(layer, "weight", amount=sparsity)
    assert torch.equal(ours, layer.weight_mask.bool())


def test_magnitude_asks_topk_only_when_the_threshold_is_tied(monkeypatch):
    calls = []
    topk = torch.topk

    def counting_topk(*args, **kwargs):
        calls.append(kwargs.get("k"))
        return topk(*args, **kwargs)

    monkeypatch.setattr(torch, "topk", counting_topk)
    distinct = _large_weight("continuous", torch.float32)
    assert int(mp.masks.magnitude(0.5)(distinct).sum()) == 45_000
    assert calls == []  # the radix select alone: the 45,000 smallest are unique
    mp.masks.magnitude(0.5)(_large_weight("ties", torch.float32))
    assert calls == [45_000]  # which tied entries go is topk's choice, as in prune


@pytest.mark.parametrize(
    ("generator", "expected"),
    [
        (mp.masks.rows([0, -1]), torch.tensor([[True], [False], [True]])),
        (mp.masks.filters(1), torch.tensor([[False], [True], [False]])),
        (mp.masks.columns(range(1)), torch.tensor([[True, False]])),
        (mp.masks.slices(-1, torch.tensor([1])), torch.tensor([[False, True]])),
    ],
)
def test_structured_masks_are_broadcast_shaped(generator, expected):
    assert torch.equal(generator(torch.empty(3, 2)), expected)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: mp.masks.random(1.5), "density must be a number between 0 and 1"),
        (lambda: mp.masks.magnitude(-0.1), "sparsity must be a number between 0 and 1"),
        (lambda: mp.masks.random(0.5, seed=1.5), "seed must be None .* or an int"),
    ],
)
def test_bad_arguments_fail_when_the_generator_is_made(make, message):
    with pytest.raises(mp.MaskparamError, match=message):
        make()


# --- structured: the mask of prune.ln_structured ------------------------------------------------

NORMS = [1, 2, 3, 0.5, 0, -1, float("inf"), float("-inf"), "fro", "nuc"]


class _Holder(nn.Module):
    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight)


def _ln_structured_mask(weight: torch.Tensor, sparsity: float, norm, dim: int) -> torch.Tensor:
    """torch's own mask; a vector as a column (prune refuses 1-d tensors: its slices are entries)."""
    shape = weight.shape
    if weight.dim() == 1:
        weight, dim = weight[:, None], dim % 1
    holder = _Holder(weight.detach().clone())
    prune.ln_structured(holder, "weight", amount=float(sparsity), n=norm, dim=dim)
    return holder.weight_mask.bool().reshape(shape)


@given(
    st.lists(st.integers(1, 5), min_size=1, max_size=4),
    st.data(),
    st.one_of(st.just(0.0), st.just(1.0), st.floats(0.0, 1.0)),
    st.sampled_from(NORMS),
    st.booleans(),
    st.integers(0, 2**31 - 1),
)
def test_structured_equals_prune_ln_structured(shape, data, sparsity, norm, tied, seed):
    dim = data.draw(st.integers(-len(shape), len(shape) - 1), label="dim")
    generator = torch.Generator().manual_seed(seed)
    if tied:  # few distinct values: many slices share their norm, so topk breaks the ties
        weight = torch.randint(-1, 2, shape, generator=generator).float()
    else:
        weight = torch.randn(shape, generator=generator)
    reduced = max(len(shape) - 1, 1)  # the dims a slice's norm reduces (a vector: 1)
    if (norm == "nuc" and reduced != 2) or (norm == "fro" and reduced > 2):
        # torch.norm raises here; 'fro' is refused by torch on 4-d tensors, accepted by us as
        # the 2-norm of the entries (what torch computes for fewer dims).
        with pytest.raises(RuntimeError):
            _ln_structured_mask(weight, sparsity, norm, dim)
        if norm == "nuc":
            with pytest.raises(mp.MaskparamError, match="nuclear norm of a slice"):
                mp.masks.structured(sparsity, dim=dim, norm=norm)(weight)
        else:
            ours = mp.masks.structured(sparsity, dim=dim, norm=norm)(weight)
            assert torch.equal(ours, mp.masks.structured(sparsity, dim=dim, norm=2)(weight))
        return
    ours = mp.masks.structured(sparsity, dim=dim, norm=norm)(weight)
    broadcast = [1] * len(shape)
    broadcast[dim] = shape[dim]
    assert ours.shape == tuple(broadcast)  # one byte per slice
    assert ours.dtype == torch.bool
    assert int(ours.sum()) == shape[dim] - round(sparsity * shape[dim])
    assert torch.equal(ours.expand(shape), _ln_structured_mask(weight, sparsity, norm, dim))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("norm", [1, 2, float("inf"), float("-inf")])
@pytest.mark.parametrize("tied", [False, True])
def test_structured_equals_prune_in_low_and_double_precision(dtype, norm, tied):
    generator = torch.Generator().manual_seed(4)
    weight = torch.randn(16, 8, 3, 3, generator=generator)
    weight = (weight * 2).round() if tied else weight
    weight = weight.to(dtype)
    for dim, sparsity in [(0, 0.5), (1, 0.25), (-1, 0.7)]:
        ours = mp.masks.structured(sparsity, dim=dim, norm=norm)(weight)
        assert torch.equal(
            ours.expand(weight.shape), _ln_structured_mask(weight, sparsity, norm, dim)
        )


def _conv_and_linear() -> list[nn.Module]:
    torch.manual_seed(0)
    return [nn.Linear(7, 8), nn.Conv2d(3, 6, 3)]


@pytest.mark.parametrize("layout", ["dense", "compact"])
@pytest.mark.parametrize("index", [0, 1])
def test_structured_mask_gives_exactly_prunes_weights_in_both_layouts(layout, index):
    ours = _conv_and_linear()[index]
    pruned = _conv_and_linear()[index]
    mp.apply_mask(ours, {"weight": mp.Mask(mp.masks.structured(0.5), layout=layout)})
    prune.ln_structured(pruned, "weight", amount=0.5, n=2, dim=0)
    assert torch.equal(ours.weight, pruned.weight)
    assert mp.verify(ours) == []
    summary = str(mp.summary(ours))
    assert "keeps the 50% of slices along dim 0 of largest L2 norm" in summary
    # A step moves only kept slices, and a checkpoint restores the same weights in either layout.
    optimizer = torch.optim.SGD(ours.parameters(), lr=0.1)
    ours(torch.randn(2, 7) if index == 0 else torch.randn(2, 3, 5, 5)).square().sum().backward()
    optimizer.step()
    assert torch.equal(ours.weight == 0, pruned.weight == 0)
    for other in ["dense", "compact"]:
        fresh = _conv_and_linear()[index]
        mp.apply_mask(fresh, {"weight": mp.Mask(mp.masks.structured(0.5), layout=other)})
        mp.load_state_dict(fresh, ours.state_dict())
        assert torch.equal(fresh.weight, ours.weight)
        assert mp.verify(fresh) == []


@pytest.mark.parametrize("layout", ["dense", "compact"])
def test_structured_freeze_keeps_whole_slices(layout):
    layer = nn.Linear(6, 4)
    before = layer.weight.detach().clone()
    frozen = mp.masks.structured(0.5, dim=1)(layer.weight)  # the 3 input columns of largest norm
    mp.apply_mask(layer, {"weight": mp.Freeze(mp.masks.structured(0.5, dim=1), layout=layout)})
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.1)
    layer(torch.randn(3, 6)).square().sum().backward()
    optimizer.step()
    moved = layer.weight.detach() != before
    assert not bool(moved[frozen.expand(4, 6)].any())
    assert bool(moved[~frozen.expand(4, 6)].all())


# --- n_m: N:M semi-structured sparsity ------------------------------------------------------------


def _n_m_reference(weight: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """The definition, entry by entry: in every m consecutive entries of the (rows, -1) view, keep
    the n largest |w|, ties to the lowest index, NaN largest."""
    flat = weight.detach().double().reshape(-1).tolist()
    kept = [False] * len(flat)
    for start in range(0, len(flat), m):
        group = range(start, start + m)
        rank = sorted(group, key=lambda i: (not math.isnan(flat[i]), -abs(flat[i]), i))
        for i in rank[:n]:
            kept[i] = True
    return torch.tensor(kept, dtype=torch.bool).reshape(weight.shape)


N_M = st.sampled_from([(2, 4), (1, 4), (0, 4), (4, 4), (1, 2), (3, 8), (1, 1), (2, 3)])


@given(
    N_M,
    st.lists(st.integers(1, 4), min_size=0, max_size=3),
    st.integers(1, 3),
    st.sampled_from(["continuous", "ties", "nan"]),
    st.sampled_from([torch.float32, torch.float16, torch.bfloat16]),
    st.integers(0, 2**31 - 1),
)
def test_n_m_equals_the_reference(n_m, leading, groups, kind, dtype, seed):
    n, m = n_m
    # The last dim (for > 2 dims: the product of all but the first) is a multiple of m.
    shape = (*leading, groups * m) if len(leading) < 2 else (*leading, groups * m, 1)
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(shape, generator=generator)
    if kind == "ties":
        weight = weight.round()  # -1, 0, 1 mostly (and -0.0)
    elif kind == "nan":
        weight[torch.rand(shape, generator=generator) < 0.2] = float("nan")
    weight = weight.to(dtype)
    ours = mp.masks.n_m(n, m)(weight)
    assert ours.shape == weight.shape
    assert ours.dtype == torch.bool
    assert torch.equal(ours, _n_m_reference(weight, n, m))


@given(
    st.lists(st.integers(1, 5), min_size=0, max_size=2),
    st.integers(1, 6),
    st.sampled_from([torch.float32, torch.float16, torch.bfloat16, torch.float64]),
    st.integers(0, 2**31 - 1),
    st.booleans(),
)
def test_2_4_keeps_exactly_2_of_every_4(leading, groups, dtype, seed, tied):
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn((*leading, 4 * groups), generator=generator)
    weight = (weight.round() if tied else weight).to(dtype)
    kept = mp.masks.n_m(2, 4)(weight).reshape(-1, 4)
    assert torch.equal(kept.sum(dim=1), torch.full((kept.shape[0],), 2))
    magnitudes = weight.abs().reshape(-1, 4)
    smallest_kept = magnitudes.masked_fill(~kept, float("inf")).amin(dim=1)
    largest_pruned = magnitudes.masked_fill(kept, float("-inf")).amax(dim=1)
    assert bool((smallest_kept >= largest_pruned).all())


@pytest.mark.parametrize(("n", "m"), [(2, 4), (1, 4), (3, 8), (1, 2), (0, 4), (4, 4)])
def test_n_m_equals_torch_weight_norm_sparsifier_on_tie_free_weights(n, m):
    """torch.ao.pruning's WeightNormSparsifier with sparsity_level=1 and zeros_per_block=m-n
    zeroes the m-n smallest w*w (its norm=2; norm=1 ranks |w|) of every (1, m) block of a 2-d
    weight, through topk: the same entries wherever |w| has no ties (and no two squares round
    equal). Ties it leaves to topk; it pads a last dim that m does not divide with NaN (kept),
    and does not take tensors of more than 2 dims. Ties and shapes: see the reference tests."""
    from torch.ao.pruning import WeightNormSparsifier  # only this test needs it

    torch.manual_seed(n * 10 + m)
    for norm in [1, 2]:
        model = nn.Sequential(nn.Linear(4 * m, 6))
        ours = mp.masks.n_m(n, m)(model[0].weight)
        sparsifier = WeightNormSparsifier(
            sparsity_level=1.0, sparse_block_shape=(1, m), zeros_per_block=m - n, norm=norm
        )
        sparsifier.prepare(model, config=[{"tensor_fqn": "0.weight"}])
        sparsifier.step()
        assert torch.equal(ours, model[0].parametrizations.weight[0].mask.bool())


def test_n_m_groups_a_conv_weight_as_out_channels_by_the_rest():
    conv = nn.Conv2d(4, 3, 3)  # weight (3, 4, 3, 3): rows of 36, groups cross kernel boundaries
    ours = mp.masks.n_m(2, 4)(conv.weight)
    flat = mp.masks.n_m(2, 4)(conv.weight.reshape(3, 36))
    assert torch.equal(ours, flat.reshape(conv.weight.shape))
    assert mp.masks.n_m(2, 4).describe() == (
        "2:4 (the 2 largest |w| of every 4 along the last dim)"
    )


@pytest.mark.parametrize("layout", ["dense", "compact"])
def test_n_m_as_a_mask_in_both_layouts(layout):
    layer = nn.Linear(8, 3)
    expected = layer.weight.detach() * _n_m_reference(layer.weight, 2, 4)
    mp.apply_mask(layer, {"weight": mp.Mask(mp.masks.n_m(2, 4), layout=layout)})
    assert torch.equal(layer.weight, expected)
    assert mp.verify(layer) == []
    assert "keeps 2:4 (the 2 largest |w| of every 4" in str(mp.summary(layer))


# --- structured and n_m: bad input --------------------------------------------------------------


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: mp.masks.structured(1.5), "sparsity must be a number between 0 and 1"),
        (lambda: mp.masks.structured(float("nan")), "sparsity must be a number between 0 and 1"),
        (lambda: mp.masks.structured(True), "sparsity must be a number between 0 and 1"),
        (lambda: mp.masks.structured("0.5"), "sparsity must be a number between 0 and 1"),
        (lambda: mp.masks.structured(0.5, dim=True), "dim must be an int"),
        (lambda: mp.masks.structured(0.5, dim=1.0), "dim must be an int"),
        (lambda: mp.masks.structured(0.5, dim=None), "dim must be an int"),
        (lambda: mp.masks.structured(0.5, norm="l2"), "the norm must be a number"),
        (lambda: mp.masks.structured(0.5, norm=None), "the norm must be a number"),
        (lambda: mp.masks.structured(0.5, norm=True), "the norm must be a number"),
        (lambda: mp.masks.structured(0.5, norm=float("nan")), "the norm must be a number"),
        (lambda: mp.masks.structured(0.5, norm=10**400), "the norm must be a number"),
        (lambda: mp.masks.structured(0.5, norm=torch.tensor(2.0)), "the norm must be a number"),
        (lambda: mp.masks.n_m(-1, 4), "n must be >= 0"),
        (lambda: mp.masks.n_m(5, 4), "n .kept in every group. must be <= m"),
        (lambda: mp.masks.n_m(0, 0), "m must be >= 1"),
        (lambda: mp.masks.n_m(2.0, 4), "n must be an int"),
        (lambda: mp.masks.n_m(True, 4), "n must be an int"),
        (lambda: mp.masks.n_m(2, "4"), "m must be an int"),
    ],
)
def test_structured_and_n_m_refuse_bad_arguments_when_made(make, message):
    with pytest.raises(mp.MaskparamError, match=message):
        make()


class _Model(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 4)
        self.conv = nn.Conv2d(2, 3, 3)  # weight (3, 2, 3, 3): rows of 18
        self.scale = nn.Parameter(torch.tensor(2.0))


@pytest.mark.parametrize(
    ("name", "spec", "message"),
    [
        ("scale", mp.Mask(mp.masks.structured(0.5)), "'scale'.*scalar .0-d.: it has no slices"),
        ("fc.weight", mp.Mask(mp.masks.structured(0.5, dim=2)), "'fc.weight'.*dim=2 is out of"),
        ("fc.bias", mp.Freeze(mp.masks.structured(0.5, dim=-2)), "'fc.bias'.*dim=-2 is out of"),
        ("fc.weight", mp.Mask(mp.masks.structured(0.5, norm="nuc")), "'fc.weight'.*nuclear"),
        ("conv.weight", mp.Mask(mp.masks.structured(0.5, norm="nuc")), "'conv.weight'.*nuclear"),
        ("scale", mp.Mask(mp.masks.n_m(2, 4)), "'scale'.*scalar .0-d."),
        ("fc.weight", mp.Mask(mp.masks.n_m(2, 4)), r"'fc.weight'.*has size 6.*m=4(.|\n)*fix"),
        ("conv.weight", mp.Freeze(mp.masks.n_m(1, 4)), r"viewed as \(3, 18\)(.|\n)*divides 18"),
    ],
)
def test_structured_and_n_m_refuse_tensors_they_do_not_fit_and_leave_the_model_alone(
    name, spec, message
):
    model = _Model()
    before = {key: value.clone() for key, value in model.state_dict().items()}
    parameters = list(model.parameters())
    with pytest.raises(mp.MaskparamError, match=message):
        mp.apply_mask(model, {"fc.bias": mp.Mask(mp.masks.magnitude(0.5)), name: spec})
    assert list(model.parameters()) == parameters  # the same objects: nothing replaced
    assert not any(parametrize.is_parametrized(module) for module in model.modules())
    after = model.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[key], value) for key, value in before.items())


@pytest.mark.parametrize(
    ("generator", "words"),
    [
        (mp.masks.structured(0.25), "the 75% of slices along dim 0 of largest L2 norm"),
        (mp.masks.structured(0.5, dim=-1, norm=1), "the 50% of slices along dim -1 of largest L1"),
        (mp.masks.structured(0.5, norm=float("inf")), "of largest Linf norm"),
        (mp.masks.structured(0.5, norm=float("-inf")), "of largest L-inf norm"),
        (mp.masks.structured(0.5, norm=0.5), "of largest L0.5 norm"),
        (mp.masks.structured(0.5, norm="fro"), "of largest Frobenius norm"),
        (mp.masks.structured(0.5, norm="nuc"), "of largest nuclear norm"),
        (mp.masks.n_m(1, 8), "1:8 (the 1 largest |w| of every 8 along the last dim)"),
    ],
)
def test_structured_and_n_m_describe_what_they_select(generator, words):
    assert words in generator.describe()
    holder = _Holder(torch.randn(4, 2, 8))  # 3-d: the nuclear norm of a slice is defined
    assert words in str(mp.summary(mp.apply_mask(holder, {"weight": mp.Freeze(generator)})))


# from the no-silent-failure attack on 0.1 (item 8, a guard)
@pytest.mark.parametrize("shape", [(4, 4), (64,), (300, 300)], ids=str)
def test_magnitude_mask_on_ties_is_deterministic_and_matches_prune(shape):
    """Guard (passes on 0.1): LayerNorm gains are all 1.0; the tie-break must be reproducible."""
    ones = torch.ones(shape)
    first = mp.masks.magnitude(0.5)(ones)
    assert torch.equal(first, mp.masks.magnitude(0.5)(ones.clone()))
    holder = nn.Module()
    holder.weight = nn.Parameter(torch.ones(shape))
    prune.l1_unstructured(holder, "weight", amount=0.5)
    assert torch.equal(first, holder.weight_mask.bool())


# from the attack on the pruning toolkit
def test_n_m_on_a_tensor_whose_last_dim_does_not_divide_is_refused_unchanged():
    """n_m(2, 4) on a Linear(6, 3): a MaskparamError naming the tensor, the model unchanged."""
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 6), nn.Linear(6, 3))
    before = snapshot_with_summary(model)
    with pytest.raises(mp.MaskparamError, match=r"2\.weight"):
        mp.apply_mask(model, {"*.weight": mp.Mask(mp.masks.n_m(2, 4))})
    assert same_snapshot_with_summary(before, snapshot_with_summary(model))


def _pruned_twice_by_torch(weight: Tensor, first: int, more: int) -> Tensor:
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    with torch.no_grad():
        layer.weight.copy_(weight)
    prune.l1_unstructured(layer, "weight", amount=first)
    prune.l1_unstructured(layer, "weight", amount=more)
    return layer.weight_mask.bool()


def _pruned_twice_by_maskparam(weight: Tensor, first: int, more: int) -> Tensor:
    n = weight.numel()
    kept = mp.masks.magnitude(first / n)(weight)
    current = torch.where(kept, weight, 0.0)  # what update_masks shows the generator
    return mp.masks.magnitude((first + more) / n).rebuild(current, kept, "weight")


def test_magnitude_of_a_pruned_tensor_keeps_what_prune_keeps_when_it_prunes_again():
    """[[0, 0, 2, 2]], amount 1 then 2: prune ranks the kept entries alone (the kept 0 and
    one 2 go); equal magnitudes break as its topk breaks them."""
    weight = torch.tensor([[0.0, 0.0, 2.0, 2.0]])
    expected = _pruned_twice_by_torch(weight, 1, 2)
    assert torch.equal(expected, torch.tensor([[False, False, False, True]]))
    assert torch.equal(_pruned_twice_by_maskparam(weight, 1, 2), expected)


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 9), st.integers(1, 9), st.integers(0, 2**31 - 1), st.data())
def test_magnitude_of_a_pruned_tensor_equals_prune_applied_twice(rows, cols, seed, data):
    generator = torch.Generator().manual_seed(seed)
    if data.draw(st.booleans()):  # many equal magnitudes, kept zeros among them
        weight = torch.randint(-2, 3, (rows, cols), generator=generator).float()
    else:
        weight = torch.randn(rows, cols, generator=generator)
    n = rows * cols
    first = data.draw(st.integers(0, n))
    more = data.draw(st.integers(0, n - first))
    expected = _pruned_twice_by_torch(weight, first, more)
    assert torch.equal(_pruned_twice_by_maskparam(weight, first, more), expected)


def test_magnitude_of_a_pruned_tensor_at_a_lower_sparsity_regrows_only_pruned_entries():
    weight = torch.tensor([[0.0, 0.5, 2.0, 3.0, 0.1, 0.2]])
    kept = torch.tensor([[True, False, True, True, False, False]])  # a kept exact zero
    current = torch.where(kept, weight, 0.0)
    grown = mp.masks.magnitude(2 / 6).rebuild(current, kept, "w")
    assert int(grown.sum()) == 4
    assert bool((grown | ~kept).all())  # every kept entry stays, the kept zero included


def test_generators_that_do_not_rank_ignore_the_mask_before():
    weight = torch.randn(4, 4)
    kept = torch.rand(4, 4) > 0.5
    for generator in (mp.masks.random(0.5, seed=1), mp.masks.rows([1]), mp.masks.n_m(2, 4)):
        assert torch.equal(generator.rebuild(weight, kept, "w"), generator.build(weight, "w"))


@pytest.mark.parametrize("integer_valued", [False, True])
def test_magnitude_of_a_large_pruned_tensor_equals_prune_applied_twice(integer_valued):
    generator = torch.Generator().manual_seed(3)
    weight = torch.randn(300, 300, generator=generator)  # the radix path's size
    if integer_valued:
        weight = weight.mul(2).round()
    expected = _pruned_twice_by_torch(weight, 30000, 25000)
    assert torch.equal(_pruned_twice_by_maskparam(weight, 30000, 25000), expected)


def test_update_masks_to_a_higher_sparsity_keeps_what_prune_keeps_when_it_prunes_again():
    layer = nn.Linear(4, 1, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[0.0, 0.0, 2.0, 2.0]]))
    mp.apply_mask(layer, {"weight": mp.Mask(mp.masks.magnitude(0.25), layout="dense")})
    mp.update_masks(layer, {"weight": mp.masks.magnitude(0.75)}, optimizer=None)
    expected = _pruned_twice_by_torch(torch.tensor([[0.0, 0.0, 2.0, 2.0]]), 1, 2)
    assert torch.equal(mp.kept_entries(layer, "weight").expand(1, 4).bool(), expected)
