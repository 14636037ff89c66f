"""Explanations survive pruning: attribution maps, agreement metrics and deletion / insertion faithfulness."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from monai_iaprune.report.explanations import (
    agreement_from_maps,
    attribution_maps,
    curve_auc,
    deletion_insertion_curves,
    explanation_agreement,
    explanation_report,
    faithfulness,
    map_ssim,
    spearman_correlation,
    top_fraction_iou,
)
from tests.conftest import MEDMNIST, require_file


def _linear(spatial: tuple[int, ...], k: int = 2) -> nn.Sequential:
    n = int(np.prod(spatial))
    return nn.Sequential(nn.Flatten(), nn.Linear(n, k))


def _one_pixel_model(spatial: tuple[int, ...], flat_index: int, w: float = 8.0) -> nn.Sequential:
    """Two-class linear model: class 1's logit is ``w * x[flat_index]``, class 0's is 0."""
    m = _linear(spatial)
    with torch.no_grad():
        m[1].weight.zero_()
        m[1].bias.zero_()
        m[1].weight[1, flat_index] = w
    return m


def _conv_net(spatial_dims: int, k: int = 3) -> nn.Sequential:
    conv = nn.Conv2d if spatial_dims == 2 else nn.Conv3d
    pool = nn.AdaptiveAvgPool2d if spatial_dims == 2 else nn.AdaptiveAvgPool3d
    return nn.Sequential(
        conv(1, 4, 3, padding=1),
        nn.ReLU(),
        conv(4, 6, 3, padding=1),
        nn.ReLU(),
        pool(1),
        nn.Flatten(),
        nn.Linear(6, k),
    )


# ------------------------------------------------------------------------------------- attribution maps
def test_ig_of_linear_model_is_weight_times_input():
    m = _linear((8, 8))
    x, y = torch.rand(3, 1, 8, 8), torch.tensor([0, 1, 1])
    maps = attribution_maps(m, x, "ig", label=y, n_steps=4)
    expected = m[1].weight.detach()[y].view(3, 8, 8) * x[:, 0]
    assert maps.shape == (3, 8, 8)
    torch.testing.assert_close(maps, expected, atol=1e-6, rtol=1e-5)


def test_ig_completeness_on_segmentation_mask():
    """IG sums to (selected logits at x) - (selected logits at the zero baseline), for a class over a mask."""
    net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.Softplus(), nn.Conv2d(4, 3, 1))
    x = torch.rand(2, 1, 12, 12)
    label = torch.zeros(2, 1, 12, 12)
    label[:, :, 3:7, 4:9] = 2
    maps = attribution_maps(net, x, "ig", target="label", label=label, n_steps=64)
    sel = torch.zeros(2, 3, 12, 12)
    sel[:, 2] = (label[:, 0] == 2).float()
    with torch.no_grad():
        gap = (net(x) * sel).flatten(1).sum(1) - (net(torch.zeros_like(x)) * sel).flatten(1).sum(1)
    torch.testing.assert_close(maps.flatten(1).sum(1), gap, atol=2e-3 * gap.abs().max().item(), rtol=0)


def test_ig_restores_training_mode_and_param_grads():
    m = _conv_net(2)
    m.train()
    attribution_maps(m, torch.rand(1, 1, 16, 16), "ig", target="pred", n_steps=2)
    assert m.training
    assert all(p.requires_grad and p.grad is None for p in m.parameters())


def test_unknown_method_and_wrong_dims_raise():
    m = _conv_net(2)
    with pytest.raises(ValueError, match="unknown attribution method"):
        attribution_maps(m, torch.rand(1, 1, 8, 8), "gradcam")
    with pytest.raises(ValueError, match="wrong input dims"):
        attribution_maps(m, torch.rand(1, 1, 8, 8, 8), "ig")


def test_lrp_path_raises_clearly_or_matches_input_shape():
    from monai_iaprune.relevance import lrp

    m = _conv_net(2)
    x = torch.rand(2, 1, 16, 16)
    if not hasattr(lrp, "input_relevance"):
        with pytest.raises(NotImplementedError, match="input_relevance"):
            attribution_maps(m, x, "lrp", target="pred")
    else:
        maps = attribution_maps(m, x, "lrp", target="pred")
        assert maps.shape == (2, 16, 16) and torch.isfinite(maps).all() and maps.abs().sum() > 0
        # epsilon rule on a bias-free linear model: relevance = w * x of the explained class
        lin = _linear((6, 6))
        with torch.no_grad():
            lin[1].bias.zero_()
        xl, yl = torch.rand(2, 1, 6, 6), torch.tensor([1, 0])
        rel = attribution_maps(lin, xl, "lrp", label=yl, composite="epsilon")
        expected = lin[1].weight.detach()[yl].view(2, 6, 6) * xl[:, 0]
        torch.testing.assert_close(rel, expected, atol=1e-4, rtol=1e-3)


# ------------------------------------------------------------------------------------ per-image metrics
def test_spearman_matches_scipy_with_ties():
    stats = pytest.importorskip("scipy.stats")
    g = torch.Generator().manual_seed(1)
    a = torch.randint(0, 5, (200,), generator=g).float()  # many ties
    b = a + torch.randn(200, generator=g)
    expected = stats.spearmanr(a.numpy(), b.numpy()).statistic
    assert spearman_correlation(a, b) == pytest.approx(expected, abs=1e-10)
    assert spearman_correlation(a, -b) == pytest.approx(-expected, abs=1e-10)


def test_spearman_constant_map():
    a = torch.zeros(4, 4)
    assert spearman_correlation(a, a.clone()) == 1.0
    assert np.isnan(spearman_correlation(a, torch.rand(4, 4)))


def test_top_fraction_iou_by_hand():
    a = torch.arange(20.0)  # top 10 % = {19, 18}
    b = a.clone()
    b[18] = -100.0  # |b| puts 18 first, 19 second: same set
    assert top_fraction_iou(a, b, 0.1) == 1.0
    c = a.clone()
    c[18] = 0.0  # top = {19, 17}: intersection 1, union 3
    assert top_fraction_iou(a, c, 0.1) == pytest.approx(1 / 3)
    assert top_fraction_iou(a, a.flip(0), 0.1) == 0.0
    with pytest.raises(ValueError, match="fraction"):
        top_fraction_iou(a, b, 0.0)


def test_ssim_identical_and_inverted_2d_3d():
    g = torch.Generator().manual_seed(0)
    for shape in ((3, 20, 20), (2, 12, 12, 12)):
        a = torch.randn(shape, generator=g)
        assert torch.allclose(map_ssim(a, a.clone()), torch.ones(shape[0]), atol=1e-5)
        assert (map_ssim(a, -a) < 0).all()
        # scale invariance: the pruned model's logits may be smaller
        assert torch.allclose(map_ssim(a, 0.01 * a), torch.ones(shape[0]), atol=1e-4)


def test_agreement_from_maps_summary_is_median_and_iqr():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(5, 16, 16, generator=g)
    b = a + 0.5 * torch.randn(5, 16, 16, generator=g)
    r = agreement_from_maps(a, b)
    per = r["per_image"]["spearman"]
    assert r["spearman_median"] == pytest.approx(float(np.median(per)))
    q = np.percentile(per, [25, 75])
    assert r["spearman_iqr"] == pytest.approx(float(q[1] - q[0]))
    assert r["n_images"] == 5 and len(r["per_image"]["top10_iou"]) == 5 and len(r["per_image"]["ssim"]) == 5
    with pytest.raises(ValueError, match="differ in shape"):
        agreement_from_maps(a, b[:, :8])
    lo, hi = r["spearman_ci"]
    assert min(per) <= lo <= r["spearman_median"] <= hi <= max(per)


def test_bootstrap_ci_matches_a_direct_resampling_and_narrows_with_more_images():
    from monai_iaprune.report.explanations import bootstrap_ci

    rng = np.random.default_rng(1)
    v = rng.normal(0.5, 0.2, 40)
    lo, hi = bootstrap_ci(v, np.mean, n_boot=500, seed=3)
    r = np.random.default_rng(3)  # the oracle: the same resampling written out
    means = [v[r.integers(0, 40, 40)].mean() for _ in range(500)]
    assert (lo, hi) == pytest.approx(tuple(np.percentile(means, [2.5, 97.5])))
    wide = bootstrap_ci(v[:10], np.mean, n_boot=500)
    assert hi - lo < wide[1] - wide[0]
    assert bootstrap_ci([0.3], np.median) == (0.3, 0.3)
    assert all(np.isnan(bootstrap_ci([float("nan")])))


# --------------------------------------------------------------------------------------------- agreement
@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_identical_models_agree_perfectly(spatial_dims):
    m = _conv_net(spatial_dims)
    size = (16,) * spatial_dims
    data = [{"image": torch.rand(2, 1, *size), "label": torch.tensor([[0], [2]])} for _ in range(2)]
    r = explanation_agreement(m, copy.deepcopy(m), data, "ig", max_samples=3, n_steps=4)
    assert r["n_images"] == 3  # max_samples cuts the second batch
    assert r["spearman_median"] == pytest.approx(1.0)
    assert r["top10_iou_median"] == pytest.approx(1.0)
    assert r["ssim_median"] == pytest.approx(1.0, abs=1e-5)
    assert all(v == pytest.approx(1.0) for v in r["per_image"]["spearman"])


def test_inverted_map_gives_negative_correlation():
    m = _linear((10, 10))
    inv = copy.deepcopy(m)
    with torch.no_grad():
        inv[1].weight.neg_()
    x, y = torch.rand(4, 1, 10, 10), torch.tensor([0, 1, 0, 1])
    r = explanation_agreement(m, inv, (x, y), "ig", n_steps=4)
    assert r["spearman_median"] < -0.99
    assert r["ssim_median"] < 0  # structure inverted
    assert r["top10_iou_median"] == pytest.approx(1.0)  # same voxels matter, by |attribution|
    # an unrelated model sits in between
    other = _linear((10, 10))
    r2 = explanation_agreement(m, other, (x, y), "ig", n_steps=4)
    assert -0.99 < r2["spearman_median"] < 0.99


def test_pred_target_explains_model_a_class_for_both():
    """With target='pred', the second model explains the first model's predicted class, not its own."""
    m = _linear((6, 6))
    with torch.no_grad():
        m[1].bias.copy_(torch.tensor([100.0, 0.0]))  # always predicts class 0
    flipped = copy.deepcopy(m)
    with torch.no_grad():
        flipped[1].bias.copy_(torch.tensor([0.0, 100.0]))  # always predicts class 1, same weights
    x = torch.rand(3, 1, 6, 6)
    r = explanation_agreement(m, flipped, x, "ig", target="pred", n_steps=2)
    assert r["spearman_median"] == pytest.approx(1.0)  # both explain class 0 -> identical maps


