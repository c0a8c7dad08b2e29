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
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))
    fully_shard(model)
    result: dict[str, str] = {}
    try:
        mp.apply_mask(model, _fsdp_rules())
    except mp.MaskparamError as refused:
        result["error"] = str(refused)
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


def test_fsdp2_apply_after_fully_shard_is_refused():
    pytest.importorskip("torch.distributed.fsdp")
    for result in _spawn(_fsdp_after_worker):
        assert "already sharded (a DTensor" in result["error"]
        assert "apply_mask before fully_shard" in result["error"]
