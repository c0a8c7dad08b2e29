"""``load_state_dict``: load a checkpoint whether or not it, or the model, carries constraints.

* constrained model, constrained checkpoint: plain ``model.load_state_dict``;
* constrained model, **plain** checkpoint (load pretrained weights into a model that is already
  constrained): each constrained tensor is assigned its plain value, which goes through the
  constraint as if it had been applied to a model holding that value (masks zero it, frozen
  entries take its values, a subspace takes it as θ₀);
* plain model, constrained checkpoint: an error that says to apply the rules or to bake first.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.module import _IncompatibleKeys

from maskparam.core.inference import refuse_inference_mode
from maskparam.core.layouts import translate_layouts
from maskparam.core.load_guard import check_checkpoint
from maskparam.core.optimizer import (
    Optimizers,
    as_optimizers,
    check_state_fits,
    move_entries,
    reset_entries,
)
from maskparam.core.parametrize import maskparam_constraints
from maskparam.core.positions import stored_indices
from maskparam.core.progress import PROGRESS_BUFFER
from maskparam.core.tensors import TensorRef, find_tensors
from maskparam.core.ties import fill_tied_keys, restore_ties
from maskparam.errors import check_bool, check_module, error

__all__ = ["load_state_dict"]

_MARK = ".parametrizations."


def load_state_dict(
    model: nn.Module,
    state_dict: Mapping[str, Any],
    *,
    strict: bool = True,
    optimizer: Optimizers | None = None,
) -> _IncompatibleKeys:
    """Load ``state_dict`` into ``model``, plain or constrained on either side.

    Returns torch's ``(missing_keys, unexpected_keys)``; with ``strict=True`` any of them is an
    error, as with ``nn.Module.load_state_dict``.

    ``optimizer`` (one or a list): optimizers that go on training the model with their own
    state, where the checkpoint brings other masks: the state of each entry that stays free is
    kept (moved by position where the layout is compact), and entries that become free start
    fresh, as :func:`~maskparam.update_masks` does. To resume a run, load the optimizer's own
    checkpoint instead (it fits the loaded masks).

    >>> import torch, maskparam as mp
    >>> pretrained = torch.nn.Linear(3, 3).state_dict()
    >>> model = mp.apply_mask(torch.nn.Linear(3, 3), {"weight": mp.Triangular()})
    >>> _ = mp.load_state_dict(model, pretrained)
    >>> torch.equal(model.weight, pretrained["weight"].tril())
    True
    """
    check_module(model, "load_state_dict")
    refuse_inference_mode("mp.load_state_dict")
    check_bool(strict, "load_state_dict", "strict")
    optimizers = as_optimizers(optimizer, "load_state_dict")
    if not isinstance(state_dict, Mapping):
        raise error(
            "load_state_dict",
            f"the checkpoint must be a mapping of names to tensors; got a "
            f"{type(state_dict).__name__}.",
            fix="pass e.g. torch.load(path, weights_only=True).",
        )
    not_tensors = [k for k, v in state_dict.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        raise error(
            "load_state_dict",
            f"the checkpoint's values must be tensors; {not_tensors[:3]} are not.",
            fix="pass a state_dict (names to tensors).",
        )
    meta_model = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if meta_model:
        raise error(
            "load_state_dict",
            f"the model's tensors {meta_model[:3]} are on the meta device: torch copies no "
            "values into them; nothing was loaded.",
            fix="materialise the model first (model.to_empty(device='cpu'), then load), or "
            "load with torch: model.load_state_dict(checkpoint, assign=True).",
        )
    on_meta = [k for k, v in state_dict.items() if v.is_meta]
    if on_meta:
        raise error(
            "load_state_dict",
            f"the checkpoint's values {on_meta[:3]} are on the meta device: they hold no values "
            "to copy; nothing was loaded.",
            fix="load a checkpoint of real tensors (torch.load(path, weights_only=True)), or "
            "use model.load_state_dict(checkpoint, assign=True) to keep meta tensors.",
        )
    restore_ties(model)  # a tie that to_empty split: one tensor again, saved once
    own = model.state_dict()
    layouts = [
        (key, value.layout, own[key].layout)
        for key, value in state_dict.items()
        if key in own and isinstance(value, torch.Tensor) and value.layout != own[key].layout
    ]
    if layouts:
        key, saved, here = layouts[0]
        raise error(
            f"load_state_dict ({key!r})",
            f"the checkpoint stores it {str(saved).removeprefix('torch.')}, this model "
            f"{str(here).removeprefix('torch.')}: one of the two went through mp.to_sparse; "
            "nothing was loaded.",
            fix="load into a model converted the same way (mp.to_sparse with the same choices), "
            "or load the dense checkpoint before converting.",
        )
    state_dict = dict(state_dict)  # a copy: the caller's stays as it was
    # Keys are checked as this model's layout; the load guard then gives each tensor saved in
    # the other layout the checkpoint's layout.
    translated = dict(state_dict)
    switches = translate_layouts(model, translated, "")
    # The checkpoint's own keys of a tensor saved in the other layout: expected, whether the
    # tensor takes the checkpoint's layout (a twin) or keeps its own (the CSR layout), translated.
    other_layout = {key for s in switches for key in s.saved}
    own_keys = set(model.state_dict().keys())
    # A tie's entries are saved under one holder; a checkpoint with every holder's (maskparam
    # 0.2) is neither foreign nor unexpected.
    every_holder = dict(own)
    fill_tied_keys(model, every_holder, "")
    foreign = sorted(k for k in translated if _MARK in f".{k}" and k not in every_holder)
    if foreign:
        raise error(
            f"load_state_dict into {type(model).__name__}",
            f"the checkpoint holds constraints this model does not have (e.g. {foreign[0]!r}).",
            fix="apply the same rules to the model before loading, or save a baked model "
            "(mp.remove_parametrizations) to get a plain checkpoint.",
        )
    assigned: dict[str, tuple[nn.Module, str, Tensor]] = {}
    for ref in find_tensors(model):
        if not ref.has_constraint:
            continue
        for name in ref.all_names:
            if name in state_dict and name not in own_keys:
                assigned[name] = (ref.module, ref.local_name, state_dict[name])
    for name, (module, local, value) in assigned.items():
        waiting = [c for c in maskparam_constraints(module, local) if c.awaits_state]
        if waiting:
            raise error(
                repr(name),
                f"its {waiting[0].describe()} was built on the meta device, so its state (masks, "
                "frozen values) exists only in a constrained checkpoint; a plain value cannot "
                "supply it.",
                fix="load a checkpoint of the constrained model, or load the plain weights first "
                "and then apply the rules.",
            )
        current = getattr(module, local)
        if value.shape != current.shape:
            raise error(
                repr(name),
                f"the checkpoint's tensor has shape {tuple(value.shape)}, the model's "
                f"{tuple(current.shape)}.",
                fix="load a checkpoint of the same architecture.",
            )
    rest = {k: v for k, v in state_dict.items() if k not in assigned}
    # Everything is checked before anything changes: missing and unexpected keys, then what each
    # constraint says of its entries (the load guard, run here before the plain assignments).
    assigned_prefixes = tuple(_parametrization_prefix(name) for name in assigned)
    # A tie saved under another of its holders (torch's order) is not missing.
    tied_filled = dict(translated)
    fill_tied_keys(model, tied_filled, "")
    missing = [k for k in own_keys if k not in tied_filled and not k.startswith(assigned_prefixes)]
    if assigned:
        # A plain checkpoint (pretrained weights) knows nothing of a pruning schedule: the
        # model's step count stays, as its masks do.
        missing = [k for k in missing if k.rpartition(".")[2] != PROGRESS_BUFFER]
    unexpected = [k for k in rest if k not in every_holder and k not in other_layout]
    if strict and (missing or unexpected):
        raise error(
            f"load_state_dict into {type(model).__name__}",
            "the checkpoint does not match the model; nothing was loaded.",
            f"missing keys: {sorted(missing)[:5]}{' ...' if len(missing) > 5 else ''}",
            f"unexpected keys: {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}",
            fix="load a checkpoint of the same architecture, or pass strict=False.",
        )
    layouts_before = _free_layouts(model) if optimizers else []
    for ref, _, _ in layouts_before:
        check_state_fits(optimizers, ref.storage, ref.name)
    # mp.CSRLinear (export/) checks its CSR parts itself and takes the checkpoint's number of
    # nonzeros: those shapes are not compared with the model's.
    own_shapes: set[str] = set()
    for name, module in model.named_modules():
        check = getattr(module, "maskparam_check_state_dict", None)
        if callable(check):
            own_shapes |= check(rest, f"{name}." if name else "")
    compared = {k: v for k, v in rest.items() if k not in own_shapes} if own_shapes else rest
    check_checkpoint(model, compared, "")  # keys were checked above; shapes and entries here
    with torch.no_grad():
        for module, local, value in assigned.values():
            # Goes through each parametrization's right_inverse, like `module.weight = value`,
            # which ends in set_(): clone, or training would write into the checkpoint's tensor.
            current = getattr(module, local)
            setattr(module, local, value.to(device=current.device, dtype=current.dtype, copy=True))
    model.load_state_dict(rest, strict=False)
    if optimizers:
        _follow(optimizers, layouts_before)
    return _IncompatibleKeys(missing, unexpected)


def _free_layouts(model: nn.Module) -> list[tuple[TensorRef, Tensor, Tensor | None]]:
    """(tensor, its free entries, the positions it stores) of every constrained Parameter."""
    layouts = []
    for ref in find_tensors(model):
        if isinstance(ref.storage, nn.Parameter) and ref.has_constraint:
            layouts.append(_layout(ref))
    return layouts


def _layout(ref: TensorRef) -> tuple[TensorRef, Tensor, Tensor | None]:
    chain = maskparam_constraints(ref.module, ref.local_name)
    positions = chain[0].stored_positions()
    # The tensor's full shape, without evaluating the stack: a compact layout knows it.
    shape = ref.storage.shape if positions is None else chain[0].mask_shape()
    assert shape is not None  # a constraint that stores positions knows the full shape
    free = torch.ones(shape, dtype=torch.bool, device=ref.storage.device)
    for constraint in chain:
        free = constraint.free_entries(free)
    return ref, free, None if positions is None else positions.clone()


def _follow(
    optimizers: list[torch.optim.Optimizer],
    before: list[tuple[TensorRef, Tensor, Tensor | None]],
) -> None:
    """The optimizers' state after a load that brought other masks: see load_state_dict."""
    with torch.no_grad():
        for ref, free_before, was in before:
            _, free_after, now = _layout(ref)
            stored, shape = ref.storage, free_before.shape
            if was is not None or now is not None:  # compact on one side at least
                # Each stored entry keeps its state by position, in the layout the checkpoint
                # brought (dense and compact alike); entries stored only now start fresh.
                move_entries(optimizers, stored, was=was, now=now, full_shape=shape)
            arriving = free_after & ~free_before
            reset_entries(optimizers, stored, stored_indices(arriving, now))


def _parametrization_prefix(name: str) -> str:
    """Where a tensor's constraint state lives: ``fc.weight`` -> ``fc.parametrizations.weight.``."""
    module, _, local = name.rpartition(".")
    return f"{module}.parametrizations.{local}." if module else f"parametrizations.{local}."
