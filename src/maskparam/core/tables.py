"""Aligned plain-text tables, for :func:`maskparam.summary` and the demo."""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["text_table"]


def text_table(header: Sequence[str], rows: Sequence[Sequence[str]], *, left: int) -> str:
    """Columns separated by two spaces, a dashed rule under the header; the first ``left``
    columns align left (names), the others right (numbers).

    >>> print(text_table(["name", "n"], [["a", "10"], ["bb", "2"]], left=1))
    name   n
    ----  --
    a     10
    bb     2
    """
    table = [list(header), *(list(row) for row in rows)]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    lines = [
        "  ".join(
            cell.ljust(width) if column < left else cell.rjust(width)
            for column, (cell, width) in enumerate(zip(row, widths, strict=True))
        )
        for row in table
    ]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(line.rstrip() for line in lines)
