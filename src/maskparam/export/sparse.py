"""``to_sparse``: give each weight of a plain (baked) model the fastest layout for its shape and
sparsity, so that a pruned model is smaller and faster, not only full of zeros.

Zeros do not make dense hardware faster: a dense matmul costs the same whatever the values. A
sparse layout skips the zeros, but pays per stored entry and for its irregular access, so
whether it wins depends on the sparsity, the shape and the batch: on this project's machine a
1024 x 1024 Linear at batch 64 ran 5.7x faster as CSR at 95% zeros and far slower at 50%. So
``layout="auto"`` times both layouts for each weight, at the caller's batch size, and keeps the
faster; below :data:`MIN_ZEROS` it keeps dense without timing.

A converted layer is a :class:`CSRLinear`. Its state_dict stores the CSR weight as three plain
tensors (``weight_crow_indices``, ``weight_col_indices``, ``weight_values``), so that formats
without sparse tensors (safetensors, ``save_pretrained``) can save it.
"""

from __future__ import annotations

import copy
import math
import statistics
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any, Literal, TypeVar

import torch
from torch import Tensor, nn

from maskparam.constraints.csr import (
    conv1d_class,
    csr_switch_problem,
    switch_to_csr,
    training_steps,
    trains_as_csr,
)
from maskparam.core.parametrize import maskparam_constraints, parametrized_names
from maskparam.errors import check_int, check_module, error

__all__ = [
    "MIN_ZEROS",
    "CSRLinear",
    "SparseChoice",
    "sparse_bytes",
    "to_sparse",
]

ModuleT = TypeVar("ModuleT", bound=nn.Module)
SparseLayout = Literal["auto", "csr", "dense"]

#: Below this fraction of zeros ``layout="auto"`` keeps a weight dense without timing it: a CSR
#: product then costs several times the dense one (6x at 50% on a 1024 x 1024 Linear, 1 thread).
MIN_ZEROS = 0.5

#: The state_dict keys of a :class:`CSRLinear`'s weight: ``weight_<part>`` for each part.
_PARTS = ("crow_indices", "col_indices", "values")

#: ``layout="auto"`` times a weight in at least :data:`_MIN_PAIRS` interleaved pairs, then in
#: rounds of :data:`_ROUNDS` more, up to :data:`_MAX_PAIRS`, while the outcome is within the noise.
_MIN_PAIRS = 18
_ROUNDS = 9
_MAX_PAIRS = 45
#: The z of :func:`_decide`'s two-sided 99.9% confidence bounds on the median speedup.
_Z = 3.29

#: The clock of the timings (a name of this module's, so that a test can stand in for it).
_clock = time.perf_counter


@dataclass(frozen=True)
class SparseChoice:
    """What :func:`to_sparse` chose for one Linear (or ``transformers`` Conv1D): its layout, its
    zeros, the timings (median ms per forward at the batch size; None where it did not time), and
    a ``note`` on what else the conversion changed (e.g. a ``TransformerEncoderLayer``'s fast path
    turned off)."""

    name: str
    layout: str
    zeros: float
    dense_ms: float | None
    sparse_ms: float | None
    note: str = ""


