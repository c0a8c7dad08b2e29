"""``remove_parametrizations``: bake maskparam's constraints into plain tensors, for export.

Only maskparam's own constraints are removed (a user's ``weight_norm`` stays). Where maskparam
was the only parametrization of a module, the module gets back its class, its state_dict keys and
their order; the baked Parameter is the same object the optimizer held (and the one an RNN's
``_flat_weights`` holds again).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

import torch
from torch import nn
from torch.nn.utils import parametrize

from maskparam.constrain.distributed import refuse_sharded
from maskparam.core.constraint import Constraint
from maskparam.core.inference import refuse_inference_mode
from maskparam.core.load_guard import unguard_loads
from maskparam.core.optimizer import (
    Optimizers,
    as_optimizers,
    check_state_fits,
    move_entries,
    reset_entries,
)
from maskparam.core.parametrize import (
    give_own_class,
    maskparam_constraints,
    parametrization_list,
    parametrized_names,
    restore_key_order,
)
from maskparam.core.positions import memory_format, stored_indices, with_memory_format
from maskparam.core.progress import drop_progress
from maskparam.core.rnn import reset_flat_weights
from maskparam.core.ties import forget_ties, refuse_split_tie_bake
from maskparam.errors import check_bool, check_module, error

__all__ = ["remove_constraints", "remove_parametrizations"]

ModuleT = TypeVar("ModuleT", bound=nn.Module)


def remove_parametrizations(
    model: ModuleT, *, leave_parametrized: bool = True, optimizer: Optimizers | None = None
) -> ModuleT:
    """Bake maskparam's constraints into plain tensors, for export; in place, returns ``model``.

    Removes only maskparam's own parametrizations: a user's ``weight_norm`` stays. Where
    maskparam was the only one on a module, the module gets back its class and its state_dict
    keys in their order; the baked Parameter is the same object the optimizer held, and its
    values equal the effective tensor bit for bit. With ``leave_parametrized=False`` the stored
    originals come back unconstrained instead (masked entries reappear). A ``GradualPruning``'s
    step count (the ``maskparam_pruning_steps`` buffer) goes too: the model is plain torch again.
    A tied tensor is baked with every module that holds it: a ``model`` that holds only one side
    of a tie is refused, since the sides would come apart.

    ``optimizer`` (one or a list): optimizers that go on training the baked model; the state
    they hold for a compact tensor is laid out for the full tensor (the entries that were fixed
    start fresh). An optimizer not passed is never looked at.

    >>> import torch, maskparam as mp
    >>> layer = mp.apply_mask(torch.nn.Linear(3, 3), {"weight": mp.Triangular()})
    >>> effective = layer.weight.detach().clone()
    >>> layer = mp.remove_parametrizations(layer)
    >>> type(layer).__name__, torch.equal(layer.weight, effective)
    ('Linear', True)
    """
    check_module(model, "remove_parametrizations")
    refuse_inference_mode("remove_parametrizations")
    refuse_sharded(model, "remove_parametrizations")
    check_bool(leave_parametrized, "remove_parametrizations", "leave_parametrized")
    optimizers = as_optimizers(optimizer, "remove_parametrizations")
    refuse_split_tie_bake(model, "remove_parametrizations")
    owners: dict[int, tuple[nn.Module, list[str]]] = {}
    paths: dict[int, str] = {}
    for path, module in model.named_modules(remove_duplicate=False):
        names = [n for n in parametrized_names(module) if maskparam_constraints(module, n)]
        if names:
            owners[id(module)] = (module, names)
            paths.setdefault(id(module), f"{path}." if path else "")
    for module, names in owners.values():  # check all before changing any
        for tensor_name in names:
            qualified = paths[id(module)] + tensor_name
            _check_removable(module, tensor_name, qualified, leave_parametrized=leave_parametrized)
            plist = parametrization_list(module, tensor_name)
            compact = any(c.reshapes_original for c in maskparam_constraints(module, tensor_name))
            if compact and not leave_parametrized:
                raise error(
                    repr(qualified),
                    "leave_parametrized=False gives back the stored originals, but this tensor is "
                    "stored compact: it holds only its free entries, so the others cannot come "
                    "back; nothing was removed.",
                    fix="bake it (leave_parametrized=True), or apply with layout='dense' where "
                    "the originals must come back.",
                )
            if plist.is_tensor:
                check_state_fits(optimizers, plist.original, qualified)
    baked: set[int] = set()
    for module, names in owners.values():
        give_own_class(module)  # once per module: a class copy per tensor would be quadratic
        for tensor_name in names:
            plist = parametrization_list(module, tensor_name)
            original = id(plist.original) if plist.is_tensor else None
            # A tied tensor is baked once; its other holders then just get the baked tensor.
            again = original in baked
            _remove(
                module,
                tensor_name,
                leave_parametrized=leave_parametrized and not again,
                optimizers=optimizers,
            )
            if original is not None:
                baked.add(original)
        _settle(module)
    drop_progress(model)  # the masks are baked: the schedule that drove them is over
    unguard_loads(model)
    return model


def remove_constraints(module: nn.Module, tensor_name: str, *, leave_parametrized: bool) -> None:
    """Remove maskparam's constraints from one tensor (the rollback of a failed apply)."""
    give_own_class(module)
    _remove(module, tensor_name, leave_parametrized=leave_parametrized, optimizers=[])
    _settle(module)


