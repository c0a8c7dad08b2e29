"""``trainable_state_dict``: a fine-tune saved as only what training can change, and its load.

A fine-tune of a big base model changes few numbers: the free entries of constrained tensors, a
subspace's θ, learnable scores and the tensors left unconstrained and trainable. The state
holds those, plus checksums of everything they rely on, so that loading them onto another model
is refused (with the tensor and the reason) instead of silently computing something else.

**Format** (version 1): a flat ``dict[str, Tensor]``, so ``torch.load(weights_only=True)``
reads it. Keys use the names a user sees (``"0.weight"``):

* ``"<name>.free_values"``: the trained values of a constrained tensor's free entries, flat,
  in row-major order (its dtype). For a compact tensor this is exactly its stored Parameter.
* ``"<name>.free_positions"``: their flat positions (int32 below 2**31 entries, else int64),
  only where the mask is no longer the one its rule computes from the base model
  (:func:`~maskparam.update_masks`, :func:`~maskparam.harden`, a checkpoint that brought
  another mask). Elsewhere applying the same rules to the same base gives the mask back, and
  its checksum proves it: 4 bytes per trained float32 entry instead of 8.
* ``"group:<group>.theta"`` (a grouped subspace) or ``"<name>.theta"`` (a per-tensor one).
* ``"<name>.scores"``: a learnable mask's scores (``"<name>.scores.<level>"`` for a second one).
* ``"<name>"``: an unconstrained tensor that trains (``requires_grad``) in full, the running
  statistics of normalisation layers (their forward changes them while training), and a
  ``GradualPruning``'s step count (``maskparam_pruning_steps``: its steps change it).
* ``"meta:format"`` (int64), ``"meta:names"`` (the tensor names, UTF-8 bytes joined by
  newlines, as uint8), ``"meta:free_checksums"`` and ``"meta:base_checksums"`` (int64, one per
  name, in that order).

**What the checksums cover.** The *free* checksum of a constrained tensor hashes its free-entry
mask (which entries the saved values belong to). The *base* checksum hashes what the saved
values are added to: for a constrained tensor, the state of its constraints other than the
masks (frozen values and slices, a subspace's seed, column norms and generation, a basis of
your own) and the stored entries that neither train nor are fixed by a selection (a subspace's
θ₀, the kept entries of a masked frozen Parameter); for an unconstrained tensor that does not
train, all of it. Masked entries of a dense original are not covered: the forward never reads
them (weight decay moves them during training without changing anything).

The checksum (:func:`checksum`) is a 64-bit sum, computed with torch ops in 1M-word chunks,
of the tensor's raw bytes read as int64 words, each multiplied by an odd weight that depends
on its position and then mixed (xorshift): any change of a single word changes it, and it
reads every byte of the tensor once (a few passes of integer ops per word). It detects
accidental mismatches (another base, other rules, a corrupted file), not forgeries.

**Loading** checks everything first: the names, the keys (unknown or missing ones are refused
with their names under ``strict=True``), each shape, dtype and length, the masks, and the base
checksums; then it writes, into the same Parameter objects. Where a state brings positions that
differ from the model's mask, a ``Mask`` (kept entries are zeros elsewhere) takes them, as
:func:`~maskparam.update_masks` would; a ``Freeze`` whose mask changed is refused (its newly
frozen entries hold values that training set, which the state does not carry: load the full
checkpoint with ``load_state_dict`` instead).
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TypeVar

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _NormBase

from maskparam.constrain.distributed import refuse_sharded
from maskparam.core.constraint import Constraint
from maskparam.core.inference import refuse_inference_mode
from maskparam.core.optimizer import UNSET, Optimizers, as_optimizers
from maskparam.core.parametrize import parametrization_list, walk_stack
from maskparam.core.positions import free_positions, stored_indices, write_at
from maskparam.core.progress import PROGRESS_BUFFER
from maskparam.core.tensors import TensorRef, find_tensors, refuse_sparse
from maskparam.errors import MaskparamError, check_bool, check_module, error
from maskparam.prune.update import MaskUpdate, check_optimizers, commit_all

__all__ = ["FORMAT_VERSION", "checksum", "load_trainable_state_dict", "trainable_state_dict"]

ModuleT = TypeVar("ModuleT", bound=nn.Module)

#: The version of the format written by :func:`trainable_state_dict`.
FORMAT_VERSION = 1

_FORMAT = "meta:format"
_NAMES = "meta:names"
_FREE = "meta:free_checksums"
_BASE = "meta:base_checksums"
_META = (_FORMAT, _NAMES, _FREE, _BASE)

_CHUNK = 1 << 20  # int64 words per pass: bounds the checksum's temporaries to a few MB
_MASK64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15  # 2**64 / golden ratio, odd
_MIX = 0xBF58476D1CE4E5B9  # splitmix64's multiplier
_weights_cache: dict[int, Tensor] = {}


def _signed(value: int) -> int:
    """``value`` mod 2**64 as a signed int64."""
    value &= _MASK64
    return value - (1 << 64) if value >> 63 else value


def _weights(n: int) -> Tensor:
    """``2·i·GOLDEN + 1`` for i < n (odd, so multiplying by one is a bijection mod 2**64)."""
    if n not in _weights_cache:
        if len(_weights_cache) > 4:
            _weights_cache.clear()
        idx = torch.arange(n, dtype=torch.int64)
        _weights_cache[n] = idx * _signed(2 * _GOLDEN) + 1
    return _weights_cache[n]


def checksum(tensor: Tensor) -> int:
    """A 64-bit checksum of ``tensor``'s dtype, shape and raw bytes (see the module docstring).

    >>> checksum(torch.tensor([1.0, 2.0])) == checksum(torch.tensor([1.0, 2.0]))
    True
    >>> checksum(torch.tensor([1.0, 2.0])) == checksum(torch.tensor([2.0, 1.0]))
    False
    """
    data = tensor.detach().reshape(-1)
    if data.is_complex():
        data = torch.view_as_real(data).reshape(-1)
    data = data.contiguous()
    raw = data.view(torch.uint8) if data.numel() else torch.zeros(0, dtype=torch.uint8)
    n_words = raw.numel() // 8
    if n_words and raw.storage_offset() % 8:
        raw = raw.clone()
    words = raw[: n_words * 8].view(torch.int64)
    total = zlib.crc32(f"{tensor.dtype}{tuple(tensor.shape)}".encode())
    for start in range(0, n_words, _CHUNK):
        # Chunk by chunk on the CPU: a tensor on an accelerator is copied 8 MB at a time.
        chunk = words[start : start + _CHUNK].cpu()
        weights = _weights(chunk.numel()) if chunk.numel() == _CHUNK else _weights_for(chunk)
        mixed = chunk * (weights + _signed(2 * _GOLDEN * start))
        mixed ^= (mixed >> 29) & ((1 << 35) - 1)  # a logical shift: the mix stays a bijection
        total += int(mixed.sum())
    tail = raw[n_words * 8 :].cpu()
    if tail.numel():
        total += int.from_bytes(bytes(tail.tolist()), "little") * _MIX
    return _signed(total)


def _weights_for(chunk: Tensor) -> Tensor:
    return torch.arange(chunk.numel(), dtype=torch.int64) * _signed(2 * _GOLDEN) + 1


def _combine(parts: list[int]) -> int:
    total = 0
    for part in parts:
        total = (total * _MIX + (part & _MASK64) + 1) & _MASK64
    return _signed(total)


@dataclass
class _Entry:
    """One tensor of the model and what the trainable state holds of it."""

    ref: TensorRef
    chain: list[Constraint]
    free: Tensor | None = None  # constrained: which entries train (bool, the tensor's shape)
    saves_full: bool = False  # unconstrained and trains: saved whole
    free_checksum: int = 0
    base_checksum: int = 0
    extras: dict[str, Tensor] = field(default_factory=dict)  # θ, scores: key -> Parameter

    @property
    def name(self) -> str:
        return self.ref.name

    @property
    def positions(self) -> Tensor | None:
        """Where the stored entries sit in the full tensor, where the first constraint stores
        only some (the compact layout); None for a stored original of the tensor's shape."""
        return self.chain[0].stored_positions() if self.chain else None

    @property
    def shape(self) -> torch.Size:
        if self.positions is None:
            return self.ref.storage.shape
        shape = self.chain[0].mask_shape()
        assert shape is not None  # a constraint that stores positions knows the full shape
        return shape

    def positions_needed(self) -> bool:
        return any(c.mask_changed for c in self.chain)

    def mask_free(self) -> Tensor | None:
        """What the tensor's one updatable mask leaves free by itself, where its mask changed
        and other constraints fix some of those entries (a ``Mask`` behind ``Freeze(dim)``: the
        kept entries of frozen rows). The free entries alone do not say that mask then; None
        elsewhere."""
        own = self.own_mask_free()
        if own is None or self.free is None or not self.positions_needed():
            return None
        if torch.equal(own & self.free, own):
            return None
        return own

    def own_mask_free(self) -> Tensor | None:
        """What the tensor's one updatable mask leaves free by itself (None: not one such)."""
        masked = [c for c in self.chain if c.mask_spec is not None]
        if self.free is None or len(masked) != 1:
            return None
        return masked[0].free_entries(torch.ones_like(self.free)).expand(self.free.shape).clone()


