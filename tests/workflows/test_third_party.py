"""Real third-party models built from small configs (no downloads): Hugging Face transformers
(GPT-2 with tied embeddings, BERT in a subspace, save_pretrained round trips) and x-transformers;
skipped where not installed."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import maskparam as mp

pytestmark = pytest.mark.slow  # importing transformers alone takes seconds


def _train(model: nn.Module, parameters, batch, steps: int = 3) -> None:
    # Not the shared `train` fixture: a Hugging Face model computes its own loss from labels.
    optimizer = torch.optim.AdamW(parameters, lr=0.05, weight_decay=0.1)
    for _ in range(steps):
        optimizer.zero_grad()
        model(**batch).loss.backward()
        optimizer.step()


def _bake_save_reload_identical(model: nn.Module, tokens: torch.Tensor, path) -> None:
    """Bake, save_pretrained, from_pretrained: the reloaded model gives identical logits."""
    assert mp.verify(model) == []
    model.eval()
    with torch.no_grad():
        logits = model(tokens).logits
    mp.remove_parametrizations(model)
    model.save_pretrained(path)
    reloaded = type(model).from_pretrained(path).eval()
    with torch.no_grad():
        assert torch.equal(reloaded(tokens).logits, logits)


def test_gpt2_trains_only_new_token_rows_of_its_tied_embeddings(tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        n_layer=2,
        n_embd=32,
        n_head=2,
        vocab_size=100,
        n_positions=32,
        bos_token_id=0,
        eos_token_id=0,
    )
    model = transformers.GPT2LMHeadModel(config)
    model.resize_token_embeddings(102)  # two newly added tokens
    assert model.lm_head.weight is model.transformer.wte.weight
    before = model.transformer.wte.weight.detach().clone()
    old_rows = list(range(100))
    mp.apply_mask(model, {"transformer.wte.weight": mp.Freeze(dim=0, index=old_rows)})
    tokens = torch.randint(0, 102, (2, 12))
    tokens[:, ::3] = 101
    embedding = model.transformer.wte.parametrizations.weight.original
    _train(model, [embedding], {"input_ids": tokens, "labels": tokens})
    wte, head = model.transformer.wte.weight.detach(), model.lm_head.weight.detach()
    assert torch.equal(wte, head)  # the tie holds: the output layer sees the same rows
    assert torch.equal(wte[:100], before[:100])  # old tokens: bit-identical
    assert not torch.equal(wte[100:], before[100:])  # new tokens trained
    _bake_save_reload_identical(model, tokens, tmp_path)


def test_bert_trains_in_a_global_subspace(tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=60, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=32, num_labels=3,
    )  # fmt: skip
    model = transformers.BertForSequenceClassification(config)
    total = sum(p.numel() for p in model.parameters())
    mp.apply_mask(model, {"*": mp.Subspace(40, projection="fastfood", group="all")})
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert [p.numel() for p in trainable] == [40]
    assert mp.summary(model).tensors[0].constraint.endswith(f"of D={total:,}, group 'all')")
    tokens = torch.randint(0, 60, (4, 10))
    _train(model, trainable, {"input_ids": tokens, "labels": torch.tensor([0, 1, 2, 1])})
    _bake_save_reload_identical(model, tokens, tmp_path)


def test_x_transformers_decoder_with_masks(train):
    x_transformers = pytest.importorskip("x_transformers")
    torch.manual_seed(0)
    model = x_transformers.TransformerWrapper(
        num_tokens=50, max_seq_len=16, attn_layers=x_transformers.Decoder(dim=32, depth=2, heads=2)
    )
    mp.apply_mask(
        model,
        {
            lambda name, module, t: t.dim() == 2 and "attn_layers" in name: mp.Mask(
                mp.masks.random(0.5)
            )
        },
    )
    masked = [r.name for r in mp.summary(model).tensors]
    assert masked
    tokens = torch.randint(0, 50, (2, 16))
    train(model, tokens, steps=2)
    for ref_name in masked:
        module_name, local = ref_name.rsplit(".", 1)
        module = model.get_submodule(module_name)
        kept = mp.kept_entries(model, ref_name)
        assert torch.equal(getattr(module, local).detach()[~kept], torch.zeros(int((~kept).sum())))
    assert mp.verify(model) == []
    model.eval()
    with torch.no_grad():
        expected = model(tokens)
        mp.remove_parametrizations(model)
        assert torch.equal(model(tokens), expected)


def test_llama_global_subspace_passes_over_rope_buffers_and_round_trips(tmp_path):
    # The 0.1 failure: "*" took RoPE's non-persistent inv_freq, which baking made persistent, so
    # from_pretrained reported unexpected keys and other logits.
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    rules = {"*": mp.Subspace(40, projection="fastfood", group="all")}
    passed_over = {name for _, name, _ in mp.preview(model, rules).passed_over}
    assert "model.rotary_emb.inv_freq" in passed_over
    mp.apply_mask(model, rules)
    ids = torch.randint(0, 64, (2, 8))
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.05)
    for _ in range(3):
        optimizer.zero_grad()
        model(ids, labels=ids).loss.backward()
        optimizer.step()
    assert mp.verify(model) == []
    with torch.no_grad():
        before = model(ids).logits
    mp.remove_parametrizations(model)
    model.save_pretrained(tmp_path)
    again, info = transformers.LlamaForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert not any(info.values()), info  # no missing, unexpected or mismatched keys
    with torch.no_grad():
        assert torch.equal(again(ids).logits, before)
