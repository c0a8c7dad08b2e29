"""Bad inputs and misuses, one table: each must end as an mp.MaskparamError whose message has a
"  fix:" line, with the model exactly as it was (state_dict bit for bit, the same Parameter and
buffer objects, module classes, parametrizations, and the optimizer state where one is involved).

Each case builds a fresh tiny model and makes one bad call. ``outcome`` records what happens:
"MaskparamError", "MaskparamError, model changed", "other exception: <type>[, model changed]" or
"accepted". Cases that do not end as a clean MaskparamError are strict xfails, listed in
``NOT_REFUSED`` with what happens now; ``test_the_record_of_what_happens_now_is_accurate`` checks
that record, so a fix shows up twice (an XPASS and a changed record): then drop the entry.
Inputs that look odd but are legitimately fine are in ``ACCEPTED_ON_PURPOSE``, each with a one-line
reason, and must stay accepted.

Count (maskparam 0.2.0.dev0, torch 2.13, CPU): 389 inputs tried, 20 of them accepted on purpose
(``ACCEPTED_ON_PURPOSE``), so 369 bad inputs and misuses.

When this table was written (a helper's attack on the 0.2 work in progress): 292 ended as a
MaskparamError with a fix and the model unchanged, 54 as another exception (10 after changing
the model), 22 were silently accepted, 1 MaskparamError came after a change.

Now: 364 end as a MaskparamError with a fix and the model unchanged; 0 are silently accepted; 0
end as another exception with the model unchanged. The 5 left (``NOT_REFUSED``) are torch's own
``load_state_dict`` with ``strict=True`` and missing or unexpected keys (it copies what fits, then
raises: a plain torch model fails the same way, its pre-hooks always get ``strict=True`` so no
hook can tell, and ``mp.load_state_dict`` checks keys first), and a constrained checkpoint into a
baked model (plain torch: nothing of maskparam is left to check the load).

Judgement calls: ``Triangular(diagonal=±100)`` on a 3x4 weight (a constraint that pins nothing,
or everything) is counted as bad, and refused: a diagonal must lie within [-rows, cols].
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

import maskparam as mp

# ---------------------------------------------------------------------------------------------
# Tiny models
# ---------------------------------------------------------------------------------------------


class Holder(nn.Module):
    """Holds the given tensors: floating ones as trainable parameters, the rest as buffers."""

    def __init__(self, **tensors: Tensor) -> None:
        super().__init__()
        for name, tensor in tensors.items():
            if tensor.is_floating_point() or tensor.is_complex():
                self.register_parameter(name, nn.Parameter(tensor))
            else:
                self.register_buffer(name, tensor)


class Tied(nn.Module):
    """An embedding tied to an output layer (one Parameter, two modules)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(5, 3)
        self.head = nn.Linear(3, 5, bias=False)
        self.head.weight = self.emb.weight


class Double(nn.Module):
    """A user parametrization without right_inverse."""

    def forward(self, x: Tensor) -> Tensor:
        return 2 * x


def linear() -> nn.Module:
    return nn.Linear(4, 3)


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 2))


def conv() -> nn.Module:
    return nn.Conv2d(2, 4, 3)


def with_int_buffers() -> nn.Module:
    return Holder(
        weight=torch.randn(3, 4),
        count=torch.arange(3),
        flags=torch.tensor([True, False, True]),
    )


def batchnorm() -> nn.Module:
    return nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3))


def scalar() -> nn.Module:
    return Holder(scale=torch.tensor(1.5))


def complex_weight() -> nn.Module:
    return Holder(weight=torch.randn(3, 3, dtype=torch.cfloat))


def empty_weight() -> nn.Module:
    return Holder(weight=torch.empty(3, 0))


def frozen() -> nn.Module:
    return nn.Linear(4, 3).requires_grad_(False)


def float_buffer() -> nn.Module:
    model = nn.Linear(4, 3)
    model.register_buffer("stats", torch.ones(3, 3))
    return model


def meta_linear() -> nn.Module:
    with torch.device("meta"):
        return nn.Linear(4, 3)


def tied() -> nn.Module:
    return Tied()


def tied_with_user_parametrization() -> nn.Module:
    model = Tied()
    parametrize.register_parametrization(model.head, "weight", Double())
    return model


def aliased() -> nn.Module:
    model = Holder(a=torch.randn(3, 3))
    model.b = model.a
    return model


def user_parametrized() -> nn.Module:
    model = nn.Linear(4, 3)
    parametrize.register_parametrization(model, "weight", Double())
    return model


def constrained(
    spec: Callable[[], object] = mp.Triangular, model=linear
) -> Callable[[], nn.Module]:
    def make() -> nn.Module:
        return mp.apply_mask(model(), {"weight": spec()})

    return make


def learnable(mode: str = "hard") -> nn.Module:
    return mp.apply_mask(mlp(), {"*.weight": mp.LearnableMask(mode)})


# ---------------------------------------------------------------------------------------------
# One attempt: a fresh model and one bad call; its outcome
# ---------------------------------------------------------------------------------------------


@dataclass
class Attempt:
    model: nn.Module
    call: Callable[[], object]
    optimizer: torch.optim.Optimizer | None = None


Setup = Callable[[], Attempt]


def _bits(tensor: Tensor) -> Tensor:
    """The bytes of a tensor (NaN payloads and the sign of zero included); meta: nothing."""
    if tensor.is_meta:
        return torch.empty(0, dtype=torch.uint8)
    return tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).clone()


