"""The one error class maskparam raises for bad input, and the one warning it gives."""

from __future__ import annotations

import math

__all__ = [
    "MaskparamError",
    "MaskparamWarning",
    "check_bool",
    "check_finite",
    "check_int",
    "check_module",
    "error",
]


class MaskparamError(ValueError):
    """Bad input to maskparam: the message names the tensor, what was wrong and the fix.

    It subclasses :class:`ValueError`, so ``except ValueError`` keeps working.
    """


class MaskparamWarning(UserWarning):
    """A call did what it was asked, but likely not what was meant (an absolute sparsity that
    regrows pruned entries by magnitude, where every pruned entry is 0)."""


def error(subject: str, problem: str, *details: str, fix: str) -> MaskparamError:
    """Build an error in the house format: subject and problem, details one per line, the fix.

    >>> print(error("'fc.weight'", "the mask is not binary.", "values: 0.5", fix="pass 0/1."))
    'fc.weight': the mask is not binary.
      values: 0.5
      fix: pass 0/1.
    """
    lines = [f"{subject}: {problem}", *(f"  {d}" for d in details), f"  fix: {fix}"]
    return MaskparamError("\n".join(lines))


def check_int(value: object, subject: str, what: str, *, minimum: int | None = None) -> None:
    """Refuse anything but an int (a bool is not one: ``dim=True`` would silently mean 1).

    >>> check_int(True, "Freeze", "dim")
    Traceback (most recent call last):
    ...
    maskparam.errors.MaskparamError: Freeze: dim must be an int; got True (bool).
      fix: pass e.g. dim=0.
    """
    if not isinstance(value, int) or isinstance(value, bool):
        raise error(
            subject,
            f"{what} must be an int; got {value!r} ({type(value).__name__}).",
            fix=f"pass e.g. {what}={minimum if minimum is not None else 0}.",
        )
    if minimum is not None and value < minimum:
        raise error(
            subject, f"{what} must be >= {minimum}; got {value}.", fix=f"pass {what}>={minimum}."
        )


def check_bool(value: object, subject: str, what: str) -> None:
    """Refuse anything but a bool (``lower="no"`` is truthy: it would silently mean True)."""
    if not isinstance(value, bool):
        raise error(
            subject,
            f"{what} must be True or False; got {value!r} ({type(value).__name__}).",
            fix=f"pass {what}=True or {what}=False.",
        )


def check_finite(value: object, subject: str, what: str, *, positive: bool = False) -> None:
    """Refuse anything but a finite real number (and, with ``positive``, one above 0)."""
    number = value if isinstance(value, (int, float)) and not isinstance(value, bool) else None
    if number is None or not math.isfinite(number) or (positive and number <= 0):
        kind = "a finite positive number" if positive else "a finite number"
        raise error(subject, f"{what} must be {kind}; got {value!r}.", fix=f"pass e.g. {what}=1.0.")


def check_module(model: object, caller: str) -> None:
    """Refuse anything but a ``torch.nn.Module`` as the model a public function works on."""
    from torch import nn  # noqa: PLC0415 - errors.py stays importable without torch's nn first

    if not isinstance(model, nn.Module):
        raise error(
            caller,
            f"the model must be a torch.nn.Module; got a {type(model).__name__}.",
            fix=f"pass the model itself, e.g. {caller}(model, ...).",
        )