def _free_mask(chain: list[Constraint], start: Tensor) -> Tensor:
    """Which entries of the tensor train, given those of its stored original (``start``).

    Each constraint says which of its input's free entries it saves
    (:meth:`~maskparam.Constraint.saved_entries`).
    """
    free = start
    for constraint in chain:
        free = constraint.saved_entries(free)
    return free


def _free_checksum(free: Tensor, mask_free: Tensor | None) -> int:
    """The free-entry checksum, covering the mask's own free entries where they are saved."""
    if mask_free is None:
        return checksum(free)
    return _combine([checksum(free), checksum(mask_free)])


def _selected_fixed(chain: list[Constraint], shape: torch.Size, device: torch.device) -> Tensor:
    """The entries a selection (Mask, Freeze, Triangular) fixes whatever the original holds."""
    fixed = torch.zeros(shape, dtype=torch.bool, device=device)
    dummy = torch.zeros(shape, device=device)
    for constraint in chain:
        pins = constraint.pins(dummy) if constraint.selects_entries else None
        if pins is not None:
            fixed |= pins.entries.expand(shape).to(device)
    return fixed


def _full_original(entry: _Entry) -> Tensor:
    """The stored original laid out in the tensor's shape (a compact one: zeros elsewhere)."""
    storage = entry.ref.storage.detach()
    return entry.chain[0].to_full(storage) if entry.chain else storage