def _settle(module: nn.Module) -> None:
    """After removing constraints from ``module``: its keys back in order, and an RNN computing
    with its own tensors again (``_flat_weights`` held the computed ones)."""
    restore_key_order(module)
    forget_ties(module)
    # A user's parametrization keeps the class; without maskparam's constraints their methods
    # go (give_own_class adds an RNN's, or a CSR layout's forward, only while one is there).
    give_own_class(module)
    if isinstance(module, nn.RNNBase):
        reset_flat_weights(module)


def _check_removable(
    module: nn.Module, tensor_name: str, qualified: str, *, leave_parametrized: bool
) -> None:
    plist = parametrization_list(module, tensor_name)
    users = [p for p in plist if not isinstance(p, Constraint)]
    if leave_parametrized and users and not all(hasattr(p, "right_inverse") for p in users):
        raise error(
            repr(qualified),
            f"baking maskparam's constraint leaves {type(users[0]).__name__} in place, which has no "
            "right_inverse to take the constrained value.",
            fix="remove that parametrization first, or pass leave_parametrized=False.",
        )


def _remove(
    module: nn.Module,
    tensor_name: str,
    *,
    leave_parametrized: bool,
    optimizers: Sequence[torch.optim.Optimizer],
) -> None:
    plist = parametrization_list(module, tensor_name)
    ours = maskparam_constraints(module, tensor_name)
    original = plist.original if plist.is_tensor else None
    positions = ours[0].stored_positions() if ours and ours[0] is plist[0] else None
    fixed = None  # the entries a dense layout fixed: they come back with fresh optimizer state
    if optimizers and original is not None and positions is None and len(ours) == len(plist):
        free = torch.ones(original.shape, dtype=torch.bool, device=original.device)
        for constraint in ours:
            free = constraint.free_entries(free)
        fixed = ~free
    # The baked tensor keeps the memory format (channels_last) of the tensor it replaces.
    first_format = ours[0].full_memory_format() if positions is not None else None
    fmt = first_format or (memory_format(original) if original is not None else None)
    # A compact original holds only the free entries: the full tensor is the effective one (the
    # rollback of a failed apply restores the full values itself).
    leave_parametrized = leave_parametrized or any(p.reshapes_original for p in ours)
    if len(ours) == len(plist):
        # torch bakes with set_(), keeping the Parameter object, and restores the class.
        parametrize.remove_parametrizations(
            module, tensor_name, leave_parametrized=leave_parametrized
        )
    else:
        # A user's parametrization stays: drop ours, then let theirs take the constrained value
        # through its right_inverse (exact when theirs is; weight_norm's is up to rounding).
        with torch.no_grad():
            effective = getattr(module, tensor_name)
            for i in reversed(range(len(plist))):
                if isinstance(plist[i], Constraint):
                    del plist[i]
            if leave_parametrized:
                plist.right_inverse(effective)
    if original is not None:
        if fmt is not None and len(ours) == len(plist):
            with_memory_format(original, fmt)
        for constraint in ours:
            constraint.on_removed(original)
        if original.grad is not None and original.grad.shape != original.shape:
            original.grad = None  # a compact gradient cannot apply to the baked full tensor
        if positions is not None:  # baked in full: the fixed entries start with fresh state
            move_entries(
                optimizers,
                original,
                was=positions,
                now=None,
                full_shape=original.shape,
            )
        elif fixed is not None:
            reset_entries(optimizers, original, stored_indices(fixed, None))
