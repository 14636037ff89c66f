"""The prune report: measurements, the typed ``PruneReport``, latency, package versions, the JSON + Markdown writer.

``PruneReport`` is the one place a report's fields are built (``to_dict()`` gives the JSON keys);
``write_prune_report`` checks a dict holds every required field, then writes ``prune_report.json`` and
``prune_report.md`` atomically (temp file in the same folder + ``os.replace``).
"""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from torch import nn

from monai_iaprune.pruning.checkpoint import atomic_write
from monai_iaprune.pruning.prune import count_macs, count_params
from monai_iaprune.relevance.layers import PRUNABLE_TYPES, out_channels
from monai_iaprune.utils.batch import model_device

REQUIRED_FIELDS = (
    "method",
    "ratio",
    "params_before",
    "params_after",
    "macs_before",
    "macs_after",
    "latency_ms_before",
    "latency_ms_after",
    "latency",
    "metric_name",
    "metric_before",
    "metric_pruned",
    "metric_after",
    "per_layer",
    "timings_s",
    "versions",
)

PACKAGES = (
    "monai-iaprune",
    "monai",
    "torch",
    "torchvision",
    "torch-pruning",
    "zennit",
    "captum",
    "pytorch-ignite",
    "numpy",
    "nibabel",
    "itk",
)


def package_versions(packages: Sequence[str] = PACKAGES) -> dict[str, str]:
    """Installed versions of ``packages`` (``"not installed"`` where absent), plus python and the platform."""
    out = {"python": platform.python_version(), "platform": platform.platform()}
    for name in packages:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    out["torch_threads"] = str(torch.get_num_threads())
    return out


@torch.no_grad()
def measure_latency(
    model: nn.Module,
    example_inputs: torch.Tensor,
    *,
    warmup: int = 3,
    repeats: int = 20,
    device: torch.device | str | None = None,
) -> dict[str, Any]:
    """Median forward latency of ``model`` in eval mode on ``example_inputs``.

    Args:
        model: the network (its train/eval mode is restored).
        example_inputs: the input batch; its batch size is reported.
        warmup: untimed forward passes first.
        repeats: timed forward passes (the median is reported).
        device: where to run; default the model's device. CUDA is synchronised around each pass.

    Returns:
        ``{"median_ms", "mean_ms", "min_ms", "repeats", "batch_size", "input_shape", "device", "threads"}``.
    """
    if repeats < 1 or warmup < 0:
        raise ValueError(f"need repeats >= 1 and warmup >= 0, got repeats={repeats}, warmup={warmup}")
    device = torch.device(model_device(model) if device is None else device)
    x = example_inputs.to(device)
    was_training = model.training
    model.eval()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda *a: None)
    try:
        for _ in range(warmup):
            model(x)
        times = []
        for _ in range(repeats):
            sync(device)
            t0 = time.perf_counter()
            model(x)
            sync(device)
            times.append((time.perf_counter() - t0) * 1000.0)
    finally:
        model.train(was_training)
    return {
        "median_ms": statistics.median(times),
        "mean_ms": statistics.fmean(times),
        "min_ms": min(times),
        "repeats": repeats,
        "batch_size": int(x.shape[0]),
        "input_shape": list(x.shape),
        "device": str(device),
        "threads": torch.get_num_threads(),
    }


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        return _jsonable(obj.tolist()) if obj.numel() != 1 else _jsonable(obj.item())
    if hasattr(obj, "item") and callable(obj.item) and not isinstance(obj, (str, bytes)):  # numpy scalars
        try:
            return _jsonable(obj.item())
        except (TypeError, ValueError):
            pass
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    return str(obj)


def _atomic_write(path: Path, text: str) -> None:
    atomic_write(path, lambda f: f.write(text.encode("utf-8")), overwrite=True)


def _fmt(v: Any, digits: int = 4) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        return f"{v:,.0f}" if abs(v) >= 1e5 else f"{v:.{digits}g}"
    return str(v)


