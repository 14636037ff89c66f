"""Removable blocks of MONAI networks and the relevance that flows through each block's branch (depth pruning).

A *removable block* is one whose replacement by the identity keeps every shape: a residual block ``out = skip +
branch`` whose skip is the identity (MONAI ``ResNetBlock`` / ``ResNetBottleneck`` without downsample, SE blocks
without projection, ``ResidualUnit`` with an identity residual, SegResNet ``ResBlock``, DynUNet ``UnetResBlock``
without ``conv3``, ViT ``TransformerBlock``, SwinUNETR ``SwinTransformerBlock``), or a DenseNet ``_DenseLayer``
(``out = cat([x, branch])``; dropping it removes its channels, which ``pruning.depth`` re-slices in consumers).

Block relevance is the relevance of the branch output at the block's join (sum or concatenation), per sample
summed over positions, averaged over a loader (as ``channel_relevance`` for channels):

- ``"lrp"``: zennit LRP (``relevance.lrp.lrp_context``, ``"epsilon"`` composite). At ``s = branch + skip`` the
  epsilon rule splits the relevance ``R_s`` arriving at ``s`` as ``branch * R_s / s`` and ``skip * R_s / s``
  (so branch + skip relevance = ``R_s``); at a concatenation each slice keeps its own relevance.
- ``"dlb"``: DL-Backtrace (``relevance.backtrace``): at ``s = branch + skip`` each operand takes
  ``|operand| / (|branch| + |skip|)`` of the relevance arriving at ``s`` (DLB's sum rule; branch + skip relevance =
  ``R_s``), at a concatenation each slice keeps its own relevance (as LRP's).
- ``"taylor"``: ``|sum(branch * d target / d branch)|``: first-order change of the target when the branch is
  replaced by zero, i.e. when the block becomes the identity.
- ``"ig"`` / ``"conductance"``: conductance of the branch output (Dhamdhere et al. 2018) along the straight path
  from a baseline (zero) to the input, ``sum_k g_k . (b_{k+1} - b_k)`` (trapezoid gradients).
- ``"magnitude"``: root-mean-square of the block's parameters (data-free).
- ``"random"``: uniform random scores (data-free, seeded).

A transformer block has two joins (attention, MLP): its relevance is the sum over both branches.

While scoring, each block's ``forward`` is temporarily re-stated (same modules, same order, no in-place add) with
its join routed through a recording autograd function; it is restored afterwards.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from monai.networks.blocks import ResidualUnit, SEBlock
from monai.networks.blocks.dynunet_block import UnetResBlock
from monai.networks.blocks.segresnet_block import ResBlock
from monai.networks.blocks.transformerblock import TransformerBlock
from monai.networks.nets.densenet import _DenseLayer
from monai.networks.nets.resnet import ResNetBlock, ResNetBottleneck
from torch import nn

from monai_iaprune.relevance.backtrace import backtrace_forward, magnitude_split
from monai_iaprune.relevance.hooks import OutputRecorder, no_param_grad
from monai_iaprune.relevance.targets import TargetSpec, target_selection
from monai_iaprune.utils.batch import input_batches, model_device, plain_tensor, split_batch

try:
    from monai.networks.nets.swin_unetr import SwinTransformerBlock
except ImportError:  # pragma: no cover - MONAI layout without SwinUNETR
    SwinTransformerBlock = None

__all__ = [
    "BLOCK_METHODS",
    "BlockFamily",
    "BlockRelevance",
    "RemovedBlock",
    "block_families",
    "block_relevance",
    "block_stage",
    "block_terms",
    "find_blocks",
    "lrp_block_terms",
    "removable_blocks",
]

Join = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class RemovedBlock(nn.Identity):
    """What a removed block becomes: the identity on its first input (extra arguments, e.g. Swin's attention
    mask, are ignored), with no parameters, so a saved state dict has no trace of the block."""

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return x


# ---- per family: structural removability and the forward re-stated with an explicit join ----------------------


def _resnet_block(self: ResNetBlock, join: Join, x: torch.Tensor) -> torch.Tensor:
    out = self.bn2(self.conv2(self.act(self.bn1(self.conv1(x)))))
    return self.act(join(out, x))


def _resnet_bottleneck(self: ResNetBottleneck, join: Join, x: torch.Tensor) -> torch.Tensor:
    out = self.act(self.bn2(self.conv2(self.act(self.bn1(self.conv1(x))))))
    out = self.bn3(self.conv3(out))
    return self.act(join(out, x))


def _se_block(self: SEBlock, join: Join, x: torch.Tensor) -> torch.Tensor:
    out = self.se_layer(self.conv3(self.conv2(self.conv1(x))))
    return self.act(join(out, self.project(x)))


def _residual_unit(self: ResidualUnit, join: Join, x: torch.Tensor) -> torch.Tensor:
    return join(self.conv(x), self.residual(x))


def _segresnet_block(self: ResBlock, join: Join, x: torch.Tensor) -> torch.Tensor:
    out = self.conv1(self.act(self.norm1(x)))
    out = self.conv2(self.act(self.norm2(out)))
    return join(out, x)


def _unet_res_block(self: UnetResBlock, join: Join, x: torch.Tensor) -> torch.Tensor:
    out = self.norm2(self.conv2(self.lrelu(self.norm1(self.conv1(x)))))
    return self.lrelu(join(out, x))


def _transformer_block(self: TransformerBlock, join: Join, x, context=None, attn_mask=None):
    x = join(self.attn(self.norm1(x), attn_mask=attn_mask), x)
    if self.with_cross_attention:
        x = join(self.cross_attn(self.norm_cross_attn(x), context=context), x)
    return join(self.mlp(self.norm2(x)), x)


def _swin_block(self, join: Join, x: torch.Tensor, mask_matrix: torch.Tensor | None = None) -> torch.Tensor:
    x = join(self.drop_path(self.forward_part1(x, mask_matrix)), x)
    return join(self.forward_part2(x), x)


def _dense_layer(self: _DenseLayer, join: Join, x: torch.Tensor) -> torch.Tensor:
    return join(self.layers(x), x)


@dataclass(frozen=True)
class BlockFamily:
    """A kind of removable block.

    Attributes:
        name: short family name (``"resnet"``, ``"dense"``, ...).
        types: the MONAI classes.
        forward: ``(block, join, *inputs) -> output``, the block's forward with its join(s) explicit.
        removable: structural test (e.g. no downsample) that replacing the block keeps shapes.
        dense: the join is ``cat([skip, branch], dim=1)`` (DenseNet) rather than ``branch + skip``.
        why_not: the reason given when ``removable`` is false.
    """

    name: str
    types: tuple[type, ...]
    forward: Callable[..., torch.Tensor]
    removable: Callable[[nn.Module], bool]
    dense: bool = False
    why_not: str = ""


def _always(_: nn.Module) -> bool:
    return True


def _no_downsample(m: nn.Module) -> bool:
    return m.downsample is None


_DOWNSAMPLES = "has a downsample (stride or channel change)"
_FAMILIES: list[BlockFamily] = [
    BlockFamily(
        "resnet_bottleneck", (ResNetBottleneck,), _resnet_bottleneck, _no_downsample, why_not=_DOWNSAMPLES
    ),
    BlockFamily("resnet", (ResNetBlock,), _resnet_block, _no_downsample, why_not=_DOWNSAMPLES),
    BlockFamily(
        "se",
        (SEBlock,),
        _se_block,
        lambda m: isinstance(m.project, nn.Identity),
        why_not="has a projection on its skip (stride or channel change)",
    ),
    BlockFamily(
        "residual_unit",
        (ResidualUnit,),
        _residual_unit,
        lambda m: isinstance(m.residual, nn.Identity),
        why_not="its residual is a convolution (stride or channel change)",
    ),
    BlockFamily("segresnet", (ResBlock,), _segresnet_block, _always),
    BlockFamily(
        "unet_res",
        (UnetResBlock,),
        _unet_res_block,
        lambda m: not hasattr(m, "conv3"),
        why_not="projects its skip (stride or channel change)",
    ),
    BlockFamily("transformer", (TransformerBlock,), _transformer_block, _always),
    BlockFamily("dense", (_DenseLayer,), _dense_layer, _always, dense=True),
]
if SwinTransformerBlock is not None:
    _FAMILIES.append(BlockFamily("swin", (SwinTransformerBlock,), _swin_block, _always))


def block_families() -> list[BlockFamily]:
    """The supported block families, most specific first."""
    return list(_FAMILIES)


def _family(module: nn.Module) -> BlockFamily | None:
    for fam in _FAMILIES:
        if isinstance(module, fam.types):
            return fam
    return None


def block_stage(name: str) -> str:
    """The stage of a block: its parent module's qualified name (``"layer2"``, ``"features.denseblock1"``)."""
    return name.rsplit(".", 1)[0] if "." in name else ""


