"""The two base classes every constraint is made of: a :class:`Spec` and a :class:`Constraint`.

A *spec* (``mp.Mask(...)``) is an immutable description written in the rules; for each tensor it
selects, :func:`maskparam.apply_mask` asks it to :meth:`~Spec.build` a *constraint*: the
``torch.nn.utils.parametrize`` module that maps the stored original to the effective tensor in
the forward pass. A constraint also states its invariant as code (:meth:`Constraint.pins`),
which :func:`maskparam.verify` checks exactly.

Adding a constraint of your own takes one subclass of each (see docs/extending.md):

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

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, Protocol, TypeAlias

import torch
from torch import Tensor, nn

from maskparam.core.positions import to_full, to_stored
from maskparam.errors import MaskparamError, error

#: What a spec's mask can be: a bool or 0/1 tensor, or a callable of the tensor that returns one
#: (every generator of :mod:`maskparam.masks` is such a callable).
MaskSourceLike: TypeAlias = Tensor | Callable[[Tensor], Tensor]


class JointSource(Protocol):
    """A mask source computed for all the tensors of a rule at once
    (:class:`maskparam.masks.JointMaskGenerator` is the one to subclass)."""

    def build_joint(self, members: Sequence[tuple[str, Tensor]]) -> list[Tensor]:
        """The bool masks of ``members``, (name, tensor) pairs, in their order."""
        ...

    def describe(self) -> str:
        """What it selects, in words."""
        ...


__all__ = ["Constraint", "Layout", "MaskChange", "Pins", "Spec"]

Layout = Literal["auto", "dense", "compact", "csr"]


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


@dataclass(frozen=True)
class MaskChange:
    """What :meth:`Constraint.take_mask` changed: the lifecycle moves the stored entries and
    their optimizer state accordingly.

    ``free_before`` and ``free_after`` are bool tensors of the tensor's shape: the entries this
    constraint left free before and after the new mask. ``start`` (the tensor's shape) holds
    what each entry free afterwards must hold in the stored original: its current value, or
    where it becomes free, the value it starts from (0 for a regrown masked entry, the frozen
    value for an unfrozen one). An entry that becomes free starts with fresh optimizer state.
    """

    free_before: Tensor
    free_after: Tensor
    start: Tensor

    @property
    def arriving(self) -> Tensor:
        """The entries that become free."""
        return self.free_after & ~self.free_before


class FixedTensors(nn.Module):
    """A module with *fixed tensors*: tensors that are not state to average, cast or broadcast.

    Indices, seeds, derived positions and regenerated matrices are fixed tensors, set with
    :meth:`set_fixed`: plain attributes that follow the module's device but never its dtype, and
    that ``buffers()`` (so ``AveragedModel`` and DDP) never yields. A persistent one is saved in the state_dict and must load back equal: a checkpoint
    made with other settings is refused rather than silently mixed in.
    """

    def __init__(self) -> None:
        super().__init__()
        self._fixed: dict[str, bool] = {}  # name -> persistent
        # Set by the lifecycle for a constraint built on the meta device: its buffers (masks,
        # frozen values) hold nothing real until a constrained checkpoint is loaded.
        self.awaits_state = False

    def set_fixed(self, name: str, value: Tensor, *, persistent: bool = False) -> None:
        """Keep ``value`` as the fixed tensor ``name`` (see the class docstring)."""
        self._fixed[name] = persistent
        object.__setattr__(self, name, value)

    def regenerate(self, name: str, device: torch.device) -> Tensor:
        """A fixed tensor's value on ``device`` when it holds none (after ``to_empty``)."""
        raise NotImplementedError

    def materialize_like(self, tensor: Tensor) -> None:
        """Regenerate fixed tensors left on the meta device onto ``tensor``'s device.

        ``load_state_dict(assign=True)`` into a model built on meta replaces its parameters and
        buffers but cannot reach fixed tensors (they are not state): the load brings them back
        (a module without state of its own, a projection, does it on first use).
        """
        if tensor.is_meta:
            return
        for name in self._fixed:
            if getattr(self, name).is_meta:
                object.__setattr__(self, name, self.regenerate(name, tensor.device))

    def check_loaded(self, name: str, loaded: Tensor) -> str | None:
        """Why a persistent fixed tensor's checkpoint value cannot load, or None. Default: equal."""
        current: Tensor = getattr(self, name)
        if current.is_meta:
            current = self.regenerate(name, torch.device("cpu"))
        if loaded.shape != current.shape or not torch.equal(loaded.cpu(), current.cpu()):
            return (
                f"the checkpoint's {name!r} is {_short(loaded)}, this model's {_short(current)}: "
                "it was made with other settings"
            )
        return None

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> FixedTensors:
        super()._apply(fn, recurse)  # type: ignore[no-untyped-call]
        for name in self._fixed:
            tensor: Tensor = getattr(self, name)
            # The device fn moves to, never its dtype: probe it with an empty integer tensor.
            device = fn(torch.empty(0, dtype=torch.int64, device=tensor.device)).device
            if tensor.device.type == "meta" and device.type != "meta":
                moved = self.regenerate(name, device)
            else:
                moved = tensor.to(device)
            object.__setattr__(self, name, moved)
        return self

    def _save_to_state_dict(self, destination: Any, prefix: str, keep_vars: bool) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        for name, persistent in self._fixed.items():
            if persistent:  # a copy: in-place updates of a state_dict (EMA) cannot reach it
                destination[prefix + name] = getattr(self, name).detach().clone()

    def check_state(self, state: Mapping[str, Tensor]) -> list[str]:
        """What is wrong with this module's entries of a checkpoint (by local name), if anything.

        Called before anything is loaded (see :func:`maskparam.apply_mask`'s load guard), so a
        bad checkpoint is refused with the model unchanged. Subclasses add their own checks.
        """
        problems = []
        for name, persistent in self._fixed.items():
            if persistent and name in state:
                problem = self.check_loaded(name, state[name])
                if problem:
                    problems.append(f"{name}: {problem}")
        return problems

    def _load_from_state_dict(
        self,
        state_dict: Any,
        prefix: str,
        local_metadata: Any,
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        names = [*self._buffers, *self._parameters, *self._fixed]
        local = {n: state_dict[prefix + n] for n in names if prefix + n in state_dict}
        problems = self.check_state(local)
        if problems:  # reached only when this module is loaded on its own, without the guard
            raise load_error(prefix, type(self).__name__, problems)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        if all(prefix + name in state_dict for name in self._buffers):
            self.awaits_state = False
        # load_state_dict(assign=True) into a model built on meta makes parameters and buffers
        # real but cannot reach fixed tensors: bring them to where the loaded state now lives.
        loaded = [t for t in [*self._parameters.values(), *self._buffers.values()] if t is not None]
        if loaded:
            self.materialize_like(loaded[0])
        for name, persistent in self._fixed.items():
            key = prefix + name
            if key in unexpected_keys:
                unexpected_keys.remove(key)
            if persistent and key not in state_dict and strict:
                missing_keys.append(key)


def binary_mask_problem(
    name: str, loaded: Tensor, current: Tensor, *, full_shape: torch.Size | None = None
) -> str | None:
    """Why ``loaded`` cannot replace the 0/1 mask ``current`` (shape, dtype, values), or None.

    With ``full_shape`` (the constrained tensor's), a mask of another shape that broadcasts to
    it loads too (a per-row mask that ``update_masks`` turned into one per entry).
    """
    if loaded.shape != current.shape and not (
        full_shape is not None and broadcasts_to(loaded.shape, full_shape)
    ):
        return f"{name}: shape {tuple(loaded.shape)}, this model's {tuple(current.shape)}"
    if loaded.dtype not in (torch.uint8, torch.bool):
        return f"{name}: dtype {loaded.dtype}; a mask is stored as uint8 0/1"
    bad = (loaded != 0) & (loaded != 1)
    if bool(bad.any()):
        examples = sorted(set(loaded[bad].tolist()))[:5]
        return f"{name}: {int(bad.sum())} values are neither 0 nor 1 (e.g. {examples})"
    return None


def broadcasts_to(shape: torch.Size, full: torch.Size) -> bool:
    """Whether a mask of ``shape`` broadcasts to a tensor of shape ``full`` (without growing it)."""
    if len(shape) > len(full):
        return False
    return all(m in (1, f) for m, f in zip(shape, full[len(full) - len(shape) :], strict=True))


def load_error(prefix: str, kind: str, problems: Sequence[str]) -> MaskparamError:
    """The error for a checkpoint that a constraint at ``prefix`` refuses."""
    return error(
        f"load_state_dict ({kind} at {prefix.rstrip('.')!r})",
        "the checkpoint does not fit this constraint; nothing was loaded.",
        *problems,
        fix="load a checkpoint saved by a model with the same rules (same masks, seeds and "
        "settings); for pretrained plain weights, use mp.load_state_dict.",
    )


class Constraint(FixedTensors):
    """Base of every parametrization maskparam registers: ``forward(original) -> effective``.

    :func:`maskparam.remove_parametrizations` removes exactly the instances of this class, so a
    user's own parametrizations (``weight_norm``, ``orthogonal``) on the same tensor survive.
    Subclasses implement :meth:`forward`, :meth:`pins` and :meth:`describe`; the other methods
    have defaults that fit a constraint which stores the original unchanged.
    """

    #: True when the stored original is not the tensor's shape (the compact layout): the
    #: lifecycle then keeps the full values for a rollback and refuses to stack it second.
    reshapes_original: ClassVar[bool] = False

    #: The name of the 0/1 mask buffer that says which entries the spec's mask selected, where
    #: there is one (Mask, Freeze(mask)): a checkpoint may bring another mask (another shape that
    #: broadcasts, too: see :meth:`mask_shape`).
    mask_buffer: ClassVar[str | None] = None

    #: The parametrizations before this one on its tensor (set when registered): what
    #: :meth:`level_input` runs a new value through.
    stack_before: tuple[nn.Module, ...] = ()

    #: True once the mask is no longer the one its rule computed at apply time
    #: (:func:`maskparam.update_masks`, :func:`maskparam.harden`, or a checkpoint that brought
    #: another mask): :func:`maskparam.trainable_state_dict` then saves the free entries'
    #: positions, since applying the same rules to the base model would not give them back.
    mask_changed: bool = False

    #: True for a *selection*: every entry of the output is either the entry of the input or a
    #: value that does not depend on the input (a mask's zero, a frozen value, the other
    #: triangle's zero). The stored original then still holds every entry a later constraint
    #: sees, so :func:`maskparam.update_masks` may update a mask standing behind it, and
    #: :func:`maskparam.rewind` and :func:`maskparam.trainable_state_dict` can address entries.
    selects_entries: ClassVar[bool] = False

    #: The spec whose mask sources :func:`maskparam.update_masks` gives this constraint, or None
    #: where it takes no new mask: ``Mask`` when its mask says which entries are kept (the rest
    #: are zero), ``Freeze`` when it says which entries are frozen. A rule may give a spec
    #: (``{"w": mp.Mask(source)}``), whose :meth:`Spec.updates` picks one constraint of a stack;
    #: :class:`maskparam.GradualPruning` drives the constraints whose mask spec is ``Mask``.
    mask_spec: type[Spec] | None = None

    def take_mask(self, selected: Tensor, current: Tensor, what: str) -> MaskChange:
        """Take a new mask (for :func:`maskparam.update_masks`): ``selected`` is a bool mask in
        :attr:`mask_spec`'s meaning, broadcastable to the tensor; ``current`` the tensor as this
        constraint outputs it now (full shape, no gradient); ``what`` the source in words.

        Write the constraint's own buffers, and say which entries were free and are free now,
        and what the stored entries must hold afterwards (see :class:`MaskChange`). Called only
        where :attr:`mask_spec` is set, inside ``torch.no_grad()``.
        """
        raise NotImplementedError

    def free_for_mask(self, selected: Tensor) -> Tensor:
        """The entries a new mask ``selected`` (in :attr:`mask_spec`'s meaning) leaves free,
        without taking it: what :func:`maskparam.update_masks` checks before anything changes."""
        raise NotImplementedError

    def mask_for_free(self, free: Tensor) -> Tensor | None:
        """The mask (in :attr:`mask_spec`'s meaning) that leaves exactly ``free`` entries free,
        where the stored values of the free entries are all this constraint needs besides it
        (a ``Mask``: the rest are zero); None where it also needs values a state of free entries
        does not carry (a ``Freeze``: its newly frozen entries). Used to load a
        :func:`maskparam.trainable_state_dict` whose mask changed."""
        del free
        return None

    def input_changed(self, changed: Tensor, value: Tensor) -> None:
        """A constraint before this one in the stack took a new mask, and this one's input
        changed at the ``changed`` entries (bool, the tensor's shape) to ``value`` (this
        constraint's whole new input). A constraint that *captured* its input there (a frozen
        value) takes the new value, so that the stack keeps the earlier constraint's word: an
        entry pruned by a ``Mask`` is 0 even where a ``Freeze`` behind it holds values. Called by
        :func:`maskparam.update_masks` inside ``torch.no_grad()``; default: nothing to do (the
        output follows the input)."""
        del changed, value

    def stored_positions(self) -> Tensor | None:
        """Where the stored original's entries sit in the full tensor (flat positions, in
        order) when this constraint stores only some of them (the compact layout); None when the
        original has the tensor's shape."""
        return None

    def to_stored(self, full: Tensor) -> Tensor:
        """A full-shape value as the stored original holds it (a new tensor, no side effects)."""
        positions = self.stored_positions()
        return full.detach().clone() if positions is None else to_stored(full, positions)

    def to_full(self, stored: Tensor, base: Tensor | None = None) -> Tensor:
        """The stored original laid out in the tensor's shape, ``base`` (or zeros) at entries it
        does not store."""
        positions = self.stored_positions()
        if positions is None:
            return stored.detach()
        shape = self.mask_shape()
        assert shape is not None  # a constraint that stores positions knows the full shape
        return to_full(stored, positions, shape, base)

    def checkpoint_numel(self, state: Mapping[str, Tensor], original: Tensor) -> int | None:
        """The number of entries the stored original takes from a checkpoint whose ``state``
        (this constraint's entries) selects another number of free entries, or None to keep it.
        Only a constraint that stores positions resizes."""
        del state, original
        return None

    def from_other_layout(
        self, state: Mapping[str, Tensor], original: Tensor, shape: torch.Size
    ) -> tuple[dict[str, Tensor], Tensor] | str | None:
        """A checkpoint of this tensor saved in its other layout (dense or compact), translated:
        ``state`` holds the saved constraint's entries (by local name) and ``original`` the saved
        original; return this constraint's entries and original, a reason to refuse the
        checkpoint, or None where it is not of the other layout (the checks that follow then
        judge it as it is). ``shape`` is the tensor's. Called for a tensor's first constraint."""
        del state, original, shape
        return None

    def full_memory_format(self) -> torch.memory_format | None:
        """The memory format of the full tensor where the stored original cannot show it (a
        compact vector): a bake lays the tensor out in it again. None: the stored original's."""
        return None

    #: True where the spec's ``layout="auto"`` chose this constraint's layout (and compact was
    #: possible): :func:`maskparam.update_masks` may then choose again as the density changes
    #: (:meth:`relayout`).
    auto_layout: bool = False

    def relayout(self, free: Tensor) -> Constraint | None:
        """This constraint rebuilt in the layout ``"auto"`` would choose for a tensor whose
        free entries are now ``free`` (bool, the tensor's shape), where that is the other one
        and :attr:`auto_layout` is set; None (the default) to keep the layout. Called by
        :func:`maskparam.update_masks` for a first constraint, after it took its new mask; the
        lifecycle then swaps it in and lays the stored Parameter (the same object) and the
        optimizers' state out again."""
        del free
        return None

    def in_other_layout(self, state: Mapping[str, Tensor], shape: torch.Size) -> Constraint | None:
        """This constraint rebuilt in the layout a checkpoint saved it in, so that the checkpoint's
        layout wins on load (an optimizer state saved with it then fits): ``state`` holds the
        saved constraint's entries (by local name, on the stored original's device, floats in
        its dtype), which :meth:`from_other_layout` recognised; ``shape`` is the tensor's. The
        load then copies the checkpoint's values into the new constraint. None (the default):
        keep this layout, and load the translated checkpoint. Called for a first constraint
        only, after the checkpoint was checked, so it must not fail."""
        del state, shape
        return None

    def base_state(self) -> dict[str, Tensor]:
        """The state a :func:`maskparam.trainable_state_dict` checksum covers as the base its
        trained entries rely on, by role: its saved state, less trainable Parameters and the
        mask buffer (the free-entry mask has its own checksum). A layout that stores the same
        values under other names returns them under the other layout's, so that a state saved
        in one layout loads into the other."""
        skip = self.mask_buffer
        return {
            key: value
            for key, value in self.state_dict(keep_vars=True).items()
            if key != skip and not (isinstance(value, nn.Parameter) and value.requires_grad)
        }

    def saved_entries(self, free: Tensor) -> Tensor:
        """Of the entries whose stored values train before this constraint (``free``), those whose
        values :func:`maskparam.trainable_state_dict` must save. Default: :meth:`free_entries`.
        A learnable mask keeps every one (a dropped weight may come back); a subspace none (θ
        trains instead)."""
        return self.free_entries(free)

    def trainable_extras(self, tensor_name: str) -> dict[str, Tensor]:
        """Parameters of this constraint that :func:`maskparam.trainable_state_dict` saves, by
        key (e.g. ``"<tensor_name>.scores"``); a key shared by several tensors is saved once."""
        del tensor_name
        return {}

    def shared_modules(self) -> list[nn.Module]:
        """Modules whose state this constraint relies on but does not hold as submodules (a
        subspace group's coordinates, registered in its first member only): their state is part
        of what a :func:`maskparam.trainable_state_dict` checksum covers."""
        return []

    def trained_through(self) -> str | None:
        """What trains this tensor instead of its own entries, for :func:`maskparam.summary`
        (e.g. "θ of 'all' (12)"), or None."""
        return None

    def refresh(self) -> None:
        """Derive again what depends on buffers that were written without a version count (a
        collective such as ``dist.broadcast``)."""

    def module_forward(self) -> Callable[..., Tensor] | None:
        """The forward the module holding this constraint computes with instead of its class's
        own (the CSR layout's sparse product), or None (the default). maskparam's class for the
        module carries it while the constraint is on the module; it must give the module's own
        forward's result (it may read the stored original directly)."""
        return None

    def optimizer_problem(self, optimizer: torch.optim.Optimizer) -> tuple[str, str] | None:
        """Why ``optimizer`` cannot train this constraint's stored original, and the fix, or None
        (checked where an optimizer that holds the original is passed to maskparam)."""
        del optimizer
        return None

    def mask_shape(self) -> torch.Size | None:
        """The constrained tensor's full shape, where :attr:`mask_buffer` may take any shape that
        broadcasts to it; None where the mask keeps its shape."""
        return None

    def _load_from_state_dict(self, state_dict: Any, prefix: str, *args: Any) -> None:
        name = self.mask_buffer
        before = getattr(self, name).clone() if name else None
        super()._load_from_state_dict(state_dict, prefix, *args)
        if name and before is not None:
            after: Tensor = getattr(self, name)
            if after.is_meta or before.is_meta:
                # load_state_dict(assign=True) into a model built on meta: no values to compare
                # (the mask before held none), so the checkpoint's mask counts as its own.
                if after.shape != before.shape or not after.is_meta:
                    self.took_checkpoint_mask()
            elif after.shape != before.shape or not torch.equal(after, before):
                self.took_checkpoint_mask()

    def took_checkpoint_mask(self) -> None:
        """Record that a checkpoint brought a mask that is not the one the rule computed: its
        positions are then saved by :func:`maskparam.trainable_state_dict`, and the generator's
        words no longer describe it."""
        self.mask_changed = True
        described = self.__dict__.get("description")
        if isinstance(described, str):
            self.__dict__["description"] = _relabelled(described)

    def level_input(self, value: Tensor) -> Tensor:
        """What this constraint sees when the tensor is assigned ``value`` (``module.weight = w``,
        a plain checkpoint): ``value`` through the constraints before it in the stack.

        torch calls ``right_inverse`` from the last parametrization to the first, so a constraint
        that captures values (Freeze) would otherwise capture the raw value, and a frozen row
        above the diagonal of an earlier Triangular would hold non-zeros.
        """
        with torch.no_grad():
            for earlier in self.stack_before:
                inverse = getattr(earlier, "right_inverse", None)
                value = earlier(inverse(value) if inverse is not None else value)
        return value

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

    def check_original(self, original: Tensor, state: Mapping[str, Tensor]) -> str | None:
        """Whether a checkpoint's stored ``original`` fits this (first) constraint, given this
        constraint's ``state`` entries from the same checkpoint. Default: any shape torch accepts.
        """
        del original, state
        return None

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


def _relabelled(description: str) -> str:
    kind, _, rest = description.partition("(")
    verb = rest.split(" ", 1)[0]
    layout = next((f", {n}" for n in ("compact", "csr") if description.endswith(f", {n})")), "")
    return f"{kind}({verb} the checkpoint's entries{layout})"


def _short(tensor: Tensor) -> str:
    values = tensor.flatten()[:6].tolist()
    return f"{values}{' ...' if tensor.numel() > 6 else ''} (shape {tuple(tensor.shape)})"


class Spec:
    """Base of all specs: :meth:`build` returns the :class:`Constraint` for one tensor.

    A spec validates its own arguments when constructed and the tensor in :meth:`build`, so a
    bad rule fails before :func:`maskparam.apply_mask` changes anything. A spec whose
    :meth:`group_key` is not ``None`` is built for all the tensors that share the key at once,
    by :meth:`build_group` (a Subspace group shares one θ).
    """

    #: ``"dense"``: the original keeps its shape. ``"compact"``: the original stores only the
    #: free entries, so optimizer state shrinks with them. ``"auto"`` (the default of Mask,
    #: Freeze and Triangular): compact where it is possible and pays, dense elsewhere (see
    #: :func:`maskparam.constraints.compact.chooses_compact`). A spec of your own is dense.
    layout: Layout = "dense"

    def group_key(self) -> str | None:
        """Tensors whose specs return the same key are built together; ``None``: one by one."""
        return None

    def check_holder(self, name: str, module: nn.Module, local_name: str, n_specs: int) -> None:
        """Refuse (a :class:`~maskparam.MaskparamError`) a tensor this spec cannot constrain
        because of the module holding it as ``local_name`` (``n_specs``: the length of the
        tensor's list of specs); called before anything is built. Any module, by default."""
        del name, module, local_name, n_specs

    def build(self, name: str, tensor: Tensor) -> Constraint:
        """Validate ``tensor`` (named ``name`` in errors) and build its constraint.

        ``tensor`` is the tensor's value as this spec sees it (after any earlier stacked spec).
        Raise :class:`~maskparam.MaskparamError` for a tensor this spec cannot constrain.
        """
        raise NotImplementedError

    def joint_source(self) -> JointSource | None:
        """The generator whose masks are computed for all the tensors of a rule at once
        (:func:`maskparam.masks.global_magnitude`), if this spec takes one; see
        :meth:`build_selected`."""
        return None

    def mask_source(self, rule: str) -> MaskSourceLike:
        """The mask source of this spec, as a rule of :func:`maskparam.update_masks` gives it
        (``{"w": mp.Mask(source)}``); refused for a spec without one. ``rule`` names the rule."""
        raise error(
            f"rule {rule}",
            f"update_masks maps selectors to a mask source, mp.Mask(source) or "
            f"mp.Freeze(source); got a {type(self).__name__}, which has no mask to update.",
            fix="pass e.g. {'*.weight': mp.masks.global_magnitude(0.9)}.",
        )

    def updates(self, constraint: Constraint) -> bool:
        """Whether a rule ``{"w": spec}`` of :func:`maskparam.update_masks` means ``constraint``
        (one of a stack): by default, a constraint whose :attr:`~Constraint.mask_spec` is this
        spec's class."""
        return constraint.mask_spec is type(self)

    def build_selected(self, name: str, tensor: Tensor, selected: Tensor) -> Constraint:
        """:meth:`build`, with the entries :meth:`joint_source` selected for this tensor."""
        raise NotImplementedError

    def build_group(
        self, members: Sequence[tuple[str, Tensor]], specs: Sequence[Spec]
    ) -> list[Constraint]:
        """Build the constraints of a group: ``members`` are (name, tensor) pairs."""
        return [
            spec.build(name, tensor) for (name, tensor), spec in zip(members, specs, strict=True)
        ]


def check_layout(spec: Spec, *, csr: bool = False) -> None:
    """Refuse a layout other than ``"auto"``, ``"dense"``, ``"compact"`` (and ``"csr"`` where
    the spec offers it), naming the spec."""
    known = ("auto", "dense", "compact", "csr") if csr else ("auto", "dense", "compact")
    if spec.layout not in known:
        also = " (layout='csr' is Mask's only)" if spec.layout == "csr" else ""
        raise error(
            type(spec).__name__,
            f"unknown layout {spec.layout!r}{also}.",
            fix="use layout='auto' (the default), " + ", ".join(repr(k) for k in known[1:]) + ".",
        )


def zeros_pinned(entries: Tensor, value: Tensor) -> Pins:
    """Pins that fix ``entries`` to zero (a mask, a triangle)."""
    return Pins(
        entries, torch.zeros((), dtype=value.dtype, device=value.device).expand(value.shape)
    )
