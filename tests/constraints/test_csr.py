"""``Mask(layout="csr")``: a Linear (or Conv1D) weight trained as a CSR matrix.

The promise: the module's forward and backward never build the dense weight; the gradients are
the masked dense ones (to float rounding: the sum runs in another order); a masked entry does not
exist, so it is exactly zero whatever the optimizer; everything else (checkpoints, updates,
baking, copies) is the compact layout's, whose keys and stored order it shares.
"""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import assert_same_bits, mlp, state_bits
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

import maskparam as mp
from maskparam.constraints.csr import CSRConstraint

OPTIMIZERS = {
    "sgd-momentum": lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9, weight_decay=0.01),
    "adam": lambda ps: torch.optim.Adam(ps, lr=0.01),
    "adamw": lambda ps: torch.optim.AdamW(ps, lr=0.01, weight_decay=0.1),
    "adagrad": lambda ps: torch.optim.Adagrad(ps, lr=0.05),
    "rmsprop": lambda ps: torch.optim.RMSprop(ps, lr=0.01),
}


def _masks(model: nn.Module, density: float, seed: int = 0) -> dict[str, Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {
        name: torch.rand(p.shape, generator=generator) < density
        for name, p in model.named_parameters()
        if name.endswith("weight")
    }


def _pair(
    density: float = 0.2, dtype: torch.dtype = torch.float64, seed: int = 0
) -> tuple[nn.Module, nn.Module]:
    """The same MLP masked with the same masks, compact and CSR."""
    model = mlp(12, 20, 7, activation=nn.ReLU, dtype=dtype, seed=seed)
    masks = _masks(model, density, seed)
    compact = mp.apply_mask(
        copy.deepcopy(model), {n: mp.Mask(m, layout="compact") for n, m in masks.items()}
    )
    csr = mp.apply_mask(model, {n: mp.Mask(m, layout="csr") for n, m in masks.items()})
    return compact, csr


def _dense_reads(model: nn.Module) -> list[str]:
    """Counts each evaluation of a CSR weight's dense tensor (the parametrization's forward)."""
    reads: list[str] = []
    for name, module in model.named_modules():
        if isinstance(module, CSRConstraint):
            module.register_forward_hook(lambda *_, n=name: reads.append(n))
    return reads


@pytest.mark.parametrize("shape", [(5, 12), (2, 3, 12), (12,)])
@pytest.mark.parametrize("bias", [True, False])
def test_csr_gradients_equal_the_masked_dense_ones(shape, bias):
    """Output and gradients (input, kept entries, bias) equal the compact layout's, which computes
    with the dense masked weight, to float64 rounding; any leading shape, with or without bias."""
    torch.manual_seed(0)
    layer = nn.Linear(12, 9, bias=bias).double()
    mask = torch.rand(9, 12) < 0.3
    dense = mp.apply_mask(copy.deepcopy(layer), {"weight": mp.Mask(mask, layout="compact")})
    csr = mp.apply_mask(layer, {"weight": mp.Mask(mask, layout="csr")})
    x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    y_dense, y_csr = dense(x), csr(x)
    torch.testing.assert_close(y_csr, y_dense, rtol=1e-12, atol=1e-12)
    grad = torch.randn_like(y_dense)
    wrt = [x, *csr.parameters()]
    got = torch.autograd.grad(y_csr, wrt, grad)
    expected = torch.autograd.grad(y_dense, [x, *dense.parameters()], grad)
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-12, atol=1e-12)


def test_csr_linear_passes_gradcheck():
    torch.manual_seed(0)
    layer = mp.apply_mask(
        nn.Linear(6, 5).double(), {"weight": mp.Mask(torch.rand(5, 6) < 0.5, layout="csr")}
    )
    stored = layer.parametrizations.weight.original
    x = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)

    def run(x, values, bias):
        state = {"parametrizations.weight.original": values, "bias": bias}
        return torch.func.functional_call(layer, state, (x,))

    values = stored.detach().clone().requires_grad_()
    bias = layer.bias.detach().clone().requires_grad_()
    assert torch.autograd.gradcheck(run, (x, values, bias))


