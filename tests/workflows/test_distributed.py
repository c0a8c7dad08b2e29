"""Distributed training on CPU with gloo, two processes: DistributedDataParallel (with and without
exclude_constants_from_ddp, _distributed.py) and FSDP2's fully_shard (apply_mask first; after
sharding it is refused)."""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp_spawn
from torch import nn

import maskparam as mp

pytestmark = [
    pytest.mark.skipif(not dist.is_available(), reason="torch.distributed unavailable"),
    pytest.mark.slow,  # two processes per test, a few seconds each
]


def _worker(rank: int, world: int, init_file: str, out_dir: str, exclude: bool) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.manual_seed(rank)  # different weights per rank: the masks differ until synchronised
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))
    mp.apply_mask(model, {
        "0.weight": mp.Mask(mp.masks.magnitude(0.5)),
        "2.weight": mp.Freeze(dim=0, index=[0, 1]),
    })  # fmt: skip
    if exclude:
        mp.exclude_constants_from_ddp(model)
    ddp = nn.parallel.DistributedDataParallel(model)  # broadcasts parameters from rank 0
    frozen = model[2].weight.detach()[[0, 1]].clone()
    optimizer = torch.optim.AdamW(ddp.parameters(), lr=0.05, weight_decay=0.1)
    generator = torch.Generator().manual_seed(100 + rank)  # each rank its own data
    # Not the shared `train` fixture: this runs in a spawned process, a fresh batch each step.
    for _ in range(4):
        optimizer.zero_grad()
        ddp(torch.randn(6, 8, generator=generator)).square().mean().backward()
        optimizer.step()
    rebroadcast = sum(b.numel() * b.element_size() for b in ddp.modules_buffers)
    torch.save(
        {
            "state": {k: v.clone() for k, v in model.state_dict().items()},
            "frozen_before": frozen,
            "frozen_after": model[2].weight.detach()[[0, 1]].clone(),
            "weight0": model[0].weight.detach().clone(),
            "rebroadcast_bytes": rebroadcast,
        },
        Path(out_dir) / f"rank{rank}.pt",
    )
    _exit_cleanly()


def _exit_cleanly() -> None:
    """Leave a worker once its results are saved. torch 2.13's gloo backend can abort a process in
    its C++ teardown ("terminate called without an active exception": SIGABRT, 1 run in ~7 here),
    after the test's work is done; os._exit skips that teardown."""
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


ROOT = str(Path(__file__).resolve().parents[2])


def _spawn(worker, *args) -> list[dict]:
    """Run ``worker(rank, 2, init_file, out_dir, *args)`` in two processes; return their results."""
    # Spawned children unpickle `worker` by importing tests.workflows.test_distributed, with the
    # parent's sys.path: under pytest's importlib mode the repository root is not on it by itself.
    if ROOT not in sys.path:
        sys.path.insert(0, ROOT)
    with tempfile.TemporaryDirectory() as out_dir:
        init_file = str(Path(out_dir) / "init")
        mp_spawn.spawn(worker, args=(2, init_file, out_dir, *args), nprocs=2, join=True)
        return [torch.load(Path(out_dir) / f"rank{r}.pt", weights_only=True) for r in range(2)]


# Re-sent before every forward unless excluded: the uint8 mask and the float32 frozen rows
# (the int64 index is a fixed tensor, no longer a buffer).
CONSTANT_BYTES = 16 * 8 + 2 * 16 * 4  # uint8 mask, float32 frozen rows (indices are fixed)


@pytest.mark.parametrize(("exclude", "rebroadcast_bytes"), [(False, CONSTANT_BYTES), (True, 0)])
def test_ddp_ranks_stay_identical_and_constraints_hold(exclude, rebroadcast_bytes):
    ranks = _spawn(_worker, exclude)
    for key, value in ranks[0]["state"].items():
        assert torch.equal(value, ranks[1]["state"][key]), key
    for result in ranks:
        assert torch.equal(result["frozen_after"], result["frozen_before"])
        # 50% magnitude: stored compact (layout "auto"); each rank drew its own mask, and DDP's
        # broadcast of rank 0's must move the free entries with it.
        mask = result["state"]["0.parametrizations.weight.0.free"].bool()
        assert torch.equal(result["weight0"][~mask], torch.zeros(int((~mask).sum())))
        assert torch.equal(result["weight0"], ranks[0]["weight0"])
    assert ranks[0]["rebroadcast_bytes"] == rebroadcast_bytes


