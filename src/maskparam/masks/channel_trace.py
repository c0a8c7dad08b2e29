"""Tracing a model's channels: which slices of its tensors one computation ties together.

The model runs once on the example inputs under ``make_fx(pre_dispatch=True)``, every floating
tensor of it passed in through ``torch.func.functional_call`` under the name a user sees (so a
constrained tensor enters as its effective value, and no parametrization is traced). That
records the ATen graph at the level of ``aten.conv2d``, ``aten.linear``, ``aten.batch_norm``,
``aten.scaled_dot_product_attention``, with every value's shape, for any model that runs eagerly:
Python control flow runs as it does, on the example's values (ARCHITECTURE.md says why this
tracer and not FX, torch.export or the autograd graph).

Each value of the graph carries *labels*: for an activation, an int64 tensor that broadcasts to
its shape and holds, per element, the slot (:class:`~maskparam.masks.channel_slots.Slots`) it
belongs to (-1: none); for a tensor of the model, one slot vector per dim. A rule per operation
joins the slots that must go together (a conv's input channel k with the producer's output
channel k, two summands' channel k) and blocks those it cannot follow: a normalization or a
reduction over the channels, an index or a slice along them, the model's own inputs and
outputs, and every operation without a rule.
"""

from __future__ import annotations

import math
import operator
import warnings
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeAlias

import torch
from torch import Tensor, fx, nn
from torch.func import functional_call
from torch.nn.utils import parametrize
from torch.utils import _pytree as pytree

from maskparam.core.parametrize import maskparam_constraints
from maskparam.core.tensors import find_tensors
from maskparam.errors import MaskparamError, MaskparamWarning, error
from maskparam.masks.channel_slots import ChannelGroups, Slots

__all__ = ["ExampleInputs", "call_of", "tensors_in", "trace_channels"]

ExampleInputs: TypeAlias = Tensor | Sequence[Any] | Mapping[str, Any]
"""What the model is called with: a tensor, a tuple of positional arguments, or a dict of
keyword arguments."""


@dataclass
class Act:
    """An activation: ``labels`` broadcasts to ``shape``; size 1 along a dim where every element
    has the same label."""

    labels: Tensor
    shape: tuple[int, ...]


@dataclass
class Par:
    """A tensor of the model (or a transpose or view of one): one slot vector per dim, None
    for a dim without slots."""

    dims: list[Tensor | None]
    shape: tuple[int, ...]


Value: TypeAlias = Act | Par | tuple[Any, ...] | None


def trace_channels(model: nn.Module, example_inputs: ExampleInputs, caller: str) -> ChannelGroups:
    """The channel groups of ``model`` called on ``example_inputs``; see
    :func:`maskparam.masks.channel_groups`."""
    args, kwargs = call_of(example_inputs, caller)
    refs = [
        ref
        for ref in find_tensors(model)
        if ref.dtype.is_floating_point
        and not ref.storage.is_meta
        and not (not ref.is_parameter and ref.local_name in ref.module._non_persistent_buffers_set)
    ]
    for ref in refs:
        if any(
            c.module_forward() is not None
            for c in maskparam_constraints(ref.module, ref.local_name)
        ):
            raise error(
                repr(ref.name),
                "its module computes with its own forward for its constraint (layout='csr': the "
                "kept entries as a sparse matrix), which channel tracing cannot follow.",
                fix="channel masks need the module's plain forward: use the default layout for "
                "this tensor (remove_parametrizations, then apply_mask without layout='csr').",
            )
    leaves: dict[str, Tensor] = {}
    slots = Slots()
    by_leaf: list[tuple[str, Par]] = []
    # Constrained tensors enter through torch's parametrization cache (what the module reads
    # inside parametrize.cached()), the others through functional_call: either way as their
    # effective values, and no parametrization runs (functional_call on a parametrized name
    # would run its right_inverse).
    cached: list[tuple[nn.Module, str, str]] = []
    plain: list[str] = []
    for ref in refs:
        value = ref.value.detach()
        value = value.requires_grad_(True) if ref.is_parameter else value.clone()
        leaves[ref.name] = value
        by_leaf.append(
            (
                ref.name,
                Par(
                    [
                        slots.new(ref.name, d, n) if n > 1 else None
                        for d, n in enumerate(value.shape)
                    ],
                    tuple(value.shape),
                ),
            )
        )
        if ref.is_parametrized:
            cached += [(module, local, ref.name) for module, local in ref.holders]
        else:
            plain += [*ref.names, *ref.tied_names]
    by_name = {name: ref.name for ref in refs for name in [*ref.names, *ref.tied_names]}
    flat_inputs, spec = pytree.tree_flatten((args, kwargs))
    tensor_at = [i for i, x in enumerate(flat_inputs) if isinstance(x, Tensor)]

    def run(params: dict[str, Tensor], tensors: list[Tensor]) -> list[Tensor]:
        flat = list(flat_inputs)
        for i, tensor in zip(tensor_at, tensors, strict=True):
            flat[i] = tensor
        call_args, call_kwargs = pytree.tree_unflatten(flat, spec)
        with parametrize.cached():
            for module, local, name in cached:
                parametrize._cache[(id(module), local)] = params[name]
            swapped = {name: params[by_name[name]] for name in plain}
            outputs = tensors_in(functional_call(model, swapped, tuple(call_args), call_kwargs))
        if not outputs:
            raise error(
                caller,
                "the model's output holds no tensor the tracer can find, so it cannot keep the "
                "output's features.",
                fix="return tensors (in tuples, lists, dicts, dataclasses or plain objects).",
            )
        return outputs

    # Every other saved buffer as a copy too (an int counter): whatever the forward writes in
    # place lands in the copies, and the model stays as it was.
    saved = set(model.state_dict(keep_vars=True))
    for name, buffer in model.named_buffers(remove_duplicate=False):
        # Saved ones only: a derived, unsaved buffer (RoPE's inv_freq) stays a constant of the
        # graph, as code may read its values.
        if name not in by_name and name in saved and "parametrizations." not in name:
            by_name[name] = name
            plain.append(name)
            leaves[name] = buffer.detach().clone()
    training = [(m, m.training) for m in model.modules()]
    devices = sorted({t.device.index or 0 for t in leaves.values() if t.is_cuda})
    graphs = []
    try:
        from torch.fx.experimental.proxy_tensor import make_fx  # noqa: PLC0415

        with (
            torch.random.fork_rng(devices=devices),
            torch.inference_mode(False),
            torch.enable_grad(),
        ):
            # In eval mode, then in train mode: code that runs in one of them only (an auxiliary
            # head, a training-only term) is seen too.
            inputs = [flat_inputs[i] for i in tensor_at]
            model.train(False)
            graphs.append(make_fx(run, pre_dispatch=True)(leaves, inputs))
            model.train(True)
            try:
                graphs.append(make_fx(run, pre_dispatch=True)(leaves, inputs))
            except MaskparamError:
                raise
            except Exception as failure:  # noqa: BLE001 - train mode reads a value (Llama)
                first = str(failure).splitlines()[0] if str(failure) else ""
                warnings.warn(
                    MaskparamWarning(
                        f"{caller}: the model traces in eval mode only (in train mode make_fx "
                        f"raised {type(failure).__name__}: {first[:160]}); code that runs only "
                        "in training is not seen, and shrink checks eval outputs. "
                        "docs/channel-pruning.md (Limits)."
                    ),
                    stacklevel=3,
                )
    except MaskparamError:
        raise
    except Exception as failure:
        raise error(
            caller,
            f"running the model on the example inputs under make_fx raised "
            f"{type(failure).__name__}: {str(failure).splitlines()[0] if str(failure) else ''}",
            "where the model runs on them outside make_fx, it reads a tensor's value (.item(), "
            "`if x.sum() > 0`, transformers' attention-mask checks), which make_fx cannot follow.",
            fix="pass example_inputs the model runs on in eval and train mode, without what makes "
            "it read values (e.g. leave out attention_mask: the channels do not depend on it).",
        ) from failure
    finally:
        for module, mode in training:
            module.training = mode
    parameters = frozenset(ref.name for ref in refs if ref.is_parameter)
    return _propagate([g.graph for g in graphs], by_leaf, slots, parameters)


