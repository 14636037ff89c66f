"""Relevance under ``torch.distributed``: every rank scores its shard, sums and counts are all-reduced."""

from __future__ import annotations

import torch
import torch.distributed as dist

from monai_iaprune.relevance.blocks import BlockRelevance
from monai_iaprune.relevance.collect import ChannelRelevance
from monai_iaprune.utils.ddp import broadcast_module, is_distributed


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
    device = _backend_device(group)
    count = float(relevance.num_samples)
    flat = torch.cat(
        [relevance[n].double().flatten() * count for n in names]
        + [torch.tensor([count], dtype=torch.float64)]
    )
    flat = flat.to(device)
    dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
    flat = flat.cpu()
    total = flat[-1].item()
    if total <= 0:  # data-free criteria: take rank 0's scores (``random`` would differ per rank otherwise)
        return _broadcast_values(relevance, names, group)
    out, offset = {}, 0
    for n, s in zip(names, sizes):
        out[n] = (flat[offset : offset + s] / total).float().reshape(relevance[n].shape)
        offset += s
    return ChannelRelevance(out, relevance.method, int(round(total)), relevance.example_input)


def _backend_device(group=None) -> torch.device:
    """Where collectives of ``group`` need their tensors: the current GPU for NCCL, else the CPU."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _broadcast_values(relevance: ChannelRelevance, names: list[str], group=None) -> ChannelRelevance:
    device = _backend_device(group)
    flat = torch.cat([relevance[n].double().flatten() for n in names]).to(device)
    dist.broadcast(flat, src=dist.get_global_rank(group, 0) if group is not None else 0, group=group)
    flat = flat.cpu()
    out, offset = {}, 0
    for n in names:
        s = int(relevance[n].numel())
        out[n] = flat[offset : offset + s].float().reshape(relevance[n].shape)
        offset += s
    return ChannelRelevance(out, relevance.method, relevance.num_samples, relevance.example_input)


def all_reduce_sums(
    sums: dict[str, torch.Tensor], count: int, group=None
) -> tuple[dict[str, torch.Tensor], int]:
    """Sum per-layer relevance sums and sample counts over ranks (the ``RelevanceCollector`` state).

    A rank that saw no sample holds no sums; it contributes zeros for the layers the others scored.

    Args:
        sums: ``{layer: 1-D float64 tensor}`` of summed per-sample relevance on this rank.
        count: samples behind ``sums`` on this rank.
        group: the process group; default the world.

    Returns:
        ``(sums, count)`` over all ranks; unchanged outside a process group.

    Raises:
        ValueError: ranks hold different channel counts for one layer (their models differ).
    """
    if not is_distributed():
        return sums, count
    layout: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(layout, {n: int(t.numel()) for n, t in sums.items()}, group=group)
    sizes: dict[str, int] = {}
    for rank_layout in layout:
        for n, s in rank_layout.items():
            if sizes.setdefault(n, s) != s:
                raise ValueError(
                    f"ranks hold relevance sums of different sizes for layer {n!r}: their models differ"
                )
    names = sorted(sizes)
    device = _backend_device(group)
    flat = torch.cat(
        [
            sums[n].double().flatten().cpu() if n in sums else torch.zeros(sizes[n], dtype=torch.float64)
            for n in names
        ]
        + [torch.tensor([float(count)], dtype=torch.float64)]
    ).to(device)
    dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
    flat = flat.cpu()
    out, offset = {}, 0
    for n in names:
        out[n] = flat[offset : offset + sizes[n]].clone()
        offset += sizes[n]
    return out, int(round(flat[-1].item()))


def all_reduce_block_relevance(relevance: BlockRelevance, group=None) -> BlockRelevance:
    """``all_reduce_relevance`` for ``block_relevance``: sample-weighted mean over ranks (rank 0's for data-free
    methods), so every rank removes the same blocks; unchanged outside a process group."""
    if not is_distributed():
        return relevance
    names = sorted(relevance)
    sums = {n: torch.tensor([relevance[n] * relevance.num_samples], dtype=torch.float64) for n in names}
    sums, count = all_reduce_sums(sums, relevance.num_samples, group)
    if count <= 0:
        flat = torch.tensor([relevance[n] for n in names], dtype=torch.float64).to(_backend_device(group))
        dist.broadcast(flat, src=dist.get_global_rank(group, 0) if group is not None else 0, group=group)
        values = dict(zip(names, flat.cpu().tolist()))
    else:
        values = {n: float(sums[n].item()) / count for n in names}
    return BlockRelevance(values, relevance.method, count, relevance.stages, relevance.example_input)


__all__ = [
    "all_reduce_block_relevance",
    "all_reduce_relevance",
    "all_reduce_sums",
    "broadcast_module",
    "is_distributed",
]
