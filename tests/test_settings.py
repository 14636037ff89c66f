"""Strict settings on every path: booleans from the command line (``--overwrite false`` arrives as a string),
ratios, counts; and a new relevance criterion (one ``register_method`` call) runs through a bundle's prune."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT

from monai_iaprune.utils.settings import as_bool, check_int, check_ratio

BUNDLE = ROOT / "bundles" / "classification_2d"
TINY = {
    "num_synthetic": 16,
    "image_size": 16,
    "batch_size": 8,
    "epochs": 1,
    "finetune_epochs": 1,
    "latency_repeats": 2,
}


@pytest.mark.parametrize(
    ("value", "expected"),
    [(True, True), (False, False), (1, True), (0, False), ("true", True), ("FALSE", False), ("Yes", True),
     ("no", False), ("1", True), ("0", False), (" False ", False)],
)  # fmt: skip
def test_as_bool_accepts(value, expected):
    assert as_bool(value, "overwrite") is expected


@pytest.mark.parametrize("value", ["maybe", "", "2", 2, None, 0.5, "off"])
def test_as_bool_refuses_naming_the_setting(value):
    with pytest.raises(ValueError, match=r"bad overwrite .*true or false"):
        as_bool(value, "overwrite")


def test_numeric_checks():
    assert check_ratio(0.3) == 0.3 and check_int(None, "relevance_batches", allow_none=True) is None
    for bad in (0, 1, 1.5, True, "0.5"):
        with pytest.raises(ValueError, match="bad ratio"):
            check_ratio(bad)
    with pytest.raises(ValueError, match="bad calibration_batches 0"):
        check_int(0, "calibration_batches")


def _copy(tmp_path: Path) -> Path:
    dst = tmp_path / "classification_2d"
    shutil.copytree(BUNDLE, dst, ignore=shutil.ignore_patterns("models", "eval", "data", "__pycache__"))
    return dst


def _chain(exc: BaseException | None) -> str:
    msgs = []
    while exc is not None:
        msgs.append(f"{type(exc).__name__}: {exc}")
        exc = exc.__cause__ or exc.__context__
    return "\n".join(msgs)


def test_bundle_command_line_overwrite_false_keeps_the_pruned_checkpoint(tmp_path):
    b = _copy(tmp_path)
    (b / "models").mkdir()
    (b / "models" / "model_pruned.pt").write_bytes(b"keep me")
    cmd = [sys.executable, "-m", "monai.bundle", "run", "prune", "--config_file",
           "['configs/train.json','configs/prune.json']", "--overwrite", "false", "--method", "taylor"]  # fmt: skip
    for k, v in TINY.items():
        cmd += [f"--{k}", str(v)]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    proc = subprocess.run(cmd, cwd=b, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "refusing to overwrite" in proc.stderr and "model_pruned.pt" in proc.stderr, proc.stderr[-3000:]
    assert (b / "models" / "model_pruned.pt").read_bytes() == b"keep me"
    assert not (b / "models" / "model.pt").exists() and not (b / "eval").exists()


def test_bundle_overwrite_maybe_names_the_setting(tmp_path):
    from monai.bundle import run

    b = _copy(tmp_path)
    with pytest.raises(Exception) as info:
        run("prune", config_file=[str(b / "configs" / c) for c in ("train.json", "prune.json")],
            bundle_root=str(b), overwrite="maybe", method="taylor", **TINY)  # fmt: skip
    assert "bad overwrite 'maybe'" in _chain(info.value), _chain(info.value)[-2000:]
    assert not (b / "models").exists() and not (b / "eval").exists()


def test_overlay_overwrite_false_keeps_the_pruned_checkpoint(tmp_path):
    from monai.bundle import run
    from test_host_bundle import write_classification_bundle

    from monai_iaprune.overlay import overlay_path

    b = write_classification_bundle(tmp_path / "host", cases=12)
    (b / "models" / "model.pt").write_bytes(b"host weights")  # only read after the output checks
    (b / "models" / "pruned").mkdir()
    (b / "models" / "pruned" / "model_pruned.pt").write_bytes(b"keep me")
    with pytest.raises(Exception) as info:
        run("prune", config_file=[str(b / "configs" / "train.json"), str(overlay_path())], bundle_root=str(b),
            overwrite="false", method="taylor")  # fmt: skip
    assert "refusing to overwrite" in _chain(info.value), _chain(info.value)[-2000:]
    assert (b / "models" / "pruned" / "model_pruned.pt").read_bytes() == b"keep me"
    assert (b / "models" / "model.pt").read_bytes() == b"host weights"


def test_a_registered_criterion_runs_through_the_bundle(tmp_path):
    """A new criterion is one function and one ``register_method`` call; ``--explain false`` skips explanations."""
    from monai.bundle import run

    from monai_iaprune import register_method
    from monai_iaprune.relevance import unregister_method

    @register_method("toy")
    def toy(model, inputs, select, layers, **_):
        """Mean |activation| per channel and sample."""
        out = {}
        hooks = [
            m.register_forward_hook(lambda m, i, o, n=n: out.__setitem__(n, o)) for n, m in layers.items()
        ]
        try:
            with torch.no_grad():
                model(inputs)
        finally:
            for h in hooks:
                h.remove()
        return {n: o.abs().reshape(o.shape[0], o.shape[1], -1).mean(2) for n, o in out.items()}

    b = _copy(tmp_path)
    try:
        run("prune", config_file=[str(b / "configs" / c) for c in ("train.json", "prune.json")],
            bundle_root=str(b), method="toy", ratio=0.3, explain="false", **TINY)  # fmt: skip
    finally:
        unregister_method("toy")
    report = json.loads((b / "eval" / "prune_report.json").read_text())
    assert report["method"] == "toy" and report["params_after"] < report["params_before"]
    assert "expl_spearman" not in report and "explanations_heatmaps.png" not in " ".join(report["figures"])
    assert (b / "models" / "model_pruned.pt").is_file()


# ------------------------------------------------------------------------------------------------------------------
# numeric range audit (issue #13): every numeric setting is checked, the message names it and the accepted range
# ------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("value", "kwargs", "fragment"),
    [(0, {"minimum": 0, "min_open": True}, "> 0"), (float("nan"), {}, "any finite"), (True, {}, "any finite"),
     ("1", {}, "any finite"), (1.0, {"minimum": 0, "maximum": 1, "max_open": True}, "[0, 1)"),
     (-1, {"minimum": 0}, ">= 0"), (None, {}, "any finite")],
)  # fmt: skip
def test_check_number_refuses_naming_the_range(value, kwargs, fragment):
    from monai_iaprune.utils.settings import check_number

    with pytest.raises(ValueError) as info:
        check_number(value, "lr", **kwargs)
    assert str(info.value).startswith(f"bad lr {value!r}: need a number") and fragment in str(info.value)
    assert check_number(0.5, "lr", 0, 1) == 0.5 and check_number(None, "lr", allow_none=True) is None


def _overlay_parser(**overrides):
    from monai.bundle import ConfigParser

    from monai_iaprune.overlay import overlay_path

    parser = ConfigParser(json.loads(overlay_path().read_text()))
    for k, v in overrides.items():
        parser[k] = v
    return parser


@pytest.mark.parametrize(
    ("name", "value", "accepted"),
    [("ratio", 0, "(0, 1)"), ("ratio", 1.5, "(0, 1)"), ("stages", 0, ">= 1"), ("steps", 0, ">= 1"),
     ("stage_epochs", -1, ">= 0"), ("finetune_epochs", -1, ">= 0"), ("calibration_batches", 0, ">= 1 or null"),
     ("relevance_batches", 0, ">= 1 or null"), ("latency_repeats", 0, ">= 1"), ("max_patches", 0, ">= 1 or null"),
     ("min_blocks_per_stage", -1, ">= 0"), ("speedup", 1.0, "> 1 or null"), ("finetune_lr", 0, "> 0 or null"),
     ("depth_ratio", 1.0, "[0, 1)"), ("explain_weight", -1, ">= 0"), ("explain_distill_weight", -0.5, ">= 0"),
     ("explain_feature_weight", -2, ">= 0"),
     ("min_agreement", 0, "(0, 1] or null"), ("stages", 1.5, ">= 1"), ("finetune_lr", "fast", "> 0")],
)  # fmt: skip
def test_overlay_numeric_settings_are_range_checked(name, value, accepted):
    from monai_iaprune.host_bundle import OVERLAY_RANGES, check_overlay_settings

    assert name in OVERLAY_RANGES
    check_overlay_settings(_overlay_parser())  # the defaults pass
    with pytest.raises(ValueError, match=f"bad {name} {value!r}") as info:
        check_overlay_settings(_overlay_parser(**{name: value}))
    assert accepted in str(info.value)


def test_overlay_patch_mode_is_checked_although_unused():
    from monai_iaprune.host_bundle import check_overlay_settings

    with pytest.raises(ValueError, match="bad patch_mode 'weird'.*foreground"):
        check_overlay_settings(_overlay_parser(patch_mode="weird"))


def test_unknown_command_line_overrides_are_named_with_close_matches():
    from monai_iaprune.host_bundle import unknown_overrides

    configs = [str(BUNDLE / "configs" / c) for c in ("train.json", "prune.json")]
    found = unknown_overrides(
        {
            "ratoi": 0.3,
            "ratio": 0.3,
            "train#trainer#max_epochs": 2,
            "train#trainer#max_epoch": 2,
            "resume": 1,
        },
        configs,
    )
    assert set(found) == {"ratoi", "train#trainer#max_epoch"} and "ratio" in found["ratoi"]


def test_misspelt_override_stops_the_bundle_before_any_work(tmp_path):
    from monai.bundle import run

    b = _copy(tmp_path)
    with pytest.raises(Exception) as info:
        run("prune", config_file=[str(b / "configs" / c) for c in ("train.json", "prune.json")],
            bundle_root=str(b), ratoi=0.3, **TINY)  # fmt: skip
    assert "unknown setting(s): --ratoi (did you mean --ratio" in _chain(info.value)
    assert not (b / "models").exists()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"round_to": 0}, "bad round_to 0"), ({"round_to": 2.5}, "bad round_to 2.5"),
     ({"tolerance": -0.1}, r"bad tolerance -0.1: need a number \[0, 1\)"),
     ({"max_layer_ratio": 1.5}, r"bad max_layer_ratio 1.5: need a number \(0, 1\)")],
)  # fmt: skip
def test_prune_options_are_range_checked(kwargs, message):
    from monai.networks.nets import DenseNet

    from monai_iaprune import channel_relevance, prune

    net = DenseNet(2, 1, 2, init_features=8, growth_rate=4, block_config=(1, 1), bn_size=2)
    rel = channel_relevance(net, None, "magnitude")
    with pytest.raises(ValueError, match=message):
        prune(net, rel, 0.5, example_inputs=torch.randn(1, 1, 16, 16), **kwargs)
    with pytest.raises(ValueError, match="relevance is empty"):
        prune(net, {}, 0.5, example_inputs=torch.randn(1, 1, 16, 16))


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [({"prune_kwargs": {"nonsense": 1}}, ValueError, r"bad prune_kwargs: \['nonsense'\] are not settings"),
     ({"prune_kwargs": {"round_to": 0}}, ValueError, "bad round_to 0"),
     ({"method": "ig", "relevance_kwargs": {"n_stepz": 4}}, ValueError, r"takes no setting\(s\) \['n_stepz'\]"),
     ({"collector": "not a collector"}, TypeError, "collector must be a RelevanceCollector")],
)  # fmt: skip
def test_handler_checks_its_keyword_dicts_when_built(kwargs, error, message):
    from monai_iaprune.handlers import RelevancePruningHandler

    with pytest.raises(error, match=message):
        RelevancePruningHandler(**kwargs)


def test_report_handler_latency_and_relevance_max_batches_are_range_checked():
    from monai.engines import SupervisedEvaluator
    from monai.networks.nets import DenseNet

    from monai_iaprune import channel_relevance
    from monai_iaprune.handlers import PruneReportHandler, RelevanceCollector

    net = DenseNet(2, 1, 2, init_features=8, growth_rate=4, block_config=(1, 1), bn_size=2)
    evaluator = SupervisedEvaluator(device=torch.device("cpu"), val_data_loader=[], network=net)
    for kw, msg in (
        ({"latency_repeats": 0}, "bad latency_repeats 0"),
        ({"latency_warmup": -1}, "bad latency_warmup -1"),
    ):
        with pytest.raises(ValueError, match=msg):
            PruneReportHandler(evaluator, "out", torch.zeros(1, 1, 16, 16), **kw)
    with pytest.raises(ValueError, match="bad max_batches 0"):
        channel_relevance(net, [torch.zeros(1, 1, 16, 16)], "taylor", max_batches=0)
    with pytest.raises(ValueError, match=r"takes no setting\(s\) \['bogus'\]"):
        RelevanceCollector("taylor", relevance_kwargs={"bogus": 1})


@pytest.mark.parametrize(
    ("explain_kwargs", "message"),
    [({"bogus": 1}, r"explain_kwargs \['bogus'\] are not settings of explanation_report"),
     ({"n_images": 0}, "bad explain_kwargs n_images 0"), ({"max_samples": -1}, "bad explain_kwargs max_samples -1"),
     ({"n_steps": 0}, "bad explain_kwargs n_steps 0"), ({"steps": 0}, "bad explain_kwargs steps 0")],
)  # fmt: skip
def test_report_explain_kwargs_are_checked_when_built(explain_kwargs, message):
    """explanation_report runs after the last epoch: a misspelt or zero setting there cost the whole run."""
    from monai.engines import SupervisedEvaluator
    from monai.networks.nets import DenseNet

    from monai_iaprune.handlers import PruneReportHandler

    net = DenseNet(2, 1, 2, init_features=8, growth_rate=4, block_config=(1, 1), bn_size=2)
    evaluator = SupervisedEvaluator(device=torch.device("cpu"), val_data_loader=[], network=net)
    with pytest.raises(ValueError, match=message):
        PruneReportHandler(evaluator, "out", torch.zeros(1, 1, 16, 16), explain_kwargs=explain_kwargs)