def _is_kv_cache(value: object) -> bool:
    return callable(getattr(value, "update", None)) and callable(
        getattr(value, "get_seq_length", None)
    )


def call_of(example_inputs: object, caller: str) -> tuple[tuple[Any, ...], dict[str, Any]]:
    if isinstance(example_inputs, Tensor):
        return (example_inputs,), {}
    if isinstance(example_inputs, Mapping):
        return (), dict(example_inputs)
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs), {}
    raise error(
        caller,
        f"example_inputs must be a tensor, a tuple of positional arguments or a dict of keyword "
        f"arguments; got a {type(example_inputs).__name__}.",
        fix="pass e.g. example_inputs=torch.randn(1, 3, 224, 224).",
    )


def tensors_in(output: object) -> list[Tensor]:
    """Every tensor a model's output holds: in tuples, lists, dicts, ModelOutputs, dataclasses
    and any other object's attributes (a cache object's keys and values too), nested."""
    found: list[Tensor] = []
    seen: set[int] = set()

    def visit(value: object) -> None:
        if isinstance(value, Tensor):
            found.append(value)
            return
        if id(value) in seen or isinstance(value, (str, bytes, int, float, bool, type(None))):
            return
        seen.add(id(value))
        if isinstance(value, Mapping):
            for item in value.values():
                visit(item)
        elif isinstance(value, (tuple, list, set, frozenset)):
            for item in value:
                visit(item)
        elif _is_kv_cache(value):
            # A key/value cache (transformers' Cache: update, get_seq_length) holds the
            # attention's keys and values, laid out by head: it follows its heads, it is not a
            # feature of the output.
            return
        elif hasattr(value, "__dict__") and not isinstance(value, nn.Module):
            for item in vars(value).values():
                visit(item)

    visit(output)
    return found


# --- propagation ----------------------------------------------------------------------------


class _Graph:
    """The state of one propagation: the slots and what each node's value carries."""

    def __init__(self, slots: Slots) -> None:
        self.slots = slots
        self.env: dict[fx.Node, Value] = {}
        self.unknown: Counter[str] = Counter()

    def value(self, arg: object) -> Value:
        if isinstance(arg, fx.Node):
            return self.env.get(arg)
        return None

    def act(self, arg: object, reason: str = "") -> Act | None:
        """The activation labels of ``arg`` (a tensor of the model used as an activation gets
        its one slotted dim as labels; with several, they are blocked)."""
        value = self.value(arg)
        if isinstance(value, Act):
            return value
        if isinstance(value, Par):
            return self.par_as_act(value, reason or "a model tensor used whole")
        return None

    def par_as_act(self, par: Par, reason: str) -> Act:
        slotted = [d for d, v in enumerate(par.dims) if v is not None]
        labels = torch.full([1] * len(par.shape), -1, dtype=torch.int64)
        if len(slotted) == 1:
            d = slotted[0]
            vector = par.dims[d]
            assert vector is not None
            shape = [1] * len(par.shape)
            shape[d] = par.shape[d]
            labels = vector.reshape(shape)
            self.slots.claim(vector)
        elif slotted:
            self.slots.block(par.dims, f"{reason} (several of its dims at once)")
        return Act(labels, par.shape)

    def carries_slots(self, node: fx.Node) -> bool:
        """Whether any tensor ``node`` reads has a slot."""
        for arg in _tensor_args(node):
            value = self.value(arg)
            if isinstance(value, Act) and _has_slots(value.labels):
                return True
            if isinstance(value, Par) and any(v is not None for v in value.dims):
                return True
        return False

    def block_inputs(self, node: fx.Node, reason: str) -> None:
        for arg in _tensor_args(node):
            value = self.value(arg)
            if isinstance(value, Act):
                self.slots.block(value.labels, reason)
            elif isinstance(value, Par):
                self.slots.block(value.dims, reason)