def test_training_never_builds_the_dense_weight():
    """Forward, backward and the optimizer step of a CSR-masked model: the parametrization's
    dense forward never runs (only a read of module.weight runs it)."""
    _, model = _pair()
    reads = _dense_reads(model)
    optimizer = torch.optim.AdamW(model.parameters())
    x = torch.randn(8, 12, dtype=torch.float64)
    for _ in range(3):
        optimizer.zero_grad()
        model(x).pow(2).mean().backward()
        optimizer.step()
    with torch.no_grad():
        model(x)
    with torch.inference_mode():
        model(x)
    assert reads == []
    model[0].weight  # noqa: B018  # a read of the attribute is the dense tensor
    assert reads == ["0.parametrizations.weight.0"]


@pytest.mark.parametrize("optimizer", sorted(OPTIMIZERS))
def test_csr_trains_like_compact_and_masked_entries_stay_exactly_zero(optimizer):
    """Every optimizer: the CSR model's effective weights follow the compact model's (float64,
    to rounding) and its masked entries are exactly zero (they do not exist); mp.verify agrees."""
    compact, csr = _pair()
    runs = [(m, OPTIMIZERS[optimizer](list(m.parameters()))) for m in (compact, csr)]
    x = torch.randn(16, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    for _ in range(6):
        for model, opt in runs:
            opt.zero_grad()
            model(x).pow(2).mean().backward()
            opt.step()
    for a, b in zip(compact.modules(), csr.modules(), strict=True):
        if isinstance(a, nn.Linear):
            torch.testing.assert_close(b.weight, a.weight, rtol=1e-10, atol=1e-12)
            mask = b.parametrizations.weight[0].free.bool()
            assert torch.equal(b.weight[~mask], torch.zeros_like(b.weight[~mask]))
    mp.verify(csr)


def test_csr_state_dict_is_the_compact_layouts_both_ways():
    """The same keys and values as compact: a CSR checkpoint loads into a compact model (and the
    other way) and the outputs agree; a dense-layout checkpoint loads into a CSR model, which
    stays CSR."""
    compact, csr = _pair()
    assert {k: v.shape for k, v in compact.state_dict().items()} == {
        k: v.shape for k, v in csr.state_dict().items()
    }
    other_compact, other_csr = _pair(seed=3)
    other_compact.load_state_dict(csr.state_dict())
    other_csr.load_state_dict(compact.state_dict())
    x = torch.randn(4, 12, dtype=torch.float64)
    torch.testing.assert_close(other_csr(x), compact(x))
    torch.testing.assert_close(other_compact(x), csr(x))
    model = mlp(12, 20, 7, activation=nn.ReLU, dtype=torch.float64, seed=0)
    masks = _masks(model, 0.2)
    dense = mp.apply_mask(model, {n: mp.Mask(m, layout="dense") for n, m in masks.items()})
    for load in (nn.Module.load_state_dict, mp.load_state_dict):
        _, fresh = _pair(seed=4)
        load(fresh, dense.state_dict())
        assert isinstance(fresh[0].parametrizations.weight[0], CSRConstraint)
        torch.testing.assert_close(fresh(x), dense(x))


def test_csr_trainable_state_dict_round_trips():
    _, csr = _pair()
    saved = mp.trainable_state_dict(csr)
    _, fresh = _pair()
    with torch.no_grad():
        for p in fresh.parameters():
            p.zero_()
    mp.load_trainable_state_dict(fresh, saved)
    x = torch.randn(4, 12, dtype=torch.float64)
    assert torch.equal(fresh(x), csr(x))


def test_update_masks_rebuilds_the_structure():
    """A new mask (update_masks, with the optimizer) changes the CSR structure: outputs and a
    further step follow the compact model's, which took the same mask."""
    compact, csr = _pair()
    runs = [(m, torch.optim.Adam(m.parameters(), lr=0.01)) for m in (compact, csr)]
    x = torch.randn(8, 12, dtype=torch.float64)
    for model, opt in runs:
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        opt.step()
    new = _masks(compact, 0.4, seed=7)
    for model, opt in runs:
        mp.update_masks(model, dict(new), optimizer=opt)
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        opt.step()
    torch.testing.assert_close(csr(x), compact(x), rtol=1e-10, atol=1e-12)
    for module in csr.modules():
        if isinstance(module, nn.Linear):
            assert module.parametrizations.weight[0].describe().endswith(", csr)")


def test_gradual_pruning_with_the_csr_layout():
    """GradualPruning(layout="csr"): the structure follows every update, the outputs follow the
    compact layout's run, and the final density is the schedule's."""
    x = torch.randn(8, 12, dtype=torch.float64)
    runs = []
    for layout in ("compact", "csr"):
        model = mlp(12, 20, 7, activation=nn.ReLU, dtype=torch.float64, seed=0)
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        schedule = mp.GradualPruning(
            model,
            {"*.weight": mp.masks.global_magnitude},
            sparsity=0.9,
            end=4,
            layout=layout,
            optimizer=opt,
        )
        for _ in range(5):
            opt.zero_grad()
            model(x).pow(2).mean().backward()
            opt.step()
            schedule.step()
        runs.append(model)
    compact, csr = runs
    assert isinstance(csr[0].parametrizations.weight[0], CSRConstraint)
    torch.testing.assert_close(csr(x), compact(x), rtol=1e-10, atol=1e-12)
    kept = sum(int(m.parametrizations.weight[0].free.sum()) for m in csr[::2])
    assert kept == round(0.1 * (12 * 20 + 20 * 7))


def test_bake_gives_back_a_plain_linear_with_the_effective_weight():
    _, csr = _pair()
    effective = [m.weight.detach().clone() for m in csr if isinstance(m, nn.Linear)]
    mp.remove_parametrizations(csr)
    assert [type(m) for m in csr] == [nn.Linear, nn.ReLU, nn.Linear]
    assert all(torch.equal(m.weight, e) for m, e in zip(csr[::2], effective, strict=True))


def test_deepcopy_and_moves_rebuild_the_structure():
    """A deep copy trains on its own; .float() (a new stored tensor) computes in float32 with
    a structure of its own."""
    _, csr = _pair()
    x = torch.randn(3, 12, dtype=torch.float64)
    twin = copy.deepcopy(csr)
    assert torch.equal(twin(x), csr(x))
    with torch.no_grad():
        twin[0].parametrizations.weight.original.add_(1.0)
    assert not torch.equal(twin(x), csr(x))
    single = copy.deepcopy(csr).float()
    torch.testing.assert_close(single(x.float()), csr(x).float(), rtol=1e-5, atol=1e-5)
    averaged = torch.optim.swa_utils.AveragedModel(csr)
    averaged.update_parameters(csr)
    torch.testing.assert_close(averaged(x), csr(x))


def test_paths_the_sparse_product_cannot_take_compute_densely_from_the_same_entries():
    """Autocast (bfloat16 on CPU) and a float32 model given a float64 input behave as a plain
    masked Linear does: autocast's result, torch's dtype error."""
    compact, csr = _pair(dtype=torch.float32)
    x = torch.randn(4, 12)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, expected = csr(x), compact(x)
    assert got.dtype == expected.dtype == torch.bfloat16
    torch.testing.assert_close(got, expected)
    with pytest.raises(RuntimeError, match="dtype"):
        csr(x.double())
    with pytest.raises(RuntimeError, match="cannot be multiplied"):
        csr(torch.randn(4, 11))


def test_compile_gives_the_eager_result():
    """torch.compile of a CSR model: the same outputs and gradients as eager (dynamo runs the
    sparse product outside its graph where it cannot trace it)."""
    _, csr = _pair(dtype=torch.float32)
    x = torch.randn(4, 12)
    compiled = torch.compile(csr, backend="eager")
    got, expected = compiled(x), csr(x)
    torch.testing.assert_close(got, expected)
    grads = torch.autograd.grad(got.sum(), list(csr.parameters()))
    for g, e in zip(
        grads, torch.autograd.grad(expected.sum(), list(csr.parameters())), strict=True
    ):
        torch.testing.assert_close(g, e)


def test_conv1d_weights_train_as_csr():
    """transformers' Conv1D (GPT-2's projections, weight (in, out)): the same outputs and
    gradients as the compact layout."""
    pytorch_utils = pytest.importorskip("transformers.pytorch_utils")
    torch.manual_seed(0)
    layer = pytorch_utils.Conv1D(9, 12).double()  # nf=9 outputs, nx=12 inputs
    mask = torch.rand(12, 9) < 0.3
    dense = mp.apply_mask(copy.deepcopy(layer), {"weight": mp.Mask(mask, layout="compact")})
    csr = mp.apply_mask(layer, {"weight": mp.Mask(mask, layout="csr")})
    x = torch.randn(2, 5, 12, dtype=torch.float64, requires_grad=True)
    y_dense, y_csr = dense(x), csr(x)
    torch.testing.assert_close(y_csr, y_dense, rtol=1e-12, atol=1e-12)
    got = torch.autograd.grad(y_csr.sum(), [x, *csr.parameters()])
    expected = torch.autograd.grad(y_dense.sum(), [x, *dense.parameters()])
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    ("make", "rules", "message"),
    [
        (
            lambda: nn.Conv2d(3, 4, 3),
            {"weight": mp.Mask(mp.masks.random(0.5), layout="csr")},
            "Conv2d",
        ),
        (lambda: nn.Linear(4, 3), {"bias": mp.Mask(mp.masks.random(0.5), layout="csr")}, "bias"),
        (
            lambda: nn.Linear(4, 3),
            {"weight": [mp.Mask(mp.masks.random(0.5), layout="csr"), mp.Triangular()]},
            "only constraint",
        ),
        (
            lambda: nn.Linear(4, 3).half(),
            {"weight": mp.Mask(mp.masks.random(0.5), layout="csr")},
            "no CSR kernel",
        ),
        (
            lambda: nn.MultiheadAttention(4, 2).out_proj,
            {"weight": mp.Mask(mp.masks.random(0.5), layout="csr")},
            "NonDynamicallyQuantizableLinear",
        ),
        (
            lambda: nn.Linear(4, 3, device="meta"),
            {"weight": mp.Mask(torch.ones(3, 4, dtype=torch.bool), layout="csr")},
            "meta",
        ),
    ],
)
def test_csr_is_refused_where_it_cannot_compute(make, rules, message):
    module = make()
    before = state_bits(module) if not next(module.parameters()).is_meta else None
    with pytest.raises(mp.MaskparamError, match=message):
        mp.apply_mask(module, rules)
    assert not hasattr(module, "parametrizations")
    if before is not None:
        assert_same_bits(module, before)


