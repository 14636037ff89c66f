"""RelevancePruningHandler budgets (issue #17): prune_target params / MACs / latency, re-scored sub-steps (steps),
and depth pruning per stage (issue #15): removed blocks reported, saved and reloaded in a fresh process."""

from __future__ import annotations

import copy
import subprocess
import sys

import pytest
import torch
from conftest import ROOT
from ignite.engine import Engine
from monai.engines import SupervisedTrainer
from monai.handlers import CheckpointSaver
from test_handlers import loader, tiny_resnet18
from torch import nn

import monai_iaprune.handlers.relevance_pruning_handler as rph
from monai_iaprune.handlers import RelevancePruningHandler
from monai_iaprune.pruning.batchnorm import recalibrate_batchnorm
from monai_iaprune.pruning.latency_table import LatencyTable, LayerLatency
from monai_iaprune.pruning.prune import prune
from monai_iaprune.relevance.collect import channel_relevance


def idle_trainer(net: nn.Module, data) -> Engine:
    """An ignite engine that does not train: only the handler changes the network."""
    engine = Engine(lambda e, b: None)
    engine.network = net
    engine.optimizer = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    engine.data_loader = data
    return engine


def run_handler(handler: RelevancePruningHandler, net: nn.Module, data, epochs: int = 1) -> Engine:
    engine = idle_trainer(net, data)
    handler.attach(engine)
    engine.run(data, max_epochs=epochs)
    return engine


def count_relevance(monkeypatch) -> list[int]:
    calls: list[int] = []

    def counted(*args, **kwargs):
        calls.append(1)
        return channel_relevance(*args, **kwargs)

    monkeypatch.setattr(rph, "channel_relevance", counted)
    return calls


def test_macs_budget_is_reached():
    torch.manual_seed(0)
    net, data = tiny_resnet18(), loader()
    handler = RelevancePruningHandler(
        method="taylor", ratio=0.4, data=data, max_batches=2, prune_target="macs"
    )
    engine = run_handler(handler, net, data)
    rec = handler.history[0]
    assert rec["prune_target"] == "macs" and rec["budget"] == {"macs": pytest.approx(0.4)}
    assert rec["macs_removed"] >= 0.4 - 1e-9  # cost-aware MACs budgets never stop short (prune's at_least)
    assert engine.state.metrics["macs_removed"] == rec["macs_removed"]
    assert "latency_ms_before" not in rec  # measured only for prune_target="latency"


def test_steps_rescore_and_compound_to_the_total(monkeypatch):
    calls = count_relevance(monkeypatch)
    torch.manual_seed(0)
    net, data = tiny_resnet18(), loader()
    handler = RelevancePruningHandler(
        method="taylor", ratio=0.5, stages=2, steps=3, data=data, max_batches=2, prune_target="macs"
    )
    run_handler(handler, net, data, epochs=2)
    assert len(calls) == 6  # 3 relevance computations per stage
    assert handler.step_ratio == pytest.approx(1 - 0.5 ** (1 / 6))
    for h in handler.history:
        assert h["steps"] == 3 and len(h["steps_detail"]) == 3
        macs = [s["macs_before"] for s in h["steps_detail"]] + [h["steps_detail"][-1]["macs_after"]]
        assert all(b > a for b, a in zip(macs, macs[1:]))  # each sub-step pruned the re-scored network
    assert handler.history[-1]["macs_removed"] >= 0.5 - 1e-9