def _propagate(
    graphs: list[fx.Graph], by_leaf: list[tuple[str, Par]], slots: Slots, parameters: frozenset[str]
) -> ChannelGroups:
    state = _Graph(slots)
    unknown: Counter[str] = Counter()
    for graph in graphs:
        state.env = {}
        state.unknown = Counter()
        placeholders = [n for n in graph.nodes if n.op == "placeholder"]
        for i, node in enumerate(placeholders):
            if i < len(by_leaf):
                state.env[node] = by_leaf[i][1]
            else:
                state.env[node] = _unlabeled(node)  # the model's own inputs (and buffer copies)
        for node in graph.nodes:
            if node.op == "placeholder":
                continue
            if node.op == "get_attr":
                state.env[node] = _unlabeled(node)
            elif node.op == "call_function":
                state.env[node] = _apply_rule(state, node)
            elif node.op == "output":
                for arg in _tensor_args(node):
                    value = state.value(arg)
                    if isinstance(value, Act):
                        slots.block(value.labels, "it reaches the model's output")
                    elif isinstance(value, Par):
                        slots.block(value.dims, "it reaches the model's output")
        unknown |= state.unknown  # per operation, the most either mode ran
    return ChannelGroups(slots.groups(parameters), parameters, tuple(sorted(unknown.items())))


def _tensor_args(node: fx.Node) -> list[fx.Node]:
    found: list[fx.Node] = []
    for arg in pytree.tree_leaves((node.args, node.kwargs)):
        if isinstance(arg, fx.Node) and isinstance(arg.meta.get("val"), Tensor):
            found.append(arg)
    return found


def _shape(node: fx.Node) -> tuple[int, ...] | None:
    val = node.meta.get("val")
    return tuple(int(s) for s in val.shape) if isinstance(val, Tensor) else None


def _unlabeled(node: fx.Node) -> Value:
    val = node.meta.get("val")
    if isinstance(val, Tensor):
        return Act(torch.full([1] * val.dim(), -1, dtype=torch.int64), tuple(val.shape))
    if isinstance(val, (tuple, list)):
        return tuple(
            Act(torch.full([1] * v.dim(), -1, dtype=torch.int64), tuple(v.shape))
            if isinstance(v, Tensor)
            else None
            for v in val
        )
    return None


def _name(node: fx.Node) -> str:
    target = node.target
    packet = getattr(target, "_overloadpacket", None)
    if packet is not None:
        return str(packet.__name__)
    return getattr(target, "__name__", str(target))


def _apply_rule(state: _Graph, node: fx.Node) -> Value:
    if node.target is operator.getitem:
        source = state.value(node.args[0])
        index = node.args[1]
        if isinstance(source, tuple) and isinstance(index, int):
            return source[index]  # type: ignore[no-any-return]
        return _unlabeled(node)
    name = _name(node)
    tensor_args = _tensor_args(node)
    if not tensor_args:
        return _unlabeled(node)  # factories, constants, shape arithmetic
    rule = _RULES.get(name)
    carries = state.carries_slots(node)
    if rule is not None:
        try:
            result = rule(state, node)
        except (TypeError, ValueError, IndexError, RuntimeError, AssertionError):
            pass  # an overload the rule does not know (max(a, b), say): as an unknown operation
        else:
            if carries and name not in _CONSUMERS and not _value_has_slots(result):
                # Channels that leave a rule without labels could reach the output unseen:
                # whatever the rule did not block, this does.
                state.block_inputs(node, f"aten.{name} reads it, and its result has no channels")
            return result
    if carries:
        state.unknown[f"aten.{name}"] += 1
        state.block_inputs(node, f"aten.{name} reads it, which channel tracing does not follow")
    return _unlabeled(node)


# --- label helpers ----------------------------------------------------------------------------


def _value_has_slots(value: Value) -> bool:
    if isinstance(value, Act):
        return _has_slots(value.labels)
    if isinstance(value, Par):
        return any(v is not None for v in value.dims)
    if isinstance(value, tuple):
        return any(_value_has_slots(v) for v in value)
    return False


def _int(arg: object) -> int:
    """An int argument of a graph node (dims, groups, flags)."""
    if isinstance(arg, (int, bool, float)) or hasattr(arg, "__index__"):
        return int(arg)
    raise TypeError(f"expected an int argument, got {arg!r}")


def _collapse(labels: Tensor) -> Tensor:
    """The same labels with size 1 along every dim where they do not vary."""
    for d in range(labels.dim()):
        if labels.shape[d] > 1:
            first = labels.narrow(d, 0, 1)
            if bool((labels == first).all()):
                labels = first
    return labels.contiguous()


def _aligned(labels: Tensor, ndim: int) -> Tensor:
    return labels.reshape([1] * (ndim - labels.dim()) + list(labels.shape))


def _varying(labels: Tensor) -> frozenset[int]:
    return frozenset(d for d in range(labels.dim()) if labels.shape[d] > 1)


def _along(act: Act, dim: int) -> Tensor | None:
    """The labels along ``dim`` as a vector of the dim's size, or None where they also vary
    along another dim."""
    labels = _collapse(act.labels)
    if _varying(labels) - {dim}:
        return None
    if labels.numel() == 1:
        return labels.reshape(1).expand(act.shape[dim]).contiguous()
    return labels.reshape(-1)


def _has_slots(labels: Tensor) -> bool:
    return bool((labels >= 0).any())


def _unary(state: _Graph, node: fx.Node) -> Value:
    shape = _shape(node)
    source = state.act(node.args[0])
    if shape is None or source is None:
        return _unlabeled(node)
    return Act(_aligned(source.labels, len(shape)), shape)


def _elementwise(state: _Graph, node: fx.Node) -> Value:
    """Every element of the output is computed from the elements at its position: summands'
    and factors' channel k go together; a channel that meets a tensor without slots of the same
    size (the model's input, a constant) is blocked."""
    shape = _shape(node)
    if shape is None:
        return _unlabeled(node)
    nd = len(shape)
    parts = [
        (_collapse(_aligned(act.labels, nd)), (1,) * (nd - len(act.shape)) + act.shape)
        for arg in _tensor_args(node)
        if (act := state.act(arg, f"aten.{_name(node)}")) is not None
    ]
    return Act(_join(state, parts, shape, f"aten.{_name(node)}"), shape)


