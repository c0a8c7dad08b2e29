"""Inside Hugging Face's Trainer (real transformers, accelerate and safetensors; models built
from small configs, no downloads): GradualPruning resumed halfway ends where the uninterrupted
run ends, the README's GPT-2 new-token example checkpoints and resumes bit-identically, and a
run ends with a plain checkpoint that ``from_pretrained`` of the plain class loads."""

from __future__ import annotations

import copy

import pytest
import torch

import maskparam as mp

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")
safetensors_torch = pytest.importorskip("safetensors.torch")
from maskparam.integrations.transformers import GradualPruningCallback

pytestmark = pytest.mark.slow

CONFIG = {"n_layer": 2, "n_embd": 32, "n_head": 2, "vocab_size": 100, "n_positions": 32,
          "bos_token_id": 0, "eos_token_id": 0}  # fmt: skip
MATRICES = {lambda name, module, t: t.dim() == 2: mp.masks.global_magnitude}  # wte is tied
MATRIX = "transformer.h.0.mlp.c_fc.weight"


class Tokens(torch.utils.data.Dataset):
    def __init__(self, vocab: int = 100) -> None:
        self.ids = torch.randint(0, vocab, (80, 16), generator=torch.Generator().manual_seed(0))

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def _gpt2(seed: int) -> transformers.GPT2LMHeadModel:
    torch.manual_seed(seed)
    transformers.logging.set_verbosity_error()
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(**CONFIG))


def _trainer(model, out, *, callbacks=(), max_steps: int = 30, dataset=None, **kwargs):
    args = transformers.TrainingArguments(
        str(out), max_steps=max_steps, per_device_train_batch_size=8, save_steps=10,
        logging_steps=1000, report_to=[], use_cpu=True, disable_tqdm=True, learning_rate=1e-3,
        weight_decay=0.1, seed=0, dataloader_num_workers=0, **kwargs,
    )  # fmt: skip
    return transformers.Trainer(
        model=model, args=args, train_dataset=dataset or Tokens(), callbacks=list(callbacks)
    )


def _same_state(a: torch.nn.Module, b: torch.nn.Module) -> None:
    ours, theirs = a.state_dict(), b.state_dict()
    assert ours.keys() == theirs.keys()
    assert [k for k in ours if not torch.equal(ours[k], theirs[k])] == []


def _pruned(seed: int) -> tuple[torch.nn.Module, mp.GradualPruning]:
    model = _gpt2(seed)
    return model, mp.GradualPruning(model, MATRICES, sparsity=0.9, end=20, every=2)


def test_gradual_pruning_resumed_halfway_through_the_trainer_ends_like_the_full_run(tmp_path):
    model, pruning = _pruned(0)
    _trainer(model, tmp_path / "full", callbacks=[GradualPruningCallback(pruning)]).train()
    total = sum(m.numel() for m in mp.kept_masks(model).values())
    assert pruning.sparsity == 0.9
    assert mp.sparsity(model) == round(0.9 * total) / total
    assert "compact" in mp.summary(model).tensors[-1].constraint  # a resized layout resumes too

    fresh, resumed = _pruned(1)  # another init: everything comes from the checkpoint
    trainer = _trainer(fresh, tmp_path / "resumed", callbacks=[GradualPruningCallback(resumed)])
    trainer.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-10"))
    assert resumed.steps == 30
    assert resumed.sparsity == 0.9
    for name, kept in mp.kept_masks(model).items():
        assert torch.equal(mp.kept_entries(fresh, name), kept)
    _same_state(fresh, model)  # bit for bit, optimizer state and data order included


def test_a_trainer_resumed_from_a_checkpoint_without_the_schedule_is_refused(tmp_path):
    model, pruning = _pruned(0)
    _trainer(model, tmp_path, callbacks=[GradualPruningCallback(pruning)], max_steps=10).train()
    path = tmp_path / "checkpoint-10" / "model.safetensors"
    saved = safetensors_torch.load_file(path)
    del saved["maskparam_pruning_steps"]  # as a checkpoint written without the schedule
    safetensors_torch.save_file(saved, path, metadata={"format": "pt"})
    fresh, resumed = _pruned(1)
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    trainer = _trainer(fresh, tmp_path / "again", callbacks=[GradualPruningCallback(resumed)])
    # The Trainer loads non-strictly; the refusal comes before anything is copied.
    with pytest.raises(mp.MaskparamError, match=r"GradualPruning .* but not its step count"):
        trainer.train(resume_from_checkpoint=str(tmp_path / "checkpoint-10"))
    assert all(torch.equal(v, fresh.state_dict()[k]) for k, v in before.items())

    # A count behind the Trainer's: refused before the first step.
    saved["maskparam_pruning_steps"] = torch.tensor(4)
    safetensors_torch.save_file(saved, path, metadata={"format": "pt"})
    fresh, resumed = _pruned(1)
    trainer = _trainer(fresh, tmp_path / "again", callbacks=[GradualPruningCallback(resumed)])
    with pytest.raises(mp.MaskparamError, match=r"resumes at step 10, but the model's state_dict"):
        trainer.train(resume_from_checkpoint=str(tmp_path / "checkpoint-10"))


def test_a_new_trainer_on_a_pruned_model_counts_on_from_the_models_steps(tmp_path):
    model, pruning = _pruned(0)
    _trainer(
        model, tmp_path / "a", callbacks=[GradualPruningCallback(pruning)], max_steps=10
    ).train()
    _trainer(
        model, tmp_path / "b", callbacks=[GradualPruningCallback(pruning)], max_steps=10
    ).train()
    assert pruning.steps == 20
    assert pruning.sparsity == 0.9