# ------------------------------------------------------------------------------------------ faithfulness
@pytest.mark.parametrize("spatial", [(6, 6), (4, 4, 4)])
def test_deletion_drops_exactly_at_the_only_pixel_used(spatial):
    n = int(np.prod(spatial))
    p = n // 3
    m = _one_pixel_model(spatial, p)
    x = 0.5 + 0.5 * torch.rand(2, 1, *spatial)  # pixel p > 0.5: class 1 probability >= sigmoid(4)
    y = torch.tensor([1, 1])
    steps = n  # one pixel per step
    r = faithfulness(m, (x, y), "ig", steps=steps, n_steps=4)
    d, i = r["curves"]["deletion"], r["curves"]["insertion"]
    assert d.shape == (2, steps + 1)
    assert (d[:, 0] > 0.98).all()
    torch.testing.assert_close(d[:, 1:], torch.full((2, steps), 0.5))  # gone after the first deletion
    torch.testing.assert_close(i[:, 0], torch.full((2,), 0.5))
    assert (i[:, 1:] > 0.98).all()  # back with the first insertion
    # the same pixel ranked last: probability holds until the very last step
    last = -attribution_maps(m, x, "ig", label=y, n_steps=4)
    d2, _ = deletion_insertion_curves(m, x, last, torch.tensor([[0.0, 1.0]] * 2), steps=steps)
    assert (d2[:, :-1] > 0.98).all() and torch.allclose(d2[:, -1], torch.full((2,), 0.5))
    assert r["deletion_auc"] < curve_auc(d2).mean().item() - 0.4
    r_last = faithfulness(m, (x, y), last, steps=steps)
    assert r_last["insertion_auc"] < r["insertion_auc"] - 0.4