def _join(
    state: _Graph,
    parts: Sequence[tuple[Tensor, tuple[int, ...]]],
    shape: Sequence[int],
    reason: str,
) -> Tensor:
    """The labels of an output whose element at each position comes from the parts' elements
    at that position (broadcasting): their slots there go together."""
    nd = len(shape)
    labeled = [labels for labels, _ in parts if _has_slots(labels)]
    if not labeled:
        return torch.full([1] * nd, -1, dtype=torch.int64)
    varying = {_varying(labels) for labels in labeled if _varying(labels)}
    if len(varying) > 1:
        state.slots.block(labeled, f"{reason} combines channels along different dims")
        return labeled[0]
    dims = next(iter(varying), frozenset())
    label_shape = [shape[d] if d in dims else 1 for d in range(nd)]
    result = torch.full(label_shape, -1, dtype=torch.int64)
    unlabeled = torch.zeros(label_shape, dtype=torch.bool)
    for labels, value_shape in parts:
        takes_part = any(value_shape[d] == shape[d] for d in dims) if dims else _has_slots(labels)
        if not takes_part:
            continue
        expanded = labels.expand(label_shape)
        state.slots.union(result, expanded)
        unlabeled |= expanded < 0
        result = torch.where(result >= 0, result, expanded)
    clash = unlabeled & (result >= 0)
    if bool(clash.any()):
        state.slots.block(result[clash], f"{reason} combines it with a tensor that has no channels")
    return result


def _reshape(state: _Graph, node: fx.Node) -> Value:
    """A view: the labels follow the elements. Where a channel dim is split (a Linear's output
    into heads, a flat vector into feature maps), the outer of the new dims is the channel: the
    slots along the inner ones join it."""
    shape = _shape(node)
    value = state.value(node.args[0])
    if isinstance(value, Par):
        slotted = [v for v in value.dims if v is not None]
        if shape is not None and len(slotted) <= 1 and math.prod(shape) == math.prod(value.shape):
            value = state.par_as_act(value, "reshaped")
        else:
            state.slots.block(value.dims, f"aten.{_name(node)} reshapes it")
            return _unlabeled(node)
    if not isinstance(value, Act) or shape is None:
        return _unlabeled(node)
    if not _has_slots(value.labels):
        return Act(torch.full([1] * len(shape), -1, dtype=torch.int64), shape)
    before = _varying(_collapse(value.labels))
    labels = _collapse(value.labels.expand(value.shape).reshape(shape))
    after = sorted(_varying(labels))
    if len(after) > len(before):
        outer = after[0]
        for index in range(labels.shape[outer]):
            state.slots.join_all(labels.select(outer, index))
        for d in after[1:]:
            labels = labels.narrow(d, 0, 1)
    return Act(labels.contiguous(), shape)


def _permute(state: _Graph, node: fx.Node) -> Value:
    value = state.value(node.args[0])
    shape = _shape(node)
    name = _name(node)
    if value is None or shape is None:
        return _unlabeled(node)
    if not isinstance(value, (Act, Par)):
        return _unlabeled(node)
    ndim = len(value.shape)
    if name == "permute":
        dims = node.args[1]
        assert isinstance(dims, (list, tuple))
        order = [_int(d) % ndim for d in dims]
    else:
        order = list(range(ndim))
        if name == "t":
            a, b = (0, 1) if ndim == 2 else (0, 0)
        else:
            a, b = _int(node.args[1]) % ndim, _int(node.args[2]) % ndim
        order[a], order[b] = order[b], order[a]
    if isinstance(value, Par):
        return Par([value.dims[d] for d in order], shape)
    return Act(_aligned(value.labels, ndim).permute(order), shape)


def _unsqueeze(state: _Graph, node: fx.Node) -> Value:
    value = state.value(node.args[0])
    shape = _shape(node)
    if isinstance(value, Par) and shape is not None:
        dim = _int(node.args[1]) % len(shape)
        return Par([*value.dims[:dim], None, *value.dims[dim:]], shape)
    return _reshape(state, node)


def _index_along(state: _Graph, node: fx.Node) -> Value:
    """slice / select / narrow / split / chunk / unbind / index_select along ``dim``: code that
    indexes a channel dim with fixed numbers cannot lose channels, so labels varying along it
    are blocked (a slice that keeps the whole dim is a view)."""
    source = state.act(node.args[0], f"aten.{_name(node)}")
    if source is None:
        return _unlabeled(node)
    ndim = len(source.shape)
    name = _name(node)
    dim_arg = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else 0)
    if name in ("split", "split_with_sizes", "chunk", "tensor_split"):
        dim_arg = node.kwargs.get("dim", node.args[2] if len(node.args) > 2 else 0)
    if name == "index_select" and len(node.args) > 1:
        dim_arg = node.args[1]
    dim = _int(dim_arg) % max(ndim, 1)
    labels = _collapse(_aligned(source.labels, ndim))
    out = node.meta.get("val")
    out_shapes = (
        [tuple(v.shape) for v in out if isinstance(v, Tensor)]
        if isinstance(out, (tuple, list))
        else [tuple(out.shape)]
        if isinstance(out, Tensor)
        else []
    )
    # A slice that keeps the whole dim is a view; an index (index_select) may permute it.
    whole = len(out_shapes) == 1 and out_shapes[0] == source.shape and name != "index_select"
    if labels.shape[dim] > 1 and not whole:
        state.slots.block(labels, f"aten.{name} indexes its channel dim with fixed positions")
    results: list[Act] = []
    for out_shape in out_shapes:
        kept = labels.narrow(dim, 0, 1) if labels.shape[dim] > 1 and not whole else labels
        if len(out_shape) < ndim:  # select / unbind remove the dim
            kept = kept.squeeze(dim)
        results.append(Act(kept, out_shape))
    if isinstance(out, (tuple, list)):
        return tuple(results)
    return results[0] if results else _unlabeled(node)


