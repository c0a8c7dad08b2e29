"""Forward+backward cost of candidate exact formulations for each spec, on one 1024x1024 weight.

This is the measurement behind the kernels maskparam uses (see docs/how-it-works.md): the exact
bitwise selections against plain multiplies (not exact for inf/NaN or -0.0), and torch.where /
masked_fill / bool masks (much slower).
"""

from __future__ import annotations

import torch
from harness import interleaved_medians, markdown_table

from maskparam.constraints.kernels import keep_bits, keep_or_frozen, scatter_free


def run(size: int = 1024, rounds: int = 30) -> str:
    x = torch.randn(size, size, requires_grad=True)
    selected = torch.rand(size, size) < 0.5
    kept_f, kept_u8 = selected.float(), selected.to(torch.uint8)
    frozen_values = torch.where(selected, torch.randn(size, size), 0.0)
    keep_u8 = (~selected).to(torch.uint8)
    rows = torch.arange(0, size, 2)
    frozen_rows = torch.randn(rows.numel(), size)
    upstream = torch.ones(size, size)
    # The compact layout: the stored Parameter holds only the free entries.
    positions = selected.reshape(-1).nonzero().reshape(-1)
    compact = torch.randn(positions.numel(), requires_grad=True)
    zeros = torch.zeros(size, size)

    def step(forward):
        def run_once():
            forward().backward(upstream)
            x.grad = compact.grad = None

        return run_once

    candidates = {
        "identity (x * 1.0)": lambda: x * 1.0,
        "Mask: x * float mask": lambda: x * kept_f,
        "Mask: x * uint8 mask": lambda: x * kept_u8,
        "Mask: x * uint8 mask.to(x.dtype) (not exact)": lambda: x * kept_u8.to(x.dtype),
        "Mask: keep_bits(x, uint8 mask) (used, exact)": lambda: keep_bits(x, kept_u8),
        "Mask: x * bool mask": lambda: x * selected,
        "Mask: torch.where(mask, x, 0)": lambda: torch.where(selected, x, 0.0),
        "Mask: x.masked_fill(~mask, 0)": lambda: x.masked_fill(~selected, 0.0),
        "Mask compact: scatter(0, index, c)": lambda: (
            zeros.reshape(-1).scatter(0, positions, compact).view(size, size)
        ),
        "Mask compact: scatter_free (used: index_copy_ / index_select)": lambda: scatter_free(
            compact, positions, None, zeros.shape
        ),
        "Triangular: x.tril() (used)": x.tril,
        "Freeze: addcmul(v, x, keep_u8) (not exact)": lambda: torch.addcmul(
            frozen_values, x, keep_u8
        ),
        "Freeze: keep_or_frozen(x, keep_u8, v) (used, exact)": lambda: keep_or_frozen(
            x, keep_u8, frozen_values
        ),
        "Freeze: torch.where(frozen, v, x)": lambda: torch.where(selected, frozen_values, x),
        "Freeze rows: index_copy (used)": lambda: x.index_copy(0, rows, frozen_rows),
    }
    medians = interleaved_medians({k: step(f) for k, f in candidates.items()}, rounds=rounds)
    base = medians["Mask: x * float mask"]
    table = [[name, f"{t * 1e3:.2f}", f"{t / base:.2f}x"] for name, t in medians.items()]
    header = ["formulation (fwd+bwd, 1024x1024)", "ms", "vs float-mask multiply"]
    return markdown_table(header, table)


if __name__ == "__main__":
    torch.set_num_threads(1)
    print(run())
