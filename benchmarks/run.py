"""Run the benchmarks and write their tables to benchmarks/results/ (`nox -s bench`).

    python benchmarks/run.py          quick: fewer rounds
    python benchmarks/run.py --full   more rounds (steadier medians)
    python benchmarks/run.py --only sparse_training   one section (or several)

All timings are medians of interleaved rounds, as ratios against a baseline measured in the same
run, on one thread: never absolute timings compared across runs or machines.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
from collections.abc import Callable
from pathlib import Path

import alternatives
import channel_coverage
import export
import inference
import kernels
import lifecycle
import memory
import plots
import shrink
import sparse_training
import subspace
import torch
import train_step

RESULTS = Path(__file__).resolve().parent / "results"


def cpu_name() -> str:
    """The CPU's model name where Linux says it (figures differ between CPUs), else its kind."""
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} ({platform.machine()})"
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> str:
    return (
        f"{cpu_name()}, {os.cpu_count()} cores, {torch.get_num_threads()} thread used, "
        f"{torch.backends.cpu.get_cpu_capability()}, Python {platform.python_version()}, "
        f"torch {torch.__version__}"
    )


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="more rounds")
    parser.add_argument(
        "--only", nargs="*", default=[], metavar="SECTION", help="run only these sections"
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    rounds = 30 if args.full else 12
    RESULTS.mkdir(exist_ok=True)
    sections: dict[str, tuple[str, Callable[[], str]]] = {
        "kernels": (
            "Kernel candidates (forward + backward)",
            lambda: kernels.run(rounds=2 * rounds),
        ),
        "train_step": ("Train step vs plain", lambda: train_step.run(rounds=rounds)),
        "sparse_training": (
            "Sparse training: train step vs the dense model",
            lambda: sparse_training.run(rounds=rounds),
        ),
        "alternatives": (
            "maskparam against the alternatives",
            lambda: alternatives.run(rounds=rounds),
        ),
        "inference": ("Inference", lambda: inference.run(rounds=rounds)),
        "export": (
            "Export: baked, then mp.to_sparse (inference, no grad)",
            lambda: export.run(rounds=rounds),
        ),
        "shrink": (
            "Channel pruning, baked and shrunk: inference and train step vs the dense model",
            lambda: shrink.run(rounds=rounds),
        ),
        "channel_coverage": (
            "Channel pruning coverage: tracing methods, maskparam and Torch-Pruning at 50%",
            channel_coverage.run,
        ),
        "memory": ("Peak memory", memory.run),
        "lifecycle": (
            "Apply and remove at scale (seconds; ViT-B/16: medians of 3 interleaved rounds)",
            lifecycle.run,
        ),
        "subspace": (
            "Subspace training cost",
            lambda: subspace.run(rounds=rounds, plot=RESULTS / "subspace_cost.png"),
        ),
    }
    unknown = set(args.only) - set(sections)
    if unknown:
        parser.error(f"unknown sections {sorted(unknown)}; known: {', '.join(sections)}")
    for name, (title, measure) in sections.items():
        if args.only and name not in args.only:
            continue
        table = measure()
        text = f"## {title}\n\nMeasured on: {machine()}\n\n{table}\n"
        (RESULTS / f"{name}.md").write_text(text, encoding="utf-8")
        print(text)
    if not args.only or "alternatives" in args.only:
        plots.alternatives(RESULTS / "alternatives.md", RESULTS / "alternatives.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