def _cat(state: _Graph, node: fx.Node) -> Value:
    """cat along a channel dim puts the parts' channels one after the other (each consumer
    column goes with its part's channel); along another dim, channel k of every part is channel
    k of the output."""
    shape = _shape(node)
    tensors = node.args[0]
    if shape is None or not isinstance(tensors, (list, tuple)):
        return _unlabeled(node)
    nd = len(shape)
    dim_arg = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else 0)
    dim = _int(dim_arg) % nd
    # torch.cat skips 1-d empty tensors whatever the others' shape (a cache that starts empty).
    acts = [state.act(t, "aten.cat") for t in tensors]
    acts = [a for a in acts if a is None or a.shape != (0,) or nd == 1]
    parts = [a for a in acts if a is not None and len(a.shape) == nd]
    if len(parts) != len(acts):
        state.block_inputs(node, "aten.cat of tensors the tracer could not follow")
        return Act(torch.full([1] * nd, -1, dtype=torch.int64), shape)
    labels = [_collapse(_aligned(p.labels, nd)) for p in parts]
    if all(label.shape[dim] == 1 for label in labels):
        return _elementwise(state, node)
    if any(_varying(label) - {dim} for label in labels):
        state.slots.block(labels, "aten.cat along one dim of tensors with channels along another")
        return Act(torch.full([1] * nd, -1, dtype=torch.int64), shape)
    vectors = [
        label.reshape(-1).expand(p.shape[dim]) if label.numel() == 1 else label.reshape(-1)
        for label, p in zip(labels, parts, strict=True)
    ]
    out = [1] * nd
    out[dim] = shape[dim]
    return Act(torch.cat(vectors).reshape(out), shape)


def _reduce(state: _Graph, node: fx.Node) -> Value:
    """A reduction or normalization over dims: a channel dim among them is blocked (removing a
    channel changes what the others see); other dims go away with their labels."""
    source = state.act(node.args[0], f"aten.{_name(node)}")
    out = node.meta.get("val")
    if isinstance(out, (tuple, list)):  # max.dim, var_mean: (values, indices or means)
        results = [
            _reduce_to(state, node, source, tuple(v.shape)) for v in out if isinstance(v, Tensor)
        ]
        return tuple(results)
    shape = _shape(node)
    return _reduce_to(state, node, source, shape)


def _reduce_to(
    state: _Graph, node: fx.Node, source: Act | None, shape: tuple[int, ...] | None
) -> Value:
    if source is None or shape is None:
        return _unlabeled(node)
    ndim = len(source.shape)
    dims_arg = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else None)
    if dims_arg is None or dims_arg == []:
        dims = list(range(ndim))
    elif isinstance(dims_arg, (list, tuple)):
        dims = [int(d) % ndim for d in dims_arg]
    else:
        dims = [_int(dims_arg) % ndim]
    labels = _collapse(_aligned(source.labels, ndim))
    if any(labels.shape[d] > 1 for d in dims) or (
        _has_slots(labels) and all(source.shape[d] == 1 or d in dims for d in range(ndim))
    ):
        state.slots.block(labels, f"aten.{_name(node)} mixes its channels")
    reduced = _reduced(labels, dims)
    if len(shape) == ndim:  # keepdim
        return Act(reduced, shape)
    kept = [reduced.shape[d] for d in range(ndim) if d not in dims]
    if len(kept) != len(shape):
        return Act(torch.full([1] * len(shape), -1, dtype=torch.int64), shape)
    return Act(reduced.reshape(kept), shape)


def _reduced(labels: Tensor, dims: Sequence[int]) -> Tensor:
    for d in dims:
        labels = labels.narrow(d, 0, 1)
    return labels


def _softmax(state: _Graph, node: fx.Node) -> Value:
    source = state.act(node.args[0], f"aten.{_name(node)}")
    shape = _shape(node)
    if source is None or shape is None:
        return _unlabeled(node)
    ndim = len(shape)
    dim = _int(node.args[1]) % ndim
    labels = _collapse(_aligned(source.labels, ndim))
    if labels.shape[dim] > 1:
        state.slots.block(labels, f"aten.{_name(node)} normalizes over its channels")
    return Act(labels, shape)


def _per_channel_pool(state: _Graph, node: fx.Node) -> Value:
    """Pooling and resampling: per channel, the spatial dims change size."""
    source = state.act(node.args[0], f"aten.{_name(node)}")
    out = node.meta.get("val")
    shape = tuple(out[0].shape) if isinstance(out, (tuple, list)) else _shape(node)
    if source is None or shape is None:
        return _unlabeled(node)
    ndim = len(shape)
    labels = _collapse(_aligned(source.labels, ndim))
    # The op's last 1, 2 or 3 dims (its name says) are pooled; the channels are the dim before
    # them, dim 1 batched or dim 0 unbatched: channels anywhere else are pooled across.
    digits = [c for c in _name(node) if c.isdigit()]
    spatial = int(digits[0]) if digits else 2
    channel = ndim - spatial - 1
    if channel < 0 or _varying(labels) - {channel}:
        state.slots.block(labels, f"aten.{_name(node)} pools along its channels")
        labels = torch.full([1] * ndim, -1, dtype=torch.int64)
    result = Act(labels, shape)
    if isinstance(out, (tuple, list)):
        return (result, *(_unlabeled_of(v) for v in out[1:]))
    return result


def _unlabeled_of(val: object) -> Value:
    if isinstance(val, Tensor):
        return Act(torch.full([1] * val.dim(), -1, dtype=torch.int64), tuple(val.shape))
    return None


def _param_dim(state: _Graph, arg: object, dim: int) -> Tensor | None:
    value = state.value(arg)
    if isinstance(value, Par):
        vector = value.dims[dim] if dim < len(value.dims) else None
        if vector is not None:
            state.slots.claim(vector)
        return vector
    if isinstance(value, Act):
        state.slots.block(value.labels, "a computed weight")
    return None


def _join_input(state: _Graph, channels: Tensor | None, weight: Tensor | None, size: int) -> None:
    """The input's channel k goes with the weight's slot k; where the input has no slot (the
    model's input, say), the weight's slot is blocked."""
    if weight is None:
        if channels is not None:
            state.slots.block(channels, "read by a weight whose dim has no channels")
        return
    if channels is None:
        state.slots.block(weight, "the input it reads has no channels (the model's input)")
        return
    channels = channels.expand(size) if channels.numel() == 1 else channels
    state.slots.union(channels, weight)
    missing = channels < 0
    if bool(missing.any()):
        state.slots.block(weight[missing], "the input it reads has no channels (the model's input)")


def _out_labels(state: _Graph, vectors: Sequence[Tensor | None], size: int) -> Tensor:
    present = [v for v in vectors if v is not None]
    if not present:
        return torch.full([size], -1, dtype=torch.int64)
    for other in present[1:]:
        state.slots.union(present[0], other)
    return present[0]


