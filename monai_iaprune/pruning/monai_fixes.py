"""Fixes that let torch-pruning (1.6.x) trace and prune MONAI networks.

Each fix is applied at the narrowest point and only while ``monai_pruning_fixes(model)`` is active;
everything is restored on exit. Network-family settings the pruner needs (attention heads, parts
that must not be pruned) come from ``pruner_kwargs_for(model)``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

from torch import nn
from torch_pruning import ops
from torch_pruning.dependency import constants, index_mapping, shape_infer
from torch_pruning.dependency.group import Group


def _infer_out_channels(graph, node, recursive_depth: list) -> int | None:
    """``shape_infer.infer_out_channels_recursively`` where an element-wise node takes its first *known* input width.

    torch-pruning 1.6.1 lets the *last* input of an element-wise node decide its width, so an input with
    no channels (the reshaped scalar weight of a MONAI ``PReLU(num_parameters=1)``, the repeated affine
    weight of an instance norm) turns the width into ``None`` and ``update_concat_index_mapping`` then
    crashes on ``sum([8, None])``. Upstream: VainF/Torch-Pruning issue #387 (MONAI UNet).
    """
    if recursive_depth[0] > constants.MAX_RECURSION_DEPTH:
        return None
    ch = graph.get_out_channels(node)
    if ch is not None:
        return ch
    if node.type == ops.OPTYPE.CONCAT:
        total = 0
        for in_node in node.inputs:
            recursive_depth[0] += 1
            sub = _infer_out_channels(graph, in_node, recursive_depth)
            if sub is None:
                return None
            total += sub
        return total or None
    for in_node in node.inputs:
        if in_node.type == ops.OPTYPE.SPLIT and in_node.module.split_sizes is not None:
            for i, out in enumerate(in_node.outputs):
                if out == node:
                    return in_node.module.split_sizes[i]
            continue
        recursive_depth[0] += 1
        sub = _infer_out_channels(graph, in_node, recursive_depth)
        if sub:
            return sub
    return None


@contextmanager
def concat_width_fix() -> Iterator[None]:
    """Patch torch-pruning's output-width inference (VainF/Torch-Pruning#387) while the context is active."""
    original = shape_infer.infer_out_channels_recursively
    shape_infer.infer_out_channels_recursively = _infer_out_channels
    try:
        yield
    finally:
        shape_infer.infer_out_channels_recursively = original


def _concat_mapping_cached(graph, cat_node) -> None:
    """``update_concat_index_mapping`` that checks "is this a channel concat" once per concat node.

    torch-pruning re-runs ``update_index_mapping`` on every ``get_pruning_group`` call, and for each
    concat re-infers the consumer's input width recursively only to confirm the concat is along
    channels. Pruning changes that width and the cached ``concat_sizes`` together, so the answer never
    changes; on a DenseNet121 the re-inference was over half of ``prune``'s time.
    """
    verdict = getattr(cat_node, "_iaprune_channel_concat", None)
    if verdict is None:
        _ORIGINAL_CONCAT_MAPPING(graph, cat_node)
        cat_node._iaprune_channel_concat = cat_node.module.offsets is not None
        return
    if not verdict:
        return
    infer_in = shape_infer.infer_in_channels_recursively
    shape_infer.infer_in_channels_recursively = lambda *a, **k: None  # skips only the width check
    try:
        _ORIGINAL_CONCAT_MAPPING(graph, cat_node)
    finally:
        shape_infer.infer_in_channels_recursively = infer_in


_ORIGINAL_CONCAT_MAPPING = index_mapping.update_concat_index_mapping
_ORIGINAL_UPDATE_MAPPING = index_mapping.update_index_mapping
_ORIGINAL_GROUP_PRUNE = Group.prune


def _update_mapping_if_pruned(graph) -> None:
    """``update_index_mapping`` that does nothing when no group of ``graph`` was pruned since the last update."""
    if getattr(graph, "_iaprune_mapping_current", False):
        return
    _ORIGINAL_UPDATE_MAPPING(graph)
    graph._iaprune_mapping_current = True


def _prune_and_mark(self, *args, **kwargs):
    graph = getattr(self, "_DG", None)
    if graph is not None:
        graph._iaprune_mapping_current = False
    return _ORIGINAL_GROUP_PRUNE(self, *args, **kwargs)