def to_sparse(
    model: ModuleT,
    *,
    batch_size: int = 64,
    layout: SparseLayout = "auto",
    min_speedup: float = 1.1,
) -> ModuleT:
    """Store each ``nn.Linear`` weight of a plain model in its fastest layout; in place, returns
    ``model``. For inference: the sparse weights do not train.

    On a model constrained by maskparam (not baked) it keeps the model trainable instead: each
    ``nn.Linear`` (or Conv1D) weight whose only constraint is a compact ``Mask`` switches to
    ``Mask(layout="csr")`` where a training step of the layer (forward and backward, at
    ``batch_size`` rows) is timed clearly faster as CSR, and stays compact elsewhere (below
    :data:`MIN_ZEROS` without timing); ``layout="csr"`` switches every such weight, ``"dense"``
    none. The stored entries, the state_dict and an optimizer's state stay the same objects
    (see ``docs/sparse-training.md``). Every other tensor stays as it is, listed with the
    reason in ``model.sparse_choices``.

    ``layout="auto"`` times the Linear's forward at ``batch_size`` rows with the weight dense and
    as CSR (32-bit indices where they fit), in interleaved pairs, and keeps CSR where it is
    clearly at least ``min_speedup`` times faster: where the median per-pair speedup is above
    ``min_speedup`` with 99.9% confidence. Where the timings cannot tell, it times more pairs
    (18 first, up to 45); a weight still within the noise of ``min_speedup`` keeps dense, so
    that the choice does not change from run to run. ``"csr"`` converts every Linear weight with
    zeros; ``"dense"`` converts nothing. What was chosen, and the timings, are in
    ``model.sparse_choices`` (a list of :class:`SparseChoice`).

    A converted Linear becomes a :class:`CSRLinear` (still an ``nn.Linear``): its forward
    computes ``W @ x.T`` with the CSR weight, which torch's sparse kernels run fast (``F.linear``
    with a CSR weight is not faster than dense). Its state_dict holds the CSR weight as three
    plain tensors, ``weight_crow_indices``, ``weight_col_indices`` and ``weight_values`` (readable
    with ``torch.load(weights_only=True)``, savable with safetensors); ``torch.export`` traces it.
    A ``transformers`` ``Conv1D`` (GPT-2's projections: weight ``(in, out)``, ``y = x @ W + b``)
    becomes a CSRLinear of the transposed weight. An ``nn.TransformerEncoderLayer`` whose
    ``linear1``/``linear2`` become CSR has its fused fast path turned off (that kernel reads the
    weights as dense tensors), as has the nested-tensor path of the ``nn.TransformerEncoder``
    holding it; their choices' ``note`` says so. On CUDA, an fp16/bf16 weight in the 2:4 pattern
    (``mp.masks.n_m(2, 4)``) is timed as ``torch.sparse.to_sparse_semi_structured`` instead
    (layout ``"2:4"``; untested here: this project's machines have no GPU).

    Only modules of exactly ``nn.Linear`` (and Conv1D) are converted: a subclass may read its
    weight elsewhere (``MultiheadAttention`` reads ``out_proj.weight`` directly). A Linear with a
    parametrization of the user's (e.g. ``orthogonal``) computes its weight in the forward: it
    stays as it is, listed as ``"dense (parametrized)"``.

    >>> import torch, maskparam as mp
    >>> layer = torch.nn.Linear(64, 64)
    >>> with torch.no_grad():
    ...     _ = layer.weight.mul_(torch.rand(64, 64) > 0.95)
    >>> expected = layer(torch.ones(2, 64))
    >>> _ = mp.to_sparse(layer, layout="csr")
    >>> layer.weight.layout, torch.allclose(layer(torch.ones(2, 64)), expected, atol=1e-6)
    (torch.sparse_csr, True)
    >>> sorted(layer.state_dict())
    ['bias', 'weight_col_indices', 'weight_crow_indices', 'weight_values']
    """
    check_module(model, "to_sparse")
    check_int(batch_size, "to_sparse", "batch_size")
    if batch_size < 1:
        raise error("to_sparse", f"batch_size={batch_size} must be >= 1.", fix="pass e.g. 64.")
    if layout not in ("auto", "csr", "dense"):
        raise error("to_sparse", f"unknown layout {layout!r}.", fix="use 'auto', 'csr' or 'dense'.")
    number = isinstance(min_speedup, (int, float)) and not isinstance(min_speedup, bool)  # type: ignore[redundant-expr]  # user input
    if not (number and math.isfinite(min_speedup) and min_speedup > 0):
        raise error(
            "to_sparse", f"min_speedup={min_speedup!r} must be a number > 0.", fix="pass e.g. 1.1."
        )
    meta = [name for name, p in model.named_parameters() if p.is_meta]
    if meta:
        raise error(
            f"to_sparse ({meta[0]!r})",
            "the model is on the meta device: its zeros, and its speed, are not known.",
            fix="load the weights (to_empty and load_state_dict) first.",
        )
    if any(
        maskparam_constraints(m, local) for m in model.modules() for local in parametrized_names(m)
    ):
        choices = _choose_trainable(model, batch_size, layout, min_speedup)
        object.__setattr__(model, "sparse_choices", choices)
        return model
    shared = _shared_weights(model)
    conv1d = conv1d_class()
    candidates: list[tuple[str, nn.Module]] = []
    choices = []
    for name, m in model.named_modules():
        if isinstance(m, CSRLinear):  # converted by an earlier call: it stays
            kept = m.weight.values().numel() / max(math.prod(m.weight.shape), 1)
            choices.append(SparseChoice(name, "csr", 1.0 - kept, None, None))
        elif type(m) is nn.Linear or (conv1d is not None and type(m) is conv1d):
            why = _kept_dense(m, shared)
            if why is None:
                candidates.append((name, m))
            else:
                choices.append(SparseChoice(name, f"dense ({why})", 0.0, None, None))
        elif parametrized_names(m) and isinstance(m, (nn.Linear, conv1d or nn.Linear)):
            # A parametrization of the user's computes the weight in the forward: left as it is.
            choices.append(SparseChoice(name, "dense (parametrized)", 0.0, None, None))
    with torch.no_grad():
        for name, module in candidates:
            weight = _linear_weight(module)
            zeros = float((weight == 0).sum()) / max(weight.numel(), 1)
            choice = _choose(name, module, weight, zeros, batch_size, layout, min_speedup)
            if choice.layout == "csr":
                _make_csr(module, weight)
            choices.append(choice)
    notes = _turn_off_fused_encoders(model)
    choices = [replace(c, note=notes[c.name]) if c.name in notes else c for c in choices]
    object.__setattr__(model, "sparse_choices", choices)
    return model


