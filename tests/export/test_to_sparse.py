"""``mp.to_sparse`` / ``mp.CSRLinear``: a baked, pruned model in its fastest layout, with the
same outputs (any input rank, dtypes, shared and tied Linears), a smaller state_dict, and
everything torch does with a model (save, load, export, compile, deepcopy); what it cannot do is
refused by name (a constrained model, bad arguments, CSR weights handed to other maskparam
calls)."""

from __future__ import annotations

import copy
import io
import warnings

import pytest
import torch
from helpers import assert_same_bits, mlp, sparse_linear, state_bits, through_file
from torch import Tensor, nn

import maskparam as mp
from maskparam.export import sparse as sparse_export


def _pruned_mlp(sparsity: float, width: int = 128) -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(32, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 4)
    )
    mp.apply_mask(model, {"*.weight": mp.Mask(mp.masks.global_magnitude(sparsity))})
    return mp.remove_parametrizations(model)


def _bytes(state: dict) -> int:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.tell()


@pytest.mark.parametrize("shape", [(7, 32), (2, 5, 32), (32,)])
def test_csr_outputs_equal_the_dense_model_for_any_leading_shape(shape):
    dense = _pruned_mlp(0.9)
    x = torch.randn(*shape)
    sparse = mp.to_sparse(copy.deepcopy(dense), layout="csr")
    assert all(type(m) is mp.CSRLinear for m in sparse if isinstance(m, nn.Linear))
    assert all(m.weight.layout == torch.sparse_csr for m in sparse if isinstance(m, nn.Linear))
    with torch.no_grad():
        torch.testing.assert_close(sparse(x), dense(x), rtol=1e-5, atol=1e-6)


def test_the_state_dict_shrinks_with_the_zeros_and_loads_with_weights_only():
    dense = _pruned_mlp(0.95, width=256)
    sparse = mp.to_sparse(copy.deepcopy(dense), layout="csr")
    state = sparse.state_dict()
    assert list(state) == [
        f"{i}.{key}"
        for i in (0, 2, 4)
        for key in ("weight_crow_indices", "weight_col_indices", "weight_values", "bias")
    ]
    assert state["2.weight_crow_indices"].dtype == torch.int32  # 32-bit indices: they fit
    assert all(t.layout == torch.strided for t in state.values())  # plain tensors only
    ratio = _bytes(state) / _bytes(dense.state_dict())
    assert ratio <= 0.15, ratio  # values (4 B) + column (4 B) per kept entry, 5% kept
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)
    fresh = mp.to_sparse(_pruned_mlp(0.95, width=256), layout="csr")
    with torch.no_grad():  # another model of the same masks, then the saved values
        for m in fresh:
            if isinstance(m, nn.Linear):
                m.weight.values().zero_()
    fresh.load_state_dict(loaded)
    x = torch.randn(3, 32)
    with torch.no_grad():
        assert torch.equal(fresh(x), sparse(x))


def test_export_save_and_deepcopy_keep_working():
    dense = _pruned_mlp(0.9)
    sparse = mp.to_sparse(copy.deepcopy(dense), layout="csr")
    x = torch.randn(5, 32)
    with torch.no_grad():
        expected = sparse(x)
    exported = torch.export.export(sparse, (x,))
    assert torch.equal(exported.module()(x), expected)
    buffer = io.BytesIO()
    torch.save(sparse, buffer)  # the whole model: CSRLinear is importable
    buffer.seek(0)
    with torch.no_grad():
        assert torch.equal(torch.load(buffer, weights_only=False)(x), expected)
        copied = copy.deepcopy(sparse)
        assert torch.equal(copied(x), expected)
    copied[0].weight.values().zero_()  # a copy: the original keeps its values
    with torch.no_grad():
        assert torch.equal(sparse(x), expected)


def test_auto_keeps_dense_where_csr_cannot_pay_and_says_what_it_chose():
    dense = _pruned_mlp(0.3)
    sparse = mp.to_sparse(copy.deepcopy(dense))
    assert [c.layout for c in sparse.sparse_choices] == ["dense"] * 3
    assert all(c.dense_ms is None for c in sparse.sparse_choices)  # below MIN_ZEROS: not timed
    assert all(type(m) is nn.Linear for m in sparse if isinstance(m, nn.Linear))
    timed = mp.to_sparse(_pruned_mlp(0.95, width=512), batch_size=64)
    choices = [c for c in timed.sparse_choices if c.zeros >= sparse_export.MIN_ZEROS]
    assert len(choices) >= 2
    for choice in choices:  # timed; CSR only where its median is faster by the margin
        assert choice.dense_ms is not None
        assert choice.sparse_ms is not None
        if choice.layout == "csr":
            assert choice.dense_ms >= 1.1 * choice.sparse_ms