def _state_parts(module: nn.Module, skip: str | None) -> list[int]:
    """Checksums of a module's saved state, except trainable Parameters and the ``skip`` mask."""
    state = {
        key: value
        for key, value in module.state_dict(keep_vars=True).items()
        if key != skip and not (isinstance(value, nn.Parameter) and value.requires_grad)
    }
    return _parts(state)


def _parts(state: Mapping[str, Tensor]) -> list[int]:
    parts = []
    for key, value in state.items():
        parts += [zlib.crc32(key.encode()), checksum(value)]
    return parts


def _base_checksum(entry: _Entry) -> int:
    ref = entry.ref
    if not entry.chain:
        return 0 if entry.saves_full else checksum(ref.storage)
    parts: list[int] = []
    for level, constraint in enumerate(entry.chain):
        parts += [level, *_parts(constraint.base_state())]  # the same in either layout
        for shared in constraint.shared_modules():
            parts += _state_parts(shared, None)
    assert entry.free is not None
    device = entry.free.device
    relied = ~entry.free & ~_selected_fixed(entry.chain, entry.shape, device)
    if bool(relied.any()):
        parts.append(checksum(_full_original(entry)[relied]))
    return _combine(parts)


def _changes_in_training(ref: TensorRef) -> bool:
    """A buffer that training changes: a normalisation layer's running statistics, a pruning
    schedule's step count."""
    if ref.local_name == PROGRESS_BUFFER:
        return True
    return isinstance(ref.module, _NormBase) and ref.local_name in (
        "running_mean",
        "running_var",
        "num_batches_tracked",
    )


