"""channel_relevance: collection over loaders, batch formats, targets and bad input."""

from __future__ import annotations

import pytest
import torch
from monai.networks.nets import UNet, ViT
from torch import nn

from monai_iaprune import channel_relevance
from monai_iaprune.relevance import METHODS


def _cnn(dims: int = 2) -> nn.Sequential:
    conv = nn.Conv2d if dims == 2 else nn.Conv3d
    return nn.Sequential(
        conv(1, 4, 3, padding=1),
        nn.ReLU(),
        conv(4, 6, 3, padding=1),
        nn.ReLU(),
        nn.Flatten(1),
        nn.LazyLinear(3),
    )


def _data(n=8, size=8):
    g = torch.Generator().manual_seed(3)
    return torch.randn(n, 1, size, size, generator=g), torch.randint(0, 3, (n,), generator=g)


def test_methods_registered():
    net = _cnn()
    net(_data(2)[0])
    channel_relevance(net, [_data(2)], "random", progress=False)
    assert {"lrp", "ig", "dlb", "taylor", "magnitude", "random"} <= set(METHODS)


def test_every_layer_scored_with_channel_counts():
    net = _cnn()
    x, y = _data()
    net(x)  # materialise the lazy layer
    rel = channel_relevance(net, [(x, y)], "taylor", progress=False)
    assert {k: v.shape[0] for k, v in rel.items()} == {"0": 4, "2": 6, "5": 3}
    assert rel.num_samples == 8 and rel.method == "taylor"
    assert rel.example_input.shape == (1, 1, 8, 8)


def test_dict_batches_equal_tuple_batches_and_batching_does_not_matter():
    net = _cnn()
    x, y = _data()
    net(x)
    one = channel_relevance(net, [(x, y)], "taylor", progress=False)
    dicts = channel_relevance(
        net, [{"image": x[:4], "label": y[:4]}, {"image": x[4:], "label": y[4:]}], "taylor", progress=False
    )
    for k in one:
        torch.testing.assert_close(dicts[k], one[k], rtol=1e-5, atol=1e-8)


def test_target_changes_the_relevance():
    net = _cnn()
    x, y = _data()
    net(x)
    a = channel_relevance(net, [(x, y)], "taylor", target=0, progress=False)
    b = channel_relevance(net, [(x, y)], "taylor", target=2, progress=False)
    assert not torch.allclose(a["0"], b["0"])


def test_layer_subset_and_bad_layer_names():
    net = _cnn()
    x, y = _data()
    net(x)
    rel = channel_relevance(net, [(x, y)], "taylor", layers=["2"], progress=False)
    assert list(rel) == ["2"]
    with pytest.raises(KeyError, match="nope"):
        channel_relevance(net, [(x, y)], "taylor", layers=["nope"], progress=False)
    with pytest.raises(TypeError, match="ReLU"):
        channel_relevance(net, [(x, y)], "taylor", layers=["1"], progress=False)


def test_unknown_method_names_the_choices():
    with pytest.raises(ValueError, match=r"unknown relevance method 'lrpp'.*'lrp'"):
        channel_relevance(_cnn(), [_data()], "lrpp")


def test_empty_data_is_an_error():
    net = _cnn()
    net(_data()[0])
    with pytest.raises(ValueError, match="empty data"):
        channel_relevance(net, [], "taylor", progress=False)
    with pytest.raises(ValueError, match="needs data"):
        channel_relevance(net, None, "taylor", progress=False)


def test_nan_relevance_is_an_error():
    net = _cnn()
    x, y = _data()
    net(x)
    x[0, 0, 0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="NaN/Inf relevance"):
        channel_relevance(net, [(x, y)], "taylor", progress=False)


def test_wrong_input_dims_named():
    net = _cnn(dims=3)
    with pytest.raises(ValueError, match=r"wrong input dims.*5-D"):
        channel_relevance(net, [_data()], "taylor", progress=False)


def test_model_mode_restored():
    net = _cnn()
    x, y = _data()
    net(x)
    net.train()
    channel_relevance(net, [(x, y)], "taylor", progress=False)
    assert net.training


def test_tuple_output_networks_are_explained_by_their_first_output():
    net = ViT(
        in_channels=1,
        img_size=(16, 16),
        patch_size=(4, 4),
        hidden_size=16,
        mlp_dim=32,
        num_layers=1,
        num_heads=2,
        spatial_dims=2,
        classification=True,
        num_classes=2,
    )
    data = [(torch.randn(2, 1, 16, 16), torch.tensor([0, 1]))]
    rel = channel_relevance(net, data, "taylor", progress=False)
    assert "classification_head.0" in rel and rel["classification_head.0"].shape == (2,)


