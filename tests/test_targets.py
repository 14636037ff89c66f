"""Targets: the 0/1 selection of the output that is explained."""

from __future__ import annotations

import pytest
import torch

from monai_iaprune.relevance.targets import target_selection


def test_classification_label_pred_and_index():
    out = torch.tensor([[0.1, 2.0, -1.0], [3.0, 0.0, 1.0]])
    label = torch.tensor([[2], [1]])
    assert torch.equal(target_selection(out, label, "label"), torch.tensor([[0.0, 0, 1], [0, 1, 0]]))
    assert torch.equal(target_selection(out, label, "pred"), torch.tensor([[0.0, 1, 0], [1, 0, 0]]))
    assert torch.equal(target_selection(out, None, 0), torch.tensor([[1.0, 0, 0], [1, 0, 0]]))
    # no label: the predicted class
    assert torch.equal(target_selection(out, None, "label"), target_selection(out, None, "pred"))
    # one-hot labels
    onehot = torch.tensor([[0.0, 0, 1], [0, 1, 0]])
    assert torch.equal(target_selection(out, onehot, "label"), onehot)


def test_segmentation_mask_from_label_and_prediction():
    out = torch.zeros(1, 3, 2, 2)
    out[0, 1, 0, 0] = 5
    out[0, 2, 1, 1] = 5
    label = torch.tensor([[[[1, 0], [0, 2]]]])
    sel = target_selection(out, label, "label")
    assert (
        sel[0, 1].tolist() == [[1, 0], [0, 0]]
        and sel[0, 2].tolist() == [[0, 0], [0, 1]]
        and sel[0, 0].sum() == 0
    )
    assert torch.equal(target_selection(out, None, "pred"), sel)
    only2 = target_selection(out, label, 2)
    assert only2[0, 1].sum() == 0 and only2[0, 2].sum() == 1


def test_bad_targets_named():
    out = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="unknown target"):
        target_selection(out, None, "logit")
    with pytest.raises(ValueError, match="'contrast', 'loss'"):
        target_selection(out, None, "margin")
    with pytest.raises(ValueError, match="out of range"):
        target_selection(out, None, 5)
    with pytest.raises(ValueError, match="out of range"):
        target_selection(out, torch.tensor([0, 7]), "label")


def test_contrast_target_is_the_label_margin():
    out = torch.tensor([[0.5, 2.0, -1.0], [3.0, 0.0, 1.0]])
    label = torch.tensor([2, 1])
    sel = target_selection(out, label, "contrast")
    assert torch.allclose(sel, torch.tensor([[-0.5, -0.5, 1.0], [-0.5, 1.0, -0.5]]))
    # explained quantity: label logit minus the mean of the others
    assert torch.allclose((sel * out).sum(1), torch.tensor([-1.0 - 1.25, 0.0 - 2.0]))


def test_loss_target_is_the_negative_cross_entropy_gradient():
    out = torch.randn(4, 3, requires_grad=True)
    label = torch.tensor([0, 2, 1, 2])
    torch.nn.functional.cross_entropy(out, label, reduction="sum").backward()
    assert torch.allclose(target_selection(out, label, "loss"), -out.grad, atol=1e-6)
    # segmentation: per voxel, with an index-map label
    seg = torch.randn(2, 3, 4, 4, requires_grad=True)
    lab = torch.randint(0, 3, (2, 1, 4, 4))
    torch.nn.functional.cross_entropy(seg, lab[:, 0], reduction="sum").backward()
    assert torch.allclose(target_selection(seg, lab, "loss"), -seg.grad, atol=1e-6)
    # one sigmoid channel: label - sigmoid, the negative BCE-with-logits gradient
    one = torch.randn(2, 1, 3, 3, requires_grad=True)
    y = (torch.rand(2, 1, 3, 3) > 0.5).float()
    torch.nn.functional.binary_cross_entropy_with_logits(one, y, reduction="sum").backward()
    assert torch.allclose(target_selection(one, y, "loss"), -one.grad, atol=1e-6)
    assert torch.equal(target_selection(one, y, "contrast"), 2 * y - 1)


def test_signed_targets_steer_the_methods():
    """Taylor with the loss target equals gradient-of-minus-CE x activation, computed here by autograd."""
    from monai_iaprune import channel_relevance

    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(1, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(4 * 36, 3)
    )
    x, y = torch.randn(5, 1, 8, 8), torch.tensor([0, 1, 2, 1, 0])
    rel = channel_relevance(net, [(x, y)], "taylor", target="loss", progress=False)
    acts = net[0](x)
    acts.retain_grad()
    (-torch.nn.functional.cross_entropy(net[3](net[2](net[1](acts))), y, reduction="sum")).backward()
    expect = (acts * acts.grad).sum((2, 3)).abs().mean(0)
    assert torch.allclose(rel["0"], expect, rtol=1e-4, atol=1e-7)
    label = channel_relevance(net, [(x, y)], "taylor", target="label", progress=False)
    assert not torch.allclose(rel["0"], label["0"])
