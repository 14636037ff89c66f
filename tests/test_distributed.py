"""Relevance under torch.distributed (2 CPU processes, gloo): equals one process over the union of shards."""

from __future__ import annotations

import os
import socket
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from monai.networks.nets import resnet18

from monai_iaprune import channel_relevance
from monai_iaprune.relevance.distributed import all_reduce_relevance


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _data():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(10, 1, 16, 16, generator=g)
    y = torch.randint(0, 2, (10,), generator=g)
    return x, y


def _net():
    torch.manual_seed(0)
    return resnet18(spatial_dims=2, n_input_channels=1, num_classes=2)


def _worker(rank: int, world: int, port: int, out_dir: str, method: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        x, y = _data()
        # an uneven shard on purpose: rank 0 gets 6 samples in batches of 4, rank 1 gets 4
        idx = list(range(0, 6)) if rank == 0 else list(range(6, 10))
        batches = [(x[idx[i : i + 4]], y[idx[i : i + 4]]) for i in range(0, len(idx), 4)]
        rel = all_reduce_relevance(channel_relevance(_net(), batches, method, progress=False))
        torch.save({"values": dict(rel), "n": rel.num_samples}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("method", ["taylor"])
def test_all_reduced_relevance_equals_single_process(method):
    x, y = _data()
    single = channel_relevance(_net(), [(x[:5], y[:5]), (x[5:], y[5:])], method, progress=False)
    with tempfile.TemporaryDirectory() as d:
        mp.spawn(_worker, args=(2, _free_port(), d, method), nprocs=2, join=True)
        ranks = [torch.load(os.path.join(d, f"rank{r}.pt")) for r in range(2)]
    for r in ranks:
        assert r["n"] == 10
        assert set(r["values"]) == set(single)
        for name, v in single.items():
            torch.testing.assert_close(r["values"][name], v, rtol=1e-5, atol=1e-8)


def test_all_reduce_is_identity_without_process_group():
    x, y = _data()
    rel = channel_relevance(_net(), [(x, y)], "taylor", progress=False)
    assert all_reduce_relevance(rel) is rel
