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
from collections.abc import Callable

import pytest
import torch
from helpers import assert_state_unchanged, refusal_of, square_sum_steps, state_of, subspace_linear
from torch import Tensor, nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

import maskparam as mp

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