@dataclass
class Block:
    """One block of a network: ``name``, ``module``, ``family``, ``stage`` and whether it is ``removable``."""

    name: str
    module: nn.Module
    family: BlockFamily
    stage: str
    removable: bool
    reason: str = ""


def find_blocks(model: nn.Module) -> dict[str, Block]:
    """Every block of a supported family in ``model`` (removable or not), outermost only, in registration order.

    Args:
        model: the network.
    """
    found: dict[str, Block] = {}
    for name, module in model.named_modules():
        if any(name.startswith(f"{b}.") for b in found):
            continue  # nested inside a block already found (removing the outer block removes it)
        fam = _family(module)
        if fam is None:
            continue
        ok = bool(fam.removable(module))
        found[name] = Block(name, module, fam, block_stage(name), ok, "" if ok else fam.why_not)
    return found


def removable_blocks(model: nn.Module) -> dict[str, Block]:
    """The blocks whose replacement by the identity keeps shapes (see the module docstring)."""
    return {n: b for n, b in find_blocks(model).items() if b.removable}


# ---- recording joins -------------------------------------------------------------------------------------------


def _per_sample(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(t.shape[0], -1).double().sum(1)  # float64: relevance terms of both signs cancel


def _stabilize(z: torch.Tensor, eps: float) -> torch.Tensor:
    return z + torch.where(z >= 0, eps, -eps)  # zennit's default stabiliser, sign(0) = +1


Split = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def _epsilon_split(epsilon: float) -> Split:
    """LRP's epsilon rule at ``s = branch + skip``: ``branch * R / s`` and ``skip * R / s``."""

    def split(branch, skip, grad):
        ratio = grad / _stabilize(branch + skip, epsilon)
        return branch * ratio, skip * ratio

    return split


def _magnitude_split(branch, skip, grad):
    """DL-Backtrace's sum rule: ``|branch| / (|branch| + |skip|)`` and ``|skip| / (...)`` of ``R``."""
    return magnitude_split(branch.abs(), skip.abs(), grad)


class _RecordedJoin(torch.autograd.Function):
    """``branch + skip`` (or ``cat([skip, branch], 1)``) whose backward reports what reaches each operand.

    With ``split`` set (LRP's epsilon rule, DLB's magnitude share), the incoming relevance ``R`` of a sum is split
    by it; otherwise (and for a concatenation) the ordinary gradient is passed.
    """

    @staticmethod
    def forward(ctx, branch, skip, dense: bool, split: Split | None, record: Callable):
        ctx.dense, ctx.split, ctx.record = dense, split, record
        ctx.save_for_backward(branch, skip)
        return torch.cat([skip, branch], 1) if dense else branch + skip

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        branch, skip = ctx.saved_tensors
        if ctx.dense:
            g_skip, g_branch = grad.split([skip.shape[1], branch.shape[1]], 1)
        elif ctx.split is not None:
            g_branch, g_skip = ctx.split(branch, skip, grad)
        else:
            g_branch, g_skip = grad, grad
        ctx.record(branch.detach(), g_branch.detach(), g_skip.detach(), grad.detach())
        return g_branch, g_skip, None, None, None


@contextlib.contextmanager
def _explicit_joins(
    blocks: dict[str, Block], record: Callable[..., None], split: Split | None
) -> Iterator[None]:
    """Re-state each block's forward with a recording join; ``record(name, branch, g_branch, g_skip, g_out)``."""
    saved = []
    try:
        for name, blk in blocks.items():
            fam = blk.family

            def join(b, k, _name=name, _dense=fam.dense):
                return _RecordedJoin.apply(b, k, _dense, split, functools.partial(record, _name))

            saved.append((blk.module, blk.module.__dict__.get("forward")))
            blk.module.forward = functools.partial(fam.forward, blk.module, join)
        yield
    finally:
        for module, old in reversed(saved):
            if old is None:
                del module.forward
            else:
                module.forward = old


# ---- relevance methods -------------------------------------------------------------------------------------------


def _first(output: Any) -> torch.Tensor:
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]  # e.g. MONAI ViT returns (logits, hidden states): explain the logits
    if not isinstance(output, torch.Tensor):
        raise TypeError(f"block relevance needs a model that returns a tensor, got {type(output).__name__}")
    return output


