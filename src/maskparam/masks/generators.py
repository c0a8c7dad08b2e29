"""Mask sources: generators that compute a mask from the tensor, and the checks every mask passes.

A mask marks *selected* entries with ``True``: :class:`~maskparam.Mask` keeps the selected entries
(the rest become zero), :class:`~maskparam.Freeze` freezes them (the rest train).

>>> import torch
>>> import maskparam as mp
>>> w = torch.tensor([[0.1, -3.0], [2.0, 0.5]])
>>> mp.masks.magnitude(0.5)(w)
tensor([[False,  True],
        [ True, False]])
>>> mp.masks.rows([1])(w)
tensor([[False],
        [ True]])
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import ClassVar, TypeAlias

import torch
from torch import Tensor, nn
from typing_extensions import override

from maskparam.core.constraint import JointSource
from maskparam.errors import MaskparamError, check_int, error

__all__ = [
    "GlobalMagnitudeMask",
    "JointMaskGenerator",
    "MaskGenerator",
    "MaskSource",
    "columns",
    "filters",
    "global_magnitude",
    "magnitude",
    "n_m",
    "random",
    "rows",
    "slices",
    "structured",
]

IndexLike: TypeAlias = int | Sequence[int] | range | Tensor


class MaskGenerator:
    """Base of the generators in :mod:`maskparam.masks`: a callable from a tensor to a bool mask.

    Subclasses implement :meth:`build`; ``subject`` names the tensor in error messages.
    """

    #: True for a generator that ranks entries by their current values (magnitudes, norms):
    #: where it regrows pruned entries, which are all 0, it picks among them by position, not
    #: by anything they hold, so :func:`~maskparam.update_masks` warns.
    ranks_by_value: ClassVar[bool] = False

    def build(self, tensor: Tensor, subject: str) -> Tensor:
        """Return a bool mask for ``tensor`` (its shape, or one that broadcasts to it)."""
        raise NotImplementedError

    def rebuild(self, tensor: Tensor, kept: Tensor, subject: str) -> Tensor:
        """The new mask of a tensor whose :class:`~maskparam.Mask` keeps ``kept`` now (a bool
        tensor that broadcasts to it), as :func:`~maskparam.update_masks` recomputes it.

        By default :meth:`build`: most generators do not depend on the mask before. The magnitude
        generators rank a pruned tensor as ``torch.nn.utils.prune`` prunes it again (see
        :func:`keep_largest_after`).
        """
        del kept
        return self.build(tensor, subject)

    def __call__(self, tensor: Tensor) -> Tensor:
        return self.build(tensor, subject="tensor")

    def describe(self) -> str:
        """What the generator selects, in words (``Mask(keeps ...)``, ``Freeze(freezes ...)``)."""
        return type(self).__name__

    def __invert__(self) -> MaskGenerator:
        """The complement: selects what this generator does not (joint when this one is).

        ``mp.Freeze(~mp.masks.fisher(...))`` trains the entries Fisher selects, freezes the rest.
        """
        if isinstance(self, JointMaskGenerator):
            return JointComplementMask(self)
        return ComplementMask(self)


MaskSource: TypeAlias = Tensor | Callable[[Tensor], Tensor] | MaskGenerator
"""A bool or 0/1 tensor, a callable of the tensor that returns one, or a generator from here."""


def check_fraction(value: object, what: str) -> None:
    """Refuse anything but a number in [0, 1], naming ``what`` (a bool is not a number here)."""
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not (number and 0.0 <= value <= 1.0):  # type: ignore[operator]
        raise error(
            f"{what}={value!r}",
            f"{what} must be a number between 0 and 1.",
            fix=f"pass a {what} such as 0.5.",
        )


@dataclass(frozen=True)
class MagnitudeMask(MaskGenerator):
    """Keeps the largest-magnitude entries; see :func:`magnitude`."""

    ranks_by_value = True

    sparsity: float
    of: str = "all"

    def __post_init__(self) -> None:
        check_fraction(self.sparsity, "sparsity")
        check_of(self.of, "magnitude")

    @override
    def describe(self) -> str:
        return f"the {100 * (1 - self.sparsity):g}% largest |w|{_OF_WORDS[self.of]}"

    @override
    def build(self, tensor: Tensor, subject: str) -> Tensor:
        del subject
        # Same count as torch.nn.utils.prune.L1Unstructured, and the same set of entries.
        n_pruned = round(self.sparsity * tensor.numel())
        return keep_largest(tensor.detach().abs().reshape(-1), n_pruned).reshape(tensor.shape)

    @override
    def rebuild(self, tensor: Tensor, kept: Tensor, subject: str) -> Tensor:
        del subject
        flat_kept = kept.to(tensor.device, torch.bool).expand(tensor.shape).reshape(-1)
        n_pruned = pruned_count(self.sparsity, self.of, flat_kept)
        magnitudes = tensor.detach().abs().reshape(-1)
        return keep_largest_after(magnitudes, n_pruned, flat_kept).reshape(tensor.shape)


_OF_WORDS = {"all": "", "remaining": " of what remains"}


def check_of(of: object, generator: str) -> None:
    """``of`` is "all" (the sparsity is the tensor's total) or "remaining" (of the kept)."""
    if of not in _OF_WORDS:
        raise error(
            f"masks.{generator}",
            f"of={of!r}: the sparsity is of 'all' the entries (the tensor's total) or of the "
            "'remaining' ones (what the mask keeps now).",
            fix=f"pass of='all' (the default) or of='remaining', e.g. {generator}(0.2, "
            "of='remaining') prunes 20% of what remains, as torch's prune does when called again.",
        )


def pruned_count(sparsity: float, of: str, kept: Tensor) -> int:
    """How many entries a re-ranking prunes in all: ``sparsity`` of every entry, or, ``of=
    "remaining"``, the entries pruned now and ``sparsity`` of those ``kept`` (flat, bool): the
    counts of torch's ``PruningContainer`` (``round(amount * n)``)."""
    if of == "remaining":
        n_kept = int(kept.sum())
        return kept.numel() - n_kept + round(sparsity * n_kept)
    return round(sparsity * kept.numel())


def keep_largest_after(magnitudes: Tensor, n_pruned: int, kept: Tensor) -> Tensor:
    """:func:`keep_largest` of a tensor pruned before, where ``kept`` (flat, bool) is what its mask
    keeps now: the set ``torch.nn.utils.prune`` keeps when it prunes a pruned tensor again.

    Pruned entries rank below every kept one, whatever their values (a kept exact zero
    included): while the sparsity grows, they stay pruned and the ``n_pruned - pruned now``
    more are the smallest of the kept entries, ranked among those alone, as prune's
    ``PruningContainer`` ranks ``t[mask == 1]`` (so its ``topk`` breaks ties the same way).
    Where fewer are pruned than now, only pruned entries grow back: the largest of them.
    """
    pruned_now = int(kept.numel() - kept.sum())
    mask = kept.clone()
    if n_pruned >= pruned_now:
        mask[kept] = keep_largest(magnitudes[kept], n_pruned - pruned_now)
    else:
        mask[~kept] = keep_largest(magnitudes[~kept], n_pruned)
    return mask


def keep_largest(magnitudes: Tensor, n_pruned: int) -> Tensor:
    """A flat bool mask of ``magnitudes`` (flat, non-negative) without its ``n_pruned`` smallest
    entries: the set ``torch.topk(largest=False)`` prunes, as ``torch.nn.utils.prune`` does."""
    if not n_pruned:
        return torch.ones(magnitudes.shape, dtype=torch.bool, device=magnitudes.device)
    found = _kth_smallest(magnitudes, n_pruned)
    # When exactly n entries are <= the n-th smallest, they are the n smallest whatever the
    # order among equal values, so topk would prune exactly these.
    if found is not None and found[1] == n_pruned:
        return magnitudes.le(found[0]).logical_not_()  # NaN is kept: topk ranks it last
    # Ties at the threshold (or NaN among the smallest): which of the equal values topk
    # prunes is its own choice, so ask topk, as prune does. Unsorted where torch's kernels
    # (CPU, CUDA) select first and only then sort the selection: the same set at 1/3 the cost.
    mask = torch.ones(magnitudes.numel(), dtype=torch.bool, device=magnitudes.device)
    unsorted = magnitudes.device.type in ("cpu", "cuda")
    smallest = torch.topk(magnitudes, k=n_pruned, largest=False, sorted=not unsorted)
    mask[smallest.indices] = False
    return mask


class JointMaskGenerator(MaskGenerator):
    """A generator that computes the masks of several tensors at once: every tensor one rule
    selects (in :func:`maskparam.apply_mask` and :func:`maskparam.update_masks`), e.g. one
    ranking across all of them (:func:`global_magnitude`).

    Subclasses implement :meth:`build_joint`; called on one tensor, the generator treats it as
    the only member.
    """

    def build_joint(self, members: Sequence[tuple[str, Tensor]]) -> list[Tensor]:
        """The bool masks of ``members``, (name, tensor) pairs, in their order."""
        raise NotImplementedError

    def rebuild_joint(
        self, members: Sequence[tuple[str, Tensor]], kept: Sequence[Tensor]
    ) -> list[Tensor]:
        """:meth:`build_joint` for tensors whose Masks keep ``kept`` now (one bool tensor per
        member, broadcasting to it); by default the masks before do not matter."""
        del kept
        return self.build_joint(members)

    def build_in_model(
        self,
        model: nn.Module,
        members: Sequence[tuple[str, Tensor]],
        kept: Sequence[Tensor] | None,
    ) -> list[Tensor]:
        """The masks of ``members``, tensors of ``model`` under their names, with ``kept``
        what their Masks keep now (None: masked now for the first time). A generator that reads
        the model's structure (:func:`~maskparam.masks.channels`) overrides this;
        :func:`~maskparam.apply_mask` and :func:`~maskparam.update_masks` call it with the model
        they work on. By default the model is not needed: :meth:`rebuild_joint` or
        :meth:`build_joint`."""
        del model
        if kept is not None:
            return self.rebuild_joint(members, kept)
        return self.build_joint(members)

    @override
    def rebuild(self, tensor: Tensor, kept: Tensor, subject: str) -> Tensor:
        return self.rebuild_joint([(subject, tensor)], [kept])[0]

    @override
    def build(self, tensor: Tensor, subject: str) -> Tensor:
        return self.build_joint([(subject, tensor)])[0]


def _stream(seed: int, name: str) -> torch.Generator:
    """A CPU generator of its own for the tensor ``name`` under ``seed``: the same in every
    process and Python version (a hash of both, not Python's salted ``hash``)."""
    digest = hashlib.blake2b(f"{seed}\0{name}".encode(), digest_size=8).digest()
    return torch.Generator(device="cpu").manual_seed(int.from_bytes(digest, "big") >> 1)


@dataclass(frozen=True)
class RandomMask(JointMaskGenerator):
    """Selects exactly ``round(density * numel)`` entries of each tensor at random; see
    :func:`random`."""

    density: float
    seed: int | None = None

    def __post_init__(self) -> None:
        check_fraction(self.density, "density")
        seed = self.seed
        if seed is not None and (type(seed) is not int or not 0 <= seed < 2**63):  # not a bool
            raise error(
                f"masks.random(seed={seed!r})",
                "the seed must be None (torch's global generator) or an int in [0, 2**63).",
                fix="pass e.g. seed=0, or leave it out and call torch.manual_seed(...) first.",
            )

    @override
    def describe(self) -> str:
        seeded = "" if self.seed is None else f" (seed {self.seed})"
        return f"a random {100 * self.density:g}%{seeded}"

    @override
    def build_joint(self, members: Sequence[tuple[str, Tensor]]) -> list[Tensor]:
        return [self._one(name, tensor) for name, tensor in members]

    def _one(self, name: str, tensor: Tensor) -> Tensor:
        numel = tensor.numel()
        # Drawn on the CPU, whatever the tensor's device: the same mask on every device.
        generator = None if self.seed is None else _stream(self.seed, name)
        chosen = torch.randperm(numel, generator=generator)[: round(self.density * numel)]
        mask = torch.zeros(numel, dtype=torch.bool)
        mask[chosen] = True
        return mask.reshape(tensor.shape).to(tensor.device)


@dataclass(frozen=True)
class GlobalMagnitudeMask(JointMaskGenerator):
    """Keeps the largest |w| of all the tensors a rule selects together; see
    :func:`global_magnitude`."""

    ranks_by_value = True

    sparsity: float
    of: str = "all"

    def __post_init__(self) -> None:
        check_fraction(self.sparsity, "sparsity")
        check_of(self.of, "global_magnitude")

    @override
    def describe(self) -> str:
        words = _OF_WORDS[self.of]
        return f"the {100 * (1 - self.sparsity):g}% largest |w| of the rule's tensors{words}"

    @override
    def build_joint(self, members: Sequence[tuple[str, Tensor]]) -> list[Tensor]:
        if not members:
            return []
        tensors = [tensor.detach().abs() for _, tensor in members]
        # One ranking of the concatenation, in the rule's order: what prune.global_unstructured
        # ranks (parameters_to_vector of the same tensors), so ties break the same way.
        magnitudes = concatenated(tensors)
        kept = keep_largest(magnitudes, round(self.sparsity * magnitudes.numel()))
        return split_like(kept, tensors)

    @override
    def rebuild_joint(
        self, members: Sequence[tuple[str, Tensor]], kept: Sequence[Tensor]
    ) -> list[Tensor]:
        if not members:
            return []
        tensors = [tensor.detach().abs() for _, tensor in members]
        magnitudes = concatenated(tensors)
        # What prune.global_unstructured does to pruned tensors: one PruningContainer over the
        # concatenated importance scores and the concatenated masks.
        flat_kept = torch.cat(
            [
                k.to(magnitudes.device, torch.bool).expand(t.shape).reshape(-1)
                for k, t in zip(kept, tensors, strict=True)
            ]
        )
        n_pruned = pruned_count(self.sparsity, self.of, flat_kept)
        return split_like(keep_largest_after(magnitudes, n_pruned, flat_kept), tensors)


def concatenated(tensors: Sequence[Tensor]) -> Tensor:
    """The tensors flattened into one, in order, in their common dtype (exact: a wider float
    keeps every value and their order), on the first one's device: for one ranking of them all."""
    dtype = tensors[0].dtype
    for tensor in tensors[1:]:
        dtype = torch.promote_types(dtype, tensor.dtype)
    device = tensors[0].device
    return torch.cat([t.reshape(-1).to(device, dtype) for t in tensors])


def split_like(flat: Tensor, tensors: Sequence[Tensor]) -> list[Tensor]:
    """``flat`` (from :func:`concatenated`) cut back into one tensor per shape and device."""
    parts = torch.split(flat, [t.numel() for t in tensors])
    return [part.reshape(t.shape).to(t.device) for part, t in zip(parts, tensors, strict=True)]


_INT_VIEWS = {2: torch.int16, 4: torch.int32, 8: torch.int64}

#: Below this many entries topk is cheap enough (tens of microseconds) and the radix pass's
#: 65536-bucket histogram would cost more than it saves.
_RADIX_MIN_NUMEL = 2**16


def _kth_smallest(magnitudes: Tensor, k: int) -> tuple[Tensor, int] | None:
    """The k-th smallest (1-based) of a flat tensor of magnitudes (``abs()``: sign bits clear),
    and how many entries are <= it; None where this way does not apply (small, meta, odd dtype or
    device: use topk).

    A radix select: non-negative floats order as their bit patterns do, so a histogram of the top
    16 bits finds the one bucket that holds the k-th smallest, and ``kthvalue`` ranks only that
    bucket (for trained or initialised weights, a small fraction of the entries). Exact, not
    sampled; about 4 light passes, where ``topk(k=n/2)`` sorts (value, index) pairs.
    """
    view = _INT_VIEWS.get(magnitudes.element_size())
    if (
        view is None
        or not magnitudes.is_floating_point()
        or magnitudes.numel() < _RADIX_MIN_NUMEL
        or magnitudes.device.type not in ("cpu", "cuda")
    ):
        return None
    shift = 8 * magnitudes.element_size() - 16
    buckets = magnitudes.view(view) >> shift  # in [0, 2**15): the sign bit is clear
    counts = torch.bincount(buckets, minlength=2**16).cumsum_(0)
    bucket = int(torch.searchsorted(counts, k))  # the first bucket whose cumulative count >= k
    below = int(counts[bucket - 1]) if bucket else 0
    inside = magnitudes[buckets == bucket]
    threshold = torch.kthvalue(inside, k - below).values
    # Every entry of a lower bucket is smaller, every entry of a higher one larger (or NaN).
    return threshold, below + int(inside.le(threshold).sum())


def check_index(index: object, subject: str, what: str) -> None:
    """Refuse slice indices that are not ints (a list of them, a range or an integer tensor)."""
    if isinstance(index, Tensor) and index.is_meta:
        raise error(
            subject,
            f"{what} is a meta tensor: its values are needed.",
            fix="pass the indices as a list of ints or a CPU tensor.",
        )
    values = index.tolist() if isinstance(index, Tensor) else index
    values = [values] if isinstance(values, int) else values
    values = sorted(values) if isinstance(values, (set, frozenset)) else values
    ints = isinstance(values, (list, tuple, range)) and all(
        isinstance(v, int) and not isinstance(v, bool) for v in values
    )
    if not ints or (isinstance(index, Tensor) and index.is_floating_point()):
        raise error(
            subject,
            f"{what} must be integers; got {index!r}.",
            fix="pass an int, a list of ints, a range or an integer tensor.",
        )


def normalize_index(index: IndexLike, size: int, subject: str, what: str) -> Tensor:
    """Validate slice indices against a dimension of ``size``; negative ones count from the end.

    Returns a sorted int64 tensor without duplicates.
    """
    values = index.tolist() if isinstance(index, Tensor) else index
    values = [values] if isinstance(values, int) else list(values)
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        raise error(
            subject,
            f"{what} must be integers; got {values!r}.",
            fix="pass an int, a list of ints, a range or an integer tensor.",
        )
    bad = [v for v in values if not -size <= v < size]
    if bad:
        raise error(
            subject,
            f"{what} {bad} out of range for a dimension of size {size}.",
            fix=f"use indices in [{-size}, {size - 1}].",
        )
    return torch.tensor(sorted({v % size for v in values}), dtype=torch.int64, device="cpu")


@dataclass(frozen=True)
class SliceMask(MaskGenerator):
    """Selects whole slices along one dimension; see :func:`slices`."""

    dim: int
    index: tuple[int, ...]

    @override
    def describe(self) -> str:
        shown = ", ".join(map(str, self.index[:6])) + (", ..." if len(self.index) > 6 else "")
        return f"slices [{shown}] along dim {self.dim}"

    @override
    def build(self, tensor: Tensor, subject: str) -> Tensor:
        if tensor.dim() == 0:
            raise error(
                subject,
                "the tensor is a scalar (0-d): it has no dimension to select slices along.",
                fix="use a mask tensor of shape () instead, or select tensors with dimensions.",
            )
        if not -tensor.dim() <= self.dim < max(tensor.dim(), 1):
            raise error(
                subject,
                f"dim={self.dim} is out of range for a tensor of shape {tuple(tensor.shape)}.",
                fix=f"use a dim in [{-tensor.dim()}, {tensor.dim() - 1}].",
            )
        dim = self.dim % tensor.dim()
        size = tensor.shape[dim]
        index = normalize_index(self.index, size, subject, "index")
        # Broadcast shape (1, ..., size, ..., 1): one byte per slice, not per entry.
        shape = [1] * tensor.dim()
        shape[dim] = size
        mask = torch.zeros(size, dtype=torch.bool, device="cpu")
        mask[index] = True
        return mask.reshape(shape).to(tensor.device)


def random(density: float, seed: int | None = None) -> RandomMask:
    """Select exactly ``round(density * numel)`` entries of each tensor uniformly at random; every
    tensor gets a mask of its own.

    * Without a seed, the masks are drawn from torch's global generator, as ``torch.rand`` is:
      ``torch.manual_seed(s)`` before :func:`~maskparam.apply_mask` makes them reproducible, and
      five values of ``s`` give five different baselines. The tensors draw in the rule's order
      (the model's), each :func:`~maskparam.update_masks` draws anew.
    * With ``seed``, each tensor's mask comes from a stream of its own, derived from the seed and
      the tensor's qualified name (``"encoder.0.weight"``): reproducible in any process, whatever
      the global generator (which it leaves untouched) and in whatever order tensors are visited;
      the same seed gives the same mask each time a tensor is (re)computed, and a higher density
      keeps every entry a lower one kept. Called on a tensor directly (``random(0.5, seed=0)(w)``),
      the name is ``"tensor"``.

    >>> import torch, maskparam as mp
    >>> int(random(0.25, seed=1)(torch.empty(4, 4)).sum())
    4
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4))
    >>> _ = mp.apply_mask(model, {"*.weight": mp.Mask(random(0.5, seed=0), layout="dense")})
    >>> torch.equal(model[0].weight != 0, model[1].weight != 0)  # a mask of its own each
    False
    """
    return RandomMask(density, seed)


def magnitude(sparsity: float, *, of: str = "all") -> MagnitudeMask:
    """Select all but the ``round(sparsity * numel)`` smallest-magnitude entries.

    The mask equals the one of ``torch.nn.utils.prune.l1_unstructured(amount=sparsity)``.
    ``sparsity`` is the tensor's total (``of="all"``): given to ``update_masks`` of a tensor
    already 36% pruned, ``magnitude(0.2)`` regrows entries, ``magnitude(0.36)`` changes nothing.
    ``of="remaining"`` prunes ``sparsity`` of what the mask keeps now, as a second call of
    ``l1_unstructured`` does (the lottery-ticket rounds: 20% of what remains each time); on a
    tensor masked for the first time both mean the same.

    >>> import torch
    >>> magnitude(0.25)(torch.tensor([1.0, -4.0, 0.5, 2.0]))
    tensor([ True,  True, False,  True])
    """
    return MagnitudeMask(sparsity, of)


def global_magnitude(sparsity: float, *, of: str = "all") -> GlobalMagnitudeMask:
    """Select all but the ``round(sparsity * n)`` smallest |w| among the ``n`` entries of *all*
    the tensors one rule selects: one ranking across them, so layers end up with different
    sparsities.

    The masks equal those of ``torch.nn.utils.prune.global_unstructured(parameters,
    pruning_method=prune.L1Unstructured, amount=sparsity)`` with the tensors in the model's order.
    ``of``: as for :func:`magnitude`; ``of="remaining"`` is ``global_unstructured`` called again.

    >>> import torch, maskparam as mp
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4))
    >>> _ = mp.apply_mask(model, {"*.weight": mp.Mask(mp.masks.global_magnitude(0.75))})
    >>> int((model[0].weight != 0).sum() + (model[1].weight != 0).sum())
    8
    """
    return GlobalMagnitudeMask(sparsity, of)


_NAMED_NORMS = {"fro": "Frobenius", "nuc": "nuclear"}


def is_norm(norm: object) -> bool:
    """Whether ``norm`` is a p that torch.norm takes: a real number (not NaN), 'fro' or 'nuc'."""
    if isinstance(norm, str):
        return norm in _NAMED_NORMS
    if not isinstance(norm, (int, float)) or isinstance(norm, bool):
        return False
    try:
        return not math.isnan(float(norm))
    except OverflowError:  # an int beyond float range
        return False


@dataclass(frozen=True)
class StructuredMask(MaskGenerator):
    """Keeps the whole slices along ``dim`` of largest Ln norm; see :func:`structured`."""

    sparsity: float
    dim: int = 0
    norm: float | str = 2

    def __post_init__(self) -> None:
        check_fraction(self.sparsity, "sparsity")
        check_int(self.dim, "masks.structured", "dim")
        if not is_norm(self.norm):
            raise error(
                f"masks.structured(norm={self.norm!r})",
                "the norm must be a number (the p of an Lp norm, inf and -inf included), "
                "'fro' or 'nuc', as torch.nn.utils.prune.ln_structured takes.",
                fix="pass e.g. norm=1, norm=2 or norm=float('inf').",
            )

    @override
    def describe(self) -> str:
        norm = _NAMED_NORMS.get(self.norm, "") if isinstance(self.norm, str) else f"L{self.norm:g}"
        kept = f"{100 * (1 - self.sparsity):g}%"
        return f"the {kept} of slices along dim {self.dim} of largest {norm} norm"

    @override
    def build(self, tensor: Tensor, subject: str) -> Tensor:
        if tensor.dim() == 0:
            raise error(
                subject,
                "the tensor is a scalar (0-d): it has no slices to rank.",
                fix="select tensors with dimensions.",
            )
        if not -tensor.dim() <= self.dim < tensor.dim():
            raise error(
                subject,
                f"dim={self.dim} is out of range for a tensor of shape {tuple(tensor.shape)}.",
                fix=f"use a dim in [{-tensor.dim()}, {tensor.dim() - 1}].",
            )
        dim = self.dim % tensor.dim()
        size = tensor.shape[dim]
        shape = [1] * tensor.dim()  # broadcast shape (1, ..., size, ..., 1): one byte per slice
        shape[dim] = size
        scores = tensor.detach() if tensor.dim() > 1 else tensor.detach().unsqueeze(1)
        others = [d for d in range(scores.dim()) if d != dim]
        if self.norm == "nuc" and len(others) != 2:
            raise error(
                subject,
                f"the nuclear norm of a slice needs slices that are matrices (a 3-d tensor); "
                f"this tensor has shape {tuple(tensor.shape)}.",
                fix="use norm=2 (or 'fro') for this tensor.",
            )
        # LnStructured.compute_mask, step by step: the same count, norms and topk, so the same
        # slices (ties included). A vector's slices are its entries (prune refuses 1-d tensors).
        n_pruned = round(self.sparsity * size)
        if not n_pruned:
            return torch.ones(shape, dtype=torch.bool, device=tensor.device)
        # torch.norm's 'fro' is the 2-norm of the entries; passed as 2, it also works on 4-d
        # tensors, where torch.norm would ask matrix_norm to reduce 3 dims and raise.
        norms = torch.norm(scores, p=2 if self.norm == "fro" else self.norm, dim=others)
        kept = torch.topk(norms, k=size - n_pruned, largest=True).indices
        mask = torch.zeros(size, dtype=torch.bool, device=tensor.device)
        mask[kept] = True
        return mask.reshape(shape)


@dataclass(frozen=True)
class NMMask(MaskGenerator):
    """Keeps the ``n`` largest |w| of every ``m`` consecutive entries; see :func:`n_m`."""

    n: int
    m: int

    def __post_init__(self) -> None:
        check_int(self.n, "masks.n_m", "n", minimum=0)
        check_int(self.m, "masks.n_m", "m", minimum=1)
        if self.n > self.m:
            raise error(
                f"masks.n_m(n={self.n}, m={self.m})",
                "n (kept in every group) must be <= m (the group size).",
                fix="pass e.g. n=2, m=4.",
            )

    @override
    def describe(self) -> str:
        return f"{self.n}:{self.m} (the {self.n} largest |w| of every {self.m} along the last dim)"

    @override
    def build(self, tensor: Tensor, subject: str) -> Tensor:
        shape = tuple(tensor.shape)
        if not shape:
            raise error(
                subject,
                "the tensor is a scalar (0-d): it has no last dimension to group entries along.",
                fix="select tensors with dimensions.",
            )
        last = math.prod(shape[1:]) if len(shape) > 2 else shape[-1]  # a conv as (out, -1)
        if last % self.m:
            viewed = f" (viewed as {(shape[0], last)})" if len(shape) > 2 else ""
            raise error(
                subject,
                f"the last dimension of shape {shape}{viewed} has size {last}, which is not a "
                f"multiple of m={self.m}: its entries do not split into groups of {self.m}.",
                fix=f"use an m that divides {last}, or leave this tensor out of the rule.",
            )
        # Groups of m consecutive entries in row-major order: exactly the groups along the last
        # dim of the (shape[0], -1) view, as last % m == 0. A stable sort ranks each group: the
        # n largest |w| stay, ties to the lowest index, NaN counts as largest.
        magnitudes = tensor.detach().abs().reshape(-1, self.m)
        order = torch.sort(magnitudes, dim=1, descending=True, stable=True).indices
        mask = torch.zeros(magnitudes.shape, dtype=torch.bool, device=tensor.device)
        return mask.scatter_(1, order[:, : self.n], True).reshape(shape)


def structured(sparsity: float, *, dim: int = 0, norm: float | str = 2) -> StructuredMask:
    """Select whole slices along ``dim``: all but the ``round(sparsity * size)`` of least Ln norm.

    The mask equals the ``weight_mask`` of ``torch.nn.utils.prune.ln_structured(module, name,
    amount=sparsity, n=norm, dim=dim)``, tied norms included (the same ``torch.norm`` and
    ``topk``), in the broadcast shape ``(1, ..., size, ..., 1)``. ``norm`` is any p that
    ``torch.norm`` takes (``1``, ``2``, ``float("inf")``, ``-inf``, 0, fractions), ``"fro"`` (the
    2-norm of a slice's entries) or ``"nuc"`` (3-d tensors only). Unlike prune, a sparsity is
    always a fraction (``1`` prunes every slice) and a 1-d tensor is accepted (its slices are its
    entries). With dim=0: output features of a Linear, filters of a conv.

    >>> import torch
    >>> w = torch.tensor([[3.0, 4.0], [1.0, 1.0], [0.0, 6.0]])
    >>> structured(1 / 3)(w)  # row 2-norms 5, 1.41, 6: the weakest row goes
    tensor([[ True],
            [False],
            [ True]])
    >>> structured(0.5, dim=1, norm=1)(w)  # column 1-norms 4, 11
    tensor([[False,  True]])
    """
    return StructuredMask(sparsity, dim, norm)


def n_m(n: int, m: int) -> NMMask:
    """Select the ``n`` largest-magnitude entries of every ``m`` consecutive ones (N:M sparsity).

    Groups run along the last dimension; a tensor of more than 2 dims (a conv weight) is viewed
    as ``(shape[0], -1)``, and that last dimension must be a multiple of ``m``. Ties within a group
    go to the lowest index; NaN counts as largest. 2:4 is the pattern that
    ``torch.sparse.to_sparse_semi_structured`` accelerates on CUDA.

    >>> import torch
    >>> n_m(2, 4)(torch.tensor([[0.1, -3.0, 2.0, 0.5, 1.0, 1.0, 1.0, 0.0]]))
    tensor([[False,  True,  True, False,  True,  True, False, False]])
    """
    return NMMask(n, m)


def slices(dim: int, index: IndexLike) -> SliceMask:
    """Select whole slices ``index`` along ``dim`` (negative indices count from the end).

    >>> import torch
    >>> slices(1, [0, -1])(torch.empty(2, 3))
    tensor([[ True, False,  True]])
    """
    check_int(dim, "masks.slices", "dim")
    check_index(index, "masks.slices", "index")
    values = index.tolist() if isinstance(index, Tensor) else index
    values = [values] if isinstance(values, int) else values
    values = sorted(values) if isinstance(values, (set, frozenset)) else values
    return SliceMask(dim, tuple(values))


def rows(index: IndexLike) -> SliceMask:
    """Select rows (slices along dim 0); for a Linear weight, output features."""
    return slices(0, index)


def columns(index: IndexLike) -> SliceMask:
    """Select columns (slices along dim 1); for a Linear weight, input features."""
    return slices(1, index)


def filters(index: IndexLike) -> SliceMask:
    """Select conv filters (output channels: slices along dim 0 of a conv weight)."""
    return slices(0, index)


@dataclass(frozen=True)
class ComplementMask(MaskGenerator):
    """Selects what ``inner`` does not; ``~generator`` builds one."""

    inner: MaskGenerator

    @override
    def describe(self) -> str:
        return f"all but {self.inner.describe()}"

    @override
    def __invert__(self) -> MaskGenerator:
        return self.inner

    @override
    def build(self, tensor: Tensor, subject: str) -> Tensor:
        return as_binary(self.inner.build(tensor, subject), tensor, subject).logical_not()


@dataclass(frozen=True)
class JointComplementMask(ComplementMask, JointMaskGenerator):
    """Selects what the joint generator ``inner`` does not, for every tensor of the rule."""

    inner: JointMaskGenerator

    @override
    def build_joint(self, members: Sequence[tuple[str, Tensor]]) -> list[Tensor]:
        return [
            as_binary(mask, tensor, name).logical_not()
            for mask, (name, tensor) in zip(
                build_joint_checked(self.inner, members), members, strict=True
            )
        ]

    @override
    def build_in_model(
        self,
        model: nn.Module,
        members: Sequence[tuple[str, Tensor]],
        kept: Sequence[Tensor] | None,
    ) -> list[Tensor]:
        del kept  # what the complement keeps says nothing of what the inner generator kept
        return [
            as_binary(mask, tensor, name).logical_not()
            for mask, (name, tensor) in zip(
                build_joint_checked(self.inner, members, model=model), members, strict=True
            )
        ]


def build_joint_checked(
    source: JointSource,
    members: Sequence[tuple[str, Tensor]],
    *,
    kept: Sequence[Tensor] | None = None,
    model: nn.Module | None = None,
) -> list[Tensor]:
    """``source.build_joint(members)``: one mask per member, or a MaskparamError that names the
    generator (whatever else it raised, or a wrong number of masks). With ``kept`` (what each
    member's Mask keeps now, for :func:`~maskparam.update_masks`), ``rebuild_joint``; with the
    ``model`` the members belong to, ``build_in_model``."""
    try:
        with torch.no_grad():
            if model is not None and isinstance(source, JointMaskGenerator):
                found = list(source.build_in_model(model, members, kept))
            elif kept is not None and isinstance(source, JointMaskGenerator):
                found = list(source.rebuild_joint(members, kept))
            else:
                found = list(source.build_joint(members))
    except MaskparamError:
        raise
    except Exception as failure:
        raise error(
            f"{source.describe()} for {len(members)} tensor(s)",
            f"the generator raised {type(failure).__name__}: {failure}",
            fix="fix the generator (build_joint(members) -> one mask per member).",
        ) from failure
    if len(found) != len(members):
        raise error(
            type(source).__name__,
            f"build_joint returned {len(found)} mask(s) for {len(members)} tensor(s).",
            fix="return a list of bool masks, one per (name, tensor) pair, in their order.",
        )
    return found


def describe_source(source: object) -> str:
    """A mask source in words, for summaries: what it *selects*."""
    if isinstance(source, MaskGenerator):
        return source.describe()
    if isinstance(source, Tensor):
        return "the given entries"
    return f"what {getattr(source, '__name__', type(source).__name__)}(tensor) selected"


def resolve(
    source: MaskSource, tensor: Tensor, subject: str, *, kept: Tensor | None = None
) -> Tensor:
    """Turn a mask source into a bool mask that broadcasts to ``tensor``, on its device.

    Rejects anything that is not a binary tensor of a broadcastable shape, naming ``subject``.
    ``kept``: what the tensor's Mask keeps now, where :func:`~maskparam.update_masks` recomputes
    it (a generator's :meth:`MaskGenerator.rebuild`).
    """
    if isinstance(source, MaskGenerator):
        mask = (
            source.build(tensor, subject) if kept is None else source.rebuild(tensor, kept, subject)
        )
    elif isinstance(source, Tensor):
        if source.is_meta:
            raise error(
                subject,
                "the mask is a meta tensor: its values are needed.",
                fix="build the mask on a real device (it may be a CPU tensor).",
            )
        mask = source
    elif callable(source):
        try:
            with torch.no_grad():
                mask = source(tensor.detach())
        except Exception as failure:
            raise error(
                subject,
                f"the mask callable {source!r} raised {type(failure).__name__}: {failure}",
                fix="fix the callable; it is called once, at apply time, with the tensor.",
            ) from failure
        if not isinstance(mask, Tensor):
            raise error(
                subject,
                f"the mask callable {source!r} returned a {type(mask).__name__}, not a tensor.",
                fix="return a bool or 0/1 tensor of the tensor's shape.",
            )
    else:
        raise error(
            subject,
            f"a mask must be a tensor, a callable of the tensor or a maskparam.masks generator; "
            f"got a {type(source).__name__}.",
            fix="pass e.g. torch.ones_like(weight, dtype=torch.bool) or mp.masks.random(0.5).",
        )
    return as_binary(mask, tensor, subject)


def as_binary(mask: Tensor, tensor: Tensor, subject: str) -> Tensor:
    """``mask`` as a bool mask on ``tensor``'s device; refused (naming ``subject``) unless it is
    binary and broadcasts to ``tensor``."""
    shape = tuple(tensor.shape)
    trailing = shape[len(shape) - mask.dim() :] if mask.dim() <= len(shape) else None
    fits = trailing is not None and all(
        m in (1, s) for m, s in zip(mask.shape, trailing, strict=True)
    )
    if not fits:
        raise error(
            subject,
            f"the mask has shape {tuple(mask.shape)}, which does not broadcast to the tensor's "
            f"shape {shape}.",
            fix=f"pass a mask of shape {shape}, or one that broadcasts to it "
            f"(e.g. {shape[:1] + (1,) * (len(shape) - 1)} selects whole rows).",
        )
    if mask.dtype != torch.bool:
        if mask.is_complex():
            raise error(subject, "a mask may not be complex.", fix="pass a bool or 0/1 mask.")
        not_binary = (mask != 0) & (mask != 1)  # NaN compares unequal to both: caught too
        if bool(not_binary.any()):
            examples = sorted(set(mask[not_binary].tolist()), key=str)[:5]
            raise error(
                subject,
                f"the mask must be binary, but {int(not_binary.sum())} of its "
                f"{mask.numel()} values are neither 0 nor 1.",
                f"examples: {examples}",
                fix="threshold it first, e.g. mask > 0.5, or pass a bool tensor.",
            )
        mask = mask != 0
    return mask.to(tensor.device)
