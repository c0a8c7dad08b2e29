"""Atomic loads: check every constraint's part of a checkpoint before torch copies anything.

torch's ``load_state_dict`` copies module by module, so a constraint that refuses its entries
(a corrupt mask, another seed or projection, a compact original of another density) would leave
the modules loaded before it changed. :func:`guard_loads` registers one pre-hook on the model
that :func:`maskparam.apply_mask` constrained; it runs before any module loads, checks every
constraint below it, and raises with the model unchanged.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from maskparam.core.constraint import Constraint, FixedTensors, broadcasts_to, load_error
from maskparam.core.inference import refuse_inference_mode
from maskparam.core.layouts import LayoutSwitch, switch_layouts, translate_layouts
from maskparam.core.parametrize import (
    maskparam_constraints,
    parametrization_list,
    parametrized_names,
)
from maskparam.core.progress import PROGRESS_BUFFER, counted_tensors
from maskparam.core.ties import fill_tied_keys, restore_ties
from maskparam.errors import error

__all__ = ["check_checkpoint", "guard_loads", "unguard_loads"]

_GUARDED = "_maskparam_load_guard"


def guard_loads(model: nn.Module) -> None:
    """Check constraint entries of every checkpoint loaded into ``model`` first (once per model).

    A post-hook ties a tied tensor's holders to one Parameter again after the load (with
    ``assign=True`` torch gives each key a Parameter of its own). The hooks' handles are kept on
    the model (a plain attribute, which a deep copy carries), so that :func:`unguard_loads` takes
    them off once nothing of maskparam is left to check.
    """
    if isinstance(model.__dict__.get(_GUARDED), tuple):
        return  # (maskparam 0.2 kept True here; its pickles are guarded anew)
    handle = model.register_load_state_dict_pre_hook(check_checkpoint)  # type: ignore[no-untyped-call]
    after = model.register_load_state_dict_post_hook(_tie_again)  # type: ignore[no-untyped-call]
    object.__setattr__(model, _GUARDED, (handle.id, after.id))


def _tie_again(model: nn.Module, incompatible: Any) -> None:
    del incompatible
    restore_ties(model)


def unguard_loads(model: nn.Module) -> None:
    """Remove the load guard from every module of ``model`` that no longer holds a constraint:
    a baked model is plain torch again (its pickle names nothing of maskparam)."""
    for module in model.modules():
        hook_ids = module.__dict__.get(_GUARDED)
        if hook_ids is None or any(isinstance(m, Constraint) for m in module.modules()):
            continue
        if isinstance(hook_ids, tuple):
            module._load_state_dict_pre_hooks.pop(hook_ids[0], None)
            module._load_state_dict_post_hooks.pop(hook_ids[1], None)
        del module.__dict__[_GUARDED]


def check_checkpoint(
    model: nn.Module, state_dict: Mapping[str, Any], prefix: str, *_: Any, **__: Any
) -> None:
    """Raise, naming the constraint and what is wrong, if any of its entries cannot load, or if
    torch would refuse a tensor of another shape after copying the others.

    A checkpoint saved in the other layout (dense or compact) is translated first and checked as
    this model's layout; once everything passed, the tensor takes the checkpoint's layout (see
    ``core/layouts.py``). Missing and unexpected keys are not checked here: torch passes ``strict=True`` to every
    module's pre-hook whatever the caller asked, so a hook cannot tell an error from a partial
    load; :func:`maskparam.load_state_dict` checks keys before anything is loaded.
    """
    restore_ties(model)  # a tie that to_empty split loads as one tensor again
    switches: list[LayoutSwitch] = []
    if isinstance(state_dict, dict):  # torch's own copy of the checkpoint, which it loads from
        _check_step_count(model, state_dict, prefix)  # on the checkpoint as saved
        fill_tied_keys(model, state_dict, prefix)  # a tie's entries are saved under one holder
        switches = translate_layouts(model, state_dict, prefix)  # checked as this layout
    if not isinstance(state_dict, dict):
        _check_step_count(model, state_dict, prefix)
    resizes = _compact_resizes(model, state_dict, prefix)
    reshaped = _reshaped_masks(model, state_dict, prefix)
    _check_shapes(model, state_dict, prefix, resized={*resizes, *reshaped})
    if resizes or reshaped or any(s.twin is not None for s in switches):
        # New tensors (a resized original, a mask of another shape, another layout's constraint)
        # created under inference mode would fail the next backward. Copies in place are fine.
        refuse_inference_mode(f"load_state_dict into {type(model).__name__}")
    for name, module in model.named_modules(prefix=prefix.rstrip(".")):
        here = f"{name}." if name else ""
        if isinstance(module, FixedTensors):
            names = [*module._buffers, *module._parameters, *module._fixed]
            local = {n: state_dict[here + n] for n in names if here + n in state_dict}
            problems = module.check_state(local)
            if problems:
                raise load_error(here, type(module).__name__, problems)
        for tensor_name in parametrized_names(module):
            constraints = maskparam_constraints(module, tensor_name)
            key = f"{here}parametrizations.{tensor_name}.original"
            if constraints and key not in state_dict and here + tensor_name in state_dict:
                raise _plain_into_constrained(model, here + tensor_name)
            if not constraints or key not in state_dict:
                continue
            first = constraints[0]
            first_prefix = f"{here}parametrizations.{tensor_name}.0."
            state = {
                n: state_dict[first_prefix + n]
                for n in [*first._buffers, *first._fixed]
                if first_prefix + n in state_dict
            }
            original: Tensor = state_dict[key]
            problem = first.check_original(original, state)
            if problem:
                raise load_error(first_prefix, type(first).__name__, [problem])
    # Everything checked: a tensor saved in the other layout takes it, a mask buffer may take
    # the checkpoint's shape, and a compact original its number of entries; torch's load then
    # copies the values in.
    if isinstance(state_dict, dict):
        switch_layouts(state_dict, switches)
    switched = {key for s in switches if s.twin is not None for key in s.translated}
    resizes = {k: v for k, v in resizes.items() if k not in switched}
    reshaped = {k: v for k, v in reshaped.items() if k not in switched}
    for key, (constraint, buffer_name) in reshaped.items():
        current: Tensor = getattr(constraint, buffer_name)
        loaded = state_dict[key]
        constraint._buffers[buffer_name] = current.new_empty(loaded.shape)
    for stored, numel in resizes.values():
        with torch.no_grad():  # torch's load then copies the values in
            stored.set_(stored.new_empty(numel))  # type: ignore[call-overload]  # set_(Tensor)
        stored.grad = None  # laid out for the old entries


def _plain_into_constrained(model: nn.Module, name: str) -> Exception:
    return error(
        f"load_state_dict into {type(model).__name__}",
        f"the checkpoint holds {name!r} as a plain tensor, where this model constrains it (its "
        "state is under parametrizations.*): a baked checkpoint, or a plain one. torch would "
        "skip it as an unexpected key (silently, in a non-strict load) and keep this model's "
        "values; nothing was loaded.",
        fix="load it with mp.load_state_dict(model, checkpoint), which loads plain values "
        "through the constraints (masks and frozen entries stay this model's), or load it into "
        "the model before applying the rules.",
    )


def _check_step_count(model: nn.Module, state_dict: Mapping[str, Any], prefix: str) -> None:
    """Refuse a checkpoint that holds a pruned model's masks but not the step count of the
    schedule this model carries: loaded, the schedule would start again (and prune late, or
    regrow pruned entries); a strict load would only say so after copying the rest."""
    for name, module in model.named_modules(prefix=prefix.rstrip(".")):
        if PROGRESS_BUFFER not in module._buffers:
            continue
        here = f"{name}." if name else ""
        if here + PROGRESS_BUFFER in state_dict:
            continue
        counted = counted_tensors(module)
        theirs = [
            f"{here}{owner}{'.' if owner else ''}parametrizations.{local}."
            for owner, _, local in (name.rpartition(".") for name in counted)
        ]
        masks = [k for k in state_dict if k.startswith(tuple(theirs))] if theirs else []
        masks.sort(key=lambda k: k.endswith(".original"))  # name a mask first
        if masks:
            raise error(
                f"load_state_dict into {type(model).__name__}",
                f"the checkpoint holds the masks of this model's GradualPruning (e.g. "
                f"{masks[0]!r}) but not its step count ({here + PROGRESS_BUFFER!r}): it was "
                "saved without the schedule, which would start again and prune late or regrow "
                "pruned weights; nothing was loaded.",
                fix=f"give the checkpoint the count it was saved at: checkpoint["
                f"{here + PROGRESS_BUFFER!r}] = torch.tensor(steps) (GradualPruning.state_dict()"
                "['steps'] of that run, 0 to start the schedule on its masks), then load.",
            )


def _reshaped_masks(
    model: nn.Module, state_dict: Mapping[str, Any], prefix: str
) -> dict[str, tuple[Constraint, str]]:
    """The mask buffers whose checkpoint value has another shape that broadcasts to the tensor
    (a per-row mask that ``update_masks`` made per entry): key -> (constraint, buffer name). Its
    values are checked with the constraint's state."""
    found: dict[str, tuple[Constraint, str]] = {}
    for name, module in model.named_modules(prefix=prefix.rstrip(".")):
        if not isinstance(module, Constraint) or module.mask_buffer is None:
            continue
        key = f"{name}.{module.mask_buffer}" if name else module.mask_buffer
        loaded, current, full = state_dict.get(key), getattr(module, module.mask_buffer), None
        full = module.mask_shape()
        if (
            isinstance(loaded, Tensor)
            and full is not None
            and loaded.shape != current.shape
            and broadcasts_to(loaded.shape, full)
        ):
            found[key] = (module, module.mask_buffer)
    return found


