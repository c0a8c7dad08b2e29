"""A constraint defined only in the tests: a mask of whole ``block x block`` tiles of a matrix.

It exists to prove the extension point: it subclasses the public ``mp.Spec`` and
``mp.Constraint``, implements the hooks a mask-like constraint needs (its invariant, how it takes
a new mask, which entries a mask leaves free), and takes part in every stage of the lifecycle
without a line of maskparam naming it. Its state is one uint8 per tile, saved as ``tiles``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

import maskparam as mp
from maskparam.masks.generators import MaskGenerator, resolve


def _tiles_of(full: Tensor, block: int) -> Tensor | None:
    """The tile mask of a full-shape bool mask, or None where a tile is not all one value (the
    tiles of the last row and column may be cut short by the matrix's edge)."""
    rows, cols = -(-full.shape[-2] // block), -(-full.shape[-1] // block)
    kept = torch.zeros(rows, cols, dtype=torch.bool, device=full.device)
    for r in range(rows):
        for c in range(cols):
            tile = full[r * block : (r + 1) * block, c * block : (c + 1) * block]
            if bool(tile.any()) != bool(tile.all()):
                return None
            kept[r, c] = bool(tile.any())
    return kept


def _expand(tiles: Tensor, block: int, shape: torch.Size) -> Tensor:
    full = tiles.bool().repeat_interleave(block, 0).repeat_interleave(block, 1)
    return full[: shape[0], : shape[1]]


def _refuse_partial(subject: str, block: int) -> mp.MaskparamError:
    return mp.MaskparamError(
        f"{subject}: the mask keeps part of a {block} x {block} tile.\n"
        "  fix: pass a mask that is constant on every tile (e.g. block_magnitude)."
    )


class BlockMaskConstraint(mp.Constraint):
    """The input at kept tiles, exactly ``+0.0`` elsewhere."""

    tiles: Tensor
    mask_buffer = "tiles"
    selects_entries = True
    mask_spec = mp.Mask  # its mask says which entries are kept, as a Mask's does

    def __init__(self, tiles: Tensor, block: int, shape: torch.Size) -> None:
        super().__init__()
        self.block = block
        self.shape = shape
        self.description = "BlockMask"
        self.register_buffer("tiles", tiles.to(torch.uint8).contiguous())

    def full(self) -> Tensor:
        return _expand(self.tiles, self.block, self.shape)

    def forward(self, x: Tensor) -> Tensor:
        return torch.where(self.full(), x, torch.zeros((), dtype=x.dtype, device=x.device))

    def pins(self, value: Tensor) -> mp.Pins:
        zero = torch.zeros((), dtype=value.dtype, device=value.device).expand(value.shape)
        return mp.Pins(~self.full().to(value.device), zero)

    def describe(self) -> str:
        return self.description

    def free_for_mask(self, selected: Tensor) -> Tensor:
        full = selected.expand(self.shape)
        if _tiles_of(full, self.block) is None:
            raise _refuse_partial("BlockMask", self.block)
        return full

    def take_mask(self, selected: Tensor, current: Tensor, what: str) -> mp.MaskChange:
        before = self.full()
        after = self.free_for_mask(selected)
        tiles = _tiles_of(after, self.block)
        assert tiles is not None  # checked by free_for_mask before anything changed
        self.tiles.copy_(tiles.to(torch.uint8))
        self.description = f"BlockMask(keeps {what})"
        start = torch.where(after & ~before, torch.zeros((), dtype=current.dtype), current)
        return mp.MaskChange(before, after.clone(), start)

    def mask_for_free(self, free: Tensor) -> Tensor | None:
        return free if _tiles_of(free, self.block) is not None else None


@dataclass(frozen=True, eq=False)
class BlockMask(mp.Spec):
    """Keep the tiles of a ``block x block`` tiling that ``mask`` selects (any mask source; it
    must be constant on each tile)."""

    mask: object
    block: int = 2

    def build(self, name: str, tensor: Tensor) -> mp.Constraint:
        if tensor.dim() != 2:
            raise mp.MaskparamError(
                f"BlockMask for {name!r}: needs a matrix; got shape {tuple(tensor.shape)}.\n"
                "  fix: select matrices only."
            )
        full = resolve(self.mask, tensor, f"BlockMask for {name!r}").expand(tensor.shape)  # type: ignore[arg-type]
        tiles = _tiles_of(full, self.block)
        if tiles is None:
            raise _refuse_partial(f"BlockMask for {name!r}", self.block)
        return BlockMaskConstraint(tiles, self.block, tensor.shape)

    def mask_source(self, rule: str) -> object:  # type: ignore[override]
        return self.mask

    def updates(self, constraint: mp.Constraint) -> bool:
        return isinstance(constraint, BlockMaskConstraint)


@dataclass(frozen=True)
class BlockMagnitude(MaskGenerator):
    """Keeps the tiles with the largest L1 norm; prunes ``round(sparsity * tiles)`` of them."""

    sparsity: float
    block: int = 2

    def build(self, tensor: Tensor, subject: str) -> Tensor:
        b = self.block
        rows, cols = -(-tensor.shape[0] // b), -(-tensor.shape[1] // b)
        padded = torch.zeros(rows * b, cols * b, dtype=tensor.dtype, device=tensor.device)
        padded[: tensor.shape[0], : tensor.shape[1]] = tensor.detach().abs()
        norms = padded.reshape(rows, b, cols, b).sum(dim=(1, 3)).reshape(-1)
        pruned = round(self.sparsity * norms.numel())
        keep = torch.ones_like(norms, dtype=torch.bool)
        if pruned:
            keep[torch.topk(norms, pruned, largest=False, sorted=False).indices] = False
        return _expand(keep.reshape(rows, cols), b, tensor.shape)

    def describe(self) -> str:
        return f"the {100 * (1 - self.sparsity):.0f}% heaviest {self.block}x{self.block} tiles"


def block_magnitude(sparsity: float, block: int = 2) -> BlockMagnitude:
    return BlockMagnitude(sparsity, block)
