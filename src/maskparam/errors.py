"""The one error class maskparam raises for bad input."""

from __future__ import annotations

__all__ = ["MaskparamError"]


class MaskparamError(ValueError):
    """Bad input to maskparam: the message names the tensor, what was wrong and the fix.

    It subclasses :class:`ValueError`, so ``except ValueError`` keeps working.
    """


def error(subject: str, problem: str, *details: str, fix: str) -> MaskparamError:
    """Build an error in the house format: subject and problem, details one per line, the fix.

    >>> print(error("'fc.weight'", "the mask is not binary.", "values: 0.5", fix="pass 0/1."))
    'fc.weight': the mask is not binary.
      values: 0.5
      fix: pass 0/1.
    """
    lines = [f"{subject}: {problem}", *(f"  {d}" for d in details), f"  fix: {fix}"]
    return MaskparamError("\n".join(lines))