def _plan(model: nn.Module, caller: str) -> list[_Entry]:
    entries = []
    for ref in find_tensors(model):
        module = ref.module
        if not ref.is_parameter and ref.local_name in module._non_persistent_buffers_set:
            continue  # derived (RoPE's inv_freq): not state, so not relied on either
        plist = list(parametrization_list(module, ref.local_name)) if ref.is_parametrized else []
        chain = [p for p in plist if isinstance(p, Constraint)]
        if len(chain) != len(plist):
            raise error(
                f"{caller} ({ref.name!r})",
                "the tensor has a parametrization that is not maskparam's, whose trained values "
                "this state cannot describe.",
                fix="save the full state_dict for this model.",
            )
        entry = _Entry(ref, chain)
        if chain:
            start = torch.full(
                entry.shape, ref.storage.requires_grad, dtype=torch.bool, device=ref.storage.device
            )
            with torch.no_grad():
                entry.free = _free_mask(chain, start)
            entry.free_checksum = _free_checksum(entry.free, entry.mask_free())
            entry.extras = _extras(chain, ref.name)
        else:
            entry.saves_full = ref.storage.requires_grad or _changes_in_training(ref)
            entry.free_checksum = int(entry.saves_full)
        with torch.no_grad():
            entry.base_checksum = _base_checksum(entry)
        entries.append(entry)
    return entries


def _extras(chain: list[Constraint], name: str) -> dict[str, Tensor]:
    """The constraints' own trained parameters by key; the second of a kind on one tensor gets
    ``.1`` (``"w.scores"``, ``"w.scores.1"``)."""
    extras: dict[str, Tensor] = {}
    seen: dict[str, int] = {}
    for constraint in chain:
        for key, value in constraint.trainable_extras(name).items():
            count = seen.get(key, 0)
            seen[key] = count + 1
            extras[f"{key}.{count}" if count else key] = value
    return extras


def _free_values(entry: _Entry) -> Tensor:
    assert entry.free is not None
    storage = entry.ref.storage.detach()
    return storage.reshape(-1).index_select(0, stored_indices(entry.free, entry.positions))


def _position_dtype(numel: int) -> torch.dtype:
    return torch.int32 if numel < 2**31 else torch.int64


