"""Regression tests for the defects found by attacking maskparam 0.1: no silent failure.

Each test asserts the CORRECT behaviour, so it fails on 0.1 and passes once the defect is fixed.
Where the right fix is either "make it work exactly" or "refuse with mp.MaskparamError", the test
accepts both (``outcome_is_exact_or_refused``: a refusal must leave the model bit-identical).
Parametrized cases that pass on 0.1 are guards: they pin what already works (noted below).
Only the public API is used (``mp.*``), plus plain torch.

Status on 0.1 (155 of 253 cases fail, 98 pass):

Silent wrong results
 1. fp16 + adaptive optimizers -> NaN. fails on 0.1: yes, fp16 Mask / Freeze(mask) / hard
    LearnableMask (found by helper) with all 6 optimizers: weight all NaN (0/0 at masked
    entries, NaN * 0). Guards pass: Triangular, Freeze(dim), compact, and every bf16 case.
 2. inf * 0 = NaN at a masked entry. fails on 0.1: yes, Mask, Freeze(mask) and hard
    LearnableMask (helper) give NaN for inf/-inf/nan originals. Guards pass: Triangular,
    Freeze(dim).
 3. Plain checkpoint / `module.weight = w` into a stack. fails on 0.1: yes, 36 of 54: every
    stack where a Freeze follows another constraint (4 of the 6 orders of the issue's triple)
    takes its frozen values from the raw value; Freeze(mask) after Triangular/Mask (helper)
    too. Guards pass: stacks with the Freeze first, or none.
    Found by helper: `module.weight = nn.Parameter(w)` raises torch's KeyError ("attribute
    'weight' already exists") though the README says assigning works: fails on 0.1: yes.
 4. EMA with buffers. fails on 0.1: yes, AveragedModel(use_buffers=True, EMA 0.9) truncates
    int64 indices (3 -> 2): Freeze(dim) writes frozen values into free row 2, compact layouts
    scatter to wrong places; timm ModelEmaV2-style (all state_dict tensors) breaks Freeze(dim).
    Guards pass: timm-style over floating tensors only, compact under timm-style. Note: a
    float-only EMA still rounds frozen values (v*d + (1-d)*v != v, off by ulps), so the timm
    tests compare frozen rows to 1e-6, not bitwise. Found by helper: the EMA also turns a
    Subspace seed buffer 3 into 2, so the averaged checkpoint is refused by its own rules.
 5. harden on a tied LearnableMask. fails on 0.1: yes, with sparsity/threshold the tie splits
    (emb.weight != head.weight); with the default the scores stay in the model (the head's
    slot keeps its LearnedMask).
 6. Half-applied loads. fails on 0.1: yes, all 3: mp.load_state_dict of a compact checkpoint
    of another density changes biases and the `free` mask before raising (torch's own loader
    too: the effective weight changes); strict=True with a missing key changes 4 tensors
    before raising.
 7. Foreign and corrupt checkpoints. fails on 0.1: yes, all 24: a Subspace checkpoint of
    another projection loads silently (mp and torch loaders); mask entries 2/255 scale the
    weight, a float 0.7 mask zeroes it, a duplicated frozen index unfreezes a row. Found by
    helper: an out-of-range frozen index loads silently and every forward then raises
    IndexError; a Freeze(mask) keep entry of 2 scales the free entry.
 8. Wildcards. fails on 0.1: yes, "*" parametrizes a non-persistent RoPE buffer and a
    requires_grad=False parameter; "*.weight" masks the frozen sinusoidal table. Guard passes:
    magnitude masks of all-equal values are deterministic and equal prune.l1_unstructured
    (ties are not the problem). Not tested: "*.weight" missing MHA's in_proj_weight (design).
 9. One Parameter, two names in one module. fails on 0.1: yes, the other name stays
    unconstrained, whichever name the rule uses.
10. dtype changed after apply. fails on 0.1: yes, gaussian after .double() reloads its own
    checkpoint 7.7e-8 off; sparse/fastfood after .half()/.double() crash in every forward after
    any load_state_dict (the basis is regenerated in the apply-time dtype). Guard passes:
    gaussian after .half().
11. Optimizer state order. fails on 0.1: yes, both directions: a Linear gets a RuntimeError at
    the next step; two same-shaped parameters of one module silently swap their Adam moments.
12. Frozen -0.0. fails on 0.1: yes, Freeze(mask) under SGD and SGD(momentum, weight decay)
    (v + x*0 with x = +0.0). Guards pass: Adam/AdamW (they keep x = -0.0), Freeze(dim),
    compact.
13. Learnable masks: fails on 0.1: yes, harden of a soft mask drops the scale of the kept
    entries (sigmoid(s/T), between 0.5 and 1) without saying how to fold it; AveragedModel over a hard
    LearnableMask averages scores, not effective weights (mean of W and 0 comes out as 0).

Crashes and unhelpful errors (all fail on 0.1: yes)
 - Optimizer guard false positives: a new optimizer after baking a Subspace (old one alive),
   theta and the rest in separate optimizers, an optimizer after a rolled-back apply while the
   exception lives: each refused with "would train nothing".
 - Compact bake with a compact-shaped .grad: the grad stays (6,) on a (3, 4) weight; the next
   backward, the new optimizer's and the old optimizer's steps raise size mismatches.
 - Memory: Fastfood d=20000 over 1M entries tries 5.2 GB (an identity for the column norms),
   sparse d=1e5 800 MB at once (~5.9 GB peak). The test caps this process's address space at
   +512 MB (RLIMIT_AS), so on 0.1 torch's allocator fails at once instead of allocating.
 - nn.Embedding(sparse=True): Freeze(dim), compact, Subspace, Triangular apply, then crash at
   backward (Freeze(mask), Mask and LearnableMask do work).
 - Meta device: gaussian/fastfood + load_state_dict(assign=True) raise "not on the expected
   device meta"; sparse fails at apply (SparseMeta addmm). Found by helper: Fastfood applied
   under `with torch.device("meta")` (the README's order) raises "Tensor.item() cannot be
   called on meta tensors".
 - Python errors instead of MaskparamError: 0-d tensor + Freeze(dim=0, index=0) (and
   Mask(masks.rows) on it) ZeroDivisionError; index=1.5, dim=0.0, Triangular(diagonal=0.5)
   TypeError; Subspace seed 2**44 ValueError (overflow); {"weight": None} TypeError; mixed-dtype
   Subspace group RuntimeError; a raising mask callable ZeroDivisionError. Accepted silently:
   NaN/inf basis, LearnableMask(temperature=inf), init=nan; found by helper: init=inf (every
   weight NaN). Silently reinterpreted: masks.random(True), Freeze(dim=True), Triangular(
   lower="no"); found by helper: masks.magnitude(True), Subspace(seed=True) (accepted), and
   masks.random(0.5, seed=True) (accepted, then torch's RuntimeError at apply).
 - Found by helper: a raising selector predicate gives a bare ZeroDivisionError; a weight tied
   to an RNN weight is not refused, and the RNN then silently runs on stale weights
   (_flat_weights keeps the apply-time value; copy.deepcopy of the model fails). Since RNN
   weights are constrained for real, the tied case constrains the RNN too.

Scale (measured only, no timed test): N parameters of shape (2, 2) registered on one module,
one exact-name rule each, this machine (2 shared cores):
    N = 250:  apply 0.27 s, remove_parametrizations 0.04 s   (one "p*" glob: apply 0.03 s)
    N = 500:  apply 0.70 s, remove_parametrizations 0.20 s   (one glob: 0.07 s)
    N = 1000: apply 2.8-3.6 s, remove_parametrizations 1.5-1.9 s   (one glob: 0.3-0.4 s)
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Callable

import pytest
import torch
from helpers import (
    assert_state_unchanged,
    outcome_is_exact_or_refused,
    refusal_of,
    square_sum_steps,
    state_of,
    subspace_linear,
    zeros_like_selected,
)
from torch import Tensor, nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

import maskparam as mp

# ---------------------------------------------------------------------------------------------
# Item 3: stacks and loading: a plain checkpoint (or `module.weight = w`) into a stack
# ---------------------------------------------------------------------------------------------

# Mask: column 0 and row 4 masked (row 4 crosses the frozen column 3 below the diagonal).
# Freeze(mask) (found by helper): a few entries, two of them in the upper triangle, one in the
# masked row.
MASK6 = torch.ones(6, 6, dtype=torch.bool)
MASK6[:, 0] = False
MASK6[4, :] = False
FROZEN6 = torch.zeros(6, 6, dtype=torch.bool)
FROZEN6[0, 4] = FROZEN6[1, 1] = FROZEN6[4, 2] = FROZEN6[2, 5] = True

STACK_POOL: dict[str, Callable[[], mp.Spec]] = {
    "tri": mp.Triangular,
    "freeze_col3": lambda: mp.Freeze(dim=1, index=[3]),
    "mask": lambda: mp.Mask(MASK6, layout="dense"),
    "freeze_mask": lambda: mp.Freeze(FROZEN6, layout="dense"),
}
STACKS = [
    order
    for size in (2, 3)
    for order in itertools.permutations(STACK_POOL, size)
    # The three of the issue, plus (found by helper) Freeze(mask) after Triangular or Mask.
    if "freeze_mask" not in order or order.index("freeze_mask") > 0
]


def _stack_constraints_hold(layer: nn.Linear, order: tuple[str, ...]) -> None:
    weight = layer.weight.detach()
    if "tri" in order:
        assert torch.equal(weight.triu(1), torch.zeros(6, 6)), "upper triangle not zero"
    if "mask" in order:
        assert torch.equal(weight[~MASK6], zeros_like_selected(weight, ~MASK6)), "masked != 0"


@pytest.mark.parametrize("how", ["mp_load_state_dict", "assign_tensor"])
@pytest.mark.parametrize("order", STACKS, ids="+".join)
def test_item03_plain_checkpoint_into_stack_keeps_every_constraint(order, how):
    def build(state: dict[str, Tensor] | None = None) -> nn.Linear:
        layer = nn.Linear(6, 6)
        if state is not None:
            layer.load_state_dict(state)
        return mp.apply_mask(layer, {"weight": [STACK_POOL[name]() for name in order]})

    plain = nn.Linear(6, 6).state_dict()
    layer = build()
    if how == "mp_load_state_dict":
        mp.load_state_dict(layer, plain)
    else:
        with torch.no_grad():
            layer.weight = plain["weight"].clone()
    # As documented: as if the rules had been applied to a model holding the plain weights.
    reference = build(plain)
    assert torch.equal(layer.weight, reference.weight)
    _stack_constraints_hold(layer, order)
    frozen_col = layer.weight.detach()[:, 3].clone()
    square_sum_steps(layer, torch.optim.SGD(layer.parameters(), lr=0.1), torch.randn(4, 6))
    _stack_constraints_hold(layer, order)
    if "freeze_col3" in order and order.index("freeze_col3") == len(order) - 1:
        assert torch.equal(layer.weight.detach()[:, 3], frozen_col)


# ---------------------------------------------------------------------------------------------
# Item 4: EMA over buffers averages maskparam's integer index buffers
# ---------------------------------------------------------------------------------------------

EMA_DECAY = 0.9
FROZEN_ROWS = [3, 5]  # 3 * 0.9 + 3 * 0.1 truncates to 2 in float32
FREE_ROWS = [0, 1, 2, 4]
EMA_SPECS: dict[str, Callable[[], mp.Spec]] = {
    "freeze_dim": lambda: mp.Freeze(dim=0, index=FROZEN_ROWS),
    "freeze_rows_compact": lambda: mp.Freeze(mp.masks.rows(FROZEN_ROWS), layout="compact"),
    "mask_rows_compact": lambda: mp.Mask(mp.masks.rows(FREE_ROWS), layout="compact"),
}


def _ema_model(kind: str) -> tuple[nn.Linear, Tensor]:
    model = mp.apply_mask(nn.Linear(6, 6), {"weight": EMA_SPECS[kind]()})
    return model, model.weight.detach()[FROZEN_ROWS].clone()  # frozen values, or zeros


@pytest.mark.parametrize("kind", list(EMA_SPECS))
def test_item04_ema_with_buffers_keeps_constraints(kind):
    model, constant_rows = _ema_model(kind)
    averaged = AveragedModel(model, use_buffers=True, multi_avg_fn=get_ema_multi_avg_fn(EMA_DECAY))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(8, 6)
    expected = None  # the EMA of the model's effective weight, as AveragedModel computes it
    for _ in range(3):
        square_sum_steps(model, optimizer, x, steps=1)
        averaged.update_parameters(model)
        weight = model.weight.detach()
        expected = weight.clone() if expected is None else expected.lerp(weight, 1 - EMA_DECAY)
    result = averaged.module.weight.detach()
    assert torch.equal(result[FROZEN_ROWS], constant_rows)
    assert torch.equal(result[FREE_ROWS], expected[FREE_ROWS])


@pytest.mark.parametrize("which", ["all_tensors", "floating_only"])
@pytest.mark.parametrize("kind", list(EMA_SPECS))
def test_item04_timm_style_ema_over_state_dict_keeps_constraints(kind, which):
    """timm's ModelEmaV2 updates every state_dict entry (`ema * d + (1 - d) * model`), integer
    ones included; ModelEmaV3 only floating ones. Frozen values are floats that the user's
    arithmetic rounds (v * d + (1 - d) * v != v), so they are compared to 1e-6 here."""
    model, constant_rows = _ema_model(kind)
    ema = copy.deepcopy(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(8, 6)
    expected = model.weight.detach().clone()
    for _ in range(3):
        square_sum_steps(model, optimizer, x, steps=1)
        with torch.no_grad():
            model_state = model.state_dict()
            for key, value in ema.state_dict().items():
                if which == "all_tensors" or value.is_floating_point():
                    value.copy_(value * EMA_DECAY + (1 - EMA_DECAY) * model_state[key])
            expected = expected * EMA_DECAY + (1 - EMA_DECAY) * model.weight
    result = ema.weight.detach()
    assert torch.allclose(result[FROZEN_ROWS], constant_rows, rtol=1e-6, atol=0)
    assert torch.equal(result[FREE_ROWS], expected[FREE_ROWS])


def test_helper02_ema_with_buffers_keeps_subspace_checkpoint_loadable():
    """Found by helper: AveragedModel(use_buffers=True) with EMA 0.9 turns the int64 seed buffer
    3 into 2, so the averaged model's checkpoint is refused by a model built with seed=3."""
    model = mp.apply_mask(nn.Linear(4, 3), {"weight": mp.Subspace(2, seed=3)})
    averaged = AveragedModel(model, use_buffers=True, multi_avg_fn=get_ema_multi_avg_fn(EMA_DECAY))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(2):
        square_sum_steps(model, optimizer, torch.randn(4, 4), steps=1)
        averaged.update_parameters(model)
    fresh = mp.apply_mask(nn.Linear(4, 3), {"weight": mp.Subspace(2, seed=3)})
    fresh.load_state_dict(averaged.module.state_dict())
    x = torch.randn(5, 4)
    assert torch.equal(fresh(x), averaged.module(x))