def test_csr_is_a_masks_layout_only():
    with pytest.raises(mp.MaskparamError, match="Mask's only"):
        mp.Freeze(torch.ones(2, 2, dtype=torch.bool), layout="csr")


def test_a_tied_weight_is_refused_as_csr():
    first = nn.Linear(4, 4)
    model = nn.Sequential(first, nn.Linear(4, 4))
    model[1].weight = first.weight
    with pytest.raises(mp.MaskparamError, match="tied"):
        mp.apply_mask(model, {"0.weight": mp.Mask(mp.masks.random(0.5), layout="csr")})


@pytest.mark.parametrize("seed", range(6))
def test_float32_training_stays_finite_and_follows_compact(seed):
    """The weight gradient is computed at the kept entries of a zero pattern: 20 Adam steps in
    float32 stay finite and near the compact run (a pattern of uninitialised memory gave NaN)."""
    compact, csr = _pair(density=0.2, dtype=torch.float32, seed=seed)
    x = torch.randn(32, 12, generator=torch.Generator().manual_seed(seed))
    for model in (compact, csr):
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        for _ in range(20):
            opt.zero_grad()
            model(x).pow(2).mean().backward()
            opt.step()
    for a, b in zip(compact.parameters(), csr.parameters(), strict=True):
        assert torch.isfinite(b).all()
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)