def snapshot(model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> list[object]:
    """Everything a failed call must leave as it was: state_dict values (bit for bit), keys and
    dtypes, Parameter and buffer objects, requires_grad flags, module classes, optimizer state."""
    state = [
        (key, value.dtype, tuple(value.shape), value.device.type, _bits(value))
        for key, value in model.state_dict(keep_vars=True).items()
    ]
    parameters = [
        (name, id(p), p.requires_grad) for name, p in model.named_parameters(remove_duplicate=False)
    ]
    buffers = [(name, id(b)) for name, b in model.named_buffers(remove_duplicate=False)]
    classes = [(name, type(m)) for name, m in model.named_modules(remove_duplicate=False)]
    parametrized = [
        (name, key, [type(p) for p in plist])
        for name, m in model.named_modules(remove_duplicate=False)
        if parametrize.is_parametrized(m)
        for key, plist in m.parametrizations.items()
    ]
    optim: list[object] = []
    if optimizer is not None:
        for param, entry in optimizer.state.items():
            for key, value in entry.items():
                optim.append((id(param), key, _bits(value) if isinstance(value, Tensor) else value))
        optim.append(
            [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
        )
    return [state, parameters, buffers, classes, parametrized, optim]


def _same(a: object, b: object) -> bool:
    if isinstance(a, Tensor) and isinstance(b, Tensor):
        return a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return a == b


def outcome(setup: Setup) -> str:
    """'MaskparamError' (with a fix line, model unchanged), 'MaskparamError without fix',
    'MaskparamError, model changed', 'other exception: <type>[, model changed]' or 'accepted'."""
    attempt = setup()
    before = snapshot(attempt.model, attempt.optimizer)
    try:
        attempt.call()
    except mp.MaskparamError as failure:
        changed = not _same(before, snapshot(attempt.model, attempt.optimizer))
        if changed:
            return "MaskparamError, model changed"
        if not any(line.startswith("  fix: ") for line in str(failure).splitlines()):
            return "MaskparamError without fix"
        return "MaskparamError"
    except Exception as failure:  # noqa: BLE001 (the table records any other exception)
        changed = not _same(before, snapshot(attempt.model, attempt.optimizer))
        return f"other exception: {type(failure).__name__}" + (", model changed" if changed else "")
    return "accepted"


# ---------------------------------------------------------------------------------------------
# Case builders
# ---------------------------------------------------------------------------------------------


def call(model: Callable[[], nn.Module], fn: Callable[[nn.Module], object]) -> Setup:
    """A fresh ``model()`` and the bad call ``fn(model)``."""

    def setup() -> Attempt:
        m = model()
        return Attempt(m, lambda: fn(m))

    return setup


def rules(make_rules: Callable[[], object], model=linear, **kwargs: object) -> Setup:
    """``apply_mask(model(), make_rules(), **kwargs)``; the rules (and their specs) are made inside
    the call, so a spec that refuses its arguments when constructed counts too."""
    return call(model, lambda m: mp.apply_mask(m, make_rules(), **kwargs))


def spec(make_spec: Callable[[], object], target: str = "weight", model=linear) -> Setup:
    """``apply_mask(model(), {target: make_spec()})``."""
    return rules(lambda: {target: make_spec()}, model)


def mask(values: object, model=linear) -> Setup:
    """``Mask`` of ``values`` (a tensor or anything else) on the model's ``weight``."""
    return spec(lambda: mp.Mask(values), model=model)


# --- checkpoints ---------------------------------------------------------------------------------


def checkpoint(
    saved: Callable[[], dict],
    loaded: Callable[[], dict] | None = None,
    edit: Callable[[dict], None] | None = None,
    *,
    loader: str,
    model: Callable[[], nn.Module] = mlp,
) -> Setup:
    """A checkpoint of ``model()`` under the ``saved`` rules (then ``edit``-ed), loaded into a fresh
    ``model()`` under the ``loaded`` rules (the same when None) by torch or by mp."""

    def setup() -> Attempt:
        torch.manual_seed(1)
        source = mp.apply_mask(model(), saved()) if saved() else model()
        state = {key: value.detach().clone() for key, value in source.state_dict().items()}
        if edit is not None:
            edit(state)
        torch.manual_seed(2)
        target_rules = (loaded or saved)()
        target = mp.apply_mask(model(), target_rules) if target_rules else model()
        if loader == "torch":
            return Attempt(target, lambda: target.load_state_dict(state))
        return Attempt(target, lambda: mp.load_state_dict(target, state))

    return setup


def into_baked(loader: str) -> Setup:
    """A constrained checkpoint into a model that was constrained the same way, then baked."""

    def setup() -> Attempt:
        state = mp.apply_mask(mlp(), random_mask()).state_dict()
        baked = mp.remove_parametrizations(mp.apply_mask(mlp(), random_mask()))
        if loader == "torch":
            return Attempt(baked, lambda: baked.load_state_dict(state))
        return Attempt(baked, lambda: mp.load_state_dict(baked, state))

    return setup


def both_loaders(name: str, *args: object, **kwargs: object) -> list[tuple[str, Setup]]:
    return [
        (f"{name}[{loader}]", checkpoint(*args, loader=loader, **kwargs))
        for loader in ("torch", "mp")
    ]


def set_key(key: str, value: Callable[[Tensor], Tensor]) -> Callable[[dict], None]:
    def edit(state: dict) -> None:
        state[key] = value(state[key])

    return edit


def drop_key(key: str) -> Callable[[dict], None]:
    def edit(state: dict) -> None:
        del state[key]

    return edit


def add_key(key: str) -> Callable[[dict], None]:
    def edit(state: dict) -> None:
        state[key] = torch.zeros(1)

    return edit


MASK0 = "0.parametrizations.weight.0.mask"


def with_entry(value: float, dtype: torch.dtype = torch.uint8) -> Callable[[Tensor], Tensor]:
    """The mask with its first entry set to ``value`` (in ``dtype``)."""

    def change(current: Tensor) -> Tensor:
        changed = current.to(dtype).clone()
        changed.view(-1)[0] = value
        return changed

    return change


def random_mask() -> dict:
    return {"0.weight": mp.Mask(mp.masks.random(0.5), layout="dense")}


def freeze_mask() -> dict:
    return {"0.weight": mp.Freeze(mp.masks.random(0.5), layout="dense")}


def freeze_rows(index: list[int]) -> Callable[[], dict]:
    return lambda: {"0.weight": mp.Freeze(dim=0, index=index)}


def subspace(**kwargs: object) -> Callable[[], dict]:
    return lambda: {"0.weight": mp.Subspace(3, **kwargs)}


def compact(density: float) -> Callable[[], dict]:
    return lambda: {"0.weight": mp.Mask(mp.masks.random(density), layout="compact")}


# --- optimizers ----------------------------------------------------------------------------------


def trained_adam(model: nn.Module) -> torch.optim.Optimizer:
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    model(torch.randn(2, 4)).sum().backward()
    optimizer.step()
    return optimizer


def optimizer_load(
    state_of: Callable[[], object],
    *,
    model: Callable[[], nn.Module] = mlp,
    optimizer: Callable[[nn.Module], object] | None = None,
    target: Callable[[nn.Module], nn.Module] | None = None,
) -> Setup:
    """``load_optimizer_state_dict(optimizer, model, state_of())``, Adam on a fresh ``model()``."""

    def setup() -> Attempt:
        m = model()
        opt = trained_adam(m)
        state = state_of()
        given = optimizer(m) if optimizer is not None else opt
        into = target(m) if target is not None else m
        return Attempt(m, lambda: mp.load_optimizer_state_dict(given, into, state), opt)

    return setup


def saved_optimizer(model: Callable[[], nn.Module] = mlp, *, groups: int = 1) -> Callable[[], dict]:
    def state() -> dict:
        m = model()
        params = list(m.parameters())
        if groups == 1:
            optimizer = torch.optim.Adam(params, lr=0.01)
        else:
            optimizer = torch.optim.Adam([{"params": params[:1]}, {"params": params[1:]}])
        m(torch.randn(2, 4)).sum().backward()
        optimizer.step()
        return mp.optimizer_state_dict(optimizer, m)

    return state


# --- custom specs and constraints ----------------------------------------------------------------


class Builds(mp.Spec):
    """A spec of one's own whose build returns ``make()``."""

    def __init__(self, make: Callable[[], object]) -> None:
        self.make = make

    def build(self, name: str, tensor: Tensor) -> mp.Constraint:
        return self.make()  # type: ignore[return-value]


class Silent(mp.Constraint):
    """A constraint without pins() or describe()."""

    def forward(self, x: Tensor) -> Tensor:
        return x


class Reshapes(Silent):
    def forward(self, x: Tensor) -> Tensor:
        return x.reshape(-1)


class Casts(Silent):
    def forward(self, x: Tensor) -> Tensor:
        return x.double()


class ReturnsNone(Silent):
    def forward(self, x: Tensor) -> None:  # type: ignore[override]
        return None


def raises_value_error() -> object:
    raise ValueError("my spec refuses this tensor")


def fails(*_: object) -> bool:
    raise ZeroDivisionError("boom")


# ---------------------------------------------------------------------------------------------
# The table
# ---------------------------------------------------------------------------------------------

RANDOM = mp.masks.random(0.5)

CASES: list[tuple[str, Setup]] = [
    # --- Mask: the mask argument -----------------------------------------------------------------
    ("Mask(None)", mask(None)),
    ("Mask(str)", mask("upper")),
    ("Mask(int)", mask(3)),
    ("Mask(bool)", mask(True)),
    ("Mask(list of 0/1)", mask([[1, 0, 1, 0]] * 3)),
    ("Mask(values 2)", mask(torch.full((3, 4), 2))),
    ("Mask(values -1 int8)", mask(torch.full((3, 4), -1, dtype=torch.int8))),
    ("Mask(uint8 255)", mask(torch.full((3, 4), 255, dtype=torch.uint8))),
    ("Mask(float 0.5)", mask(torch.full((3, 4), 0.5))),
    ("Mask(float16 0.5)", mask(torch.full((3, 4), 0.5, dtype=torch.float16))),
    ("Mask(NaN)", mask(torch.full((3, 4), math.nan))),
    ("Mask(inf)", mask(torch.full((3, 4), math.inf))),
    ("Mask(complex)", mask(torch.ones(3, 4, dtype=torch.cfloat))),
    ("Mask(wrong shape 4x3)", mask(torch.ones(4, 3, dtype=torch.bool))),
    ("Mask(wrong shape 5x5)", mask(torch.ones(5, 5, dtype=torch.bool))),
    ("Mask(too many dims)", mask(torch.ones(1, 3, 4, dtype=torch.bool))),
    ("Mask(meta tensor)", mask(torch.ones(3, 4, dtype=torch.bool, device="meta"))),
    ("Mask(generator class, not instance)", mask(mp.masks.random)),
    ("Mask(callable raises)", mask(fails)),
    ("Mask(callable returns list)", mask(lambda w: [[1] * 4] * 3)),
    ("Mask(callable returns None)", mask(lambda w: None)),
    ("Mask(callable wrong shape)", mask(lambda w: torch.ones(2, 2, dtype=torch.bool))),
    ("Mask(callable returns 0.3)", mask(lambda w: torch.full_like(w, 0.3))),
    ("Mask(callable takes no args)", mask(lambda: torch.ones(3, 4))),
    ("Mask(layout='sparse')", spec(lambda: mp.Mask(RANDOM, layout="sparse"))),
    ("Mask(layout='Compact')", spec(lambda: mp.Mask(RANDOM, layout="Compact"))),
    ("Mask(layout=None)", spec(lambda: mp.Mask(RANDOM, layout=None))),
    ("Mask(layout=True)", spec(lambda: mp.Mask(RANDOM, layout=True))),
    # --- Freeze ----------------------------------------------------------------------------------
    ("Freeze()", spec(mp.Freeze)),
    ("Freeze(mask and dim/index)", spec(lambda: mp.Freeze(RANDOM, dim=0, index=[0]))),
    ("Freeze(dim only)", spec(lambda: mp.Freeze(dim=0))),
    ("Freeze(index only)", spec(lambda: mp.Freeze(index=[0]))),
    ("Freeze(dim=True)", spec(lambda: mp.Freeze(dim=True, index=[0]))),
    ("Freeze(dim=0.0)", spec(lambda: mp.Freeze(dim=0.0, index=[0]))),
    ("Freeze(dim='0')", spec(lambda: mp.Freeze(dim="0", index=[0]))),
    ("Freeze(dim=2) on a matrix", spec(lambda: mp.Freeze(dim=2, index=[0]))),
    ("Freeze(dim=-3) on a matrix", spec(lambda: mp.Freeze(dim=-3, index=[0]))),
    ("Freeze(dim=2**70)", spec(lambda: mp.Freeze(dim=2**70, index=[0]))),
    ("Freeze(index=[3]) out of range", spec(lambda: mp.Freeze(dim=0, index=[3]))),
    ("Freeze(index=[-4]) out of range", spec(lambda: mp.Freeze(dim=0, index=[-4]))),
    ("Freeze(index=2**70)", spec(lambda: mp.Freeze(dim=0, index=2**70))),
    ("Freeze(index=range(10))", spec(lambda: mp.Freeze(dim=0, index=range(10)))),
    ("Freeze(index=True)", spec(lambda: mp.Freeze(dim=0, index=True))),
    ("Freeze(index=[True])", spec(lambda: mp.Freeze(dim=0, index=[True]))),
    ("Freeze(index=1.5)", spec(lambda: mp.Freeze(dim=0, index=1.5))),
    ("Freeze(index=[0.0])", spec(lambda: mp.Freeze(dim=0, index=[0.0]))),
    ("Freeze(index='0')", spec(lambda: mp.Freeze(dim=0, index="0"))),
    ("Freeze(index=float tensor)", spec(lambda: mp.Freeze(dim=0, index=torch.tensor([0.0])))),
    ("Freeze(index=bool tensor)", spec(lambda: mp.Freeze(dim=0, index=torch.tensor([True])))),
    ("Freeze(index=2-d tensor)", spec(lambda: mp.Freeze(dim=0, index=torch.tensor([[0, 1]])))),
    (
        "Freeze(index=meta tensor)",
        spec(lambda: mp.Freeze(dim=0, index=torch.zeros(1, 2, device="meta", dtype=torch.long))),
    ),
    ("Freeze(mask 0.5)", spec(lambda: mp.Freeze(torch.full((3, 4), 0.5)))),
    ("Freeze(mask wrong shape)", spec(lambda: mp.Freeze(torch.ones(4, 4, dtype=torch.bool)))),
    ("Freeze(layout='packed')", spec(lambda: mp.Freeze(RANDOM, layout="packed"))),
    # --- Triangular ------------------------------------------------------------------------------
    ("Triangular(lower='no')", spec(lambda: mp.Triangular(lower="no"))),
    ("Triangular(lower=1)", spec(lambda: mp.Triangular(lower=1))),
    ("Triangular(lower=None)", spec(lambda: mp.Triangular(lower=None))),
    ("Triangular(diagonal=True)", spec(lambda: mp.Triangular(diagonal=True))),
    ("Triangular(diagonal=0.5)", spec(lambda: mp.Triangular(diagonal=0.5))),
    ("Triangular(diagonal='1')", spec(lambda: mp.Triangular(diagonal="1"))),
    ("Triangular(diagonal=None)", spec(lambda: mp.Triangular(diagonal=None))),
    ("Triangular(diagonal=nan)", spec(lambda: mp.Triangular(diagonal=math.nan))),
    ("Triangular(diagonal=2**70)", spec(lambda: mp.Triangular(diagonal=2**70))),
    ("Triangular(diagonal=100): no-op", spec(lambda: mp.Triangular(diagonal=100))),
    ("Triangular(diagonal=-100): all zero", spec(lambda: mp.Triangular(diagonal=-100))),
    ("Triangular on a vector", spec(mp.Triangular, target="bias")),
    ("Triangular on a 0-d tensor", spec(mp.Triangular, target="scale", model=scalar)),
    ("Triangular(layout='dense ')", spec(lambda: mp.Triangular(layout="dense "))),
    # --- Subspace --------------------------------------------------------------------------------
    ("Subspace(0)", spec(lambda: mp.Subspace(0))),
    ("Subspace(-1)", spec(lambda: mp.Subspace(-1))),
    ("Subspace(True)", spec(lambda: mp.Subspace(True))),
    ("Subspace(2.0)", spec(lambda: mp.Subspace(2.0))),
    ("Subspace('4')", spec(lambda: mp.Subspace("4"))),
    ("Subspace(None)", spec(lambda: mp.Subspace(None))),
    ("Subspace(dim > numel)", spec(lambda: mp.Subspace(13))),
    ("Subspace(dim=2**70)", spec(lambda: mp.Subspace(2**70))),
    ("Subspace(basis wrong shape)", spec(lambda: mp.Subspace(2, basis=torch.randn(12, 3)))),
    ("Subspace(basis transposed)", spec(lambda: mp.Subspace(2, basis=torch.randn(2, 12)))),
    ("Subspace(basis float64)", spec(lambda: mp.Subspace(2, basis=torch.randn(12, 2).double()))),
    (
        "Subspace(basis int)",
        spec(lambda: mp.Subspace(2, basis=torch.ones(12, 2, dtype=torch.long))),
    ),
    ("Subspace(basis NaN)", spec(lambda: mp.Subspace(2, basis=torch.full((12, 2), math.nan)))),
    ("Subspace(basis inf)", spec(lambda: mp.Subspace(2, basis=torch.full((12, 2), math.inf)))),
    ("Subspace(basis list)", spec(lambda: mp.Subspace(2, basis=[[1.0, 0.0]] * 12))),
    # The first torch.isfinite on a meta tensor costs about 1 s of torch's lazy imports, once.
    ("Subspace(basis meta)", spec(lambda: mp.Subspace(2, basis=torch.empty(12, 2, device="meta")))),
    (
        "Subspace(basis + projection)",
        spec(lambda: mp.Subspace(2, basis=torch.randn(12, 2), projection="fastfood")),
    ),
    ("Subspace(basis + seed)", spec(lambda: mp.Subspace(2, basis=torch.randn(12, 2), seed=5))),
    ("Subspace(projection='Gaussian')", spec(lambda: mp.Subspace(2, projection="Gaussian"))),
    ("Subspace(projection='dense')", spec(lambda: mp.Subspace(2, projection="dense"))),
    ("Subspace(projection=None)", spec(lambda: mp.Subspace(2, projection=None))),
    ("Subspace(seed=-1)", spec(lambda: mp.Subspace(2, seed=-1))),
    ("Subspace(seed=True)", spec(lambda: mp.Subspace(2, seed=True))),
    ("Subspace(seed=1.5)", spec(lambda: mp.Subspace(2, seed=1.5))),
    ("Subspace(seed='0')", spec(lambda: mp.Subspace(2, seed="0"))),
    ("Subspace(seed=None)", spec(lambda: mp.Subspace(2, seed=None))),
    ("Subspace(seed=2**43)", spec(lambda: mp.Subspace(2, seed=2**43))),
    ("Subspace(seed=2**64)", spec(lambda: mp.Subspace(2, seed=2**64))),
    ("Subspace(group=3)", spec(lambda: mp.Subspace(2, group=3))),
    ("Subspace(group=True)", spec(lambda: mp.Subspace(2, group=True))),
    ("Subspace(group=['a'])", spec(lambda: mp.Subspace(2, group=["a"]))),
    ("Subspace(max_dense_bytes=1)", spec(lambda: mp.Subspace(2, max_dense_bytes=1))),
    ("Subspace(max_dense_bytes=-1)", spec(lambda: mp.Subspace(2, max_dense_bytes=-1))),
    ("Subspace(max_dense_bytes=None)", spec(lambda: mp.Subspace(2, max_dense_bytes=None))),
    ("Subspace(max_dense_bytes='1GB')", spec(lambda: mp.Subspace(2, max_dense_bytes="1GB"))),
    ("Subspace(max_dense_bytes=nan)", spec(lambda: mp.Subspace(2, max_dense_bytes=math.nan))),
    (
        "Subspace(sparse, max_dense_bytes=10)",
        spec(lambda: mp.Subspace(2, projection="sparse", max_dense_bytes=10)),
    ),
    ("Subspace on a complex tensor", spec(lambda: mp.Subspace(2), model=complex_weight)),
    ("Subspace on an empty tensor", spec(lambda: mp.Subspace(1), model=empty_weight)),
    # --- LearnableMask ---------------------------------------------------------------------------
    ("LearnableMask('Hard')", spec(lambda: mp.LearnableMask("Hard"))),
    ("LearnableMask('binary')", spec(lambda: mp.LearnableMask("binary"))),
    ("LearnableMask(mode=None)", spec(lambda: mp.LearnableMask(None))),
    ("LearnableMask(mode=True)", spec(lambda: mp.LearnableMask(True))),
    ("LearnableMask(temperature=0)", spec(lambda: mp.LearnableMask("soft", temperature=0))),
    ("LearnableMask(temperature=-1)", spec(lambda: mp.LearnableMask("soft", temperature=-1.0))),
    (
        "LearnableMask(temperature=nan)",
        spec(lambda: mp.LearnableMask("soft", temperature=math.nan)),
    ),
    (
        "LearnableMask(temperature=inf)",
        spec(lambda: mp.LearnableMask("soft", temperature=math.inf)),
    ),
    ("LearnableMask(temperature='1')", spec(lambda: mp.LearnableMask("soft", temperature="1"))),
    ("LearnableMask(temperature=True)", spec(lambda: mp.LearnableMask("soft", temperature=True))),
    ("LearnableMask(temperature=None)", spec(lambda: mp.LearnableMask("soft", temperature=None))),
    ("LearnableMask(init=nan)", spec(lambda: mp.LearnableMask(init=math.nan))),
    ("LearnableMask(init=-inf)", spec(lambda: mp.LearnableMask(init=-math.inf))),
    ("LearnableMask(init='1')", spec(lambda: mp.LearnableMask(init="1"))),
    ("LearnableMask(init=True)", spec(lambda: mp.LearnableMask(init=True))),
    (
        "LearnableMask(init=torch.tensor(1.0))",
        spec(lambda: mp.LearnableMask(init=torch.tensor(1.0))),
    ),
    ("LearnableMask(init=1e39) overflows float32", spec(lambda: mp.LearnableMask(init=1e39))),
    (
        "LearnableMask(soft, temperature=1e39)",
        spec(lambda: mp.LearnableMask("soft", temperature=1e39)),
    ),
    ("LearnableMask on a complex tensor", spec(mp.LearnableMask, model=complex_weight)),
    # --- mask generators -------------------------------------------------------------------------
    ("random(-0.1)", spec(lambda: mp.Mask(mp.masks.random(-0.1)))),
    ("random(1.1)", spec(lambda: mp.Mask(mp.masks.random(1.1)))),
    ("random(2)", spec(lambda: mp.Mask(mp.masks.random(2)))),
    ("random(nan)", spec(lambda: mp.Mask(mp.masks.random(math.nan)))),
    ("random(inf)", spec(lambda: mp.Mask(mp.masks.random(math.inf)))),
    ("random(True)", spec(lambda: mp.Mask(mp.masks.random(True)))),
    ("random('0.5')", spec(lambda: mp.Mask(mp.masks.random("0.5")))),
    ("random(None)", spec(lambda: mp.Mask(mp.masks.random(None)))),
    ("random(tensor density)", spec(lambda: mp.Mask(mp.masks.random(torch.tensor(0.5))))),
    ("random(seed=True)", spec(lambda: mp.Mask(mp.masks.random(0.5, seed=True)))),
    ("random(seed=1.5)", spec(lambda: mp.Mask(mp.masks.random(0.5, seed=1.5)))),
    ("random(seed='0')", spec(lambda: mp.Mask(mp.masks.random(0.5, seed="0")))),
    ("random(seed=-1)", spec(lambda: mp.Mask(mp.masks.random(0.5, seed=-1)))),
    ("random(seed=2**64)", spec(lambda: mp.Mask(mp.masks.random(0.5, seed=2**64)))),
    ("magnitude(-0.1)", spec(lambda: mp.Mask(mp.masks.magnitude(-0.1)))),
    ("magnitude(1.5)", spec(lambda: mp.Mask(mp.masks.magnitude(1.5)))),
    ("magnitude(nan)", spec(lambda: mp.Mask(mp.masks.magnitude(math.nan)))),
    ("magnitude(True)", spec(lambda: mp.Mask(mp.masks.magnitude(True)))),
    ("magnitude('0.5')", spec(lambda: mp.Mask(mp.masks.magnitude("0.5")))),
    ("magnitude(None)", spec(lambda: mp.Mask(mp.masks.magnitude(None)))),
    ("rows([3]) out of range", spec(lambda: mp.Mask(mp.masks.rows([3])))),
    ("rows(None)", spec(lambda: mp.Mask(mp.masks.rows(None)))),
    ("rows('01')", spec(lambda: mp.Mask(mp.masks.rows("01")))),
    ("rows(1.5)", spec(lambda: mp.Mask(mp.masks.rows(1.5)))),
    ("rows(True)", spec(lambda: mp.Mask(mp.masks.rows(True)))),
    ("rows([0.5])", spec(lambda: mp.Mask(mp.masks.rows([0.5])))),
    ("rows(float tensor)", spec(lambda: mp.Mask(mp.masks.rows(torch.tensor([0.0]))))),
    ("rows(2-d tensor)", spec(lambda: mp.Mask(mp.masks.rows(torch.tensor([[0]]))))),
    ("rows on a 0-d tensor", spec(lambda: mp.Mask(mp.masks.rows([0])), "scale", scalar)),
    ("columns([4]) out of range", spec(lambda: mp.Mask(mp.masks.columns([4])))),
    ("columns on a vector", spec(lambda: mp.Mask(mp.masks.columns([0])), target="bias")),
    ("filters([4]) out of range", spec(lambda: mp.Mask(mp.masks.filters([4])), model=conv)),
    ("filters(['a'])", spec(lambda: mp.Mask(mp.masks.filters(["a"])), model=conv)),
    ("slices(dim=True)", spec(lambda: mp.Mask(mp.masks.slices(True, [0])))),
    ("slices(dim=1.5)", spec(lambda: mp.Mask(mp.masks.slices(1.5, [0])))),
    ("slices(dim='0')", spec(lambda: mp.Mask(mp.masks.slices("0", [0])))),
    ("slices(dim=None)", spec(lambda: mp.Mask(mp.masks.slices(None, [0])))),
    ("slices(dim=4) on conv", spec(lambda: mp.Mask(mp.masks.slices(4, [0])), model=conv)),
    ("slices(dim=2**70)", spec(lambda: mp.Mask(mp.masks.slices(2**70, [0])))),
    # --- rules: the mapping and its values -------------------------------------------------------
    ("rules=None", rules(lambda: None)),
    ("rules=[]", rules(list)),
    ("rules=str", rules(lambda: "weight")),
    ("rules=list of pairs", rules(lambda: [("weight", mp.Triangular())])),
    ("rules=a spec", rules(mp.Triangular)),
    ("rule value None", rules(lambda: {"weight": None})),
    ("rule value []", rules(lambda: {"weight": []})),
    ("rule value [None]", rules(lambda: {"weight": [None]})),
    ("rule value str", rules(lambda: {"weight": "Triangular"})),
    ("rule value spec class", rules(lambda: {"weight": mp.Triangular})),
    ("rule value tensor", rules(lambda: {"weight": torch.ones(3, 4)})),
    ("rule value generator", rules(lambda: {"weight": mp.masks.random(0.5)})),
    ("rule value list with a str", rules(lambda: {"weight": [mp.Triangular(), "x"]})),
    ("rule value set", rules(lambda: {"weight": {mp.Triangular()}})),
    ("rule value generator expression", rules(lambda: {"weight": (s for s in [mp.Triangular()])})),
    (
        "rule value a Constraint",
        rules(
            lambda: {
                "weight": mp.constraints.triangular.TriangularConstraint(lower=True, diagonal=0)
            }
        ),
    ),
    # --- rules: selectors ------------------------------------------------------------------------
    ("selector int", rules(lambda: {0: mp.Triangular()})),
    ("selector float", rules(lambda: {1.5: mp.Triangular()})),
    ("selector None", rules(lambda: {None: mp.Triangular()})),
    ("selector bytes", rules(lambda: {b"weight": mp.Triangular()})),
    ("selector frozenset", rules(lambda: {frozenset({"weight"}): mp.Triangular()})),
    ("selector type alone", rules(lambda: {nn.Linear: mp.Triangular()})),
    ("selector 1-tuple", rules(lambda: {(nn.Linear,): mp.Triangular()})),
    ("selector 3-tuple", rules(lambda: {(nn.Linear, "weight", "x"): mp.Triangular()})),
    ("selector reversed tuple", rules(lambda: {("weight", nn.Linear): mp.Triangular()})),
    ("selector (type, int)", rules(lambda: {(nn.Linear, 0): mp.Triangular()})),
    ("selector (non-module type, glob)", rules(lambda: {(int, "weight"): mp.Triangular()})),
    ("selector (empty types, glob)", rules(lambda: {((), "weight"): mp.Triangular()})),
    ("selector (str, str)", rules(lambda: {("weight", "weight"): mp.Triangular()})),
    ("selector typo", rules(lambda: {"wieght": mp.Triangular()})),
    ("selector empty str", rules(lambda: {"": mp.Triangular()})),
    ("selector trailing space", rules(lambda: {"weight ": mp.Triangular()})),
    ("selector '*.weight' on a bare Linear", rules(lambda: {"*.weight": mp.Triangular()})),
    ("selector regex matching nothing", rules(lambda: {re.compile("fc.*"): mp.Triangular()})),
    ("selector bytes regex", rules(lambda: {re.compile(b"weight"): mp.Triangular()})),
    ("selector (Conv2d, glob) on a Linear", rules(lambda: {(nn.Conv2d, "*"): mp.Triangular()})),
    ("predicate raises", rules(lambda: {fails: mp.Triangular()})),
    ("predicate wrong arity", rules(lambda: {lambda name: True: mp.Triangular()})),
    ("predicate returns a tensor", rules(lambda: {lambda n, m, t: t: mp.Mask(RANDOM)})),
    ("predicate returns None", rules(lambda: {lambda n, m, t: None: mp.Mask(RANDOM)})),
    ("predicate returns 'no'", rules(lambda: {lambda n, m, t: "no": mp.Mask(RANDOM)})),
    ("predicate returns [False]", rules(lambda: {lambda n, m, t: [False]: mp.Mask(RANDOM)})),
    (
        "two rules, one tensor",
        rules(lambda: {"weight": mp.Triangular(), re.compile("w.*"): mp.Mask(RANDOM)}),
    ),
    ("apply_mask(strict='yes')", rules(lambda: {"nope": mp.Triangular()}, strict="yes")),
    ("apply_mask(strict=None)", rules(lambda: {"nope": mp.Triangular()}, strict=None)),
    ("apply_mask(strict=0) silences a typo", rules(lambda: {"wieght": mp.Triangular()}, strict=0)),
    # --- targets ---------------------------------------------------------------------------------
    ("int buffer by exact name", spec(mp.Triangular, "count", with_int_buffers)),
    ("bool buffer by exact name", spec(lambda: mp.Mask(RANDOM), "flags", with_int_buffers)),
    ("running_mean by exact name", spec(lambda: mp.Mask(RANDOM), "1.running_mean", batchnorm)),
    (
        "running_var by exact name",
        spec(lambda: mp.Freeze(dim=0, index=[0]), "1.running_var", batchnorm),
    ),
    (
        "num_batches_tracked by exact name",
        spec(lambda: mp.Mask(RANDOM), "1.num_batches_tracked", batchnorm),
    ),
    (
        "sparse Embedding",
        spec(lambda: mp.Mask(RANDOM), model=lambda: nn.Embedding(5, 3, sparse=True)),
    ),
    (
        "tied side with a user parametrization",
        spec(lambda: mp.Mask(RANDOM), "emb.weight", tied_with_user_parametrization),
    ),
    ("tied weights, compact", spec(lambda: mp.Mask(RANDOM, layout="compact"), "emb.weight", tied)),
    ("already constrained", spec(lambda: mp.Mask(RANDOM), model=constrained())),
    (
        "already constrained, via wildcard",
        rules(lambda: {"*": mp.Mask(RANDOM)}, model=constrained()),
    ),
    ("one Parameter under two names", spec(lambda: mp.Mask(RANDOM), "a", aliased)),
    ("0-d tensor, Freeze(dim=0)", spec(lambda: mp.Freeze(dim=0, index=0), "scale", scalar)),
    (
        "0-d tensor, mask of shape (1,)",
        spec(lambda: mp.Mask(torch.tensor([True])), "scale", scalar),
    ),
    ("empty tensor, Freeze(dim=1)", spec(lambda: mp.Freeze(dim=1, index=[0]), model=empty_weight)),
    (
        "meta tensor, compact Mask",
        spec(lambda: mp.Mask(RANDOM, layout="compact"), model=meta_linear),
    ),
    (
        "meta tensor, compact Freeze",
        spec(lambda: mp.Freeze(RANDOM, layout="compact"), model=meta_linear),
    ),
    (
        "meta tensor, compact Triangular",
        spec(lambda: mp.Triangular(layout="compact"), model=meta_linear),
    ),
    ("frozen parameter by wildcard only", rules(lambda: {"w*": mp.Mask(RANDOM)}, model=frozen)),
    # --- stacking --------------------------------------------------------------------------------
    ("compact second", spec(lambda: [mp.Triangular(), mp.Mask(RANDOM, layout="compact")])),
    (
        "two compacts",
        spec(lambda: [mp.Mask(RANDOM, layout="compact"), mp.Freeze(RANDOM, layout="compact")]),
    ),
    (
        "compact over a user parametrization",
        spec(lambda: mp.Mask(RANDOM, layout="compact"), model=user_parametrized),
    ),
    (
        "compact over an existing constraint",
        spec(lambda: mp.Mask(RANDOM, layout="compact"), model=constrained()),
    ),
    (
        "group at different positions",
        rules(
            lambda: {
                "0.weight": [mp.Subspace(2, group="g")],
                "2.weight": [mp.Triangular(), mp.Subspace(2, group="g")],
            },
            model=mlp,
        ),
    ),
    (
        "group with mixed dims",
        rules(
            lambda: {"0.weight": mp.Subspace(2, group="g"), "2.weight": mp.Subspace(3, group="g")},
            model=mlp,
        ),
    ),
    (
        "group with mixed projections",
        rules(
            lambda: {
                "0.weight": mp.Subspace(2, group="g"),
                "2.weight": mp.Subspace(2, group="g", projection="sparse"),
            },
            model=mlp,
        ),
    ),
    (
        "group with two bases",
        rules(
            lambda: {
                "0.weight": mp.Subspace(2, group="g", basis=torch.randn(24, 2)),
                "2.weight": mp.Subspace(2, group="g", basis=torch.randn(24, 2)),
            },
            model=mlp,
        ),
    ),
    (
        "group already present",
        rules(
            lambda: {"2.weight": mp.Subspace(2, group="g")},
            model=lambda: mp.apply_mask(mlp(), {"0.weight": mp.Subspace(2, group="g")}),
        ),
    ),
    (
        "group of mixed dtypes",
        rules(
            lambda: {"*.weight": mp.Subspace(2, group="g")},
            model=lambda: nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2).double()),
        ),
    ),
    (
        "stack with an invalid member",
        spec(lambda: [mp.Triangular(), mp.Mask(torch.full((3, 4), 0.5))]),
    ),
    # --- custom specs ----------------------------------------------------------------------------
    ("custom build returns None", spec(lambda: Builds(lambda: None))),
    ("custom build returns nn.Identity", spec(lambda: Builds(nn.Identity))),
    ("custom build raises ValueError", spec(lambda: Builds(raises_value_error))),
    ("bare mp.Spec()", spec(mp.Spec)),
    ("custom Constraint changes the shape", spec(lambda: Builds(Reshapes))),
    ("custom Constraint changes the dtype", spec(lambda: Builds(Casts))),
    ("custom Constraint returns None", spec(lambda: Builds(ReturnsNone))),
    ("custom Constraint without pins/describe", spec(lambda: Builds(Silent))),
    # --- harden, mask_penalty, learned_masks -----------------------------------------------------
    ("harden without learnable masks", call(constrained(), mp.harden)),
    ("harden(sparsity=-0.1)", call(learnable, lambda m: mp.harden(m, sparsity=-0.1))),
    ("harden(sparsity=1.5)", call(learnable, lambda m: mp.harden(m, sparsity=1.5))),
    ("harden(sparsity=nan)", call(learnable, lambda m: mp.harden(m, sparsity=math.nan))),
    ("harden(sparsity=True)", call(learnable, lambda m: mp.harden(m, sparsity=True))),
    ("harden(sparsity='0.5')", call(learnable, lambda m: mp.harden(m, sparsity="0.5"))),
    ("harden(fold='yes')", call(lambda: learnable("soft"), lambda m: mp.harden(m, fold="yes"))),
    ("harden(fold=1)", call(lambda: learnable("soft"), lambda m: mp.harden(m, fold=1))),
    ("harden(fold=None)", call(lambda: learnable("soft"), lambda m: mp.harden(m, fold=None))),
    ("harden(threshold=nan)", call(learnable, lambda m: mp.harden(m, threshold=math.nan))),
    ("harden(threshold='0')", call(learnable, lambda m: mp.harden(m, threshold="0"))),
    ("harden(threshold=None)", call(learnable, lambda m: mp.harden(m, threshold=None))),
    ("harden(threshold=True)", call(learnable, lambda m: mp.harden(m, threshold=True))),
    (
        "harden(per_tensor='yes')",
        call(learnable, lambda m: mp.harden(m, sparsity=0.5, per_tensor="yes")),
    ),
    (
        "harden(per_tensor=True) without sparsity",
        call(learnable, lambda m: mp.harden(m, per_tensor=True)),
    ),
    (
        "harden soft mask stacked second, fold",
        call(
            lambda: mp.apply_mask(
                linear(), {"weight": [mp.Triangular(), mp.LearnableMask("soft")]}
            ),
            mp.harden,
        ),
    ),
    ("mask_penalty without learnable masks", call(constrained(), mp.mask_penalty)),
    (
        "mask_penalty(normalize='yes')",
        call(learnable, lambda m: mp.mask_penalty(m, normalize="yes")),
    ),
    # --- checkpoints -----------------------------------------------------------------------------
    *both_loaders("subspace of another seed", subspace(seed=0), subspace(seed=1)),
    *both_loaders("subspace of another projection", subspace(), subspace(projection="sparse")),
    *both_loaders("subspace of another dim", lambda: {"0.weight": mp.Subspace(2)}, subspace()),
    # A checkpoint of another density loads (its mask says where its entries go: a run that
    # update_masks changed); one whose entries do not fit its own mask is refused.
    *both_loaders(
        "compact entries that do not fit its mask",
        compact(0.5),
        compact(0.25),
        edit=set_key("0.parametrizations.weight.original", lambda t: t[:-1]),
    ),
    *both_loaders("mask entry 2", random_mask, edit=set_key(MASK0, with_entry(2))),
    *both_loaders("mask entry 255", random_mask, edit=set_key(MASK0, with_entry(255))),
    *both_loaders(
        "mask float 0.5", random_mask, edit=set_key(MASK0, with_entry(0.5, torch.float32))
    ),
    *both_loaders(
        "mask float NaN", random_mask, edit=set_key(MASK0, with_entry(math.nan, torch.float32))
    ),
    *both_loaders("mask float32 0/1", random_mask, edit=set_key(MASK0, lambda t: t.float())),
    *both_loaders("mask int64 0/1", random_mask, edit=set_key(MASK0, lambda t: t.long())),
    *both_loaders("mask wrong shape", random_mask, edit=set_key(MASK0, lambda t: t[:2])),
    *both_loaders(
        "freeze keep entry 2",
        freeze_mask,
        edit=set_key("0.parametrizations.weight.0.keep", with_entry(2)),
    ),
    *both_loaders(
        "freeze values wrong shape",
        freeze_mask,
        edit=set_key("0.parametrizations.weight.0.frozen_values", lambda t: t[:2]),
    ),
    *both_loaders("frozen rows of other indices", freeze_rows([0]), freeze_rows([1])),
    *both_loaders(
        "frozen row index out of range",
        freeze_rows([0]),
        edit=set_key("0.parametrizations.weight.0.index", lambda t: t + 7),
    ),
    *both_loaders(
        "compact free entry 2",
        compact(0.5),
        edit=set_key("0.parametrizations.weight.0.free", with_entry(2)),
    ),
    *both_loaders("Mask checkpoint into a Freeze model", random_mask, freeze_mask),
    *both_loaders("missing bias, strict", random_mask, edit=drop_key("2.bias")),
    *both_loaders("missing mask, strict", random_mask, edit=drop_key(MASK0)),
    *both_loaders("unexpected key, strict", random_mask, edit=add_key("2.extra")),
    *both_loaders("bias of the wrong shape", random_mask, edit=set_key("2.bias", lambda t: t[:1])),
    *both_loaders(
        "learnable scores of the wrong shape",
        lambda: {"0.weight": mp.LearnableMask()},
        edit=set_key("0.parametrizations.weight.0.scores", lambda t: t[:2]),
    ),
    ("constrained checkpoint into a plain model[mp]", checkpoint(random_mask, dict, loader="mp")),
    *[
        (f"constrained checkpoint into a baked model[{loader}]", into_baked(loader))
        for loader in ("torch", "mp")
    ],
    (
        "plain checkpoint, wrong shape for a constrained tensor[mp]",
        checkpoint(dict, random_mask, set_key("0.weight", lambda t: t[:2]), loader="mp"),
    ),
    (
        "plain checkpoint, a list for a constrained tensor[mp]",
        checkpoint(dict, random_mask, set_key("0.weight", lambda t: t.tolist()), loader="mp"),
    ),
    (
        "plain checkpoint, str values[mp]",
        checkpoint(dict, random_mask, set_key("2.bias", lambda t: "zeros"), loader="mp"),
    ),
    (
        "mp.load_state_dict(a list of pairs)",
        call(
            lambda: mp.apply_mask(mlp(), random_mask()),
            lambda m: mp.load_state_dict(m, list(m.state_dict().items())),
        ),
    ),
    (
        "mp.load_state_dict(None)",
        call(lambda: mp.apply_mask(mlp(), random_mask()), lambda m: mp.load_state_dict(m, None)),
    ),
    (
        "mp.load_state_dict(strict=None) with a missing key",
        call(
            lambda: mp.apply_mask(mlp(), random_mask()),
            lambda m: mp.load_state_dict(
                m, {k: v for k, v in m.state_dict().items() if k != "2.bias"}, strict=None
            ),
        ),
    ),
    (
        "submodule load with a corrupt mask[torch]",
        call(
            lambda: mp.apply_mask(mlp(), random_mask()),
            lambda m: m[0].load_state_dict(
                {
                    k[2:]: with_entry(2)(v) if k == MASK0 else v + 1
                    for k, v in m.state_dict().items()
                    if k.startswith("0.")
                }
            ),
        ),
    ),
    # --- optimizer states ------------------------------------------------------------------------
    (
        "optimizer: plain torch state",
        optimizer_load(lambda: torch.optim.Adam(mlp().parameters()).state_dict()),
    ),
    (
        "optimizer: another model's state",
        optimizer_load(saved_optimizer(lambda: nn.Sequential(nn.Linear(4, 2)))),
    ),
    ("optimizer: other parameter groups", optimizer_load(saved_optimizer(groups=2))),
    (
        "optimizer: compact state of another density",
        optimizer_load(
            saved_optimizer(lambda: mp.apply_mask(mlp(), compact(0.25)())),
            model=lambda: mp.apply_mask(mlp(), compact(0.5)()),
        ),
    ),
    ("optimizer: state None", optimizer_load(lambda: None)),
    ("optimizer: state a list", optimizer_load(lambda: [1, 2])),
    (
        "optimizer: names without param_groups",
        optimizer_load(lambda: {"maskparam_param_names": [["0.weight"]]}),
    ),
    (
        "optimizer: not an optimizer",
        optimizer_load(saved_optimizer(), optimizer=lambda m: list(m.parameters())),
    ),
    (
        "optimizer: of another model",
        optimizer_load(saved_optimizer(), optimizer=lambda m: torch.optim.Adam(mlp().parameters())),
    ),
    ("optimizer: model None", optimizer_load(saved_optimizer(), target=lambda m: None)),
    (
        "optimizer_state_dict of another model",
        call(mlp, lambda m: mp.optimizer_state_dict(torch.optim.Adam(m.parameters()), mlp())),
    ),
    (
        "optimizer_state_dict(not an optimizer)",
        call(mlp, lambda m: mp.optimizer_state_dict(list(m.parameters()), m)),
    ),
    (
        "optimizer_state_dict(model None)",
        call(mlp, lambda m: mp.optimizer_state_dict(torch.optim.Adam(m.parameters()), None)),
    ),
    # --- accessors -------------------------------------------------------------------------------
    ("kept_entries unknown name", call(constrained(), lambda m: mp.kept_entries(m, "nope"))),
    ("kept_entries unconstrained name", call(constrained(), lambda m: mp.kept_entries(m, "bias"))),
    ("kept_entries int name", call(constrained(), lambda m: mp.kept_entries(m, 0))),
    ("kept_entries None name", call(constrained(), lambda m: mp.kept_entries(m, None))),
    (
        "kept_entries internal name",
        call(constrained(), lambda m: mp.kept_entries(m, "parametrizations.weight.original")),
    ),
    ("frozen_entries unknown name", call(constrained(), lambda m: mp.frozen_entries(m, "nope"))),
    ("frozen_entries plain model", call(linear, lambda m: mp.frozen_entries(m, "weight"))),
    (
        "subspace_theta unknown group",
        call(constrained(lambda: mp.Subspace(2)), lambda m: mp.subspace_theta(m, "g")),
    ),
    (
        "subspace_theta without subspace",
        call(constrained(), lambda m: mp.subspace_theta(m, "weight")),
    ),
    (
        "subspace_theta(None)",
        call(constrained(lambda: mp.Subspace(2)), lambda m: mp.subspace_theta(m, None)),
    ),
    # --- remove_parametrizations -----------------------------------------------------------------
    (
        "remove over a user parametrization without right_inverse",
        call(
            lambda: mp.apply_mask(user_parametrized(), {"weight": mp.Triangular()}),
            mp.remove_parametrizations,
        ),
    ),
    (
        "remove(leave_parametrized='no')",
        call(constrained(), lambda m: mp.remove_parametrizations(m, leave_parametrized="no")),
    ),
    (
        "remove(leave_parametrized=None)",
        call(constrained(), lambda m: mp.remove_parametrizations(m, leave_parametrized=None)),
    ),
    # --- not a Module ----------------------------------------------------------------------------
    ("apply_mask(None)", call(linear, lambda m: mp.apply_mask(None, {"weight": mp.Triangular()}))),
    (
        "apply_mask(state_dict)",
        call(linear, lambda m: mp.apply_mask(m.state_dict(), {"weight": mp.Triangular()})),
    ),
    (
        "apply_mask(module class)",
        call(linear, lambda m: mp.apply_mask(nn.Linear, {"weight": mp.Triangular()})),
    ),
    (
        "apply_mask(rules, model) swapped",
        call(linear, lambda m: mp.apply_mask({"weight": mp.Triangular()}, m)),
    ),
    ("preview(None)", call(linear, lambda m: mp.preview(None, {"weight": mp.Triangular()}))),
    (
        "preview(strict='yes')",
        call(linear, lambda m: mp.preview(m, {"nope": mp.Triangular()}, strict="yes")),
    ),
    ("summary(None)", call(linear, lambda m: mp.summary(None))),
    ("summary(state_dict)", call(linear, lambda m: mp.summary(m.state_dict()))),
    ("verify(None)", call(linear, lambda m: mp.verify(None))),
    ("verify(list of modules)", call(linear, lambda m: mp.verify([m]))),
    ("remove_parametrizations(None)", call(linear, lambda m: mp.remove_parametrizations(None))),
    ("harden(None)", call(linear, lambda m: mp.harden(None))),
    ("mask_penalty(None)", call(linear, lambda m: mp.mask_penalty(None))),
    ("learned_masks(None)", call(linear, lambda m: mp.learned_masks(None))),
    ("kept_entries(None)", call(linear, lambda m: mp.kept_entries(None, "weight"))),
    ("frozen_entries(str)", call(linear, lambda m: mp.frozen_entries("model", "weight"))),
    ("subspace_theta(model None)", call(linear, lambda m: mp.subspace_theta(None, "g"))),
    (
        "mp.load_state_dict(None, state)",
        call(linear, lambda m: mp.load_state_dict(None, m.state_dict())),
    ),
    (
        "exclude_constants_from_ddp(None)",
        call(linear, lambda m: mp.exclude_constants_from_ddp(None)),
    ),
]