# ---------------------------------------------------------------------------------------------
# Item 6: half-applied loads
# ---------------------------------------------------------------------------------------------


def _compact_net(density: float) -> nn.Sequential:
    model = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 2))
    return mp.apply_mask(model, {
        "0.weight": mp.Mask(mp.masks.random(density), layout="compact"),
        "2.weight": mp.Mask(mp.masks.random(0.5)),
    })  # fmt: skip


@pytest.mark.parametrize("loader", ["mp", "torch"])
def test_item06_a_compact_checkpoint_of_another_density_loads_its_mask_and_entries(loader):
    """(Was refused until update_masks: a pruning run's checkpoint has another density.) The
    stored Parameter keeps its identity and takes the checkpoint's size; outputs equal the
    saved model's."""
    source = _compact_net(0.5)
    checkpoint = source.state_dict()
    model = _compact_net(0.75)
    stored = model[0].parametrizations.weight.original
    x = torch.randn(3, 4)
    if loader == "mp":
        mp.load_state_dict(model, checkpoint)
    else:
        model.load_state_dict(checkpoint)
    assert model[0].parametrizations.weight.original is stored
    assert stored.numel() == 8
    assert torch.equal(model(x), source(x))
    assert mp.verify(model) == []


@pytest.mark.parametrize("loader", ["mp", "torch"])
def test_item06_compact_entries_that_do_not_fit_their_mask_are_refused_atomically(loader):
    checkpoint = _compact_net(0.5).state_dict()
    checkpoint["0.parametrizations.weight.original"] = checkpoint[
        "0.parametrizations.weight.original"
    ][:-1]
    model = _compact_net(0.75)
    before = state_of(model)
    x = torch.randn(3, 4)
    output = model(x).detach()
    load = mp.load_state_dict if loader == "mp" else type(model).load_state_dict
    with pytest.raises(mp.MaskparamError, match="another shape"):
        load(model, checkpoint)
    assert_state_unchanged(model, before)
    assert torch.equal(model(x), output)


