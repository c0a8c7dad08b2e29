"""Helpers the test files share (imported, not collected): model factories, snapshots of what a
refused call must leave unchanged, and the small training loops several files use. One copy each;
each keeps the exact behaviour the tests were written against (the snapshots differ on purpose:
each checks what its tests promise).

Import them by name (``from helpers import mlp``): tests/conftest.py puts this folder on sys.path.
"""

from __future__ import annotations

import io
import itertools
import re
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

import maskparam as mp


def mlp(
    *sizes: int,
    activation: Callable[[], nn.Module] = nn.Tanh,
    dtype: torch.dtype | None = None,
    seed: int | None = None,
) -> nn.Sequential:
    """``mlp(8, 16, 4)`` is ``Sequential(Linear(8, 16), Tanh(), Linear(16, 4))``: a Linear between
    each pair of sizes, ``activation()`` between the Linears. With ``seed``,
    ``torch.manual_seed(seed)`` first (the same weights at every call); with ``dtype``,
    ``.to(dtype)`` after."""
    if seed is not None:
        torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for i, (n_in, n_out) in enumerate(itertools.pairwise(sizes)):
        if i:
            layers.append(activation())
        layers.append(nn.Linear(n_in, n_out))
    model = nn.Sequential(*layers)
    return model if dtype is None else model.to(dtype)


# ---------------------------------------------------------------------------------------------
# The one training loop of the suite (the `train` fixture)
# ---------------------------------------------------------------------------------------------

OptimizerFactory = Callable[[list[nn.Parameter]], torch.optim.Optimizer]


def default_optimizer(params: list[nn.Parameter]) -> torch.optim.Optimizer:
    # AdamW with weight decay: the optimizer that defeats gradient masking (decoupled decay
    # moves every entry whose gradient is zero).
    return torch.optim.AdamW(params, lr=0.05, weight_decay=0.1)


def train_steps(
    model: nn.Module,
    inputs: Tensor,
    *,
    steps: int = 3,
    optimizer: torch.optim.Optimizer | OptimizerFactory = default_optimizer,
    target: Tensor | None = None,
) -> list[float]:
    """Train ``model`` for ``steps`` steps on one batch (MSE to ``target``, or to zeros); losses.

    ``optimizer`` is an optimizer or a factory of one over ``model.parameters()``. Works with
    closure-based optimizers (LBFGS) too, and with half-precision models (the loss is in float32).
    """
    if not isinstance(optimizer, torch.optim.Optimizer):
        optimizer = optimizer(list(model.parameters()))
    losses = []

    def closure() -> Tensor:
        optimizer.zero_grad()
        out = model(inputs).float()
        goal = torch.zeros_like(out) if target is None else target.float()
        loss = nn.functional.mse_loss(out, goal)
        loss.backward()
        return loss

    for _ in range(steps):
        losses.append(float(optimizer.step(closure).detach()))  # type: ignore[union-attr]
    return losses


# ---------------------------------------------------------------------------------------------
# Snapshots: what a refused call must leave unchanged
# ---------------------------------------------------------------------------------------------


@dataclass
class Snapshot:
    """Everything apply_mask could change: class per module, state_dict, Parameter identities."""

    classes: dict[str, type]
    state: dict[str, Tensor]
    param_ids: dict[str, int]

    @classmethod
    def of(cls, model: nn.Module) -> Snapshot:
        return cls(
            {name: type(m) for name, m in model.named_modules()},
            {k: v.detach().clone() for k, v in model.state_dict().items()},
            {name: id(p) for name, p in model.named_parameters()},
        )

    def assert_same(self, model: nn.Module) -> None:
        after = Snapshot.of(model)
        assert after.classes == self.classes
        assert after.param_ids == self.param_ids
        assert after.state.keys() == self.state.keys()
        for key, value in self.state.items():
            assert torch.equal(after.state[key], value), key


def state_of(model: nn.Module) -> dict[str, Tensor]:
    """Every tensor a failed call could have changed: the state_dict plus all buffers
    (non-persistent ones included, e.g. a compact layout's index)."""
    state = {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()}
    for name, buffer in model.named_buffers():
        state.setdefault(f"buffer:{name}", buffer.detach().clone())
    return state


def assert_state_unchanged(model: nn.Module, before: dict[str, Tensor]) -> None:
    after = state_of(model)
    assert after.keys() == before.keys()
    for key, value in before.items():
        assert after[key].dtype == value.dtype, key
        assert after[key].shape == value.shape, key
        assert torch.equal(after[key], value), key


def state_bits(model: nn.Module) -> dict[str, Tensor]:
    out = {}
    for name, kept in model.state_dict(keep_vars=True).items():
        value = kept.detach()
        if value.layout == torch.sparse_csr:
            out[name + ".crow"] = value.crow_indices().clone()
            out[name + ".col"] = value.col_indices().clone()
            out[name + ".values"] = value.values().clone()
        else:
            out[name] = value.clone()
    return out


