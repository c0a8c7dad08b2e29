"""One module per constraint: its spec, its parametrization module(s) and its invariant.

* :mod:`~maskparam.constraints.mask`: :class:`Mask`, entries outside the mask are zero;
* :mod:`~maskparam.constraints.freeze`: :class:`Freeze`, chosen entries keep their values;
* :mod:`~maskparam.constraints.triangular`: :class:`Triangular`, the other triangle is zero;
* :mod:`~maskparam.constraints.subspace`: :class:`Subspace`, ``θ₀ + E·θ`` (with its projections);
* :mod:`~maskparam.constraints.learnable`: :class:`LearnableMask`, trainable scores;
* :mod:`~maskparam.constraints.compact`: the compact layout any selection can use;
* :mod:`~maskparam.core.constraint`: :class:`Spec`, :class:`Constraint` and :class:`Pins`, the
  extension point for constraints of your own.
"""

from __future__ import annotations

from maskparam.constraints.freeze import Freeze
from maskparam.constraints.learnable import LearnableMask
from maskparam.constraints.mask import Mask
from maskparam.constraints.subspace import Subspace
from maskparam.constraints.triangular import Triangular
from maskparam.core.constraint import Constraint, Pins, Spec

__all__ = [
    "Constraint",
    "Freeze",
    "LearnableMask",
    "Mask",
    "Pins",
    "Spec",
    "Subspace",
    "Triangular",
]