def test_only_plain_linears_are_converted():
    attention = nn.MultiheadAttention(16, 2)  # reads out_proj.weight itself: left dense
    with torch.no_grad():
        attention.out_proj.weight.zero_()
    mp.to_sparse(attention, layout="csr")
    assert attention.out_proj.weight.layout == torch.strided
    x = torch.randn(3, 1, 16)
    attention(x, x, x)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda m: mp.to_sparse(m, layout="coo"), "unknown layout"),
        (lambda m: mp.to_sparse(m, batch_size=0), "batch_size"),
        (lambda m: mp.to_sparse(m, min_speedup=0), "min_speedup"),
    ],
)
def test_bad_calls_are_refused_and_change_nothing(call, message):
    model = _pruned_mlp(0.9)
    with pytest.raises(mp.MaskparamError, match=message):
        call(model)
    assert all(m.weight.layout == torch.strided for m in model if isinstance(m, nn.Linear))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="2:4 semi-structured sparsity needs CUDA")
def test_cuda_two_four_weights_become_semi_structured_where_faster():
    torch.manual_seed(0)
    layer = nn.Linear(1024, 1024).half().cuda()
    mp.apply_mask(layer, {"weight": mp.Mask(mp.masks.n_m(2, 4))})
    mp.remove_parametrizations(layer)
    x = torch.randn(64, 1024, dtype=torch.half, device="cuda")
    with torch.no_grad():
        expected = layer(x)
    mp.to_sparse(layer)
    (choice,) = layer.sparse_choices
    assert choice.layout in ("2:4", "dense")
    with torch.no_grad():
        torch.testing.assert_close(layer(x), expected, rtol=1e-2, atol=1e-2)


def test_a_cpu_two_four_weight_is_not_a_semi_structured_candidate():
    layer = nn.Linear(8, 8)
    mp.apply_mask(layer, {"weight": mp.Mask(mp.masks.n_m(2, 4))})
    mp.remove_parametrizations(layer)
    assert not sparse_export._semi_structured_candidate(layer.weight)


def test_a_meta_model_is_refused():
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(4, 4))
    with pytest.raises(mp.MaskparamError, match="meta device"):
        mp.to_sparse(model)


# from the attack on to_sparse and trainable_state_dict
def test_to_sparse_linear_in_sequential_modulelist_and_custom_module():
    """Linears anywhere (Sequential, ModuleList, a custom module) convert and outputs stay equal."""

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layers = nn.ModuleList([sparse_linear(16, 16), sparse_linear(16, 16)])
            self.head = nn.Sequential(sparse_linear(16, 4))

        def forward(self, x: Tensor) -> Tensor:
            for layer in self.layers:
                x = torch.relu(layer(x))
            return self.head(x)

    model = Block()
    x = torch.randn(5, 16)
    with torch.no_grad():
        expected = model(x)
    mp.to_sparse(model, layout="csr")
    assert [c.layout for c in model.sparse_choices] == ["csr"] * 3
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-6)


# from the attack on to_sparse and trainable_state_dict
def test_to_sparse_linear_used_twice_stays_one_module():
    """A Linear applied twice converts once and its two uses still agree with dense."""
    layer = sparse_linear(8, 8)
    model = nn.Sequential(layer, nn.ReLU(), layer)
    x = torch.randn(3, 8)
    with torch.no_grad():
        expected = model(x)
    mp.to_sparse(model, layout="csr")
    assert model[0] is model[2]
    assert isinstance(model[0], mp.CSRLinear)
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-6)


# from the attack on to_sparse and trainable_state_dict
@pytest.mark.parametrize("shape", [(16,), (2, 3, 16), (2, 2, 3, 16), (0, 16), (2, 0, 16)])
def test_to_sparse_any_input_rank_and_empty_batch(shape):
    """1-D, 3-D, 4-D inputs and an empty batch give the dense model's outputs and shapes."""
    layer = sparse_linear()
    dense = copy.deepcopy(layer)
    mp.to_sparse(layer, layout="csr")
    x = torch.randn(*shape)
    with torch.no_grad():
        out = layer(x)
        torch.testing.assert_close(out, dense(x), rtol=1e-5, atol=1e-6)


# from the attack on to_sparse and trainable_state_dict
@pytest.mark.parametrize("bias", [True, False])
def test_to_sparse_all_zero_weight_and_no_bias(bias):
    """An all-zero weight and a Linear without bias convert and compute what dense did."""
    layer = nn.Linear(6, 4, bias=bias)
    nn.init.zeros_(layer.weight)
    x = torch.randn(3, 6)
    with torch.no_grad():
        expected = layer(x)
    mp.to_sparse(layer, layout="csr")
    assert layer.weight.layout == torch.sparse_csr
    with torch.no_grad():
        assert torch.equal(layer(x), expected)