def _change(before: Any, after: Any) -> str:
    if isinstance(before, (int, float)) and isinstance(after, (int, float)) and before:
        return f"{100.0 * (after - before) / before:+.1f}%"
    return ""


def render_markdown(report: Mapping[str, Any]) -> str:
    """Render a prune report dict as Markdown (summary table, latency setup, timings, explanation metrics,
    per-layer channels, versions, and a "Figures" section linking the report's PNG files)."""
    r = report
    lat = r.get("latency", {})
    lines = [
        f"# Prune report{': ' + r['bundle'] if r.get('bundle') else ''}",
        "",
        f"Method **{r['method']}**, "
        + (
            f"requested speed-up **{r.get('speedup')}** (latency)"
            if r.get("prune_target") == "latency"
            else f"requested ratio **{r['ratio']}** of {'MACs' if r.get('prune_target') == 'macs' else 'parameters'}"
        )
        + (f" over {r['stages']} stage(s)" if r.get("stages") else "")
        + (f"; {r['finetune_epochs']} fine-tune epoch(s)" if r.get("finetune_epochs") is not None else "")
        + ".",
        "",
        "| | before | after | change |",
        "|---|---|---|---|",
        f"| parameters | {_fmt(r['params_before'])} | {_fmt(r['params_after'])} | {_change(r['params_before'], r['params_after'])} |",
        f"| MACs | {_fmt(r['macs_before'])} | {_fmt(r['macs_after'])} | {_change(r['macs_before'], r['macs_after'])} |",
        f"| latency (median ms) | {_fmt(r['latency_ms_before'])} | {_fmt(r['latency_ms_after'])} | "
        f"{_change(r['latency_ms_before'], r['latency_ms_after'])} |",
        "",
        f"| {r['metric_name']} | value |",
        "|---|---|",
        f"| before pruning | {_fmt(r['metric_before'])} |",
        f"| right after pruning (before fine-tune) | {_fmt(r['metric_pruned'])} |",
        f"| after fine-tune | {_fmt(r['metric_after'])} |",
        "",
        f"Latency: median of {lat.get('repeats', '?')} forward passes, batch {lat.get('batch_size', '?')}, "
        f"input {lat.get('input_shape', '?')}, device {lat.get('device', '?')}, {lat.get('threads', '?')} thread(s), "
        "both measured in the same run.",
        "",
        "## Timings (s)",
        "",
        "| phase | seconds |",
        "|---|---|",
    ]
    lines += [f"| {k} | {_fmt(v, 3)} |" for k, v in r["timings_s"].items()]
    lines += _budget_lines(r)
    if r.get("stages_detail"):
        lines += [
            "",
            "## Stages",
            "",
            "| stage | epoch | params after | MACs after | metric pruned |",
            "|---|---|---|---|---|",
        ]
        for s in r["stages_detail"]:
            lines.append(
                f"| {s.get('stage')} | {s.get('epoch')} | {_fmt(s.get('params_after'))} | {_fmt(s.get('macs_after'))} | "
                f"{_fmt(s.get('metric_pruned'))} |"
            )
    lines += _explanation_lines(r)
    lines += ["", "## Channels per layer", "", "| layer | before | after |", "|---|---|---|"]
    lines += [f"| `{p['name']}` | {p['channels_before']} | {p['channels_after']} |" for p in r["per_layer"]]
    lines += ["", "## Versions", "", "| package | version |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in r["versions"].items()]
    if r.get("command"):
        lines += ["", "## Command", "", "```", str(r["command"]), "```"]
    lines += _figure_lines(r)
    return "\n".join(lines) + "\n"


def _pct(v: Any) -> str:
    return "n/a" if v is None else f"{100.0 * float(v):.1f}%"


def _budget_lines(r: Mapping[str, Any]) -> list[str]:
    """The "Budget" section: params, MACs and measured latency side by side, requested vs achieved; removed blocks."""
    budget = r.get("budget")
    if not budget:
        return []
    lat = budget.get("latency", {})
    lines = [
        "",
        "## Budget",
        "",
        f"Budget counted in **{r.get('prune_target', 'params')}**, {r.get('steps', 1)} re-scored step(s) per stage"
        + (f", depth ratio {r['depth_ratio']}" if r.get("depth_ratio") else "")
        + "; requested and achieved over the whole run (removed fraction of the original; speed-up for latency).",
        "",
        "| | requested | achieved |",
        "|---|---|---|",
        f"| parameters removed | {_pct(budget['params'].get('requested'))} | {_pct(budget['params'].get('achieved'))} |",
        f"| MACs removed | {_pct(budget['macs'].get('requested'))} | {_pct(budget['macs'].get('achieved'))} |",
        f"| latency speed-up (measured) | {_fmt(lat.get('requested_speedup'), 3)} | {_fmt(lat.get('measured_speedup'), 3)} |",
    ]
    if lat.get("estimated_speedup") is not None:
        lines.append(
            f"| latency speed-up (latency-table estimate) | | {_fmt(lat.get('estimated_speedup'), 3)} |"
        )
    blocks = r.get("removed_blocks") or []
    if blocks:
        lines += ["", "## Removed blocks", "", "| stage | block | relevance |", "|---|---|---|"]
        lines += [f"| {b.get('stage')} | `{b['name']}` | {_fmt(b.get('relevance'), 3)} |" for b in blocks]
    return lines


def _ci(v: Any) -> str:
    """``[lo, hi]`` of a bootstrap interval, or "" when there is none."""
    if not isinstance(v, (list, tuple)) or len(v) != 2:
        return ""
    return f"[{_fmt(v[0], 3)}, {_fmt(v[1], 3)}]"


def _explanation_lines(r: Mapping[str, Any]) -> list[str]:
    """The "Explanations" section: agreement and faithfulness of the unpruned vs the pruned network's maps."""
    if "expl_spearman" not in r:
        return []
    settings = r.get("explanation_settings") or {}
    code = r.get("explanation_method")
    method = {"ig": "Integrated Gradients", "lrp": "LRP"}.get(code, code)
    lines = [
        "",
        "## Explanations",
        "",
        f"Input attribution maps ({method or 'n/a'}"
        + (f", {settings['n_steps']} steps" if code == "ig" and "n_steps" in settings else "")
        + f") of the unpruned and the final pruned network on {r.get('n_images', '?')} held-out image(s), "
        "both explaining the same target (the label, or the unpruned network's prediction). Agreement per image, "
        "median, IQR and 95 % bootstrap interval of the median over images:",
        "",
        "| agreement | median | IQR | 95 % CI |",
        "|---|---|---|---|",
        f"| Spearman rank correlation | {_fmt(r.get('expl_spearman'), 3)} | {_fmt(r.get('expl_spearman_iqr'), 3)} | {_ci(r.get('expl_spearman_ci'))} |",
        f"| IoU of the top 10 % voxels | {_fmt(r.get('expl_top10_iou'), 3)} | {_fmt(r.get('expl_top10_iou_iqr'), 3)} | {_ci(r.get('expl_top10_iou_ci'))} |",
        f"| SSIM | {_fmt(r.get('expl_ssim'), 3)} | {_fmt(r.get('expl_ssim_iqr'), 3)} | {_ci(r.get('expl_ssim_ci'))} |",
        "",
        "Faithfulness (class probability while the most relevant pixels are deleted / inserted"
        + (f", {settings['steps']} steps" if "steps" in settings else "")
        + "; deletion: lower is better, insertion: higher is better):",
        "",
        "| AUC | unpruned | pruned |",
        "|---|---|---|",
        f"| deletion | {_fmt(r.get('deletion_auc_base'), 3)} {_ci(r.get('deletion_auc_base_ci'))} | "
        f"{_fmt(r.get('deletion_auc_pruned'), 3)} {_ci(r.get('deletion_auc_pruned_ci'))} |",
        f"| insertion | {_fmt(r.get('insertion_auc_base'), 3)} | {_fmt(r.get('insertion_auc_pruned'), 3)} |",
    ]
    if r.get("min_agreement") is not None:
        lines += [
            "",
            f"Ratio chosen for min_agreement={r['min_agreement']} ({r.get('min_agreement_explainer')} Spearman on "
            f"validation data, right after pruning and BatchNorm re-calibration): ratio {r.get('min_agreement_ratio')}, "
            f"measured agreement {_fmt(r.get('min_agreement_measured'), 3)}.",
        ]
    if r.get("explain_weight"):
        per_epoch = [_fmt(v, 3) for v in r.get("explanation_consistency_per_epoch") or []]
        lines += [
            "",
            f"Fine-tuned with the explanation-consistency term (weight {r['explain_weight']}, "
            f"{r.get('explain_explainer')} maps, teacher = the unpruned network); mean term per epoch: "
            + (", ".join(per_epoch) or "n/a")
            + ".",
        ]
    if r.get("explain_feature_weight"):
        lines += [
            "",
            f"Fine-tuned with kept-channel feature distillation (weight {r['explain_feature_weight']}): every kept "
            "channel's output pulled to the unpruned network's output of the same channel; mean term per epoch: "
            + (", ".join(_fmt(v, 3) for v in r.get("feature_distillation_per_epoch") or []) or "n/a")
            + ".",
        ]
    return lines


def _figure_lines(r: Mapping[str, Any]) -> list[str]:
    """The "Figures" section: every PNG of the report, linked by its path relative to the Markdown file."""
    figures = list(r.get("figures") or [])
    if not figures and not r.get("figures_error"):
        return []
    lines = ["", "## Figures", ""]
    if r.get("figures_error"):
        lines += [f"Figures incomplete: {r['figures_error']}", ""]
    for f in figures:
        stem = Path(str(f)).stem.replace("_", " ")
        lines += [f"### {stem}", "", f"![{stem}]({f})", ""]
    return lines[:-1] if lines[-1] == "" else lines


@dataclass
class Measurement:
    """One network's state in a pruning run: key metric, parameters, MACs, latency, channels per prunable layer."""

    metric: float | None
    params: int
    macs: float
    latency: dict[str, Any]
    channels: dict[str, int]

    @classmethod
    def of(
        cls,
        network: nn.Module,
        example_inputs: torch.Tensor,
        metric: float | None = None,
        latency_warmup: int = 3,
        latency_repeats: int = 20,
    ) -> Measurement:
        """Measure ``network`` on ``example_inputs`` (moved to the network's device)."""
        x = example_inputs.to(next(network.parameters()).device)
        return cls(
            metric=metric,
            params=count_params(network),
            macs=count_macs(network, x),
            latency=measure_latency(network, x, warmup=latency_warmup, repeats=latency_repeats),
            channels={
                n: out_channels(m) for n, m in network.named_modules() if isinstance(m, PRUNABLE_TYPES)
            },
        )


@dataclass
class PruneReport:
    """A pruning run's report: criterion, ``before`` / ``after`` measurements, one record per stage (the pruning
    handler's ``history``), extra ``settings`` fields and timings; ``to_dict()`` gives ``prune_report.json``'s keys."""

    method: str
    ratio: float
    stages: int
    metric_name: str | None
    before: Measurement
    after: Measurement
    stages_detail: list[dict[str, Any]] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)
    relevance_input_shape: list[int] | None = None
    timings_s: dict[str, float] = field(default_factory=dict)
    prune_target: str = "params"
    speedup: float | None = None
    steps: int = 1
    depth_ratio: float = 0.0

    def budget(self) -> dict[str, Any]:
        """Requested vs achieved over the run: removed fractions of params and MACs, measured latency speed-up."""
        b, a, history = self.before, self.after, self.stages_detail
        params_removed = 1.0 - a.params / max(b.params, 1)
        macs_removed = 1.0 - a.macs / max(b.macs, 1.0)
        measured = b.latency["median_ms"] / a.latency["median_ms"] if a.latency.get("median_ms") else None
        estimated = None
        if self.prune_target == "latency" and history:
            estimated = 1.0
            for h in history:
                estimated *= h.get("latency_estimated_speedup") or 1.0
        requested = {self.prune_target: self.ratio} if self.prune_target in ("params", "macs") else {}
        return {
            "params": {"requested": requested.get("params"), "achieved": params_removed},
            "macs": {"requested": requested.get("macs"), "achieved": macs_removed},
            "latency": {
                "requested_speedup": self.speedup if self.prune_target == "latency" else None,
                "measured_speedup": measured,
                "estimated_speedup": estimated,
            },
            "depth_ratio": self.depth_ratio,
        }

    def to_dict(self) -> dict[str, Any]:
        b, a = self.before, self.after
        history = self.stages_detail
        return {
            "method": self.method,
            "ratio": self.ratio,
            "stages": self.stages,
            **{k: v for k, v in self.settings.items() if k not in ("method", "ratio", "stages")},
            "relevance_input_shape": self.relevance_input_shape,
            "params_before": b.params,
            "params_after": a.params,
            "params_removed": 1.0 - a.params / max(b.params, 1),
            "macs_before": b.macs,
            "macs_after": a.macs,
            "macs_removed": 1.0 - a.macs / max(b.macs, 1.0),
            "latency_ms_before": b.latency["median_ms"],
            "latency_ms_after": a.latency["median_ms"],
            "latency": {k: v for k, v in a.latency.items() if not k.endswith("_ms")},
            "latency_detail": {"before": b.latency, "after": a.latency},
            "metric_name": self.metric_name,
            "metric_before": b.metric,
            "metric_pruned": history[-1].get("metric_pruned") if history else None,
            "metric_after": a.metric,
            "per_layer": [
                {"name": n, "channels_before": c, "channels_after": a.channels.get(n, 0)}
                for n, c in b.channels.items()
            ],
            "prune_target": self.prune_target,
            "speedup": self.speedup,
            "steps": self.steps,
            "depth_ratio": self.depth_ratio,
            "budget": self.budget(),
            "removed_blocks": [
                {"stage": h.get("stage"), **blk} for h in history for blk in h.get("removed_blocks") or []
            ],
            "stages_detail": [{k: v for k, v in h.items() if k != "per_layer"} for h in history],
            "timings_s": dict(self.timings_s),
            "versions": package_versions(),
        }


def write_prune_report(
    report: Mapping[str, Any], output_dir: str | os.PathLike, name: str = "prune_report"
) -> tuple[Path, Path]:
    """Write ``{name}.json`` and ``{name}.md`` into ``output_dir`` (created if needed), atomically; return both paths.

    Raises:
        KeyError: ``report`` misses fields of ``REQUIRED_FIELDS`` (all missing ones are named).
    """
    missing = [k for k in REQUIRED_FIELDS if k not in report]
    if missing:
        raise KeyError(f"prune report is missing required field(s): {missing}")
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    data = _jsonable(report)
    jp, mp = out / f"{name}.json", out / f"{name}.md"
    _atomic_write(jp, json.dumps(data, indent=2) + "\n")
    _atomic_write(mp, render_markdown(data))
    return jp, mp


__all__ = [
    "PACKAGES",
    "REQUIRED_FIELDS",
    "Measurement",
    "PruneReport",
    "measure_latency",
    "package_versions",
    "render_markdown",
    "write_prune_report",
]
