"""Peak memory (whole process, each case alone in a subprocess) of an MLP of 8 x 4096 Linear
layers trained with AdamW and with SGD(momentum), constrained in each way (default options unless
"dense" is named), against the plain model."""

from __future__ import annotations

from harness import markdown_table
from peak_memory import peak_bytes

CASES = {
    "plain": "mlp8x4096-plain",
    "Mask 50%": "mlp8x4096-mask50",
    "Mask 50% (dense)": "mlp8x4096-mask50-dense",
    "Mask 90% sparse": "mlp8x4096-mask10",
    "Mask 10% sparse": "mlp8x4096-mask90",
    "Triangular": "mlp8x4096-triangular",
    "Triangular (dense)": "mlp8x4096-triangular-dense",
    "Freeze 50%": "mlp8x4096-freeze50",
    "Freeze 50% (dense)": "mlp8x4096-freeze50-dense",
}
WEIGHTS = 8 * 4096 * 4096  # the constrained entries: every weight matrix


def run() -> str:
    rows = []
    for optimizer in ("adamw", "sgd"):
        peaks = {label: peak_bytes(case, optimizer) for label, case in CASES.items()}
        rows += [
            [
                label,
                {"adamw": "AdamW", "sgd": "SGD(momentum)"}[optimizer],
                f"{peak / 2**30:.2f}",
                f"{(peak - peaks['plain']) / WEIGHTS:+.2f}",
            ]
            for label, peak in peaks.items()
        ]
    header = ["MLP 8x4096, 3 steps", "optimizer", "peak RSS GiB", "bytes per weight entry vs plain"]
    return markdown_table(header, rows)


if __name__ == "__main__":
    print(run())