def _channels_of(
    state: _Graph, arg: object, dim: int, what: str
) -> tuple[Act | None, Tensor | None]:
    act = state.act(arg, what)
    if act is None:
        return None, None
    nd = len(act.shape)
    vector = _along(Act(_aligned(act.labels, nd), act.shape), dim % nd)
    if vector is None:
        state.slots.block(act.labels, f"{what} reads channels spread over several dims")
        return act, None
    return act, vector if _has_slots(vector) else None


def _linear(state: _Graph, node: fx.Node) -> Value:
    shape = _shape(node)
    if shape is None:
        return _unlabeled(node)
    x, weight, bias = node.args[0], node.args[1], node.args[2] if len(node.args) > 2 else None
    _, channels = _channels_of(state, x, -1, "aten.linear")
    _join_input(state, channels, _param_dim(state, weight, 1), _in_size(node, -1))
    out = _out_labels(state, [_param_dim(state, weight, 0), _param_dim(state, bias, 0)], shape[-1])
    return Act(out.reshape([1] * (len(shape) - 1) + [shape[-1]]), shape)


def _in_size(node: fx.Node, dim: int) -> int:
    arg = node.args[0]
    assert isinstance(arg, fx.Node)
    shape = _shape(arg)
    assert shape is not None
    return shape[dim]


def _conv(state: _Graph, node: fx.Node) -> Value:
    shape = _shape(node)
    if shape is None:
        return _unlabeled(node)
    name = _name(node)
    args = list(node.args)
    x, weight = args[0], args[1]
    bias = args[2] if len(args) > 2 else None
    transposed = name.startswith("conv_transpose") or (
        name == "convolution" and len(args) > 6 and bool(args[6])
    )
    if name == "convolution":
        groups = _int(args[8]) if len(args) > 8 else 1
    elif name.startswith("conv_transpose"):
        groups = _int(args[6]) if len(args) > 6 else 1
    else:
        groups = _int(args[6]) if len(args) > 6 else 1
    # The channels are the dim before the kernel's spatial dims: 1 batched, 0 unbatched.
    weight_shape = _shape(weight) if isinstance(weight, fx.Node) else None
    spatial = len(weight_shape) - 2 if weight_shape is not None else len(shape) - 2
    channel = len(shape) - spatial - 1
    if channel not in (0, 1):
        raise ValueError(f"a {len(shape)}-d input for a {spatial}-d convolution")
    in_channels = _in_size(node, channel)
    out_channels = shape[channel]
    _, channels = _channels_of(state, x, channel, f"aten.{name}")
    w_in = _param_dim(state, weight, 0 if transposed else 1)
    w_out = _param_dim(state, weight, 1 if transposed else 0)
    b_out = _param_dim(state, bias, 0)
    if groups == 1:
        _join_input(state, channels, w_in, in_channels)
        out = _out_labels(state, [w_out, b_out], out_channels)
    elif not transposed and groups == in_channels:
        # Depthwise: output channel j reads input channel j // multiplier alone; input channel
        # k goes with its outputs (the weight's dim 1 has size 1: no slot).
        out = _out_labels(state, [w_out, b_out], out_channels)
        multiplier = out_channels // in_channels
        if channels is None:
            state.slots.block(out, "a depthwise conv over the model's input")
        else:
            state.slots.union(channels.repeat_interleave(multiplier), out)
            missing = channels.repeat_interleave(multiplier) < 0
            if bool(missing.any()):
                state.slots.block(out[missing], "a depthwise conv over the model's input")
    else:
        out = _out_labels(state, [w_out, b_out], out_channels)
        reason = f"a grouped conv ({groups} groups) fixes its channels per group"
        state.slots.block([channels, w_in, out], reason)
    return Act(out.reshape([1] * channel + [out_channels] + [1] * spatial), shape)


def _batch_norm(state: _Graph, node: fx.Node) -> Value:
    """BatchNorm and InstanceNorm normalize each channel by itself: its weight, bias and
    running statistics go with the channel."""
    out = node.meta.get("val")
    shape = tuple(out[0].shape) if isinstance(out, (tuple, list)) else _shape(node)
    if shape is None or len(shape) < 2:
        return _unlabeled(node)
    size = shape[1]
    _, channels = _channels_of(state, node.args[0], 1, f"aten.{_name(node)}")
    present = [v for v in (_param_dim(state, a, 0) for a in node.args[1:5]) if v is not None]
    if present:
        own = _out_labels(state, present, size)
        _join_input(state, channels, own, size)
        labels = own
    else:
        labels = channels if channels is not None else torch.full([size], -1, dtype=torch.int64)
    result = Act(labels.reshape([1, size] + [1] * (len(shape) - 2)), shape)
    if isinstance(out, (tuple, list)):
        return (result, *(_unlabeled_of(v) for v in out[1:]))
    return result


def _layer_norm(state: _Graph, node: fx.Node) -> Value:
    """LayerNorm, RMSNorm, GroupNorm: every channel of the normalized dims sees the others (a
    removed channel would change the mean and variance), so they are blocked."""
    out = node.meta.get("val")
    shape = tuple(out[0].shape) if isinstance(out, (tuple, list)) else _shape(node)
    if shape is None:
        return _unlabeled(node)
    name = _name(node)
    nd = len(shape)
    reason = f"aten.{name} normalizes over its channels"
    weights = [_param_dim(state, a, 0) for a in node.args[2:4] if isinstance(a, fx.Node)]
    state.slots.block(weights, reason)
    act = state.act(node.args[0], f"aten.{name}")
    channel = 1 if "group_norm" in name else nd - 1
    present = [w for w in weights if w is not None and len(w) == shape[channel]]
    if act is not None and present:
        _, channels = _channels_of(state, node.args[0], channel, f"aten.{name}")
        _join_input(state, channels, _out_labels(state, present, shape[channel]), shape[channel])
    labels = torch.full([1] * nd, -1, dtype=torch.int64)
    if act is not None:
        labels = _collapse(_aligned(act.labels, nd))
        if "group_norm" in name:
            normalized = set(range(1, nd))
        else:
            count = node.args[1]
            normalized = (
                set(range(nd - len(count), nd)) if isinstance(count, (list, tuple)) else {nd - 1}
            )
        if _varying(labels) & normalized or not _varying(labels):
            state.slots.block(labels, reason)
    result = Act(labels, shape)
    if isinstance(out, (tuple, list)):
        return (result, *(_unlabeled_of(v) for v in out[1:]))
    return result