# from the attack on to_sparse and trainable_state_dict
def test_to_sparse_float64_weight():
    """A float64 Linear converts and its outputs stay float64 and equal."""
    layer = sparse_linear(dtype=torch.float64)
    x = torch.randn(3, 16, dtype=torch.float64)
    with torch.no_grad():
        expected = layer(x)
    mp.to_sparse(layer, layout="csr")
    with torch.no_grad():
        out = layer(x)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, expected)


# from the attack on to_sparse and trainable_state_dict
def test_sparse_state_dict_weights_only_and_deepcopy_of_shared_csr():
    """The sparse state_dict reads with weights_only; a deepcopy keeps a shared CSRLinear shared."""
    layer = sparse_linear()
    model = nn.ModuleList([layer, layer])
    mp.to_sparse(model, layout="csr")
    state = through_file(model.state_dict())
    assert state["0.weight_values"].layout == torch.strided
    assert state["0.weight_crow_indices"].dtype == torch.int32
    clone = copy.deepcopy(model)
    assert clone[0] is clone[1]
    x = torch.randn(2, 16)
    with torch.no_grad():
        assert torch.equal(clone[0](x), model[0](x))


def _csr_model(dtype=torch.float32) -> nn.Sequential:
    model = nn.Sequential(sparse_linear(dtype=dtype), nn.ReLU(), sparse_linear(8, 4, dtype=dtype))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return mp.to_sparse(model, layout="csr")


# from the attack on to_sparse and trainable_state_dict
@pytest.mark.filterwarnings("ignore:`torch.jit.script:DeprecationWarning")  # inside inductor
@pytest.mark.filterwarnings("ignore::UserWarning")  # sparse CSR beta
def test_to_sparse_export_and_compile_match():
    """torch.export(...).module() and torch.compile of a CSR model give the eager outputs."""
    model = _csr_model()
    x = torch.randn(4, 16)
    with torch.no_grad():
        expected = model(x)
    exported = torch.export.export(model, (x,)).module()
    torch.testing.assert_close(exported(x), expected)
    compiled = torch.compile(model)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), expected)


# from the attack on to_sparse and trainable_state_dict
@pytest.mark.slow
def test_to_sparse_hf_bert_and_gpt2_outputs_unchanged():
    """HF BERT/GPT-2 built from configs: pruned, baked, to_sparse: logits equal, keys equal."""
    transformers = pytest.importorskip("transformers")
    ids = torch.randint(0, 100, (2, 7))
    for model in (
        transformers.BertForMaskedLM(
            transformers.BertConfig(
                num_hidden_layers=1, num_attention_heads=2, hidden_size=32,
                intermediate_size=64, vocab_size=100, max_position_embeddings=32,
            )
        ),
        transformers.GPT2LMHeadModel(
            transformers.GPT2Config(
                n_layer=1, n_head=2, n_embd=32, vocab_size=100, n_positions=32,
                bos_token_id=0, eos_token_id=0,
            )
        ),
    ):  # fmt: skip
        model.eval()
        mp.apply_mask(model, {"*.weight": mp.Mask(mp.masks.magnitude(0.9))}, strict=False)
        mp.remove_parametrizations(model)
        keys = list(model.state_dict())
        with torch.no_grad():
            expected = model(ids).logits
        mp.to_sparse(model, layout="csr")
        with torch.no_grad():
            torch.testing.assert_close(model(ids).logits, expected, rtol=1e-5, atol=1e-5)
        converted = {c.name for c in model.sparse_choices if c.layout == "csr"}
        parts = ("weight_crow_indices", "weight_col_indices", "weight_values")
        assert list(model.state_dict()) == [
            new
            for key in keys
            for new in (
                [f"{key.removesuffix('.weight')}.{p}" for p in parts]
                if key.removesuffix(".weight") in converted
                else [key]
            )
        ]
        assert len(converted) >= 4  # GPT-2's Conv1D projections too


def _masked_mlp(density: float, layout: str = "auto") -> nn.Sequential:
    model = mlp(64, 128, 128, 5, activation=nn.ReLU, seed=0)
    return mp.apply_mask(
        model, {"*.weight": mp.Mask(mp.masks.global_magnitude(1 - density), layout=layout)}
    )


def _fake_timings(monkeypatch, speedup: float) -> None:
    """Each timed pair: the dense (here: compact) call takes ``speedup`` times the sparse one."""
    durations = iter([speedup, 1.0] * 10 * sparse_export._MAX_PAIRS)
    clock = iter(t for d in durations for t in (0.0, d * 1e-3))
    monkeypatch.setattr(sparse_export, "_clock", clock.__next__)


