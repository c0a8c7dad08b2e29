"""``shrink``: physically remove the channels a baked model holds only zeros for.

After :func:`maskparam.masks.channels` masked whole channel groups and
:func:`~maskparam.remove_parametrizations` baked them, every tensor slice of such a group is
zero, and the model computes exactly what it would without them. :func:`shrink` finds the groups
again (:func:`maskparam.masks.channel_groups`), cuts their slices out of every tensor (the same
Parameter objects, smaller; the modules' size attributes follow) and checks, one layer at a time,
that the model's outputs on the example inputs stay those of the model before; a layer whose
removal changes them or fails to run is put back and reported.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from maskparam.core.inference import refuse_inference_mode
from maskparam.core.tensors import TensorRef, find_tensors
from maskparam.errors import check_module, error
from maskparam.masks.channel_slots import ChannelGroup
from maskparam.masks.channel_trace import ExampleInputs, call_of, tensors_in, trace_channels

__all__ = ["ShrinkReport", "shrink"]


@dataclass(frozen=True)
class ShrinkLayer:
    """One layer (a family of channel groups that touch the same tensors): how many of its
    groups there were, how many were all zero, how many of those were removed, and why the rest
    were not."""

    tensors: tuple[tuple[str, int], ...]
    groups: int
    zero: int
    removed: int
    reason: str | None

    @property
    def name(self) -> str:
        first, dim = self.tensors[0]
        return f"{first}[dim {dim}]"


@dataclass(frozen=True)
class ShrinkReport:
    """What :func:`shrink` did: one :class:`ShrinkLayer` per layer with all-zero channels,
    and the state_dict's bytes before and after."""

    layers: tuple[ShrinkLayer, ...]
    bytes_before: int
    bytes_after: int

    @property
    def removed(self) -> int:
        """Channel groups removed in all."""
        return sum(layer.removed for layer in self.layers)

    @property
    def not_removed(self) -> list[ShrinkLayer]:
        """The layers with all-zero channels that stayed, each with the reason."""
        return [layer for layer in self.layers if layer.removed < layer.zero]

    def __str__(self) -> str:
        lines = [
            (
                f"shrink: removed {self.removed} channel groups; state_dict "
                f"{self.bytes_before:,} -> {self.bytes_after:,} bytes"
            )
        ]
        for layer in self.layers:
            line = f"  {layer.name}: {layer.removed} of {layer.groups} removed"
            if layer.removed < layer.zero:
                line += f" ({layer.zero - layer.removed} all-zero kept: {layer.reason})"
            lines.append(line)
        return "\n".join(lines)


@dataclass
class _Cut:
    """The tensors of the model by name, and which of their original indices remain."""

    refs: dict[str, TensorRef]
    alive: dict[tuple[str, int], list[int]] = field(default_factory=dict)

    def remaining(self, name: str, dim: int) -> list[int]:
        tensor = self.refs[name].storage
        return self.alive.setdefault((name, dim), list(range(tensor.shape[dim])))


