"""One test per fix found by the network sweep (tests/test_sweep.py): the fixed call works, the unfixed one fails.

The unfixed variants replace one fix by a no-op (``monkeypatch``); each test names the MONAI network it came from.
"""

from __future__ import annotations

import contextlib
import copy
import sys

import pytest
import torch
from monai.networks import nets
from torch import nn

from monai_iaprune import channel_relevance, prune
from monai_iaprune.pruning import monai_fixes as F

PRUNE_MODULE = sys.modules["monai_iaprune.pruning.prune"]


def _eval_trace(model, x) -> dict:
    """``trace_kwargs`` without the fix: torch-pruning's own trace (eval mode, from the output only)."""

    def forward_fn(net, inputs):
        out = net(inputs)
        F.release_held_tensors(net)  # DynUNet's kept heads: copyable, as with the fix
        return F._tensors(out)  # SegResNetVAE returns (out, None) in eval mode

    return {"forward_fn": forward_fn}


def _setup_with_eval_trace(model, x, ignored=None, pruner_kwargs=None):
    """``pruning_setup`` whose pruner traces as torch-pruning does without the fix (``_eval_trace``)."""
    ignored, extra = F.pruning_setup(model, x, ignored, pruner_kwargs)
    extra.update(_eval_trace(model, x))
    return ignored, extra


def _train_step_runs(net: nn.Module, x: torch.Tensor) -> None:
    net.train()
    out = net(x)
    out = out[0] if isinstance(out, (tuple, list)) else out
    out.float().mean().backward()


class _UnusedHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.out = nn.Conv2d(1, 8, 3, padding=1), nn.Conv2d(8, 2, 1)
        self.head = nn.Linear(8, 3)  # an encoder's classification head, never run (FlexibleUNet's _fc)

    def forward(self, x):
        return self.out(torch.relu(self.conv(x)))


def test_never_run_layer_is_unscored_and_left_alone():
    net, x = _UnusedHead(), torch.randn(1, 1, 8, 8)
    rel = channel_relevance(net, [(x, torch.zeros(1, 1, 8, 8, dtype=torch.long))], "taylor", progress=False)
    assert rel.unscored == ("head",) and "head" not in rel
    result = prune(net, rel, 0.3, example_inputs=x)
    assert net.conv.out_channels < 8 and result.channels["head"] == (3, 3)
    assert net.head.in_features == 8  # never run: not in the traced graph, untouched


def _dynunet(res_block: bool = True, deep_supervision: bool = True) -> nn.Module:
    torch.manual_seed(0)
    return nets.DynUNet(
        2, 1, 2, kernel_size=(3, 3, 3), strides=(1, 2, 2), upsample_kernel_size=(2, 2), filters=(8, 16, 32),
        res_block=res_block, deep_supervision=deep_supervision, deep_supr_num=1,
    )  # fmt: skip


@pytest.mark.parametrize("fixed", [True, False])
def test_deep_supervision_heads_keep_their_width(monkeypatch, fixed):
    """DynUNet keeps its heads' outputs aside in eval mode: untraced, they kept their input width."""
    if not fixed:
        monkeypatch.setattr(PRUNE_MODULE, "pruning_setup", _setup_with_eval_trace)
    net, x = _dynunet(res_block=False), torch.randn(2, 1, 16, 16)
    rel = channel_relevance(net, None, "magnitude", progress=False)
    if not fixed:
        with pytest.raises(RuntimeError, match="channels"):
            prune(net, rel, 0.5, example_inputs=x[:1])
            _train_step_runs(net, x)
        return
    prune(net, rel, 0.5, example_inputs=x[:1])
    _train_step_runs(net, x)
    assert all(h.conv.conv.out_channels == 2 for h in net.deep_supervision_heads)


@pytest.mark.parametrize("fixed", [True, False])
def test_training_only_branch_is_traced(monkeypatch, fixed):
    """SegResNetVAE's VAE branch runs only in training: traced in eval mode, it kept its input width.

    Its ``vae_fc3`` output is reshaped to feature maps and kept whole (``_vae_reshaped_linears``).
    """
    if not fixed:
        monkeypatch.setattr(PRUNE_MODULE, "pruning_setup", _setup_with_eval_trace)
    torch.manual_seed(0)
    net = nets.SegResNetVAE((16, 16), spatial_dims=2, init_filters=8, in_channels=1, out_channels=2, vae_nz=8)
    x = torch.randn(2, 1, 16, 16)
    rel = channel_relevance(net, None, "magnitude", progress=False)
    prune(net, rel, 0.5, example_inputs=x[:1])
    if not fixed:
        with pytest.raises(RuntimeError):
            _train_step_runs(net, x)
        return
    _train_step_runs(net, x)


@pytest.mark.parametrize("fixed", [True, False])
def test_norm_before_inplace_residual_sum(monkeypatch, fixed):
    """UnetResBlock: ``out = norm2(conv2(x)); out += residual`` on the instance norm's view hid the norm."""
    if not fixed:
        monkeypatch.setattr(F, "instance_norm_outputs_copied", contextlib.nullcontext)
    net, x = _dynunet(deep_supervision=False), torch.randn(1, 1, 16, 16)
    rel = channel_relevance(net, None, "magnitude", progress=False)
    if not fixed:
        with pytest.raises((RuntimeError, ValueError), match="num_features|channels"):
            prune(net, rel, 0.5, example_inputs=x)
            net.eval()(x)
        return
    prune(net, rel, 0.5, example_inputs=x)
    assert net.eval()(x).shape == (1, 2, 16, 16)