ACCEPTED = "accepted"
TYPE_ERROR = "other exception: TypeError"
ATTRIBUTE_ERROR = "other exception: AttributeError"
VALUE_ERROR = "other exception: ValueError"
RUNTIME_ERROR = "other exception: RuntimeError"
NOT_IMPLEMENTED_ERROR = "other exception: NotImplementedError"
RUNTIME_ERROR_MODEL_CHANGED = "other exception: RuntimeError, model changed"
REFUSED_MODEL_CHANGED = "MaskparamError, model changed"

#: Cases that do not (yet) end as a MaskparamError with a fix and the model unchanged:
#: (outcome now, what happens). Each is a strict xfail in the main test, and
#: test_the_record_of_what_happens_now_is_accurate checks the outcome: once a case is fixed,
#: both report it; then drop it from here.
NOT_REFUSED: dict[str, tuple[str, str]] = {
    # --- torch's own strict-key errors (see the README's Checkpoints section)
    "Mask checkpoint into a Freeze model[torch]": (
        RUNTIME_ERROR_MODEL_CHANGED,
        "torch's load_state_dict copies the rest before raising on keys; its pre-hooks always get strict=True, so maskparam cannot tell; mp.load_state_dict checks keys first",
    ),
    "missing bias, strict[torch]": (
        RUNTIME_ERROR_MODEL_CHANGED,
        "torch's load_state_dict copies the rest before raising on keys; its pre-hooks always get strict=True, so maskparam cannot tell; mp.load_state_dict checks keys first",
    ),
    "missing mask, strict[torch]": (
        RUNTIME_ERROR_MODEL_CHANGED,
        "torch's load_state_dict copies the rest before raising on keys; its pre-hooks always get strict=True, so maskparam cannot tell; mp.load_state_dict checks keys first",
    ),
    "unexpected key, strict[torch]": (
        RUNTIME_ERROR_MODEL_CHANGED,
        "torch's load_state_dict copies the rest before raising on keys; its pre-hooks always get strict=True, so maskparam cannot tell; mp.load_state_dict checks keys first",
    ),
    "constrained checkpoint into a baked model[torch]": (
        RUNTIME_ERROR_MODEL_CHANGED,
        "a baked model is plain torch: nothing of maskparam is left to check the load",
    ),
    # --- spec and generator arguments
    # --- rules and selectors
    # --- custom specs
    # --- harden, mask_penalty
    # --- checkpoints (torch's loader is not atomic for keys and shapes; mp's is meant to be)
    # --- optimizer states
    # --- remove_parametrizations
    # --- not a Module: only apply_mask and preview check
}

