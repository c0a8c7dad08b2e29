"""Subspace training: ``W = θ₀ + reshape(E·θ)`` per tensor, or one θ for a whole group of tensors.

θ starts at zero, so applying leaves outputs bit-identical; θ₀ is the tensor's value at apply
time and never trains; θ ∈ Rᵈ is the only trainable coordinate. With ``group="name"``, every
tensor selected with that group shares one θ: the "intrinsic dimension" setting of Li et al.
(2018) and Aghajanyan et al. (2020), where one small vector drives the whole model.

>>> import torch, maskparam as mp
>>> model = torch.nn.Sequential(torch.nn.Linear(10, 10), torch.nn.Linear(10, 2))
>>> _ = mp.apply_mask(model, {"*": mp.Subspace(8, projection="fastfood", group="all")})
>>> [name for name, p in model.named_parameters() if p.requires_grad]
['0.parametrizations.weight.0.coordinates.theta']
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor, nn
from typing_extensions import override

from maskparam.constraints.projections import (
    BasisProjection,
    DenseProjection,
    FastfoodProjection,
    SparseProjection,
)
from maskparam.core.constraint import Constraint, FixedTensors, Pins, Spec
from maskparam.core.tensors import find_tensors
from maskparam.errors import check_int, check_module, error

__all__ = ["Subspace", "SubspaceConstraint", "SubspaceCoordinates", "subspace_theta"]

ProjectionName = Literal["gaussian", "sparse", "fastfood"]
_PROJECTIONS = ("gaussian", "sparse", "fastfood")
_MAX_SEED = 2**43


class SubspaceCoordinates(FixedTensors):
    """The trainable θ of one subspace (shared by a group) and the column scaling of its basis.

    ``seed`` and ``inv_norm`` are fixed tensors (never averaged or cast): both are saved, and a
    checkpoint whose seed, or whose column norms (another projection, dim or set of tensors),
    differ from this model's is refused instead of pairing its θ with another subspace. A basis
    drawn by a later generation (:attr:`BasisProjection.generation` above 1: Fastfood) also
    saves its ``generation``: the column norms alone need not tell two generations apart (they
    are rounded to the basis' dtype), so a checkpoint without it, or with another, is refused.
    """

    theta: nn.Parameter
    inv_norm: Tensor
    seed: Tensor

    def __init__(
        self,
        dim: int,
        dtype: torch.dtype,
        inv_norm: Tensor,
        seed: int,
        label: str,
        group: str | None,
        device: torch.device,
        generation: int = 1,
    ) -> None:
        super().__init__()
        self.theta = nn.Parameter(torch.zeros(dim, dtype=dtype, device=device))
        # Computed on the CPU from the regenerated basis, so known on meta tensors too.
        self._inv_norm_cpu = inv_norm
        self.set_fixed("inv_norm", inv_norm.to(device), persistent=True)
        self.set_fixed(
            "seed", torch.tensor(seed, dtype=torch.int64, device=device), persistent=True
        )
        self.seed_value = seed
        self.generation_value = generation
        if generation > 1:  # generation 1 saved none: its checkpoints keep loading as they were
            self.set_fixed(
                "generation",
                torch.tensor(generation, dtype=torch.int64, device=device),
                persistent=True,
            )
        self.label = label  # the group's name, or the one tensor's name, for messages
        self.group = group

    def scaled(self) -> Tensor:
        """θ with the basis' column scaling folded in: E·scaled() has unit-norm columns."""
        scaled: Tensor = self.theta * self.inv_norm.to(self.theta.dtype)
        return scaled

    @override
    def regenerate(self, name: str, device: torch.device) -> Tensor:
        if name == "seed":
            return torch.tensor(self.seed_value, dtype=torch.int64, device=device)
        if name == "generation":
            return torch.tensor(self.generation_value, dtype=torch.int64, device=device)
        return self._inv_norm_cpu.to(device)

    @override
    def check_state(self, state: Mapping[str, Tensor]) -> list[str]:
        problems = super().check_state(state)
        # A checkpoint of this subspace (its seed is there) without a generation was drawn by
        # generation 1, which saved none: for this seed its E may differ from this model's.
        if self.generation_value > 1 and "seed" in state and "generation" not in state:
            problems.append(f"generation: {self._generation_problem(None)}")
        return problems

    def _generation_problem(self, loaded: int | None) -> str:
        made = (
            "generation 1 of its random basis (it has no 'generation' entry)"
            if loaded is None
            else f"generation {loaded} of its random basis"
        )
        return (
            f"the checkpoint of subspace {self.label!r} was made with {made}, this model draws "
            f"generation {self.generation_value}: the same seed gives another basis, so its θ "
            "means another subspace (load it with the maskparam that saved it, bake it with "
            "mp.remove_parametrizations and load the plain weights)"
        )

    @override
    def check_loaded(self, name: str, loaded: Tensor) -> str | None:
        if name == "seed" and int(loaded) != self.seed_value:
            return (
                f"the checkpoint of subspace {self.label!r} was made with seed={int(loaded)}, "
                f"this model with seed={self.seed_value}: its θ belongs to another subspace "
                f"(apply Subspace(..., seed={int(loaded)}) before loading)"
            )
        if name == "generation" and int(loaded) != self.generation_value:
            return self._generation_problem(int(loaded))
        current = self._inv_norm_cpu
        if name == "inv_norm" and not torch.equal(loaded.cpu().to(current.dtype), current):
            return (
                f"the checkpoint of subspace {self.label!r} has other basis column norms: it was "
                "made with another projection, dim or set of tensors, so its θ means another "
                "subspace"
            )
        return None  # the seed matched; inv_norm was compared above


class SubspaceConstraint(Constraint):
    """``θ₀ + reshape(E_i · θ)``, where θ₀ is the stored original, frozen.

    The group's :class:`SubspaceCoordinates` is registered in its first member only, so θ
    appears once in ``parameters()`` and in the state_dict; the other members refer to it.
    """

    def __init__(
        self,
        coordinates: SubspaceCoordinates,
        projection: BasisProjection,
        *,
        owner: bool,
        description: str,
    ) -> None:
        super().__init__()
        if owner:
            self.coordinates = coordinates
        else:
            object.__setattr__(self, "coordinates", coordinates)  # a reference, not a submodule
        self.projection: BasisProjection = projection
        self.description = description
        self.original_requires_grad = True

    @override
    def forward(self, x: Tensor) -> Tensor:
        # detach(): θ₀ never trains, even if a script sets requires_grad on every parameter.
        # The basis keeps the dtype it was generated in (a later .double() or .half() casts θ
        # and the result, never E), so a checkpoint reloads bit for bit after any cast.
        shift: Tensor = self.projection(self.coordinates.scaled())
        return x.detach() + shift.to(x.dtype).reshape(x.shape)

    @override
    def trained_parameters(self) -> list[Tensor]:
        return [self.coordinates.theta]  # shared: also for members that do not register it

    @override
    def group_key(self) -> str | None:
        return self.coordinates.group

    @override
    def on_registered(self, original: Tensor) -> None:
        self.original_requires_grad = original.requires_grad
        original.requires_grad_(False)

    @override
    def on_removed(self, original: Tensor) -> None:
        original.requires_grad_(self.original_requires_grad)

    @override
    def trainable_extras(self, tensor_name: str) -> dict[str, Tensor]:
        coordinates = self.coordinates
        if not coordinates.theta.requires_grad:
            return {}
        key = f"group:{coordinates.group}.theta" if coordinates.group else f"{tensor_name}.theta"
        return {key: coordinates.theta}

    @override
    def shared_modules(self) -> list[nn.Module]:
        return [self.coordinates]  # members that do not own θ refer to it

    @override
    def trained_through(self) -> str:
        coordinates = self.coordinates
        return f"θ of {coordinates.label!r} ({coordinates.theta.numel():,})"

    @override
    def pins(self, value: Tensor) -> Pins:
        # Every entry is fixed to θ₀ + E·θ: the tensor's own entries never train; θ does.
        with torch.no_grad():
            return Pins(torch.ones((), dtype=torch.bool).expand(value.shape), self(value))

    @override
    def describe(self) -> str:
        return self.description


def _is_positive_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


@dataclass(frozen=True, eq=False)
class Subspace(Spec):
    """Train a tensor (or a group of tensors) in the affine subspace ``θ₀ + E·θ``, θ ∈ R^dim.

    ``basis``: your own E, shape ``(numel, dim)`` (for a group: ``(D, dim)`` with the rows in
    the order of the group's tensors, as ``parameters_to_vector`` orders them), used as given.
    Otherwise a random E from ``projection`` and ``seed``, with unit-norm columns over the group:
    ``"gaussian"`` (dense, D·dim floats), ``"sparse"`` (Li et al.'s very sparse ±1 projection) or
    ``"fastfood"`` (O(D) memory, O(D·√L) flops in small matmuls, L = 2^⌈log₂ dim⌉). A basis whose generation needs more than
    ``max_dense_bytes`` beyond O(D) is refused. ``group``: tensors selected with the same group name share one θ.
    """

    dim: int
    basis: Tensor | None = field(default=None, kw_only=True)
    projection: ProjectionName = field(default="gaussian", kw_only=True)
    seed: int = field(default=0, kw_only=True)
    group: str | None = field(default=None, kw_only=True)
    max_dense_bytes: int = field(default=2**30, kw_only=True)

    def __post_init__(self) -> None:
        if not _is_positive_int(self.dim):
            raise error(
                "Subspace",
                f"dim must be a positive int; got {self.dim!r}.",
                fix="pass e.g. Subspace(100).",
            )
        if self.projection not in _PROJECTIONS:
            raise error(
                "Subspace",
                f"unknown projection {self.projection!r}.",
                fix=f"use one of {', '.join(map(repr, _PROJECTIONS))}, or pass basis=.",
            )
        check_int(self.seed, "Subspace", "seed", minimum=0)
        check_int(self.max_dense_bytes, "Subspace", "max_dense_bytes", minimum=0)
        if self.group is not None and not isinstance(self.group, str):
            raise error(
                "Subspace",
                f"group must be a str (the group's name) or None; got {self.group!r}.",
                fix="pass e.g. group='all'.",
            )
        if self.basis is not None:
            self._check_basis()
        if self.seed >= _MAX_SEED:
            # Each member's block is drawn from seed * 2**20 + i, which must fit torch's int64.
            raise error(
                "Subspace",
                f"seed must be below 2**43; got {self.seed}.",
                fix="pass a smaller seed (e.g. seed % 2**43).",
            )

    def _check_basis(self) -> None:
        basis = self.basis
        if not isinstance(basis, torch.Tensor):
            raise error(
                "Subspace",
                f"basis must be a tensor of shape (numel, dim); got a {type(basis).__name__}.",
                fix="pass e.g. basis=torch.randn(numel, dim).",
            )
        if self.projection != "gaussian" or self.seed != 0:
            raise error(
                "Subspace",
                "basis= is used as given, so projection= and seed= would be silently ignored.",
                fix="pass either basis= or projection=/seed=, not both.",
            )
        if basis.is_meta:
            raise error(
                "Subspace",
                "the basis is a meta tensor: its values are needed.",
                fix="pass a basis with values (on any real device).",
            )
        if not bool(torch.isfinite(basis).all()):
            bad = int((~torch.isfinite(basis)).sum())
            raise error(
                "Subspace",
                f"the basis holds {bad} non-finite values (NaN or inf): every entry it drives "
                "would be NaN.",
                fix="pass a finite basis.",
            )

    @override
    def group_key(self) -> str | None:
        return self.group

    def config(self) -> tuple[object, ...]:
        """What every member of one group must agree on."""
        return (
            self.dim,
            self.projection,
            self.seed,
            id(self.basis) if self.basis is not None else None,
        )

    @override
    def build(self, name: str, tensor: Tensor) -> Constraint:
        return self.build_group([(name, tensor)], [self])[0]

    @override
    def build_group(
        self, members: Sequence[tuple[str, Tensor]], specs: Sequence[Spec]
    ) -> list[Constraint]:
        label = self.group if self.group is not None else members[0][0]
        subject = f"Subspace {'group ' + repr(self.group) if self.group else 'for ' + repr(label)}"
        for spec in specs:
            if not isinstance(spec, Subspace) or spec.config() != self.config():
                raise error(
                    subject,
                    "its members were given different settings (dim, projection, seed or basis).",
                    fix="use one Subspace(...) object for the whole group, or different group names.",
                )
        sizes = [tensor.numel() for _, tensor in members]
        total = sum(sizes)
        if self.dim > total:
            raise error(
                subject,
                f"dim={self.dim} exceeds the {total:,} entries it would drive.",
                fix=f"choose dim <= {total}, or put more tensors in the group.",
            )
        dtype = members[0][1].dtype
        device = members[0][1].device
        for name, tensor in members:
            if not tensor.is_floating_point():
                raise error(
                    f"Subspace for {name!r}", f"needs a floating-point tensor; got {tensor.dtype}.",
                    fix="select floating-point tensors only.",
                )  # fmt: skip
            if tensor.dtype != dtype or tensor.device != device:
                raise error(
                    subject,
                    f"one θ cannot drive tensors of different dtypes or devices: "
                    f"{members[0][0]!r} is {dtype} on {device}, {name!r} {tensor.dtype} on "
                    f"{tensor.device}.",
                    fix="cast the model to one dtype and device first, or use one group per dtype.",
                )
        with torch.device("cpu"):  # drawn on the CPU, even under a `torch.device("meta")` context
            projections = self._projections(subject, sizes, total, dtype)
            if self.basis is None:
                norms = sum(
                    (p.column_sq_norms() for p in projections),
                    torch.zeros(self.dim, dtype=torch.float64),
                )
                inv_norm = norms.rsqrt().to(dtype)
            else:
                inv_norm = torch.ones(self.dim, dtype=dtype)  # the user's basis: used as given
        generation = projections[0].generation  # 1 for a user's basis (a DenseProjection)
        coordinates = SubspaceCoordinates(
            self.dim, dtype, inv_norm, self.seed, label, self.group, device, generation
        )
        kind = "basis" if self.basis is not None else self.projection
        description = f"Subspace({kind}, dim={self.dim} of D={total:,}" + (
            f", group {self.group!r})" if self.group else ")"
        )
        return [
            SubspaceConstraint(
                coordinates, projection.to(device), owner=i == 0, description=description
            )
            for i, projection in enumerate(projections)
        ]

    def _projections(
        self, subject: str, sizes: list[int], total: int, dtype: torch.dtype
    ) -> list[BasisProjection]:
        if self.basis is not None:
            return self._user_blocks(subject, sizes, total, dtype)
        # One seed per member, so each tensor's block is independent and regenerates alone.
        seeds = [self.seed * 2**20 + i for i in range(len(sizes))]
        needed = self._peak_bytes(sizes, total, dtype)
        if needed > self.max_dense_bytes:
            raise error(
                subject,
                f"generating a {self.projection} basis of {total:,} x {self.dim} takes about "
                f"{needed:,} bytes at its peak (limit max_dense_bytes={self.max_dense_bytes:,}).",
                fix=_LESS_MEMORY[self.projection] + ", or raise max_dense_bytes.",
            )
        if self.projection == "gaussian":
            return [
                DenseProjection.gaussian(n, self.dim, s, dtype)
                for n, s in zip(sizes, seeds, strict=True)
            ]
        if self.projection == "sparse":
            density = _sparse_density(total)
            return [
                SparseProjection(n, self.dim, density, s, dtype)
                for n, s in zip(sizes, seeds, strict=True)
            ]
        return [
            FastfoodProjection(n, self.dim, s, dtype) for n, s in zip(sizes, seeds, strict=True)
        ]

    def _peak_bytes(self, sizes: list[int], total: int, dtype: torch.dtype) -> int:
        """The memory a random basis takes while it is generated beyond what grows with the
        model (the largest temporaries of each generator, from their shapes)."""
        element = torch.finfo(dtype).bits // 8
        if self.projection == "gaussian":  # a float64 draw, then the cast
            return total * self.dim * (8 + element)
        if self.projection == "sparse":
            # Per expected nonzero: the float64 uniforms, int64 gaps, positions and 2 indices,
            # the signs; drawn with a 6-sigma margin.
            nonzeros = total * self.dim * _sparse_density(total)
            return int(nonzeros * (8 + 8 + 8 + 16 + element) * 1.1) + 4096
        # Fastfood's per-entry buffers grow with the model, as its weights do, and are not
        # counted; the column norms of a truncated last block need a (dim, L) float64 identity
        # and its two transforms, which grow with dim * L.
        length = 1 << max(self.dim - 1, 0).bit_length()
        return 3 * self.dim * length * 8 if any(n % length for n in sizes) else 0

    def _user_blocks(
        self, subject: str, sizes: list[int], total: int, dtype: torch.dtype
    ) -> list[BasisProjection]:
        basis = self.basis
        assert basis is not None
        if tuple(basis.shape) != (total, self.dim):
            raise error(
                subject,
                f"the basis has shape {tuple(basis.shape)}, but it must map {self.dim} "
                f"coordinates to {total:,} entries: shape ({total}, {self.dim}).",
                fix="pass a (numel, dim) basis (for a group: rows in the order of its tensors).",
            )
        if basis.dtype != dtype:
            raise error(
                subject,
                f"the basis has dtype {basis.dtype}, the tensors {dtype}.",
                fix=f"pass basis.to({dtype}).",
            )
        starts = [sum(sizes[:i]) for i in range(len(sizes))]
        return [
            DenseProjection(basis.detach()[start : start + size].contiguous())
            for start, size in zip(starts, sizes, strict=True)
        ]


_LESS_MEMORY = {
    "gaussian": "use projection='fastfood' (O(D) memory) or 'sparse'",
    "sparse": "use projection='fastfood' (O(D) memory) or a smaller dim",
    "fastfood": "use a smaller dim (the norms of a truncated last block need dim x L floats)",
}


def _sparse_density(total: int) -> float:
    return 1.0 / max(math.sqrt(total), 1.0)  # s = √D, as Li et al. use it


def subspace_theta(model: nn.Module, name: str) -> nn.Parameter:
    """The trainable θ of a subspace, by group name or by the name of one of its tensors.

    >>> import torch, maskparam as mp
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    >>> _ = mp.apply_mask(model, {"*": mp.Subspace(3, group="all")})
    >>> mp.subspace_theta(model, "all").shape, mp.subspace_theta(model, "1.bias").shape
    (torch.Size([3]), torch.Size([3]))
    """
    check_module(model, "subspace_theta")
    if not isinstance(name, str):
        raise error(
            "subspace_theta", f"the name must be a str; got {name!r}.", fix="pass e.g. 'fc.weight'."
        )
    groups: dict[str, nn.Parameter] = {}
    for ref in find_tensors(model):
        for parametrization in ref.parametrizations:
            if isinstance(parametrization, SubspaceConstraint):
                theta = parametrization.coordinates.theta
                groups.setdefault(parametrization.coordinates.label, theta)
                for alias in ref.all_names:
                    groups.setdefault(alias, theta)
    if name not in groups:
        raise error(
            f"subspace_theta({name!r})",
            "no subspace group or subspace tensor of this name.",
            f"known: {sorted(groups)[:8]}",
            fix="pass a group name (Subspace(..., group=...)) or a constrained tensor's name.",
        )
    return groups[name]