def _choose_trainable(
    model: nn.Module, batch_size: int, layout: SparseLayout, min_speedup: float
) -> list[SparseChoice]:
    """:func:`to_sparse` on a constrained model: each Linear (or Conv1D) weight masked in the
    compact layout as its only constraint switches to the CSR layout where a training step of
    the layer (forward and backward) is timed faster (``"auto"``), or always (``"csr"``). The
    stored entries, the state_dict and any optimizer's state stay what they are: the model
    trains on. Every other tensor stays as it is."""
    conv1d = conv1d_class()
    choices = []
    for name, module in model.named_modules():
        if not isinstance(module, (nn.Linear, conv1d or nn.Linear)):
            continue
        zeros = _zeros(module)
        if trains_as_csr(module):
            choices.append(SparseChoice(name, "csr", zeros, None, None))
            continue
        why = csr_switch_problem(module)
        if why is not None:
            choices.append(SparseChoice(name, f"dense ({why})", zeros, None, None))
            continue
        if layout == "dense" or (layout == "auto" and zeros < MIN_ZEROS):
            choices.append(SparseChoice(name, "compact", zeros, None, None))
            continue
        compact_ms = csr_ms = None
        if layout == "auto":
            # A step with gradients, on copies: also where the caller is in inference mode.
            with torch.inference_mode(False), torch.enable_grad():
                faster, compact_ms, csr_ms = _timed_choice(
                    *training_steps(module, batch_size), min_speedup
                )
            if not faster:
                choices.append(SparseChoice(name, "compact", zeros, compact_ms, csr_ms))
                continue
        switch_to_csr(module)
        choices.append(SparseChoice(name, "csr", zeros, compact_ms, csr_ms))
    return choices


def _zeros(module: nn.Module) -> float:
    with torch.no_grad():
        weight = module.weight
        assert isinstance(weight, Tensor)
        return float((weight == 0).sum()) / max(weight.numel(), 1)


def _linear_weight(module: nn.Module) -> Tensor:
    """The weight as an ``nn.Linear`` holds it, ``(out, in)``: a Conv1D's ``(in, out)``
    transposed."""
    weight = module.weight
    assert isinstance(weight, Tensor)
    return weight.detach() if isinstance(module, nn.Linear) else weight.detach().t()


def _turn_off_fused_encoders(model: nn.Module) -> dict[str, str]:
    """Turn off the fused fast path of each ``nn.TransformerEncoderLayer`` holding a CSRLinear
    (``torch._transformer_encoder_layer_fwd`` takes the weights as dense tensors, so every eval
    forward under no_grad would raise), and the nested-tensor path of each
    ``nn.TransformerEncoder`` holding such a layer (it converts its input for the fused layers).
    Returns a note per converted Linear's name."""
    notes: dict[str, str] = {}
    for name, m in model.named_modules():
        here = f"{name}." if name else ""
        if isinstance(m, nn.TransformerEncoder):
            if any(_has_csr(layer) for layer in m.layers):
                m.use_nested_tensor = False
        elif isinstance(m, nn.TransformerEncoderLayer) and _has_csr(m):
            m.activation_relu_or_gelu = 0  # the switch torch's forward reads for the fast path
            for local, child in m.named_modules():
                if isinstance(child, CSRLinear):
                    notes[here + local] = (
                        f"fast path of {name or type(m).__name__!r} turned off: torch's fused "
                        "encoder kernel takes dense weights"
                    )
    return notes