def trainable_state_dict(model: nn.Module, *, positions: bool = False) -> dict[str, Tensor]:
    """Only what training can change: free entries, θ, learnable scores, unconstrained trainable
    tensors (and normalisation running statistics), with checksums of what they rely on.

    Load it with :func:`load_trainable_state_dict` onto a model built from the same base weights
    with the same rules. The format, and what the checksums cover, are described in
    ``maskparam.checkpoint.trainable``'s docstring (and docs/checkpoints.md).

    >>> import torch, maskparam as mp
    >>> layer = torch.nn.Linear(4, 4).requires_grad_(False)
    >>> _ = layer.weight.requires_grad_(True)  # the weight trains, the bias is base
    >>> _ = mp.apply_mask(layer, {"weight": mp.Freeze(dim=0, index=[1, 2, 3])})
    >>> state = mp.trainable_state_dict(layer)
    >>> state["weight.free_values"].shape  # the one row that trains
    torch.Size([4])

    ``positions=True``: save the free entries' positions with every mask (``update_masks``,
    ``harden`` and a checkpoint that brought another mask save them anyway), so that the masks
    travel with the state: where a mask computed from data (``fisher``, ``wanda``) may come out
    otherwise on the model it loads into, a tensor with one ``Mask`` takes the saved one.
    """
    check_module(model, "trainable_state_dict")
    refuse_sharded(model, "trainable_state_dict")
    check_bool(positions, "trainable_state_dict", "positions")
    refuse_sparse(model, "trainable_state_dict")
    entries = _plan(model, "trainable_state_dict")
    names = [entry.name for entry in entries]
    state: dict[str, Tensor] = {
        _FORMAT: torch.tensor([FORMAT_VERSION], dtype=torch.int64),
        _NAMES: torch.tensor(list("\n".join(names).encode()), dtype=torch.uint8),
        _FREE: torch.tensor([e.free_checksum for e in entries], dtype=torch.int64),
        _BASE: torch.tensor([e.base_checksum for e in entries], dtype=torch.int64),
    }
    with torch.no_grad():
        for entry in entries:
            # A mask pruned to nothing still travels when it changed: its empty values and
            # positions say so (a load then empties the model's mask too).
            needed = entry.positions_needed() or (positions and entry.free is not None)
            if entry.free is not None and (bool(entry.free.any()) or needed):
                state[f"{entry.name}.free_values"] = _free_values(entry).clone()
                if needed:
                    where = free_positions(entry.free, entry.free.shape)
                    state[f"{entry.name}.free_positions"] = where.to(
                        _position_dtype(entry.free.numel())
                    )
                    mask_free = entry.mask_free()
                    if mask_free is not None:
                        own = free_positions(mask_free, mask_free.shape)
                        state[f"{entry.name}.mask_positions"] = own.to(
                            _position_dtype(mask_free.numel())
                        )
            elif entry.saves_full:
                state[entry.name] = entry.ref.storage.detach().clone()
            for key, value in entry.extras.items():
                state.setdefault(key, value.detach().clone())
    return state


@dataclass
class _Load:
    """What validation decided: the masks to take, then the values to write."""

    masks: list[MaskUpdate] = field(default_factory=list)
    values: list[tuple[_Entry, Tensor]] = field(default_factory=list)
    full: list[tuple[Tensor, Tensor]] = field(default_factory=list)  # (target, value)


def load_trainable_state_dict(
    model: ModuleT,
    state: Mapping[str, Tensor],
    *,
    strict: bool = True,
    optimizer: Optimizers | None = UNSET,
) -> ModuleT:
    """Load a :func:`trainable_state_dict` onto ``model``; in place, returns ``model``.

    ``model`` must be built from the same base weights with the same rules: its names, masks
    and base checksums must match the state's, else nothing is written and the error says which
    tensor differs and how. With ``strict=True`` (the default) keys the model does not expect,
    and expected keys the state lacks, are refused by name; ``strict=False`` skips both (the
    checksums are still required and checked). Parameter objects stay the same, so an optimizer
    keeps working; where positions bring another ``Mask``, the mask is taken as
    :func:`~maskparam.update_masks` takes it, and so is ``optimizer`` (required there).
    """
    check_module(model, "load_trainable_state_dict")
    refuse_sharded(model, "load_trainable_state_dict")
    refuse_inference_mode("load_trainable_state_dict")
    refuse_sparse(model, "load_trainable_state_dict")
    check_bool(strict, "load_trainable_state_dict", "strict")
    _check_tensors(state)
    _check_meta(state)
    optimizers = [] if optimizer is UNSET else as_optimizers(optimizer, "load_trainable_state_dict")
    entries = _plan(model, "load_trainable_state_dict")
    load = _validate(entries, state, strict=strict)
    check_optimizers(
        load.masks, optimizers, given=optimizer is not UNSET, caller="load_trainable_state_dict"
    )
    with torch.no_grad():
        commit_all(load.masks, optimizers)
        for entry, values in load.values:
            _write_free(entry, values)
        for target, value in load.full:
            target.copy_(value)
    return model


