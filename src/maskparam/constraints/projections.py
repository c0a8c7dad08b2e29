"""Random projections E: ℝᵈ → ℝⁿ for :class:`~maskparam.Subspace`, one block of rows per tensor.

Each projection is an ``nn.Module`` mapping θ (shape ``(d,)``) to a flat vector of ``n`` entries,
and reports the squared norms of its columns, so that a group of tensors can share one θ with
unit-norm columns over the whole group (Li et al. 2018). All are regenerated bit for bit from a
seed, so checkpoints store the seed, not the matrix.

* :class:`DenseProjection`: an explicit ``(n, d)`` matrix (Gaussian, or the user's own).
  ``n·d`` floats of memory.
* :class:`SparseProjection`: Li, Hastie and Church's very sparse projection, entries ``±1`` with
  probability ``1/(2s)`` each and ``0`` otherwise, ``s = √D``: about ``n·d/√D`` nonzeros.
* :class:`FastfoodProjection`: Le, Sarlós & Smola's Fastfood transform ``H G Π H B``, stacked
  ``⌈n/L⌉`` times with ``L = 2^⌈log₂ d⌉``: O(n) memory (7 bytes per entry: int8 signs, int32
  positions, float16 G), and O(n·√d) flops in small matmuls (faster here than O(n log d)
  butterflies). The Walsh-Hadamard transform is written with plain torch ops, so autograd
  derives an exact backward (a widely copied implementation normalises its backward but not its
  forward: gradients off by 1/L).
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
from torch import Tensor, nn
from typing_extensions import override

from maskparam.core.constraint import FixedTensors

__all__ = [
    "BasisProjection",
    "DenseProjection",
    "FastfoodProjection",
    "SparseProjection",
    "fwht",
    "hadamard",
    "hadamard_factors",
]


class BasisProjection(FixedTensors):
    """Base of the projections: ``forward(theta) -> flat`` and the columns' squared norms.

    Random projections keep their matrices as fixed tensors (never in the state_dict, never
    averaged or cast) in the dtype they were drawn in, and draw them again from their seed where
    they hold nothing (after ``to_empty()``): checkpoints carry the seed, not the matrix.
    """

    def column_sq_norms(self) -> Tensor:
        """Squared Euclidean norm of each of the ``d`` columns of this block of E (float64)."""
        raise NotImplementedError

    def generate(self) -> dict[str, Tensor]:
        """The seeded tensors, freshly drawn on the CPU (empty for a given matrix)."""
        return {}

    rows: int

    #: Bumped when what a seed draws changes. Above 1 it is saved with the coordinates of the
    #: subspace, so that a checkpoint of another generation (another E for the same seed) is
    #: refused rather than loaded onto this E (see SubspaceCoordinates).
    generation: ClassVar[int] = 1

    def _install(self, tensors: dict[str, Tensor]) -> None:
        for name, value in tensors.items():
            self.set_fixed(name, value)

    @override
    def regenerate(self, name: str, device: torch.device) -> Tensor:
        with torch.device("cpu"):  # drawn on the CPU even under a `torch.device("meta")` context
            return self.generate()[name].to(device)

    @override
    def forward(self, theta: Tensor) -> Tensor:
        if theta.is_meta:  # shapes only (registration on a meta model evaluates once)
            return theta.new_empty(self.rows)
        self.materialize_like(theta)
        return self.project(theta)

    def project(self, theta: Tensor) -> Tensor:
        """``E @ θ`` as a flat vector of ``rows`` entries."""
        raise NotImplementedError


def hadamard(n: int, dtype: torch.dtype = torch.float32) -> Tensor:
    """The n x n Sylvester Hadamard matrix (entries ±1; n a power of 2)."""
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat((torch.cat((h, h), dim=1), torch.cat((h, -h), dim=1)), dim=0)
    return h.to(dtype)


def hadamard_factors(length: int, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """``(H_a, H_b)`` with ``a·b = length`` for :func:`fwht`; ``a = 1`` (one matmul) for L <= 64.

    Measured here (benchmarks/subspace.py): for small L one matmul with the whole H beats both
    factored forms; from L = 128 on, two matmuls with ``a ≈ b ≈ √L`` win.
    """
    a = 1 if length <= 64 else 1 << ((length.bit_length() - 1) // 2)
    return hadamard(a, dtype), hadamard(length // a, dtype)


def fwht(x: Tensor, factors: tuple[Tensor, Tensor] | None = None) -> Tensor:
    """Unnormalised Walsh-Hadamard transform over the last dimension (a power of 2).

    ``fwht(fwht(x)) == L * x``. Since ``H_L = H_a ⊗ H_b`` with ``a·b = L``, the transform of a
    row viewed as an ``a x b`` matrix X is ``H_a X H_b``: small matmuls, O(L·√L) flops but about
    7x faster here than the ``log L`` memory-bound butterflies of the textbook O(L log L)
    version, and plain differentiable torch ops. Pass ``factors`` (from
    :func:`hadamard_factors`, on x's device) to avoid rebuilding them.

    >>> fwht(torch.tensor([1.0, 0.0, 0.0, 0.0]))
    tensor([1., 1., 1., 1.])
    >>> fwht(torch.tensor([1.0, 2.0]))
    tensor([ 3., -1.])
    """
    length = x.shape[-1]
    left, right = factors if factors is not None else hadamard_factors(length, x.dtype)
    if left.shape[0] == 1:
        return x @ right
    rows = torch.matmul(left, x.reshape(-1, left.shape[0], right.shape[0]))
    return torch.matmul(rows, right).reshape(x.shape)


def _generator(seed: int) -> torch.Generator:
    return torch.Generator(device="cpu").manual_seed(seed)


def _gaussian(rows: int, dim: int, seed: int, dtype: torch.dtype) -> Tensor:
    return torch.randn(rows, dim, generator=_generator(seed), dtype=torch.float64).to(dtype)


class DenseProjection(BasisProjection):
    """``E @ θ`` with an explicit matrix (Gaussian from a seed, or given)."""

    matrix: Tensor

    def __init__(self, matrix: Tensor, *, seed: int | None = None) -> None:
        super().__init__()
        self.seed = seed
        self.rows = matrix.shape[0]
        # A seeded Gaussian regenerates bit for bit: no need to store D·d floats in checkpoints.
        # A basis of the user's own is state like any buffer.
        if seed is None:
            self.register_buffer("matrix", matrix)
        else:
            self.set_fixed("matrix", matrix)

    @classmethod
    def gaussian(cls, rows: int, dim: int, seed: int, dtype: torch.dtype) -> DenseProjection:
        return cls(_gaussian(rows, dim, seed, dtype), seed=seed)

    @override
    def generate(self) -> dict[str, Tensor]:
        if self.seed is None:
            return {}
        rows, dim = self.matrix.shape
        return {"matrix": _gaussian(rows, dim, self.seed, self.matrix.dtype)}

    @override
    def project(self, theta: Tensor) -> Tensor:
        return self.matrix @ theta.to(self.matrix.dtype)

    @override
    def column_sq_norms(self) -> Tensor:
        return self.matrix.double().square().sum(dim=0)


class SparseProjection(BasisProjection):
    """``E @ θ`` with a very sparse ±1 matrix in COO form (Li, Hastie and Church 2006)."""

    matrix: Tensor

    def __init__(self, rows: int, dim: int, density: float, seed: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.rows, self.dim, self.density, self.seed, self.dtype = rows, dim, density, seed, dtype
        self._install(self.generate())

    @override
    def generate(self) -> dict[str, Tensor]:
        rows, dim, density, dtype = self.rows, self.dim, self.density, self.dtype
        generator = _generator(self.seed)
        total = rows * dim
        # Positions of a Bernoulli(density) process over the flattened (rows, dim) matrix, drawn
        # as geometric gaps: exact, and O(nonzeros) rather than O(rows·dim) random numbers.
        expected = total * density
        draws = int(expected + 6 * math.sqrt(expected) + 16)
        if density >= 1.0:
            flat = torch.arange(total)
        else:
            uniform = torch.rand(draws, generator=generator, dtype=torch.float64)
            gaps = torch.floor(torch.log1p(-uniform) / math.log1p(-density)).long() + 1
            flat = torch.cumsum(gaps, dim=0) - 1
            flat = flat[flat < total]
        signs = torch.randint(0, 2, (flat.numel(),), generator=generator).to(dtype) * 2 - 1
        indices = torch.stack((flat // dim, flat % dim))
        # Built sorted and duplicate-free above, so the invariant checks would only cost time.
        matrix = torch.sparse_coo_tensor(
            indices, signs, (rows, dim), is_coalesced=True, check_invariants=False
        )
        return {"matrix": matrix}

    @override
    def project(self, theta: Tensor) -> Tensor:
        product: Tensor = torch.sparse.mm(self.matrix, theta.to(self.dtype).unsqueeze(1))
        return product.squeeze(1)

    @override
    def column_sq_norms(self) -> Tensor:
        columns = self.matrix.indices()[1]
        return torch.zeros(self.matrix.shape[1], dtype=torch.float64).index_add_(
            0, columns, self.matrix.values().double().square()
        )


class FastfoodProjection(BasisProjection):
    """Stacked Fastfood blocks ``H G Π H B`` mapping θ (padded to ``L``) to ``rows`` entries.

    Stored per entry of the padded ``⌈rows/L⌉ x L`` blocks, 7 bytes whatever the dtype (a float32
    basis would take 16, a float64 one 24): the signs of B as int8, Π as flat int32 positions
    into all the blocks (int64 from 2^31 entries on), and G rounded to float16 (bfloat16 for a
    bfloat16 basis). All three are exact in the forward: ``±1 · x`` is exact, a permutation
    copies, and float16 values convert exactly to float32/float64. :meth:`column_sq_norms`
    reads the same tensors, so it describes the forward's E.
    """

    #: The generation of the drawing, saved with a Fastfood subspace's coordinates. 1: G in the
    #: basis' dtype. 2: G rounded to float16 (the same B and Π), so a
    #: float32/float64 E differs from generation 1's for the same seed.
    generation: ClassVar[int] = 2

    signs: Tensor
    index: Tensor
    gaussian: Tensor
    hadamard_left: Tensor
    hadamard_right: Tensor

    def __init__(self, rows: int, dim: int, seed: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.rows, self.dim, self.seed, self.dtype = rows, dim, seed, dtype
        self.length = 1 << max(dim - 1, 0).bit_length()  # L = 2^⌈log₂ d⌉
        self._install(self.generate())

    @override
    def generate(self) -> dict[str, Tensor]:
        generator = _generator(self.seed)
        blocks = -(-self.rows // self.length)
        shape = (blocks, self.length)
        # Drawn as generation 1 drew them: the same B (int8 draws the same bits as int64) and Π,
        # bit for bit; only G's rounding below is new.
        signs = torch.randint(0, 2, shape, generator=generator, dtype=torch.int8) * 2 - 1
        permutation = torch.argsort(torch.rand(shape, generator=generator), dim=1)
        gaussian = torch.randn(shape, generator=generator, dtype=torch.float64)
        # Π as positions into the flattened blocks: one index_select of the whole (blocks, L)
        # matrix, which keeps only this index for its backward (an index_add_); gather would
        # also keep its input until the backward (4 more bytes per entry) and needs int64.
        offsets = torch.arange(0, blocks * self.length, self.length).unsqueeze(1)
        index_dtype = torch.int32 if blocks * self.length <= 2**31 else torch.int64
        # G rounded to 11 significant bits: still a Gaussian to 5e-4 relative, at half fp32's
        # bytes, and the same E for float16, float32 and float64 bases. A bfloat16 basis keeps
        # G in bfloat16, as before: a product with float16 would promote to float32.
        stored = self.dtype if self.dtype == torch.bfloat16 else torch.float16
        left, right = hadamard_factors(self.length, self.dtype)
        return {
            "signs": signs,
            "index": (permutation + offsets).to(index_dtype),
            "gaussian": gaussian.to(stored),
            "hadamard_left": left,
            "hadamard_right": right,
        }

    @override
    def project(self, theta: Tensor) -> Tensor:
        padded = nn.functional.pad(theta.to(self.dtype), (0, self.length - self.dim))
        factors = (self.hadamard_left, self.hadamard_right)
        # int8 signs times the basis' dtype promote to that dtype: exact, one pass per call on
        # the CPU (a converted copy; CUDA converts on the fly), and 1 byte stored per entry.
        x = fwht(self.signs * padded, factors)  # (blocks, L): every block sees the same θ
        # Π, then G in place on index_select's fresh flat output: index_select saves only its
        # index, and in place on a view instead would make autograd rebuild the base in the
        # backward (3 more copies of D entries). float16 G promotes exactly to float32/64. One
        # name for the chain, so each temporary of D entries is freed as soon as it is used.
        x = x.reshape(-1).index_select(0, self.index.view(-1)).mul_(self.gaussian.view(-1))
        x = fwht(x.view(self.gaussian.shape), factors).reshape(-1)
        # Sliced only when the last block is truncated: a slice's backward zero-fills and
        # copies all D entries even when it keeps them all.
        return x if x.shape[0] == self.rows else x[: self.rows]

    @override
    def column_sq_norms(self) -> Tensor:
        # A full block maps each column to H G Π (±1 entries): squared norm L·‖g‖², the same for
        # every column. Only the truncated last block needs computing, on the identity.
        full_blocks = self.rows // self.length
        full = self.length * float(self.gaussian[:full_blocks].double().square().sum())
        norms = torch.full((self.dim,), full, dtype=torch.float64)  # not the default float32
        tail = self.rows - full_blocks * self.length
        if tail:
            # Column j enters the block as signs[j]·e_j, and its first transform is signs[j]
            # times row j of H_L = H_a ⊗ H_b: built from the two factors' rows here rather than
            # transformed (entries ±1, so bit for bit what transforming the identity gave: the
            # norms are saved and compared exactly). ViT-B/16's 90 truncated blocks (d = 1000,
            # 1 thread): 2.3 s to 1.7 s.
            last = self.signs.shape[0] - 1
            left, right = hadamard_factors(self.length, torch.float64)
            column = torch.arange(self.dim)
            size = right.shape[0]
            rows = left[column // size].unsqueeze(2) * right[column % size].unsqueeze(1)
            x = self.signs[last, : self.dim].double().unsqueeze(1) * rows.reshape(self.dim, -1)
            # index_select: the same copy as x[:, permutation], at 2/3 of its cost here.
            permutation = self.index[last] - last * self.length
            x = x.index_select(1, permutation).mul_(self.gaussian[last].double())
            norms = norms + fwht(x)[:, :tail].square().sum(dim=1)
        return norms