def shrink(
    model: nn.Module, example_inputs: ExampleInputs, *, rtol: float = 1e-4, atol: float = 1e-5
) -> nn.Module:
    """Remove every channel group whose parameter slices are all zero from the baked ``model``,
    in place; returns ``model``, with what was removed and what was not (and why) in
    ``model.shrink_report`` (a :class:`ShrinkReport`).

    The tensors stay the same Parameter objects, smaller, in the same module classes; Conv,
    Linear, BatchNorm, LayerNorm, Embedding and transformers' Conv1D get their size attributes
    (``out_channels``, ``in_features``, ``num_features``...) updated. Each layer's removal is
    checked by running the model on ``example_inputs`` in eval mode: outputs must stay within
    ``rtol`` / ``atol`` (scaled by the output's largest magnitude) of the outputs before, or
    the layer is put back and reported (code that fixes a size, e.g. a number of heads, in
    Python). A layer keeps at least one channel. Make the optimizer after shrinking: the
    Parameters change shape.

    >>> import torch, maskparam as mp
    >>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    >>> with torch.no_grad():
    ...     model[0].weight[1:3] = 0; model[0].bias[1:3] = 0; model[2].weight[:, 1:3] = 0
    >>> x = torch.randn(5, 3)
    >>> before = model(x)
    >>> model = mp.shrink(model, x)
    >>> model[0], model[2]
    (Linear(in_features=3, out_features=2, bias=True), Linear(in_features=2, out_features=2, bias=True))
    >>> torch.allclose(model(x), before)
    True
    >>> print(model.shrink_report)
    shrink: removed 2 channel groups; state_dict 104 -> 56 bytes
      0.weight[dim 0]: 2 of 4 removed
    """
    check_module(model, "shrink")
    refuse_inference_mode("shrink")
    call_of(example_inputs, "shrink")
    tolerances: tuple[tuple[str, object], ...] = (("rtol", rtol), ("atol", atol))
    for name, value in tolerances:
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if not number or not 0 <= value < math.inf:  # type: ignore[operator]
            raise error(
                f"shrink({name}={value!r})",
                f"{name} must be a finite number >= 0 (the check of each layer's removal).",
                fix=f"leave it out or pass e.g. {name}=1e-4.",
            )
    parametrized = [n for n, m in model.named_modules() if parametrize.is_parametrized(m)]
    if parametrized:
        raise error(
            "shrink",
            f"{len(parametrized)} module(s) are parametrized, e.g. {parametrized[0] or 'the model'!r}.",
            fix="bake the model first: mp.remove_parametrizations(model), then shrink it.",
        )
    groups = trace_channels(model, example_inputs, "shrink")
    bytes_before = _state_bytes(model)
    reference = _outputs(model, example_inputs)
    refs = {name: ref for ref in find_tensors(model) for name in ref.all_names}
    cut = _Cut(refs)
    # Which groups are all zero, read before anything is cut (indices are the original ones).
    zeros = [
        [g for g in family if _all_zero(g, refs, groups.parameters)] for family in groups.families()
    ]
    originals = {id(ref.storage): (ref.storage, ref.storage.data) for ref in refs.values()}
    grads = {id(t): (t, t.grad) for t, _ in originals.values()}
    sizes = {id(m): (m, _size_attributes(m)) for m in model.modules()}
    layers = []
    try:
        for family, zero in zip(groups.families(), zeros, strict=True):
            if not zero:
                continue
            removable = [g for g in zero if g.blocked is None]
            reason = next((g.blocked for g in zero if g.blocked is not None), None)
            if len(removable) == len(family):
                removable = removable[1:]
                reason = "a layer keeps at least one channel"
            removed = 0
            if removable:
                problem = _remove(model, cut, removable, example_inputs, reference, rtol, atol)
                if problem is None:
                    removed = len(removable)
                else:
                    reason = problem
            layers.append(ShrinkLayer(family[0].family, len(family), len(zero), removed, reason))
    except BaseException:
        # All or nothing: whatever failed, the model gets every tensor and size back.
        for tensor, data in originals.values():
            tensor.data = data
        for tensor, grad in grads.values():
            tensor.grad = grad
        for module, attributes in sizes.values():
            for attribute, size in attributes.items():
                setattr(module, attribute, size)
        raise
    report = ShrinkReport(tuple(layers), bytes_before, _state_bytes(model))
    object.__setattr__(model, "shrink_report", report)
    return model


def _all_zero(group: ChannelGroup, refs: dict[str, TensorRef], parameters: frozenset[str]) -> bool:
    for name, dim, indices in group.slices:
        if name not in parameters:
            continue
        tensor = refs[name].storage.detach()
        index = torch.tensor(indices, device=tensor.device)
        if bool(tensor.index_select(dim, index).ne(0).any()):
            return False
    return True


def _remove(
    model: nn.Module,
    cut: _Cut,
    removable: Sequence[ChannelGroup],
    example_inputs: ExampleInputs,
    reference: list[Tensor],
    rtol: float,
    atol: float,
) -> str | None:
    """Cut one layer's groups out; put everything back and say why where the model then fails
    or computes otherwise."""
    by_tensor: dict[tuple[str, int], set[int]] = {}
    for group in removable:
        for name, dim, index in group.slices:
            by_tensor.setdefault((name, dim), set()).update(index)
    saved_alive = {key: list(cut.remaining(*key)) for key in by_tensor}
    touched: dict[int, tuple[Tensor, Tensor, Tensor | None]] = {}
    modules: dict[int, nn.Module] = {}
    for (name, dim), removed in by_tensor.items():
        ref = cut.refs[name]
        tensor = ref.storage
        alive = cut.remaining(name, dim)
        keep = [i for i, original in enumerate(alive) if original not in removed]
        touched.setdefault(id(tensor), (tensor, tensor.data, tensor.grad))
        with torch.no_grad():
            tensor.data = tensor.data.index_select(
                dim, torch.tensor(keep, device=tensor.device)
            ).contiguous()
        tensor.grad = None
        cut.alive[(name, dim)] = [alive[i] for i in keep]
        for module, _ in ref.holders:
            modules[id(module)] = module
    sizes = {key: _size_attributes(m) for key, m in modules.items()}
    for module in modules.values():
        _resize(module)
    problem: str | None = None
    try:
        outputs = _outputs(model, example_inputs)
    except Exception as failure:  # noqa: BLE001 - the model's code fixes a size: put the layer back
        problem = f"the model does not run without them ({type(failure).__name__}: " + (
            f"{str(failure).splitlines()[0] if str(failure) else ''})"
        )
    else:
        problem = _differs(outputs, reference, rtol, atol)
    if problem is not None:
        for tensor, data, grad in touched.values():
            tensor.data = data
            tensor.grad = grad
        for key, module in modules.items():
            for attribute, value in sizes[key].items():
                setattr(module, attribute, value)
        cut.alive.update(saved_alive)
    return problem