def test_steps_1_is_the_old_single_prune(monkeypatch):
    calls = count_relevance(monkeypatch)
    torch.manual_seed(0)
    net, data = tiny_resnet18(), loader()
    reference = copy.deepcopy(net)
    handler = RelevancePruningHandler(method="taylor", ratio=0.5, stages=2, data=data, max_batches=2)
    run_handler(handler, net, data, epochs=1)
    assert len(calls) == 1
    # the path before steps existed: relevance -> prune(stage ratio) -> BatchNorm, on the same data
    relevance = channel_relevance(reference, data, "taylor", target="label", max_batches=2, progress=False)
    prune(reference, relevance, 1 - 0.5**0.5, example_inputs=relevance.example_input, ignored_layers=[])
    recalibrate_batchnorm(reference, data, max_batches=2)
    got, want = net.state_dict(), reference.state_dict()
    assert got.keys() == want.keys()
    for k in want:
        assert torch.equal(got[k], want[k]), k


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"prune_target": "latency", "speedup": 1.0}, "bad speedup 1.0"),
        ({"prune_target": "latency"}, "bad speedup None"),
        ({"speedup": 2.0}, "speedup=2.0 applies to prune_target='latency' only"),
        ({"steps": 0}, "bad steps 0"),
        ({"prune_target": "flops"}, "bad prune_target 'flops'"),
        ({"cost_aware": "maybe"}, "bad cost_aware 'maybe'"),
        ({"depth_ratio": 1.0}, r"bad depth_ratio 1.0"),
        ({"depth_ratio": 0.2, "depth_method": "bogus"}, "bad depth_method 'bogus'"),
        ({"min_blocks_per_stage": -1}, "bad min_blocks_per_stage -1"),
        ({"prune_kwargs": {"cost_aware": True}}, "prune_kwargs may not set"),
        ({"prune_target": "macs", "prune_kwargs": {"target": "params"}}, "disagrees with prune_target"),
    ],
)
def test_bad_budget_settings_name_the_setting(kwargs, match):
    with pytest.raises(ValueError, match=match):
        RelevancePruningHandler(**kwargs)


def synthetic_table(net: nn.Module) -> LatencyTable:
    """A deterministic latency table (seconds ~ in x out channels): timings on a shared CPU are noise."""
    layers = {}
    for n, m in net.named_modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            cin, cout = (
                (m.in_features, m.out_features)
                if isinstance(m, nn.Linear)
                else (m.in_channels, m.out_channels)
            )
            layers[n] = LayerLatency(
                [1, cin], [1, cout], [[1e-6, 1e-6 * cout], [1e-6 * cin, 1e-6 * cin * cout]]
            )
    return LatencyTable(layers, overhead=0.0, device="synthetic")


def test_latency_budget_records_measured_latency(tmp_path):
    torch.manual_seed(0)
    net, data = tiny_resnet18(), loader()
    handler = RelevancePruningHandler(
        method="taylor", data=data, max_batches=2, prune_target="latency", speedup=1.5, steps=2,
        latency_cache_dir=str(tmp_path),
    )  # fmt: skip
    handler.latency_table = synthetic_table(net)
    run_handler(handler, net, data)
    rec = handler.history[0]
    assert rec["prune_target"] == "latency" and rec["budget"] == {"speedup": pytest.approx(1.5)}
    assert rec["latency_ms_before"] > 0 and rec["latency_ms_after"] > 0  # values are noise on a shared CPU
    assert rec["latency_estimated_speedup"] >= 1.5 * 0.99
    # the real table is measured once on the example input and cached under latency_cache_dir
    measured = RelevancePruningHandler(prune_target="latency", speedup=1.5, latency_cache_dir=str(tmp_path))
    measured._latency_table(tiny_resnet18(), torch.randn(1, 1, 16, 16))
    assert (tmp_path / "latency_table.json").is_file()


