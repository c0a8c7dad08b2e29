"""Peak memory of one training case, measured in a fresh subprocess (VmHWM on Linux), so that
cases cannot see each other's allocations. ``python benchmarks/peak_memory.py CASE`` prints the
peak resident set in bytes; :func:`peak_bytes` runs it from another script."""

from __future__ import annotations

import resource
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

import maskparam as mp


def _mlp(width: int, depth: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    for _ in range(depth):
        layers += [nn.Linear(width, width), nn.ReLU()]
    return nn.Sequential(*layers)


def _is_matrix(name: str, module: nn.Module, tensor: torch.Tensor) -> bool:
    return tensor.dim() == 2


CASES: dict[str, Callable[[], tuple[nn.Module, torch.Tensor]]] = {
    "mlp4x1024-plain": lambda: (_mlp(1024, 4), torch.randn(256, 1024)),
    "mlp4x1024-subspace-fastfood-1000": lambda: (
        mp.apply_mask(_mlp(1024, 4), {"*": mp.Subspace(1000, projection="fastfood", group="all")}),
        torch.randn(256, 1024),
    ),
    "mlp8x4096-plain": lambda: (_mlp(4096, 8), torch.randn(64, 4096)),
}


def _big(spec: mp.Spec) -> Callable[[], tuple[nn.Module, torch.Tensor]]:
    return lambda: (mp.apply_mask(_mlp(4096, 8), {_is_matrix: spec}), torch.randn(64, 4096))


CASES.update({
    "mlp8x4096-mask50": _big(mp.Mask(mp.masks.random(0.5))),
    "mlp8x4096-mask50-dense": _big(mp.Mask(mp.masks.random(0.5), layout="dense")),
    "mlp8x4096-mask10": _big(mp.Mask(mp.masks.random(0.1))),
    "mlp8x4096-mask90": _big(mp.Mask(mp.masks.random(0.9))),
    "mlp8x4096-triangular": _big(mp.Triangular()),
    "mlp8x4096-triangular-dense": _big(mp.Triangular(layout="dense")),
    "mlp8x4096-freeze50": _big(mp.Freeze(mp.masks.random(0.5))),
    "mlp8x4096-freeze50-dense": _big(mp.Freeze(mp.masks.random(0.5), layout="dense")),
})  # fmt: skip
OPTIMIZERS: dict[str, Callable[[list[nn.Parameter]], torch.optim.Optimizer]] = {
    "adamw": lambda p: torch.optim.AdamW(p, lr=1e-4, weight_decay=0.01),
    "sgd": lambda p: torch.optim.SGD(p, lr=1e-4, momentum=0.9),
}


def run_case(name: str, optimizer_name: str = "adamw", steps: int = 3) -> int:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model, x = CASES[name]()
    optimizer = OPTIMIZERS[optimizer_name](list(model.parameters()))
    for _ in range(steps):
        optimizer.zero_grad(set_to_none=True)
        model(x).square().mean().backward()
        optimizer.step()
    return _peak_rss()


def _peak_rss() -> int:
    """This process's peak resident set in bytes.

    On Linux, VmHWM: ru_maxrss survives exec, so a case run from a larger parent (subspace.py
    builds both models before measuring) reported the parent's peak for every case ("+0.0 bytes
    per parameter"). VmHWM belongs to the address space, which exec replaces.
    """
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:  # not Linux
        status = ""
    for line in status.splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024  # kB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def peak_bytes(name: str, optimizer_name: str = "adamw") -> int:
    """Peak RSS of ``name`` trained by ``optimizer_name``, run alone in a subprocess."""
    script = Path(__file__).resolve()
    output = subprocess.run(
        [sys.executable, str(script), name, optimizer_name],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return int(output.strip().splitlines()[-1])


if __name__ == "__main__":
    print(run_case(sys.argv[1], *sys.argv[2:3]))
