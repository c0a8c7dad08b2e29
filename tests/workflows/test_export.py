"""``mp.to_sparse``: a baked, pruned model in its fastest layout, with the same outputs, a smaller
state_dict, and everything torch does with a model (save, load, export, deepcopy)."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn

import maskparam as mp


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
    assert state.keys() == dense.state_dict().keys()
    assert state["2.weight"].crow_indices().dtype == torch.int32  # 32-bit indices: they fit
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
    choices = [c for c in timed.sparse_choices if c.zeros >= mp._sparse.MIN_ZEROS]
    assert len(choices) >= 2
    for choice in choices:  # timed, and the faster one kept, by the margin
        assert choice.dense_ms is not None
        assert choice.sparse_ms is not None
        assert (choice.layout == "csr") == (choice.dense_ms >= 1.1 * choice.sparse_ms)


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
        (
            lambda m: mp.to_sparse(mp.apply_mask(m, {"0.weight": mp.Triangular()})),
            "bake first",
        ),
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
    assert not mp._sparse._semi_structured_candidate(layer.weight)


def test_a_meta_model_is_refused():
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(4, 4))
    with pytest.raises(mp.MaskparamError, match="meta device"):
        mp.to_sparse(model)