def assert_same_bits(model: nn.Module, before: dict[str, Tensor]) -> None:
    after = state_bits(model)
    assert list(after) == list(before)
    for key, saved in before.items():
        a, b = after[key], saved
        assert a.dtype == b.dtype, key
        assert a.shape == b.shape, key
        if a.is_floating_point():  # bitwise: NaN and -0.0 count
            a, b = a.view(torch.uint8), b.view(torch.uint8)
        assert torch.equal(a, b), key


def snapshot_with_summary(model: nn.Module) -> dict[str, object]:
    return {
        "state": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "params": [(n, id(p), tuple(p.shape)) for n, p in model.named_parameters()],
        "repr": repr(model),
        "summary": str(mp.summary(model)) if is_constrained(model) else None,
    }


def is_constrained(model: nn.Module) -> bool:
    return any(hasattr(m, "parametrizations") for m in model.modules())


def same_snapshot_with_summary(
    a: dict[str, object], b: dict[str, object], *, summary: bool = True
) -> bool:
    sa, sb = a["state"], b["state"]
    assert isinstance(sa, dict)
    assert isinstance(sb, dict)
    if sa.keys() != sb.keys():
        return False
    for key in sa:
        if sa[key].shape != sb[key].shape or not torch.equal(
            sa[key].view(torch.uint8) if sa[key].dtype.is_floating_point else sa[key],
            sb[key].view(torch.uint8) if sb[key].dtype.is_floating_point else sb[key],
        ):
            return False
    same_summary = a["summary"] == b["summary"] or not summary
    return a["params"] == b["params"] and a["repr"] == b["repr"] and same_summary


def bitwise_equal(a: Tensor, b: Tensor) -> bool:
    ints = {2: torch.int16, 4: torch.int32, 8: torch.int64}
    return (
        a.shape == b.shape
        and a.dtype == b.dtype
        and torch.equal(
            a.reshape(-1).view(ints[a.element_size()]), b.reshape(-1).view(ints[b.element_size()])
        )
    )


# ---------------------------------------------------------------------------------------------
# Refusals: a clear MaskparamError, or an exact result
# ---------------------------------------------------------------------------------------------


def refusal_of(fn: Callable[[], object]) -> mp.MaskparamError | None:
    """The MaskparamError ``fn()`` raises, or None when it returns (other errors propagate)."""
    try:
        fn()
    except mp.MaskparamError as refusal:
        return refusal
    return None


def outcome_is_exact_or_refused(
    fn: Callable[[], object],
    check: Callable[[], None],
    model: nn.Module,
    match: str | None = None,
) -> str:
    """Pass if ``fn()`` raises MaskparamError (the model then unchanged bit for bit, the message
    matching ``match``), or if ``fn()`` succeeds and ``check()`` holds. Returns which."""
    before = state_of(model)
    refusal = refusal_of(fn)
    if refusal is not None:
        if match is not None:
            assert re.search(match, str(refusal)), str(refusal)
        assert_state_unchanged(model, before)
        return "refused"
    check()
    return "exact"


def zeros_like_selected(tensor: Tensor, selected: Tensor) -> Tensor:
    return torch.zeros(int(selected.sum()), dtype=tensor.dtype)


# ---------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------


def sparse_linear(i: int = 16, o: int = 8, *, bias: bool = True, dtype=torch.float32) -> nn.Linear:
    layer = nn.Linear(i, o, bias=bias).to(dtype)
    with torch.no_grad():
        layer.weight.mul_((torch.rand(o, i) > 0.9).to(dtype))
    return layer


def subspace_linear(projection: str) -> nn.Linear:
    layer = mp.apply_mask(nn.Linear(4, 3), {"weight": mp.Subspace(3, projection=projection)})
    with torch.no_grad():
        layer.parametrizations.weight[0].coordinates.theta.normal_()
    return layer


class TiedEmbeddingLM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 6)
        self.mid = nn.Linear(6, 6)
        self.head = nn.Linear(6, 10, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, ids: Tensor) -> Tensor:
        return self.head(torch.tanh(self.mid(self.emb(ids))))


# ---------------------------------------------------------------------------------------------
# Training loops: a sum of squares on the inputs given
# ---------------------------------------------------------------------------------------------


def square_sum_steps(
    model: nn.Module, optimizer: torch.optim.Optimizer, x: Tensor, steps: int = 3
) -> None:
    for _ in range(steps):
        optimizer.zero_grad()
        model(x).float().square().sum().backward()
        optimizer.step()


