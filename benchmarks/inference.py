"""Inference (no grad) of a constrained MLP 4 x 1024 (batch 256) against the plain model: the
constraint evaluated every forward, under ``parametrize.cached()``, and baked."""

from __future__ import annotations

import copy

import torch
from harness import interleaved_medians, markdown_table
from torch.nn.utils import parametrize
from train_step import is_matrix, mlp

import maskparam as mp


def run(rounds: int = 20) -> str:
    torch.manual_seed(0)
    plain, x = mlp()
    constrained = mp.apply_mask(copy.deepcopy(plain), {is_matrix: mp.Mask(mp.masks.random(0.5))})
    baked = mp.remove_parametrizations(copy.deepcopy(constrained))

    def forward(model: torch.nn.Module):
        def run_once() -> None:
            with torch.no_grad():
                model(x)

        return run_once

    def cached() -> None:
        with torch.no_grad(), parametrize.cached():
            constrained(x)

    variants = {
        "plain": forward(plain),
        "constrained": forward(constrained),
        "constrained, parametrize.cached()": cached,
        "baked (remove_parametrizations)": forward(baked),
    }
    medians = interleaved_medians(variants, rounds=rounds)
    rows = [[name, f"{t * 1e3:.2f}", f"{t / medians['plain']:.3f}x"] for name, t in medians.items()]
    return markdown_table(["MLP 4x1024, Mask 50%, forward only", "ms", "vs plain"], rows)


if __name__ == "__main__":
    torch.set_num_threads(1)
    print(run())