def _check_tensors(state: object) -> None:
    if not isinstance(state, Mapping) or not all(
        isinstance(k, str) and isinstance(v, Tensor) for k, v in state.items()
    ):
        raise error(
            "load_trainable_state_dict",
            f"the state must be a mapping from str to tensors; got a {type(state).__name__}.",
            fix="pass what mp.trainable_state_dict returned (or torch.load of it).",
        )


def _refuse(problem: str, details: list[str], fix: str) -> MaskparamError:
    shown = details[:12] + ([f"... and {len(details) - 12} more"] if len(details) > 12 else [])
    return error("load_trainable_state_dict", problem, *shown, fix=fix)


def _check_meta(state: Mapping[str, Tensor]) -> None:
    missing = [key for key in _META if key not in state]
    if missing:
        raise _refuse(
            "the state is not a trainable state dict (it lacks its metadata); nothing was loaded.",
            [f"missing: {', '.join(missing)}"],
            fix="save it with mp.trainable_state_dict(model); for a full checkpoint use "
            "load_state_dict.",
        )
    version = state[_FORMAT]
    if version.numel() != 1 or int(version.reshape(-1)[0]) != FORMAT_VERSION:
        raise _refuse(
            f"the state has format {version.tolist()}, this maskparam reads {FORMAT_VERSION}; "
            "nothing was loaded.",
            [],
            fix="load it with the maskparam version that saved it.",
        )


def _saved_names(state: Mapping[str, Tensor]) -> list[str]:
    raw = state[_NAMES]
    if raw.dtype != torch.uint8 or raw.dim() != 1:
        raise _refuse("the state's 'meta:names' is corrupt; nothing was loaded.", [], fix=_RESAVE)
    text = bytes(raw.tolist()).decode("utf-8", errors="replace")
    return text.split("\n") if text else []


_RESAVE = "save the state again with mp.trainable_state_dict from the trained model."
_MASKS_DIFFER = "its free entries are not the state's"
_SAME = (
    "build the model from the same base weights, apply the same rules (same masks, seeds and "
    "settings), then load"
)


