"""PNG plots of the benchmark tables in results/ (needs matplotlib: the `examples` extra)."""

from __future__ import annotations

from pathlib import Path


def _rows(table: Path) -> list[list[str]]:
    lines = [
        line for line in table.read_text(encoding="utf-8").splitlines() if line.startswith("| ")
    ]
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in lines[1:]]


def alternatives(table: Path, path: Path) -> None:
    """Train-step ratio of every method, per model and optimizer; broken or failing ones marked."""
    import matplotlib as mpl

    mpl.use("Agg")
    import matplotlib.pyplot as plt

    rows = _rows(table)
    figure, axes = plt.subplots(1, 2, figsize=(13, 6))
    for task, axis in zip(("mask", "freeze"), axes, strict=True):
        labels, ratios, colors = [], [], []
        for model, optimizer, row_task, method, ratio, promise in rows:
            if row_task != task:
                continue
            labels.append(f"{model.split(' ')[0]} {optimizer.split('(')[0]}: {method}")
            ratios.append(float(ratio.rstrip("x")) if ratio != "-" else 0.0)
            colors.append("C2" if promise == "exact" else "C3")
        axis.barh(range(len(labels)), ratios, color=colors)
        axis.set_yticks(range(len(labels)), labels, fontsize=6)
        axis.axvline(1.0, color="black", linewidth=0.8)
        axis.set_xlim(0.9, max(ratios) + 0.05)
        axis.set_title(f"{task} 50%: step vs plain (red: broken or fails)", fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=110)


if __name__ == "__main__":
    results = Path(__file__).resolve().parent / "results"
    alternatives(results / "alternatives.md", results / "alternatives.png")
