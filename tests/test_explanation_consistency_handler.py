"""ExplanationConsistencyHandler inside a MONAI SupervisedTrainer, alone and with a RelevancePruningHandler."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from monai.engines import SupervisedTrainer
from monai.engines.utils import IterationEvents
from monai.networks.nets import ResNet
from monai.utils import CommonKeys as Keys
from torch import nn
from torch.utils.data import DataLoader

from monai_iaprune.handlers import ExplanationConsistencyHandler, RelevancePruningHandler
from monai_iaprune.pruning.explanation_consistency import ExplanationConsistencyLoss


def tiny_resnet() -> nn.Module:
    return ResNet(
        "basic",
        [1, 1, 1, 1],
        [4, 8, 8, 8],
        spatial_dims=2,
        n_input_channels=1,
        num_classes=3,
        conv1_t_size=3,
        no_max_pool=True,
    )


def loader(n: int = 8, batch_size: int = 4, seed: int = 0) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    data = [{"image": torch.randn(1, 12, 12, generator=g), "label": i % 3} for i in range(n)]
    return DataLoader(data, batch_size=batch_size, shuffle=False)


def _trainer(
    net: nn.Module, handlers: list, epochs: int = 1, data: DataLoader | None = None
) -> SupervisedTrainer:
    return SupervisedTrainer(
        device=torch.device("cpu"),
        max_epochs=epochs,
        train_data_loader=data if data is not None else loader(),
        network=net,
        optimizer=torch.optim.SGD(net.parameters(), lr=0.01),
        loss_function=nn.CrossEntropyLoss(),
        train_handlers=handlers,
    )


def test_term_is_added_to_the_loss_on_the_first_iteration():
    torch.manual_seed(0)
    net = tiny_resnet()
    teacher = copy.deepcopy(net)
    with torch.no_grad():  # a different teacher, so the term is not zero at the first step
        for p in teacher.parameters():
            p.mul_(1.3).add_(0.05)
    batch = next(iter(loader()))
    x, y = batch["image"], batch["label"]
    # the expected value, replayed on a copy: the trainer's train-mode forward updates the BatchNorm
    # statistics before the handler's eval-mode explanation pass
    replay = copy.deepcopy(net).train()
    plain = float(nn.CrossEntropyLoss()(replay(x), y).detach())
    term = float(ExplanationConsistencyLoss(copy.deepcopy(teacher))(replay, x, y).detach())
    assert term > 0.05

    weight = 0.7
    handler = ExplanationConsistencyHandler(weight, teacher=teacher)
    trainer = _trainer(net, [handler])
    handler.attach(trainer)  # attaching twice registers once
    assert len([h for h, *_ in trainer._event_handlers[IterationEvents.LOSS_COMPLETED] if h is handler]) == 1
    seen: list[dict] = []

    @trainer.on(IterationEvents.BACKWARD_COMPLETED)  # before MONAI decollates the output
    def _record(engine):
        seen.append(
            {
                "loss": float(engine.state.output[Keys.LOSS].detach()),
                "term": engine.state.output["explanation_consistency"],
            }
        )

    trainer.run()
    assert len(seen) == 2
    assert seen[0]["term"] == pytest.approx(term, rel=1e-4, abs=1e-6)
    assert seen[0]["loss"] == pytest.approx(plain + weight * term, rel=1e-4, abs=1e-6)
    assert trainer.state.metrics["explanation_consistency"] == pytest.approx(
        (seen[0]["term"] + seen[1]["term"]) / 2
    )
    assert all(p.grad is None for p in teacher.parameters())


def test_runs_with_relevance_pruning_mid_run_and_keeps_an_unpruned_teacher():
    torch.manual_seed(0)
    net = tiny_resnet()
    params_original = sum(p.numel() for p in net.parameters())
    data = loader()
    pruning = RelevancePruningHandler(method="taylor", ratio=0.5, stages=1, prune_epochs=[1], data=data)
    # attached after the pruning handler on purpose: the copy is taken at EPOCH_STARTED of epoch 1
    consistency = ExplanationConsistencyHandler(0.5, teacher_epoch=1, start_epoch=2)
    trainer = _trainer(net, [pruning, consistency], epochs=3, data=data)
    terms: list[tuple[int, float]] = []

    @trainer.on(IterationEvents.BACKWARD_COMPLETED)
    def _record(engine):
        if "explanation_consistency" in engine.state.output:
            terms.append((engine.state.epoch, engine.state.output["explanation_consistency"]))

    trainer.run()
    assert [h["epoch"] for h in pruning.history] == [1]
    params_now = sum(p.numel() for p in net.parameters())
    assert params_now < params_original
    teacher = consistency.teacher
    assert teacher is not None and teacher is not net
    assert sum(p.numel() for p in teacher.parameters()) == params_original  # the unpruned network
    assert not any(p.requires_grad for p in teacher.parameters())
    assert [e for e, _ in terms] == [2, 2, 3, 3]  # not in epoch 1: start_epoch=2
    assert all(math.isfinite(t) and t > 0 for _, t in terms)
    assert math.isfinite(trainer.state.metrics["explanation_consistency"])


def test_bad_settings():
    with pytest.raises(ValueError, match="weight"):
        ExplanationConsistencyHandler(0.0)
    with pytest.raises(ValueError, match="unknown explainer"):
        ExplanationConsistencyHandler(1.0, explainer="lrp")
    with pytest.raises(ValueError, match="teacher_epoch"):
        ExplanationConsistencyHandler(1.0, teacher_epoch=0)
    with pytest.raises(ValueError, match="no teacher yet"):
        ExplanationConsistencyHandler(1.0, teacher_epoch=3, start_epoch=2)
    with pytest.raises(TypeError, match="teacher"):
        ExplanationConsistencyHandler(1.0, teacher="net")


def test_feature_term_with_pruning_mid_run_uses_the_kept_channel_map():
    """The feature term maps the pruned student's channels to the unpruned teacher's through the pruning handler's
    channel histories: the value it adds equals FeatureDistillationLoss with kept_channels replayed by hand."""
    from monai_iaprune.pruning.feature_distillation import FeatureDistillationLoss, kept_channels

    torch.manual_seed(0)
    net = tiny_resnet()
    data = loader()
    pruning = RelevancePruningHandler(method="taylor", ratio=0.5, stages=1, prune_epochs=[1], data=data)
    handler = ExplanationConsistencyHandler(0.0, teacher_epoch=1, start_epoch=2, feature_weight=2.0)
    trainer = _trainer(net, [pruning, handler], epochs=2, data=data)
    seen: list[dict] = []

    @trainer.on(IterationEvents.FORWARD_COMPLETED)  # the student's train-mode forward of this iteration
    def _replay(engine):
        if engine.state.epoch == 2 and not seen:
            replay = FeatureDistillationLoss(
                copy.deepcopy(handler.teacher), kept_channels(handler.teacher, *pruning.channel_histories)
            )
            student = copy.deepcopy(engine.network)
            for m in student.modules():  # the copy would also carry the handler's hooks
                m._forward_hooks.clear()
            replay.attach(student)
            student.train()
            x = engine.state.output[Keys.IMAGE]
            with torch.random.fork_rng():
                student(x)
            seen.append({"expected": float(replay(x).detach())})

    @trainer.on(IterationEvents.BACKWARD_COMPLETED)
    def _record(engine):
        if "feature_distillation" in engine.state.output and len(seen) == 1 and "term" not in seen[0]:
            seen[0]["term"] = engine.state.output["feature_distillation"]

    trainer.run()
    assert len(pruning.channel_histories) == 1 and pruning.channel_histories[0]
    assert trainer.state.pruning_channel_histories is pruning.channel_histories
    assert "explanation_consistency" not in seen[0]  # weight 0: no map term
    assert seen[0]["term"] > 0
    assert seen[0]["term"] == pytest.approx(seen[0]["expected"], rel=1e-4)
    assert math.isfinite(trainer.state.metrics["feature_distillation"])
    # the channel histories survive a checkpoint round trip (resume rebuilds the same map)
    state = pruning.state_dict()
    other = RelevancePruningHandler(method="taylor", ratio=0.5, stages=1, prune_epochs=[1], data=data)
    other.load_state_dict(state)
    assert [[list(r) for r in h] for h in other.channel_histories] == [
        [list(r) for r in h] for h in pruning.channel_histories
    ]


def test_feature_weight_settings():
    with pytest.raises(ValueError, match="feature_weight"):
        ExplanationConsistencyHandler(1.0, feature_weight=-1.0)
    with pytest.raises(ValueError, match="feature_weight"):
        ExplanationConsistencyHandler(1.0, feature_weight=float("nan"))
    with pytest.raises(ValueError, match="or 0 with feature_weight > 0"):
        ExplanationConsistencyHandler(0.0, feature_weight=0.0)
    assert ExplanationConsistencyHandler(0.0, feature_weight=1.0).feature_weight == 1.0
