"""maskparam: train only part of a tensor.

Constraints (masks, frozen entries, triangles, subspaces, learnable masks) live in the forward
pass as ``torch.nn.utils.parametrize`` parametrizations, so no optimizer can break them.

>>> import torch, maskparam as mp
>>> model = torch.nn.Linear(5, 5)
>>> _ = mp.apply_mask(model, {"weight": mp.Triangular(lower=True)})
>>> bool((model.weight.triu(1) == 0).all()), mp.verify(model)
(True, [])

Public modules: this one, :mod:`maskparam.masks` (mask generators) and
:mod:`maskparam.constraints` (one module per constraint; :class:`Spec` and :class:`Constraint`
to write your own). The stages behind them (``core``, ``constrain``, ``prune``, ``checkpoint``,
``export``) are described in ARCHITECTURE.md; their names are re-exported here.
"""

from __future__ import annotations

from maskparam import constraints, masks
from maskparam.checkpoint.load import load_state_dict
from maskparam.checkpoint.optimizer_state import load_optimizer_state_dict, optimizer_state_dict
from maskparam.checkpoint.trainable import load_trainable_state_dict, trainable_state_dict
from maskparam.constrain.accessors import frozen_entries, kept_entries, kept_masks, sparsity
from maskparam.constrain.apply import Preview, Rules, apply_mask, preview
from maskparam.constrain.distributed import exclude_constants_from_ddp
from maskparam.constrain.remove import remove_parametrizations
from maskparam.constrain.summary import Summary, TensorSummary, summary
from maskparam.constrain.verify import verify
from maskparam.constraints.freeze import Freeze
from maskparam.constraints.learnable import LearnableMask, harden, learned_masks, mask_penalty
from maskparam.constraints.mask import Mask
from maskparam.constraints.subspace import Subspace, subspace_theta
from maskparam.constraints.triangular import Triangular
from maskparam.core.constraint import Constraint, MaskChange, Pins, Spec
from maskparam.core.match import Selector
from maskparam.errors import MaskparamError, MaskparamWarning
from maskparam.export.shrink import ShrinkReport, shrink
from maskparam.export.sparse import CSRLinear, SparseChoice, to_sparse
from maskparam.prune.rewind import rewind
from maskparam.prune.schedule import GradualPruning, PruningRules, cubic_sparsity
from maskparam.prune.update import MaskRules, update_masks

__all__ = [
    "CSRLinear",
    "Constraint",
    "Freeze",
    "GradualPruning",
    "LearnableMask",
    "Mask",
    "MaskChange",
    "MaskRules",
    "MaskparamError",
    "MaskparamWarning",
    "Pins",
    "Preview",
    "PruningRules",
    "Rules",
    "Selector",
    "ShrinkReport",
    "SparseChoice",
    "Spec",
    "Subspace",
    "Summary",
    "TensorSummary",
    "Triangular",
    "apply_mask",
    "constraints",
    "cubic_sparsity",
    "exclude_constants_from_ddp",
    "frozen_entries",
    "harden",
    "kept_entries",
    "kept_masks",
    "learned_masks",
    "load_optimizer_state_dict",
    "load_state_dict",
    "load_trainable_state_dict",
    "mask_penalty",
    "masks",
    "optimizer_state_dict",
    "preview",
    "remove_parametrizations",
    "rewind",
    "shrink",
    "sparsity",
    "subspace_theta",
    "summary",
    "to_sparse",
    "trainable_state_dict",
    "update_masks",
    "verify",
]

__version__ = "0.3.0.dev0"  # the one place the version is written (pyproject.toml reads it)