def _has_csr(module: nn.Module) -> bool:
    return any(isinstance(m, CSRLinear) for m in module.modules())


def _shared_weights(model: nn.Module) -> set[int]:
    """ids of tensors that more than one module slot holds (a tied embedding and output layer)."""
    seen: dict[int, int] = {}
    for module in model.modules():
        for tensor in [*module._parameters.values(), *module._buffers.values()]:
            if tensor is not None:
                seen[id(tensor)] = seen.get(id(tensor), 0) + 1
    return {key for key, count in seen.items() if count > 1}


def _kept_dense(module: nn.Module, shared: set[int]) -> str | None:
    """Why a Linear must keep its dense weight, or None."""
    if id(module.weight) in shared:
        return "tied to another module"  # the other one reads the dense tensor
    if module._forward_pre_hooks or module._forward_hooks:
        return "has forward hooks"  # e.g. the old weight_norm recomputes the weight in one
    weight = module.weight
    if not isinstance(weight, Tensor) or weight.dim() != 2 or not weight.is_floating_point():
        return "not a 2-D floating-point weight"
    return None


def _csr_supported(weight: Tensor) -> bool:
    """Whether torch multiplies a CSR tensor of ``weight``'s dtype on its device (elsewhere
    :class:`CSRLinear` computes in float32 and casts back)."""
    if weight.is_cuda:
        return weight.dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64)
    return weight.dtype in (torch.float32, torch.float64)


def _choose(
    name: str,
    module: nn.Module,
    weight: Tensor,
    zeros: float,
    batch_size: int,
    layout: SparseLayout,
    min_speedup: float,
) -> SparseChoice:
    if layout == "dense" or zeros == 0.0:
        return SparseChoice(name, "dense", zeros, None, None)
    if layout != "csr" and isinstance(module, nn.Linear) and _semi_structured_candidate(weight):
        return _choose_semi_structured(name, module, zeros, batch_size, min_speedup)
    if layout == "csr":
        return SparseChoice(name, "csr", zeros, None, None)
    if zeros < MIN_ZEROS:
        return SparseChoice(name, "dense", zeros, None, None)
    csr = _csr(weight)
    raw_bias = getattr(module, "bias", None)
    bias = raw_bias.detach() if isinstance(raw_bias, Tensor) else None
    out_features, in_features = weight.shape
    generator = torch.Generator(device=weight.device).manual_seed(0)  # the caller's RNG untouched
    x = torch.randn(
        batch_size, in_features, dtype=weight.dtype, device=weight.device, generator=generator
    )
    if isinstance(module, nn.Linear):
        dense: Callable[[], object] = lambda: torch.nn.functional.linear(x, weight, bias)
    else:
        dense = lambda: module(x)  # a Conv1D: its own forward
    faster, dense_ms, sparse_ms = _timed_choice(
        dense, lambda: _csr_linear(x, csr, bias, out_features), min_speedup
    )
    return SparseChoice(name, "csr" if faster else "dense", zeros, dense_ms, sparse_ms)


def _semi_structured_candidate(weight: Tensor) -> bool:
    """A CUDA fp16/bf16 weight whose every 4 consecutive entries along the last dim hold at most
    2 nonzeros: the 2:4 pattern ``torch.sparse.to_sparse_semi_structured`` accelerates (the
    pattern of ``mp.masks.n_m(2, 4)``)."""
    if not weight.is_cuda or weight.dtype not in (torch.float16, torch.bfloat16):
        return False
    if weight.dim() != 2 or weight.shape[-1] % 4:
        return False
    return bool(((weight.reshape(-1, 4) != 0).sum(dim=1) <= 2).all())