# ---------------------------------------------------------------------------------------------
# The pruning tests: 16 fixed inputs of 8 features (mlp(8, ...) models), their loss and loop
# ---------------------------------------------------------------------------------------------


def pruning_inputs(dtype: torch.dtype = torch.float32, n: int = 16) -> Tensor:
    return torch.randn(n, 8, generator=torch.Generator().manual_seed(3)).to(dtype)


def pruning_loss(model: nn.Module, dtype: torch.dtype = torch.float32) -> Tensor:
    return model(pruning_inputs(dtype)).float().square().mean()


def pruning_steps(model: nn.Module, optimizer: torch.optim.Optimizer, steps: int = 3) -> None:
    for _ in range(steps):
        if isinstance(optimizer, torch.optim.LBFGS):

            def closure() -> Tensor:
                optimizer.zero_grad()
                loss = pruning_loss(model)
                loss.backward()
                return loss

            optimizer.step(closure)
        else:
            optimizer.zero_grad()
            pruning_loss(model, next(model.parameters()).dtype).backward()
            optimizer.step()


def prune_run(model: nn.Module, pruning: mp.GradualPruning, steps: int, opt=None) -> None:
    optimizer = opt or torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    pruning.optimizer = optimizer  # its state follows the masks
    for _ in range(steps):
        optimizer.zero_grad()
        pruning_loss(model, next(model.parameters()).dtype).backward()
        optimizer.step()
        pruning.step()


def linear_weights(model: nn.Module) -> list[Tensor]:
    with torch.no_grad():
        return [m.weight.detach().clone() for m in model.modules() if isinstance(m, nn.Linear)]


def zeros_in_linears(model: nn.Module) -> int:
    with torch.no_grad():
        return sum(int((m.weight == 0).sum()) for m in model.modules() if isinstance(m, nn.Linear))


# ---------------------------------------------------------------------------------------------
# The layout tests: an 8x8 Linear with 31 of its 64 entries kept, trained on fixed inputs
# ---------------------------------------------------------------------------------------------

X_16x8 = torch.randn(16, 8, generator=torch.Generator().manual_seed(7))


def keep_31_of_64(seed: int = 1) -> torch.Tensor:
    return torch.rand(8, 8, generator=torch.Generator().manual_seed(seed)) < 0.5  # 31 of 64 kept


def loss_on_x_16x8(model: nn.Module) -> torch.Tensor:
    return model(X_16x8).pow(2).mean()


def steps_on_x_16x8(model: nn.Module, opt: torch.optim.Optimizer, n: int) -> None:
    for _ in range(n):
        opt.zero_grad()
        loss_on_x_16x8(model).backward()
        opt.step()


# ---------------------------------------------------------------------------------------------
# Fine-tunes for trainable_state_dict: a base mlp(16, 32, 32, 4) and an mlp(7, 9, 5)
# ---------------------------------------------------------------------------------------------

X_8x16 = torch.randn(8, 16, generator=torch.Generator().manual_seed(5))


def adamw_steps_to_one(model: nn.Module, steps: int = 5) -> None:
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=0.05, weight_decay=0.1
    )
    for _ in range(steps):
        optimizer.zero_grad()
        (model(X_8x16) - 1).square().mean().backward()
        optimizer.step()


def through_file_with_size(state: dict[str, Tensor]) -> tuple[dict[str, Tensor], int]:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    size = len(buffer.getvalue())
    buffer.seek(0)
    return torch.load(buffer, weights_only=True), size


def trained_base(rules: mp.Rules) -> nn.Sequential:
    model = mp.apply_mask(mlp(16, 32, 32, 4, activation=nn.ReLU, seed=0), rules)
    adamw_steps_to_one(model)
    return model


X_6x7 = torch.randn(6, 7, generator=torch.Generator().manual_seed(3))


def sgd_wd_steps(model: nn.Module, steps: int = 3) -> None:
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=0.05, momentum=0.9, weight_decay=0.1)  # fp16-safe
    dtype = next(model.parameters()).dtype
    for _ in range(steps):
        optimizer.zero_grad()
        model(X_6x7.to(dtype)).float().square().mean().backward()
        optimizer.step()


def through_file(obj: object) -> object:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


# ---------------------------------------------------------------------------------------------
# Specs in either layout
# ---------------------------------------------------------------------------------------------

LAYOUT_SPECS = {
    "mask": lambda layout: mp.Mask(mp.masks.random(0.5, seed=1), layout=layout),
    "freeze": lambda layout: mp.Freeze(mp.masks.random(0.5, seed=2), layout=layout),
    "triangular": lambda layout: mp.Triangular(layout=layout),
}


def is_compact(model: nn.Module, index: int = 0) -> bool:
    return model[index].parametrizations.weight[0].stored_positions() is not None
