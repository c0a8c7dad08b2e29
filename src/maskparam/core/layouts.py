"""Checkpoints of either layout load into either layout; the checkpoint's layout wins.

``layout="auto"`` stores a tensor compact where at most 60% of its entries are free and
compact is possible (not on the meta device, not tied, first in its stack): the same rules can
therefore save a tensor in one layout and meet a model that holds it in the other (masks
computed from other weights select another fraction; a model built on the meta device). Both
hold the same information, so the checkpoint is first translated, in the dict torch loads from,
and checked as this model's layout. Once every check passed, each tensor whose first constraint
can be rebuilt in the checkpoint's layout (:meth:`~maskparam.Constraint.in_other_layout`) takes
it: the constraint is replaced in the stack, the stored Parameter (the same object, which
optimizers hold) takes the checkpoint's shape, and the checkpoint's own entries go back into the
dict for torch to copy. An optimizer state saved with the checkpoint then fits the model
(``optimizer.load_state_dict``, as Lightning and the HF Trainer call it). Each constraint knows
its own other layout (:meth:`~maskparam.Constraint.from_other_layout`); this module only finds
the entries and writes them back. Anything a constraint does not recognise is left as it is,
for the checks that refuse it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from maskparam.core.constraint import Constraint, load_error
from maskparam.core.parametrize import (
    link_stack,
    maskparam_constraints,
    parametrization_list,
    parametrized_names,
)

__all__ = ["LayoutSwitch", "switch_layouts", "translate_layouts"]


@dataclass
class LayoutSwitch:
    """A tensor whose checkpoint is in the other layout: the checkpoint's own entries, and its
    first constraint rebuilt in that layout (None: it keeps its layout, translated)."""

    module: nn.Module
    tensor_name: str
    saved: dict[str, Tensor]  # the checkpoint's keys of this tensor -> their values, untranslated
    translated: list[str]  # the keys the translation wrote
    twin: Constraint | None
    shape: torch.Size  # the checkpoint's stored original's


def translate_layouts(
    model: nn.Module, state_dict: dict[str, Any], prefix: str
) -> list[LayoutSwitch]:
    """Rewrite, in place, the entries of ``state_dict`` saved in the other layout into this
    model's, and return what :func:`switch_layouts` needs to make the checkpoint's layout win
    instead (nothing of the model changes here)."""
    switches = []
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
            saved = {level + key: value for key, value in local.items()}
            saved[original_key] = original
            twin = None
            if not stored.is_meta:  # a compact layout needs real values to know positions
                on_device = {
                    key: value.to(
                        device=stored.device,
                        dtype=stored.dtype if value.is_floating_point() else value.dtype,
                    )
                    for key, value in local.items()
                }
                twin = first.in_other_layout(on_device, shape)
                if twin is not None:  # a layout "auto" chose stays "auto"'s to choose again
                    twin.auto_layout = first.auto_layout
            if twin is not None and twin.stored_positions() is not None:
                # Compact only where apply_mask would store it so: a trainable Parameter that
                # nothing else holds (a tied tensor's other holder would see the vector).
                tied = (
                    sum(p is stored for _, p in model.named_parameters(remove_duplicate=False)) > 1
                )
                if tied or not (isinstance(stored, nn.Parameter) and stored.requires_grad):
                    twin = None
            entries, state_dict[original_key] = translated
            for key in local:
                del state_dict[level + key]
            for key, value in entries.items():
                state_dict[level + key] = value
            written = [original_key, *(level + key for key in entries)]
            switches.append(LayoutSwitch(module, tensor_name, saved, written, twin, original.shape))
    return switches


def switch_layouts(state_dict: dict[str, Any], switches: list[LayoutSwitch]) -> None:
    """Give each tensor of ``switches`` the checkpoint's layout (after every check passed): its
    rebuilt first constraint, its stored Parameter resized in place to the checkpoint's
    original, and the checkpoint's untranslated entries back in ``state_dict`` for torch to
    copy. Nothing here can fail."""
    for switch in switches:
        if switch.twin is None:
            continue
        for key in switch.translated:
            state_dict.pop(key, None)
        state_dict.update(switch.saved)
        stack = parametrization_list(switch.module, switch.tensor_name)
        stored, old, twin = stack.original, stack[0], switch.twin
        if isinstance(old, Constraint):
            ones = torch.ones(old.mask_shape() or stored.shape, dtype=torch.bool)
            with torch.no_grad():
                same = torch.equal(
                    old.free_entries(ones.to(stored.device)),
                    twin.free_entries(ones.to(stored.device)),
                )
            if old.mask_changed or not same:
                twin.took_checkpoint_mask()
        stack[0] = twin
        link_stack(switch.module, switch.tensor_name)
        with torch.no_grad():  # torch's load then copies the values in
            stored.set_(stored.new_empty(switch.shape))  # type: ignore[call-overload]
        stored.grad = None  # laid out for the other layout