def _validate(entries: list[_Entry], state: Mapping[str, Tensor], *, strict: bool) -> _Load:
    names = [entry.name for entry in entries]
    saved_names = _saved_names(state)
    free_sums, base_sums = state[_FREE], state[_BASE]
    for sums, key in ((free_sums, _FREE), (base_sums, _BASE)):
        if sums.dtype != torch.int64 or tuple(sums.shape) != (len(saved_names),):
            raise _refuse(f"the state's {key!r} is corrupt; nothing was loaded.", [], fix=_RESAVE)
    if saved_names != names and sorted(saved_names) == sorted(names):
        # The same tensors, listed in another order: a tensor constrained on one side only is
        # listed after its module's plain ones. Compare by name: its checksums then say which.
        order = torch.tensor([saved_names.index(n) for n in names], dtype=torch.int64)
        free_sums, base_sums, saved_names = free_sums[order], base_sums[order], names
    if saved_names != names:
        only_state = [n for n in saved_names if n not in set(names)]
        only_model = [n for n in names if n not in set(saved_names)]
        raise _refuse(
            "the state was made for a model with other tensors; nothing was loaded.",
            [f"only in the state: {only_state[:8]}", f"only in the model: {only_model[:8]}"]
            if only_state or only_model
            else ["a tensor name appears twice"],
            fix=_SAME + ".",
        )

    expected: dict[str, tuple[_Entry, str]] = {}
    for entry in entries:
        brings_positions = f"{entry.name}.free_positions" in state
        if entry.free is not None and (bool(entry.free.any()) or brings_positions):
            expected[f"{entry.name}.free_values"] = (entry, "free_values")
        elif entry.saves_full:
            expected[entry.name] = (entry, "full")
        for key in entry.extras:
            expected.setdefault(key, (entry, "extra"))
    optional = {
        f"{entry.name}.{kind}_positions": entry
        for entry in entries
        if entry.free is not None
        for kind in ("free", "mask")
    }
    unknown = sorted(k for k in state if k not in expected and k not in optional and k not in _META)
    missing = [k for k in expected if k not in state]
    if strict and (unknown or missing):
        raise _refuse(
            "the state's keys do not match this model's trainable tensors; nothing was loaded.",
            [
                *([f"unexpected: {', '.join(unknown[:8])}"] if unknown else []),
                *([f"missing: {', '.join(missing[:8])}"] if missing else []),
            ],
            fix=_SAME + " (or pass strict=False to load the keys both have).",
        )

    problems: list[str] = []
    load = _Load()
    for index, entry in enumerate(entries):
        free_problem = _check_free(entry, state, int(free_sums[index]), load)
        if free_problem:
            problems.append(free_problem)
        elif int(base_sums[index]) != entry.base_checksum:
            problems.append(f"{entry.name!r}: {_base_difference(entry)}")
    for key, (entry, kind) in expected.items():
        if key not in state or kind == "free_values":
            continue
        target = entry.ref.storage if kind == "full" else entry.extras[key]
        value = state[key]
        if value.shape != target.shape or value.dtype != target.dtype:
            problems.append(
                f"{key!r}: {value.dtype} of shape {tuple(value.shape)}, this model's "
                f"{target.dtype} of shape {tuple(target.shape)}"
            )
        else:
            load.full.append((target.detach(), value.to(target.device)))
    if problems:
        fix = _SAME + "."
        if any(_MASKS_DIFFER in p for p in problems):
            fix = (
                f"{_SAME}: compute the masks as when the state was saved (a generator that reads "
                "batches, such as fisher or wanda, in eval mode with the same batches); or save "
                "the state with mp.trainable_state_dict(model, positions=True), whose masks "
                "then travel with it."
            )
        raise _refuse("the state does not fit this model; nothing was loaded.", problems, fix=fix)
    return load


def _base_difference(entry: _Entry) -> str:
    if not entry.chain:
        return (
            "its value differs from the one the state was made with (base checksum): another "
            "base model"
        )
    return (
        "what its trained entries rely on differs (base checksum: frozen values or slices, a "
        "subspace's θ₀, seed, projection or dim): another base model, other rules, or an "
        "update_masks whose Mask pruned entries a Freeze behind it holds (those frozen values "
        "became 0: load the trained model's full state_dict instead)"
    )


def _check_free(
    entry: _Entry, state: Mapping[str, Tensor], saved_checksum: int, load: _Load
) -> str | None:
    """Check a tensor's free entries against the state; plan their write (and a new mask)."""
    name = entry.name
    if entry.free is None:
        if saved_checksum != entry.free_checksum:
            return f"{name!r}: trains in the state but not in this model, or the other way round"
        return None
    values = state.get(f"{name}.free_values")
    positions = state.get(f"{name}.free_positions")
    own_positions = state.get(f"{name}.mask_positions")
    free = entry.free
    if own_positions is not None and positions is None:
        return f"{name!r}: the state has mask_positions without free_positions: it is corrupt"
    if positions is not None:
        saved_free, problem = _positions_mask(name, positions, free)
        if problem:
            return problem
        saved_own = None
        if own_positions is not None:
            saved_own, problem = _positions_mask(name, own_positions, free, key="mask_positions")
            if problem:
                return problem
        if _free_checksum(saved_free, saved_own) != saved_checksum:
            return f"{name!r}: its free_positions do not match their checksum: the state is corrupt"
        model_own = entry.own_mask_free()
        mask_differs = saved_own is not None and (
            model_own is None or not torch.equal(saved_own, model_own)
        )
        if mask_differs or not torch.equal(saved_free, free):
            update, problem = _take_mask(entry, saved_free, saved_own)
            if problem:
                return problem
            assert update is not None
            load.masks.append(update)
            free = saved_free
    elif saved_checksum != entry.free_checksum:
        return (
            f"{name!r}: {_MASKS_DIFFER} (free-entry mask checksum): the state was made for "
            "other rules or another mask (another mask seed, masks computed from other weights "
            "or from data that came out otherwise, such as fisher or wanda computed in train "
            "mode, whose dropout draws other masks; or masks changed after apply)"
        )
    if values is None:
        return None  # missing: refused above under strict
    n_free = int(free.sum())
    storage = entry.ref.storage
    if values.dim() != 1 or values.numel() != n_free or values.dtype != storage.dtype:
        return (
            f"{name + '.free_values'!r}: {values.dtype} of shape {tuple(values.shape)}; this "
            f"model trains {n_free} entries of {storage.dtype}: the state is corrupt or was made "
            "for other rules"
        )
    load.values.append((entry, values.to(storage.device)))
    return None