class _Terms:
    """Per-block, per-sample sums of what the recording joins report in one backward pass."""

    def __init__(self):
        self.branch: dict[str, torch.Tensor] = {}
        self.skip: dict[str, torch.Tensor] = {}
        self.joins: dict[str, list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]] = {}
        self.mass: dict[str, list[torch.Tensor]] = {}
        self.taylor: dict[str, torch.Tensor] = {}
        self.raw: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        self.keep_raw = False

    def __call__(self, name, branch, g_branch, g_skip, g_out):
        def add(d, v):
            d[name] = v if name not in d else d[name] + v

        add(self.branch, _per_sample(g_branch))
        add(self.skip, _per_sample(g_skip))
        add(self.taylor, _per_sample(branch * g_branch))
        self.joins.setdefault(name, []).insert(  # backward meets the joins last-first: keep forward order
            0, (_per_sample(g_branch), _per_sample(g_skip), _per_sample(g_out))
        )
        self.mass.setdefault(name, []).insert(0, _per_sample(g_out.abs()))
        if self.keep_raw:
            self.raw.setdefault(name, []).append((branch, g_branch))


def _lrp_batch(model, x, select, blocks, terms: _Terms) -> dict[str, torch.Tensor]:
    output = _first(model(x))
    start = (select(output) * output).detach()
    torch.autograd.grad(output, x, grad_outputs=start, allow_unused=True)
    return dict(terms.branch)


