"""Train-step time (forward + backward + optimizer step) of constrained models relative to the
unconstrained model, interleaved in one process, 1 thread; the overhead per constrained entry; the
layout each variant got; and the bytes each constraint keeps in memory.

Models (as in the issues): an MLP of 4 x 1024 Linear layers (batch 256), an
nn.TransformerEncoderLayer(256, 4) (batch 16 x 128) and a CNN of 3 x 64 3x3 convolutions on
32 x 32 images (batch 64). Every weight with 2+ dimensions is constrained. Variants without a
layout use the default options (``layout="auto"``); "dense" ones force the dense layout.

Overhead per constrained entry, ``(step - plain step) / constrained entries``, travels between
machines better than a ratio: the same per-entry cost weighs more where the plain step is faster.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from harness import interleaved_medians, markdown_table
from torch import nn

import maskparam as mp

ModelFactory = Callable[[], tuple[nn.Module, torch.Tensor]]


def mlp() -> tuple[nn.Module, torch.Tensor]:
    layers: list[nn.Module] = []
    for _ in range(4):
        layers += [nn.Linear(1024, 1024), nn.ReLU()]
    return nn.Sequential(*layers), torch.randn(256, 1024)


def transformer() -> tuple[nn.Module, torch.Tensor]:
    layer = nn.TransformerEncoderLayer(256, 4, batch_first=True, dropout=0.0)
    return layer, torch.randn(16, 128, 256)


def cnn() -> tuple[nn.Module, torch.Tensor]:
    model = nn.Sequential(
        nn.Conv2d(3, 64, 3, padding=1), nn.ReLU(),
        nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(),
        nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10),
    )  # fmt: skip
    return model, torch.randn(64, 3, 32, 32)


MODELS: dict[str, ModelFactory] = {
    "MLP 4x1024": mlp,
    "TransformerEncoderLayer(256, 4)": transformer,
    "CNN 3x64 conv, 32x32": cnn,
}


def is_matrix(name: str, module: nn.Module, tensor: torch.Tensor) -> bool:
    """Every weight of 2+ dimensions (matrices, conv kernels)."""
    return tensor.dim() >= 2


def _half_rows(model: nn.Module) -> mp.Rules:
    # Freeze every other row of each matrix: one rule per matrix, since row counts differ.
    return {
        name: mp.Freeze(dim=0, index=range(0, param.shape[0], 2))
        for name, param in model.named_parameters()
        if param.dim() >= 2
    }


VARIANTS: dict[str, Callable[[nn.Module], mp.Rules] | None] = {
    "plain": None,
    "Mask (50%)": lambda model: {is_matrix: mp.Mask(mp.masks.random(0.5))},
    "Mask (50%, dense)": lambda model: {is_matrix: mp.Mask(mp.masks.random(0.5), layout="dense")},
    "Mask (90% sparse)": lambda model: {is_matrix: mp.Mask(mp.masks.random(0.1))},
    "Mask (10% sparse)": lambda model: {is_matrix: mp.Mask(mp.masks.random(0.9))},
    "Triangular": lambda model: {is_matrix: mp.Triangular()},
    "Triangular (dense)": lambda model: {is_matrix: mp.Triangular(layout="dense")},
    "Freeze(mask, 50%)": lambda model: {is_matrix: mp.Freeze(mp.masks.random(0.5))},
    "Freeze(mask, 50%, dense)": lambda model: {
        is_matrix: mp.Freeze(mp.masks.random(0.5), layout="dense")
    },
    "Freeze(dim=0, half)": _half_rows,
    "LearnableMask(hard)": lambda model: {is_matrix: mp.LearnableMask()},
}

OPTIMIZERS: dict[str, Callable[[list[nn.Parameter]], torch.optim.Optimizer]] = {
    "SGD(momentum)": lambda p: torch.optim.SGD(p, lr=1e-4, momentum=0.9),
    "AdamW": lambda p: torch.optim.AdamW(p, lr=1e-4, weight_decay=0.01),
    "AdamW(fused)": lambda p: torch.optim.AdamW(p, lr=1e-4, weight_decay=0.01, fused=True),
}


def build(
    make_model: ModelFactory, variant: str, optimizer: str
) -> tuple[nn.Module, Callable[[], None]]:
    torch.manual_seed(0)
    model, x = make_model()
    rules = VARIANTS[variant]
    if rules is not None:
        mp.apply_mask(model, rules(model))
    opt = OPTIMIZERS[optimizer](list(model.parameters()))

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        model(x).square().mean().backward()
        opt.step()

    return model, step


def stored_bytes(model: nn.Module) -> int:
    """Bytes maskparam keeps beside the weights: its buffers (masks, frozen values) and fixed
    tensors (a compact layout's index of free entries, frozen slice indices)."""
    total = 0
    for module in model.modules():
        if isinstance(module, mp.Constraint):
            tensors = [*module.buffers(recurse=False)]
            tensors += [getattr(module, name) for name in module._fixed]
            total += sum(t.numel() * t.element_size() for t in tensors)
    return total


def layouts(model: nn.Module) -> str:
    """The layouts the constrained tensors got (what ``layout="auto"`` chose)."""
    chosen = {
        "compact" if "compact" in t.constraint else "dense" for t in mp.summary(model).tensors
    }
    return "/".join(sorted(chosen)) or "-"


def run(
    rounds: int = 15,
    optimizers: tuple[str, ...] = tuple(OPTIMIZERS),
    models: tuple[str, ...] = tuple(MODELS),
) -> str:
    rows = []
    for model_name in models:
        for optimizer in optimizers:
            built = {v: build(MODELS[model_name], v, optimizer) for v in VARIANTS}
            steps = {variant: step for variant, (_, step) in built.items()}
            medians = interleaved_medians(steps, rounds=rounds)
            plain = medians["plain"]
            for variant, (model, _) in built.items():
                entries = sum(t.total for t in mp.summary(model).tensors)
                stored = stored_bytes(model)
                ns = f"{(medians[variant] - plain) / entries * 1e9:+.2f}" if entries else "-"
                rows.append([
                    model_name, optimizer, variant, layouts(model),
                    f"{medians[variant] * 1e3:.1f}", f"{medians[variant] / plain:.3f}x", ns,
                    f"{stored / entries:.2f}" if entries else "-",
                ])  # fmt: skip
    header = ["model", "optimizer", "variant", "layout", "step ms (median)", "vs plain",
              "ns per constrained entry", "bytes kept per constrained entry"]  # fmt: skip
    return markdown_table(header, rows)


if __name__ == "__main__":
    torch.set_num_threads(1)
    print(run())