def _fsdp_rules(layout: str = "auto") -> mp.Rules:
    return {
        "0.weight": mp.Mask(mp.masks.random(0.5), layout=layout),  # type: ignore[arg-type]
        "2.weight": mp.Freeze(dim=0, index=[0, 1]),
    }


def _fsdp_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    result = {}
    for layout in ("dense", "auto"):  # auto: compact at 50%, a 1-D original to shard
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))
        mp.apply_mask(model, _fsdp_rules(layout))
        mask = mp.kept_entries(model, "0.weight")
        for layer in (model[0], model[2]):
            fully_shard(layer)
        fully_shard(model)
        optimizer = torch.optim.AdamW(model.parameters(), lr=0.05, weight_decay=0.1)
        generator = torch.Generator().manual_seed(rank)
        # Not the shared `train` fixture (a spawned process), and the loop reads the gradient.
        for _ in range(3):
            optimizer.zero_grad()
            model(torch.randn(4, 8, generator=generator)).square().mean().backward()
            grad = model[0].parametrizations.weight.original.grad.full_tensor()
            optimizer.step()
        stored = model[0].parametrizations.weight.original.full_tensor().clone()
        if layout == "auto":  # the free entries only: lay them out in full, zeros elsewhere
            index = model[0].parametrizations.weight[0].index
            full = torch.zeros(mask.numel()).index_copy_(0, index, stored).view(mask.shape)
            result["compact_shape"] = tuple(stored.shape)
            result[f"{layout}_weight0"] = full
        else:
            result["masked_grad"] = grad[~mask].clone()
            result[f"{layout}_weight0"] = stored * mask
        result[f"{layout}_mask"] = mask
    torch.save(result, Path(out_dir) / f"rank{rank}.pt")
    _exit_cleanly()


def _fsdp_after_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))
    fully_shard(model)
    result: dict[str, object] = {
        "apply_mask": _refusal(lambda: mp.apply_mask(model, _fsdp_rules()))
    }

    # Applied first, then sharded: what needs the whole tensors is refused before any change.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))
    mp.apply_mask(model, _fsdp_rules())  # "0.weight" compact, "2.weight" frozen rows
    pruning = mp.GradualPruning(model, {"0.weight": mp.masks.magnitude}, sparsity=0.75, end=1)
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    fully_shard(model)
    before = {
        k: v.to_local().clone() if hasattr(v, "to_local") else v.clone()
        for k, v in model.state_dict().items()
    }
    calls = {
        "update_masks": lambda: mp.update_masks(
            model, {"0.weight": mp.masks.magnitude(0.75)}, optimizer=None
        ),
        "GradualPruning": pruning.step,
        "summary": lambda: mp.summary(model),
        "verify": lambda: mp.verify(model),
        "kept_entries": lambda: mp.kept_entries(model, "0.weight"),
        "frozen_entries": lambda: mp.frozen_entries(model, "2.weight"),
        "remove_parametrizations": lambda: mp.remove_parametrizations(model),
        "trainable_state_dict": lambda: mp.trainable_state_dict(model),
        "load_trainable_state_dict": lambda: mp.load_trainable_state_dict(
            model, {}, optimizer=None
        ),
    }
    for caller, call in calls.items():
        result[caller] = _refusal(call)
    after = model.state_dict()
    result["unchanged"] = after.keys() == before.keys() and all(
        torch.equal(after[k].to_local() if hasattr(after[k], "to_local") else after[k], v)
        for k, v in before.items()
    )
    # The recipe in the refusals: a full state dict into an unsharded model with the same rules.
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    torch.manual_seed(1)  # other weights, and another random mask the load replaces
    unsharded = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))
    mp.apply_mask(unsharded, _fsdp_rules())
    mp.GradualPruning(unsharded, {"0.weight": mp.masks.magnitude}, sparsity=0.75, end=1)
    mp.load_state_dict(unsharded, full)
    result["recipe_state"] = {k: v.clone() for k, v in unsharded.state_dict().items()}
    result["expected_state"] = expected
    result["recipe_verify"] = mp.verify(unsharded)
    result["recipe_trainable"] = mp.trainable_state_dict(unsharded)
    torch.save(result, Path(out_dir) / f"rank{rank}.pt")
    _exit_cleanly()