def test_item06_mp_load_strict_missing_key_is_atomic():
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    mp.apply_mask(model, {"0.weight": mp.Triangular(), "1.weight": mp.Freeze(dim=0, index=[0])})
    plain = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2)).state_dict()
    del plain["1.bias"]
    before = state_of(model)
    with pytest.raises(mp.MaskparamError, match=r"1\.bias"):
        mp.load_state_dict(model, plain, strict=True)
    assert_state_unchanged(model, before)


# ---------------------------------------------------------------------------------------------
# Item 7: foreign and corrupt checkpoints
# ---------------------------------------------------------------------------------------------

PROJECTIONS = ["gaussian", "sparse", "fastfood"]


@pytest.mark.parametrize("loader", ["mp", "torch"])
@pytest.mark.parametrize(
    ("saved", "loaded"),
    [(a, b) for a in PROJECTIONS for b in PROJECTIONS if a != b],
    ids=lambda p: p,
)
def test_item07_subspace_checkpoint_of_other_projection_is_refused(saved, loaded, loader):
    source = subspace_linear(saved)
    model = subspace_linear(loaded)
    checkpoint = source.state_dict()
    x = torch.randn(5, 4)

    def load() -> None:
        if loader == "mp":
            mp.load_state_dict(model, checkpoint)
        else:
            model.load_state_dict(checkpoint)

    def check() -> None:  # loading "exactly" would mean computing what the source computes
        assert torch.equal(model(x), source(x))

    if loader == "mp":
        outcome_is_exact_or_refused(load, check, model)
    elif refusal_of(load) is None:  # torch's loader may copy other keys before it refuses
        check()