_SIZE_ATTRIBUTES = (
    "in_channels", "out_channels", "groups", "in_features", "out_features", "num_features",
    "normalized_shape", "embedding_dim", "nf",
)  # fmt: skip


def _size_attributes(module: nn.Module) -> dict[str, object]:
    return {a: getattr(module, a) for a in _SIZE_ATTRIBUTES if hasattr(module, a)}


def _resize(module: nn.Module) -> None:
    """The size attributes of torch's own modules (and transformers' Conv1D) from their
    tensors' new shapes."""
    weight = module._parameters.get("weight")
    if isinstance(module, nn.modules.conv._ConvNd) and isinstance(weight, Tensor):
        multiplier = module.out_channels // module.groups if module.groups > 1 else 1
        if module.transposed:
            in_ch, out_per_group = weight.shape[0], weight.shape[1]
            module.in_channels, module.out_channels = in_ch, out_per_group * module.groups
        elif module.groups > 1:  # depthwise: one input channel per group
            module.out_channels = weight.shape[0]
            module.groups = module.in_channels = weight.shape[0] // multiplier
        else:
            module.out_channels, module.in_channels = weight.shape[0], weight.shape[1]
    elif isinstance(module, nn.Linear) and isinstance(weight, Tensor):
        module.out_features, module.in_features = weight.shape[0], weight.shape[1]
    elif isinstance(module, nn.modules.batchnorm._NormBase):
        stats = module._buffers.get("running_mean")
        if stats is None:
            stats = weight
        if stats is not None:
            module.num_features = stats.shape[0]
    elif isinstance(module, nn.LayerNorm) and isinstance(weight, Tensor):
        module.normalized_shape = tuple(weight.shape)
    elif isinstance(module, nn.Embedding) and isinstance(weight, Tensor):
        module.embedding_dim = weight.shape[1]
    elif type(module).__name__ == "Conv1D" and hasattr(module, "nf") and isinstance(weight, Tensor):
        object.__setattr__(module, "nf", weight.shape[1])  # transformers' Conv1D: (in, out)


def _outputs(model: nn.Module, example_inputs: ExampleInputs) -> list[Tensor]:
    args, kwargs = call_of(example_inputs, "shrink")
    training = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            return [t.detach().clone() for t in tensors_in(model(*args, **kwargs))]
    finally:
        for module, mode in training:
            module.training = mode


def _differs(
    outputs: list[Tensor], reference: list[Tensor], rtol: float, atol: float
) -> str | None:
    """Why the outputs are not the reference's: each element within atol + rtol * |reference|,
    non-finite elements equal (an inf or NaN does not loosen the check of the others)."""
    if len(outputs) != len(reference):
        return f"the model then returns {len(outputs)} tensors instead of {len(reference)}"
    for i, (got, want) in enumerate(zip(outputs, reference, strict=True)):
        if got.shape != want.shape or got.dtype != want.dtype:
            return f"output {i} then has shape {tuple(got.shape)} instead of {tuple(want.shape)}"
        if not (want.is_floating_point() or want.is_complex()):
            if not torch.equal(got, want):
                return f"output {i} then differs"
            continue
        finite = torch.isfinite(want)
        if not torch.equal(torch.isfinite(got), finite) or not torch.equal(
            got[~finite].nan_to_num(), want[~finite].nan_to_num()
        ):
            return f"output {i} then has other non-finite values"
        got64, want64 = got[finite].double(), want[finite].double()
        excess = (got64 - want64).abs() - (atol + rtol * want64.abs())
        if excess.numel() and float(excess.max()) > 0:
            worst = float((got64 - want64).abs().max())
            return f"output {i} then differs by up to {worst:.3g} (rtol {rtol:g}, atol {atol:g})"
    return None


def _state_bytes(model: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())
