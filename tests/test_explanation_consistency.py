"""Explanation-consistency loss: zero for identical networks, gradients only into the student, trainable."""

from __future__ import annotations

import copy

import pytest
import torch
from monai.networks.nets import ResNet, UNet
from torch import nn

from monai_iaprune import prune
from monai_iaprune.pruning.explanation_consistency import ExplanationConsistencyLoss, map_distance
from monai_iaprune.relevance.differentiable_maps import gradient_x_input, integrated_gradients
from monai_iaprune.report.explanations import spearman_correlation


def tiny_resnet(dims: int = 2) -> nn.Module:
    """resnet10 topology, tiny widths, 3x3 stem without max-pool (as the MedMNIST benchmark's ResNets)."""
    return ResNet(
        "basic",
        [1, 1, 1, 1],
        [4, 8, 8, 8],
        spatial_dims=dims,
        n_input_channels=1,
        num_classes=3,
        conv1_t_size=3,
        conv1_t_stride=1,
        no_max_pool=True,
    )


def tiny_unet() -> nn.Module:
    return UNet(spatial_dims=2, in_channels=1, out_channels=3, channels=(4, 8), strides=(2,), num_res_units=1)


def _case(kind: str) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    if kind == "seg":
        x = torch.randn(2, 1, 16, 16, generator=g)
        y = torch.randint(0, 3, (2, 1, 16, 16), generator=g)
        return tiny_unet(), x, y
    dims = 3 if kind == "3d" else 2
    x = torch.randn(4, 1, *([8] * dims if dims == 3 else [16, 16]), generator=g)
    return tiny_resnet(dims), x, torch.tensor([0, 1, 2, 0])


def _perturb(net: nn.Module, scale: float = 0.2, seed: int = 1) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(scale * p.abs().mean() * torch.randn(p.shape, generator=g))
    return net


@pytest.mark.parametrize("kind", ["2d", "3d", "seg"])
@pytest.mark.parametrize("explainer", ["grad_x_input", "ig"])
def test_zero_for_identical_networks(kind: str, explainer: str):
    torch.manual_seed(0)
    net, x, y = _case(kind)
    teacher = copy.deepcopy(net)
    kwargs = {"n_steps": 3} if explainer == "ig" else None
    loss = ExplanationConsistencyLoss(teacher, explainer=explainer, explainer_kwargs=kwargs)
    value = loss(net, x, y)
    assert value.requires_grad
    assert abs(float(value.detach())) < 1e-6
    # networks keep their training flags
    assert net.training and teacher.training


