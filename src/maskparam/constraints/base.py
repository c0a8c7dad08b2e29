"""The two base classes every constraint is made of: a :class:`Spec` and a :class:`Constraint`.

A *spec* (``mp.Mask(...)``) is an immutable description written in the rules; for each tensor it
selects, :func:`maskparam.apply_mask` asks it to :meth:`~Spec.build` a *constraint*: the
``torch.nn.utils.parametrize`` module that maps the stored original to the effective tensor in
the forward pass. A constraint also states its invariant as code (:meth:`Constraint.pins`),
which :func:`maskparam.verify` checks exactly.

Adding a constraint of your own takes one subclass of each (see the README's "How it is built"):

>>> import torch, maskparam as mp
>>> class ZeroDiagonal(mp.Constraint):
...     def forward(self, x):
...         return torch.where(torch.eye(*x.shape[-2:], dtype=torch.bool), 0.0, x)
...     def pins(self, value):
...         diagonal = torch.eye(*value.shape[-2:], dtype=torch.bool).expand_as(value)
...         return mp.Pins(diagonal, torch.zeros_like(value))
...     def describe(self):
...         return "ZeroDiagonal"
>>> class NoSelfLoops(mp.Spec):
...     def build(self, name, tensor):
...         return ZeroDiagonal()
>>> layer = mp.apply_mask(torch.nn.Linear(3, 3), {"weight": NoSelfLoops()})
>>> layer.weight.diagonal().tolist(), mp.verify(layer)
([0.0, 0.0, 0.0], [])
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from torch import Tensor, nn

from maskparam.errors import error

__all__ = ["Constraint", "Layout", "Pins", "Spec"]

Layout = Literal["dense", "compact"]


@dataclass(frozen=True)
class Pins:
    """A constraint's invariant: the entries it fixes, and the values they must hold exactly.

    ``entries`` is a bool tensor of the tensor's shape (or broadcastable to it); ``values`` the
    values those entries must equal. ``captured=True`` marks values the constraint recorded from
    its input at apply time (frozen values): they must then agree with whatever earlier
    constraints in the same stack pin, and are compared bit for bit (the sign of ``-0.0`` too);
    otherwise the values are a rule (masked entries are 0) and compared with ``==``.
    """

    entries: Tensor
    values: Tensor
    captured: bool = False


class Constraint(nn.Module):
    """Base of every parametrization maskparam registers: ``forward(original) -> effective``.

    :func:`maskparam.remove_parametrizations` removes exactly the instances of this class, so a
    user's own parametrizations (``weight_norm``, ``orthogonal``) on the same tensor survive.
    Subclasses implement :meth:`forward`, :meth:`pins` and :meth:`describe`; the other methods
    have defaults that fit a constraint which stores the original unchanged.
    """

    #: True when the stored original is not the tensor's shape (the compact layout): the
    #: lifecycle then keeps the full values for a rollback and refuses to stack it second.
    reshapes_original: ClassVar[bool] = False

    def right_inverse(self, value: Tensor) -> Tensor:
        # Assigning ``module.weight = value`` stores ``value`` as the original; the constraint
        # then applies to it in the forward pass (masked entries stay zero, frozen ones frozen).
        return value

    def pins(self, value: Tensor) -> Pins | None:
        """The invariant: which entries of this constraint's output are fixed, and to what.

        ``value`` is this constraint's input (the stored original, or the previous constraint's
        output in a stack). ``None``: nothing is fixed (a soft learnable mask).
        """
        raise NotImplementedError

    def free_entries(self, free: Tensor) -> Tensor:
        """Given a bool tensor of the entries that train before this constraint, those after.

        The default: every entry that :meth:`pins` does not fix stays free.
        """
        pins = self.pins(free.float())
        if pins is None:
            return free
        return free & ~pins.entries.expand(free.shape).to(free.device)

    def trained_parameters(self) -> list[Tensor]:
        """Parameters this constraint adds and trains (a learnable mask's scores, a θ)."""
        return [p for p in self.parameters() if p.requires_grad]

    def group_key(self) -> str | None:
        """The name of the group whose tensors share this constraint's coordinates, if any."""
        return None

    def on_registered(self, original: Tensor) -> None:
        """Called once registered, with the stored original (e.g. to freeze it)."""

    def on_removed(self, original: Tensor) -> None:
        """Called once removed, with the (baked or restored) tensor: undo ``on_registered``."""

    def describe(self) -> str:
        """A short human-readable description for :func:`maskparam.summary`."""
        raise NotImplementedError


class Spec:
    """Base of all specs: :meth:`build` returns the :class:`Constraint` for one tensor.

    A spec validates its own arguments when constructed and the tensor in :meth:`build`, so a
    bad rule fails before :func:`maskparam.apply_mask` changes anything. A spec whose
    :meth:`group_key` is not ``None`` is built for all the tensors that share the key at once,
    by :meth:`build_group` (a Subspace group shares one θ).
    """

    #: ``"dense"``: the original keeps its shape (fastest compute). ``"compact"``: the original
    #: stores only the free entries, so optimizer state shrinks with them.
    layout: Layout = "dense"

    def group_key(self) -> str | None:
        """Tensors whose specs return the same key are built together; ``None``: one by one."""
        return None

    def build(self, name: str, tensor: Tensor) -> Constraint:
        """Validate ``tensor`` (named ``name`` in errors) and build its constraint.

        ``tensor`` is the tensor's value as this spec sees it (after any earlier stacked spec).
        Raise :class:`~maskparam.MaskparamError` for a tensor this spec cannot constrain.
        """
        raise NotImplementedError

    def build_group(
        self, members: Sequence[tuple[str, Tensor]], specs: Sequence[Spec]
    ) -> list[Constraint]:
        """Build the constraints of a group: ``members`` are (name, tensor) pairs."""
        return [
            spec.build(name, tensor) for (name, tensor), spec in zip(members, specs, strict=True)
        ]


def check_layout(spec: Spec) -> None:
    """Refuse a layout other than ``"dense"`` and ``"compact"``, naming the spec."""
    if spec.layout not in ("dense", "compact"):
        raise error(
            type(spec).__name__,
            f"unknown layout {spec.layout!r}.",
            fix="use layout='dense' (the default) or layout='compact'.",
        )


def zeros_pinned(entries: Tensor, value: Tensor) -> Pins:
    """Pins that fix ``entries`` to zero (a mask, a triangle)."""
    return Pins(
        entries, torch.zeros((), dtype=value.dtype, device=value.device).expand(value.shape)
    )