def test_depth_pruning_removes_reports_saves_and_reloads(tmp_path):
    torch.manual_seed(0)
    net, data = tiny_resnet18(), loader()
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    handler = RelevancePruningHandler(method="taylor", ratio=0.2, depth_ratio=0.2, data=data, max_batches=2)
    saver = CheckpointSaver(
        str(tmp_path), {"network": net, "pruning": handler}, save_final=True, final_filename="final.pt"
    )
    trainer = SupervisedTrainer(
        device=torch.device("cpu"),
        max_epochs=2,  # pruned at the end of epoch 1, then one epoch trains through the remapped Adam state
        train_data_loader=data,
        network=net,
        optimizer=opt,
        loss_function=nn.CrossEntropyLoss(),
        train_handlers=[handler, saver],
    )
    trainer.run()
    rec = handler.history[0]
    names = [b["name"] for b in rec["removed_blocks"]]
    assert names and all(b["relevance"] is not None for b in rec["removed_blocks"])
    assert rec["depth"]["removed_blocks"] == names and rec["depth"]["params_removed"] >= 0.2 - 1e-9
    modules = dict(net.named_modules())
    assert all(type(modules[n]).__name__ == "RemovedBlock" for n in names)
    held = {id(p) for g in opt.param_groups for p in g["params"]}
    assert held == {id(p) for p in net.parameters()}  # removed blocks' parameters left the optimizer
    params = sum(p.numel() for p in net.parameters())
    code = (
        "import torch, sys; sys.path.insert(0, 'tests'); from test_handlers import tiny_resnet18; "
        "from monai_iaprune.pruning.checkpoint import load_pruned; "
        f"m = load_pruned({str(tmp_path / 'final.pt')!r}, tiny_resnet18()); "
        "print(sum(p.numel() for p in m.parameters()))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert int(out.stdout.split()[-1]) == params


def test_depth_on_a_network_without_blocks_fails_before_training():
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))
    data = loader()
    trainer = SupervisedTrainer(
        device=torch.device("cpu"),
        max_epochs=1,
        train_data_loader=data,
        network=net,
        optimizer=torch.optim.SGD(net.parameters(), lr=0.1),
        loss_function=nn.CrossEntropyLoss(),
    )
    handler = RelevancePruningHandler(method="taylor", depth_ratio=0.2, data=data)
    with pytest.raises(ValueError, match="depth_ratio=0.2: Sequential has no removable block"):
        handler.attach(trainer)
    assert trainer.state.iteration == 0


BUNDLE = ROOT / "bundles" / "classification_2d"
TINY = {"num_synthetic": 16, "image_size": 16, "batch_size": 8, "epochs": 1, "finetune_epochs": 1}


def _bundle_prune(tmp_path, **overrides) -> dict:
    import json
    import shutil

    from monai.bundle import run

    b = tmp_path / "classification_2d"
    shutil.copytree(BUNDLE, b, ignore=shutil.ignore_patterns("models", "eval", "data", "__pycache__"))
    run("prune", config_file=[str(b / "configs" / c) for c in ("train.json", "prune.json")], bundle_root=str(b),
        method="taylor", explain="false", latency_repeats=2, **TINY, **overrides)  # fmt: skip
    report = json.loads((b / "eval" / "prune_report.json").read_text())
    report["_markdown"] = (b / "eval" / "prune_report.md").read_text()
    return report


def test_bundle_macs_budget_in_two_steps(tmp_path):
    r = _bundle_prune(tmp_path, prune_target="macs", ratio=0.5, steps=2)
    assert r["prune_target"] == "macs" and r["steps"] == 2
    assert r["budget"]["macs"]["requested"] == 0.5 and r["budget"]["macs"]["achieved"] >= 0.5 - 1e-9
    assert r["macs_removed"] >= 0.5 - 1e-9 and len(r["stages_detail"][0]["steps_detail"]) == 2
    assert "## Budget" in r["_markdown"] and "| MACs removed | 50.0% |" in r["_markdown"]


def test_bundle_depth_ratio_lists_removed_blocks(tmp_path):
    r = _bundle_prune(tmp_path, depth_ratio=0.2, ratio=0.2)
    names = [b["name"] for b in r["removed_blocks"]]
    assert names and all(".denselayer" in n for n in names), names
    assert r["stages_detail"][0]["depth"]["params_removed"] >= 0.2 - 1e-9
    assert "## Removed blocks" in r["_markdown"] and f"`{names[0]}`" in r["_markdown"]


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"steps": 0}, "bad steps 0"),
        ({"prune_target": "flops"}, "bad prune_target 'flops'"),
        ({"prune_target": "latency", "speedup": 0.9}, "bad speedup 0.9"),
        ({"cost_aware": "maybe"}, "bad cost_aware 'maybe'"),
        ({"depth_ratio": 1.5}, "bad depth_ratio 1.5"),
    ],
)
def test_bundle_bad_budget_settings_fail_before_training(tmp_path, overrides, match):
    with pytest.raises(Exception) as info:
        _bundle_prune(tmp_path, **overrides)
    chain, exc = [], info.value
    while exc is not None:
        chain.append(str(exc))
        exc = exc.__cause__ or exc.__context__
    assert any(match in m for m in chain), chain
    assert not (tmp_path / "classification_2d" / "models" / "model.pt").exists()  # nothing trained
