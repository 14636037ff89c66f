"""Data-parallel helpers under ``torch.distributed``: ranks, the DDP wrapper (unwrap, wrap, rebuild after pruning),
structure / BatchNorm agreement across ranks. Every function is a no-op (or the single-process behaviour) outside
a process group with more than one rank.
"""

from __future__ import annotations

import inspect
import logging
import os
from collections.abc import Iterable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

__all__ = [
    "all_reduce_batchnorm",
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


def is_distributed() -> bool:
    """Whether a process group with more than one rank is running."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def unwrap_network(network: nn.Module) -> nn.Module:
    """The module inside ``DistributedDataParallel`` / ``DataParallel``, else ``network`` itself."""
    wrappers = (nn.DataParallel, nn.parallel.DistributedDataParallel)
    return network.module if isinstance(network, wrappers) else network


def rank() -> int:
    """This process's global rank (0 outside a process group)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    """Number of ranks (1 outside a process group)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main_process() -> bool:
    """Whether this process writes outputs: rank 0, or the only process."""
    return rank() == 0


def barrier() -> None:
    """Wait for every rank (no-op outside a process group)."""
    if is_distributed():
        dist.barrier()


def default_backend() -> str:
    """``"nccl"`` when a GPU is available, else ``"gloo"`` (CPU)."""
    return "nccl" if torch.cuda.is_available() else "gloo"


def init_distributed(backend: str | None = None) -> bool:
    """Join the process group a launcher such as ``torchrun`` describes in the environment.

    Args:
        backend: ``"nccl"``, ``"gloo"``, ...; default ``default_backend()``.

    Returns:
        True when this call initialised the group, False when it already existed.

    Raises:
        RuntimeError: the launcher environment (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``) is missing.
    """
    if dist.is_initialized():
        return False
    missing = [k for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise RuntimeError(
            f"no torch.distributed launcher environment ({missing} unset): start with "
            "`torchrun --nproc_per_node=N -m monai.bundle run ...`"
        )
    backend = backend or default_backend()
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group(backend=backend)
    return True


def wrap_ddp(module: nn.Module, device: torch.device | str | None = None, **kwargs: Any) -> nn.Module:
    """``DistributedDataParallel(module)`` on this rank's device (``device_ids`` only for a GPU).

    Outside a process group with several ranks ``module`` is returned unwrapped.

    Args:
        module: the network, already on ``device``.
        device: this rank's device; default the module's.
        kwargs: more ``DistributedDataParallel`` arguments (``find_unused_parameters``, ...).
    """
    if not is_distributed():
        return module
    device = torch.device(device) if device is not None else next(module.parameters()).device
    device_ids = [device] if device.type == "cuda" else None
    return DistributedDataParallel(module, device_ids=device_ids, **kwargs)


def rewrap_ddp(old: DistributedDataParallel, module: nn.Module | None = None) -> DistributedDataParallel:
    """A new ``DistributedDataParallel`` around ``module`` (default ``old.module``) with ``old``'s settings.

    DDP registers its gradient reducer on the parameters it was built with; torch-pruning replaces every
    pruned parameter, so after pruning the old wrapper would all-reduce nothing for the new tensors (or fail).
    The settings kept are those the constructor takes and the wrapper records: ``device_ids``,
    ``output_device``, ``dim``, ``process_group``, buffer syncing, bucket size, ``find_unused_parameters``,
    ``gradient_as_bucket_view``, ``static_graph`` and ``mixed_precision``. Communication hooks registered on
    ``old`` are not carried over.

    Args:
        old: the wrapper in use before pruning.
        module: the pruned module; default ``old.module`` (pruned in place).

    Raises:
        TypeError: ``old`` is not a ``DistributedDataParallel``.
    """
    if not isinstance(old, DistributedDataParallel):
        raise TypeError(f"rewrap_ddp needs a DistributedDataParallel, got {type(old).__name__}")
    module = old.module if module is None else module
    accepted = inspect.signature(DistributedDataParallel.__init__).parameters
    kwargs: dict[str, Any] = {
        "device_ids": old.device_ids,
        "output_device": old.output_device,
        "dim": old.dim,
        "find_unused_parameters": old.find_unused_parameters,
        "gradient_as_bucket_view": old.gradient_as_bucket_view,
        "static_graph": bool(getattr(old, "static_graph", False)),
    }
    if getattr(old, "device_mesh", None) is not None:
        kwargs["device_mesh"] = old.device_mesh
    else:
        kwargs["process_group"] = old.process_group
    if "forward_sync_buffers" in accepted and hasattr(old, "forward_sync_buffers"):
        kwargs["forward_sync_buffers"] = old.forward_sync_buffers
    else:
        kwargs["broadcast_buffers"] = old.broadcast_buffers
    if not getattr(old, "bucket_bytes_cap_default", True):  # an explicit bucket_cap_mb
        kwargs["bucket_cap_mb"] = old.bucket_bytes_cap / (1024 * 1024)
    if getattr(old, "mixed_precision", None) is not None:
        kwargs["mixed_precision"] = old.mixed_precision
    kwargs = {k: v for k, v in kwargs.items() if k in accepted}
    return DistributedDataParallel(module, **kwargs)


def _structure(module: nn.Module) -> dict[str, tuple[int, ...]]:
    tensors = list(module.named_parameters()) + list(module.named_buffers())
    return {name: tuple(t.shape) for name, t in tensors}


def check_same_structure(module: nn.Module, group=None) -> None:
    """Raise when the ranks' ``module`` differ in architecture (any parameter or buffer shape).

    Pruning is deterministic given the same relevance and weights; this check (an ``all_gather_object``
    of every tensor shape) turns a silent divergence into an error before DDP would hang or mix layers.

    Args:
        module: this rank's (pruned) network, unwrapped.
        group: the process group; default the world.

    Raises:
        RuntimeError: names the ranks and the first layers whose shapes differ from rank 0's.
    """
    if not is_distributed():
        return
    mine = _structure(module)
    gathered: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(gathered, mine, group=group)
    ref = gathered[0]
    problems = []
    for r, other in enumerate(gathered[1:], start=1):
        diff = sorted(n for n in set(ref) | set(other) if ref.get(n) != other.get(n))
        if diff:
            shown = ", ".join(f"{n}: rank 0 {ref.get(n)} vs rank {r} {other.get(n)}" for n in diff[:3])
            problems.append(f"rank {r} differs from rank 0 in {len(diff)} tensor(s) ({shown})")
    if problems:
        raise RuntimeError(
            "pruning produced different architectures on different ranks; the relevance or the weights were not "
            "identical across ranks (all-reduce the relevance and keep DDP in sync): " + "; ".join(problems)
        )


@torch.no_grad()
def all_reduce_batchnorm(module: nn.Module, group=None) -> None:
    """Average BatchNorm running statistics over ranks, as one process over all ranks' batches would hold them.

    ``recalibrate_batchnorm`` takes a cumulative average of per-batch statistics (``momentum=None``); each
    rank's average is weighted by its ``num_batches_tracked``, which reproduces the cumulative average over
    the union of the calibration batches. Layers with ``momentum`` set keep their exponential averages and are
    weighted the same way.

    Args:
        module: this rank's network (unwrapped); BatchNorm layers without running statistics are skipped.
        group: the process group; default the world.
    """
    if not is_distributed():
        return
    bns = [
        m
        for m in module.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm)
        and m.track_running_stats
        and m.running_mean is not None
    ]
    if not bns:
        return
    device = bns[0].running_mean.device
    if dist.get_backend(group) == "nccl" and device.type != "cuda":
        device = torch.device("cuda", torch.cuda.current_device())
    counts = torch.tensor([float(m.num_batches_tracked) for m in bns], dtype=torch.float64, device=device)
    flat = torch.cat(
        [
            torch.cat([m.running_mean.double(), m.running_var.double()]).to(device) * c
            for m, c in zip(bns, counts)
        ]
        + [counts]
    )
    dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
    total = flat[-len(bns) :]
    offset = 0
    for m, t in zip(bns, total):
        n = m.running_mean.numel()
        if t > 0:
            m.running_mean.copy_((flat[offset : offset + n] / t).to(m.running_mean))
            m.running_var.copy_((flat[offset + n : offset + 2 * n] / t).to(m.running_var))
        m.num_batches_tracked.fill_(int(round(t.item())))
        offset += 2 * n


def set_log_level(engines: Iterable[Any], level: int | str = "WARNING") -> None:
    """Set the loggers of ``engines``, MONAI's ``StatsHandler`` logger and the root logger to ``level`` on ranks
    other than 0, so only rank 0 prints progress; rank 0 logs as configured.

    Args:
        engines: MONAI / ignite engines (anything with ``logger``).
        level: a ``logging`` level or its name, for ranks > 0.
    """
    if is_main_process():
        return
    level = logging.getLevelName(level) if isinstance(level, str) else level
    for name in (None, "monai.handlers.StatsHandler"):
        logging.getLogger(name).setLevel(level)
    for engine in engines:
        engine.logger.setLevel(level)


def broadcast_module(module: torch.nn.Module, src: int = 0, group=None) -> None:
    """Copy every parameter and buffer of ``module`` from rank ``src`` to all ranks (architectures must match)."""
    if not is_distributed():
        return
    for t in list(module.parameters()) + list(module.buffers()):
        dist.broadcast(t.data, src=src, group=group)