@pytest.mark.parametrize(("speedup", "expected"), [(3.0, "csr"), (0.5, "compact")])
def test_to_sparse_on_a_constrained_model_switches_compact_masks_timed_faster(
    monkeypatch, speedup, expected
):
    """A constrained model: each compact-masked Linear becomes CSR where its training step is
    timed faster, stays compact elsewhere; the state_dict (keys, values), the optimizer's state
    and the outputs stay what they were, and the model trains on."""
    model = _masked_mlp(0.05)
    optimizer = torch.optim.AdamW(model.parameters())
    x = torch.randn(7, 64)
    model(x).sum().backward()
    optimizer.step()
    before, outputs = copy.deepcopy(model.state_dict()), model(x)
    state_before = copy.deepcopy(optimizer.state_dict())
    _fake_timings(monkeypatch, speedup)
    mp.to_sparse(model, batch_size=8)
    assert [c.layout for c in model.sparse_choices] == [expected] * 3
    assert all(c.dense_ms is not None for c in model.sparse_choices)
    after = model.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before)
    torch.testing.assert_close(model(x), outputs, rtol=1e-5, atol=1e-6)
    assert str(optimizer.state_dict()) == str(state_before)
    described = mp.summary(model).tensors[0].constraint
    assert described.endswith(f", {expected})")
    optimizer.zero_grad()
    model(x).sum().backward()
    optimizer.step()
    mp.verify(model)


def test_to_sparse_on_a_constrained_model_leaves_what_cannot_be_csr():
    """Dense-layout masks, other constraints and unconstrained Linears stay as they are, each
    with the reason; layout="csr" switches every compact Mask without timing."""
    model = mlp(16, 32, 32, 32, 4, activation=nn.ReLU, seed=0)
    mp.apply_mask(
        model,
        {
            "0.weight": mp.Mask(mp.masks.magnitude(0.9), layout="compact"),
            "2.weight": mp.Mask(mp.masks.magnitude(0.9), layout="dense"),
            "4.weight": mp.Triangular(),
        },
    )
    before = state_bits(model)
    mp.to_sparse(model, layout="csr")
    layouts = {c.name: c.layout for c in model.sparse_choices}
    assert layouts["0"] == "csr"
    assert layouts["2"].startswith("dense (not a compact Mask")
    assert layouts["4"].startswith("dense (not a compact Mask")
    assert layouts["6"].startswith("dense (not masked")
    assert_same_bits(model, before)
    assert type(model[6]) is nn.Linear


def test_to_sparse_auto_keeps_a_lightly_masked_model_compact_without_timing(monkeypatch):
    monkeypatch.setattr(sparse_export, "_clock", None)  # a timing would fail
    model = _masked_mlp(0.6, layout="compact")
    mp.to_sparse(model)
    assert {c.layout for c in model.sparse_choices} == {"compact"}


def test_to_sparse_on_a_constrained_model_is_not_slower_at_any_sparsity():
    """The real timing: a 95%-masked 512 x 512 layer at batch 64 is chosen CSR; at 50% it stays
    compact (not timed); to_sparse never leaves a layer slower than the default layout (the
    benchmark's rows, benchmarks/results/sparse_training.md, measure the whole step)."""
    torch.manual_seed(0)
    for density, expected in [(0.05, "csr"), (0.5, "compact")]:
        layer = nn.Sequential(nn.Linear(512, 512))
        mp.apply_mask(
            layer, {"0.weight": mp.Mask(mp.masks.magnitude(1 - density), layout="compact")}
        )
        mp.to_sparse(layer, batch_size=64)
        assert layer.sparse_choices[0].layout == expected


# from the attack on to_sparse and trainable_state_dict
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_to_sparse_auto_half_precision_model_keeps_working(dtype):
    """to_sparse(layout='auto') of a 97%-sparse fp16/bf16 model runs and outputs still match."""
    layer = nn.Linear(64, 64).to(dtype)
    with torch.no_grad():
        layer.weight.mul_((torch.rand(64, 64) > 0.97).to(dtype))
    model = nn.Sequential(layer)
    x = torch.randn(4, 64, dtype=dtype)
    with torch.no_grad():
        expected = model(x)
        mp.to_sparse(model)
        torch.testing.assert_close(model(x), expected)


# from the attack on to_sparse and trainable_state_dict
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_to_sparse_csr_half_precision_is_refused_or_runs(dtype):
    """layout='csr' on fp16/bf16: either a MaskparamError up front, or a model that runs."""
    layer = sparse_linear(dtype=dtype)
    x = torch.randn(3, 16, dtype=dtype)
    with torch.no_grad():
        expected = layer(x)
    try:
        mp.to_sparse(layer, layout="csr")
    except mp.MaskparamError:
        return
    with torch.no_grad():
        torch.testing.assert_close(layer(x), expected)


