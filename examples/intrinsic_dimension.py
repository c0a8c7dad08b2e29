"""Measure the intrinsic dimension of an MLP on scikit-learn's digits (Li et al. 2018, table 1).

Train a 64-w-w-10 MLP directly, then only inside random d-dimensional subspaces
``W = θ₀ + E·θ`` of its whole parameter space (one θ for the whole model, Fastfood projection),
for a sweep of d. d_int90 is the smallest d whose test accuracy reaches 90% of the directly
trained model's. Li et al. report d_int90 = 750 for a 784-200-200-10 MLP on MNIST, and that it
barely moves with the width of the network: this example shows the same width invariance here.

    python examples/intrinsic_dimension.py            # widths 50/100/200, prints the table
    python examples/intrinsic_dimension.py --plot intrinsic_dimension.png

Needs scikit-learn (the digits data ships with it: no download) and, for --plot, matplotlib.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass

import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import Tensor, nn

import maskparam as mp

DIMS = (10, 20, 50, 100, 150, 200, 300, 500, 750, 1000)


@dataclass(frozen=True)
class Data:
    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor


def load_data(seed: int = 0) -> Data:
    digits = load_digits()
    x_train, x_test, y_train, y_test = train_test_split(
        digits.data, digits.target, test_size=0.25, random_state=seed, stratify=digits.target
    )
    mean, std = x_train.mean(0), x_train.std(0) + 1e-6
    return Data(
        torch.tensor((x_train - mean) / std, dtype=torch.float32),
        torch.tensor(y_train),
        torch.tensor((x_test - mean) / std, dtype=torch.float32),
        torch.tensor(y_test),
    )


def mlp(width: int, seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(64, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 10)
    )


def train(model: nn.Module, data: Data, *, epochs: int, lr: float) -> float:
    """Full-batch Adam; returns test accuracy."""
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    for _ in range(epochs):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(data.x_train), data.y_train).backward()
        optimizer.step()
    with torch.no_grad():
        return float((model(data.x_test).argmax(1) == data.y_test).float().mean())


def sweep(
    widths: tuple[int, ...], dims: tuple[int, ...], *, epochs: int, seed: int = 0
) -> dict[int, dict[int | str, float]]:
    """Accuracy per width: ``"direct"`` and one entry per subspace dimension d."""
    data = load_data(seed)
    results: dict[int, dict[int | str, float]] = {}
    for width in widths:
        row: dict[int | str, float] = {
            "direct": train(mlp(width, seed), data, epochs=epochs, lr=1e-2)
        }
        for dim in dims:
            model = mlp(width, seed)
            mp.apply_mask(
                model, {"*": mp.Subspace(dim, projection="fastfood", group="all", seed=seed)}
            )
            row[dim] = train(model, data, epochs=epochs, lr=0.1)
        results[width] = row
    return results


def d_int90(row: dict[int | str, float]) -> int | None:
    """The smallest d whose accuracy reaches 90% of direct training's (None: not reached)."""
    goal = 0.9 * row["direct"]
    return next((d for d in sorted(k for k in row if isinstance(k, int)) if row[d] >= goal), None)


def table(results: dict[int, dict[int | str, float]]) -> str:
    dims = sorted({d for row in results.values() for d in row if isinstance(d, int)})
    header = ["width", "D", "direct", *(f"d={d}" for d in dims), "d_int90"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for width, row in results.items():
        params = sum(p.numel() for p in mlp(width, 0).parameters())
        cells = [
            str(width),
            f"{params:,}",
            f"{row['direct']:.3f}",
            *(f"{row[d]:.3f}" for d in dims),
            str(d_int90(row)),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(results: dict[int, dict[int | str, float]], path: str) -> None:
    import matplotlib as mpl

    mpl.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6, 4))
    for width, row in results.items():
        dims = sorted(d for d in row if isinstance(d, int))
        (line,) = axes.plot(dims, [row[d] for d in dims], marker="o", label=f"width {width}")
        axes.axhline(0.9 * row["direct"], color=line.get_color(), linestyle=":", linewidth=1)
    axes.set_xscale("log")
    axes.set_xlabel("subspace dimension d")
    axes.set_ylabel("test accuracy")
    axes.set_title("Digits, 64-w-w-10 MLP: dotted = 90% of direct training")
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--widths", type=int, nargs="+", default=[50, 100, 200])
    parser.add_argument("--epochs", type=int, default=300)
    parser.add_argument("--plot", help="save a PNG of accuracy against d here")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    start = time.perf_counter()
    results = sweep(tuple(args.widths), DIMS, epochs=args.epochs)
    print(table(results))
    print(f"\n({time.perf_counter() - start:.0f} s)")
    if args.plot:
        plot(results, args.plot)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