def test_faithfulness_batched_equals_per_sample_and_curve_auc():
    m = _conv_net(2)
    x = torch.rand(3, 1, 16, 16)
    r = faithfulness(m, x, "ig", target="pred", steps=5, n_steps=2)
    singles = [faithfulness(m, x[j : j + 1], "ig", target="pred", steps=5, n_steps=2) for j in range(3)]
    torch.testing.assert_close(
        r["curves"]["deletion"], torch.cat([s["curves"]["deletion"] for s in singles]), atol=1e-5, rtol=1e-4
    )
    assert r["fractions"] == pytest.approx([0, 0.2, 0.4, 0.6, 0.8, 1.0])
    # trapezoid by hand for the first curve
    c = r["curves"]["insertion"][0].numpy()
    assert r["insertion_auc_per_image"][0] == pytest.approx(
        float(((c[1:] + c[:-1]) / 2 * 0.2).sum()), rel=1e-5
    )
    # the end points: deletion ends (and insertion starts) at the all-baseline image
    assert torch.allclose(r["curves"]["deletion"][:, -1], r["curves"]["insertion"][:, 0])


def test_faithfulness_mean_baseline_and_callable_and_errors():
    m = _one_pixel_model((4, 4), 5)
    x = torch.rand(2, 1, 4, 4) + 1.0
    r = faithfulness(m, x, lambda model, inputs, sel: inputs[:, 0], steps=4, baseline="mean", target=1)
    assert r["n_images"] == 2 and 0.0 <= r["deletion_auc"] <= 1.0
    with pytest.raises(ValueError, match="baseline"):
        faithfulness(m, x, "ig", baseline="blur")
    with pytest.raises(ValueError, match="precomputed maps"):
        faithfulness(m, x, torch.zeros(1, 4, 4))
    with pytest.raises(ValueError, match="empty data"):
        faithfulness(m, [], "ig")


