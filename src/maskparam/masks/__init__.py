"""Mask generators: what :class:`~maskparam.Mask` keeps and :class:`~maskparam.Freeze` freezes.

* :mod:`~maskparam.masks.generators`: masks computed from the tensor itself (random, magnitude,
  global magnitude, structured, N:M, slices), the base classes for generators of your own
  (:class:`MaskGenerator`, :class:`JointMaskGenerator`) and the checks every mask passes;
* :mod:`~maskparam.masks.importance`: masks scored from batches (FISH, Wanda);
* :mod:`~maskparam.masks.channel_masks`: whole channels with every slice that goes with them
  (:func:`channels`), found by tracing the model (:func:`channel_groups`).

>>> import torch, maskparam as mp
>>> mp.masks.magnitude(0.5)(torch.tensor([0.1, -3.0, 2.0, 0.5]))
tensor([False,  True,  True, False])
"""

from __future__ import annotations

from maskparam.masks.channel_masks import ChannelMask, channel_groups, channels
from maskparam.masks.channel_slots import ChannelGroup, ChannelGroups
from maskparam.masks.generators import (
    GlobalMagnitudeMask,
    JointMaskGenerator,
    MaskGenerator,
    MaskSource,
    columns,
    filters,
    global_magnitude,
    magnitude,
    n_m,
    random,
    rows,
    slices,
    structured,
)
from maskparam.masks.importance import fisher, wanda

__all__ = [
    "ChannelGroup",
    "ChannelGroups",
    "ChannelMask",
    "GlobalMagnitudeMask",
    "JointMaskGenerator",
    "MaskGenerator",
    "MaskSource",
    "channel_groups",
    "channels",
    "columns",
    "filters",
    "fisher",
    "global_magnitude",
    "magnitude",
    "n_m",
    "random",
    "rows",
    "slices",
    "structured",
    "wanda",
]