def _compact_resizes(
    model: nn.Module, state_dict: Mapping[str, Any], prefix: str
) -> dict[str, tuple[Tensor, int]]:
    """The stored originals whose checkpoint holds another number of entries, as its own mask
    says (a compact layout whose masks ``update_masks`` changed): key -> (stored tensor, numel).

    The stored Parameter keeps its identity and takes the checkpoint's size; an optimizer's
    state then comes from the checkpoint's optimizer state (load both).
    """
    resizes: dict[str, tuple[Tensor, int]] = {}
    for name, module in model.named_modules(prefix=prefix.rstrip(".")):
        here = f"{name}." if name else ""
        for tensor_name in parametrized_names(module):
            constraints = maskparam_constraints(module, tensor_name)
            stack = parametrization_list(module, tensor_name)
            key = f"{here}parametrizations.{tensor_name}.original"
            loaded = state_dict.get(key)
            if not constraints or constraints[0] is not stack[0] or not isinstance(loaded, Tensor):
                continue
            level = f"{here}parametrizations.{tensor_name}.0."
            local = {
                n: state_dict[level + n]
                for n in constraints[0]._buffers
                if isinstance(state_dict.get(level + n), Tensor)
            }
            numel = constraints[0].checkpoint_numel(local, loaded)
            if numel is not None:
                resizes[key] = (stack.original, numel)
    return resizes


def _check_shapes(
    model: nn.Module, state_dict: Mapping[str, Any], prefix: str, *, resized: set[str]
) -> None:
    own = {prefix + k: v for k, v in model.state_dict().items()}
    problems = []
    for key, current in own.items():
        loaded = state_dict.get(key)
        if isinstance(loaded, Tensor) and loaded.shape != current.shape and key not in resized:
            problems.append(
                f"{key}: shape {tuple(loaded.shape)}, this model's {tuple(current.shape)}"
            )
    if problems:
        raise error(
            f"load_state_dict into {type(model).__name__}"
            + (f" at {prefix.rstrip('.')!r}" if prefix else ""),
            "a tensor of the checkpoint has another shape; nothing was loaded (torch would "
            "have copied the others first).",
            *problems,
            fix="load a checkpoint of the same architecture saved with the same rules.",
        )
