"""Handler that measures a pruning run (metric, params, MACs, latency before / after) and writes the prune report."""

from __future__ import annotations

import copy
import inspect
import math
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from monai.utils import IgniteInfo, min_version, optional_import

from monai_iaprune.relevance.registry import input_map_methods
from monai_iaprune.report.prune_report import Measurement, PruneReport, write_prune_report
from monai_iaprune.utils.ddp import rank, unwrap_network
from monai_iaprune.utils.settings import as_bool, check_int

Events, _ = optional_import("ignite.engine", IgniteInfo.OPT_IMPORT_VERSION, min_version, "Events")
if TYPE_CHECKING:
    from ignite.engine import Engine
else:
    Engine, _ = optional_import("ignite.engine", IgniteInfo.OPT_IMPORT_VERSION, min_version, "Engine")

EXPLANATION_METRICS = (
    "expl_spearman",
    "expl_top10_iou",
    "expl_ssim",
    "deletion_auc_base",
    "deletion_auc_pruned",
    "insertion_auc_base",
    "insertion_auc_pruned",
)
# cheap defaults so a bundle's default run stays fast: a few images, 8 IG steps, 10 deletion steps
EXPLAIN_DEFAULTS: dict[str, Any] = {"n_images": 4, "max_samples": 8, "n_steps": 8, "steps": 10}
_EXPLAIN_RESERVED = ("model_before", "model_after", "data", "out_dir", "method", "writer", "global_step")


