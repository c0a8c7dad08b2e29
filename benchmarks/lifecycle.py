"""How apply and removal scale: with the number of tensors of one module (linear, where a naive
implementation is cubic: 4000 tensors would take minutes), and with the size of the weights (a
ViT-B/16-shaped model, 86.6M parameters), against one pass over those weights."""

from __future__ import annotations

import random
import statistics
import time
from collections.abc import Callable

import torch
from harness import markdown_table
from torch import nn

import maskparam as mp


def _module(n: int) -> nn.Module:
    module = nn.Module()
    for i in range(n):
        module.register_parameter(f"p{i}", nn.Parameter(torch.randn(2, 2)))
    return module


def _row(n: int) -> list[str]:
    exact = _module(n)
    rules = {f"p{i}": mp.Triangular() for i in range(n)}
    start = time.perf_counter()
    mp.apply_mask(exact, rules)
    apply_exact = time.perf_counter() - start
    start = time.perf_counter()
    mp.remove_parametrizations(exact)
    remove = time.perf_counter() - start
    globbed = _module(n)
    start = time.perf_counter()
    mp.apply_mask(globbed, {"*": mp.Triangular()})
    apply_glob = time.perf_counter() - start
    return [f"{n:,}", f"{apply_exact:.2f}", f"{apply_glob:.2f}", f"{remove:.2f}"]


def many_tensors(sizes: tuple[int, ...] = (250, 1000, 4000)) -> str:
    header = [
        "tensors on one module",
        "apply, one exact rule each (s)",
        "apply, one glob (s)",
        "remove (s)",
    ]
    return markdown_table(header, [_row(n) for n in sizes])


class ViTB16(nn.Module):
    """ViT-B/16's shapes (torchvision's vit_b_16 has 86,567,656 parameters, as this has), from
    torch.nn alone: a 16x16 patch convolution, 12 pre-norm encoder layers of width 768, a head."""

    def __init__(self) -> None:
        super().__init__()
        self.patch_embed = nn.Conv2d(3, 768, kernel_size=16, stride=16)
        self.class_token = nn.Parameter(torch.zeros(1, 1, 768))
        self.pos_embedding = nn.Parameter(torch.randn(1, 197, 768) * 0.02)
        self.encoder = nn.Sequential(
            *(
                nn.TransformerEncoderLayer(768, 12, 3072, batch_first=True, norm_first=True)
                for _ in range(12)
            )
        )
        self.norm = nn.LayerNorm(768)
        self.head = nn.Linear(768, 1000)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(images).flatten(2).transpose(1, 2)
        x = torch.cat((self.class_token.expand(len(x), -1, -1), x), dim=1) + self.pos_embedding
        return self.head(self.norm(self.encoder(x))[:, 0])


def vit_b16(rounds: int = 3) -> str:
    """Apply and remove on ViT-B/16's weights, as multiples of one pass over them (a clone of
    every parameter) and of the magnitude selection alone, measured in the same rounds."""
    torch.manual_seed(0)
    model = ViTB16()
    initial = {name: p.detach().clone() for name, p in model.named_parameters()}
    # The weights as apply sees them (a removal leaves the model's own ones pruned).
    weights = [value for name, value in initial.items() if name.endswith(".weight")]
    magnitude = mp.masks.magnitude(0.5)

    def reset() -> None:
        with torch.no_grad():
            for name, p in model.named_parameters():
                p.copy_(initial[name])

    def one_pass() -> None:
        with torch.no_grad():
            for p in model.parameters():
                p.clone()

    def selection() -> None:
        for w in weights:
            magnitude(w)

    def prune_topk() -> None:  # what torch.nn.utils.prune.l1_unstructured computes per weight
        for w in weights:
            torch.topk(w.abs().reshape(-1), k=round(0.5 * w.numel()), largest=False)

    cases: dict[str, Callable[[], mp.Rules]] = {
        "Mask(magnitude(0.5)), dense": lambda: {"*.weight": mp.Mask(magnitude, layout="dense")},
        "Mask(magnitude(0.5)), compact": lambda: {"*.weight": mp.Mask(magnitude, layout="compact")},
        "Subspace(1000, fastfood, group)": lambda: {
            "*": mp.Subspace(1000, projection="fastfood", group="all")
        },
    }
    samples: dict[str, list[float]] = {}

    def timed(name: str, run: Callable[[], object]) -> None:
        start = time.perf_counter()
        run()
        samples.setdefault(name, []).append(time.perf_counter() - start)

    # Interleaved rounds in a shuffled order: machine noise hits every variant alike.
    order = ["pass", "selection", "topk", *cases]
    rng = random.Random(0)
    for _ in range(rounds):
        rng.shuffle(order)
        for name in order:
            if name == "pass":
                timed(name, one_pass)
            elif name == "selection":
                timed(name, selection)
            elif name == "topk":
                timed(name, prune_topk)
            else:
                reset()
                rules = cases[name]()
                start = time.perf_counter()
                mp.apply_mask(model, rules)
                samples.setdefault(f"{name} apply", []).append(time.perf_counter() - start)
                timed(f"{name} remove", lambda: mp.remove_parametrizations(model))
    median = {name: statistics.median(times) for name, times in samples.items()}
    unit = median["pass"]

    def cell(seconds: float) -> str:
        return f"{seconds:.2f} s ({seconds / unit:.0f}x)"

    rows = [
        ["one pass: clone every parameter", cell(unit), ""],
        ["magnitude(0.5) selection alone, every weight", cell(median["selection"]), ""],
        ["topk as prune.l1_unstructured calls it, every weight", cell(median["topk"]), ""],
    ]
    rows += [
        [name, cell(median[f"{name} apply"]), cell(median[f"{name} remove"])] for name in cases
    ]
    params = sum(p.numel() for p in model.parameters())
    return markdown_table(
        [f"ViT-B/16 shapes, {params:,} parameters", "apply (x one pass)", "remove (x one pass)"],
        rows,
    )


def run(sizes: tuple[int, ...] = (250, 1000, 4000), rounds: int = 3) -> str:
    return f"{many_tensors(sizes)}\n\n{vit_b16(rounds)}"


if __name__ == "__main__":
    torch.set_num_threads(1)
    print(run())