@contextmanager
def cached_concat_mapping() -> Iterator[None]:
    """Speed-up with the same groups: index mappings are refreshed only after a prune, concat checks once.

    Active only inside the context; a dependency graph pruned outside it must not be reused inside.
    """
    saved = (index_mapping.update_concat_index_mapping, index_mapping.update_index_mapping, Group.prune)
    index_mapping.update_concat_index_mapping = _concat_mapping_cached
    index_mapping.update_index_mapping = _update_mapping_if_pruned
    Group.prune = _prune_and_mark
    try:
        yield
    finally:
        index_mapping.update_concat_index_mapping, index_mapping.update_index_mapping, Group.prune = saved


@contextmanager
def no_inplace_activations(model: nn.Module) -> Iterator[None]:
    """Run ``model``'s activations out of place while the context is active.

    An in-place activation after a norm whose output is a view (MONAI ``InstanceNorm`` + ``LeakyReLU(inplace=True)``
    in ``BasicUNet``) rewrites the view's autograd node into ``AsStridedBackward``/``CopySlices``, so torch-pruning's
    tracer cannot map the norm to its module: its affine parameters are left unpruned and the pruned network
    breaks (same family as VainF/Torch-Pruning#387). Out-of-place activations compute the same values.
    """
    changed = [m for m in model.modules() if isinstance(getattr(m, "inplace", None), bool) and m.inplace]
    for m in changed:
        m.inplace = False
    try:
        yield
    finally:
        for m in changed:
            m.inplace = True


@contextmanager
def monai_pruning_fixes(model: nn.Module) -> Iterator[None]:
    """Context in which torch-pruning can trace and prune ``model`` (a MONAI network or any torch module).

    Applies ``concat_width_fix``, ``no_inplace_activations`` and ``cached_concat_mapping``; all are undone on exit.
    """
    with ExitStack() as stack:
        stack.enter_context(concat_width_fix())
        stack.enter_context(no_inplace_activations(model))
        stack.enter_context(cached_concat_mapping())
        yield


def _attention_heads(model: nn.Module) -> dict[nn.Module, int]:
    """``{qkv linear: heads}`` for MONAI self-attention blocks (``SABlock``: ViT, UNETR) and Swin window attention."""
    heads: dict[nn.Module, int] = {}
    for m in model.modules():
        qkv, n = getattr(m, "qkv", None), getattr(m, "num_heads", None)
        if isinstance(qkv, nn.Linear) and isinstance(n, int) and n > 0:
            heads[qkv] = n
    return heads


def _swin_transformers(model: nn.Module) -> list[nn.Module]:
    """The Swin transformer (``SwinTransformer``) modules inside ``model``, e.g. ``SwinUNETR.swinViT``."""
    from monai.networks.nets.swin_unetr import SwinTransformer

    return [m for m in model.modules() if isinstance(m, SwinTransformer)]


def pruner_kwargs_for(model: nn.Module) -> dict[str, Any]:
    """Extra ``MetaPruner`` arguments a MONAI network family needs.

    - ``num_heads``: every attention ``qkv`` layer with its head count, so head dimensions are pruned
      alike in every head (``ViT``/``UNETR`` ``SABlock``).
    - ``ignored_layers``: the Swin transformer (``SwinUNETR.swinViT``) with all its layers.
      Its patch merging concatenates along the *last* (channels-last) dimension and its window
      attention reshapes channels into heads; torch-pruning 1.6.1 maps neither, so the pruned network
      fails (see VainF/Torch-Pruning#387 and the Swin/ViT notes in its README). SwinUNETR's conv
      encoders and decoder stay prunable.

    Returns:
        A dict that may hold ``num_heads`` and ``ignored_layers``; ``prune`` merges ``ignored_layers``
        with its own.
    """
    kwargs: dict[str, Any] = {}
    swin = _swin_transformers(model)
    inside_swin = {id(m) for s in swin for m in s.modules()}
    heads = {m: n for m, n in _attention_heads(model).items() if id(m) not in inside_swin}
    if heads:
        kwargs["num_heads"] = heads
    if swin:
        kwargs["ignored_layers"] = swin  # MetaPruner ignores every submodule of an ignored module
    return kwargs
