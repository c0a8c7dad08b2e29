"""``torch.inference_mode()``: the calls that change a model's structure refuse to run in it.

Tensors created under inference mode are *inference tensors*: autograd cannot save them and
nothing may update them in place outside inference mode. A mask, a compact layout's index, a
resized stored original or a constraint built there would leave the model failing at its next
backward (or at the next ``update_masks``), far from the cause. ``torch.no_grad()`` has none of
this, and is all these calls need.

>>> import torch
>>> with torch.inference_mode():
...     refuse_inference_mode("update_masks")
Traceback (most recent call last):
...
maskparam.errors.MaskparamError: update_masks: called inside torch.inference_mode(): the tensors it would create (masks, positions, resized originals) would be inference tensors, which autograd cannot save, so the model would fail at its next backward; nothing was changed.
  fix: call it outside torch.inference_mode(); torch.no_grad() is fine.
"""

from __future__ import annotations

import torch

from maskparam.errors import error

__all__ = ["refuse_inference_mode"]


def refuse_inference_mode(call: str) -> None:
    """Raise, before anything changes, where ``call`` runs inside ``torch.inference_mode()``."""
    if torch.is_inference_mode_enabled():
        raise error(
            call,
            "called inside torch.inference_mode(): the tensors it would create (masks, "
            "positions, resized originals) would be inference tensors, which autograd cannot "
            "save, so the model would fail at its next backward; nothing was changed.",
            fix="call it outside torch.inference_mode(); torch.no_grad() is fine.",
        )
