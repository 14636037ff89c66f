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
    with pytest.raises(ValueError, match="out of range"):
        target_selection(out, None, 5)
    with pytest.raises(ValueError, match="out of range"):
        target_selection(out, torch.tensor([0, 7]), "label")