def _choose_semi_structured(
    name: str,
    linear: nn.Linear,
    zeros: float,
    batch_size: int,
    min_speedup: float,
) -> SparseChoice:
    """Time the 2:4 semi-structured weight against dense (CUDA only; untested on this project's
    CPU-only machines). Kept where clearly faster by ``min_speedup``; torch's own shape limits
    (e.g. a minimum size) keep a weight dense."""
    weight = linear.weight.detach()
    try:
        semi = torch.sparse.to_sparse_semi_structured(weight)
    except (RuntimeError, ValueError):
        return SparseChoice(name, "dense", zeros, None, None)
    bias = linear.bias.detach() if linear.bias is not None else None  # type: ignore[redundant-expr]
    generator = torch.Generator(device=weight.device).manual_seed(0)
    x = torch.randn(
        batch_size, linear.in_features, dtype=weight.dtype, device=weight.device,
        generator=generator,
    )  # fmt: skip

    def synchronized(run: Callable[[], object]) -> Callable[[], object]:
        def timed() -> object:
            out = run()
            torch.cuda.synchronize(weight.device)
            return out

        return timed

    faster, dense_ms, sparse_ms = _timed_choice(
        synchronized(lambda: torch.nn.functional.linear(x, weight, bias)),
        synchronized(lambda: torch.nn.functional.linear(x, semi, bias)),
        min_speedup,
    )
    if not faster:
        return SparseChoice(name, "dense", zeros, dense_ms, sparse_ms)
    linear.weight = nn.Parameter(semi, requires_grad=False)
    return SparseChoice(name, "2:4", zeros, dense_ms, sparse_ms)


def _timed_choice(
    dense: Callable[[], object], sparse: Callable[[], object], min_speedup: float
) -> tuple[bool, float, float]:
    """(whether ``sparse`` is clearly ``min_speedup`` times faster, dense and sparse median ms).

    The two run in interleaved pairs (a warm-up call of each first), so that a slow spell of the
    machine slows both alike, and each pair gives one speedup. :func:`_decide` reads them; where
    it cannot tell yet, more rounds are timed, up to :data:`_MAX_PAIRS` pairs."""
    dense()
    sparse()
    dense_times: list[float] = []
    sparse_times: list[float] = []
    while True:
        for _ in range(_MIN_PAIRS if not dense_times else _ROUNDS):
            for run, times in ((dense, dense_times), (sparse, sparse_times)):
                start = _clock()
                run()
                times.append(1e3 * (_clock() - start))
        decided = _decide(dense_times, sparse_times, min_speedup)
        if decided is not None or len(dense_times) >= _MAX_PAIRS:
            faster = bool(decided)  # still within the noise: dense, the same every run
            return faster, statistics.median(dense_times), statistics.median(sparse_times)


def _decide(dense_ms: list[float], sparse_ms: list[float], min_speedup: float) -> bool | None:
    """True where the median per-pair speedup is above ``min_speedup`` with 99.9% confidence,
    False where it is below it so, None where the timings cannot tell yet.

    The confidence bounds are order statistics of the speedups (distribution-free: a sign test
    of the median, z = 3.29), so that a run decides CSR for a weight at the margin about once in
    a thousand, and a few slow calls of a busy machine do not decide either way.

    >>> _decide([2.0, 2.1, 1.9, 2.0], [1.0, 1.0, 1.1, 0.9], 1.1)
    True
    >>> _decide([1.0, 1.2, 1.0, 1.2], [1.0, 1.0, 1.0, 1.0], 1.1) is None
    True
    """
    speedups = sorted(d / max(s, 1e-9) for d, s in zip(dense_ms, sparse_ms, strict=True))
    n = len(speedups)
    k = max(0, math.floor((n - _Z * math.sqrt(n)) / 2))
    if speedups[k] >= min_speedup:
        return True
    if speedups[n - 1 - k] < min_speedup:
        return False
    return None


def _csr(weight: Tensor) -> Tensor:
    """``weight`` as CSR, with 32-bit indices where they fit (half the bytes of torch's int64)."""
    with warnings.catch_warnings():
        # torch warns once that sparse CSR support is in beta; the layout is what is asked for.
        warnings.simplefilter("ignore", UserWarning)
        csr = weight.to_sparse_csr()
    crow, col = csr.crow_indices(), csr.col_indices()
    if max(crow.numel(), int(crow[-1]) if crow.numel() else 0, weight.shape[-1]) < 2**31:
        crow, col = crow.to(torch.int32), col.to(torch.int32)
    return _build_csr(crow, col, csr.values(), tuple(weight.shape))


