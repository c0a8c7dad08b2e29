"""Channel masks: whole channels of a model, with every tensor slice that goes with them.

:func:`channels` ranks the *channel groups* of a model (:func:`channel_groups`: a conv's output
channel with its bias, its BatchNorm entries and the matching input slice of every consumer; a
residual stream's channel across every block that adds into it; an attention head; an MLP
neuron) and masks the weakest fraction of each layer's groups in every tensor they touch, so that
the masked model can later be physically shrunk (:func:`maskparam.shrink`).

>>> import torch, maskparam as mp
>>> torch.manual_seed(0) and None
>>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
>>> x = torch.randn(8, 3)
>>> _ = mp.apply_mask(model, {"*": mp.Mask(mp.masks.channels(0.5, example_inputs=x))})
>>> [int(n) for n in mp.kept_masks(model)["0.weight"].all(dim=1)]  # two of the 4 neurons go
[1, 1, 0, 0]
>>> [int(n) for n in mp.kept_masks(model)["2.weight"].all(dim=0)]  # ... with their columns
[1, 1, 0, 0]
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn
from typing_extensions import override

from maskparam.errors import check_module, error
from maskparam.masks.channel_slots import ChannelGroup, ChannelGroups
from maskparam.masks.channel_trace import ExampleInputs, trace_channels
from maskparam.masks.generators import JointMaskGenerator, check_fraction, is_norm

__all__ = ["ChannelMask", "channel_groups", "channels"]


def channel_groups(model: nn.Module, example_inputs: ExampleInputs) -> ChannelGroups:
    """Find which slices of which tensors of ``model`` can only be removed together, by running
    it once on ``example_inputs`` (a tensor, a tuple of positional arguments or a dict of keyword
    arguments; in eval mode, the modes come back afterwards; nothing of the model changes).

    A group that may not be removed says why (``blocked``): it reaches the model's input or
    output (a classifier keeps its classes), a LayerNorm or a reduction mixes it with the
    other channels, code indexes it with fixed numbers, or an operation the tracer has no
    rule for reads it (``unknown_ops`` counts those).

    >>> import torch, maskparam as mp
    >>> conv = torch.nn.Sequential(
    ...     torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
    ...     torch.nn.Conv2d(8, 4, 3), torch.nn.Flatten(), torch.nn.LazyLinear(2))
    >>> _ = conv(torch.randn(1, 3, 8, 8))
    >>> groups = mp.masks.channel_groups(conv, torch.randn(1, 3, 8, 8))
    >>> print(groups)
        8 x 0.weight[dim 0], 0.bias[dim 0], 1.weight[dim 0], 1.bias[dim 0] and 3 more (removable)
        3 x 0.weight[dim 1] (3 blocked: the input it reads has no channels (the model's input))
        4 x 3.weight[dim 0], 3.bias[dim 0], 5.weight[dim 1] (removable)
        2 x 5.weight[dim 0], 5.bias[dim 0] (2 blocked: it reaches the model's output)
    >>> groups.families()[2][0].slices  # a channel of the second conv: 16 columns of the Linear
    (('3.weight', 0, (0,)), ('3.bias', 0, (0,)), ('5.weight', 1, (0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15)))
    """
    check_module(model, "masks.channel_groups")
    return trace_channels(model, example_inputs, "masks.channel_groups")


class ChannelMask(JointMaskGenerator):
    """Keeps the strongest ``1 - sparsity`` of each layer's channel groups; see
    :func:`channels`."""

    ranks_by_value = True

    def __init__(self, sparsity: float, example_inputs: ExampleInputs, norm: object = 2) -> None:
        check_fraction(sparsity, "sparsity")
        if isinstance(norm, str) or not is_norm(norm) or not float(norm) > 0:  # type: ignore[arg-type]
            raise error(
                f"masks.channels(norm={norm!r})",
                "norm must be a positive number p (the Lp norm of a group's slices) or inf.",
                fix="pass norm=2 (the default), norm=1 or norm=float('inf').",
            )
        self.sparsity = float(sparsity)
        self.example_inputs = example_inputs
        self.norm = float(norm)  # type: ignore[arg-type]  # a number: checked above

    @override
    def describe(self) -> str:
        return (
            f"the {100 * (1 - self.sparsity):g}% of each layer's channel groups of largest "
            f"L{self.norm:g} norm"
        )

    def __repr__(self) -> str:
        return f"masks.channels({self.sparsity:g}, norm={self.norm:g})"

    @override
    def build_joint(self, members: Sequence[tuple[str, Tensor]]) -> list[Tensor]:
        raise error(
            "masks.channels",
            "it ranks channel groups of a model, and was given tensors without their model.",
            fix="use it in a rule of apply_mask, update_masks or GradualPruning, e.g. "
            "{'*': mp.Mask(mp.masks.channels(0.5, example_inputs=x))}.",
        )

    @override
    def build_in_model(
        self,
        model: nn.Module,
        members: Sequence[tuple[str, Tensor]],
        kept: Sequence[Tensor] | None,
    ) -> list[Tensor]:
        groups = trace_channels(model, self.example_inputs, "masks.channels")
        values = dict(members)
        kept_by_name = {name: k for (name, _), k in zip(members, kept, strict=True)} if kept else {}
        found = {
            name: torch.ones(t.shape, dtype=torch.bool, device=t.device) for name, t in members
        }
        per_index = _PerIndex(values, kept_by_name, self.norm)
        masked_any = False
        left_whole: tuple[str, str] | None = None  # (a rule's tensor, a tensor its group needs)
        for family in groups.families():
            candidates = [g for g in family if _selectable(g, values, groups)]
            most = min(len(candidates), len(family) - 1)  # every layer keeps a channel
            count = min(most, math.floor(self.sparsity * len(family) + 1e-9))
            if not candidates and left_whole is None:
                left_whole = _outside_the_rule(family, values, groups)
            if count <= 0:
                continue
            masked_any = True
            scores = [self._score(g, per_index, groups) for g in candidates]
            # Groups pruned now first (as torch's prune prunes again), then the weakest; ties
            # by position.
            order = sorted(range(len(candidates)), key=lambda i: (scores[i], i))
            for i in order[:count]:
                for name, dim, indices in candidates[i].slices:
                    if name in found:
                        index = torch.tensor(indices, device=found[name].device)
                        found[name].index_fill_(dim, index, False)
        if not masked_any and left_whole is not None and self.sparsity > 0:
            inside, outside = left_whole
            raise error(
                "masks.channels",
                f"no channel group lies wholly in the rule's tensors, so nothing would be masked: "
                f"the channels of {inside!r} go with {outside!r}, which the rule does not select.",
                fix="select every tensor of the layers, e.g. the rule '*' (biases and norms too).",
            )
        return [found[name] for name, _ in members]

    def _score(self, group: ChannelGroup, per_index: _PerIndex, groups: ChannelGroups) -> float:
        """The group's Lp norm summed over its parameters; -inf for a group its Masks prune
        now (all its entries), so that pruned groups stay pruned."""
        total = 0.0
        pruned_now = per_index.has_masks
        for name, dim, indices in group.slices:
            if name not in groups.parameters:
                continue
            powers, kept = per_index.of(name, dim)
            index = torch.tensor(indices)
            if kept is not None and bool(kept[index].any()):
                pruned_now = False
            picked = powers[index]
            if math.isinf(self.norm):
                total += float(picked.max())
            else:
                total += float(picked.sum()) ** (1 / self.norm)
        return -math.inf if pruned_now else total


class _PerIndex:
    """Per (tensor, dim): each index's slice as |w|^p summed (max for p = inf), of the entries
    the tensor's Mask keeps now, and whether any entry of the slice is kept."""

    def __init__(self, values: dict[str, Tensor], kept: dict[str, Tensor], norm: float) -> None:
        self.values = values
        self.kept = kept
        self.norm = norm
        self.has_masks = bool(kept)
        self._found: dict[tuple[str, int], tuple[Tensor, Tensor | None]] = {}

    def of(self, name: str, dim: int) -> tuple[Tensor, Tensor | None]:
        key = (name, dim)
        if key not in self._found:
            tensor = self.values[name].detach().to(torch.float64).abs()
            kept = None
            if name in self.kept:
                mask = self.kept[name].to(tensor.device, torch.bool).expand(tensor.shape)
                tensor = tensor * mask
                kept = mask.movedim(dim, 0).reshape(tensor.shape[dim], -1).any(dim=1).cpu()
            rows = tensor.movedim(dim, 0).reshape(tensor.shape[dim], -1)
            if math.isinf(self.norm):
                powers = rows.amax(dim=1) if rows.shape[1] else rows.new_zeros(rows.shape[0])
            else:
                powers = rows.pow(self.norm).sum(dim=1)
            self._found[key] = (powers.cpu(), kept)
        return self._found[key]


def _outside_the_rule(
    family: list[ChannelGroup], values: dict[str, Tensor], groups: ChannelGroups
) -> tuple[str, str] | None:
    """A removable family that touches the rule's tensors and others: (one of each)."""
    group = family[0]
    if group.blocked is not None:
        return None
    names = [name for name in group.tensors() if name in groups.parameters]
    inside = [name for name in names if name in values]
    outside = [name for name in names if name not in values]
    return (inside[0], outside[0]) if inside and outside else None


def _selectable(group: ChannelGroup, values: dict[str, Tensor], groups: ChannelGroups) -> bool:
    """A group can be masked where it is not blocked and the rule selects every parameter it
    touches (masking part of a group would leave a channel no shrink can remove)."""
    if group.blocked is not None:
        return False
    return all(name in values for name, _, _ in group.slices if name in groups.parameters)


def channels(sparsity: float, *, example_inputs: ExampleInputs, norm: float = 2) -> ChannelMask:
    """Masks the ``sparsity`` fraction of each layer's channel groups of smallest Ln norm (the
    norms of the group's slices, summed over its tensors), in every tensor a group touches.

    A *joint* generator: one ranking over every tensor of its rule, which it traces with the
    model on ``example_inputs`` (:func:`channel_groups`) each time it runs. A group counts
    only where the rule selects every parameter it touches (``"*"`` selects them all; a rule that
    holds no whole group is refused); a layer
    (a family of groups that touch the same tensors) keeps at least one channel. Use it in a
    rule of :func:`~maskparam.apply_mask`, :func:`~maskparam.update_masks` or
    :class:`~maskparam.GradualPruning`
    (``{"*": lambda s: mp.masks.channels(s, example_inputs=x)}``); bake with
    :func:`~maskparam.remove_parametrizations`, then :func:`~maskparam.shrink` removes the
    masked channels.

    >>> import torch, maskparam as mp
    >>> model = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    >>> x = torch.randn(4, 3)
    >>> _ = mp.apply_mask(model, {"*": mp.Mask(mp.masks.channels(0.75, example_inputs=x))})
    >>> model = mp.remove_parametrizations(model)
    >>> print(mp.shrink(model, x)[0])
    Linear(in_features=3, out_features=2, bias=True)
    """
    return ChannelMask(sparsity, example_inputs, norm)