def _embedding(state: _Graph, node: fx.Node) -> Value:
    shape = _shape(node)
    if shape is None:
        return _unlabeled(node)
    weight = node.args[0]
    rows = _param_dim(state, weight, 0)
    if rows is not None:
        state.slots.block(rows, "its rows are looked up by the model's input (a vocabulary)")
    out = _out_labels(state, [_param_dim(state, weight, 1)], shape[-1])
    return Act(out.reshape([1] * (len(shape) - 1) + [shape[-1]]), shape)


def _matmul(state: _Graph, node: fx.Node) -> Value:
    """matmul / mm / bmm: a weight of the model on either side is a Linear; between
    activations, batch dims go together and the contracted dim may not carry channels."""
    shape = _shape(node)
    if shape is None:
        return _unlabeled(node)
    first, second = state.value(node.args[0]), state.value(node.args[1])
    name = f"aten.{_name(node)}"
    if isinstance(second, Par) and len(second.shape) == 2 and isinstance(first, Act):
        _, channels = _channels_of(state, node.args[0], -1, name)
        _join_input(state, channels, _param_dim(state, node.args[1], 0), second.shape[0])
        out = _out_labels(state, [_param_dim(state, node.args[1], 1)], shape[-1])
        return Act(out.reshape([1] * (len(shape) - 1) + [shape[-1]]), shape)
    if isinstance(first, Par) and len(first.shape) == 2 and isinstance(second, Act):
        _, channels = _channels_of(state, node.args[1], -2, name)
        _join_input(state, channels, _param_dim(state, node.args[0], 1), first.shape[1])
        out = _out_labels(state, [_param_dim(state, node.args[0], 0)], shape[-2])
        return Act(out.reshape([1] * (len(shape) - 2) + [shape[-2], 1]), shape)
    a, b = state.act(node.args[0], name), state.act(node.args[1], name)
    if a is None or b is None or len(a.shape) < 2 or len(b.shape) < 2 or len(shape) < 2:
        state.block_inputs(node, f"{name} of tensors the tracer could not follow")
        return _unlabeled(node)
    return Act(_contract(state, shape, [a], b, name), shape)


def _contract(
    state: _Graph, shape: tuple[int, ...], rows: list[Act], values: Act, reason: str
) -> Tensor:
    """The labels of ``rows[0] @ ... @ values`` over batch dims (``q @ k^T @ v`` for
    attention): the batch dims go together (a key/value head with the query heads that share
    it), the contracted and row dims may not carry channels, the columns are ``values``'s."""
    nd = len(shape)
    rows_labels = [_collapse(_aligned(a.labels, nd)) for a in rows]
    value_labels = _collapse(_aligned(values.labels, nd))
    for labels in rows_labels:
        if labels.shape[-1] > 1 or labels.shape[-2] > 1:
            state.slots.block(labels, f"{reason} contracts over its channels")
    if value_labels.shape[-2] > 1:
        state.slots.block(value_labels, f"{reason} contracts over its channels")
    heads = shape[-3] if nd >= 3 else 1
    parts = []
    for labels, act in [*zip(rows_labels, rows, strict=True), (value_labels, values)]:
        batch = _reduced(labels, [nd - 2, nd - 1])
        value_shape = [*((1,) * (nd - len(act.shape)) + act.shape)[:-2], 1, 1]
        if nd >= 3 and 1 < value_shape[-3] < heads and heads % value_shape[-3] == 0:
            repeat = heads // value_shape[-3]  # grouped-query attention
            if batch.shape[-3] > 1:
                batch = batch.repeat_interleave(repeat, dim=nd - 3)
            value_shape[-3] = heads
        parts.append((batch, tuple(value_shape)))
    batch_shape = [*shape[:-2], 1, 1]
    try:
        result = _join(state, parts, batch_shape, reason)
    except RuntimeError:
        state.slots.block([p for p, _ in parts], f"{reason} over batch dims that do not align")
        result = torch.full([1] * nd, -1, dtype=torch.int64)
    columns = _reduced(value_labels, [nd - 2])
    if columns.shape[-1] > 1:
        if _has_slots(result):
            state.slots.block([result, columns], f"{reason} with channels on two dims")
        return _reduced(columns, list(range(nd - 2)))
    return result


def _addmm(state: _Graph, node: fx.Node) -> Value:
    """addmm(bias, x, weight): a Linear written out (transformers' Conv1D)."""
    shape = _shape(node)
    bias, first, second = (state.value(a) for a in node.args[:3])
    if shape is None or not isinstance(second, Par) or not isinstance(first, Act):
        state.block_inputs(node, "aten.addmm of tensors the tracer could not follow")
        return _unlabeled(node)
    _, channels = _channels_of(state, node.args[1], -1, "aten.addmm")
    _join_input(state, channels, _param_dim(state, node.args[2], 0), second.shape[0])
    vectors = [_param_dim(state, node.args[2], 1)]
    if isinstance(bias, Par) and len(bias.shape) == 1:
        vectors.append(_param_dim(state, node.args[0], 0))
    elif isinstance(bias, Act) and _has_slots(bias.labels):
        state.block_inputs(node, "aten.addmm with a computed bias")
    out = _out_labels(state, vectors, shape[-1])
    return Act(out.reshape([1] * (len(shape) - 1) + [shape[-1]]), shape)


def _attention(state: _Graph, node: fx.Node) -> Value:
    """scaled_dot_product_attention: q, k and v of a head go together (a key/value head with
    the query heads that share it); the head dim is contracted, so it stays whole."""
    out = node.meta.get("val")
    shape = tuple(out[0].shape) if isinstance(out, (tuple, list)) else _shape(node)
    if shape is None or len(shape) < 2:
        return _unlabeled(node)
    acts = [state.act(node.args[i], "attention") for i in range(3)]
    q, k, v = acts
    if q is None or k is None or v is None:
        state.block_inputs(node, "attention over tensors the tracer could not follow")
        return _unlabeled(node)
    mask = node.args[3] if len(node.args) > 3 else node.kwargs.get("attn_mask")
    if isinstance(mask, fx.Node):
        mask_act = state.act(mask)
        if mask_act is not None and _has_slots(mask_act.labels):
            state.slots.block(mask_act.labels, "used as an attention mask")
    result = Act(_contract(state, shape, [q, k], v, "attention"), shape)
    if isinstance(out, (tuple, list)):
        return (result, *(_unlabeled_of(x) for x in out[1:]))
    return result


