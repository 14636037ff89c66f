"""The "ig" method (all-layers-at-once conductance) against captum's single-layer LayerConductance."""

from __future__ import annotations

import pytest
import torch
from captum.attr import LayerConductance
from captum.attr._utils.approximation_methods import approximation_parameters
from monai.networks.nets import DenseNet, UNet, resnet18
from torch import nn

import monai_iaprune.relevance.conductance as cond
from monai_iaprune.relevance import METHODS, channel_relevance, prunable_layers, target_selection
from monai_iaprune.relevance.conductance import conductance, path_alphas, resolve_baseline


def class_select(index: int):
    """Selection of one class logit per sample (captum ``target=index``)."""

    def select(output: torch.Tensor) -> torch.Tensor:
        return target_selection(output, None, index)

    return select


def captum_channel_conductance(model, layer, x, target, n_steps, method, baseline):
    """Captum's LayerConductance for one layer, summed over positions: ``[B, C]``."""
    ref = LayerConductance(model, layer).attribute(
        x, baselines=baseline, target=target, n_steps=n_steps, method=method
    )
    if isinstance(layer, nn.Linear):
        return ref
    return ref.reshape(ref.shape[0], ref.shape[1], -1).sum(-1)


def small_net(inplace: bool = False) -> nn.Module:
    torch.manual_seed(1)
    net = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Conv2d(4, 6, 3, padding=1, stride=2),
        nn.ReLU(inplace=inplace),  # in place right after the conv: its recorded output must not change
        nn.Conv2d(6, 5, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(5, 3),
    )
    with torch.no_grad():  # non-trivial BatchNorm statistics
        net[1].running_mean.uniform_(-0.5, 0.5)
        net[1].running_var.uniform_(0.5, 2.0)
    return net.eval()


def assert_matches_captum(model, x, target, layer_names, n_steps=6, method="riemann_trapezoid", baseline=0.0):
    layers = prunable_layers(model, layer_names)
    ours = conductance(
        model, x, class_select(target), layers, n_steps=n_steps, baseline=baseline, method=method
    )
    ref_baseline = (
        baseline if isinstance(baseline, (int, float)) else resolve_baseline(x, baseline).expand_as(x)
    )
    for name, module in layers.items():
        ref = captum_channel_conductance(model, module, x, target, n_steps, method, ref_baseline).detach()
        assert ours[name].shape == ref.shape, name
        assert ref.abs().max() > 0, f"degenerate oracle at {name}"
        torch.testing.assert_close(ours[name], ref, rtol=1e-3, atol=1e-5 * ref.abs().max().item(), msg=name)


@pytest.mark.parametrize("method", cond.INTEGRATION_METHODS)
@pytest.mark.parametrize("n_points", [2, 5, 9])
def test_path_alphas_are_captums(method, n_points):
    assert path_alphas(n_points, method) == pytest.approx(
        approximation_parameters(method)[1](n_points), abs=0
    )


@pytest.mark.parametrize("method", ["riemann_trapezoid", "gausslegendre", "riemann_right"])
@pytest.mark.parametrize("baseline", [0.0, -0.5, "tensor", "mean"])
def test_small_conv_net_equals_captum_every_layer(method, baseline):
    net = small_net()
    x = torch.randn(3, 1, 16, 16)
    if baseline == "tensor":
        baseline = 0.3 * torch.randn(1, 1, 16, 16)
    assert_matches_captum(net, x, 2, None, n_steps=5, method=method, baseline=baseline)


def test_output_modified_in_place_after_the_conv_is_recorded_before_it(monkeypatch):
    net = small_net(inplace=True)
    x = torch.randn(2, 1, 16, 16)
    assert_matches_captum(net, x, 1, ["3", "5"])
    # without the in-place detection the recorded output of "3" is the ReLU'd one: the result differs
    monkeypatch.setattr(cond._PathRecorder, "modified_in_place", lambda self: set())
    wrong = conductance(net, x, class_select(1), prunable_layers(net, ["3"]), n_steps=6)["3"]
    ref = captum_channel_conductance(net, net[3], x, 1, 6, "riemann_trapezoid", 0.0).detach()
    assert not torch.allclose(wrong, ref, rtol=1e-3, atol=1e-6)


def test_monai_resnet18_2d_equals_captum_on_several_layers():
    torch.manual_seed(0)
    net = resnet18(spatial_dims=2, n_input_channels=1, num_classes=3, widen_factor=0.125).eval()
    x = torch.randn(2, 1, 32, 32)
    names = ["conv1", "layer1.0.conv1", "layer2.0.conv2", "layer2.0.downsample.0", "layer4.1.conv2", "fc"]
    assert_matches_captum(net, x, 0, names, n_steps=4)