@pytest.mark.parametrize("optim", ["adamw_torch_fused", "sgd", "adafactor"])
def test_the_trainers_optimizers_follow_the_schedule(tmp_path, optim):
    # Hugging Face's Adafactor factors a matrix's second moment: not an elementwise optimizer,
    # so the masks stay dense under it.
    model, pruning = _pruned(0)
    callbacks = [GradualPruningCallback(pruning)]
    _trainer(model, tmp_path, callbacks=callbacks, max_steps=20, optim=optim).train()
    total = sum(m.numel() for m in mp.kept_masks(model).values())
    assert mp.sparsity(model) == round(0.9 * total) / total
    assert mp.verify(model) == []


def _new_token_model(seed: int) -> transformers.GPT2LMHeadModel:
    # The README's example: two new tokens, wte tied to lm_head, only the new rows train.
    model = _gpt2(seed)
    model.resize_token_embeddings(102, mean_resizing=False)
    mp.apply_mask(model, {"transformer.wte.weight": mp.Freeze(dim=0, index=range(100))})
    return model


def test_the_new_token_example_checkpoints_and_resumes_bit_identically(tmp_path):
    model = _new_token_model(0)
    old_rows = model.transformer.wte.weight[:100].detach().clone()
    model.save_pretrained(tmp_path / "before")  # save_pretrained works on the tied constraint
    _trainer(model, tmp_path / "full", dataset=Tokens(102)).train()
    assert torch.equal(model.transformer.wte.weight[:100], old_rows)  # bit-identical
    assert torch.equal(model.lm_head.weight, model.transformer.wte.weight)  # still tied

    fresh = _new_token_model(1)
    trainer = _trainer(fresh, tmp_path / "resumed", dataset=Tokens(102))
    trainer.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-20"))
    _same_state(fresh, model)
    saved = safetensors_torch.load_file(tmp_path / "full" / "checkpoint-30" / "model.safetensors")
    assert not any(k.startswith("lm_head.") for k in saved)  # the tie is saved once


def test_a_run_ends_with_a_plain_checkpoint_that_from_pretrained_loads(tmp_path):
    model, pruning = _pruned(0)
    trainer = _trainer(model, tmp_path, callbacks=[GradualPruningCallback(pruning)], max_steps=20)
    trainer.train()
    ids = torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(1))
    model.eval()
    with torch.no_grad():
        expected = model(ids).logits
    # Mid-run: a baked copy; at the end: bake the model itself.
    mp.remove_parametrizations(copy.deepcopy(model)).save_pretrained(tmp_path / "copy")
    mp.remove_parametrizations(model)
    trainer.save_model(str(tmp_path / "final"))
    for path in ("copy", "final"):
        plain, info = transformers.GPT2LMHeadModel.from_pretrained(
            tmp_path / path, output_loading_info=True
        )
        assert not any(info.values()), info  # no missing, unexpected or mismatched keys
        with torch.no_grad():
            assert torch.equal(plain.eval()(ids).logits, expected)
        zeros = sum(int((p == 0).sum()) for n, p in plain.named_parameters() if p.dim() == 2)
        assert zeros >= round(0.9 * sum(p.numel() for p in plain.parameters() if p.dim() == 2))


def test_a_converted_model_saves_with_save_pretrained_and_loads_back_equal(tmp_path):
    model, pruning = _pruned(0)
    _trainer(
        model, tmp_path / "run", callbacks=[GradualPruningCallback(pruning)], max_steps=20
    ).train()
    mp.remove_parametrizations(model)
    model.eval()
    sparse = mp.to_sparse(copy.deepcopy(model), layout="csr")  # "auto" times these small ones dense
    sparse.save_pretrained(tmp_path / "sparse")
    other = copy.deepcopy(model)
    with torch.no_grad():
        for p in other.parameters():
            p.mul_(2)  # other values, the same zeros: only the load can make it equal
    again = mp.to_sparse(other, layout="csr")
    saved = safetensors_torch.load_file(tmp_path / "sparse" / "model.safetensors")
    assert any(k.endswith("weight_crow_indices") for k in saved)  # CSR weights, as plain tensors
    # HF saves a tied weight once (lm_head.weight is wte's); the tie gives it back.
    assert again.load_state_dict(saved, strict=False).missing_keys == ["lm_head.weight"]
    assert again.lm_head.weight is again.transformer.wte.weight
    ids = torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(again(ids).logits, sparse(ids).logits)


def test_any_update_masks_schedule_follows_the_trainers_steps_and_resumes(tmp_path):
    from maskparam.integrations.transformers import UpdateMasksCallback

    def rules_at(step: int):  # prune to 50% at step 10, tighten to 80% at step 20
        return {MATRIX: mp.masks.magnitude(step / 25)} if step in (10, 20) else None

    def built(seed: int):
        model = _gpt2(seed)
        mp.apply_mask(model, {MATRIX: mp.Mask(mp.masks.magnitude(0.0), layout="dense")})
        return model

    model = built(0)
    _trainer(model, tmp_path / "full", callbacks=[UpdateMasksCallback(model, rules_at)]).train()
    fresh = built(1)
    trainer = _trainer(fresh, tmp_path / "again", callbacks=[UpdateMasksCallback(fresh, rules_at)])
    trainer.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-10"))
    assert mp.sparsity(model) == pytest.approx(0.8, abs=0.01)
    _same_state(fresh, model)
