"""Keep an optimizer working across physical pruning: swap in the new parameters, slice their state.

torch-pruning replaces every pruned ``nn.Parameter`` by a new, smaller one, so an optimizer built before
pruning still holds the old tensors (which no longer receive gradients) and per-parameter state of the
old shapes (Adam ``exp_avg`` / ``exp_avg_sq``, SGD ``momentum_buffer``). ``remap_optimizer`` fixes the
*same* optimizer object in place, so LR schedulers and checkpoint savers that hold it keep working.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from monai_iaprune.relevance.blocks import RemovedBlock

__all__ = ["parameter_snapshot", "kept_indices", "remap_optimizer"]

HistoryEntry = tuple[str, str, Sequence[int]]


def parameter_snapshot(model: nn.Module) -> dict[str, nn.Parameter]:
    """Return ``{qualified name: Parameter}`` of ``model``, taken before pruning for ``remap_optimizer``."""
    return dict(model.named_parameters())


def _removal_dims(
    module: nn.Module, param_name: str, kind: str, ndim: int, old_shape: Sequence[int] | None = None
) -> int | None:
    """Which dim of ``module.<param_name>`` an ``"out"`` / ``"in"`` pruning of ``module`` slices (None: untouched).

    ``old_shape``: the parameter's shape before pruning (tells a depthwise transposed conv's weight).

    Mirrors torch-pruning's pruning functions (``torch_pruning/pruner/function.py``).
    """
    if isinstance(module, nn.modules.conv._ConvNd):
        transposed = isinstance(module, nn.modules.conv._ConvTransposeNd)
        if param_name == "bias":
            return 0 if kind == "out" else None
        if kind == "out":  # depthwise convs are recorded as "out" for both sides (in == out pruning)
            # a depthwise transposed conv's weight is (C, 1, ...): its channels are dim 0 (MedNeXt's up blocks); told
            # by the original shape, since a layer pruned to one channel has groups 1 afterwards
            depthwise = (
                old_shape is not None and len(old_shape) > 1 and old_shape[1] == 1 and old_shape[0] > 1
            )
            return 1 if transposed and not depthwise else 0
        return 0 if transposed else 1
    if isinstance(module, nn.Linear):
        if param_name == "bias":
            return 0 if kind == "out" else None
        return 0 if kind == "out" else 1
    if isinstance(module, nn.LayerNorm):
        return ndim - 1
    if isinstance(module, nn.Embedding):
        return 1
    if isinstance(module, nn.PReLU) and ndim == 1:
        # torch-pruning leaves a shared (1-parameter) PReLU alone
        return 0 if module.num_parameters > 1 else None
    if isinstance(module, (nn.modules.batchnorm._NormBase, nn.GroupNorm)):
        return 0
    raise NotImplementedError(
        f"cannot map a {kind!r} pruning of {type(module).__name__} onto its parameter {param_name!r}; "
        "remap_optimizer knows conv, conv-transpose, linear, norm, PReLU and embedding layers"
    )


def kept_indices(
    old_params: dict[str, nn.Parameter], model: nn.Module, history: Sequence[HistoryEntry]
) -> dict[str, list[torch.Tensor | None]]:
    """For each parameter, the indices of the *original* tensor kept along each dim (None: dim untouched).

    The history's removed indices are relative to the tensor as it was at that step, so steps are
    composed in order.

    Args:
        old_params: ``parameter_snapshot(model)`` taken before pruning (for the original shapes).
        model: the pruned network (its modules tell each parameter's layer type).
        history: ``PruneResult.history``: ``[(module name, "out" | "in", removed indices)]`` in applied order.

    Returns:
        ``{parameter name: [per-dim LongTensor of kept original indices, or None]}`` for parameters touched.

    Raises:
        KeyError: the history names a module ``model`` does not have.
    """
    modules = dict(model.named_modules())
    kept: dict[str, list[list[int] | None]] = {}
    for module_name, kind, removed in history:
        if kind not in ("out", "in"):
            raise ValueError(
                f"pruning history entry for {module_name!r} has kind {kind!r}; expected 'out' or 'in'"
            )
        if module_name not in modules:
            raise KeyError(
                f"pruning history names module {module_name!r}, which {type(model).__name__} does not have"
            )
        module = modules[module_name]
        removed_set = {int(i) for i in removed}
        for pname, _ in module.named_parameters(recurse=False):
            full = f"{module_name}.{pname}" if module_name else pname
            if full not in old_params:
                continue
            shape = old_params[full].shape
            dim = _removal_dims(module, pname, kind, len(shape), shape)
            if dim is None:
                continue
            dims = kept.setdefault(full, [None] * len(shape))
            cur = dims[dim] if dims[dim] is not None else list(range(shape[dim]))
            if (
                kind == "in"
                and isinstance(module, nn.modules.conv._ConvNd)
                and module.groups > 1
                and not isinstance(module, nn.modules.conv._ConvTransposeNd)
            ):
                # torch-pruning's grouped-conv in-pruning: keep the first len(keep) // groups of the kept channels
                n_in = len(cur) * module.groups
                keep = sorted(set(range(n_in)) - removed_set)
                keep = keep[: len(keep) // module.groups]
            else:
                keep = sorted(set(range(len(cur))) - removed_set)
            dims[dim] = [cur[i] for i in keep]
    return {
        n: [None if d is None else torch.tensor(d, dtype=torch.long) for d in dims]
        for n, dims in kept.items()
    }


def _in_removed_block(param_name: str, model: nn.Module) -> bool:
    """Whether ``param_name`` lived in a block that depth pruning replaced by a ``RemovedBlock``."""
    parts = param_name.split(".")[:-1]
    modules = dict(model.named_modules())
    return any(isinstance(modules.get(".".join(parts[:i])), RemovedBlock) for i in range(1, len(parts) + 1))


def _slice(value: torch.Tensor, dims: list[torch.Tensor | None]) -> torch.Tensor:
    for d, idx in enumerate(dims):
        if idx is not None:
            value = value.index_select(d, idx.to(value.device))
    return value.contiguous()


@torch.no_grad()
def remap_optimizer(
    optimizer: torch.optim.Optimizer,
    old_params: dict[str, nn.Parameter],
    model: nn.Module,
    history: Sequence[HistoryEntry],
) -> torch.optim.Optimizer:
    """Point ``optimizer`` at the pruned ``model``'s parameters and slice their state to the kept channels.

    The optimizer object itself is kept (and returned), so LR schedulers, AMP scalers and checkpoint savers
    holding it keep working. Param-group settings (lr, weight decay, ...) are unchanged; every state
    tensor shaped like its parameter (Adam ``exp_avg`` / ``exp_avg_sq`` / ``max_exp_avg_sq``, SGD
    ``momentum_buffer``, ...) is sliced, scalar state (``step``) is kept.

    Args:
        optimizer: the optimizer built on the unpruned model; modified in place.
        old_params: ``parameter_snapshot(model)`` taken just before pruning.
        model: the network after pruning.
        history: ``PruneResult.history`` of that pruning.

    Returns:
        The same ``optimizer``.

    Raises:
        KeyError: a parameter the optimizer holds disappeared from the model (other than with a block that depth
            pruning replaced by ``RemovedBlock``: such parameters and their state are dropped).
        ValueError: a state tensor cannot be sliced to its new parameter's shape (unknown state layout or a
            pruning the history does not describe).
    """
    new_params = dict(model.named_parameters())
    name_of = {id(p): n for n, p in old_params.items()}
    kept = kept_indices(old_params, model, history)
    for gi, group in enumerate(optimizer.param_groups):
        remapped: list[nn.Parameter] = []
        for p in group["params"]:
            name = name_of.get(id(p))
            if name is None:  # not a model parameter (e.g. a loss weight): leave it alone
                remapped.append(p)
                continue
            if name not in new_params and _in_removed_block(name, model):
                optimizer.state.pop(p, None)  # depth pruning removed its block: the parameter is gone
                continue
            if name not in new_params:
                raise KeyError(
                    f"optimizer parameter {name!r} (group {gi}) is no longer a parameter of the pruned model"
                )
            q = new_params[name]
            dims = kept.get(name, [None] * p.ndim)
            expected = tuple(p.shape[d] if idx is None else len(idx) for d, idx in enumerate(dims))
            if expected != tuple(q.shape):
                raise ValueError(
                    f"parameter {name!r} went from {tuple(p.shape)} to {tuple(q.shape)}, but the pruning history "
                    f"explains {expected}; was the snapshot taken right before this pruning?"
                )
            state = optimizer.state.pop(p, None)
            if state:
                new_state = {}
                for key, value in state.items():
                    if isinstance(value, torch.Tensor) and value.shape == p.shape and value.ndim > 0:
                        new_state[key] = _slice(value, dims)
                    elif isinstance(value, torch.Tensor) and value.numel() > 1:
                        raise ValueError(
                            f"optimizer state {key!r} of parameter {name!r} has shape {tuple(value.shape)}, not the "
                            f"parameter's {tuple(p.shape)}; {type(optimizer).__name__} state cannot be remapped"
                        )
                    else:
                        new_state[key] = value
                optimizer.state[q] = new_state
            remapped.append(q)
        group["params"] = remapped
    return optimizer