def test_monai_densenet_3d_equals_captum():
    torch.manual_seed(0)
    net = DenseNet(
        spatial_dims=3,
        in_channels=1,
        out_channels=2,
        init_features=4,
        growth_rate=4,
        block_config=(2, 2),
        bn_size=2,
    ).eval()
    x = torch.randn(1, 1, 16, 16, 16)
    names = ["features.conv0", "features.denseblock1.denselayer1.layers.conv1", "features.transition1.conv"]
    assert set(names) <= set(prunable_layers(net))
    assert_matches_captum(net, x, 1, names, n_steps=4)


def test_segmentation_target_equals_captum_on_the_selected_sum():
    torch.manual_seed(0)
    net = UNet(
        spatial_dims=2, in_channels=1, out_channels=3, channels=(4, 8), strides=(2,), num_res_units=0
    ).eval()
    x = torch.randn(2, 1, 16, 16)
    label = torch.randint(0, 3, (2, 1, 16, 16))
    with torch.no_grad():
        sel = target_selection(net(x), label, "label")

    def explained(inp):  # what F is: selected logits summed per sample
        return (net(inp) * sel.repeat(inp.shape[0] // 2, 1, 1, 1)).flatten(1).sum(1)

    layers = prunable_layers(net)
    ours = conductance(net, x, lambda out: target_selection(out, label, "label"), layers, n_steps=4)
    for name, module in layers.items():
        ref = LayerConductance(explained, module).attribute(
            x, baselines=0.0, n_steps=4, method="riemann_trapezoid"
        )
        ref = ref.reshape(2, ref.shape[1], -1).sum(-1).detach()
        torch.testing.assert_close(ours[name], ref, rtol=1e-3, atol=1e-5 * ref.abs().max().item(), msg=name)


def test_completeness_through_a_layer_all_paths_cross():
    net = small_net()
    x = torch.randn(2, 1, 16, 16)
    base = 0.2 * torch.randn(1, 1, 16, 16)
    layers = prunable_layers(net)
    ours = conductance(net, x, class_select(2), layers, n_steps=256, baseline=base)
    with torch.no_grad():
        delta = net(x)[:, 2] - net(base.expand_as(x))[:, 2]
    assert delta.abs().min() > 1e-3
    for name in layers:  # a plain chain: every layer is crossed by all paths
        torch.testing.assert_close(ours[name].sum(1), delta, rtol=2e-2, atol=1e-4, msg=name)
    # with few steps the sum is only approximate, so the tolerance above is not vacuous for this net
    coarse = conductance(net, x, class_select(2), prunable_layers(net, ["0"]), n_steps=1, baseline=base)["0"]
    assert not torch.allclose(coarse.sum(1), delta, rtol=2e-2, atol=1e-4)


def test_shared_layer_sums_its_calls():
    torch.manual_seed(0)

    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.first = nn.Conv2d(1, 3, 3, padding=1)
            self.shared = nn.Conv2d(3, 3, 3, padding=1)
            self.head = nn.Linear(3, 2)

        def forward(self, x):
            h = self.shared(torch.tanh(self.shared(torch.tanh(self.first(x)))))
            return self.head(h.mean((2, 3)))

    net = Twice().eval()
    x = torch.randn(2, 1, 8, 8)
    ours = conductance(net, x, class_select(0), prunable_layers(net), n_steps=128)
    with torch.no_grad():
        delta = net(x)[:, 0] - net(torch.zeros_like(x))[:, 0]
    torch.testing.assert_close(ours["first"].sum(1), delta, rtol=2e-2, atol=1e-4)
    torch.testing.assert_close(ours["shared"].sum(1), 2 * delta, rtol=2e-2, atol=1e-4)


def test_two_batches_of_four_equal_one_batch_of_eight_and_chunking_does_not_matter():
    net = small_net()
    x = torch.randn(8, 1, 16, 16)
    label = torch.tensor([0, 1, 2, 0, 1, 2, 2, 1])
    layers = prunable_layers(net)

    def run(xs, ys, **kw):
        return conductance(net, xs, lambda out: target_selection(out, ys, "label"), layers, n_steps=5, **kw)

    whole = run(x, label)
    halves = [run(x[:4], label[:4]), run(x[4:], label[4:])]
    for ibs in (None, 3, 8, 20):  # 3 < batch splits the batch; 20 is 2.5 path points per chunk
        chunked = run(x, label, internal_batch_size=ibs)
        for name in layers:
            torch.testing.assert_close(chunked[name], whole[name], rtol=1e-4, atol=1e-6)
    for name in layers:
        torch.testing.assert_close(torch.cat([h[name] for h in halves]), whole[name], rtol=1e-4, atol=1e-6)
    # different labels explain different logits: the per-sample label really is used
    other = run(x, (label + 1) % 3)
    assert not torch.allclose(other["9"], whole["9"])


@pytest.mark.parametrize("method", ["riemann_trapezoid", "gausslegendre"])
@pytest.mark.parametrize("ibs", [None, 2])
def test_selection_is_taken_at_the_real_input(method, ibs):
    net = small_net()
    x = torch.randn(4, 1, 16, 16)
    seen = []

    def select(output):
        seen.append(output.detach().clone())
        return target_selection(output, None, "pred")

    conductance(net, x, select, prunable_layers(net), n_steps=3, method=method, internal_batch_size=ibs)
    assert len(seen) == 1
    with torch.no_grad():
        torch.testing.assert_close(seen[0], net(x), rtol=1e-5, atol=1e-6)


def test_channel_relevance_runs_ig_for_every_layer():
    net = small_net()
    data = [
        (torch.randn(2, 1, 16, 16), torch.tensor([0, 2])),
        (torch.randn(2, 1, 16, 16), torch.tensor([1, 1])),
    ]
    assert "ig" in METHODS
    rel = channel_relevance(net, data, "ig", n_steps=3, progress=False)
    layers = prunable_layers(net)
    assert set(rel) == set(layers) and rel.num_samples == 4
    per_batch = [
        conductance(net, xb, lambda out, yb=yb: target_selection(out, yb, "label"), layers, n_steps=3)
        for xb, yb in data
    ]
    for name, m in layers.items():
        expected = torch.cat([p[name] for p in per_batch]).abs().mean(0)
        torch.testing.assert_close(rel[name], expected, rtol=1e-4, atol=1e-7)
        assert rel[name].shape == (m.weight.shape[0],)


def test_blur_and_zeros_baselines():
    x = torch.randn(2, 1, 16, 16)
    assert torch.equal(resolve_baseline(x, "zeros").expand_as(x), torch.zeros_like(x))
    blurred = resolve_baseline(x, "blur", blur_sigma=2.0)
    assert blurred.shape == x.shape
    assert blurred.std() < 0.5 * x.std()  # smoothed
    torch.testing.assert_close(blurred.mean((2, 3)), x.mean((2, 3)), atol=0.2, rtol=0)
    mean = resolve_baseline(x, "mean")
    torch.testing.assert_close(mean.flatten(1)[:, 0], x.flatten(1).mean(1))


@pytest.mark.parametrize("n_steps", [0, -3, 2.5, True, "8"])
def test_invalid_n_steps_is_a_clear_error(n_steps):
    net = small_net()
    with pytest.raises(ValueError, match="n_steps must be a positive integer"):
        conductance(net, torch.randn(1, 1, 16, 16), class_select(0), prunable_layers(net), n_steps=n_steps)


@pytest.mark.parametrize(
    "baseline, error, match",
    [
        (
            torch.zeros(1, 1, 8, 8),
            ValueError,
            r"baseline of shape \(1, 1, 8, 8\) does not broadcast to the input shape \(2, 1, 16, 16\)",
        ),
        (torch.zeros(3, 1, 16, 16), ValueError, "does not broadcast"),
        ("noise", ValueError, "unknown baseline 'noise'"),
        ([0.0], TypeError, "baseline must be a number, a tensor"),
    ],
)
def test_invalid_baseline_is_a_clear_error(baseline, error, match):
    net = small_net()
    with pytest.raises(error, match=match):
        conductance(net, torch.randn(2, 1, 16, 16), class_select(0), prunable_layers(net), baseline=baseline)


def test_invalid_method_and_internal_batch_size_are_clear_errors():
    net = small_net()
    x = torch.randn(1, 1, 16, 16)
    with pytest.raises(ValueError, match="unknown integration method 'simpson'"):
        conductance(net, x, class_select(0), prunable_layers(net), method="simpson")
    with pytest.raises(ValueError, match="internal_batch_size must be a positive integer"):
        conductance(net, x, class_select(0), prunable_layers(net), internal_batch_size=0)