def test_segmentation_target_from_mask():
    net = UNet(spatial_dims=2, in_channels=1, out_channels=3, channels=(4, 8), strides=(2,), num_res_units=0)
    x = torch.randn(2, 1, 16, 16)
    label = torch.zeros(2, 1, 16, 16)
    label[:, :, 4:8, 4:8] = 1
    label[:, :, 10:14, 10:14] = 2
    rel = channel_relevance(net, [{"image": x, "label": label}], "taylor", progress=False)
    assert all(torch.isfinite(v).all() and v.sum() > 0 for v in rel.values())
    # a different mask changes what is explained
    other = channel_relevance(
        net, [{"image": x, "label": torch.zeros_like(label) + (label == 2) * 2}], "taylor", progress=False
    )
    some = next(iter(rel))
    assert not torch.allclose(rel[some], other[some])


def test_metatensor_inputs_with_inplace_residual_adds():
    """MONAI MetaTensor batches (LoadImaged output) must score every layer of SegResNet (``x += identity``)."""
    from monai.data import MetaTensor
    from monai.networks.nets import SegResNet

    net = SegResNet(
        spatial_dims=2,
        in_channels=1,
        out_channels=2,
        init_filters=4,
        blocks_down=(1, 1),
        blocks_up=(1,),
        norm="batch",
    )
    x = MetaTensor(torch.randn(2, 1, 16, 16))
    label = MetaTensor((torch.rand(2, 1, 16, 16) > 0.5).float())
    rel = channel_relevance(net, [{"image": x, "label": label}], "taylor", progress=False)
    assert len(rel) == len([m for m in net.modules() if isinstance(m, (nn.Conv2d, nn.Linear))])


def test_recorded_activations_are_freed_after_scoring():
    """Regression: the gradient hook used to hold the recorder strongly, a cycle through the autograd graph
    that the garbage collector cannot break, so every Taylor / DL-Backtrace call leaked its activations."""
    import gc
    import weakref

    from monai_iaprune.relevance.hooks import OutputRecorder

    net = torch.nn.Sequential(
        torch.nn.Conv2d(1, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(144, 2)
    )
    rec = OutputRecorder({"0": net[0]})
    with rec:
        x = torch.randn(2, 1, 8, 8, requires_grad=True)
        net(x).sum().backward()
    assert rec.grads["0"].shape == (2, 4, 6, 6)  # the gradient reached the recorder
    activation = weakref.ref(rec.outputs["0"])
    del rec, x
    gc.collect()
    assert activation() is None


@pytest.mark.parametrize(
    ("method", "typo", "accepted"),
    [("lrp", "epsillon", "epsilon"), ("ig", "nsteps", "n_steps"), ("magnitude", "q", "p")],
)
def test_misspelt_method_setting_is_an_error_listing_the_accepted_names(method, typo, accepted):
    """Issue #13: a misspelt relevance keyword was swallowed by the methods' ``**_`` and silently ignored."""
    net = _cnn()
    net(_data(2)[0])
    with pytest.raises(ValueError, match=rf"takes no setting\(s\) \['{typo}'\].*'{accepted}'"):
        channel_relevance(net, [_data(2)], method, progress=False, **{typo: 1})
    channel_relevance(net, [_data(2)], method, progress=False, **{accepted: 2})  # the right name is taken


def test_a_method_names_every_setting_it_takes():
    from monai_iaprune.relevance.registry import register_method, unregister_method

    @register_method("toy_any")
    def toy(model, inputs, select, layers, scale: float = 1.0, **kwargs):
        return {n: scale * torch.ones(inputs.shape[0], m.weight.shape[0]) for n, m in layers.items()}

    try:
        net = _cnn()
        net(_data(2)[0])
        rel = channel_relevance(net, [_data(2)], "toy_any", progress=False, scale=2.0)
        assert set(rel) == {"0", "2", "5"} and float(rel["0"][0]) == 2.0
        with pytest.raises(ValueError, match=r"\['anything'\].*\['scale'\]"):  # **kwargs is no licence
            channel_relevance(net, [_data(2)], "toy_any", progress=False, anything=1)
    finally:
        unregister_method("toy_any")
