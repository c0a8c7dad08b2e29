"""Train-step time (forward + backward + optimizer step) of constrained models relative to the
unconstrained model, interleaved in one process, 1 thread; and the bytes each constraint stores.

Models (as in the issues): an MLP of 4 x 1024 Linear layers (batch 256) and an
nn.TransformerEncoderLayer(256, 4) (batch 16 x 128). Every matrix of the model is constrained.
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


MODELS: dict[str, ModelFactory] = {
    "MLP 4x1024": mlp,
    "TransformerEncoderLayer(256, 4)": transformer,
}


def is_matrix(name: str, module: nn.Module, tensor: torch.Tensor) -> bool:
    return tensor.dim() == 2


def _half_rows(model: nn.Module) -> mp.Rules:
    # Freeze every other row of each matrix: one rule per matrix, since row counts differ.
    return {
        name: mp.Freeze(dim=0, index=range(0, param.shape[0], 2))
        for name, param in model.named_parameters()
        if param.dim() == 2
    }


VARIANTS: dict[str, Callable[[nn.Module], mp.Rules] | None] = {
    "plain": None,
    "Mask (50%)": lambda model: {is_matrix: mp.Mask(mp.masks.random(0.5))},
    "Mask (50%, compact)": lambda model: {
        is_matrix: mp.Mask(mp.masks.random(0.5), layout="compact")
    },
    "Mask (90% sparse, compact)": lambda model: {
        is_matrix: mp.Mask(mp.masks.random(0.1), layout="compact")
    },
    "Triangular": lambda model: {is_matrix: mp.Triangular()},
    "Freeze(mask, 50%)": lambda model: {is_matrix: mp.Freeze(mp.masks.random(0.5))},
    "Freeze(mask, 50%, compact)": lambda model: {
        is_matrix: mp.Freeze(mp.masks.random(0.5), layout="compact")
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
    """Bytes of the buffers maskparam stores (masks, frozen values, indices)."""
    return sum(
        buffer.numel() * buffer.element_size()
        for name, buffer in model.named_buffers()
        if ".parametrizations." in f".{name}"
    )


def run(rounds: int = 15, optimizers: tuple[str, ...] = tuple(OPTIMIZERS)) -> str:
    rows = []
    for model_name, make_model in MODELS.items():
        for optimizer in optimizers:
            built = {variant: build(make_model, variant, optimizer) for variant in VARIANTS}
            steps = {variant: step for variant, (_, step) in built.items()}
            medians = interleaved_medians(steps, rounds=rounds)
            for variant, (model, _) in built.items():
                entries = sum(t.total for t in mp.summary(model).tensors)
                stored = stored_bytes(model)
                per_entry = f"{stored / entries:.2f}" if entries else "-"
                ratio = medians[variant] / medians["plain"]
                rows.append(
                    [model_name, optimizer, variant, f"{medians[variant] * 1e3:.1f}",
                     f"{ratio:.3f}x", f"{stored / 2**20:.2f}", per_entry]
                )  # fmt: skip
    header = ["model", "optimizer", "variant", "step ms (median)", "vs plain", "stored MiB",
              "stored bytes per entry of a constrained tensor"]  # fmt: skip
    return markdown_table(header, rows)


if __name__ == "__main__":
    torch.set_num_threads(1)
    print(run())
