"""Learnable masks: trainable scores decide which entries to keep; an L1 penalty makes them sparse;
``harden`` turns them into fixed :class:`~maskparam.Mask` constraints for export.

Two modes:

* ``"hard"``: the mask is ``scores > 0``, exactly 0/1 in the forward pass; the scores learn through
  a straight-through estimator (the backward treats the step as the identity). Scores start at
  ``init=1.0``, so the mask starts all ones and applying does not change the model's outputs.
* ``"soft"``: the mask is ``sigmoid(scores / temperature)``, strictly between 0 and 1: no entry is
  exactly zero until :func:`harden`. Scores start at ``init=3.0 * temperature``, so every weight
  starts scaled by ``sigmoid(3) ≈ 0.953`` and the outputs change accordingly at apply time.

>>> import torch, maskparam as mp
>>> layer = torch.nn.Linear(4, 4)
>>> _ = mp.apply_mask(layer, {"weight": mp.LearnableMask()})
>>> mp.learned_masks(layer)["weight"].sum().item()  # starts all ones
16.0
>>> mp.harden(layer, sparsity=0.25)["weight"]  # keep the 12 highest scores
0.75
"""

from __future__ import annotations

import copy
import itertools
import sys
from dataclasses import dataclass
from types import FrameType
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.optim.swa_utils import AveragedModel
from typing_extensions import override

from maskparam.constraints.kernels import straight_through_mask
from maskparam.constraints.mask import MaskConstraint
from maskparam.core.constraint import Constraint, Pins, Spec, zeros_pinned
from maskparam.core.parametrize import link_stack, parametrization_list
from maskparam.core.tensors import find_tensors
from maskparam.errors import check_bool, check_finite, check_module, error
from maskparam.masks.generators import check_fraction

__all__ = ["LearnableMask", "harden", "learned_masks", "mask_penalty"]

Mode = Literal["hard", "soft"]


class LearnableMaskConstraint(Constraint):
    """The original scaled by g(scores) (soft), or selected bitwise where ``scores > 0`` (hard)."""

    def __init__(self, scores: Tensor, *, mode: Mode, temperature: float) -> None:
        super().__init__()
        self.scores = nn.Parameter(scores)
        self.mode = mode
        self.temperature = temperature

    def mask_values(self) -> Tensor:
        """The mask as the forward pass uses it (differentiable with respect to the scores)."""
        if self.mode == "soft":
            return torch.sigmoid(self.scores / self.temperature)
        hard = (self.scores > 0).to(self.scores.dtype)
        # Straight-through: the value is exactly `hard` (s - s is exactly 0 for finite s), the
        # gradient is the identity. Plain autograd ops, so compile, vmap and functional_call work.
        return hard + (self.scores - self.scores.detach())

    @override
    def forward(self, x: Tensor) -> Tensor:
        if self.mode == "soft":
            return x * self.mask_values()
        # x where the score is above 0, exactly +0.0 elsewhere (bitwise, so a NaN or inf stored
        # at a dropped entry cannot leak in); the scores learn straight through.
        return straight_through_mask(x, self.scores)

    def __deepcopy__(self, memo: dict[int, Any]) -> LearnableMaskConstraint:
        # torch.optim.swa_utils.AveragedModel deep-copies the model, then averages the scores and
        # the weights separately: the mask of averaged scores is not the average of the masked
        # weights (scores +0.5 and -1.5 average to a mask of zeros, the weights to W/2), and
        # torch gives no hook to refuse the averaging itself. Refuse the copy it starts with.
        if _called_by(AveragedModel.__init__):
            raise error(
                "AveragedModel over a LearnableMask",
                "SWA/EMA would average the mask scores and the weights separately, which is not "
                "averaging the masked weights (the averaged model would be silently wrong).",
                fix="mp.harden(model) first (a fixed mask averages exactly), or average baked "
                "copies of the model.",
            )
        copied = type(self).__new__(type(self))
        memo[id(self)] = copied
        for key, value in self.__dict__.items():
            copied.__dict__[key] = copy.deepcopy(value, memo)
        return copied

    @override
    def saved_entries(self, free: Tensor) -> Tensor:
        # Its weights train at every entry: a later step may bring a dropped one back.
        return free

    @override
    def trainable_extras(self, tensor_name: str) -> dict[str, Tensor]:
        return {f"{tensor_name}.scores": self.scores} if self.scores.requires_grad else {}

    def keep(self) -> Tensor:
        """The binary mask that ``harden`` with the default threshold would fix."""
        return self.scores.detach() > 0

    @override
    def pins(self, value: Tensor) -> Pins | None:
        # Hard: entries whose score is not above 0 are exactly zero (and get no gradient until
        # their score comes back); soft: no entry is exactly zero until harden().
        return zeros_pinned(~self.keep(), value) if self.mode == "hard" else None

    @override
    def describe(self) -> str:
        density = float(self.keep().float().mean()) if self.scores.numel() else 0.0
        return f"LearnableMask({self.mode}, density {100 * density:.1f}%)"


