"""Relevance under ``torch.distributed``: every rank scores its shard, sums and counts are all-reduced."""

from __future__ import annotations

import torch
import torch.distributed as dist

from monai_iaprune.relevance.collect import ChannelRelevance


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_reduce_relevance(relevance: ChannelRelevance, group=None) -> ChannelRelevance:
    """Combine per-rank relevance into the relevance of a single process over the union of the shards.

    Each rank holds means over its own ``num_samples``; the weighted sums and the counts are summed over
    ranks (in float64, in a fixed layer order so every rank reduces the same tensors), then divided.
    Outside a process group (or with one process) the input is returned unchanged.

    Args:
        relevance: this rank's ``ChannelRelevance`` (from ``channel_relevance`` or a ``RelevanceCollector``).
        group: the process group; default the world.

    Raises:
        ValueError: ranks scored different layers or channel counts (their models differ).
    """
    if not is_distributed():
        return relevance
    names = sorted(relevance)
    sizes = [int(relevance[n].numel()) for n in names]
    layout = [None] * dist.get_world_size(group)
    dist.all_gather_object(layout, (names, sizes), group=group)
    if any(item != (names, sizes) for item in layout):
        raise ValueError("ranks hold relevance for different layers or channel counts: their models differ")
    device = (
        torch.device("cuda", torch.cuda.current_device())
        if dist.get_backend(group) == "nccl"
        else torch.device("cpu")
    )
    count = float(relevance.num_samples)
    flat = torch.cat(
        [relevance[n].double().flatten() * count for n in names]
        + [torch.tensor([count], dtype=torch.float64)]
    )
    flat = flat.to(device)
    dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
    flat = flat.cpu()
    total = flat[-1].item()
    if total <= 0:  # data-free criteria (magnitude, random) are the same on every rank already
        return relevance
    out, offset = {}, 0
    for n, s in zip(names, sizes):
        out[n] = (flat[offset : offset + s] / total).float().reshape(relevance[n].shape)
        offset += s
    return ChannelRelevance(out, relevance.method, int(round(total)), relevance.example_input)


def broadcast_module(module: torch.nn.Module, src: int = 0, group=None) -> None:
    """Copy every parameter and buffer of ``module`` from rank ``src`` to all ranks (architectures must match)."""
    if not is_distributed():
        return
    for t in list(module.parameters()) + list(module.buffers()):
        dist.broadcast(t.data, src=src, group=group)