# from the attack on to_sparse and trainable_state_dict
def test_model_to_float64_after_to_sparse():
    """model.to(torch.float64) after to_sparse gives a float64 model that runs."""
    model = _csr_model()
    x = torch.randn(3, 16)
    with torch.no_grad():
        expected = model(x)
    model.to(torch.float64)
    weight = model[0].weight
    assert weight.values().dtype == weight.dtype == torch.float64
    with torch.no_grad():
        torch.testing.assert_close(model(x.double()).float(), expected)


# from the attack on to_sparse and trainable_state_dict
def test_mp_load_state_dict_sparse_checkpoint_into_dense_model():
    """mp.load_state_dict(dense, sparse_state) loads (values equal) or names the layout problem."""
    dense = nn.Sequential(sparse_linear())
    sparse = copy.deepcopy(dense)
    mp.to_sparse(sparse, layout="csr")
    target = nn.Sequential(nn.Linear(16, 8))
    before = state_bits(target)
    try:
        mp.load_state_dict(target, sparse.state_dict())
    except mp.MaskparamError as e:
        message = str(e)
    else:
        assert torch.equal(target[0].weight, dense[0].weight)
        return
    assert "0.weight" in message
    assert_same_bits(target, before)


# from the attack on to_sparse and trainable_state_dict
def test_mp_load_state_dict_dense_checkpoint_into_sparse_model():
    """mp.load_state_dict(sparse_model, dense_state) loads or names the tensor and the fix."""
    sparse = nn.Sequential(sparse_linear())
    mp.to_sparse(sparse, layout="csr")
    dense_state = nn.Sequential(nn.Linear(16, 8)).state_dict()
    before = state_bits(sparse)
    try:
        mp.load_state_dict(sparse, dense_state)
    except mp.MaskparamError as e:
        message = str(e)
    else:
        x = torch.randn(2, 16)
        reference = nn.Sequential(nn.Linear(16, 8))
        reference.load_state_dict(dense_state)
        torch.testing.assert_close(sparse(x), reference(x))
        return
    assert "0.weight" in message
    assert_same_bits(sparse, before)


# from the attack on to_sparse and trainable_state_dict
def test_trainable_state_dict_of_sparse_model():
    """trainable_state_dict(sparse_model) works (nothing trains) or says why, by tensor."""
    model = _csr_model()
    try:
        state = mp.trainable_state_dict(model)
    except mp.MaskparamError as e:
        message = str(e)
    else:
        assert not [k for k in state if not k.startswith("meta:")]
        return
    assert "0.weight" in message


# from the attack on to_sparse and trainable_state_dict
def test_apply_mask_on_a_csr_weight_says_it_is_sparse():
    """apply_mask naming a CSR weight: a MaskparamError saying the weight is sparse (to_sparse)."""
    model = _csr_model()
    before = state_bits(model)
    with pytest.raises(mp.MaskparamError) as info:
        mp.apply_mask(model, {"0.weight": mp.Mask(mp.masks.magnitude(0.5))})
    assert_same_bits(model, before)
    message = str(info.value)
    assert "sparse" in message.lower()
    assert "fix the spec" not in message


def _saved_bytes(obj: object) -> int:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return len(buffer.getvalue())


# from the attack on to_sparse and trainable_state_dict
def test_to_sparse_keeps_a_tied_weight_tied():
    """A Linear head tied to an Embedding stays tied (or stays dense) after to_sparse."""
    embedding = nn.Embedding(100, 32)
    head = nn.Linear(32, 100, bias=False)
    head.weight = embedding.weight
    with torch.no_grad():
        embedding.weight.mul_(torch.rand(100, 32) > 0.95)
    model = nn.ModuleDict({"embedding": embedding, "head": head})
    size = _saved_bytes(model.state_dict())
    mp.to_sparse(model, layout="csr")
    assert model["head"].weight is model["embedding"].weight
    assert _saved_bytes(model.state_dict()) <= size


# from the attack on to_sparse and trainable_state_dict
def test_training_a_sparse_model_fails_clearly():
    """model.requires_grad_(True) + backward + step: trains, or a clear error naming the CSR weight."""
    model = _csr_model()
    model.train().requires_grad_(True)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    try:
        model(torch.randn(3, 16)).sum().backward()
        optimizer.step()
    except mp.MaskparamError:
        return
    assert model[0].weight.layout == torch.sparse_csr


# from the attack on to_sparse and trainable_state_dict
@pytest.mark.parametrize("bad", [float("nan"), True])
def test_to_sparse_refuses_a_nan_or_bool_min_speedup(bad):
    """min_speedup=nan or True is a MaskparamError, like min_speedup=0."""
    model = nn.Sequential(sparse_linear())
    with pytest.raises(mp.MaskparamError, match="min_speedup"):
        mp.to_sparse(model, min_speedup=bad)


