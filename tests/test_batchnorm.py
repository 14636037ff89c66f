"""recalibrate_batchnorm: refuses non-finite calibration data and leaves the statistics as they were."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from monai_iaprune.pruning import recalibrate_batchnorm


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4)
    )


def _stats(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items() if "running" in k or "num_batches" in k}


def test_recalibrates_on_finite_data():
    model = _net().eval()
    batches = [torch.randn(2, 1, 8, 8) + 3 for _ in range(3)]
    assert recalibrate_batchnorm(model, batches) == 6
    assert not model.training
    assert model[1].running_mean.mean() != 0 and torch.isfinite(model[1].running_var).all()


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_batch_refused_and_statistics_restored(bad):
    """Old code: the NaN batch ran through the cumulative average and every running_mean became NaN
    (so every later output was NaN), without any error; the old statistics were already reset."""
    model = _net().eval()
    recalibrate_batchnorm(model, [torch.randn(2, 1, 8, 8) + 1])
    before = _stats(model)
    batches = [torch.randn(2, 1, 8, 8) for _ in range(3)]
    batches[2][1, 0, 4, 4] = bad  # third batch: good batches 0 and 1 have already changed the statistics
    with pytest.raises(ValueError, match="batch 2"):
        recalibrate_batchnorm(model, batches)
    after = _stats(model)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert [m.momentum for m in model.modules() if isinstance(m, nn.BatchNorm2d)] == [0.1, 0.1]
    assert not model.training
    assert torch.isfinite(model(torch.randn(1, 1, 8, 8))).all()


def test_dict_batches_with_nan_image():
    model = _net()
    with pytest.raises(ValueError, match="batch 0.*non-finite"):
        recalibrate_batchnorm(
            model, [{"image": torch.full((2, 1, 8, 8), float("nan")), "label": torch.zeros(2)}]
        )


def test_empty_data_keeps_statistics():
    model = _net()
    recalibrate_batchnorm(model, [torch.randn(2, 1, 8, 8) + 1])
    before = _stats(model)
    with pytest.raises(ValueError, match="empty data"):
        recalibrate_batchnorm(model, [])
    assert all(torch.equal(before[k], v) for k, v in _stats(model).items())