#: Inputs that look odd but are legitimately fine: they must be accepted (one line why).
ACCEPTED_ON_PURPOSE: list[tuple[str, Setup, str]] = [
    ("rules={}", rules(dict), "no rules, nothing to do: strict is about rules that match nothing"),
    ("Mask keeping nothing", spec(lambda: mp.Mask(mp.masks.random(0.0))), "density 0 is explicit"),
    ("random(1) (an int)", spec(lambda: mp.Mask(mp.masks.random(1))), "1 is a number in [0, 1]"),
    ("Mask(0-d True)", mask(torch.tensor(True)), "a () mask broadcasts to any shape"),
    (
        "Mask(float 0/1 with grad)",
        mask(torch.ones(3, 4, requires_grad=True)),
        "a 0/1 tensor, as documented",
    ),
    (
        "Freeze(index=[])",
        spec(lambda: mp.Freeze(dim=0, index=[])),
        "an empty selection, like density 0",
    ),
    (
        "Freeze(index=[0, 0, -3])",
        spec(lambda: mp.Freeze(dim=0, index=[0, 0, -3])),
        "indices name a set of slices (as index_fill does)",
    ),
    ("rows({0, 2})", spec(lambda: mp.Mask(mp.masks.rows({0, 2}))), "a set of ints is sorted"),
    ("Mask on complex", spec(lambda: mp.Mask(RANDOM), model=complex_weight), "README: complex"),
    ("Triangular on complex", spec(mp.Triangular, model=complex_weight), "tril is exact there"),
    ("Freeze(dim) on complex", spec(lambda: mp.Freeze(dim=0, index=[0]), model=complex_weight), ""),
    ("Mask on numel 0", spec(lambda: mp.Mask(RANDOM), model=empty_weight), "vacuously exact"),
    ("Subspace(1) on a 0-d tensor", spec(lambda: mp.Subspace(1), "scale", scalar), "dim <= numel"),
    ("LearnableMask(init=-1.0)", spec(lambda: mp.LearnableMask(init=-1.0)), "start all dropped"),
    ("frozen parameter by exact name", spec(mp.Triangular, model=frozen), "README: named exactly"),
    ("float buffer by exact name", spec(mp.Triangular, "stats", float_buffer), "README: the same"),
    (
        "predicate returns a 1-element tensor",
        rules(lambda: {lambda n, m, t: t.sum() != 0: mp.Mask(RANDOM)}),
        "a bool-like tensor is a bool",
    ),
    (
        "plain float64 checkpoint into float32[mp]",
        checkpoint(dict, random_mask, set_key("0.weight", lambda t: t.double()), loader="mp"),
        "load_state_dict casts, as torch's does",
    ),
    ("harden(sparsity=1)", call(learnable, lambda m: mp.harden(m, sparsity=1)), "drop every entry"),
    ("remove on a plain model", call(linear, mp.remove_parametrizations), "idempotent bake"),
]