# from the attack on to_sparse and trainable_state_dict
def test_to_sparse_twice_keeps_what_it_chose():
    """A second to_sparse call is a no-op: sparse_choices still lists the CSR Linears."""
    model = nn.Sequential(sparse_linear())
    mp.to_sparse(model, layout="csr")
    first = list(model.sparse_choices)
    mp.to_sparse(model, layout="csr")
    assert [c.layout for c in model.sparse_choices] == [c.layout for c in first] == ["csr"]


# from the attack on to_sparse and trainable_state_dict
def test_to_sparse_of_a_weight_norm_linear_keeps_working():
    """to_sparse of a model with nn.utils.weight_norm: the model still runs with equal outputs."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        layer = torch.nn.utils.weight_norm(sparse_linear())
    model = nn.Sequential(layer)
    x = torch.randn(2, 16)
    with torch.no_grad():
        expected = model(x)
    try:
        mp.to_sparse(model, layout="csr")
    except mp.MaskparamError:
        return
    with torch.no_grad():  # kept dense (it has hooks); an all-zero row makes NaN both times
        torch.testing.assert_close(model(x), expected, equal_nan=True)
    assert model.sparse_choices[0].layout == "dense (has forward hooks)"


def _pruned(module: nn.Module, sparsity: float = 0.9) -> nn.Module:
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.Linear):
                m.weight.mul_(torch.rand_like(m.weight) > sparsity)
    return module


@pytest.mark.filterwarnings("ignore:enable_nested_tensor:UserWarning")
@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors:UserWarning")
def test_a_transformer_encoder_runs_inference_with_csr_feed_forwards():
    """An nn.TransformerEncoder in eval + no_grad (torch's fused fast path, and its nested-tensor
    path with a padding mask) gives the baked model's outputs; the fast path is off, and said."""
    layer = nn.TransformerEncoderLayer(16, 2, 32, batch_first=True)
    encoder = _pruned(nn.TransformerEncoder(layer, 2)).eval()
    x = torch.randn(3, 5, 16)
    padding = torch.zeros(3, 5, dtype=torch.bool)
    padding[0, 3:] = True
    with torch.no_grad():
        expected, expected_padded = encoder(x), encoder(x, src_key_padding_mask=padding)
    mp.to_sparse(encoder, layout="csr")
    assert [(c.name, c.layout) for c in encoder.sparse_choices] == [
        (f"layers.{i}.linear{j}", "csr") for i in (0, 1) for j in (1, 2)
    ]
    assert all("fast path of 'layers." in c.note for c in encoder.sparse_choices)
    with torch.no_grad():
        torch.testing.assert_close(encoder(x), expected, rtol=1e-5, atol=1e-5)
        padded = encoder(x, src_key_padding_mask=padding)
        # the nested path leaves padded positions 0; the outputs that count are the others
        torch.testing.assert_close(padded[~padding], expected_padded[~padding])
        buffer = io.BytesIO()
        torch.save(encoder, buffer)  # the fast path stays off in a copy and a pickle
        buffer.seek(0)
        for copied in (copy.deepcopy(encoder), torch.load(buffer, weights_only=False)):
            torch.testing.assert_close(copied(x), expected, rtol=1e-5, atol=1e-5)


def test_a_transformer_encoder_layer_alone_runs_inference_with_csr_feed_forwards():
    """An nn.TransformerEncoderLayer on its own (gelu, the fast path's other activation) in eval
    + no_grad gives the baked layer's outputs after to_sparse."""
    layer = _pruned(nn.TransformerEncoderLayer(16, 2, 32, activation="gelu", batch_first=True))
    layer.eval()
    x = torch.randn(2, 4, 16)
    with torch.no_grad():
        expected = layer(x)
    mp.to_sparse(layer, layout="csr")
    with torch.no_grad():
        torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)
    assert [c.note != "" for c in layer.sparse_choices] == [True, True]


def test_a_csr_linear_runs_under_cpu_bf16_autocast_like_nn_linear():
    """Under CPU bf16 autocast a CSRLinear returns bf16, as nn.Linear does, within bf16 rounding."""
    layer = sparse_linear()
    dense = copy.deepcopy(layer)
    mp.to_sparse(layer, layout="csr")
    x = torch.randn(4, 16)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out, expected = layer(x), dense(x)
    assert out.dtype == expected.dtype == torch.bfloat16
    torch.testing.assert_close(out, expected, rtol=1.6e-2, atol=1e-2)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_a_csr_linear_cast_to_half_precision_computes_in_float32(dtype):
    """.half() / .bfloat16() of a converted model: values converted, forward in float32 (the CPU
    has no fp16/bf16 CSR kernel), result in the model's dtype, equal to float32 then cast."""
    layer = sparse_linear()
    mp.to_sparse(layer, layout="csr")
    low = copy.deepcopy(layer).to(dtype)
    assert low.weight.values().dtype == low.weight.dtype == dtype
    x = torch.randn(3, 16).to(dtype)
    with torch.no_grad():
        out = low(x)
        reference = copy.deepcopy(low).float()(x.float()).to(dtype)
    assert out.dtype == dtype
    assert torch.equal(out, reference)
    with pytest.raises(mp.MaskparamError, match="the input is torch.float32"):
        low(x.float())  # as nn.Linear, another dtype is an error, not a silent cast