def _positions_mask(
    name: str, positions: Tensor, free: Tensor, *, key: str = "free_positions"
) -> tuple[Tensor, str | None]:
    numel = free.numel()
    bad = f"{name + '.' + key!r}:"
    if positions.dtype not in (torch.int32, torch.int64) or positions.dim() != 1:
        return free, f"{bad} {positions.dtype} of shape {tuple(positions.shape)}, not 1-D integers"
    flat = positions.to(torch.int64)
    if flat.numel() and (
        int(flat.min()) < 0
        or int(flat.max()) >= numel
        or (flat.numel() > 1 and not bool((flat[1:] > flat[:-1]).all()))
    ):
        return free, f"{bad} not increasing positions within the tensor's {numel} entries"
    mask = torch.zeros(numel, dtype=torch.bool, device=free.device)
    mask[flat.to(free.device)] = True
    return mask.reshape(free.shape), None


def _take_mask(
    entry: _Entry, saved_free: Tensor, saved_own: Tensor | None
) -> tuple[MaskUpdate | None, str | None]:
    """Plan giving the tensor's one mask the state's free entries (``saved_own``: what that mask
    leaves free by itself, where other constraints fix some of it), or say why it cannot."""
    name = entry.name
    masked = [(level, c) for level, c in enumerate(entry.chain) if c.mask_spec is not None]
    refusal = (
        f"{name!r}: the state's free entries (saved with their positions: its mask was changed "
        "after apply) are not this model's, and only a tensor with one Mask constraint can take "
        "them; load the trained model's full state_dict (or update_masks to the same masks) first"
    )
    if len(masked) != 1:
        return None, refusal
    level, constraint = masked[0]
    mask = constraint.mask_for_free(saved_free if saved_own is None else saved_own)
    if mask is None:
        return None, refusal
    others = [c for c in entry.chain if c is not constraint]
    start = torch.full_like(saved_free, entry.ref.storage.requires_grad)
    others_free = _free_mask(others, start)
    own = saved_free if saved_own is None else saved_own
    if not torch.equal(others_free & own, saved_free):
        return None, (
            f"{name!r}: the state's free entries include entries the tensor's other "
            "constraints fix: it was made for other rules"
        )
    _, current = walk_stack(entry.ref.module, entry.ref.local_name, through=level)
    update = MaskUpdate(entry.ref, level, constraint, mask, current)
    update.select(mask)
    return update, None


def _write_free(entry: _Entry, values: Tensor) -> None:
    """Write the free entries into the stored original (the same Parameter object)."""
    storage = entry.ref.storage
    constraints = entry.chain
    start = torch.full(entry.shape, storage.requires_grad, dtype=torch.bool, device=storage.device)
    flat_free = _free_mask(constraints, start).reshape(-1)  # after any new mask
    at = stored_indices(flat_free.reshape(entry.shape), entry.positions)
    write_at(storage, at, values)  # in place, whatever its strides (channels_last)
