"""Peak memory (whole process, each case alone in a subprocess) of an MLP of 8 x 4096 Linear
layers trained with AdamW, constrained in each way, against the plain model."""

from __future__ import annotations

from harness import markdown_table
from peak_memory import peak_bytes

CASES = {
    "plain": "mlp8x4096-plain",
    "Mask 50%": "mlp8x4096-mask50",
    "Mask 50% (compact)": "mlp8x4096-mask50-compact",
    "Mask 90% sparse (compact)": "mlp8x4096-mask10-compact",
    "Triangular": "mlp8x4096-triangular",
    "Freeze 50%": "mlp8x4096-freeze50",
}
WEIGHTS = 8 * 4096 * 4096  # the constrained entries: every weight matrix


def run() -> str:
    peaks = {label: peak_bytes(case) for label, case in CASES.items()}
    rows = [
        [
            label,
            f"{peak / 2**30:.2f}",
            f"{(peak - peaks['plain']) / WEIGHTS:+.2f}",
        ]
        for label, peak in peaks.items()
    ]
    return markdown_table(
        ["MLP 8x4096, AdamW, 3 steps", "peak RSS GiB", "bytes per weight entry vs plain"], rows
    )


if __name__ == "__main__":
    print(run())
