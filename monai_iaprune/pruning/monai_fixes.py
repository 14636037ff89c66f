"""Fixes that let torch-pruning (1.6.x) trace and prune MONAI networks.

Each fix is applied at the narrowest point and only while ``monai_pruning_fixes(model)`` is active;
everything is restored on exit. Network-family settings the pruner needs (attention heads, parts
that must not be pruned) come from ``pruner_kwargs_for(model)``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager, nullcontext
from typing import Any

import torch
import torch_pruning as tp
from torch import nn
from torch_pruning import ops
from torch_pruning.dependency import constants, index_mapping, shape_infer
from torch_pruning.dependency.group import Group

from monai_iaprune.relevance.layers import PRUNABLE_TYPES


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
def instance_norm_outputs_copied() -> Iterator[None]:
    """Return a copy of every instance norm's output while the context is active.

    ``torch.instance_norm`` returns a *view* of a batch norm over ``[1, B * C, ...]``; a residual block that adds
    its shortcut in place onto the norm output (MONAI ``UnetResBlock``: ``out = norm2(conv2(x)); out += residual``,
    used by ``DynUNet(res_block=True)``, UNETR and SwinUNETR decoders) rewrites that view's autograd node, so
    torch-pruning's tracer loses the norm: its ``num_features`` and affine parameters stay at the old width and the
    pruned network fails ("expected input's size at dim=1 to match num_features"). A copy has its own node and the
    same values (same family as VainF/Torch-Pruning#387).
    """
    cls = nn.modules.instancenorm._InstanceNorm
    original = cls.forward

    def forward(self, x):
        return original(self, x).clone()

    cls.forward = forward
    try:
        yield
    finally:
        cls.forward = original


_ORIGINAL_SLICE_MAPPING = index_mapping.update_slice_index_mapping


def _slice_mapping_channels_only(graph, slice_node) -> None:
    """``update_slice_index_mapping`` that leaves spatial slices of 5-D (3D image) tensors alone.

    torch-pruning 1.6.1 recognises a slice along a non-channel dimension only for 3-D and 4-D tensors; on a 5-D
    tensor every slice is mapped as a channel slice, so ``x[:, :, 1:, 1:, 1:]`` (MONAI ``FactorizedReduceBlock``
    in a 3D ``DiNTS``) shifts the pruned indices of the conv reading it by one: the pruned network breaks.
    """
    sizes = getattr(slice_node.grad_fn, "_saved_self_sym_sizes", None)
    if sizes is not None and len(sizes) == 5 and slice_node.module.dim not in (1, -4):
        return
    _ORIGINAL_SLICE_MAPPING(graph, slice_node)


@contextmanager
def spatial_slice_fix() -> Iterator[None]:
    """Leave 5-D spatial slices out of torch-pruning's channel index mapping while the context is active."""
    index_mapping.update_slice_index_mapping = _slice_mapping_channels_only
    try:
        yield
    finally:
        index_mapping.update_slice_index_mapping = _ORIGINAL_SLICE_MAPPING


_GN_PRUNER = tp.pruner.function.GroupNormPruner
_ORIGINAL_GN = (_GN_PRUNER.prune_out_channels, _GN_PRUNER.get_out_channel_groups)


def _prune_group_norm(self, layer: nn.GroupNorm, idxs) -> nn.Module:
    per_channel = layer.num_groups == layer.num_channels
    _ORIGINAL_GN[0](self, layer, idxs)
    if per_channel:
        layer.num_groups = layer.num_channels
    return layer


def _group_norm_channel_groups(self, layer: nn.GroupNorm) -> int:
    return 1 if layer.num_groups == layer.num_channels else layer.num_groups


@contextmanager
def per_channel_group_norms() -> Iterator[None]:
    """Prune a ``GroupNorm`` with one channel per group (``num_groups == num_channels``) as a per-channel norm.

    torch-pruning removes the same position from every group of a GroupNorm; with groups of one channel that is
    every channel, so ``_limit_group`` (and torch-pruning) never prunes its group. MedNeXt normalises with
    ``GroupNorm(C, C)`` (and SegResNet's first level with 8 filters is ``GroupNorm(8, 8)``): in 3D its full-resolution
    residual stream holds most MACs and 50 % of MACs was unreachable. A per-channel GroupNorm stays one when
    pruned (``num_groups`` follows ``num_channels``), normalising the kept channels as before.
    """
    _GN_PRUNER.prune_out_channels = _GN_PRUNER.prune_in_channels = _prune_group_norm
    _GN_PRUNER.get_out_channel_groups = _GN_PRUNER.get_in_channel_groups = _group_norm_channel_groups
    try:
        yield
    finally:
        _GN_PRUNER.prune_out_channels = _GN_PRUNER.prune_in_channels = _ORIGINAL_GN[0]
        _GN_PRUNER.get_out_channel_groups = _GN_PRUNER.get_in_channel_groups = _ORIGINAL_GN[1]


_ORIGINAL_BUILD_DEPENDENCY = tp.DependencyGraph._build_dependency


def _broadcasts_one_channel(grad_fn) -> bool:
    """Whether ``grad_fn`` multiplies feature maps (``[B, C, *spatial]``) where one factor has a single channel.

    Only products of feature maps: a ViT's token tensors ``[B, N, C]`` (class token, position embedding) keep
    torch-pruning's coupling.
    """
    saved = [getattr(grad_fn, a, None) for a in ("_saved_self", "_saved_other")]
    shapes = [t.shape for t in saved if isinstance(t, torch.Tensor)]
    if len(shapes) != 2 or any(len(s) < 4 for s in shapes):
        return False
    return min(s[1] for s in shapes) == 1 < max(s[1] for s in shapes)


def _build_dependency_without_broadcasts(graph, module2node) -> None:
    """``DependencyGraph._build_dependency`` after cutting the single-channel inputs of element-wise ops.

    torch-pruning treats every input of an element-wise op as the same channels, so ``x * gate`` with a
    one-channel gate broadcast over ``x`` (MONAI ``AttentionBlock``: ``x * psi``, used by ``AttentionUnet``) couples
    the gate's 1-channel conv and norm to ``x``'s group: pruning ``x``'s channel 0 empties the norm ("index 0 out
    of range for tensor of size [0]") and other channels shrink the conv's ``out_channels`` below its weight.
    A broadcast input has no channel positions to share, so its edge carries no dependency.
    """
    for node in list(module2node.values()):
        if (
            node.type != ops.OPTYPE.ELEMENTWISE
            or len(node.inputs) < 2
            or not _broadcasts_one_channel(node.grad_fn)
        ):
            continue
        widths = [_infer_out_channels(graph, n, [0]) for n in node.inputs]
        if max((w for w in widths if w is not None), default=0) <= 1:
            continue
        for in_node, width in zip(list(node.inputs), widths):
            if width == 1:
                node.inputs.remove(in_node)
                in_node.outputs.remove(node)
    _ORIGINAL_BUILD_DEPENDENCY(graph, module2node)


@contextmanager
def broadcast_inputs_decoupled() -> Iterator[None]:
    """Leave one-channel (broadcast) inputs of element-wise ops out of dependency groups while the context is active."""
    tp.DependencyGraph._build_dependency = _build_dependency_without_broadcasts
    try:
        yield
    finally:
        tp.DependencyGraph._build_dependency = _ORIGINAL_BUILD_DEPENDENCY


@contextmanager
def monai_pruning_fixes(model: nn.Module) -> Iterator[None]:
    """Context in which torch-pruning can trace and prune ``model`` (a MONAI network or any torch module).

    Applies ``concat_width_fix``, ``no_inplace_activations``, ``instance_norm_outputs_copied``,
    ``broadcast_inputs_decoupled``, ``spatial_slice_fix``, ``per_channel_group_norms`` and
    ``cached_concat_mapping``; all are undone on exit.
    """
    with ExitStack() as stack:
        stack.enter_context(concat_width_fix())
        stack.enter_context(per_channel_group_norms())
        stack.enter_context(spatial_slice_fix())
        stack.enter_context(broadcast_inputs_decoupled())
        stack.enter_context(no_inplace_activations(model))
        stack.enter_context(instance_norm_outputs_copied())
        stack.enter_context(cached_concat_mapping())
        yield


def _tensors(out: Any) -> list[torch.Tensor]:
    """The tensors of a nested output (``None`` entries dropped: torch-pruning's ``flatten_as_list`` fails on them)."""
    if isinstance(out, torch.Tensor):
        return [out]
    items = out.values() if isinstance(out, dict) else out if isinstance(out, (list, tuple)) else []
    return [t for item in items for t in _tensors(item)]


@contextmanager
def _training_forward(model: nn.Module) -> Iterator[None]:
    """``model`` in training mode with its norms in eval mode (running statistics untouched, batch 1 allowed)."""
    states = {m: m.training for m in model.modules()}
    model.train()
    for m in model.modules():
        if isinstance(m, (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)):
            m.eval()
    try:
        yield
    finally:
        for m, training in states.items():
            m.training = training


def _layers_run(model: nn.Module, example_inputs: torch.Tensor, train: bool) -> set[nn.Module]:
    run: set[nn.Module] = set()
    layers = [m for m in model.modules() if isinstance(m, PRUNABLE_TYPES)]
    handles = [m.register_forward_hook(lambda mod, i, o: run.add(mod)) for m in layers]
    try:
        with torch.no_grad(), _training_forward(model) if train else nullcontext():
            model(example_inputs)
    finally:
        for h in handles:
            h.remove()
    return run


def trace_kwargs(model: nn.Module, example_inputs: torch.Tensor) -> dict[str, Any]:
    """``forward_fn`` for torch-pruning's tracer (``MetaPruner`` / ``build_dependency``) that sees every layer run.

    torch-pruning builds its graph backwards from the network output, in eval mode. Two kinds of layer are
    missed, keep their input width after their producer is pruned, and break the pruned network:

    - layers run off the path to the output, whose results are kept aside (``DynUNet`` deep-supervision heads,
      stored in eval mode and returned only in training): their outputs are added as extra graph roots;
    - layers run only in training (``SegResNetVAE``'s VAE branch, ``DAF3D``'s deep-supervision predictions): when
      there are any, the network is traced in training mode (norms kept in eval mode, so batch-1 inputs work and
      running statistics are untouched).

    Layers never run at all (an encoder's unused classification head) stay out of the graph: left alone.
    """
    train = bool(_layers_run(model, example_inputs, True) - _layers_run(model, example_inputs, False))

    def forward_fn(net: nn.Module, inputs: Any) -> list[torch.Tensor]:
        main, layer_outputs = _traced_forward(net, inputs, train)
        return main + [o for _, o in layer_outputs]

    forward_fn.train = train
    return {"forward_fn": forward_fn}


def _traced_forward(
    net: nn.Module, inputs: Any, train: bool
) -> tuple[list[torch.Tensor], list[tuple[nn.Module, torch.Tensor]]]:
    """(network output tensors, ``[(conv / linear layer, its output)]`` for every call) of one forward.

    Every call, not only a layer's last: ``DAF3D`` runs one ``predict2`` head on four attention features, four
    attention maps and the ASPP output, and only the last reaches the output; the other producers are coupled to
    the same input channels and are traced only from these outputs.
    """
    outputs: list[tuple[nn.Module, torch.Tensor]] = []

    def record(mod, i, o):
        if isinstance(o, torch.Tensor) and o.grad_fn is not None:
            outputs.append((mod, o))

    handles = [m.register_forward_hook(record) for m in net.modules() if isinstance(m, PRUNABLE_TYPES)]
    try:
        with _training_forward(net) if train else nullcontext():
            out = net(*inputs) if isinstance(inputs, (tuple, list)) else net(inputs)
    finally:
        for h in handles:
            h.remove()
        release_held_tensors(net)
    return _tensors(out), outputs


def output_producers(model: nn.Module, example_inputs: torch.Tensor) -> list[nn.Module]:
    """Conv / linear layers whose output channels are outputs of the network (in the mode ``trace_kwargs`` traces).

    - the nearest layer behind every output tensor (through parameter-free operations): ``SegResNetDS2``'s two
      decoder heads, ``DynUNet``'s interpolated deep-supervision heads in training mode;
    - layers whose output is kept aside rather than consumed (it reaches neither the network output nor another
      conv / linear layer): ``DynUNet``'s deep-supervision heads in eval mode.

    Their output channels are class channels, so ``prune`` keeps them as it keeps the last layer.
    """
    train = trace_kwargs(model, example_inputs)["forward_fn"].train
    with torch.enable_grad():
        main, outputs = _traced_forward(model, example_inputs, train)
    producer = {o.grad_fn: m for m, o in outputs}
    found: list[nn.Module] = []
    seen: set = set()
    stack = [t.grad_fn for t in main if t.grad_fn is not None]
    while stack:  # back from each output until a layer output
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        if fn in producer:
            found.append(producer[fn])
            continue
        stack.extend(nxt for nxt, _ in fn.next_functions)
    # consumed: the layer's grad_fn lies behind the network output or behind another layer's output
    consumed: set = set()
    stack = [t.grad_fn for t in main if t.grad_fn is not None]
    stack += [nxt for _, o in outputs for nxt, _ in o.grad_fn.next_functions]
    while stack:
        fn = stack.pop()
        if fn is None or fn in consumed:
            continue
        consumed.add(fn)
        stack.extend(nxt for nxt, _ in fn.next_functions)
    for m, o in outputs:
        if o.grad_fn not in consumed and m not in found:
            found.append(m)
    return found


def output_layers(model: nn.Module, example_inputs: torch.Tensor) -> list[nn.Module]:
    """Layers whose output channels are the network's output channels (classifier heads, seg output convs).

    The last conv / linear layer run in forward is found by hooks, and so are the layers behind every output
    tensor or kept aside (``output_producers``: deep-supervision heads); every layer coupled to their output channels
    in torch-pruning's dependency graph (e.g. a residual projection) is returned too.
    """
    order: list[nn.Module] = []
    handles = [
        m.register_forward_hook(lambda mod, i, o: order.append(mod))
        for m in model.modules()
        if isinstance(m, PRUNABLE_TYPES)
    ]
    try:
        with torch.no_grad():
            model.eval()
            model(example_inputs)
    finally:
        for h in handles:
            h.remove()
    if not order:
        return []
    found = [order[-1]]
    found += [m for m in output_producers(model, example_inputs) if m not in found]
    with monai_pruning_fixes(model):
        dg = tp.DependencyGraph().build_dependency(
            model, example_inputs=example_inputs, **trace_kwargs(model, example_inputs)
        )
    for last in list(found):
        if last not in dg.module2node:
            continue
        out_fn = dg.get_pruner_of_module(last).prune_out_channels
        group = dg.get_pruning_group(last, out_fn, idxs=[0])
        for dep, _ in group:
            m = dep.target.module
            if (
                isinstance(m, PRUNABLE_TYPES)
                and dep.handler.__name__ == "prune_out_channels"
                and m not in found
            ):
                found.append(m)
    return found


def pruning_setup(
    model: nn.Module,
    example_inputs: torch.Tensor,
    ignored: list[nn.Module] | None = None,
    pruner_kwargs: dict[str, Any] | None = None,
) -> tuple[list[nn.Module], dict[str, Any]]:
    """The layers a pruner of ``model`` must leave alone and the extra ``MetaPruner`` arguments it needs.

    Ignored: ``ignored`` plus the output layers (``output_layers``), the zero-padded residual layers
    (``padded_residual_layers``) and the family's own (``pruner_kwargs_for``); arguments:
    ``pruner_kwargs_for`` and ``trace_kwargs``, then ``pruner_kwargs`` on top.
    """
    ignored = list(ignored or [])
    ignored += [m for m in output_layers(model, example_inputs) if m not in ignored]
    ignored += [m for m in padded_residual_layers(model, example_inputs) if m not in ignored]
    extra = pruner_kwargs_for(model)
    extra.update(trace_kwargs(model, example_inputs))
    extra.update(pruner_kwargs or {})
    ignored += [m for m in extra.pop("ignored_layers", []) if m not in ignored]
    return ignored, extra


def padded_residual_layers(model: nn.Module, example_inputs: torch.Tensor) -> list[nn.Module]:
    """Conv layers whose output channels meet a zero-padded residual (``ChannelPad(mode="pad")``, ``HighResNet``).

    ``x_conv + F.pad(x)`` adds ``in`` channels to ``out > in`` ones; torch-pruning maps the pad as element-wise
    (same channel count in and out), so a group through it indexes past ``x``'s channels (IndexError) and the
    pad width would go stale after pruning. The residual streams meeting a pad keep their channels; the convs
    inside the blocks (in -> out) stay prunable.
    """
    from monai.networks.layers.simplelayers import ChannelPad

    pads = [m for m in model.modules() if isinstance(m, ChannelPad) and m.pad is not None]
    if not pads:
        return []
    # the conv whose output is summed with the pad: the last one run before each padded sum in the same parent
    partners: list[nn.Module] = []
    for parent in model.modules():
        children = list(parent.children())
        if not any(c in pads for c in children):
            continue
        convs = [m for c in children if c not in pads for m in c.modules() if isinstance(m, PRUNABLE_TYPES)]
        if convs:
            partners.append(convs[-1])
    with monai_pruning_fixes(model):
        dg = tp.DependencyGraph().build_dependency(
            model, example_inputs=example_inputs, **trace_kwargs(model, example_inputs)
        )
    found: list[nn.Module] = []
    for conv in partners:
        if conv not in dg.module2node:
            continue
        group = dg.get_pruning_group(conv, dg.get_pruner_of_module(conv).prune_out_channels, idxs=[0])
        for dep, _ in group:
            m = dep.target.module
            if isinstance(m, PRUNABLE_TYPES) and dg.is_out_channel_pruning_fn(dep.handler) and m not in found:
                found.append(m)
    return found


def release_held_tensors(model: nn.Module) -> None:
    """Detach tensors a network keeps in plain list attributes between calls (``DynUNet.heads``).

    They hold the autograd graph of the last forward, and ``copy.deepcopy`` refuses non-leaf tensors, so a
    ``DynUNet`` with deep supervision cannot be copied after a forward with gradients (``prune`` copies per trial).
    """
    for m in model.modules():
        for value in vars(m).values():
            if isinstance(value, list):
                for i, t in enumerate(value):
                    if isinstance(t, torch.Tensor) and t.grad_fn is not None:
                        value[i] = t.detach()


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


def _token_streams(model: nn.Module) -> list[nn.Module]:
    """Layers writing the residual token stream of every MONAI ``ViT`` whose tokens are reshaped into feature maps.

    ``UNETR`` views the ViT's hidden states as ``[B, *grid, hidden_size]`` with ``hidden_size`` fixed at build time,
    so pruning the stream (patch embedding, attention ``out_proj``, MLP ``linear2``, all coupled by the residual
    sums) makes that reshape invalid. The attention ``qkv`` is kept as well: its einops split into q / k / v
    is not mapped to heads by torch-pruning (the pruned qkv width no longer divides into ``3 x heads``). The MLP
    hidden layers stay prunable. A classification ViT (``classification=True``) keeps no such view: its stream
    stays prunable.
    """
    from monai.networks.nets import ViT

    found: list[nn.Module] = []
    for vit in model.modules():
        if (
            not isinstance(vit, ViT) or vit.classification or vit is model
        ):  # a bare ViT: its tokens are the output
            continue
        found += [m for m in vit.patch_embedding.modules() if isinstance(m, PRUNABLE_TYPES)]
        for block in vit.blocks:
            # qkv too: SABlock splits it with einops and indexes q / k / v, which torch-pruning cannot map to heads
            found += [block.attn.qkv, block.attn.out_proj, block.mlp.linear2]
    return found


def _unetr_up_concats(model: nn.Module) -> list[nn.Module]:
    """The transposed convs of ``UnetrUpBlock`` decoders (``UNETR``): the width of their ``torch.cat`` with the skip.

    On ``UNETR`` torch-pruning 1.6.1 maps both inputs of that concat (upsampled decoder features, skip from an
    ``UnetrPrUpBlock`` encoder) to the same concat positions, so pruning one removes the other's channels too and
    the consumer's input width no longer matches (plain ``MetaPruner`` fails the same way). Keeping the transposed
    conv keeps that coupled group; the residual convs of every decoder block stay prunable.
    """
    from monai.networks.blocks.unetr_block import UnetrUpBlock
    from monai.networks.nets import UNETR

    # only inside UNETR: SwinUNETR's UnetrUpBlock decoders prune correctly (tests/test_sweep.py)
    return [
        m
        for unetr in model.modules()
        if isinstance(unetr, UNETR)
        for up in unetr.modules()
        if isinstance(up, UnetrUpBlock)
        for m in up.transp_conv.modules()
        if isinstance(m, PRUNABLE_TYPES)
    ]


def _vae_reshaped_linears(model: nn.Module) -> list[nn.Module]:
    """``SegResNetVAE.vae_fc3``: its output is viewed as ``[B, smallest_filters, *fc_insize]`` feature maps.

    The width of that view is fixed at build time and torch-pruning does not map a linear output onto the
    channels of a reshape, so pruning ``vae_fc3`` breaks the VAE branch in training ("shape '[-1, 16, ...]' is
    invalid"). Kept whole; the VAE convs stay prunable.
    """
    from monai.networks.nets import SegResNetVAE

    return [m.vae_fc3 for m in model.modules() if isinstance(m, SegResNetVAE)]


def pruner_kwargs_for(model: nn.Module) -> dict[str, Any]:
    """Extra ``MetaPruner`` arguments a MONAI network family needs.

    - ``num_heads``: every attention ``qkv`` layer with its head count, so head dimensions are pruned
      alike in every head (``ViT``/``UNETR`` ``SABlock``).
    - ``ignored_layers``: the token stream of a ViT encoder whose tokens are reshaped to feature maps
      (``UNETR``; ``_token_streams``): its hidden size stays, attention head dimensions and MLP widths are
      pruned; and the Swin transformer (``SwinUNETR.swinViT``) with all its layers.
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
    # MetaPruner ignores every submodule of an ignored module, and every group one of them is pruned in
    layers = _token_streams(model) + _unetr_up_concats(model) + _vae_reshaped_linears(model)
    ignored = swin + [m for m in layers if id(m) not in inside_swin]
    if ignored:
        kwargs["ignored_layers"] = ignored
    return kwargs