def test_stored_entries_that_do_not_fit_the_mask_are_refused():
    """A mask loaded without its entries (strict=False), or other entries through
    functional_call: a MaskparamError, never a read past the stored values."""
    layer = mp.apply_mask(
        nn.Linear(6, 4), {"weight": mp.Mask(torch.eye(4, 6, dtype=torch.bool), layout="csr")}
    )
    x = torch.randn(2, 6)
    for entries in (torch.ones(2), torch.ones(14)):
        state = {"parametrizations.weight.original": entries}
        with pytest.raises(mp.MaskparamError, match="do not fit"):
            torch.func.functional_call(layer, state, (x,))
    layer.load_state_dict(
        {"parametrizations.weight.0.free": torch.ones(4, 6, dtype=torch.uint8)}, strict=False
    )
    with pytest.raises(mp.MaskparamError, match="do not fit"):
        layer(x)


def test_outputs_are_contiguous_as_a_linears():
    _, csr = _pair()
    for shape in [(5, 12), (2, 3, 12)]:
        y = csr[0](torch.randn(*shape, dtype=torch.float64))
        assert y.is_contiguous()
        y.view(-1)


def test_a_second_derivative_is_refused_by_name():
    _, csr = _pair()
    x = torch.randn(4, 12, dtype=torch.float64, requires_grad=True)
    torch.autograd.grad(csr(x).sum(), x)  # first derivatives: computed
    with pytest.raises(mp.MaskparamError, match="first derivatives only"):
        torch.autograd.grad(csr(x).sum(), x, create_graph=True)