def _dlb_batch(model, x, select, blocks, terms: _Terms) -> dict[str, torch.Tensor]:
    with backtrace_forward(model):  # per batch: the rule hooks keep per-forward state
        output = _first(model(x))
    torch.autograd.grad(output, x, grad_outputs=(select(output) * output).detach(), allow_unused=True)
    return dict(terms.branch)


def _taylor_batch(model, x, select, blocks, terms: _Terms) -> dict[str, torch.Tensor]:
    output = _first(model(x))
    (output * select(output).detach()).sum().backward()
    return {n: v.abs() for n, v in terms.taylor.items()}


def _ig_batch(model, x, select, blocks, terms: _Terms, n_steps: int = 16, baseline: float = 0.0):
    """Conductance of each branch output along ``baseline -> x``: ``sum_k (g_k + g_{k+1}) / 2 . (b_{k+1} - b_k)``."""
    if n_steps < 1:
        raise ValueError(f"n_steps must be >= 1, got {n_steps}")
    with torch.no_grad():
        sel = select(_first(model(x.detach()))).detach()
    base = torch.full_like(x, float(baseline))
    points: list[dict[str, list[tuple[torch.Tensor, torch.Tensor]]]] = []
    for alpha in torch.linspace(0, 1, n_steps + 1).tolist():
        terms.raw.clear()
        terms.keep_raw = True
        xa = (base + alpha * (x - base)).detach().requires_grad_(True)
        output = _first(model(xa))
        (output * sel).sum().backward()
        points.append({n: list(v) for n, v in terms.raw.items()})
    terms.keep_raw = False
    result: dict[str, torch.Tensor] = {}
    for name in points[-1]:
        total = torch.zeros(x.shape[0], dtype=torch.float64, device=x.device)
        # joins are recorded in backward order; the same order at every point pairs them up
        for j in range(len(points[-1][name])):
            for k in range(n_steps):
                b0, g0 = points[k][name][j]
                b1, g1 = points[k + 1][name][j]
                total = total + _per_sample(0.5 * (g0 + g1) * (b1 - b0)).double()
        result[name] = total
    return result


def _magnitude(blocks: dict[str, Block], **_: Any) -> dict[str, float]:
    out = {}
    for name, blk in blocks.items():
        params = [p.detach().float().flatten() for p in blk.module.parameters()]
        flat = torch.cat(params) if params else torch.zeros(1)
        out[name] = float(flat.pow(2).mean().sqrt())
    return out


def _random(blocks: dict[str, Block], seed: int = 0, **_: Any) -> dict[str, float]:
    gen = torch.Generator().manual_seed(seed)
    return {name: float(v) for name, v in zip(blocks, torch.rand(len(blocks), generator=gen))}


BLOCK_METHODS: dict[str, Callable[..., Any]] = {
    "lrp": _lrp_batch,
    "dlb": _dlb_batch,
    "taylor": _taylor_batch,
    "ig": _ig_batch,
    "conductance": _ig_batch,
    "magnitude": _magnitude,
    "random": _random,
}
"""Block relevance methods; ``"magnitude"`` and ``"random"`` are data-free."""