def _highresnet() -> nn.Module:
    torch.manual_seed(0)
    layers = (
        {"name": "conv_0", "n_features": 4, "kernel_size": 3},
        {"name": "res_1", "n_features": 8, "kernels": (3, 3), "repeat": 1},
        {"name": "conv_1", "n_features": 8, "kernel_size": 1},
        {"name": "conv_2", "kernel_size": 1},
    )
    return nets.HighResNet(spatial_dims=2, in_channels=1, out_channels=2, layer_params=layers)


@pytest.mark.parametrize("fixed", [True, False])
def test_zero_padded_residual_keeps_its_streams(monkeypatch, fixed):
    """HighResNet ``x_conv + F.pad(x)`` (4 -> 8 channels) is traced as element-wise: indices past x's 4 channels."""
    if not fixed:
        monkeypatch.setattr(F, "padded_residual_layers", lambda model, x: [])
    net, x = _highresnet(), torch.randn(1, 1, 16, 16)
    rel = channel_relevance(net, None, "magnitude", progress=False)
    if not fixed:
        with pytest.raises((IndexError, RuntimeError)):
            prune(net, rel, 0.3, example_inputs=x)
            net.eval()(x)
        return
    result = prune(net, rel, 0.3, example_inputs=x)
    assert result.params_removed > 0.1
    assert net.eval()(x).shape == (1, 2, 16, 16)


def test_dynunet_can_be_copied_after_a_forward_with_gradients():
    net = _dynunet(res_block=False)
    net.eval()(
        torch.randn(1, 1, 16, 16)
    )  # eval mode keeps the heads' outputs (with their graph) in net.heads
    with pytest.raises(RuntimeError, match="deepcopy"):
        copy.deepcopy(net)
    F.release_held_tensors(net)
    copy.deepcopy(net)


@pytest.mark.parametrize("fixed", [True, False])
def test_unetr_keeps_the_vit_hidden_size(monkeypatch, fixed):
    """UNETR reshapes the ViT's tokens to ``[B, *grid, hidden_size]``: a pruned token stream breaks the view."""
    if not fixed:
        monkeypatch.setattr(F, "_token_streams", lambda model: [])
    torch.manual_seed(0)
    net = nets.UNETR(
        in_channels=1, out_channels=2, img_size=(16, 16), feature_size=8, hidden_size=48, mlp_dim=96, num_heads=4,
        spatial_dims=2,
    )  # fmt: skip
    x = torch.randn(1, 1, 16, 16)
    rel = channel_relevance(net, None, "magnitude", progress=False)
    if not fixed:
        with pytest.raises((RuntimeError, ValueError, IndexError)):
            prune(net, rel, 0.4, example_inputs=x)
            net.eval()(x)
        return
    prune(net, rel, 0.4, example_inputs=x)
    assert net.vit.patch_embedding.patch_embeddings.out_channels == 48
    assert net.eval()(x).shape == (1, 2, 16, 16)


def test_quicknat_is_refused_naming_maxunpool():
    net = nets.Quicknat(num_classes=2, num_channels=1, num_filters=8)
    x = torch.randn(1, 1, 32, 32)
    rel = channel_relevance(net, None, "magnitude", progress=False)
    with pytest.raises(NotImplementedError, match="MaxUnpool"):
        prune(net, rel, 0.5, example_inputs=x)


def test_vit_macs_target_leaves_the_uncountable_attention_groups(caplog):
    """ViT: removing one channel of an attention ``qkv`` group gives an ``out_proj`` whose input no longer fits
    (torch-pruning maps the einops split onto it inconsistently), so its cost cannot be counted. Unfixed, the MACs
    target refused the whole network; fixed, that group is skipped with a warning and left unpruned (the params
    target never prunes it either), and every other group is pruned to the budget."""
    from monai_iaprune.pruning.cost import channel_costs

    torch.manual_seed(0)
    net = nets.ViT(in_channels=1, img_size=(32, 32), patch_size=(8, 8), hidden_size=48, mlp_dim=96, num_layers=2,
                   num_heads=4, spatial_dims=2, classification=True, num_classes=3).eval()  # fmt: skip
    x = torch.randn(2, 1, 32, 32)
    with pytest.raises(RuntimeError):  # the unfixed behaviour
        channel_costs(net, x[:1])
    costs = channel_costs(net, x[:1], skip_uncountable=True)
    assert not any(name.endswith("attn.qkv") for name in costs) and any("mlp.linear1" in n for n in costs)
    assert "blocks.0.attn.qkv" in caplog.text and "left unpruned" in caplog.text

    class First(nn.Module):  # ViT returns (logits, hidden states)
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, t):
            return self.m(t)[0]

    model = First(net)
    rel = channel_relevance(model, [(x, torch.tensor([0, 1]))], "taylor", progress=False)
    res = prune(model, rel, 0.5, example_inputs=x[:1], target="macs")
    assert res.macs_after <= 0.5 * res.macs_before * 1.02
    assert all(b.attn.qkv.out_features == 144 and b.attn.out_proj.in_features == 48 for b in net.blocks)
    assert model(x).shape == (2, 3)