@pytest.mark.filterwarnings("ignore:`torch.jit.[a-z_]+` is deprecated:DeprecationWarning")
@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
def test_transforms_compute_densely_with_the_same_entries():
    """Forward-mode AD, torch.func (vmap, jacrev, grad of functional_call), torch.jit.trace and
    torch.export run through the dense path: the compact layout's results."""
    compact, csr = _pair()
    x = torch.randn(3, 12, dtype=torch.float64)
    tangent = torch.randn_like(x)
    with torch.autograd.forward_ad.dual_level():
        outputs = [
            torch.autograd.forward_ad.unpack_dual(
                m(torch.autograd.forward_ad.make_dual(x, tangent))
            )
            for m in (compact, csr)
        ]
    torch.testing.assert_close(outputs[1].tangent, outputs[0].tangent)
    torch.testing.assert_close(
        torch.func.vmap(csr)(x[:, None]), torch.func.vmap(compact)(x[:, None])
    )
    torch.testing.assert_close(torch.func.jacrev(csr)(x[0]), torch.func.jacrev(compact)(x[0]))
    params = {n: p.detach() for n, p in csr.named_parameters()}

    def loss(p, model):
        return torch.func.functional_call(model, p, (x,)).sum()

    got = torch.func.grad(loss)(params, csr)
    expected = torch.func.grad(loss)(
        {n: p.detach() for n, p in compact.named_parameters()}, compact
    )
    for name in got:
        torch.testing.assert_close(got[name], expected[name])
    traced = torch.jit.trace(csr, (x,), check_trace=False)
    torch.testing.assert_close(traced(x), compact(x))
    exported = torch.export.export(csr, (x,))
    torch.testing.assert_close(exported.module()(x), compact(x))


@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors is a no-op")
def test_empty_shapes_and_keyword_calls_behave_as_the_module_does():
    layer = nn.Linear(0, 4)
    mp.apply_mask(layer, {"weight": mp.Mask(torch.ones(4, 0, dtype=torch.bool), layout="csr")})
    assert torch.equal(layer(torch.randn(3, 0)), layer.bias.expand(3, 4))
    pytorch_utils = pytest.importorskip("transformers.pytorch_utils")
    conv = pytorch_utils.Conv1D(4, 6)
    mp.apply_mask(conv, {"weight": mp.Mask(mp.masks.random(0.5), layout="csr")})
    x = torch.randn(2, 6)
    assert torch.equal(conv(x=x), conv(x))


def test_a_loaded_mask_keeps_the_csr_label():
    _, csr = _pair()
    _, other = _pair(density=0.5, seed=2)
    other.load_state_dict(csr.state_dict())
    assert mp.summary(other).tensors[0].constraint.endswith(", csr)")


_TEMPLATE = mlp(12, 20, 7, seed=0)  # the tensor names and shapes masks are drawn for


class _Run:
    """One model through a sequence of operations, in one layout (float64)."""

    def __init__(self, layout: str, masks: dict[str, Tensor]) -> None:
        self.layout = layout
        self.model = self._build(0, masks)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=0.01, weight_decay=0.1)

    def _build(self, seed: int, masks: dict[str, Tensor]) -> nn.Module:
        model = mlp(12, 20, 7, activation=nn.ReLU, dtype=torch.float64, seed=seed)
        return mp.apply_mask(model, {n: mp.Mask(m, layout=self.layout) for n, m in masks.items()})

    def run(self, operation: tuple, x: Tensor) -> None:
        kind = operation[0]
        if kind == "train":
            for _ in range(operation[1]):
                self.optimizer.zero_grad()
                self.model(x).pow(2).mean().backward()
                self.optimizer.step()
        elif kind == "update":
            new = _masks(_TEMPLATE, operation[2], seed=operation[1])
            mp.update_masks(self.model, dict(new), optimizer=self.optimizer)
            assert torch.equal(
                self.model[0].parametrizations.weight[0].free.bool(), new["0.weight"]
            )
        elif kind == "resume":  # into another init and other masks, then the checkpoint
            saved = copy.deepcopy((self.model.state_dict(), self.optimizer.state_dict()))
            self.model = self._build(1, _masks(_TEMPLATE, 0.5, seed=99))
            self.model.load_state_dict(saved[0])
            self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=0.01, weight_decay=0.1)
            self.optimizer.load_state_dict(saved[1])
        elif kind == "deepcopy":
            self.model, self.optimizer = copy.deepcopy((self.model, self.optimizer))