_DATA_FREE = ("magnitude", "random")


class BlockRelevance(dict):
    """``{block name: float}`` relevance of each removable block's branch (mean over samples), plus provenance.

    Attributes:
        method: the relevance method.
        num_samples: samples averaged (0 for data-free methods).
        stages: ``{block name: stage name}``.
        example_input: one input sample (``[1, ...]``) usable as ``prune_depth``'s ``example_inputs``.
    """

    def __init__(self, values, method: str, num_samples: int, stages: dict[str, str], example_input=None):
        super().__init__(values)
        self.method = method
        self.num_samples = num_samples
        self.stages = stages
        self.example_input = example_input


@contextlib.contextmanager
def _method_context(model, x, method, blocks, terms, epsilon, composite, canonizers) -> Iterator[None]:
    with contextlib.ExitStack() as stack:
        stack.enter_context(no_param_grad(model))
        stack.enter_context(torch.enable_grad())
        if method == "lrp":
            from monai_iaprune.relevance.lrp import lrp_context

            stack.enter_context(lrp_context(model, x, composite, epsilon, epsilon, canonizers))
        split = {"lrp": _epsilon_split(epsilon), "dlb": _magnitude_split}.get(method)
        # entered after the canonizers: the re-stated forwards replace theirs until the canonizers are removed
        stack.enter_context(_explicit_joins(blocks, terms, split))
        yield


def block_relevance(
    model: nn.Module,
    data: Iterable[Any] | None,
    method: str = "lrp",
    *,
    blocks: Iterable[str] | None = None,
    target: TargetSpec = "label",
    absolute: bool = True,
    image_key: str = "image",
    label_key: str = "label",
    device: torch.device | str | None = None,
    max_batches: int | None = None,
    composite: str = "epsilon",
    epsilon: float = 1e-6,
    canonizers: Any = "auto",
    **method_kwargs: Any,
) -> BlockRelevance:
    """Relevance flowing through the branch of every removable block of ``model``, averaged over ``data``.

    Args:
        model: the network; put in eval mode while scoring and restored after.
        data: batches (tensors, ``(image, label)`` pairs or MONAI dicts); ``None`` only for data-free methods.
        method: a name in ``BLOCK_METHODS``: ``"lrp"``, ``"taylor"``, ``"ig"`` (= ``"conductance"``),
            ``"magnitude"``, ``"random"``.
        blocks: names of the blocks to score; default every removable block.
        target: what is explained (see ``relevance.targets``).
        absolute: average ``|per-sample block relevance|`` (default) rather than the signed value.
        image_key, label_key: keys of dict batches.
        device: where to run; default the model's device.
        max_batches: stop after this many batches.
        composite, epsilon, canonizers: LRP settings (see ``relevance.lrp.lrp_context``); ``epsilon`` also
            stabilises the split at each residual sum.
        method_kwargs: ``n_steps`` / ``baseline`` for ``"ig"``, ``seed`` for ``"random"``.

    Returns:
        ``BlockRelevance`` ``{block name: float}``.

    Raises:
        ValueError: unknown method, unknown block name, no removable block, or no data for a data-driven method.
    """
    if method not in BLOCK_METHODS:
        raise ValueError(f"unknown block relevance method {method!r}; available: {sorted(BLOCK_METHODS)}")
    found = find_blocks(model)
    if blocks is None:
        chosen = {n: b for n, b in found.items() if b.removable}
    else:
        names = list(blocks)
        unknown = [n for n in names if n not in found or not found[n].removable]
        if unknown:
            raise ValueError(f"not removable blocks of {type(model).__name__}: {unknown[:5]}")
        chosen = {n: found[n] for n in names}
    if not chosen:
        raise ValueError(no_removable_message(model, found))
    stages = {n: b.stage for n, b in chosen.items()}
    if method in _DATA_FREE:
        values = BLOCK_METHODS[method](chosen, **method_kwargs)
        example = None
        for batch in data or ():
            example = plain_tensor(split_batch(batch, image_key, label_key)[0])[:1].detach().cpu().float()
            break
        return BlockRelevance(values, method, 0, stages, example)
    if data is None:
        raise ValueError(f"method {method!r} needs data: pass a loader or an iterable of batches")
    if device is None:
        device = model_device(model)
    fn = BLOCK_METHODS[method]
    sums: dict[str, torch.Tensor] = {}
    count, example = 0, None
    was_training = model.training
    model.eval()
    terms = _Terms()
    try:
        with contextlib.ExitStack() as stack:
            batches = data if max_batches is None else itertools.islice(data, max_batches)
            for x, label in input_batches(batches, device, image_key, label_key):
                x = x.detach().requires_grad_(True)
                if example is None:
                    example = x[:1].detach().cpu()
                    stack.enter_context(
                        _method_context(model, x, method, chosen, terms, epsilon, composite, canonizers)
                    )

                def select(output: torch.Tensor, _label=label) -> torch.Tensor:
                    return target_selection(output, _label, target)

                terms.__init__()
                per_sample = fn(model, x, select, chosen, terms, **method_kwargs)
                for name, v in per_sample.items():
                    v = v.detach().double()
                    v = v.abs() if absolute else v
                    sums[name] = v.sum().cpu() if name not in sums else sums[name] + v.sum().cpu()
                count += x.shape[0]
    finally:
        model.train(was_training)
    if count == 0:
        raise ValueError(
            "empty data: the loader yielded no batches, so no block relevance could be collected"
        )
    values = {n: float(sums[n] / count) if n in sums else 0.0 for n in chosen}
    return BlockRelevance(values, method, count, stages, example)