@dataclass(frozen=True)
class LearnableMask(Spec):
    """Effective tensor = original ⊙ g(scores) with trainable scores; see :mod:`maskparam.constraints.learnable`.

    The scores are parameters of the model (``model.parameters()`` yields them), so the optimizer
    created after :func:`~maskparam.apply_mask` trains them with the weights.
    """

    mode: Mode = "hard"
    temperature: float = 1.0
    init: float | None = None

    def __post_init__(self) -> None:
        if self.mode not in ("hard", "soft"):
            raise error(
                "LearnableMask", f"unknown mode {self.mode!r}.", fix="use 'hard' or 'soft'."
            )
        check_finite(self.temperature, "LearnableMask", "temperature", positive=True)
        if self.init is not None:
            check_finite(self.init, "LearnableMask", "init")

    @override
    def build(self, name: str, tensor: Tensor) -> Constraint:
        if not tensor.is_floating_point():
            raise error(
                f"LearnableMask for {name!r}",
                f"needs a real floating-point tensor; got {tensor.dtype}.",
                fix="select floating-point weights only.",
            )
        init = (
            self.init
            if self.init is not None
            else (1.0 if self.mode == "hard" else 3.0 * self.temperature)
        )
        limit = torch.finfo(tensor.dtype).max
        if not abs(init) <= limit or not self.temperature <= limit:
            raise error(
                f"LearnableMask for {name!r}",
                f"init={init!r} or temperature={self.temperature!r} does not fit {tensor.dtype} "
                f"(largest {limit:.3g}).",
                fix="pass values within the tensor's dtype (the default init is 3 * temperature).",
            )
        scores = torch.full_like(tensor, init, memory_format=torch.contiguous_format)
        return LearnableMaskConstraint(scores, mode=self.mode, temperature=self.temperature)


Found = tuple[str, list[tuple[nn.Module, str]], int, LearnableMaskConstraint]


def _learned(model: nn.Module) -> list[Found]:
    """Every learnable mask of ``model``: (tensor name, its holders, position, mask).

    A tied tensor has several holders (module, local name), which share one mask object.
    """
    found = []
    for ref in find_tensors(model):
        for position, parametrization in enumerate(ref.parametrizations):
            if isinstance(parametrization, LearnableMaskConstraint):
                found.append((ref.name, ref.holders, position, parametrization))
    return found


def _require_learned(model: nn.Module, caller: str) -> list[Found]:
    check_module(model, caller)
    found = _learned(model)
    if not found:
        raise error(
            caller,
            f"{type(model).__name__} has no learnable mask.",
            fix="apply one first, e.g. mp.apply_mask(model, {'*.weight': mp.LearnableMask()}).",
        )
    return found


def learned_masks(model: nn.Module) -> dict[str, Tensor]:
    """The current mask values of every learnable mask, by tensor name (detached)."""
    check_module(model, "learned_masks")
    return {name: mask.mask_values().detach() for name, _, _, mask in _learned(model)}


def mask_penalty(model: nn.Module, *, normalize: bool = False) -> Tensor:
    """L1 norm of the mask values of every learnable mask: add ``λ * mask_penalty(model)`` to the loss.

    Mask values are non-negative, so the L1 norm is their sum. With ``normalize=True`` it is divided
    by the number of masked entries (the mean mask value, the expected density). Hard masks
    propagate its gradient straight through to their scores.
    """
    masks = [mask.mask_values() for *_, mask in _require_learned(model, "mask_penalty")]
    check_bool(normalize, "mask_penalty", "normalize")
    total = torch.stack([m.sum(dtype=torch.float32) for m in masks]).sum()
    if normalize:
        total = total / sum(m.numel() for m in masks)
    return total