def test_fsdp2_apply_then_fully_shard_trains_with_the_constraints():
    pytest.importorskip("torch.distributed.fsdp")
    ranks = _spawn(_fsdp_worker)
    for layout in ("dense", "auto"):
        assert torch.equal(ranks[0][f"{layout}_weight0"], ranks[1][f"{layout}_weight0"])
    # Both layouts train the same kept entries to the same values (elementwise AdamW).
    assert torch.equal(ranks[0]["dense_mask"], ranks[0]["auto_mask"])
    assert ranks[0]["compact_shape"] == (int(ranks[0]["auto_mask"].sum()),)
    torch.testing.assert_close(ranks[0]["auto_weight0"], ranks[0]["dense_weight0"])
    for result in ranks:
        assert torch.equal(result["masked_grad"], torch.zeros_like(result["masked_grad"]))


def test_fsdp2_sharded_models_are_refused_with_the_full_state_dict_recipe():
    pytest.importorskip("torch.distributed.fsdp")
    for result in _spawn(_fsdp_after_worker):
        assert "already sharded (a DTensor" in result["apply_mask"]
        assert "apply_mask before fully_shard" in result["apply_mask"]
        for caller in ("update_masks", "GradualPruning", "summary", "verify", "kept_entries",
                       "frozen_entries", "remove_parametrizations", "trainable_state_dict",
                       "load_trainable_state_dict"):  # fmt: skip
            assert result[caller].startswith(f"{caller}: '0.weight' is sharded (a DTensor"), caller
            assert (
                "get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))"
                in result[caller]
            )
            assert f"mp.load_state_dict(unsharded, full) and call {caller} on it" in result[caller]
        assert "or change the masks before fully_shard" in result["update_masks"]
        assert result["unchanged"]
        # The recipe works: the unsharded copy holds exactly what was sharded.
        assert _same(result["recipe_state"], result["expected_state"])
        assert result["recipe_verify"] == []
        assert result["recipe_trainable"]


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _unchanged(model: nn.Module, before: dict[str, torch.Tensor]) -> bool:
    after = model.state_dict()
    return after.keys() == before.keys() and all(
        torch.equal(after[k], v) for k, v in before.items()
    )


def _refusal(call) -> str:
    try:
        call()
    except mp.MaskparamError as refused:
        return str(refused)
    return ""


def _train(wrapped: nn.Module, optimizer: torch.optim.Optimizer, generator, steps: int = 2) -> None:
    for _ in range(steps):
        optimizer.zero_grad()
        wrapped(torch.randn(6, 8, generator=generator)).square().mean().backward()
        optimizer.step()


