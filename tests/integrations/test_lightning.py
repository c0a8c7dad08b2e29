"""Inside Lightning (real ``lightning``): GradualPruningCallback resumed halfway ends where the
uninterrupted run ends, and maskparam's ModelPruning gives Lightning's own ModelPruning's masks
and weights bit for bit, keeps its masks in checkpoints and resumes with them."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

import maskparam as mp

pl = pytest.importorskip("lightning.pytorch")
from maskparam.integrations.lightning import GradualPruningCallback, ModelPruning

pytestmark = [
    pytest.mark.slow,
    # Lightning's advice for real runs (a logger, and so on): not these tests'.
    pytest.mark.filterwarnings("ignore::lightning.fabric.utilities.warnings.PossibleUserWarning"),
    # The resumed runs write their checkpoints apart from the first run's, on purpose.
    pytest.mark.filterwarnings("ignore:The dirpath has changed:UserWarning"),
]


@pytest.fixture(autouse=True)
def _quiet():
    logging.getLogger("lightning").setLevel(logging.ERROR)


class Regression(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 4))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.mse_loss(self.model(x), y)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-2)


def _data() -> torch.utils.data.DataLoader:
    g = torch.Generator().manual_seed(0)
    xy = torch.utils.data.TensorDataset(
        torch.randn(80, 8, generator=g), torch.randn(80, 4, generator=g)
    )
    return torch.utils.data.DataLoader(xy, batch_size=8)  # 10 steps an epoch


def _trainer(callbacks, **kwargs) -> pl.Trainer:
    return pl.Trainer(
        callbacks=callbacks, logger=False, enable_progress_bar=False, enable_model_summary=False,
        accelerator="cpu", **kwargs,
    )  # fmt: skip


def _same_state(a: nn.Module, b: nn.Module) -> None:
    ours, theirs = a.state_dict(), b.state_dict()
    assert sorted(ours) == sorted(theirs)
    assert [k for k in ours if not torch.equal(ours[k], theirs[k])] == []


def _scheduled(seed: int) -> tuple[Regression, mp.GradualPruning]:
    torch.manual_seed(seed)
    module = Regression()
    rules = {"*.weight": mp.masks.magnitude}
    return module, mp.GradualPruning(module.model, rules, sparsity=0.9, end=20, every=2)


def test_gradual_pruning_resumed_halfway_through_fit_ends_like_the_full_run(tmp_path):
    def checkpoints():  # every 10 steps: at the end of each epoch (Lightning resumes epochs)
        return pl.callbacks.ModelCheckpoint(
            dirpath=tmp_path, every_n_train_steps=10, save_top_k=-1, filename="{step}"
        )

    module, pruning = _scheduled(0)
    _trainer([GradualPruningCallback(pruning), checkpoints()], max_steps=30).fit(module, _data())
    assert pruning.steps == 30
    assert pruning.sparsity == 0.9
    assert mp.sparsity(module) == (round(0.9 * 256) + round(0.9 * 128)) / 384

    fresh, resumed = _scheduled(1)
    (tmp_path / "again").mkdir()
    again = pl.callbacks.ModelCheckpoint(
        dirpath=tmp_path / "again", every_n_train_steps=10, save_top_k=-1, filename="{step}"
    )
    _trainer([GradualPruningCallback(resumed), again], max_steps=30).fit(
        fresh, _data(), ckpt_path=tmp_path / "step=10.ckpt"
    )
    assert resumed.steps == 30
    assert resumed.sparsity == 0.9
    for name, kept in mp.kept_masks(module).items():
        assert torch.equal(mp.kept_entries(fresh, name), kept)
    _same_state(fresh, module)


@pytest.mark.parametrize("count", [None, 4], ids=["without the count", "a count behind"])
def test_a_fit_resumed_ahead_of_the_models_count_is_refused(tmp_path, count):
    module, pruning = _scheduled(0)
    _trainer([GradualPruningCallback(pruning)], max_steps=10, default_root_dir=tmp_path).fit(
        module, _data()
    )
    path = tmp_path / "ten.ckpt"
    checkpoint = torch.load(next(tmp_path.rglob("*.ckpt")), weights_only=False)
    if count is None:
        del checkpoint["state_dict"]["model.maskparam_pruning_steps"]
    else:
        checkpoint["state_dict"]["model.maskparam_pruning_steps"] = torch.tensor(count)
    torch.save(checkpoint, path)
    fresh, resumed = _scheduled(1)
    fresh.strict_loading = False  # a strict load would report the missing count too
    message = "but not its step count" if count is None else "resumes at step 10, but the model"
    with pytest.raises(mp.MaskparamError, match=message):
        _trainer(
            [GradualPruningCallback(resumed)], max_steps=20, default_root_dir=tmp_path / "again"
        ).fit(fresh, _data(), ckpt_path=path)


class _Refresh(pl.Callback):
    """A forward before pruning: torch's prune ranks a pruned tensor on the weight of its last
    forward (one optimizer step old); maskparam ranks the current weights. After a forward they
    are the same, and both callbacks must give the same masks."""

    def on_train_epoch_end(self, trainer, pl_module):
        with torch.no_grad():
            pl_module.model(torch.zeros(1, 8))


def _pruned_by(callback_class, **kwargs) -> Regression:
    torch.manual_seed(0)
    module = Regression()
    _trainer([_Refresh(), callback_class(**kwargs)], max_epochs=4, enable_checkpointing=False).fit(
        module, _data()
    )
    return module


CASES = {
    "l1 global": {"pruning_fn": "l1_unstructured", "amount": 0.3},
    "l1 per tensor": {"pruning_fn": "l1_unstructured", "amount": 0.3, "use_global_unstructured": False},
    "l1, a number of entries": {"pruning_fn": "l1_unstructured", "amount": 7},
    "random": {"pruning_fn": "random_unstructured", "amount": 0.3},
    "ln structured": {
        "pruning_fn": "ln_structured", "amount": 0.25, "use_global_unstructured": False,
        "pruning_dim": 0, "pruning_norm": 2, "parameter_names": ["weight"],
    },
    "random structured": {
        "pruning_fn": "random_structured", "amount": 0.25, "use_global_unstructured": False,
        "pruning_dim": 1, "parameter_names": ["weight"],
    },
}  # fmt: skip


@pytest.mark.parametrize(
    "lottery",
    ["no rewind", "one rewind", "one resampled rewind"],
)
@pytest.mark.parametrize("case", list(CASES))
def test_model_pruning_gives_lightnings_masks_and_weights_bit_for_bit(case, lottery):
    kwargs = dict(CASES[case])
    if lottery != "no rewind":
        # One pruning and rewind: after its first rewind Lightning's snapshot shares storage
        # with the weights, so its later rewinds reset to the current values (maskparam's go
        # back to the values fit began with, every time).
        kwargs["apply_pruning"] = lambda epoch: epoch == 1
        # Resampled: each module's reset_parameters draws, in the model's order, as Lightning's.
        kwargs["resample_parameters"] = lottery == "one resampled rewind"
    else:
        kwargs["use_lottery_ticket_hypothesis"] = False
    theirs = _pruned_by(pl.callbacks.ModelPruning, **kwargs)
    ours = _pruned_by(ModelPruning, **kwargs)
    assert not mp.summary(ours).tensors  # made permanent: plain tensors, like Lightning's
    _same_state(ours, theirs)
    assert sum(int((p == 0).sum()) for p in ours.parameters()) > 0


def test_model_pruning_keeps_its_masks_in_checkpoints_and_rewinds_after_a_resume(tmp_path):
    def run(ckpt_path=None, epochs: int = 4) -> tuple[Regression, ModelPruning]:
        torch.manual_seed(0 if ckpt_path is None else 1)
        module = Regression()
        pruning = ModelPruning("l1_unstructured", amount=0.3, make_pruning_permanent=False)
        where = tmp_path / ("full" if ckpt_path is None else "resumed")
        saver = pl.callbacks.ModelCheckpoint(dirpath=where, save_top_k=-1, filename="{epoch}")
        trainer = _trainer([pruning, saver], max_epochs=epochs)
        trainer.fit(module, _data(), ckpt_path=ckpt_path)
        return module, pruning

    full, pruning = run()
    initial = dict(pruning.initial)
    checkpoint = torch.load(tmp_path / "full" / "epoch=1.ckpt", weights_only=False)
    assert "model.0.parametrizations.weight.0.mask" in checkpoint["state_dict"]
    resumed, resumed_pruning = run(tmp_path / "full" / "epoch=1.ckpt")
    _same_state(resumed, full)  # masks, weights, and every rewind to the first run's values
    assert all(torch.equal(resumed_pruning.initial[k], v) for k, v in initial.items())
    for name, kept in mp.kept_masks(full).items():
        assert torch.equal(mp.kept_entries(resumed, name), kept)
    # 0.7**4 of the entries remain: "auto" stores them compact, and the resume did too.
    assert all("compact" in t.constraint for t in mp.summary(resumed).tensors)


class _TiedModule(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(16, 8)
        self.dec = nn.Linear(8, 16, bias=False)
        self.dec.weight = self.emb.weight

    def training_step(self, batch, batch_idx):
        (ids,) = batch
        return nn.functional.cross_entropy(self.dec(self.emb(ids)), ids)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-2)


def test_model_pruning_prunes_a_tied_weight_once_and_keeps_the_tie():
    torch.manual_seed(0)
    module = _TiedModule()
    ids = torch.utils.data.TensorDataset(torch.randint(0, 16, (40,)))
    pruning = ModelPruning("l1_unstructured", amount=0.3, parameter_names=["weight"])
    _trainer([pruning], max_epochs=2, enable_checkpointing=False).fit(
        module, torch.utils.data.DataLoader(ids, batch_size=8)
    )
    assert pruning.names == ["emb.weight"]  # once, under its first holder
    assert module.dec.weight is module.emb.weight  # baked, still one tensor
    assert int((module.emb.weight == 0).sum()) == 128 - round(0.7 * round(0.7 * 128))


def test_model_pruning_refuses_tensors_it_cannot_prune_before_anything_changes(tmp_path):
    def fit(module, callbacks):
        _trainer(callbacks, max_epochs=1, enable_checkpointing=False).fit(module, _data())

    torch.manual_seed(0)
    module = Regression()
    structured = ModelPruning(
        "ln_structured", use_global_unstructured=False, pruning_dim=0, pruning_norm=2
    )  # the default parameter_names include the biases
    with pytest.raises(mp.MaskparamError, match=r"'model.0.bias': LnStructured prunes slices"):
        fit(module, [structured])
    assert not mp.summary(module).tensors
    twice = ModelPruning("l1_unstructured", parameters_to_prune=[(module.model[0], "weight")] * 2)
    with pytest.raises(mp.MaskparamError, match=r"names 'model.0.weight' twice"):
        fit(module, [twice])
    schedule = mp.GradualPruning(
        module.model, {"0.weight": mp.masks.magnitude}, sparsity=0.5, end=4
    )
    with pytest.raises(mp.MaskparamError, match=r"'model.0.weight': is masked already"):
        fit(module, [GradualPruningCallback(schedule), ModelPruning("l1_unstructured")])


def test_a_baked_checkpoint_is_refused_before_it_loads_into_the_masked_model(tmp_path):
    torch.manual_seed(0)
    module = Regression()
    lightnings = pl.callbacks.ModelPruning("l1_unstructured", amount=0.3)  # saves baked weights
    saver = pl.callbacks.ModelCheckpoint(dirpath=tmp_path, filename="baked")
    _trainer([lightnings, saver], max_epochs=1).fit(module, _data())
    torch.manual_seed(1)
    fresh = Regression()
    with pytest.raises(mp.MaskparamError, match=r"holds 'model.0.weight' as a plain tensor"):
        _trainer([ModelPruning("l1_unstructured", amount=0.3)], max_epochs=2).fit(
            fresh, _data(), ckpt_path=tmp_path / "baked.ckpt"
        )


def test_model_pruning_refuses_what_it_cannot_do():
    with pytest.raises(mp.MaskparamError, match=r"global ranking .* ranks single entries"):
        ModelPruning("ln_structured", pruning_dim=0, pruning_norm=2)
    with pytest.raises(mp.MaskparamError, match=r"needs the dimension and the norm"):
        ModelPruning("ln_structured", use_global_unstructured=False)
    with pytest.raises(mp.MaskparamError, match=r"not a function such as prune.l1_unstructured"):
        ModelPruning(torch.nn.utils.prune.l1_unstructured)
    with pytest.raises(mp.MaskparamError, match=r"prunes 'weight' and 'bias'"):
        ModelPruning("l1_unstructured", parameter_names=["scale"])


def test_any_update_masks_schedule_runs_once_per_optimizer_step_and_resumes(tmp_path):
    from maskparam.integrations.lightning import UpdateMasksCallback

    calls = []

    def rules_at(step: int):
        calls.append(step)
        return {"model.0.weight": mp.masks.magnitude(step / 25)} if step in (10, 20) else None

    def built(seed: int) -> Regression:
        torch.manual_seed(seed)
        module = Regression()
        return mp.apply_mask(module, {"model.0.weight": mp.Mask(mp.masks.magnitude(0.0))})

    module = built(0)
    saver = pl.callbacks.ModelCheckpoint(
        dirpath=tmp_path, every_n_train_steps=10, save_top_k=-1, filename="{step}"
    )
    _trainer(
        [UpdateMasksCallback(module, rules_at), saver], max_steps=25, accumulate_grad_batches=2
    ).fit(module, _data())
    assert calls == list(range(1, 26))  # once per optimizer step, not per batch
    assert mp.sparsity(module) == round(0.8 * 256) / 256
    fresh = built(1)
    again = pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "again", every_n_train_steps=10)
    _trainer(
        [UpdateMasksCallback(fresh, rules_at), again], max_steps=25, accumulate_grad_batches=2
    ).fit(fresh, _data(), ckpt_path=tmp_path / "step=10.ckpt")
    for name, kept in mp.kept_masks(module).items():
        assert torch.equal(mp.kept_entries(fresh, name), kept)