def _build_csr(crow: Tensor, col: Tensor, values: Tensor, shape: tuple[int, ...]) -> Tensor:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # CSR is beta: the layout is what is asked
        return torch.sparse_csr_tensor(crow, col, values, shape, check_invariants=True)


def _csr_linear(x: Tensor, weight: Tensor, bias: Tensor | None, out_features: int) -> Tensor:
    """``x @ weight.T + bias`` with a CSR ``weight``: computed as ``weight @ x.T``, the product
    torch's CSR kernels run fast (CSR times a dense matrix), then transposed back. Where torch
    has no CSR kernel for the dtype (fp16/bf16 on the CPU) it computes in float32 and casts the
    result back."""
    dtype = weight.dtype
    if not _csr_supported(weight):
        weight = _build_csr(
            weight.crow_indices(), weight.col_indices(), weight.values().float(), weight.shape
        )
        x = x.float()
        bias = bias.float() if bias is not None else None
    rows = x.reshape(-1, x.shape[-1])
    if bias is None:
        out = torch.mm(weight, rows.t())
    else:
        out = torch.addmm(bias.unsqueeze(1), weight, rows.t())
    return out.t().reshape(*x.shape[:-1], out_features).to(dtype)


class CSRLinear(nn.Linear):
    """An ``nn.Linear`` whose weight is a CSR tensor: what :func:`to_sparse` turns a Linear into.

    A subclass, because ``nn.Linear``'s own forward (``F.linear``) multiplies by the CSR weight
    no faster than by a dense one; this forward computes ``W @ x.T``, which torch's CSR kernels
    run fast. Importable, so ``torch.save(model)`` works; ``isinstance(m, nn.Linear)`` holds.

    Any floating dtype: ``.half()``, ``.bfloat16()`` and ``.to(dtype)`` convert the values, and
    where torch has no CSR kernel for the dtype (fp16/bf16 on the CPU) the forward computes in
    float32 and returns the weight's dtype. Under ``torch.autocast`` it returns the autocast
    dtype, as ``nn.Linear`` does (computed in the weight's dtype, or float32 as above).

    Its state_dict holds the weight as three plain tensors, ``weight_crow_indices``,
    ``weight_col_indices`` and ``weight_values`` (safetensors and ``save_pretrained`` store no
    sparse tensor). Loading takes the checkpoint's structure, whatever its number of nonzeros,
    after checking it (and the bias) before anything of the layer changes; a state_dict of
    earlier versions (the CSR tensor under ``weight``) loads too.
    """

    def forward(self, input: Tensor) -> Tensor:
        weight = self.weight
        if weight.requires_grad:
            raise error(
                "CSRLinear",
                "its CSR weight is set to train, but a sparse weight is for inference: "
                "optimizers cannot step it.",
                fix="train the dense model (maskparam's Mask keeps the zeros), and call "
                "mp.to_sparse after baking; or weight.requires_grad_(False).",
            )
        if input.dim() == 0 or input.shape[-1] != self.in_features:
            # nn.Linear's words (its weight.T is in_features x out_features), not the transposed
            # product this layer computes.
            rows = input.numel() // input.shape[-1] if input.dim() and input.shape[-1] else 0
            got = f"{rows}x{input.shape[-1]}" if input.dim() else "a 0-d tensor"
            raise RuntimeError(
                f"mat1 and mat2 shapes cannot be multiplied ({got} and "
                f"{self.in_features}x{self.out_features})"
            )
        device = weight.device.type
        if torch.is_autocast_enabled(device):
            # autocast would cast the CSR weight to its lower precision, which the CPU kernels do
            # not take: compute in the weight's dtype, and give autocast's dtype, as nn.Linear.
            dtype = torch.get_autocast_dtype(device)
            with torch.autocast(device, enabled=False):
                x = input.to(weight.dtype) if input.is_floating_point() else input
                out = _csr_linear(x, weight, self.bias, self.out_features)
            return out.to(dtype)
        if input.dtype != weight.dtype:
            raise error(
                "CSRLinear",
                f"the input is {input.dtype}, the weight {weight.dtype}.",
                fix=f"pass a {weight.dtype} input, or convert the model with .to(dtype).",
            )
        return _csr_linear(input, weight, self.bias, self.out_features)

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> CSRLinear:
        # torch's own conversion of a CSR Parameter (.to(float64), .half()) relabels its dtype
        # but leaves the values as they were: convert the parts and build the tensor again.
        weight = self._parameters["weight"]
        assert weight is not None  # set by to_sparse
        self._parameters["weight"] = None
        try:
            super()._apply(fn, recurse)  # type: ignore[no-untyped-call]
        finally:
            self._parameters["weight"] = weight
        values = fn(weight.values())
        crow = fn(weight.crow_indices())
        col = fn(weight.col_indices())
        rebuilt = _build_csr(crow, col, values, tuple(weight.shape))
        self._parameters["weight"] = nn.Parameter(rebuilt, requires_grad=weight.requires_grad)
        return self

    def __deepcopy__(self, memo: dict[int, Any]) -> CSRLinear:
        # A Parameter's deepcopy clones its data with preserve_format, which a CSR tensor (no
        # strided storage) refuses: the copy gets a clone of its parts instead.
        weight = self.weight
        if id(weight) not in memo:
            copied = _build_csr(
                weight.crow_indices().clone(),
                weight.col_indices().clone(),
                weight.values().clone(),
                tuple(weight.shape),
            )
            memo[id(weight)] = nn.Parameter(copied, requires_grad=False)
        clone = type(self).__new__(type(self))
        memo[id(self)] = clone
        clone.__dict__.update({k: copy.deepcopy(v, memo) for k, v in self.__dict__.items()})
        return clone

    def _save_to_state_dict(
        self, destination: dict[str, Any], prefix: str, keep_vars: bool
    ) -> None:
        weight = self._parameters["weight"]
        assert weight is not None  # set by to_sparse
        stored = weight if keep_vars else weight.detach()
        parts = (stored.crow_indices(), stored.col_indices(), stored.values())
        for part, tensor in zip(_PARTS, parts, strict=True):
            destination[f"{prefix}weight_{part}"] = tensor
        self._parameters["weight"] = None  # the bias and any buffers, as torch saves them
        try:
            super()._save_to_state_dict(destination, prefix, keep_vars)
        finally:
            self._parameters["weight"] = weight

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        weight = self._parameters["weight"]
        assert weight is not None  # set by to_sparse
        keys = [f"{prefix}weight_{part}" for part in _PARTS]
        loaded = self._loaded_weight(state_dict, prefix)  # everything checked first
        if loaded is None and strict:  # as torch: missing keys are reported where strict
            missing_keys.extend(key for key in keys if key not in state_dict)
        # The bias, any buffers and the load pre-hooks, as torch runs them, from the checkpoint
        # without the weight's keys: the weight is loaded below, from what was checked above.
        rest = {k: v for k, v in state_dict.items() if k not in (*keys, prefix + "weight")}
        super()._load_from_state_dict(
            rest, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        while prefix + "weight" in missing_keys:
            missing_keys.remove(prefix + "weight")
        if loaded is None:
            return
        if _same_structure(weight, loaded):  # torch's way: copy into the tensor in place
            with torch.no_grad():
                weight.values().copy_(loaded.values())
        else:  # another number of nonzeros, or other positions: the checkpoint's structure
            self._parameters["weight"] = nn.Parameter(loaded, requires_grad=weight.requires_grad)

    def maskparam_check_state_dict(
        self, state_dict: Mapping[str, Any], prefix: str = ""
    ) -> set[str]:
        """Check what a load of ``state_dict`` would give this layer, changing nothing: raises a
        MaskparamError where its CSR weight or its bias does not fit. Returns the keys whose
        shapes come from the checkpoint (the parts as long as its number of nonzeros), which
        :func:`maskparam.load_state_dict` then does not compare with this layer's own. It calls
        this for every CSRLinear before anything is loaded."""
        self._loaded_weight(state_dict, prefix)
        return {f"{prefix}weight_col_indices", f"{prefix}weight_values"}

    def _loaded_weight(self, state_dict: Mapping[str, Any], prefix: str) -> Tensor | None:
        """The CSR weight that ``state_dict`` holds for this layer (None where it holds none),
        after checking it and the bias: raises before anything of the layer changes."""
        keys = [f"{prefix}weight_{part}" for part in _PARTS]
        loaded: Tensor | None = None
        if all(key in state_dict for key in keys):
            loaded = self._checked_weight(prefix, *(state_dict[key] for key in keys))
        elif prefix + "weight" in state_dict:  # a state_dict of maskparam 0.3 or before
            old = state_dict[prefix + "weight"]
            if not isinstance(old, Tensor) or old.layout != torch.sparse_csr:
                raise error(
                    f"CSRLinear ({prefix + 'weight'!r})",
                    "the checkpoint stores this weight dense, this model as CSR (mp.to_sparse); "
                    "nothing of the layer was loaded.",
                    fix="load the dense checkpoint into the model before mp.to_sparse, then "
                    "convert it.",
                )
            parts = (old.crow_indices(), old.col_indices(), old.values())
            loaded = self._checked_weight(prefix, *parts)
        bias = state_dict.get(prefix + "bias")
        own = self._parameters.get("bias")
        if own is not None and isinstance(bias, Tensor) and bias.shape != own.shape:
            raise error(
                f"CSRLinear ({prefix + 'bias'!r})",
                f"the checkpoint's bias has shape {tuple(bias.shape)}, this layer's "
                f"{tuple(own.shape)}; nothing of the layer was loaded.",
                fix="load a checkpoint of the same architecture.",
            )
        return loaded

    def _checked_weight(self, prefix: str, crow: Any, col: Any, values: Any) -> Tensor:
        """The CSR weight of the checkpoint's parts, on this weight's device and dtype, checked
        (shapes, index dtypes, invariants) before anything of the layer changes."""
        weight = self.weight
        problem = None
        tensors = [t for t in (crow, col, values) if isinstance(t, Tensor)]
        if len(tensors) != 3 or any(t.layout != torch.strided or t.dim() != 1 for t in tensors):
            problem = "its parts must be 1-D dense tensors"
        elif crow.dtype not in (torch.int32, torch.int64) or col.dtype != crow.dtype:
            problem = f"its indices must be int32 or int64 alike; got {crow.dtype}, {col.dtype}"
        elif not values.is_floating_point():
            problem = f"its values must be floating-point; got {values.dtype}"
        elif crow.numel() != self.out_features + 1:
            problem = (
                f"weight_crow_indices has {crow.numel()} entries, this layer's "
                f"{self.out_features} rows need {self.out_features + 1}"
            )
        elif col.numel() != values.numel():
            problem = f"{col.numel()} column indices for {values.numel()} values"
        if problem is None:
            try:
                return _build_csr(
                    crow.to(weight.device),
                    col.to(weight.device),
                    values.to(device=weight.device, dtype=weight.dtype),
                    tuple(weight.shape),
                )
            except RuntimeError as e:  # check_invariants: unsorted, out of range, ...
                problem = str(e).splitlines()[0]
        raise error(
            f"CSRLinear ({prefix + 'weight_values'!r})",
            f"the checkpoint's CSR weight does not fit this {tuple(weight.shape)} layer: "
            f"{problem}; nothing of the layer was loaded.",
            fix="load a state_dict saved from a CSRLinear of the same shape (mp.to_sparse).",
        )


def _same_structure(weight: Tensor, loaded: Tensor) -> bool:
    return (
        weight.values().numel() == loaded.values().numel()
        and weight.crow_indices().dtype == loaded.crow_indices().dtype
        and torch.equal(weight.crow_indices(), loaded.crow_indices())
        and torch.equal(weight.col_indices(), loaded.col_indices())
    )


def _make_csr(module: nn.Module, weight: Tensor) -> None:
    """Make ``module`` (a Linear, or a Conv1D with ``weight`` its transposed weight) a
    CSRLinear in place: its parent, and anyone holding it, keep the same object."""
    out_features, in_features = weight.shape
    csr = nn.Parameter(_csr(weight), requires_grad=False)
    if not isinstance(module, nn.Linear):  # a Conv1D: nf and its weight's layout go
        del module.weight
        vars(module).pop("nf", None)
    module.weight = csr
    vars(module).update(in_features=in_features, out_features=out_features)
    bias = module._parameters.get("bias")
    if bias is not None:
        bias.requires_grad_(False)
    module.__class__ = CSRLinear


def sparse_bytes(tensor: Tensor) -> int:
    """Bytes of ``tensor``'s data: values and indices for a sparse CSR tensor."""
    if tensor.layout == torch.sparse_csr:
        parts = (tensor.values(), tensor.crow_indices(), tensor.col_indices())
        return sum(p.numel() * p.element_size() for p in parts)
    return math.prod(tensor.shape) * tensor.element_size()
