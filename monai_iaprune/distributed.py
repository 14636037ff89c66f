"""Data-parallel pruning under ``torch.distributed``, for bundle configs (``monai_iaprune.distributed.*``).

The helpers live where their idea does: rank / DDP wrapper / BatchNorm agreement in ``monai_iaprune.utils.ddp``,
relevance all-reduce in ``monai_iaprune.relevance.distributed``; this module gathers them under one name.
"""

from __future__ import annotations

from monai_iaprune.relevance.distributed import all_reduce_relevance, all_reduce_sums
from monai_iaprune.utils.ddp import (
    all_reduce_batchnorm,
    barrier,
    broadcast_module,
    check_same_structure,
    default_backend,
    init_distributed,
    is_distributed,
    is_main_process,
    rank,
    rewrap_ddp,
    set_log_level,
    unwrap_network,
    world_size,
    wrap_ddp,
)

__all__ = [
    "all_reduce_batchnorm",
    "all_reduce_relevance",
    "all_reduce_sums",
    "barrier",
    "broadcast_module",
    "check_same_structure",
    "default_backend",
    "init_distributed",
    "is_distributed",
    "is_main_process",
    "rank",
    "rewrap_ddp",
    "set_log_level",
    "unwrap_network",
    "world_size",
    "wrap_ddp",
]