def test_a_users_own_parametrization_stays_and_the_rest_converts():
    """A Linear under torch's orthogonal parametrization is left as it is and listed; the other
    Linears convert; outputs unchanged."""
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), sparse_linear(8, 4))
    nn.utils.parametrizations.orthogonal(model[0])
    x = torch.randn(3, 8)
    with torch.no_grad():
        expected = model(x)
    mp.to_sparse(model, layout="csr")
    assert [(c.name, c.layout) for c in model.sparse_choices] == [
        ("0", "dense (parametrized)"),
        ("2", "csr"),
    ]
    assert nn.utils.parametrize.is_parametrized(model[0], "weight")
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected)


def test_transformers_conv1d_becomes_a_csr_linear_of_the_transposed_weight():
    """transformers' Conv1D (weight (in, out), y = x @ W + b) converts, and says so."""
    pytorch_utils = pytest.importorskip("transformers.pytorch_utils")
    conv = pytorch_utils.Conv1D(12, 16)  # nf=12 outputs, 16 inputs
    with torch.no_grad():
        conv.weight.mul_(torch.rand(16, 12) > 0.9)
        conv.bias.normal_()
    model = nn.Sequential(conv)
    dense = copy.deepcopy(conv)
    x = torch.randn(2, 3, 16)
    with torch.no_grad():
        expected = dense(x)
    mp.to_sparse(model, layout="csr")
    assert type(model[0]) is mp.CSRLinear
    assert (model[0].in_features, model[0].out_features) == (16, 12)
    assert torch.equal(model[0].weight.to_dense(), dense.weight.t())
    assert [c.layout for c in model.sparse_choices] == ["csr"]
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected)
    auto = nn.Sequential(copy.deepcopy(dense))
    mp.to_sparse(auto)  # timed through its own forward
    assert auto.sparse_choices[0].name == "0"


def test_auto_gives_the_same_choice_every_run_near_the_margin(monkeypatch):
    """layout='auto' with timings whose true speedup is min_speedup, in noise: dense every run
    (not CSR in some runs); a clear speedup in the same noise: CSR every run."""
    layer = sparse_linear(64, 64)
    with torch.no_grad():
        layer.weight.mul_(torch.rand(64, 64) > 0.9)

    def layouts(speedup: float) -> set[str]:
        chosen = set()
        noise = torch.Generator().manual_seed(0)
        for _ in range(20):  # 20 runs, each its own timing noise (a run at the margin picks CSR
            durations = []  # about once in a thousand: _decide's 99.9% bounds)
            for _ in range(sparse_export._MAX_PAIRS):
                jitter = 1 + 0.2 * (torch.rand(2, generator=noise) - 0.5)
                durations += [speedup * float(jitter[0]), float(jitter[1])]
            clock = iter(t for d in durations for t in (0.0, d * 1e-3))
            monkeypatch.setattr(sparse_export, "_clock", clock.__next__)
            mp.to_sparse(model := nn.Sequential(copy.deepcopy(layer)))
            chosen.add(model.sparse_choices[0].layout)
        return chosen

    assert layouts(1.1) == {"dense"}
    assert layouts(1.5) == {"csr"}


def test_a_converted_model_saves_as_safetensors_and_loads_back(tmp_path):
    """The state_dict holds plain tensors only: safetensors saves it, and it loads back into a
    converted model of the same masks with equal outputs."""
    safetensors_torch = pytest.importorskip("safetensors.torch")
    model = _csr_model()
    path = tmp_path / "model.safetensors"
    safetensors_torch.save_file(model.state_dict(), path)
    fresh = copy.deepcopy(model)
    with torch.no_grad():
        for m in fresh:
            if isinstance(m, nn.Linear):
                m.weight.values().zero_()
    fresh.load_state_dict(safetensors_torch.load_file(path))
    x = torch.randn(3, 16)
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))


@pytest.mark.slow
def test_a_converted_hf_model_saves_with_save_pretrained(tmp_path):
    """save_pretrained of a converted GPT-2 (safetensors) writes every tensor of the state_dict."""
    transformers = pytest.importorskip("transformers")
    safetensors_torch = pytest.importorskip("safetensors.torch")
    config = transformers.GPT2Config(n_layer=1, n_head=2, n_embd=32, vocab_size=100, n_positions=32)
    model = _pruned(transformers.GPT2LMHeadModel(config)).eval()
    for m in model.modules():
        if type(m).__name__ == "Conv1D":
            with torch.no_grad():
                m.weight.mul_(torch.rand_like(m.weight) > 0.9)
    mp.to_sparse(model, layout="csr")
    model.save_pretrained(tmp_path)
    saved = safetensors_torch.load_file(tmp_path / "model.safetensors")
    state = model.state_dict()
    assert any(k.endswith("attn.c_attn.weight_values") for k in saved)
    for key, value in saved.items():
        assert torch.equal(value, state[key]), key


