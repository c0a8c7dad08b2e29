"""Inference (no grad) of a constrained MLP 4 x 1024 against the plain model, over a loop of 10
batches of 256: the constraint evaluated every forward, under one ``parametrize.cached()`` around
the loop (the constrained weights are computed once), and baked."""

from __future__ import annotations

import copy

import torch
from harness import interleaved_medians, markdown_table
from torch.nn.utils import parametrize
from train_step import is_matrix, mlp

import maskparam as mp

BATCHES = 20


def run(rounds: int = 10) -> str:
    torch.manual_seed(0)
    plain, x = mlp()
    constrained = mp.apply_mask(copy.deepcopy(plain), {is_matrix: mp.Mask(mp.masks.random(0.5))})
    baked = mp.remove_parametrizations(copy.deepcopy(constrained))

    def forward(model: torch.nn.Module):
        def run_once() -> None:
            with torch.no_grad():
                for _ in range(BATCHES):
                    model(x)

        return run_once

    def cached() -> None:
        with torch.no_grad(), parametrize.cached():
            for _ in range(BATCHES):
                constrained(x)

    variants = {
        "plain": forward(plain),
        "constrained": forward(constrained),
        "constrained, parametrize.cached()": cached,
        "baked (remove_parametrizations)": forward(baked),
    }
    medians = interleaved_medians(variants, rounds=rounds)
    rows = [[name, f"{t * 1e3:.2f}", f"{t / medians['plain']:.3f}x"] for name, t in medians.items()]
    header = [f"MLP 4x1024, Mask 50%, {BATCHES} forwards", "ms", "vs plain"]
    return markdown_table(header, rows)


if __name__ == "__main__":
    torch.set_num_threads(1)
    print(run())
