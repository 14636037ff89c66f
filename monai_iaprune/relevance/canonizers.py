"""zennit canonizers for MONAI blocks: BatchNorm merging by data flow, residual sums, SE gates, attention.

A canonizer temporarily rewrites a model into an equivalent form that LRP rules handle (zennit's idea; see
``zennit/canonizers.py`` and ``zennit/torchvision.py``). Each one here restores the model exactly on ``remove``.

- ``GraphMergeBatchNorm``: merges a BatchNorm into the conv / linear whose output tensor *is* the BatchNorm's
  input (found by tracing one forward pass), never across a concatenation or a residual sum. zennit's
  ``SequentialMergeBatchNorm`` pairs modules by registration order instead, which on MONAI DenseNet merges a
  dense layer's last conv with the next layer's pre-activation norm across ``torch.cat`` and changes the output.
- ``ResidualSumCanonizer``: MONAI ``ResidualUnit``, ``ResNetBlock``, ``ResNetBottleneck``, ``SEBlock`` (SEResNet /
  SENet bottlenecks), ``SkipConnection(mode="add")``, ViT ``TransformerBlock`` and AHNet's ``Bottleneck3x3x1`` /
  ``Pseudo3DLayer`` add their branches through an explicit ``zennit.layer.Sum`` module, so the composite's
  ``Norm`` rule splits relevance in proportion to each branch's contribution instead of copying it to both
  (which is what the plain gradient of ``a + b`` does).
- ``SEGateCanonizer``: ``ChannelSELayer`` multiplies by a sigmoid gate; relevance passes through the gated path
  only (the gate is treated as a constant, its branch gets zero relevance), as is standard for gates.
- ``AttentionCanonizer``: self-attention treats the softmax attention weights as constants (CP-LRP of
  Ali et al. 2022, "XAI for Transformers: better explanations through conservative propagation"): relevance
  flows through the value path only; query / key channels receive zero relevance.

Concatenations (DenseNet layers, UNet skips) need no canonizer: the gradient of ``torch.cat`` routes each slice
of relevance to its own input, which conserves the sum (tested in ``tests/test_lrp.py``).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

import torch
from monai.networks.blocks import ChannelSELayer, ResidualUnit, SABlock, SEBlock, TransformerBlock
from monai.networks.layers.simplelayers import SkipConnection
from monai.networks.nets.ahnet import Bottleneck3x3x1, Pseudo3DLayer
from monai.networks.nets.efficientnet import MBConvBlock
from monai.networks.nets.hovernet import _ResidualBlock as HoVerNetResidualBlock
from monai.networks.nets.resnet import ResNetBlock, ResNetBottleneck
from torch import nn
from torch.overrides import TorchFunctionMode
from zennit.canonizers import AttributeCanonizer, Canonizer, MergeBatchNorm
from zennit.core import stabilize
from zennit.layer import Sum

__all__ = [
    "AttentionCanonizer",
    "GraphMergeBatchNorm",
    "ResidualSumCanonizer",
    "SEGateCanonizer",
    "attention_weights",
    "auto_canonizers",
    "cached_merge_pairs",
    "is_merged_identity",
    "merge_pairs",
]

_LINEAR_TYPES = (nn.modules.conv._ConvNd, nn.Linear)


def _tensors(obj: Any) -> list[torch.Tensor]:
    """All tensors in a (nested) output structure."""
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, dict):
        obj = list(obj.values())
    if isinstance(obj, (list, tuple)):
        return [t for o in obj for t in _tensors(o)]
    return []


def _consumer_counts(roots: list[torch.Tensor]) -> dict[Any, int]:
    """For every autograd node reachable from ``roots``, how many nodes use its result."""
    counts: dict[Any, int] = {}
    seen = set()
    stack = [t.grad_fn for t in roots if t.grad_fn is not None]
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        for nxt, _ in node.next_functions:
            if nxt is not None:
                counts[nxt] = counts.get(nxt, 0) + 1
                stack.append(nxt)
    return counts


def merge_pairs(model: nn.Module, example_input: torch.Tensor) -> list[tuple[str, str]]:
    """Find ``(conv / linear name, BatchNorm name)`` pairs where the BatchNorm reads the layer's output directly.

    One forward pass with ``example_input`` is traced. A pair is kept only when the BatchNorm's input tensor is
    the very tensor the layer returned (not modified in place since), that tensor has no other consumer in the
    autograd graph, both modules run exactly once, and the BatchNorm is affine with running statistics.

    Args:
        model: the network (in eval mode, so BatchNorm uses its running statistics).
        example_input: one input batch, e.g. ``inputs[:1]``.

    Returns:
        the pairs, in forward order.
    """
    names = {m: n for n, m in model.named_modules()}
    produced: dict[int, tuple[nn.Module, torch.Tensor, int, Any]] = {}
    calls: dict[nn.Module, int] = {}
    found: list[tuple[nn.Module, nn.Module, torch.Tensor]] = []
    handles = []

    def after_linear(module, inputs, output):
        calls[module] = calls.get(module, 0) + 1
        if isinstance(output, torch.Tensor):
            produced[id(output)] = (module, output, output._version, output.grad_fn)

    def before_bn(module, inputs):
        calls[module] = calls.get(module, 0) + 1
        x = inputs[0] if inputs else None
        if isinstance(x, torch.Tensor) and id(x) in produced:
            linear, out, version, grad_fn = produced[id(x)]
            if out is x and x._version == version:
                found.append((linear, module, grad_fn))

    for m in model.modules():
        if isinstance(m, _LINEAR_TYPES):
            handles.append(m.register_forward_hook(after_linear))
        elif isinstance(m, nn.modules.batchnorm._BatchNorm):
            handles.append(m.register_forward_pre_hook(before_bn))
    try:
        with torch.enable_grad():
            x = example_input.detach().clone().requires_grad_(True)
            output = model(x)
        counts = _consumer_counts(_tensors(output))
    finally:
        for h in handles:
            h.remove()
    pairs = []
    for linear, bn, grad_fn in found:
        if calls.get(linear) != 1 or calls.get(bn) != 1:
            continue
        if grad_fn is not None and counts.get(grad_fn, 0) != 1:
            continue  # the layer output also feeds something else: merging would change that consumer
        if not bn.affine or not bn.track_running_stats or bn.running_mean is None:
            continue
        pairs.append((names[linear], names[bn]))
    return pairs


_MERGE_PLANS: weakref.WeakKeyDictionary[nn.Module, dict[tuple, list[tuple[str, str]]]] = (
    weakref.WeakKeyDictionary()
)


def cached_merge_pairs(model: nn.Module, example_input: torch.Tensor) -> list[tuple[str, str]]:
    """``merge_pairs``, traced once per model structure and input shape (the plan depends on neither values nor
    weights), so that explaining batch after batch does not pay an extra traced forward pass each time.

    The key is the identity and order of every submodule and whether its ``forward`` is rewritten (replacing or
    adding a module re-traces; torch-pruning, which changes modules in place, keeps the plan valid) and the
    input's shape, dtype and device.
    """
    modules = list(model.modules())
    key = (
        tuple(map(id, modules)),
        tuple("forward" in m.__dict__ for m in modules),  # a canonizer's rewritten forward changes the graph
        tuple(example_input.shape[1:]),
        example_input.dtype,
        example_input.device,
    )
    plans = _MERGE_PLANS.setdefault(model, {})
    if key not in plans:
        if len(plans) >= 8:  # bound the cache: shapes of one model rarely vary more than this
            plans.clear()
        plans[key] = merge_pairs(model, example_input)
    return list(plans[key])


def _merged_identity(x: torch.Tensor) -> torch.Tensor:
    """Forward of a BatchNorm merged into the layer before it (what its emptied parameters compute, exactly)."""
    return x


def is_merged_identity(module: nn.Module) -> bool:
    """Whether ``module`` is a BatchNorm that ``GraphMergeBatchNorm`` has merged away (an identity until removed)."""
    return module.__dict__.get("forward") is _merged_identity


class GraphMergeBatchNorm(MergeBatchNorm):
    """Merge each BatchNorm into the conv / linear layer that feeds it directly, found by tracing a forward pass.

    Args:
        example_input: one input batch used to trace the data flow when the canonizer is applied.

    Note:
        The model must be in eval mode while canonized (merging uses the running statistics). zennit's
        ``SequentialMergeBatchNorm`` pairs layers by registration order and, on MONAI DenseNet, merges across a
        concatenation; this one only merges along a direct edge of the data-flow graph.
    """

    def __init__(self, example_input: torch.Tensor | None = None):
        super().__init__()
        self.example_input = example_input

    def apply(self, root_module: nn.Module) -> list[Canonizer]:
        """Trace ``root_module`` once and merge every direct (layer -> BatchNorm) pair; return the merges."""
        if self.example_input is None:
            raise ValueError("GraphMergeBatchNorm needs example_input (one input batch) to trace the model")
        lookup = dict(root_module.named_modules())
        instances = []
        for linear_name, bn_name in cached_merge_pairs(root_module, self.example_input):
            instance = MergeBatchNorm.__new__(type(self))
            MergeBatchNorm.__init__(instance)
            instance.example_input = None
            instance.register((lookup[linear_name],), lookup[bn_name])
            instances.append(instance)
        return instances

    def register(self, linears, batch_norm) -> None:
        """Merge, then skip the emptied BatchNorm: its forward becomes the identity until ``remove``."""
        super().register(linears, batch_norm)
        batch_norm.forward = _merged_identity

    def remove(self) -> None:
        """Undo the merge and give the BatchNorm its own forward back."""
        super().remove()
        if self.batch_norm is not None and self.batch_norm.__dict__.get("forward") is _merged_identity:
            del self.batch_norm.forward

    @staticmethod
    def merge_batch_norm(modules, batch_norm) -> None:
        """zennit's merge, then make the emptied BatchNorm an exact identity.

        zennit leaves ``running_var = 1``, so the BatchNorm still divides by ``sqrt(1 + eps)`` and the canonized
        model's output drifts (about ``5e-6`` per BatchNorm); ``running_var = 1 - eps`` removes that.
        """
        MergeBatchNorm.merge_batch_norm(modules, batch_norm)
        batch_norm.running_var.data = torch.full_like(batch_norm.running_var.data, 1.0 - batch_norm.eps)

    def copy(self) -> GraphMergeBatchNorm:
        """Return a copy with the same example input."""
        return GraphMergeBatchNorm(self.example_input)


def _sum(module: nn.Module, *terms: torch.Tensor, key: str = "canonizer_sum") -> torch.Tensor:
    """Add ``terms`` through the module's canonizer ``Sum`` so a Norm rule can split relevance between them.

    Each call site needs its own ``Sum`` module: a zennit rule keeps one stored input per module, so a module
    called twice in one forward would redistribute the first call's relevance with the second call's input.
    """
    return getattr(module, key)(torch.stack(terms, dim=-1))


def _resnet_block_forward(self: ResNetBlock, x: torch.Tensor) -> torch.Tensor:
    residual = x
    out = self.act(self.bn1(self.conv1(x)))
    out = self.bn2(self.conv2(out))
    if self.downsample is not None:
        residual = self.downsample(x)
    return self.act(_sum(self, out, residual))


def _resnet_bottleneck_forward(self: ResNetBottleneck, x: torch.Tensor) -> torch.Tensor:
    residual = x
    out = self.act(self.bn1(self.conv1(x)))
    out = self.act(self.bn2(self.conv2(out)))
    out = self.bn3(self.conv3(out))
    if self.downsample is not None:
        residual = self.downsample(x)
    return self.act(_sum(self, out, residual))


def _residual_unit_forward(self: ResidualUnit, x: torch.Tensor) -> torch.Tensor:
    res = self.residual(x)
    cx = self.conv(x)
    return _sum(self, cx, res)


def _se_block_forward(self: SEBlock, x: torch.Tensor) -> torch.Tensor:
    residual = self.project(x)
    x = self.se_layer(self.conv3(self.conv2(self.conv1(x))))
    return self.act(_sum(self, x, residual))


def _skip_connection_forward(self: SkipConnection, x: torch.Tensor) -> torch.Tensor:
    return _sum(self, x, self.submodule(x))  # only "add" mode is rewritten; "cat" is conservative as is


def _ahnet_bottleneck_forward(self: Bottleneck3x3x1, x: torch.Tensor) -> torch.Tensor:
    residual = x
    out = self.relu(self.bn1(self.conv1(x)))
    out = self.relu(self.bn2(self.conv2(out)))
    out = self.bn3(self.conv3(out))
    if self.downsample is not None:
        residual = self.downsample(x)
        if out.size() != residual.size():
            out = self.pool(out)
    return self.relu(_sum(self, out, residual))


def _pseudo3d_layer_forward(self: Pseudo3DLayer, x: torch.Tensor) -> torch.Tensor:
    # the 1x1x3 conv reads the 3x3x1 conv's output and both are summed: copied relevance doubled per layer
    x3x3x1 = self.conv2(self.relu2(self.bn2(self.conv1(self.relu1(self.bn1(x))))))
    x1x1x3 = self.conv3(self.relu3(self.bn3(x3x3x1)))
    new_features = self.conv4(self.relu4(self.bn4(_sum(self, x3x3x1, x1x1x3))))
    # no dropout: MONAI's forward sets dropout_prob = 0.0 before using it
    return torch.cat([x, new_features], 1)


def _hovernet_residual_forward(self: HoVerNetResidualBlock, x: torch.Tensor) -> torch.Tensor:
    # each dense layer's output is added to the running shortcut: copied relevance doubled per layer (NaN in lrp)
    sc = self.shortcut(x)
    if self.shortcut.stride == (2, 2):
        sc = sc[:, :, :-1, :-1]
    for i, layer in enumerate(self.layers):
        x = layer(x)
        if x.shape[-2:] != sc.shape[-2:]:
            x = x[:, :, :-1, :-1]
        x = _sum(self, x, sc, key=f"canonizer_sum_{i}")
        sc = x
    return self.bna_block(x)


def _mbconv_forward(self: MBConvBlock, inputs: torch.Tensor) -> torch.Tensor:
    x = inputs
    if self.expand_ratio != 1:
        x = self._swish(self._bn0(self._expand_conv(self._expand_conv_padding(x))))
    x = self._swish(self._bn1(self._depthwise_conv(self._depthwise_conv_padding(x))))
    if self.has_se:  # the sigmoid gate is a constant for relevance, as in SEGateCanonizer
        squeezed = self._se_reduce(self._se_reduce_padding(self._se_adaptpool(x)))
        squeezed = self._se_expand(self._se_expand_padding(self._swish(squeezed)))
        x = _ConstantGate.apply(x, torch.sigmoid(squeezed))
    x = self._bn2(self._project_conv(self._project_conv_padding(x)))
    if self.id_skip and self.stride == 1 and self.in_channels == self.out_channels:
        x = _sum(self, x, inputs)  # drop connect is off in eval mode
    return x


def _transformer_block_forward(self: TransformerBlock, x, context=None, attn_mask=None):
    x = _sum(self, x, self.attn(self.norm1(x), attn_mask=attn_mask), key="canonizer_sum_attn")
    if self.with_cross_attention:
        x = _sum(
            self, x, self.cross_attn(self.norm_cross_attn(x), context=context), key="canonizer_sum_cross"
        )
    return _sum(self, x, self.mlp(self.norm2(x)))


class _OwnMapCanonizer(AttributeCanonizer):
    """An ``AttributeCanonizer`` whose attribute map is its own ``_attribute_map``."""

    def __init__(self):
        super().__init__(self._attribute_map)

    def copy(self) -> _OwnMapCanonizer:
        return type(self)()


class ResidualSumCanonizer(_OwnMapCanonizer):
    """Route the residual additions of MONAI blocks through an explicit ``zennit.layer.Sum`` module.

    Handles ``ResidualUnit`` (UNet with ``num_res_units > 0``), ``ResNetBlock`` / ``ResNetBottleneck`` (MONAI
    ResNet), ``SEBlock`` and its subclasses (SEResNet / SENet / SEResNeXt bottlenecks), ``SkipConnection`` in
    ``"add"`` mode, ViT ``TransformerBlock``, AHNet's ``Bottleneck3x3x1`` / ``Pseudo3DLayer`` (without them the
    copied relevance doubles at each of AHNet's residual sums and overflows float32 in 3D: NaN relevance) and
    EfficientNet's ``MBConvBlock`` (its skip sum, and its SE gate held constant; without them relevance grew
    1e10-fold over B0's blocks) and HoVerNet's residual blocks (one sum per dense layer: NaN relevance without). The forward methods are equivalent re-statements of MONAI's.
    """

    forwards: dict[type, Callable] = {
        ResNetBlock: _resnet_block_forward,
        ResNetBottleneck: _resnet_bottleneck_forward,
        ResidualUnit: _residual_unit_forward,
        SEBlock: _se_block_forward,
        SkipConnection: _skip_connection_forward,
        TransformerBlock: _transformer_block_forward,
        Bottleneck3x3x1: _ahnet_bottleneck_forward,
        Pseudo3DLayer: _pseudo3d_layer_forward,
        MBConvBlock: _mbconv_forward,
        HoVerNetResidualBlock: _hovernet_residual_forward,
    }

    @classmethod
    def _attribute_map(cls, name: str, module: nn.Module) -> dict[str, Any] | None:
        if isinstance(module, SkipConnection) and module.mode != "add":
            return None
        for block_type, fwd in cls.forwards.items():
            if isinstance(module, block_type):
                attrs = {"forward": fwd.__get__(module), "canonizer_sum": Sum()}
                if isinstance(module, TransformerBlock):
                    attrs.update(canonizer_sum_attn=Sum(), canonizer_sum_cross=Sum())
                if isinstance(module, HoVerNetResidualBlock):  # one Sum per dense layer's addition
                    attrs.update({f"canonizer_sum_{i}": Sum() for i in range(len(module.layers))})
                return attrs
        return None


class _ConstantGate(torch.autograd.Function):
    """``x * gate`` whose backward passes the incoming gradient (relevance) to ``x`` unchanged and zero to the gate."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        ctx.gate_shape = gate.shape
        ctx.x_shape = x.shape
        return x * gate

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad.sum_to_size(ctx.x_shape), grad.new_zeros(ctx.gate_shape)