def _expand(state: _Graph, node: fx.Node) -> Value:
    value = state.value(node.args[0])
    shape = _shape(node)
    if isinstance(value, Par):
        value = state.par_as_act(value, "expanded")
    if not isinstance(value, Act) or shape is None:
        return _unlabeled(node)
    return Act(_aligned(value.labels, len(shape)), shape)


_UNARY = [
    "relu",
    "relu_",
    "gelu",
    "gelu_",
    "silu",
    "silu_",
    "sigmoid",
    "sigmoid_",
    "tanh",
    "tanh_",
    "hardswish",
    "hardswish_",
    "hardsigmoid",
    "hardsigmoid_",
    "hardtanh",
    "hardtanh_",
    "relu6",
    "leaky_relu",
    "leaky_relu_",
    "elu",
    "elu_",
    "selu",
    "celu",
    "softplus",
    "mish",
    "mish_",
    "dropout",
    "dropout_",
    "feature_dropout",
    "alpha_dropout",
    "clone",
    "contiguous",
    "detach",
    "detach_",
    "alias",
    "lift_fresh_copy",
    "to",
    "_to_copy",
    "neg",
    "abs",
    "exp",
    "log",
    "log1p",
    "sqrt",
    "rsqrt",
    "square",
    "erf",
    "sin",
    "cos",
    "reciprocal",
    "sign",
    "clamp",
    "clamp_",
    "clamp_min",
    "clamp_max",
    "nan_to_num",
    "logical_not",
    "bitwise_not",
    "pow_",
    "native_dropout",
]
_ELEMENTWISE = [
    "add",
    "add_",
    "sub",
    "sub_",
    "mul",
    "mul_",
    "div",
    "div_",
    "rsub",
    "maximum",
    "minimum",
    "where",
    "masked_fill",
    "masked_fill_",
    "pow",
    "eq",
    "ne",
    "gt",
    "ge",
    "lt",
    "le",
    "addcmul",
    "addcdiv",
    "lerp",
    "logical_and",
    "logical_or",
    "fmod",
    "remainder",
    "floor_divide",
]
_RESHAPE = [
    "view",
    "reshape",
    "_unsafe_view",
    "flatten",
    "unflatten",
    "squeeze",
    "view_as",
    "reshape_as",
]
_INDEX = [
    "slice",
    "select",
    "narrow",
    "split",
    "split_with_sizes",
    "chunk",
    "unbind",
    "index_select",
    "tensor_split",
]
_REDUCE = [
    "mean",
    "sum",
    "amax",
    "amin",
    "max",
    "min",
    "var",
    "std",
    "var_mean",
    "std_mean",
    "norm",
    "logsumexp",
    "prod",
    "argmax",
    "argmin",
    "cumsum",
    "cumprod",
    "all",
    "any",
]
_POOL = [
    "max_pool1d",
    "max_pool2d",
    "max_pool3d",
    "avg_pool1d",
    "avg_pool2d",
    "avg_pool3d",
    "adaptive_avg_pool1d",
    "adaptive_avg_pool2d",
    "adaptive_avg_pool3d",
    "adaptive_max_pool1d",
    "adaptive_max_pool2d",
    "max_pool2d_with_indices",
    "upsample_nearest2d",
    "upsample_bilinear2d",
    "upsample_nearest1d",
    "upsample_linear1d",
    "upsample_bicubic2d",
    "upsample_nearest3d",
    "upsample_trilinear3d",
]

# Rules whose result may carry no channel although their inputs do: a weight reads the input's
# channels (each joined with the weight's own slots) into outputs of its own.
_CONSUMERS = frozenset(
    [
        "linear",
        "conv1d",
        "conv2d",
        "conv3d",
        "convolution",
        "conv_transpose1d",
        "conv_transpose2d",
        "conv_transpose3d",
        "addmm",
        "matmul",
        "mm",
        "bmm",
        "embedding",
        "scaled_dot_product_attention",
    ]
)

_RULES: dict[str, Callable[[_Graph, fx.Node], Value]] = {
    **dict.fromkeys(_UNARY, _unary),
    **dict.fromkeys(_ELEMENTWISE, _elementwise),
    **dict.fromkeys(_RESHAPE, _reshape),
    **dict.fromkeys(_INDEX, _index_along),
    **dict.fromkeys(_REDUCE, _reduce),
    **dict.fromkeys(_POOL, _per_channel_pool),
    "unsqueeze": _unsqueeze,
    "permute": _permute,
    "transpose": _permute,
    "t": _permute,
    "expand": _expand,
    "expand_as": _expand,
    "type_as": _unary,  # the second argument gives only a dtype
    "cat": _cat,
    "concat": _cat,
    "softmax": _softmax,
    "log_softmax": _softmax,
    "_softmax": _softmax,
    "linear": _linear,
    "conv1d": _conv,
    "conv2d": _conv,
    "conv3d": _conv,
    "convolution": _conv,
    "conv_transpose1d": _conv,
    "conv_transpose2d": _conv,
    "conv_transpose3d": _conv,
    "batch_norm": _batch_norm,
    "native_batch_norm": _batch_norm,
    "_native_batch_norm_legit": _batch_norm,
    "_native_batch_norm_legit_no_training": _batch_norm,
    "instance_norm": _batch_norm,
    "layer_norm": _layer_norm,
    "native_layer_norm": _layer_norm,
    "rms_norm": _layer_norm,
    "group_norm": _layer_norm,
    "native_group_norm": _layer_norm,
    "embedding": _embedding,
    "matmul": _matmul,
    "mm": _matmul,
    "bmm": _matmul,
    "addmm": _addmm,
    "scaled_dot_product_attention": _attention,
}