@pytest.mark.parametrize("kind", ["2d", "3d", "seg"])
def test_gradient_reaches_only_the_student(kind: str):
    torch.manual_seed(0)
    net, x, y = _case(kind)
    teacher = copy.deepcopy(net)
    _perturb(net)
    loss = ExplanationConsistencyLoss(teacher, distill_weight=0.5, temperature=2.0)
    value = loss(net, x, y)
    assert float(value.detach()) > 1e-3
    value.backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert all(p.requires_grad for p in teacher.parameters())  # restored, not frozen for good
    grads = [p.grad for p in net.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    # the map term alone (distillation off) reaches the convolutions through double backprop
    net.zero_grad(set_to_none=True)
    ExplanationConsistencyLoss(teacher)(net, x, y).backward()
    convs = [m for m in net.modules() if isinstance(m, (nn.Conv2d, nn.Conv3d))]
    assert all(c.weight.grad is not None and c.weight.grad.abs().sum() > 0 for c in convs)
    assert loss.last["consistency"] > 0 and loss.last["distill"] > 0


def _agreement(student: nn.Module, teacher: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    sel = torch.nn.functional.one_hot(y, 3).float()
    student.eval()
    teacher.eval()
    a, _ = gradient_x_input(teacher, x, lambda out: sel)
    b, _ = gradient_x_input(student, x, lambda out: sel)
    student.train()
    teacher.train()
    return float(torch.tensor([spearman_correlation(u, v) for u, v in zip(a.sum(1), b.sum(1))]).median())


def test_optimising_the_term_raises_map_agreement_of_a_pruned_network():
    torch.manual_seed(0)
    teacher, x, y = _case("2d")
    x = torch.randn(8, 1, 16, 16, generator=torch.Generator().manual_seed(3))
    y = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    student = copy.deepcopy(teacher)
    rel = {
        n: m.weight.detach().abs().flatten(1).sum(1)
        for n, m in student.named_modules()
        if isinstance(m, nn.Conv2d)
    }
    prune(student, rel, 0.5, example_inputs=x[:1])
    assert sum(p.numel() for p in student.parameters()) < sum(p.numel() for p in teacher.parameters())
    loss = ExplanationConsistencyLoss(teacher)
    before_term = float(loss(student, x, y).detach())
    before = _agreement(student, teacher, x, y)
    opt = torch.optim.Adam(student.parameters(), lr=3e-3)
    for _ in range(30):
        opt.zero_grad()
        loss(student, x, y).backward()
        opt.step()
    after_term = float(loss(student, x, y).detach())
    after = _agreement(student, teacher, x, y)
    assert after_term < 0.7 * before_term, (before_term, after_term)
    assert after > before + 0.05, (before, after)


def test_map_distance_invariances_and_errors():
    a = torch.randn(3, 5, 5)
    assert map_distance(a, 3.0 * a + 2.0).abs().max() < 1e-6  # Pearson: scale and offset
    assert map_distance(a, -a).sub(2.0).abs().max() < 1e-6
    assert map_distance(a, 3.0 * a, "cosine").abs().max() < 1e-6
    assert map_distance(a, a + 2.0, "cosine").min() > 1e-3  # cosine keeps the offset
    assert torch.isfinite(map_distance(torch.zeros(2, 4), torch.randn(2, 4))).all()
    with pytest.raises(ValueError, match="unknown distance"):
        map_distance(a, a, "mse")
    with pytest.raises(ValueError, match="differ in shape"):
        map_distance(a, a[:2])


def test_one_step_ig_is_gradient_x_input():
    net, x, _ = _case("2d")
    net.eval()
    sel = torch.nn.functional.one_hot(torch.tensor([0, 1, 2, 0]), 3).float()
    a, out_a = gradient_x_input(net, x, lambda o: sel)
    b, out_b = integrated_gradients(net, x, lambda o: sel, n_steps=1)
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(out_a, out_b)


def test_bad_settings():
    t = tiny_resnet()
    with pytest.raises(ValueError, match="unknown explainer"):
        ExplanationConsistencyLoss(t, explainer="lrp")
    with pytest.raises(ValueError, match="unknown distance"):
        ExplanationConsistencyLoss(t, distance="l1")
    with pytest.raises(ValueError, match="distill_weight"):
        ExplanationConsistencyLoss(t, distill_weight=-1.0)
    with pytest.raises(ValueError, match="temperature"):
        ExplanationConsistencyLoss(t, temperature=0.0)
    with pytest.raises(TypeError, match="teacher"):
        ExplanationConsistencyLoss("not a module")


@pytest.mark.parametrize(
    "explainer, kwargs, match",
    [
        ("ig", {"n_steps": 0}, "n_steps 0"),
        ("ig", {"n_steps": 2.5}, "n_steps 2.5"),
        (
            "ig",
            {"n_step": 4},
            r"\['n_step'\] not accepted by explainer 'ig'; it takes \['baseline', 'n_steps'\]",
        ),
        ("grad_x_input", {"n_steps": 4}, "not accepted by explainer 'grad_x_input'; it takes no settings"),
    ],
)
def test_bad_explainer_kwargs_stop_at_construction(explainer, kwargs, match):
    """Checked when the loss / handler is built: the explainers swallow unknown keywords, so a misspelt key would
    run silently with the default, and ``n_steps=0`` would fail only at the first training step."""
    from monai_iaprune.handlers import ExplanationConsistencyHandler

    with pytest.raises(ValueError, match=match):
        ExplanationConsistencyLoss(tiny_resnet(), explainer=explainer, explainer_kwargs=kwargs)
    with pytest.raises(ValueError, match=match):
        ExplanationConsistencyHandler(1.0, explainer=explainer, explainer_kwargs=kwargs)
    # the accepted settings still pass
    ok = {"n_steps": 2, "baseline": 0.0} if explainer == "ig" else {}
    assert (
        ExplanationConsistencyLoss(tiny_resnet(), explainer=explainer, explainer_kwargs=ok).explainer_kwargs
        == ok
    )