def _channel_se_forward(self: ChannelSELayer, x: torch.Tensor) -> torch.Tensor:
    b, c = x.shape[:2]
    y = self.fc(self.avg_pool(x).view(b, c)).view([b, c] + [1] * (x.ndim - 2))
    result = _ConstantGate.apply(x, y)
    if self.add_residual:
        result = _sum(self, result, x)
    return result


class SEGateCanonizer(_OwnMapCanonizer):
    """Treat the sigmoid gate of MONAI ``ChannelSELayer`` (and ``ResidualSELayer``) as a constant.

    Relevance of ``x * gate`` goes to ``x`` in full; the squeeze-excitation branch (its two ``Linear`` layers)
    receives zero relevance, so LRP scores those channels as 0. Use another criterion (e.g. ``"taylor"``) or
    ``ignored_layers`` for SE layers when pruning them matters.
    """

    @staticmethod
    def _attribute_map(name: str, module: nn.Module) -> dict[str, Any] | None:
        if isinstance(module, ChannelSELayer):
            attrs: dict[str, Any] = {"forward": _channel_se_forward.__get__(module)}
            if module.add_residual:
                attrs["canonizer_sum"] = Sum()
            return attrs
        return None


class _ZeroGrad(torch.autograd.Function):
    """Identity whose backward returns zeros: the value is used, but treated as a constant by relevance."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return x.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(grad)


_SOFTMAXES = {torch.softmax, torch.Tensor.softmax, torch.nn.functional.softmax}
_PRODUCTS = {
    torch.einsum,
    torch.matmul,
    torch.bmm,
    torch.Tensor.matmul,
    torch.Tensor.__matmul__,
    torch.Tensor.bmm,
}


class _EpsilonProduct(torch.autograd.Function):
    """``fn(a, b)`` linear in the non-constant operand; backward is the epsilon rule onto it, zero to the constant."""

    @staticmethod
    def forward(ctx, fn, const_first: bool, const: torch.Tensor, other: torch.Tensor, epsilon: float):
        ctx.fn, ctx.const_first, ctx.epsilon = fn, const_first, epsilon
        ctx.save_for_backward(const, other)
        return fn(const, other) if const_first else fn(other, const)

    @staticmethod
    def backward(ctx, relevance: torch.Tensor):
        const, other = ctx.saved_tensors
        with torch.enable_grad():
            x = other.detach().requires_grad_(True)
            out = ctx.fn(const.detach(), x) if ctx.const_first else ctx.fn(x, const.detach())
            (grad,) = torch.autograd.grad(
                out, x, grad_outputs=relevance / stabilize(out.detach(), ctx.epsilon)
            )
        return None, None, torch.zeros_like(const), other * grad, None


class _ConstantAttention(TorchFunctionMode):
    """Within an attention forward: softmax outputs are constants (zero relevance), and a product of such a
    constant with the values gets the epsilon rule; fused SDPA is computed explicitly the same way."""

    def __init__(self, epsilon: float = 1e-6):
        super().__init__()
        self.epsilon = epsilon
        self.marked: dict[
            int, torch.Tensor
        ] = {}  # constant attention weights (kept alive so ids stay unique)

    def _mark(self, t: torch.Tensor) -> torch.Tensor:
        self.marked[id(t)] = t
        return t

    def _is_marked(self, t: Any) -> bool:
        return isinstance(t, torch.Tensor) and self.marked.get(id(t)) is t

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _SOFTMAXES:
            return self._mark(_ZeroGrad.apply(func(*args, **kwargs)))
        if func is torch.nn.functional.scaled_dot_product_attention:
            return _explicit_attention(*args, epsilon=self.epsilon, **kwargs)
        if func in _PRODUCTS and not kwargs:
            if func is torch.einsum:
                eq, ops = (
                    args[0],
                    (args[1] if len(args) == 2 and isinstance(args[1], (list, tuple)) else args[1:]),
                )

                def fn(a, b, _eq=eq):
                    return torch.einsum(_eq, a, b)

            else:
                ops, fn = args, func
            if len(ops) == 2 and self._is_marked(ops[0]) != self._is_marked(ops[1]):
                const_first = self._is_marked(ops[0])
                const, other = (ops[0], ops[1]) if const_first else (ops[1], ops[0])
                return _EpsilonProduct.apply(fn, const_first, const, other, self.epsilon)
        out = func(*args, **kwargs)
        if args and self._is_marked(args[0]) and isinstance(out, torch.Tensor) and out.shape == args[0].shape:
            self._mark(out)  # dropout / dtype cast / masking of attention weights keeps them constant
        return out


def attention_weights(query, key, attn_mask=None, is_causal=False, scale=None) -> torch.Tensor:
    """The softmax weights ``scaled_dot_product_attention`` applies to its ``value`` (eval: no dropout)."""
    scale = query.shape[-1] ** -0.5 if scale is None else scale
    att = query @ key.transpose(-2, -1) * scale
    if is_causal:
        n, m = att.shape[-2:]
        att = att.masked_fill(~torch.ones(n, m, dtype=torch.bool, device=att.device).tril(), float("-inf"))
    if attn_mask is not None:
        att = att.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else att + attn_mask
    return att.softmax(-1)


def _explicit_attention(
    query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, epsilon=1e-6, **_
):
    att = attention_weights(query, key, attn_mask, is_causal, scale)
    return _EpsilonProduct.apply(torch.matmul, True, _ZeroGrad.apply(att), value, epsilon)


def _constant_attention_forward(self: nn.Module, *args, **kwargs):
    with _ConstantAttention(self.canonizer_epsilon):
        return type(self).forward(self, *args, **kwargs)


class AttentionCanonizer(AttributeCanonizer):
    """Treat attention weights as constants in MONAI ``SABlock`` and SwinUNETR ``WindowAttention`` (CP-LRP).

    The attention output ``softmax(q k^T) v`` becomes linear in ``v``; its gradient routes relevance to the
    values in proportion to the (row-normalised) attention weights, which conserves it. Query and key channels
    of the ``qkv`` projection receive zero relevance.

    Args:
        epsilon: stabiliser of the epsilon rule on ``weights @ values``.
    """

    def __init__(self, epsilon: float = 1e-6):
        self.epsilon = epsilon
        super().__init__(self._attribute_map)

    def _attribute_map(self, name: str, module: nn.Module) -> dict[str, Any] | None:
        if isinstance(module, attention_types()):
            return {"forward": _constant_attention_forward.__get__(module), "canonizer_epsilon": self.epsilon}
        return None

    def copy(self) -> AttentionCanonizer:
        return AttentionCanonizer(self.epsilon)


def attention_types() -> tuple[type, ...]:
    """Attention module classes that ``AttentionCanonizer`` rewrites."""
    types: list[type] = [SABlock]
    try:
        from monai.networks.nets.swin_unetr import WindowAttention

        types.append(WindowAttention)
    except ImportError:  # pragma: no cover - older / newer MONAI layouts
        pass
    return tuple(types)


def auto_canonizers(model: nn.Module, example_input: torch.Tensor, epsilon: float = 1e-6) -> list[Canonizer]:
    """The canonizers ``model`` needs: BatchNorm merging first (traced on the original model), then block rewrites.

    Args:
        model: the network.
        example_input: one input batch (e.g. ``inputs[:1]``) used to trace which BatchNorms can be merged.
        epsilon: stabiliser of the epsilon rule inside attention.
    """
    modules = list(model.modules())
    out: list[Canonizer] = []
    if any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in modules):
        out.append(GraphMergeBatchNorm(example_input[:1]))
    if any(isinstance(m, tuple(ResidualSumCanonizer.forwards)) for m in modules):
        out.append(ResidualSumCanonizer())
    if any(isinstance(m, ChannelSELayer) for m in modules):
        out.append(SEGateCanonizer())
    if any(isinstance(m, attention_types()) for m in modules):
        out.append(AttentionCanonizer(epsilon))
    return out
