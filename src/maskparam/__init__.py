"""maskparam: train only part of a tensor.

Constraints (masks, frozen entries, triangles) live in the forward pass as
``torch.nn.utils.parametrize`` parametrizations, so no optimizer can break them.

>>> import torch, maskparam as mp
>>> model = torch.nn.Linear(5, 5)
>>> _ = mp.apply_mask(model, {"weight": mp.Triangular(lower=True)})
>>> bool((model.weight.triu(1) == 0).all())
True
"""

from __future__ import annotations

from maskparam import masks
from maskparam.apply import Rules, apply_mask, remove_parametrizations
from maskparam.checkpoints import load_state_dict
from maskparam.distributed import exclude_constants_from_ddp
from maskparam.errors import MaskparamError
from maskparam.learnable import LearnableMask, harden, learned_masks, mask_penalty
from maskparam.specs import Freeze, Mask, Spec, Triangular
from maskparam.subspace import Subspace
from maskparam.summary import Summary, TensorSummary, summary

__all__ = [
    "Freeze",
    "LearnableMask",
    "Mask",
    "MaskparamError",
    "Rules",
    "Spec",
    "Subspace",
    "Summary",
    "TensorSummary",
    "Triangular",
    "apply_mask",
    "exclude_constants_from_ddp",
    "harden",
    "learned_masks",
    "load_state_dict",
    "mask_penalty",
    "masks",
    "remove_parametrizations",
    "summary",
]

__version__ = "0.1.0"