class PruneReportHandler:
    """Record a pruning trainer's before / pruned / after state and write ``prune_report.json`` + ``.md``.

    Attach it to the trainer that carries a ``RelevancePruningHandler``, *before* that handler (ignite runs
    handlers of one event in the order they were attached): at the end of the first pruning epoch (when the
    trainer starts if that epoch is 0) it runs
    ``evaluator``, measures params, MACs and latency of the still unpruned network and keeps a frozen copy of
    it; when training ends it runs ``evaluator`` again, measures the pruned, fine-tuned network, compares the
    two networks' input explanations (``monai_iaprune.report.explanations.explanation_report`` on the
    evaluator's data: Spearman / top-10 % IoU / SSIM agreement of the heatmaps, deletion and insertion AUC),
    draws the figures (channels kept per layer, relevance per layer, heatmap overlays, deletion / insertion
    curves) under ``output_dir/figures_dir`` and writes the report, whose Markdown links every figure.
    The metric right after pruning (before fine-tuning) is read from the pruning handler's ``history``.

    Args:
        evaluator: a MONAI ``SupervisedEvaluator`` over validation data, sharing the trainer's network.
        output_dir: folder for ``prune_report.json`` / ``prune_report.md``.
        example_inputs: one input batch for MACs and latency (e.g. ``torch.rand(1, 1, 32, 32)``); None: the
            pruning handler's example input (the first sample it explains, e.g. a sliding-window patch).
        pruning_handler: the ``RelevancePruningHandler`` attached to the same trainer (for ``prune_epochs``,
            ``method``, ``ratio``, ``stages``, per-stage ``history`` and ``last_relevance``).
        key_metric: evaluator metric to report; default the evaluator's key metric.
        latency_warmup, latency_repeats: see ``monai_iaprune.report.prune_report.measure_latency``.
        settings: extra fields copied into the report (e.g. ``finetune_epochs``, bundle name, command).
        name: report file stem.
        explain: compare the unpruned and the pruned network's explanations (metrics, heatmap overlays,
            deletion / insertion curves; default True); False skips them and keeps no copy of the unpruned
            network. The channel and relevance figures are drawn either way.
        explain_method: input attribution of the comparison, ``"ig"`` (Integrated Gradients) or ``"lrp"``.
        explain_data: batches to explain; default the evaluator's ``data_loader`` (a sliding-window host passes
            its patches, ``PatchedBatches``).
        explain_kwargs: settings of ``explanation_report`` (``n_images``, ``max_samples``, ``n_steps``,
            ``steps``, ``target``, ``baseline``, ``image_key``, ``label_key``, ...); defaults
            ``{"n_images": 4, "max_samples": 8, "n_steps": 8, "steps": 10}``.
        figures_dir: sub-folder of ``output_dir`` for the PNG files.
        tensorboard_writer: optional TensorBoard ``SummaryWriter`` or MONAI ``TensorBoardStatsHandler``; the
            heatmaps are sent to it through ``log_heatmaps_to_tensorboard``.

    Note:
        ``timings_s`` may be filled from outside before the trainer completes (e.g. ``pretrain`` by the
        bundle), and the written report is kept as ``self.report``. The final measurement runs at the end of
        the last epoch when no pruning stage is left (so the explanation metrics put into
        ``engine.state.metrics`` are printed by a ``StatsHandler`` / ``TensorBoardStatsHandler`` attached after
        this handler), otherwise when the trainer completes. In distributed runs attach it on every rank (it
        runs the evaluator, whose metrics are synchronised across ranks); only rank 0 keeps the unpruned copy,
        computes the explanations (on its own shard of the evaluator's data) and writes.
    """

    def __init__(
        self,
        evaluator: Any,
        output_dir: str,
        example_inputs: torch.Tensor | None = None,
        pruning_handler: Any = None,
        key_metric: str | None = None,
        latency_warmup: int = 3,
        latency_repeats: int = 20,
        settings: Mapping[str, Any] | None = None,
        name: str = "prune_report",
        explain: bool = True,
        explain_method: str = "ig",
        explain_kwargs: Mapping[str, Any] | None = None,
        explain_data: Any = None,
        figures_dir: str = "figures",
        tensorboard_writer: Any = None,
    ) -> None:
        if evaluator is None or not hasattr(evaluator, "run"):
            raise ValueError("evaluator must be a MONAI evaluator (an ignite Engine with run())")
        if example_inputs is None and not hasattr(pruning_handler, "example_input"):
            raise TypeError("example_inputs is None and there is no pruning_handler to take the example from")
        if example_inputs is not None and not isinstance(example_inputs, torch.Tensor):
            raise TypeError(f"example_inputs must be a tensor batch, got {type(example_inputs).__name__}")
        check_int(latency_warmup, "latency_warmup", 0)
        check_int(latency_repeats, "latency_repeats", 1)
        if explain_method not in input_map_methods():
            raise ValueError(f"unknown explain_method {explain_method!r}; use one of {input_map_methods()}")
        explain_kwargs = dict(explain_kwargs or {})
        clash = [k for k in _EXPLAIN_RESERVED if k in explain_kwargs]
        if clash:
            raise ValueError(f"explain_kwargs may not set {clash}: the handler passes them itself")
        # checked now: explanation_report runs after the last fine-tuning epoch, where a typo would cost the run
        from monai_iaprune.report.explanations import explanation_report

        accepted = [k for k in inspect.signature(explanation_report).parameters if k not in _EXPLAIN_RESERVED]
        unknown = sorted(k for k in explain_kwargs if k not in accepted)
        if unknown:
            raise ValueError(
                f"explain_kwargs {unknown} are not settings of explanation_report; it accepts {accepted}"
            )
        for key in ("n_images", "max_samples", "n_steps", "steps"):
            if key in explain_kwargs:
                check_int(explain_kwargs[key], f"explain_kwargs {key}", 1)
        if not figures_dir or Path(figures_dir).is_absolute():
            raise ValueError(f"figures_dir must be a relative sub-folder of output_dir, got {figures_dir!r}")
        self.evaluator = evaluator
        self.output_dir = str(output_dir)
        self.example_inputs = example_inputs
        self.pruning_handler = pruning_handler
        self.key_metric = key_metric
        self.latency_warmup = latency_warmup
        self.latency_repeats = latency_repeats
        self.settings = dict(settings or {})
        self.name = name
        self.explain = as_bool(explain, "explain")
        self.explain_method = explain_method
        self.explain_kwargs = {**EXPLAIN_DEFAULTS, **explain_kwargs}
        self.explain_data = explain_data
        self.figures_dir = str(figures_dir)
        self.tensorboard_writer = tensorboard_writer
        self.timings_s: dict[str, float] = {}
        self.before: Measurement | None = None
        self.report: dict[str, Any] | None = None
        self.unpruned: torch.nn.Module | None = None
        self._finished = False
        self._epoch_t0 = 0.0
        self._run_t0 = 0.0
        self._attached: set[int] = set()

    def attach(self, engine: Engine) -> None:
        """Register on ``engine`` (once): epoch timing, the before-pruning snapshot and the final report."""
        if id(engine) in self._attached:
            return
        self._attached.add(id(engine))
        engine.add_event_handler(Events.STARTED, self._started)  # before a pruning handler's STARTED stage
        engine.add_event_handler(Events.EPOCH_STARTED, self._epoch_started)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._epoch_completed)
        engine.add_event_handler(Events.COMPLETED, self)

    # -- helpers ------------------------------------------------------------------------------------------------------
    def _prune_epochs(self) -> list[int]:
        return list(getattr(self.pruning_handler, "prune_epochs", None) or [1])

    def _evaluate(self) -> float | None:
        self.evaluator.run()
        metrics = self.evaluator.state.metrics
        key = self.key_metric or getattr(self.evaluator.state, "key_metric_name", None)
        if key is None or key not in metrics:
            raise KeyError(f"evaluator has no metric {key!r} (metrics: {sorted(metrics)}); set key_metric")
        self.key_metric = key
        return float(metrics[key])

    def _measure(self, engine: Engine, network: torch.nn.Module, metric: float | None) -> Measurement:
        t0 = time.perf_counter()
        if self.example_inputs is None:
            self.example_inputs = self.pruning_handler.example_input(engine).detach().cpu()
        m = Measurement.of(network, self.example_inputs, metric, self.latency_warmup, self.latency_repeats)
        self._add_time("latency_and_counts", time.perf_counter() - t0)
        return m

    def _add_time(self, phase: str, seconds: float) -> None:
        self.timings_s[phase] = self.timings_s.get(phase, 0.0) + float(seconds)

    def _figures(self, engine: Engine, network: torch.nn.Module, report: dict[str, Any]) -> None:
        """Explanation metrics + all PNG files into ``report`` (and the metrics into ``engine.state.metrics``)."""
        from monai_iaprune.report.explanations import explanation_report
        from monai_iaprune.report.plots import plot_channels_per_layer, plot_relevance_distribution

        out = Path(self.output_dir)
        fig_dir = out / self.figures_dir
        pngs: list[Path] = []
        if report["per_layer"]:
            pngs.append(plot_channels_per_layer(report["per_layer"], fig_dir / "channels_per_layer.png"))
        relevance = getattr(self.pruning_handler, "last_relevance", None)
        if relevance:
            stages = len(getattr(self.pruning_handler, "history", None) or [])
            title = f"channel relevance per layer ({getattr(relevance, 'method', report['method'])}"
            title += f", stage {stages})" if stages > 1 else ")"
            pngs.append(
                plot_relevance_distribution(relevance, fig_dir / "relevance_distribution.png", title=title)
            )
        if self.unpruned is not None:
            data = self.explain_data or getattr(self.evaluator, "data_loader", None)
            if data is None:
                raise ValueError("the evaluator has no data_loader to explain; pass explain=False")
            t0 = time.perf_counter()
            expl = explanation_report(
                self.unpruned,
                network,
                data,
                fig_dir,
                method=self.explain_method,
                writer=self.tensorboard_writer,
                global_step=int(engine.state.epoch),
                **self.explain_kwargs,
            )
            self._add_time("explanations", time.perf_counter() - t0)
            pngs += [Path(p) for p in expl["pngs"]]
            report.update({k: v for k, v in expl.items() if k != "pngs"})
            report["explanation_method"] = self.explain_method
            report["explanation_settings"] = dict(self.explain_kwargs)
            for k in EXPLANATION_METRICS:
                v = float(expl[k])
                if math.isfinite(v):
                    engine.state.metrics[k] = v
            scores = ", ".join(f"{k}={float(expl[k]):.4f}" for k in EXPLANATION_METRICS)
            engine.logger.info(f"prune report: explanations ({self.explain_method}) {scores}")
        # relative to the Markdown file, with forward slashes, so the links work wherever the folder is moved
        report["figures"] = [Path(p).resolve().relative_to(out.resolve()).as_posix() for p in pngs]

    # -- events -------------------------------------------------------------------------------------------------------
    def _started(self, engine: Engine) -> None:
        self._run_t0 = time.perf_counter()
        if self.before is None and min(self._prune_epochs()) == 0:
            self._snapshot(engine)

    def _epoch_started(self, engine: Engine) -> None:
        self._epoch_t0 = time.perf_counter()

    def _epoch_completed(self, engine: Engine) -> None:
        phase = "train_before_pruning" if engine.state.epoch <= min(self._prune_epochs()) else "finetune"
        self._add_time(phase, time.perf_counter() - self._epoch_t0)
        epoch = engine.state.epoch
        if (
            self.before is not None
            and epoch == engine.state.max_epochs
            and epoch > max(self._prune_epochs())
            and not self._finished
        ):
            # finish before later handlers of this event (StatsHandler) log engine.state.metrics
            self._finish(engine)
            return
        if self.before is None and epoch == min(self._prune_epochs()):
            self._snapshot(engine)

    def _snapshot(self, engine: Engine) -> None:
        """Evaluate and measure the still unpruned network (and keep a frozen copy of it to explain later)."""
        if getattr(self.pruning_handler, "history", None):
            raise RuntimeError(
                "PruneReportHandler must be attached before RelevancePruningHandler (it pruned first)"
            )
        t0 = time.perf_counter()
        metric = self._evaluate()
        self._add_time("evaluate_before", time.perf_counter() - t0)
        network = unwrap_network(engine.network)
        self.before = self._measure(engine, network, metric)
        if self.explain and rank() == 0:
            # a frozen copy of the unpruned network, to compare explanations with once training has ended
            self.unpruned = copy.deepcopy(network).eval()
            for p in self.unpruned.parameters():
                p.requires_grad_(False)
                p.grad = None
        engine.logger.info(
            f"prune report: before pruning {self.key_metric}={metric:.4f}, params={self.before.params}"
        )

    def __call__(self, engine: Engine) -> None:
        """At COMPLETED: write the report unless it was written at the end of the last epoch."""
        if not self._finished:
            self._finish(engine)

    def _finish(self, engine: Engine) -> None:
        """Evaluate and measure the final network, compare explanations, draw the figures, write the report."""
        if self.before is None:
            raise RuntimeError(
                f"the trainer completed without reaching the first pruning epoch ({min(self._prune_epochs())}); "
                "give it at least that many epochs"
            )
        self._finished = True
        t0 = time.perf_counter()
        metric_after = self._evaluate()
        self._add_time("evaluate_after", time.perf_counter() - t0)
        network = unwrap_network(engine.network)
        after = self._measure(engine, network, metric_after)
        history = list(getattr(self.pruning_handler, "history", None) or [])
        for phase, key in (("relevance", "relevance_time_s"), ("prune", "prune_time_s")):
            vals = [h.get(key) for h in history if h.get(key) is not None]
            if vals:
                self.timings_s[phase] = float(sum(vals))
        ph = self.pruning_handler
        built = PruneReport(
            method=getattr(ph, "method", self.settings.get("method")),
            ratio=getattr(ph, "ratio", self.settings.get("ratio")),
            stages=getattr(ph, "stages", self.settings.get("stages")),
            metric_name=self.key_metric,
            before=self.before,
            after=after,
            stages_detail=history,
            settings=self.settings,
            relevance_input_shape=list(self.example_inputs.shape),
            prune_target=getattr(ph, "prune_target", self.settings.get("prune_target", "params")),
            speedup=getattr(ph, "speedup", self.settings.get("speedup")),
            steps=getattr(ph, "steps", self.settings.get("steps", 1)),
            depth_ratio=getattr(ph, "depth_ratio", self.settings.get("depth_ratio", 0.0)),
        )
        report = built.to_dict()
        # under torch.distributed every rank measures (the evaluator is collective); rank 0 explains and writes
        if rank() == 0:
            try:
                self._figures(engine, network, report)
            except Exception as e:  # a failed figure must not cost the measured report of a long run
                engine.logger.exception("prune report: figures / explanations failed")
                report["figures_error"] = f"{type(e).__name__}: {e}"
        self.timings_s["prune_trainer_total"] = time.perf_counter() - self._run_t0
        report["timings_s"] = dict(self.timings_s)
        self.report = report
        if rank() > 0:
            return
        paths = write_prune_report(report, self.output_dir, self.name)
        engine.logger.info(
            f"prune report: params {report['params_before']} -> {report['params_after']}, "
            f"{self.key_metric} {report['metric_before']:.4f} -> {report['metric_after']:.4f}; wrote {paths[0]}"
        )
