"""The base classes of a constraint of your own: :class:`Spec`, :class:`Constraint` and
:class:`Pins` (defined in :mod:`maskparam.core.constraint`, re-exported here)."""

from __future__ import annotations

from maskparam.core.constraint import Constraint, Layout, Pins, Spec

__all__ = ["Constraint", "Layout", "Pins", "Spec"]