OPERATIONS = st.one_of(
    st.tuples(st.just("train"), st.integers(1, 3)),
    st.tuples(st.just("update"), st.integers(0, 1000), st.sampled_from([0.1, 0.3, 0.6])),
    st.tuples(st.just("resume")),
    st.tuples(st.just("deepcopy")),
)


@settings(max_examples=40, deadline=None)
@given(operations=st.lists(OPERATIONS, min_size=1, max_size=8), seed=st.integers(0, 1000))
def test_random_operation_sequences_follow_the_compact_layout(operations, seed):
    """Train, prune and regrow (update_masks), resume into another init, deep-copy: the CSR run's
    effective weights follow the compact run's (float64 rounding) after every operation, and its
    masked entries are exactly zero."""
    masks = _masks(_TEMPLATE, 0.3, seed=seed)
    runs = [_Run("compact", masks), _Run("csr", masks)]
    x = torch.randn(8, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    for operation in operations:
        for run in runs:
            run.run(operation, x)
        for a, b in zip(runs[0].model[::2], runs[1].model[::2], strict=True):
            torch.testing.assert_close(b.weight, a.weight, rtol=1e-9, atol=1e-11)
            kept = b.parametrizations.weight[0].free.bool()
            assert torch.equal(b.weight[~kept], torch.zeros_like(b.weight[~kept]))
            assert isinstance(b.parametrizations.weight[0], CSRConstraint)
        torch.testing.assert_close(runs[1].model(x), runs[0].model(x), rtol=1e-9, atol=1e-11)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the CUDA path (cuSPARSE) needs a GPU")
def test_csr_trains_on_cuda_like_compact():
    compact, csr = _pair(dtype=torch.float32)
    compact, csr = compact.cuda(), csr.cuda()
    x = torch.randn(16, 12, device="cuda")
    for model in (compact, csr):
        opt = torch.optim.AdamW(model.parameters(), lr=0.01)
        for _ in range(3):
            opt.zero_grad()
            model(x).pow(2).mean().backward()
            opt.step()
    torch.testing.assert_close(csr(x), compact(x), rtol=1e-4, atol=1e-5)
    mp.verify(csr)


def test_inputs_and_biases_the_sparse_product_does_not_take_behave_as_the_module_does():
    """A sparse input computes densely (as nn.Linear takes it); a bias of another dtype gives
    torch's dtype error, as nn.Linear does."""
    compact, csr = _pair(dtype=torch.float32)
    x = torch.randn(4, 12)
    for sparse in (x.to_sparse(), x.to_sparse_csr()):
        torch.testing.assert_close(csr[0](sparse), compact[0](x))
    layer = mp.apply_mask(nn.Linear(12, 5), {"weight": mp.Mask(mp.masks.random(0.3), layout="csr")})
    layer.bias.data = layer.bias.data.double()
    with pytest.raises(RuntimeError, match="dtype"):
        layer(x)


def test_batched_gradients_are_refused_by_name():
    _, csr = _pair()
    x = torch.randn(3, 12, dtype=torch.float64, requires_grad=True)
    y = csr(x)
    with pytest.raises(mp.MaskparamError, match="vmap"):
        torch.autograd.grad(
            y, x, torch.eye(7, dtype=torch.float64)[:, None].expand(7, 3, 7), is_grads_batched=True
        )


def test_to_sparse_times_a_constrained_model_in_inference_mode():
    model = mp.apply_mask(
        nn.Sequential(nn.Linear(256, 256)),
        {"0.weight": mp.Mask(mp.masks.magnitude(0.98), layout="compact")},
    )
    with torch.inference_mode():
        mp.to_sparse(model, batch_size=32)
    assert model.sparse_choices[0].dense_ms is not None
    assert model[0].parametrizations.weight.original.grad is None
