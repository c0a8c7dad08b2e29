"""The matrix: every constraint (each layout, a few stacks) through every workflow.

One assertion decides every cell: ``mp.verify(model) == []``, each constraint's invariant checked
exactly on the tensors the model computes with (masked entries zero, frozen entries bit-identical,
the triangle exact, subspace members equal θ₀ + E·θ). There are no per-kind branches: a cell that
needs one is a sign that a constraint's invariant is missing something.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import pytest
import torch
from block_mask import BlockMask, block_magnitude
from helpers import mlp
from torch import Tensor, nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch_optimizers import OPTIMIZERS, uncovered

import maskparam as mp

# --- the constraints ----------------------------------------------------------------------------
# Each case maps the two weights of a small MLP to its spec(s); both weights are 6 x 6 so that a
# stack with Triangular fits every spec.
Rules = dict[str, Any]


def _random(density: float, seed: int) -> mp.masks.MaskGenerator:
    return mp.masks.random(density, seed=seed)


CASES: dict[str, Callable[[], Rules]] = {
    "mask": lambda: {"*.weight": mp.Mask(_random(0.5, 1))},
    "mask-dense": lambda: {"*.weight": mp.Mask(_random(0.5, 1), layout="dense")},
    "mask-rows": lambda: {"*.weight": mp.Mask(mp.masks.rows([1, 4]))},
    "mask-csr": lambda: {"*.weight": mp.Mask(_random(0.5, 1), layout="csr")},
    # Whole hidden neurons (a row, its bias, the next column): every tensor of the MLP.
    "mask-channels": lambda dtype=torch.float32: {
        "*": mp.Mask(mp.masks.channels(0.5, example_inputs=torch.ones(2, 6, dtype=dtype)))
    },
    "mask-structured-compact": lambda: {
        "*.weight": mp.Mask(mp.masks.structured(0.5, dim=1), layout="compact")
    },
    "freeze-n_m": lambda: {"*.weight": mp.Freeze(mp.masks.n_m(1, 3))},
    "freeze": lambda: {"*.weight": mp.Freeze(_random(0.5, 2))},
    "freeze-dense": lambda: {"*.weight": mp.Freeze(_random(0.5, 2), layout="dense")},
    "freeze-slices": lambda: {"*.weight": mp.Freeze(dim=0, index=[0, 2])},
    "triangular": lambda: {"*.weight": mp.Triangular()},
    "triangular-dense": lambda: {"*.weight": mp.Triangular(layout="dense")},
    "triangular-compact": lambda: {"*.weight": mp.Triangular(diagonal=-1, layout="compact")},
    "subspace-gaussian": lambda: {"*.weight": mp.Subspace(5)},
    "subspace-sparse": lambda: {"*.weight": mp.Subspace(5, projection="sparse")},
    "subspace-fastfood-group": lambda: {
        "*.weight": mp.Subspace(5, projection="fastfood", group="all")
    },
    "learnable-hard": lambda: {"*.weight": mp.LearnableMask()},
    "learnable-soft": lambda: {"*.weight": mp.LearnableMask("soft")},
    "stack-triangular-freeze": lambda: {"*.weight": [mp.Triangular(), mp.Freeze(dim=1, index=[3])]},
    "stack-freeze-triangular": lambda: {"*.weight": [mp.Freeze(dim=1, index=[3]), mp.Triangular()]},
    "stack-mask-freeze": lambda: {
        "*.weight": [mp.Mask(_random(0.6, 3)), mp.Freeze(_random(0.3, 4))]
    },
    # A constraint defined only in the tests (tests/block_mask.py): the extension point.
    "block-mask": lambda: {"*.weight": BlockMask(block_magnitude(0.5))},
    "stack-compact-mask-triangular": lambda: {
        "*.weight": [mp.Mask(_random(0.7, 5), layout="compact"), mp.Triangular()]
    },
}


def _constrained(case: str, dtype: torch.dtype = torch.float32, seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return mp.apply_mask(mlp(6, 6, 6, dtype=dtype), _rules(case, dtype))


TRACED = {"mask-channels"}


def _rules(case: str, dtype: torch.dtype = torch.float32) -> Rules:
    # A traced generator's example inputs take the model's dtype (the model must run on them).
    return CASES[case](dtype) if case in TRACED else CASES[case]()  # type: ignore[call-arg]


def _inputs(dtype: torch.dtype = torch.float32) -> Tensor:
    return torch.randn(16, 6, generator=torch.Generator().manual_seed(7)).to(dtype)


# Layouts whose module computes with a sparse product: the same function as the dense weight's,
# summed in another order (docs/sparse-training.md), so outputs agree to rounding, not bitwise.
SPARSE_PRODUCT = {"mask-csr"}


def _assert_same_outputs(case: str, got: Tensor, expected: Tensor) -> None:
    if case in SPARSE_PRODUCT:
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
    else:
        assert torch.equal(got, expected)


def _assert_holds(model: nn.Module) -> None:
    # Only the constraints' promises: an unconstrained fp16 bias may well turn NaN under Adam
    # (eps=1e-8 rounds to 0 in fp16), as it does without maskparam.
    assert mp.verify(model) == []


# --- optimizers x dtypes --------------------------------------------------------------------------


DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def test_every_torch_optimizer_is_in_the_matrix():
    assert not uncovered(), f"add to tests/torch_optimizers.py: {sorted(uncovered())}"


def _applicable(case: str, optimizer: str, dtype: str) -> str | None:
    """Why a cell cannot run (torch's own limits, not maskparam's), or None."""
    if optimizer == "Muon" and ("compact" in case or "csr" in case):
        return "Muon orthogonalizes matrices; a compact original is a vector"
    if "csr" in case and dtype in ("fp16", "bf16"):
        return "torch has no CPU CSR kernel for half precision (refused: tests/constraints)"
    return None


# The inner loop (-m "not slow") runs the cells that found bugs in 0.1; CI runs every cell.
CORE = {("AdamW", "fp32"), ("SGD-nesterov-wd", "fp32"), ("Adam", "fp16"), ("Adam", "bf16")}
CELLS = [
    pytest.param(o, d, marks=() if (o, d) in CORE else pytest.mark.slow, id=f"{o}-{d}")
    for o in OPTIMIZERS
    for d in DTYPES
]


@pytest.mark.parametrize(("optimizer", "dtype"), CELLS)
@pytest.mark.parametrize("case", list(CASES))
def test_training_keeps_the_invariant(case, optimizer, dtype, train):
    reason = _applicable(case, optimizer, dtype)
    if reason:
        pytest.skip(reason)
    model = _constrained(case, DTYPES[dtype])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    if optimizer == "Adafactor" and any(
        m.reshapes_original for m in model.modules() if isinstance(m, mp.Constraint)
    ):
        # It factors matrices: on a compact vector it would run another algorithm. maskparam
        # sees an optimizer only where it is passed, so the refusal comes there.
        torch.manual_seed(0)
        plain = mlp(6, 6, 6, dtype=DTYPES[dtype])
        with pytest.raises(mp.MaskparamError, match="layout='dense'"):
            mp.apply_mask(
                plain,
                _rules(case, DTYPES[dtype]),
                optimizer=OPTIMIZERS[optimizer](plain.parameters()),
            )
        assert mp.summary(plain).tensors == ()  # nothing was applied
        return
    train(model, _inputs(DTYPES[dtype]), steps=3, optimizer=OPTIMIZERS[optimizer])
    _assert_holds(model)
    # Something trained (the cell is not vacuous).
    after = model.state_dict()
    assert any(not torch.equal(after[k], v) for k, v in before.items() if v.is_floating_point())


# --- workflows ----------------------------------------------------------------------------------


def _trained(case: str, train: Callable[..., list[float]]) -> nn.Sequential:
    model = _constrained(case)
    train(model, _inputs(), steps=2)
    return model


# A learnable mask's scores do not average like the weights they mask: AveragedModel is refused
# until mp.harden has fixed the masks; then the averaged model is exact like the others.
AVERAGING_REFUSED = {"learnable-hard", "learnable-soft"}


def _ema(model: nn.Module, use_buffers: bool) -> AveragedModel:
    return AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.9), use_buffers=use_buffers)


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("use_buffers", [False, True], ids=["params", "params+buffers"])
@pytest.mark.parametrize("kind", ["swa", "ema"])
def test_averaged_model(case, kind, use_buffers, train):
    model = _constrained(case)
    if case in AVERAGING_REFUSED:  # scores do not average like weights: refused, harden first
        with pytest.raises(mp.MaskparamError, match="harden"):
            AveragedModel(model)
        mp.harden(model)
    averaged = (
        _ema(model, use_buffers) if kind == "ema" else AveragedModel(model, use_buffers=use_buffers)
    )
    for _ in range(3):
        train(model, _inputs(), steps=1)
        averaged.update_parameters(model)
    _assert_holds(averaged.module)
    x = _inputs()
    with torch.no_grad():
        before = averaged(x)
        mp.remove_parametrizations(averaged.module)
        _assert_same_outputs(case, averaged(x), before)


@pytest.mark.parametrize("case", list(CASES))
def test_timm_style_ema_over_the_state_dict(case, train):
    # timm's ModelEmaV2: lerp every floating-point state_dict entry, copy the rest.
    model = _trained(case, train)
    ema = copy.deepcopy(model)
    for _ in range(3):
        train(model, _inputs(), steps=1)
        with torch.no_grad():
            for ema_v, model_v in zip(
                ema.state_dict().values(), model.state_dict().values(), strict=True
            ):
                if ema_v.is_floating_point():
                    ema_v.lerp_(model_v, 0.1)
                else:
                    ema_v.copy_(model_v)
    _assert_holds(ema)


@pytest.mark.parametrize("case", list(CASES))
def test_deepcopy_then_bake_the_copy(case, train):
    model = _trained(case, train)
    clone = copy.deepcopy(model)
    x = _inputs()
    assert torch.equal(clone(x), model(x))
    mp.remove_parametrizations(clone)
    _assert_holds(model)  # the original is untouched by baking its copy
    _assert_same_outputs(case, clone(x), model(x))


@pytest.mark.parametrize("case", list(CASES))
def test_state_dict_round_trip_into_a_fresh_model(case, train):
    model = _trained(case, train)
    fresh = _constrained(case, seed=1)  # other random weights, same rules
    fresh.load_state_dict(model.state_dict())
    _assert_holds(fresh)
    x = _inputs()
    assert torch.equal(fresh(x), model(x))


@pytest.mark.parametrize("case", list(CASES))
def test_bake_gives_a_plain_model_with_identical_outputs(case, train):
    model = _trained(case, train)
    x = _inputs()
    with torch.no_grad():
        before = model(x)
        mp.remove_parametrizations(model)
        _assert_same_outputs(case, model(x), before)
    assert not any("parametrizations" in key for key in model.state_dict())
    assert type(model[0]) is nn.Linear


@pytest.mark.parametrize("case", list(CASES))
def test_plain_checkpoint_load_then_train(case, train):
    model = _constrained(case)
    torch.manual_seed(3)
    pretrained = mlp(6, 6, 6).state_dict()  # plain keys, other values
    mp.load_state_dict(model, pretrained)
    _assert_holds(model)
    train(model, _inputs(), steps=2)
    _assert_holds(model)


@pytest.mark.parametrize("case", list(CASES))
def test_assigning_the_weight_then_train(case, train):
    model = _constrained(case)
    with torch.no_grad():
        model[0].weight = torch.randn(6, 6)
    _assert_holds(model)
    train(model, _inputs(), steps=2)
    _assert_holds(model)


@pytest.mark.parametrize("dtype", ["fp64", "fp16", "bf16"])
@pytest.mark.parametrize("case", list(CASES))
def test_to_dtype_after_apply_then_train_and_reload(case, dtype, train):
    target = {"fp64": torch.float64, "fp16": torch.float16, "bf16": torch.bfloat16}[dtype]
    model = _constrained(case).to(target)
    _assert_holds(model)
    train(model, _inputs(target), steps=2, optimizer=lambda p: torch.optim.SGD(p, lr=0.1))
    _assert_holds(model)
    fresh = _constrained(case, seed=1).to(target)
    fresh.load_state_dict(model.state_dict())
    _assert_holds(fresh)
    assert torch.equal(fresh(_inputs(target)), model(_inputs(target)))


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_compile_trains_and_keeps_the_invariant(case, train):
    if "sparse" in case or case in SPARSE_PRODUCT:
        # The CSR layout's product runs eagerly, a graph break that fullgraph=True refuses
        # (tests/constraints/test_csr.py compiles it without fullgraph).
        pytest.skip("torch.compile does not support sparse tensors (torch's limit)")
    model = _constrained(case)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    train(compiled, _inputs(), steps=2)
    _assert_holds(model)
    torch._dynamo.reset()