def harden(
    model: nn.Module,
    *,
    threshold: float = 0.0,
    sparsity: float | None = None,
    per_tensor: bool = False,
    fold: bool = True,
) -> dict[str, float]:
    """Replace every learnable mask by a fixed binary :class:`~maskparam.Mask`; in place.

    By default an entry is kept where its score exceeds ``threshold`` (0: the hard mask as it is,
    or a soft mask above 0.5). With ``sparsity`` the scores are ranked instead and the
    ``sparsity`` fraction with the lowest scores is dropped, across all learnable masks of the
    model at once, or tensor by tensor with ``per_tensor=True``.

    A soft mask scales every weight by ``sigmoid(score / T)``. With ``fold=True`` (the default)
    that scale is folded into the kept weights, so they compute what they computed before
    (``w * m``, the same float product); with ``fold=False`` the weights are left as they are and
    the kept entries lose their scale. Hard masks scale by exactly 1: nothing to fold.

    The scores leave the model; then :func:`~maskparam.remove_parametrizations` exports a plain
    model whose outputs equal the hardened model's exactly. Returns the density of each mask.
    """
    found = _require_learned(model, "harden")
    if sparsity is not None:
        check_fraction(sparsity, "sparsity")
    check_bool(fold, "harden", "fold")
    check_bool(per_tensor, "harden", "per_tensor")
    check_finite(threshold, "harden", "threshold")
    if per_tensor and sparsity is None:
        raise error(
            "harden",
            "per_tensor=True ranks scores tensor by tensor, which needs a target sparsity.",
            fix="pass sparsity= too, or drop per_tensor (the threshold applies per entry).",
        )
    folds = [_fold_target(name, holders, position, mask) for name, holders, position, mask in found]
    if not fold:
        folds = [None for _ in found]
    scores = [mask.scores.detach() for *_, mask in found]
    if sparsity is None:
        keeps = [s > threshold for s in scores]
    elif per_tensor:
        keeps = [_top(s.reshape(-1), sparsity).reshape(s.shape) for s in scores]
    else:
        kept = _top(torch.cat([s.reshape(-1).float() for s in scores]), sparsity)
        ends = list(itertools.accumulate(s.numel() for s in scores))
        keeps = [
            kept[end - s.numel() : end].reshape(s.shape)
            for s, end in zip(scores, ends, strict=True)
        ]
    densities = {}
    for (name, holders, position, mask), keep, target in zip(found, keeps, folds, strict=True):
        if target is not None:
            with torch.no_grad():  # kept entries become w * m: exactly the product computed before
                target.copy_(torch.where(keep, target * mask.mask_values(), target))
        # One object on every holder: a tied tensor stays tied.
        fixed = MaskConstraint(keep, description="Mask(keeps the hardened learnable mask)")
        fixed.mask_changed = True  # learned, not computed by a rule
        for module, local in holders:
            parametrization_list(module, local)[position] = fixed
            link_stack(module, local)
        densities[name] = float(keep.float().mean()) if keep.numel() else 0.0
    return densities


def _fold_target(
    name: str, holders: list[tuple[nn.Module, str]], position: int, mask: LearnableMaskConstraint
) -> Tensor | None:
    """The stored original to fold a soft mask's scale into, or None for a hard mask."""
    if mask.mode == "hard":
        return None
    module, local = holders[0]
    plist = parametrization_list(module, local)
    if position != 0 or not plist.is_tensor:
        raise error(
            f"harden {name!r}",
            "a soft mask that is not the tensor's first constraint cannot fold its scale into "
            "the stored weights (they feed the constraints before it).",
            fix="pass fold=False to keep the weights unscaled, or put the LearnableMask first.",
        )
    original: Tensor = plist.original
    return original


def _called_by(function: Any, depth: int = 40) -> bool:
    """Whether ``function``'s code is running in one of the callers' frames."""
    target = function.__code__
    frame: FrameType | None = sys._getframe(2)
    for _ in range(depth):
        if frame is None:
            return False
        if frame.f_code is target:
            return True
        frame = frame.f_back
    return False


def _top(values: Tensor, sparsity: float) -> Tensor:
    """Bool mask keeping all but the ``round(sparsity * n)`` lowest values (ties: topk's order)."""
    dropped = round(sparsity * values.numel())
    keep = torch.ones_like(values, dtype=torch.bool)
    if dropped:
        keep[torch.topk(values, k=dropped, largest=False).indices] = False
    return keep