def _params() -> list[object]:
    ids = [name for name, _ in CASES]
    assert len(ids) == len(set(ids)), "duplicate case ids"
    assert set(NOT_REFUSED) <= set(ids), set(NOT_REFUSED) - set(ids)
    return [
        pytest.param(
            setup,
            id=name,
            marks=[pytest.mark.xfail(strict=True, reason=" - ".join(NOT_REFUSED[name]))]
            if name in NOT_REFUSED
            else [],
        )
        for name, setup in CASES
    ]


@pytest.mark.parametrize("setup", _params())
def test_bad_input_is_refused_with_a_fix_and_the_model_unchanged(setup: Setup) -> None:
    assert outcome(setup) == "MaskparamError"


@pytest.mark.parametrize(
    ("setup", "now"),
    [
        pytest.param(setup, NOT_REFUSED[name][0], id=name)
        for name, setup in CASES
        if name in NOT_REFUSED
    ],
)
def test_the_record_of_what_happens_now_is_accurate(setup: Setup, now: str) -> None:
    assert outcome(setup) == now


@pytest.mark.parametrize(
    "setup", [pytest.param(setup, id=name) for name, setup, _ in ACCEPTED_ON_PURPOSE]
)
def test_odd_but_legitimate_input_is_accepted(setup: Setup) -> None:
    assert outcome(setup) == "accepted"
