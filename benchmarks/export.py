"""Export: a magnitude-pruned model baked, then ``mp.to_sparse``: inference speed at batch 64 and
state_dict bytes, against the same baked model dense (the baseline of each row, same run).

Models: an MLP 4 x 1024 (the issue's target) and a small CNN (two 3x3 convs, then Linear
512 -> 64 -> 10, the one of examples/pruning.py), at 50/90/95% global magnitude sparsity.
to_sparse converts Linear weights only: a conv keeps its dense weight (torch has no CSR
convolution on the CPU), so the CNN gains only where its Linears are.
"""

from __future__ import annotations

import copy
import io

import torch
from harness import interleaved_medians, markdown_table
from torch import nn

import maskparam as mp

SPARSITIES = (0.5, 0.9, 0.95)
BATCH = 64


def mlp() -> tuple[nn.Module, torch.Tensor]:
    layers: list[nn.Module] = []
    for _ in range(4):
        layers += [nn.Linear(1024, 1024), nn.ReLU()]
    return nn.Sequential(*layers[:-1]), torch.randn(BATCH, 1024)


def cnn() -> tuple[nn.Module, torch.Tensor]:
    model = nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(32 * 4 * 4, 64),
        nn.ReLU(),
        nn.Linear(64, 10),
    )
    return model, torch.randn(BATCH, 1, 8, 8)


def state_bytes(model: nn.Module) -> int:
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return buffer.tell()


def pruned(model: nn.Module, sparsity: float) -> nn.Module:
    model = copy.deepcopy(model)
    mp.apply_mask(model, {"*.weight": mp.Mask(mp.masks.global_magnitude(sparsity))})
    return mp.remove_parametrizations(model)


def rows_for(name: str, build, rounds: int) -> list[list[str]]:
    torch.manual_seed(0)
    base, x = build()
    rows = []
    for sparsity in SPARSITIES:
        dense = pruned(base, sparsity)
        sparse = mp.to_sparse(copy.deepcopy(dense), batch_size=BATCH)
        with torch.no_grad():
            assert torch.allclose(sparse(x), dense(x), atol=1e-4, rtol=1e-4)

        def forward(model: nn.Module):
            def once() -> None:
                with torch.no_grad():
                    model(x)

            return once

        medians = interleaved_medians(
            {"dense": forward(dense), "to_sparse": forward(sparse)}, rounds=rounds
        )
        csr = sum(c.layout == "csr" for c in sparse.sparse_choices)
        rows.append(
            [
                name,
                f"{100 * sparsity:g}%",
                f"{csr} of {len(sparse.sparse_choices)}",
                f"{1e3 * medians['dense']:.3f}",
                f"{1e3 * medians['to_sparse']:.3f}",
                f"{medians['to_sparse'] / medians['dense']:.2f}x",
                f"{state_bytes(dense):,}",
                f"{state_bytes(sparse):,}",
                f"{state_bytes(sparse) / state_bytes(dense):.3f}x",
            ]
        )
    return rows


def cuda_two_four(rounds: int) -> str:
    """A 4096 x 4096 fp16 Linear with a 2:4 mask (mp.masks.n_m(2, 4)), dense against what
    to_sparse chose (semi-structured where faster), on CUDA; a line saying so without a GPU."""
    if not torch.cuda.is_available():
        return "No GPU on this machine: the 2:4 semi-structured row was not measured."
    torch.manual_seed(0)
    layer = nn.Linear(4096, 4096).half().cuda()
    mp.apply_mask(layer, {"weight": mp.Mask(mp.masks.n_m(2, 4))})
    dense = mp.remove_parametrizations(layer)
    sparse = mp.to_sparse(copy.deepcopy(dense), batch_size=BATCH)
    x = torch.randn(BATCH, 4096, dtype=torch.half, device="cuda")

    def forward(model: nn.Module):
        def once() -> None:
            with torch.no_grad():
                model(x)
            torch.cuda.synchronize()

        return once

    medians = interleaved_medians(
        {"dense": forward(dense), "sparse": forward(sparse)}, rounds=rounds
    )
    (choice,) = sparse.sparse_choices
    return markdown_table(
        ["layer", "layout chosen", "dense ms", "to_sparse ms", "time vs dense"],
        [
            [
                "Linear 4096x4096 fp16, 2:4",
                choice.layout,
                f"{1e3 * medians['dense']:.3f}",
                f"{1e3 * medians['sparse']:.3f}",
                f"{medians['sparse'] / medians['dense']:.2f}x",
            ]
        ],
    )


def targets(rows: list[list[str]]) -> str:
    """The issue's targets for the MLP, read off its rows."""
    by = {(r[0], r[1]): r for r in rows}
    fast, half = by[("MLP 4x1024", "95%")], by[("MLP 4x1024", "50%")]
    checks = [
        ("MLP 95%: inference >= 3x faster (time <= 0.33x)", fast[5], float(fast[5][:-1]) <= 1 / 3),
        ("MLP 95%: state_dict <= 0.15x the bytes", fast[8], float(fast[8][:-1]) <= 0.15),
        ("MLP 50%: no slower (time <= 1.05x)", half[5], float(half[5][:-1]) <= 1.05),
    ]
    return "\n".join(f"- {what}: {got}, {'met' if ok else 'NOT met'}" for what, got, ok in checks)


def run(rounds: int = 12) -> str:
    rows = rows_for("MLP 4x1024", mlp, rounds) + rows_for("CNN (digits)", cnn, 4 * rounds)
    header = [
        "model",
        "sparsity",
        "Linears as CSR",
        f"dense ms (batch {BATCH})",
        "to_sparse ms",
        "time vs dense",
        "state_dict bytes dense",
        "to_sparse bytes",
        "bytes vs dense",
    ]
    return "\n\n".join([markdown_table(header, rows), targets(rows), cuda_two_four(rounds)])


if __name__ == "__main__":
    torch.set_num_threads(1)
    print(run())