def _ddp_mask_change_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    """Mask changes under DDP: the wrapper refused, a compact re-store refused unless the model is
    wrapped again, per-rank masks replaced by rank 0's (dense with DDP's defaults and with
    exclude_constants_from_ddp; compact under torch.compile)."""
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    ddp_type = nn.parallel.DistributedDataParallel
    result: dict[str, object] = {}
    generator = torch.Generator().manual_seed(100 + rank)  # each rank its own data

    # The wrapper itself: refused, nothing changes.
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))
    ddp = ddp_type(plain)
    before = _state(plain)
    result["apply_wrapper"] = _refusal(
        lambda: mp.apply_mask(ddp, {"0.weight": mp.Mask(mp.masks.magnitude(0.5))})
    )
    mp.apply_mask(plain, {"0.weight": mp.Mask(mp.masks.magnitude(0.5), layout="dense")})
    ddp = ddp_type(plain)
    before = _state(plain)
    result["update_wrapper"] = _refusal(
        lambda: mp.update_masks(ddp, {"*.weight": mp.masks.magnitude(0.75)}, optimizer=None)
    )
    result["pruning_wrapper"] = _refusal(
        lambda: mp.GradualPruning(ddp, {"0.weight": mp.masks.magnitude}, sparsity=0.5, end=2)
    )
    result["exclude_wrapper"] = _refusal(lambda: mp.exclude_constants_from_ddp(ddp))
    result["wrapper_unchanged"] = _unchanged(plain, before)

    # Compact under DDP: a mask change re-stores the Parameter. Refused, unless rewrap_ddp.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))
    mp.apply_mask(model, {"0.weight": mp.Mask(mp.masks.magnitude(0.5), layout="compact")})
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.05)
    ddp = ddp_type(model)
    _train(ddp, optimizer, generator)
    before = _state(model)
    moments = {
        k: v.clone() for k, v in optimizer.state[model[0].parametrizations.weight.original].items()
    }
    result["compact_refused"] = _refusal(
        lambda: mp.update_masks(model, {"0.weight": mp.masks.magnitude(0.75)}, optimizer=optimizer)
    )
    result["compact_unchanged"] = _unchanged(model, before) and all(
        torch.equal(optimizer.state[model[0].parametrizations.weight.original][k], v)
        for k, v in moments.items()
    )
    pruning = mp.GradualPruning(
        model,
        {"0.weight": mp.masks.magnitude},
        sparsity=0.75,
        end=1,
        initial_sparsity=0.5,
        optimizer=optimizer,
    )
    result["pruning_refused"] = _refusal(pruning.step)
    result["pruning_steps"] = pruning.steps
    # As many free entries as before (prune and regrow as many): written in place, DDP goes on.
    stored = model[0].parametrizations.weight.original
    mp.update_masks(model, {"0.weight": mp.masks.random(0.5, seed=7 + rank)}, optimizer=optimizer)
    result["same_parameter"] = model[0].parametrizations.weight.original is stored
    result["regrown_free"] = model[0].parametrizations.weight[0].free.clone()
    _train(ddp, optimizer, generator)
    result["regrown_state"] = _state(model)
    # The recipe: change the masks (random ones, drawn per rank: rank 0's win), wrap again, train.
    mp.update_masks(
        model, {"0.weight": mp.masks.random(0.25, seed=rank)}, optimizer=optimizer, rewrap_ddp=True
    )
    result["compact_free"] = model[0].parametrizations.weight[0].free.clone()
    ddp = ddp_type(model)
    _train(ddp, optimizer, generator)
    result["compact_state"] = _state(model)

    # Dense under DDP, per-rank masks (random, seeded by rank, like Wanda from each rank's data).
    for exclude in (False, True):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))
        mp.apply_mask(model, {"*.weight": mp.Mask(mp.masks.magnitude(0.5), layout="dense")})
        if exclude:
            mp.exclude_constants_from_ddp(model)
        optimizer = torch.optim.AdamW(model.parameters(), lr=0.05)
        ddp = ddp_type(model)
        _train(ddp, optimizer, generator)
        mp.update_masks(model, {"*.weight": mp.masks.random(0.5, seed=rank)}, optimizer=optimizer)
        result[f"dense{exclude}_masks"] = [mp.kept_entries(model, f"{i}.weight") for i in (0, 2)]
        _train(
            ddp, optimizer, generator, steps=3
        )  # would raise "Expected to have finished reduction"
        result[f"dense{exclude}_state"] = _state(model)
        result[f"dense{exclude}_weights"] = [model[i].weight.detach().clone() for i in (0, 2)]
        pruning = mp.GradualPruning(
            model,
            {"*.weight": mp.masks.magnitude},
            sparsity=0.75,
            end=1,
            initial_sparsity=0.5,
            optimizer=optimizer,
        )
        pruning.step()
        _train(ddp, optimizer, generator)
        result[f"dense{exclude}_pruned"] = _state(model)

    # Compact, compiled: rank 0's positions on every rank, and the compiled graph uses them.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))
    mp.apply_mask(model, {"0.weight": mp.Mask(mp.masks.random(0.5, seed=0), layout="compact")})
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    compiled = torch.compile(ddp_type(model), backend="eager")
    _train(compiled, optimizer, generator)
    mp.update_masks(model, {"0.weight": mp.masks.random(0.5, seed=rank + 1)}, optimizer=optimizer)
    _train(compiled, optimizer, generator)  # the same wrapper and compiled model
    probe = torch.ones(1, 8)
    result["compiled_out"] = compiled(probe).detach()
    result["compiled_eager_out"] = model(probe).detach()
    result["compiled_weight"] = model[0].weight.detach().clone()
    result["compiled_mask"] = mp.kept_entries(model, "0.weight")

    # Different plans on the ranks: refused on both, nothing changes.
    before = _state(model)
    rules = (
        {"0.weight": mp.masks.magnitude(0.75)}
        if rank == 0
        else {"0.weight": lambda t: torch.ones(1, 8, dtype=torch.bool)}
    )
    result["mismatch"] = _refusal(
        lambda: mp.update_masks(model, rules, optimizer=optimizer, rewrap_ddp=True)
    )
    result["mismatch_unchanged"] = _unchanged(model, before)
    torch.save(result, Path(out_dir) / f"rank{rank}.pt")
    _exit_cleanly()


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_ddp_mask_changes_keep_every_rank_on_rank0_masks_or_are_refused():
    ranks = _spawn(_ddp_mask_change_worker)
    r0, r1 = ranks
    for result in ranks:
        assert "the model is a DistributedDataParallel wrapper" in result["apply_wrapper"]
        assert (
            "mp.apply_mask(model, rules), then ddp = DistributedDataParallel(model)"
            in result["apply_wrapper"]
        )
        assert "pass the model inside it: update_masks(ddp.module, ...)" in result["update_wrapper"]
        assert (
            "pass the model inside it: GradualPruning(ddp.module, ...)" in result["pruning_wrapper"]
        )
        assert "mp.exclude_constants_from_ddp(model), then ddp" in result["exclude_wrapper"]
        assert result["wrapper_unchanged"]
        assert "changes how many entries this compact tensor stores" in result["compact_refused"]
        assert "layout='dense'" in result["compact_refused"]
        assert "update_masks(..., rewrap_ddp=True)" in result["compact_refused"]
        assert "GradualPruning(..., rewrap_ddp=True)" in result["pruning_refused"]
        assert result["compact_unchanged"]
        assert result["pruning_steps"] == 0
        assert "the ranks of the process group planned different mask changes" in result["mismatch"]
        assert result["mismatch_unchanged"]
    # The compact recipe: rank 0's mask (seed 0) on both ranks, and the ranks train on identically.
    expected = mp.masks.random(0.25, seed=0).build(torch.empty(16, 8), "0.weight")
    assert torch.equal(r0["compact_free"].bool(), expected)
    assert torch.equal(r1["compact_free"], r0["compact_free"])
    assert _same(r0["compact_state"], r1["compact_state"])
    # As many free entries: the same Parameter, rank 0's mask, still averaged by the same DDP.
    expected = mp.masks.random(0.5, seed=7).build(torch.empty(16, 8), "0.weight")
    for result in ranks:
        assert result["same_parameter"]
        assert torch.equal(result["regrown_free"].bool(), expected)
    assert _same(r0["regrown_state"], r1["regrown_state"])
    for exclude in (False, True):
        for i, (m0, m1) in enumerate(
            zip(r0[f"dense{exclude}_masks"], r1[f"dense{exclude}_masks"], strict=True)
        ):
            shape, name = ((16, 8), "0.weight") if i == 0 else ((4, 16), "2.weight")
            assert torch.equal(m0, mp.masks.random(0.5, seed=0).build(torch.empty(shape), name))
            assert torch.equal(m1, m0)
            w = r1[f"dense{exclude}_weights"][i]
            assert torch.equal(w[~m1], torch.zeros(int((~m1).sum())))
        assert _same(r0[f"dense{exclude}_state"], r1[f"dense{exclude}_state"])
        assert _same(r0[f"dense{exclude}_pruned"], r1[f"dense{exclude}_pruned"])
    expected = mp.masks.random(0.5, seed=1).build(torch.empty(16, 8), "0.weight")
    for result in ranks:
        assert torch.equal(result["compiled_mask"], expected)
        assert torch.equal(
            result["compiled_weight"][~expected], torch.zeros(int((~expected).sum()))
        )
        assert torch.equal(result["compiled_out"], result["compiled_eager_out"])
    assert torch.equal(r0["compiled_weight"], r1["compiled_weight"])