def _mask_linear() -> nn.Linear:
    return mp.apply_mask(nn.Linear(4, 3), {"weight": mp.Mask(mp.masks.random(0.5), layout="dense")})


def _freeze_rows_linear() -> nn.Linear:
    return mp.apply_mask(nn.Linear(4, 3), {"weight": mp.Freeze(dim=0, index=[0, 2])})


def _freeze_mask_linear() -> nn.Linear:
    return mp.apply_mask(
        nn.Linear(4, 3), {"weight": mp.Freeze(mp.masks.random(0.5), layout="dense")}
    )


def _first_entry(value: float) -> Callable[[Tensor], Tensor]:
    def corrupt(t: Tensor) -> Tensor:
        t = t.clone()
        t.view(-1)[0] = value
        return t

    return corrupt


CORRUPT = {
    "mask_entry_2": (_mask_linear, "0.mask", _first_entry(2)),
    "mask_entry_255": (_mask_linear, "0.mask", _first_entry(255)),
    "float_mask_0.7": (_mask_linear, "0.mask", lambda t: torch.full(t.shape, 0.7)),
    "duplicate_frozen_index": (_freeze_rows_linear, "0.index", lambda t: torch.tensor([0, 0])),
    # found by helper: loads silently, then every forward raises IndexError
    "frozen_index_out_of_range": (_freeze_rows_linear, "0.index", lambda t: torch.tensor([0, 7])),
    # found by helper: Freeze(mask)'s keep mask, like Mask's, scales the free entry by 2
    "keep_entry_2": (_freeze_mask_linear, "0.keep", _first_entry(2)),
}


