"""Subspace cost: a global Fastfood subspace (d = 1000) over an MLP of 4 x 1024 Linear layers
(4.2M parameters) against the plain model, and each projection's cost against D and d."""

from __future__ import annotations

import time
from pathlib import Path

import torch
from harness import interleaved_medians, markdown_table
from peak_memory import CASES, peak_bytes
from torch import nn

from maskparam.constraints.projections import DenseProjection, FastfoodProjection, SparseProjection


def global_fastfood(rounds: int) -> str:
    start = time.perf_counter()
    subspace_model, x = CASES["mlp4x1024-subspace-fastfood-1000"]()
    apply_seconds = time.perf_counter() - start
    plain_model, _ = CASES["mlp4x1024-plain"]()
    params = sum(p.numel() for p in plain_model.parameters())

    def stepper(model: nn.Module):
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01)

        def step() -> None:
            optimizer.zero_grad(set_to_none=True)
            model(x).square().mean().backward()
            optimizer.step()

        return step

    medians = interleaved_medians(
        {"plain": stepper(plain_model), "subspace": stepper(subspace_model)}, rounds=rounds
    )
    plain_peak = peak_bytes("mlp4x1024-plain")
    subspace_peak = peak_bytes("mlp4x1024-subspace-fastfood-1000")
    rows = [
        ["parameters D", f"{params:,}"],
        ["apply time (incl. building the model)", f"{apply_seconds:.2f} s"],
        ["train step, plain (AdamW)", f"{medians['plain'] * 1e3:.0f} ms"],
        ["train step, Fastfood d=1000", f"{medians['subspace'] * 1e3:.0f} ms"],
        ["train step ratio", f"{medians['subspace'] / medians['plain']:.2f}x"],
        ["peak RSS, plain", f"{plain_peak / 2**20:.0f} MiB"],
        ["peak RSS, subspace", f"{subspace_peak / 2**20:.0f} MiB"],
        ["peak above plain, per parameter", f"{(subspace_peak - plain_peak) / params:+.1f} bytes"],
        ["a dense E would need", f"{params * 1000 * 4 / 1e9:.1f} GB"],
    ]
    return markdown_table(["MLP 4x1024, global subspace", "value"], rows)


def projection_costs(rounds: int, plot: Path | None) -> str:
    """Forward + backward time of E·θ alone for each projection, D and d."""
    sizes = [10_000, 100_000, 1_000_000]
    dims = [10, 100, 1000]
    rows = []
    series: dict[tuple[str, int], list[float | None]] = {}
    for dim in dims:
        for name in ("gaussian", "sparse", "fastfood"):
            timings: list[float | None] = []
            for rows_d in sizes:
                if name == "gaussian" and rows_d * dim * 4 > 2**30:
                    timings.append(None)  # refused by Subspace's max_dense_bytes
                    continue
                if name == "gaussian":
                    projection = DenseProjection.gaussian(rows_d, dim, 0, torch.float32)
                elif name == "sparse":
                    projection = SparseProjection(rows_d, dim, 1 / rows_d**0.5, 0, torch.float32)
                else:
                    projection = FastfoodProjection(rows_d, dim, 0, torch.float32)
                theta = torch.randn(dim, requires_grad=True)
                upstream = torch.ones(rows_d)

                def run(projection=projection, theta=theta, upstream=upstream) -> None:
                    projection(theta).backward(upstream)
                    theta.grad = None

                timings.append(interleaved_medians({"p": run}, rounds=rounds, warmup=1)["p"])
            series[(name, dim)] = timings
            cells = ["refused (> 1 GiB)" if t is None else f"{t * 1e3:.2f}" for t in timings]
            rows.append([name, str(dim), *cells])
    if plot is not None:
        _plot(series, sizes, plot)
    return markdown_table(["projection", "d", *(f"D={n:,} (ms)" for n in sizes)], rows)


def _plot(series: dict[tuple[str, int], list[float | None]], sizes: list[int], path: Path) -> None:
    import matplotlib as mpl

    mpl.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6, 4))
    styles = {10: ":", 100: "--", 1000: "-"}
    colors = {"gaussian": "C0", "sparse": "C1", "fastfood": "C2"}
    for (name, dim), timings in series.items():
        points = [(n, t * 1e3) for n, t in zip(sizes, timings, strict=True) if t is not None]
        axes.plot(*zip(*points, strict=True), styles[dim], color=colors[name], marker="o",
                  label=f"{name}, d={dim}")  # fmt: skip
    axes.set_xscale("log")
    axes.set_yscale("log")
    axes.set_xlabel("D (entries driven)")
    axes.set_ylabel("forward + backward of E·θ (ms, 1 thread)")
    axes.legend(fontsize=7, ncol=3)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def run(rounds: int = 10, plot: Path | None = None) -> str:
    return (
        global_fastfood(rounds)
        + "\n\nProjection cost against D and d (median of interleaved rounds):\n\n"
        + projection_costs(max(rounds // 2, 3), plot)
    )


if __name__ == "__main__":
    torch.set_num_threads(1)
    print(run())
