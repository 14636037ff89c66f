"""RelevancePruningHandler inside a MONAI SupervisedTrainer, and the evaluator-side RelevanceCollector."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from ignite.engine import Events
from ignite.metrics import Accuracy
from monai.engines import SupervisedEvaluator, SupervisedTrainer
from monai.handlers import CheckpointSaver, LrScheduleHandler, from_engine
from monai.networks.nets import ResNet
from torch import nn
from torch.utils.data import DataLoader

from monai_iaprune import channel_relevance
from monai_iaprune.handlers import RelevanceCollector, RelevancePruningHandler
from monai_iaprune.pruning.checkpoint import load_pruned


def tiny_resnet18() -> nn.Module:
    """resnet18 topology (basic blocks, [2, 2, 2, 2]) with tiny widths."""
    return ResNet("basic", [2, 2, 2, 2], [4, 8, 16, 32], spatial_dims=2, n_input_channels=1, num_classes=3)


def loader(n: int = 8, batch_size: int = 4, seed: int = 0) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    data = [{"image": torch.randn(1, 16, 16, generator=g), "label": i % 3} for i in range(n)]
    return DataLoader(data, batch_size=batch_size, shuffle=False)


def test_two_stage_pruning_during_training(tmp_path: Path):
    net = tiny_resnet18()
    params_original = sum(p.numel() for p in net.parameters())
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    data = loader()
    evaluator = SupervisedEvaluator(
        device=torch.device("cpu"),
        val_data_loader=loader(seed=1),
        network=net,
        key_val_metric={"acc": Accuracy(output_transform=from_engine(["pred", "label"]))},
    )
    handler = RelevancePruningHandler(
        method="taylor", ratio=0.5, stages=2, data=data, evaluator=evaluator, max_batches=2
    )
    saver = CheckpointSaver(
        str(tmp_path),
        {"network": net, "optimizer": opt, "pruning": handler},
        save_final=True,
        final_filename="final.pt",
    )
    trainer = SupervisedTrainer(
        device=torch.device("cpu"),
        max_epochs=3,
        train_data_loader=data,
        network=net,
        optimizer=opt,
        loss_function=nn.CrossEntropyLoss(),
        train_handlers=[handler, LrScheduleHandler(sched, print_lr=False), saver],
    )
    handler.attach(trainer)  # a second attach must not register twice
    registered = [h for h, *_ in trainer._event_handlers[Events.EPOCH_COMPLETED] if h is handler]
    assert len(registered) == 1

    checks: list[dict] = []
    before: dict[str, torch.Tensor] = {}

    @trainer.on(Events.ITERATION_STARTED)
    def _snapshot(engine):
        if engine.state.epoch in (2, 3) and (engine.state.iteration - 1) % engine.state.epoch_length == 0:
            before.clear()
            before.update({n: p.detach().clone() for n, p in net.named_parameters()})

    @trainer.on(Events.ITERATION_COMPLETED)
    def _check(engine):
        if not before:
            return
        held = [p for g in engine.optimizer.param_groups for p in g["params"]]
        checks.append(
            {
                "epoch": engine.state.epoch,
                "same_optimizer": engine.optimizer is opt,
                "holds_model_params": [id(p) for p in held] == [id(p) for p in net.parameters()],
                "state_shapes_ok": all(
                    opt.state[p]["exp_avg"].shape == p.shape and opt.state[p]["exp_avg_sq"].shape == p.shape
                    for p in net.parameters()
                ),
                "unchanged": [n for n, p in net.named_parameters() if torch.equal(before[n], p.detach())],
                "params": sum(p.numel() for p in net.parameters()),
            }
        )
        before.clear()

    trainer.run()

    # two stages, at the end of epochs 1 and 2; each checked at the first step after it
    assert [h["epoch"] for h in handler.history] == [1, 2]
    assert [c["epoch"] for c in checks] == [2, 3]
    assert params_original > checks[0]["params"] > checks[1]["params"]  # each check saw a freshly pruned net
    for c in checks:
        assert c["same_optimizer"] and c["holds_model_params"] and c["state_shapes_ok"], c
        assert c["unchanged"] == [], f"parameters not updated after pruning: {c['unchanged']}"
    # the fraction `ratio` of the original parameters is gone after both stages
    params_now = sum(p.numel() for p in net.parameters())
    assert handler.history[0]["params_before"] == params_original
    assert handler.history[1]["params_before"] == handler.history[0]["params_after"]
    assert abs((1 - params_now / params_original) - 0.5) < 0.03
    assert handler.history[-1]["params_removed"] == pytest.approx(1 - params_now / params_original)
    assert handler.history[0]["ratio_target"] == pytest.approx(1 - 0.5**0.5)
    for h in handler.history:
        assert h["params_after"] < h["params_before"] and h["macs_after"] < h["macs_before"]
        assert 0.0 <= h["metric_pruned"] <= 1.0
        assert {"name", "channels_before", "channels_after"} <= set(h["per_layer"][0])
    assert trainer.state.metrics["params"] == params_now
    assert trainer.state.metrics["params_removed"] == pytest.approx(1 - params_now / params_original)
    assert trainer.state.pruning is handler.history
    # the LR scheduler kept stepping the same optimizer
    assert sched.optimizer is opt
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-2 * 0.5**3)
    # the CheckpointSaver file reloads into a fresh network_def through the recorded structure
    x = torch.randn(2, 1, 16, 16)
    net.eval()
    with torch.no_grad():
        expected = net(x)
    fresh = load_pruned(tmp_path / "final.pt", tiny_resnet18())  # weights_only load
    with torch.no_grad():
        assert torch.equal(fresh(x), expected)
    # ... and resumes: handler state first reshapes the fresh network, then network and optimizer load
    ckpt = torch.load(tmp_path / "final.pt", weights_only=False)
    net2 = tiny_resnet18()
    opt2 = torch.optim.Adam(net2.parameters(), lr=1e-2)
    trainer2 = SupervisedTrainer(
        device=torch.device("cpu"),
        max_epochs=1,
        train_data_loader=data,
        network=net2,
        optimizer=opt2,
        loss_function=nn.CrossEntropyLoss(),
    )
    handler2 = RelevancePruningHandler(method="taylor", ratio=0.5, stages=2, data=data)
    handler2.attach(trainer2)
    handler2.load_state_dict(ckpt["pruning"])
    net2.load_state_dict(ckpt["network"])
    opt2.load_state_dict(ckpt["optimizer"])
    assert [h["epoch"] for h in handler2.history] == [1, 2]
    for p in net2.parameters():
        assert opt2.state[p]["exp_avg"].shape == p.shape


def test_collector_matches_channel_relevance_on_the_same_data():
    net = tiny_resnet18()
    data = loader(n=10, batch_size=4)  # uneven last batch
    collector = RelevanceCollector(method="taylor")
    evaluator = SupervisedEvaluator(device=torch.device("cpu"), val_data_loader=data, network=net)
    collector.attach(evaluator)
    evaluator.run()
    got = collector.relevance
    want = channel_relevance(net, data, "taylor", progress=False)
    assert got.num_samples == want.num_samples == 10 == collector.count
    assert set(got) == set(want)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-8, msg=name)
    assert collector.is_current(net)
    # a second evaluation resets rather than accumulates
    evaluator.run()
    assert collector.count == 10
    with torch.no_grad():
        next(net.parameters()).add_(1.0)
    assert not collector.is_current(net)


def test_handler_runs_the_collector_evaluator_when_stale():
    net = tiny_resnet18()
    data = loader()
    collector = RelevanceCollector(method="taylor")
    evaluator = SupervisedEvaluator(device=torch.device("cpu"), val_data_loader=data, network=net)
    collector.attach(evaluator)
    runs = []
    evaluator.add_event_handler(Events.COMPLETED, lambda e: runs.append(collector.count))
    handler = RelevancePruningHandler(
        ratio=0.3, collector=collector, data=data, prune_kwargs={"target": "channels"}
    )
    trainer = SupervisedTrainer(
        device=torch.device("cpu"),
        max_epochs=1,
        train_data_loader=data,
        network=net,
        optimizer=torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9),
        loss_function=nn.CrossEntropyLoss(),
        train_handlers=[handler],
    )
    trainer.run()
    assert runs == [8], "the evaluator should have run once, collecting relevance on all 8 samples"
    assert handler.method == "taylor" and handler.history[0]["method"] == "taylor"
    assert handler.history[0]["params_after"] < handler.history[0]["params_before"]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"method": "nope"}, "unknown relevance method"),
        ({"ratio": 0.0}, "bad ratio"),
        ({"ratio": 1.5}, "bad ratio"),
        ({"stages": 0}, "bad stages"),
        ({"stages": 2, "prune_epochs": [3]}, "stages=2"),
        ({"stages": 2, "prune_epochs": [3, 2]}, "strictly increasing"),
        ({"prune_kwargs": {"ratio": 0.2}}, "may not set"),
        ({"key_metric": "acc"}, "needs an evaluator"),
    ],
)
def test_bad_settings_fail_at_init(kwargs, match):
    with pytest.raises(ValueError, match=match):
        RelevancePruningHandler(**kwargs)


def test_collector_refuses_data_free_and_unknown_methods():
    with pytest.raises(ValueError, match="needs no data"):
        RelevanceCollector(method="magnitude")
    with pytest.raises(ValueError, match="unknown relevance method"):
        RelevanceCollector(method="nope")