@pytest.mark.parametrize("loader", ["mp", "torch"])
@pytest.mark.parametrize("case", list(CORRUPT))
def test_item07_corrupt_constraint_buffers_are_refused(case, loader):
    build, key, corrupt = CORRUPT[case]
    key = f"parametrizations.weight.{key}"
    checkpoint = build().state_dict()
    checkpoint[key] = corrupt(checkpoint[key])
    model = build()
    before = state_of(model)
    constraint_before = model.state_dict()[key].clone()
    load = mp.load_state_dict if loader == "mp" else type(model).load_state_dict
    with pytest.raises(mp.MaskparamError, match="weight"):
        load(model, checkpoint)
    if loader == "mp":
        assert_state_unchanged(model, before)
    else:  # torch's loader copies keys before the failing one: the constraint must be intact
        assert torch.equal(model.state_dict()[key], constraint_before)
        model(torch.randn(2, 4))


# ---------------------------------------------------------------------------------------------
# Item 11: optimizer state saved under one parameter order, loaded under another
# ---------------------------------------------------------------------------------------------


class TwoMatrices(nn.Module):
    """Two parameters of one shape in one module: a swapped optimizer state goes unnoticed."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Parameter(torch.randn(4, 4))
        self.b = nn.Parameter(torch.randn(4, 4))

    def forward(self, x: Tensor) -> Tensor:
        return x @ self.a @ self.b


def _model_and_tensor_name(kind: str) -> tuple[nn.Module, str]:
    """The model and the name of the tensor to constrain (it is registered first)."""
    return (nn.Linear(4, 3), "weight") if kind == "linear" else (TwoMatrices(), "a")


def _adam_state_by_parameter(optimizer: torch.optim.Optimizer) -> dict[int, Tensor]:
    return {id(p): s["exp_avg"].clone() for p, s in optimizer.state.items()}


def _load_then_step_matches_or_refuses(
    model: nn.Module, saved: dict[str, object], expected: dict[int, Tensor]
) -> None:
    # The safe path (torch's optimizer.load_state_dict maps by position, which apply and bake
    # change: documented in the README): optimizer states keyed by tensor name.
    optimizer = torch.optim.Adam(model.parameters())
    try:
        mp.load_optimizer_state_dict(optimizer, model, saved)
        matches = all(
            id(p) in expected and torch.equal(optimizer.state[p]["exp_avg"], expected[id(p)])
            for p in model.parameters()
        )
        square_sum_steps(model, optimizer, torch.randn(2, 4), steps=1)
    except mp.MaskparamError:
        return  # a clear refusal
    assert matches, "a parameter received another parameter's optimizer state"


@pytest.mark.parametrize("kind", ["linear", "two_matrices"])
def test_item11_optimizer_state_saved_constrained_loaded_after_bake(kind):
    model, name = _model_and_tensor_name(kind)
    mp.apply_mask(model, {name: mp.Triangular(layout="dense")})
    optimizer = torch.optim.Adam(model.parameters())
    square_sum_steps(model, optimizer, torch.randn(2, 4), steps=1)
    saved, expected = mp.optimizer_state_dict(optimizer, model), _adam_state_by_parameter(optimizer)
    mp.remove_parametrizations(model)  # the baked tensor is the same Parameter object
    _load_then_step_matches_or_refuses(model, saved, expected)


@pytest.mark.parametrize("kind", ["linear", "two_matrices"])
def test_item11_optimizer_state_saved_plain_loaded_after_apply(kind):
    model, name = _model_and_tensor_name(kind)
    optimizer = torch.optim.Adam(model.parameters())
    square_sum_steps(model, optimizer, torch.randn(2, 4), steps=1)
    saved, expected = mp.optimizer_state_dict(optimizer, model), _adam_state_by_parameter(optimizer)
    # dense: state of the same shape, mapped by name (the compact layout's relayout of the
    # state is tested in tests/workflows/test_optimizers.py)
    mp.apply_mask(model, {name: mp.Triangular(layout="dense")})  # keeps the Parameter object
    _load_then_step_matches_or_refuses(model, saved, expected)


def test_item13_swa_over_learnable_mask_averages_effective_weights_or_refuses():
    layer = mp.apply_mask(nn.Linear(4, 3), {"weight": mp.LearnableMask()})
    scores = layer.parametrizations.weight[0].scores
    effective = []

    def average() -> AveragedModel:
        averaged = AveragedModel(layer)
        for value in (0.5, -1.5):  # the hard mask keeps everything, then nothing
            with torch.no_grad():
                scores.fill_(value)
            effective.append(layer.weight.detach().clone())
            averaged.update_parameters(layer)
        return averaged

    averaged: list[AveragedModel] = []
    if refusal_of(lambda: averaged.append(average())) is None:
        mean = (effective[0] + effective[1]) / 2
        assert torch.allclose(averaged[0].module.weight, mean, rtol=1e-6, atol=0)


# ---------------------------------------------------------------------------------------------
# Crashes: nn.Embedding(sparse=True) and the meta device
# ---------------------------------------------------------------------------------------------

SPARSE_GRAD_SPECS: dict[str, Callable[[], mp.Spec]] = {
    "freeze_dim": lambda: mp.Freeze(dim=0, index=[1]),
    "mask_compact": lambda: mp.Mask(mp.masks.random(0.5), layout="compact"),
    "subspace": lambda: mp.Subspace(3),
    "triangular": mp.Triangular,
}


@pytest.mark.parametrize("kind", list(SPARSE_GRAD_SPECS))
def test_crash06_sparse_gradient_embedding_is_refused_at_apply(kind):
    embedding = nn.Embedding(6, 4, sparse=True)
    before = state_of(embedding)
    with pytest.raises(mp.MaskparamError, match="'weight'"):
        mp.apply_mask(embedding, {"weight": SPARSE_GRAD_SPECS[kind]()})
    assert_state_unchanged(embedding, before)


@pytest.mark.parametrize("projection", ["gaussian", "fastfood"])
def test_crash07_meta_subspace_load_with_assign_works_or_refuses(projection):
    source = subspace_linear(projection)
    model = nn.Linear(4, 3, device="meta")
    mp.apply_mask(model, {"weight": mp.Subspace(3, projection=projection)})
    x = torch.randn(2, 4)

    def load_and_run() -> None:
        model.load_state_dict(source.state_dict(), assign=True)
        assert torch.equal(model(x), source(x))

    refusal = refusal_of(load_and_run)
    assert refusal is None or "'weight'" in str(refusal)


def _loads_to_the_same_outputs(model: nn.Module, source: nn.Module) -> None:
    """A model built on meta, once materialised and loaded, computes what ``source`` computes."""
    model.to_empty(device="cpu")
    model.load_state_dict(source.state_dict())
    x = torch.randn(2, 4)
    assert torch.equal(model(x), source(x))


def test_crash07_meta_sparse_subspace_applies_or_refuses():
    source = subspace_linear("sparse")
    model = nn.Linear(4, 3, device="meta")
    refusal = refusal_of(
        lambda: mp.apply_mask(model, {"weight": mp.Subspace(3, projection="sparse")})
    )
    if refusal is not None:
        assert "'weight'" in str(refusal)
        return
    _loads_to_the_same_outputs(model, source)


def test_helper03_fastfood_applied_under_meta_device_context_works_or_refuses():
    """Found by helper: the README's order ("apply under torch.device('meta')") crashes for
    Fastfood with "Tensor.item() cannot be called on meta tensors" (its seeded buffers are
    drawn under the meta default device)."""
    source = subspace_linear("fastfood")
    with torch.device("meta"):
        model = nn.Linear(4, 3)
        refusal = refusal_of(
            lambda: mp.apply_mask(model, {"weight": mp.Subspace(3, projection="fastfood")})
        )
    if refusal is not None:
        assert "'weight'" in str(refusal)
        return
    _loads_to_the_same_outputs(model, source)


# ---------------------------------------------------------------------------------------------
# Found by helper: a weight tied to an RNN weight slipped past the (former) RNN refusal
# ---------------------------------------------------------------------------------------------


class TiedToRNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 12, bias=False)
        self.rnn = nn.RNN(3, 12)
        self.rnn.weight_ih_l0 = self.lin.weight


def test_helper05_weight_tied_to_an_rnn_weight_constrains_the_rnn_too():
    """On 0.1 the RNN's _flat_weights kept the value computed at apply time (pytorch issue
    65688): after training, the RNN silently used stale weights, and copy.deepcopy of the model
    failed. Now the RNN computes with the tied, constrained tensor in every forward."""
    model = TiedToRNN()
    mp.apply_mask(model, {"lin.weight": mp.Mask(mp.masks.random(0.5))})
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    x = torch.randn(4, 2, 3)
    for _ in range(3):
        optimizer.zero_grad()
        (model.rnn(x)[0].sum() + model.lin(x).sum()).backward()
        optimizer.step()
    assert mp.verify(model) == []
    twin = nn.RNN(3, 12)
    with torch.no_grad():
        for name in twin._flat_weights_names:
            getattr(twin, name).copy_(getattr(model.rnn, name))
    assert torch.equal(twin.weight_ih_l0, model.lin.weight)
    assert torch.equal(model.rnn(x)[0], twin(x)[0])
    copied = copy.deepcopy(model)
    assert torch.equal(copied.rnn(x)[0], twin(x)[0])
