"""Checkpoints of either layout load into either layout.

``layout="auto"`` stores a tensor compact where that pays, and dense where compact is not
possible (on the meta device, tied, stacked second): the same rules can therefore save a
tensor in one layout and meet a model that holds it in the other (a model built on the meta
device loading a checkpoint of one built on real weights). Both hold the same information, so
the checkpoint is translated, in the dict torch loads from, before anything is checked or
copied. Each constraint knows its own other layout
(:meth:`~maskparam.Constraint.from_other_layout`); this module only finds the entries and
writes the translation back. Anything a constraint does not recognise is left as it is, for
the checks that refuse it.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from maskparam.core.constraint import load_error
from maskparam.core.parametrize import (
    maskparam_constraints,
    parametrization_list,
    parametrized_names,
)

__all__ = ["translate_layouts"]


def translate_layouts(model: nn.Module, state_dict: dict[str, Any], prefix: str) -> None:
    """Rewrite, in place, the entries of ``state_dict`` saved in the other layout."""
    for name, module in model.named_modules(prefix=prefix.rstrip(".")):
        here = f"{name}." if name else ""
        for tensor_name in parametrized_names(module):
            constraints = maskparam_constraints(module, tensor_name)
            stack = parametrization_list(module, tensor_name)
            if not constraints or constraints[0] is not stack[0]:
                continue  # a parametrization of the user's own comes first
            first = constraints[0]
            original_key = f"{here}parametrizations.{tensor_name}.original"
            level = f"{here}parametrizations.{tensor_name}.0."
            original = state_dict.get(original_key)
            if not isinstance(original, Tensor):
                continue
            local = {
                key[len(level) :]: value
                for key, value in state_dict.items()
                if key.startswith(level)
                and "." not in key[len(level) :]
                and isinstance(value, Tensor)
            }
            stored = stack.original
            shape = first.mask_shape() if first.stored_positions() is not None else stored.shape
            assert shape is not None  # a layout that stores positions knows its full shape
            translated = first.from_other_layout(local, original, shape)
            if translated is None:
                continue
            if isinstance(translated, str):
                raise load_error(level, type(first).__name__, [translated])
            entries, state_dict[original_key] = translated
            for key in local:
                del state_dict[level + key]
            for key, value in entries.items():
                state_dict[level + key] = value