def test_segmentation_faithfulness_tracks_mask_probability():
    net = nn.Sequential(nn.Conv2d(1, 2, 1))
    with torch.no_grad():
        net[0].weight.copy_(torch.tensor([[[[-3.0]]], [[[3.0]]]]))
        net[0].bias.zero_()
    x = torch.rand(1, 1, 8, 8) + 0.5
    label = torch.zeros(1, 1, 8, 8)
    label[..., 2:4, 2:4] = 1
    r = faithfulness(net, (x, label), "ig", steps=4, n_steps=2)
    d = r["curves"]["deletion"][0]
    p0 = torch.softmax(net(x), 1)[0, 1, 2:4, 2:4].mean()
    assert d[0].item() == pytest.approx(p0.item(), rel=1e-5)  # mean class-1 probability over the mask
    assert d[-1].item() == pytest.approx(0.5)


def test_monai_loader_and_basicunet_segmentation():
    """MONAI dict batches of MetaTensors through a MONAI DataLoader, a MONAI segmentation network."""
    from monai.data import DataLoader, Dataset, MetaTensor
    from monai.networks.nets import BasicUNet

    net = BasicUNet(spatial_dims=2, in_channels=1, out_channels=2, features=(4, 4, 4, 4, 8, 4))
    items = []
    for _ in range(3):
        img = MetaTensor(torch.rand(1, 32, 32))
        items.append({"image": img, "label": (img > 0.5).float()})
    loader = DataLoader(Dataset(items), batch_size=2)
    assert type(next(iter(loader))["image"]).__name__ == "MetaTensor"
    r = explanation_agreement(net, copy.deepcopy(net), loader, "ig", n_steps=2)
    assert r["n_images"] == 3 and r["spearman_median"] == pytest.approx(1.0)
    f = faithfulness(net, loader, "ig", steps=4, n_steps=2)
    assert f["curves"]["deletion"].shape == (3, 5)
    assert all(0.0 <= v <= 1.0 for v in f["deletion_auc_per_image"])