def _two_masks() -> tuple[nn.Sequential, nn.Sequential]:
    torch.manual_seed(0)
    first = nn.Sequential(sparse_linear(), nn.ReLU(), sparse_linear(8, 4))
    second = copy.deepcopy(first)
    with torch.no_grad():  # other masks, other numbers of nonzeros
        for m in second:
            if isinstance(m, nn.Linear):
                m.weight.copy_(torch.randn_like(m.weight) * (torch.rand_like(m.weight) > 0.7))
                m.bias.normal_()
    mp.to_sparse(first, layout="csr")
    mp.to_sparse(second, layout="csr")
    assert first[0].weight.values().numel() != second[0].weight.values().numel()
    return first, second


def test_a_csr_linear_loads_a_checkpoint_of_other_nonzeros():
    """model.load_state_dict between two converted models of other masks takes the checkpoint's
    structure: outputs equal the saved model's."""
    first, second = _two_masks()
    first.load_state_dict(through_file(second.state_dict()))
    x = torch.randn(3, 16)
    with torch.no_grad():
        assert torch.equal(first(x), second(x))
    assert torch.equal(first[0].weight.to_dense(), second[0].weight.to_dense())


def test_mp_load_state_dict_of_other_nonzeros_takes_their_structure():
    """mp.load_state_dict between two converted models of other masks loads, as torch's does."""
    first, second = _two_masks()
    mp.load_state_dict(first, second.state_dict())
    x = torch.randn(3, 16)
    with torch.no_grad():
        assert torch.equal(first(x), second(x))


def test_mp_load_state_dict_checks_every_csr_linear_before_loading_anything():
    """A checkpoint whose last CSR weight does not fit: refused, every tensor (the first layer's
    too, and the biases) as it was."""
    first, second = _two_masks()
    state = second.state_dict()
    state["2.weight_col_indices"] = state["2.weight_col_indices"] + 100
    before = state_bits(first)
    with pytest.raises(mp.MaskparamError, match="'2.weight_values'"):
        mp.load_state_dict(first, state)
    assert_same_bits(first, before)


@pytest.mark.parametrize(
    ("key", "bad", "message"),
    [
        ("0.weight_crow_indices", lambda t: t[:-1], "rows need 9"),
        ("0.weight_col_indices", lambda t: t + 100, "does not fit"),
        ("0.weight_values", lambda t: t[:-1], "column indices for"),
        ("0.bias", lambda t: t[:-1], "bias has shape"),
    ],
)
def test_a_csr_linear_refuses_a_bad_checkpoint_before_changing_anything(key, bad, message):
    """A CSR part or a bias that does not fit: a MaskparamError naming it, the layer unchanged
    (torch used to copy the bias first)."""
    first, second = _two_masks()
    state = second.state_dict()
    state[key] = bad(state[key])
    before = [m.weight.to_dense().clone() for m in first if isinstance(m, nn.Linear)]
    bias = first[0].bias.clone()
    with pytest.raises(mp.MaskparamError, match=message):
        first.load_state_dict(state)
    assert torch.equal(first[0].bias, bias)
    assert torch.equal(first[0].weight.to_dense(), before[0])


def test_a_state_dict_of_the_csr_weight_under_weight_still_loads():
    """A state_dict saved before the parts (the CSR tensor under 'weight') loads into a
    CSRLinear; a dense weight there is refused by name."""
    first, second = _two_masks()
    old = {"0.weight": second[0].weight.detach(), "0.bias": second[0].bias.detach()}
    first[0].load_state_dict({k.removeprefix("0."): v for k, v in old.items()})
    assert torch.equal(first[0].weight.to_dense(), second[0].weight.to_dense())
    with pytest.raises(mp.MaskparamError, match="stores this weight dense"):
        first[0].load_state_dict({"weight": torch.zeros(8, 16), "bias": torch.zeros(8)})


def test_a_csr_linear_given_the_wrong_number_of_features_says_what_nn_linear_says():
    dense = nn.Linear(32, 64)
    with torch.no_grad():
        dense.weight.mul_(torch.rand(64, 32) < 0.1)
    sparse = mp.to_sparse(nn.Sequential(copy.deepcopy(dense)), layout="csr")[0]
    inputs = torch.randn(5, 31)
    with pytest.raises(RuntimeError) as expected:
        dense(inputs)
    with pytest.raises(RuntimeError) as got:
        sparse(inputs)
    assert str(got.value) == str(expected.value)