def lrp_block_terms(
    model: nn.Module,
    inputs: torch.Tensor,
    select: Callable[[torch.Tensor], torch.Tensor],
    blocks: Iterable[str] | None = None,
    composite: str = "epsilon",
    epsilon: float = 1e-6,
    canonizers: Any = "auto",
) -> dict[str, dict[str, Any]]:
    """``block_terms(method="lrp")``."""
    return block_terms(model, inputs, select, "lrp", blocks, composite, epsilon, canonizers)


def block_terms(
    model: nn.Module,
    inputs: torch.Tensor,
    select: Callable[[torch.Tensor], torch.Tensor],
    method: str = "lrp",
    blocks: Iterable[str] | None = None,
    composite: str = "epsilon",
    epsilon: float = 1e-6,
    canonizers: Any = "auto",
) -> dict[str, dict[str, Any]]:
    """One LRP (``method="lrp"``) or DL-Backtrace (``"dlb"``) pass, per block: ``{"joins": [(branch, skip, out)], "output": relevance at the block's output,
    "mass": [sum of |relevance| at each join's output]}``.

    Each term is per-sample ``[B]`` relevance (summed in float64), joins in forward order. ``mass`` is the scale
    of the float32 rounding of the sums (relevance of both signs may cancel by orders of magnitude).
    ``branch + skip == out`` at every join (LRP: up to the epsilon stabiliser; conservation), and for a block with
    one join followed only by an element-wise activation, ``out == output``. ``block_relevance(method=...)`` scores
    a block by the sum of its ``branch`` terms (two joins for transformer blocks).
    """
    passes = {"lrp": _lrp_batch, "dlb": _dlb_batch}
    if method not in passes:
        raise ValueError(f"block_terms supports methods {sorted(passes)}, got {method!r}")
    found = removable_blocks(model)
    chosen = found if blocks is None else {n: found[n] for n in blocks}
    terms = _Terms()
    was_training = model.training
    model.eval()
    try:
        x = inputs.detach().clone().float().requires_grad_(True)
        with _method_context(model, x, method, chosen, terms, epsilon, composite, canonizers):
            with OutputRecorder({n: b.module for n, b in chosen.items()}) as rec:
                passes[method](model, x, select, chosen, terms)
                grads = {n: _per_sample(g.detach()) for n, g in rec.grads.items()}
                rec.clear()
        return {
            n: {"joins": list(v), "output": grads.get(n), "mass": terms.mass[n]}
            for n, v in terms.joins.items()
        }
    finally:
        model.train(was_training)


def no_removable_message(model: nn.Module, found: dict[str, Block] | None = None) -> str:
    """The error text for a network without a removable block: what was found and why it is kept."""
    found = find_blocks(model) if found is None else found
    fams = ", ".join(sorted({t.__name__ for f in _FAMILIES for t in f.types}))
    if not found:
        return (
            f"{type(model).__name__} has no removable block: depth pruning replaces residual / dense blocks "
            f"({fams}) by the identity, and this network has none"
        )
    kept = "; ".join(f"{n!r} {b.reason}" for n, b in list(found.items())[:4])
    return f"{type(model).__name__} has no removable block: every block changes shapes ({kept})"