# ------------------------------------------------------------------------------------------------ report
def _pruned_pair(spatial_dims: int):
    from monai_iaprune import channel_relevance, prune

    m = _conv_net(spatial_dims)
    x = torch.rand(4, 1, *((16 if spatial_dims == 2 else 12,) * spatial_dims))
    rel = channel_relevance(m, [x], "magnitude", progress=False)
    pruned = copy.deepcopy(m)
    result = prune(pruned, rel, 0.3, target="channels", example_inputs=x[:1])
    assert result.params_after < result.params_before
    return m, pruned, x


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_explanation_report_on_pruned_pair(tmp_path, spatial_dims):
    m, pruned, x = _pruned_pair(spatial_dims)
    out = explanation_report(
        m, pruned, [x[:2], x[2:]], tmp_path, "ig", n_images=2, max_samples=3, target="pred"
    )
    for k in ("expl_spearman", "expl_top10_iou", "expl_ssim"):
        assert -1.0 <= out[k] <= 1.0
    for k in ("deletion_auc_base", "deletion_auc_pruned", "insertion_auc_base", "insertion_auc_pruned"):
        assert 0.0 <= out[k] <= 1.0
    assert out["n_images"] == 3
    assert len(out["pngs"]) == 2 and all((tmp_path / p).stat().st_size > 1000 for p in out["pngs"])
    # the unpruned model against itself: perfect agreement through the same entry point
    same = explanation_report(
        m, copy.deepcopy(m), x, tmp_path / "same", "ig", n_images=1, max_samples=2, target="pred"
    )
    assert same["expl_spearman"] == pytest.approx(1.0) and same["expl_top10_iou"] == pytest.approx(1.0)
    assert same["deletion_auc_base"] == pytest.approx(same["deletion_auc_pruned"])


def test_explanation_report_real_breastmnist(tmp_path):
    path = require_file(MEDMNIST / "breastmnist.npz")
    with np.load(path) as f:
        imgs = torch.from_numpy(f["test_images"][:4]).float()[:, None] / 255.0
        labels = torch.from_numpy(f["test_labels"][:4]).long()
    m = _conv_net(2, k=2)
    pruned = copy.deepcopy(m)
    from monai_iaprune import channel_relevance, prune

    rel = channel_relevance(m, [imgs], "magnitude", progress=False)
    prune(pruned, rel, 0.3, target="channels", example_inputs=imgs[:1])
    loader = [{"image": imgs[:2], "label": labels[:2]}, {"image": imgs[2:], "label": labels[2:]}]
    out = explanation_report(m, pruned, loader, tmp_path, n_images=2, max_samples=4)
    assert out["n_images"] == 4
    assert all(np.isfinite(out[k]) for k in ("expl_spearman", "expl_ssim", "deletion_auc_pruned"))
