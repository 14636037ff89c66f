"""Explanation-preserving fine-tuning on MedMNIST (issue #16): plain vs explanation-consistency fine-tune.

Per dataset and seed: that seed's base model of ``run.py`` (``run.base_model(seed=...)``, loaded from its cache,
trained when absent; seed 0 is the model the earlier rows used), pruned by LRP relevance to remove ``--ratios`` of its MACs (``prune(..., target="macs")``; ``--ranking raw``: relevance alone, ``cost_aware=False``, rows say ``lrp-raw``), BatchNorm
re-calibrated, then fine-tuned with ``run.py``'s recipe (AdamW, one-cycle LR, flips / shifts, ``DATASETS``
``ft_epochs``, best validation epoch including the start) twice from the same pruned weights and seed:

- ``plain``: cross-entropy only;
- ``explain``: cross-entropy + ``weight * ExplanationConsistencyLoss`` (gradient x input maps, teacher = the
  unpruned network). ``weight`` is chosen among ``--weights`` on VALIDATION data: the largest median IG
  Spearman agreement on ``--n_val`` validation images among weights whose validation ACC is not below the
  plain arm's minus ``--val_acc_tol``; the test set is not looked at.

Options: ``--train_explainer ig`` fits few-step IG maps (``--train_ig_steps``) in place of gradient x input (IG is
then dropped from the evaluation explainers); ``--explain_kd A`` adds logit distillation from the unpruned network to
the explain arm (``run.train``'s ``kd_alpha``, T = 4) and a third arm ``distill`` (distillation only, no term) as
its control. ``--reference`` measures instead what agreement maps keep WITHOUT pruning (``reference_rows``: the
explainer's own noise, an independently trained model, the unpruned model after the same fine-tune).

Both arms are evaluated with explainers the student was *not* trained on, IG (captum, ``--ig_steps``) and LRP,
on the first ``--n_expl`` test images: median Spearman and top-10 % IoU of pruned vs unpruned maps of the true
label, mean deletion AUC of each model with its own maps (lower = more faithful), test ACC on the whole test
set; 95 % percentile bootstrap intervals over images (``--n_boot`` resamples), and for ``explain`` rows the
paired bootstrap interval of the ACC difference to ``plain``.

    nice -n 10 python benchmarks/explanations.py --datasets breastmnist --seeds 0
    # writes benchmarks/results/explanations.csv (rows appended, finished keys skipped) and explanations.md

No timing is recorded (shared machine). A dataset whose data file is absent is skipped with a message.
"""

from __future__ import annotations

import argparse
import copy
import csv
import math
import sys
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import run  # noqa: E402
from run import DATASETS, batches, load_split, make_model, metrics, model_name, predict, train  # noqa: E402

from monai_iaprune import channel_relevance, prune, recalibrate_batchnorm  # noqa: E402
from monai_iaprune.pruning.explanation_consistency import ExplanationConsistencyLoss  # noqa: E402
from monai_iaprune.pruning.feature_distillation import FeatureDistillationLoss, kept_channels  # noqa: E402
from monai_iaprune.pruning.prune import count_macs  # noqa: E402
from monai_iaprune.report.explanations import (  # noqa: E402
    agreement_from_maps,
    attribution_maps,
    curve_auc,
    deletion_insertion_curves,
    explained_selection,
)

RESULTS = ROOT / "benchmarks" / "results"
COLUMNS = [
    "dataset", "method", "macs_removed", "seed", "finetune", "explainer_eval",
    "spearman", "iou10", "deletion_auc_base", "deletion_auc_pruned", "acc",
    # bootstrap 95 % intervals (over the explained images; ACC over the test set)
    "spearman_lo", "spearman_hi", "iou10_lo", "iou10_hi", "deletion_auc_pruned_lo", "deletion_auc_pruned_hi",
    "acc_lo", "acc_hi", "acc_diff_vs_plain", "acc_diff_lo", "acc_diff_hi",
    # context
    "macs_target", "weight", "explainer_train", "val_spearman_ig", "val_acc", "acc_pruned_no_ft", "acc_base",
    "ft_epochs", "n_expl", "ig_steps", "model",
]  # fmt: skip
EVAL_EXPLAINERS = ("ig", "lrp")
DELETION_STEPS = 10


def finetune(
    model: nn.Module,
    train_xy: tuple[torch.Tensor, torch.Tensor],
    val_xy: tuple[torch.Tensor, torch.Tensor],
    epochs: int,
    batch: int,
    seed: int,
    lr: float = 1e-3,
    consistency: ExplanationConsistencyLoss | None = None,
    weight: float = 0.0,
    teacher: nn.Module | None = None,
    kd_alpha: float = 0.0,
    feature: FeatureDistillationLoss | None = None,
    feature_weight: float = 0.0,
) -> dict[str, Any]:
    """``run.train``'s fine-tune recipe (``include_start=True``) with an optional ``weight * consistency`` term,
    optional logit distillation from ``teacher`` (``kd_alpha``, temperature 4: ``run.train``'s) and an optional
    ``feature_weight * feature`` term (kept-channel feature distillation, on the training forward's outputs)."""
    terms: list[float] = []
    use = consistency is not None and weight > 0
    use_feature = feature is not None and feature_weight > 0

    def term(m: nn.Module, xb: torch.Tensor, yb: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        total = logits.new_zeros(())
        if use_feature and m.training:  # the evaluation passes between epochs leave no term
            total = total + feature_weight * feature(xb)
        if use:
            t = consistency(m, xb, yb, student_output=logits)
            terms.append(float(t.detach()))
            total = total + weight * t
        return total

    if use_feature:
        feature.attach(model)
    try:
        info = train(model, train_xy, val_xy, epochs, batch, seed, lr=lr, include_start=True,
                     extra_loss=term if use or use_feature else None, teacher=teacher, kd_alpha=kd_alpha)  # fmt: skip
    finally:
        if use_feature:
            feature.detach()
    model.eval()
    return {
        "best_epoch": info["best_epoch"],
        "val_acc": info["val_acc"],
        "consistency_first": terms[0] if terms else float("nan"),
        "consistency_last": float(np.mean(terms[-10:])) if terms else float("nan"),
    }


def explain(
    model: nn.Module, x: torch.Tensor, sel: torch.Tensor, explainer: str, ig_steps: int
) -> torch.Tensor:
    kw = {"n_steps": ig_steps} if explainer == "ig" else {}
    return attribution_maps(model, x, explainer, selection=sel, **kw).detach().cpu()


def deletion_aucs(model: nn.Module, x: torch.Tensor, maps: torch.Tensor, sel: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        deletion, _ = deletion_insertion_curves(model, x, maps, sel, DELETION_STEPS)
    return curve_auc(deletion).numpy()


def bootstrap(values: np.ndarray, stat: Any, n_boot: int, seed: int = 0) -> tuple[float, float]:
    """95 % percentile interval of ``stat`` over ``n_boot`` resamples of ``values`` (rows)."""
    values = np.asarray(values)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(values), size=(n_boot, len(values)))
    stats = np.array([stat(values[i]) for i in idx])
    lo, hi = np.nanpercentile(stats, [2.5, 97.5])
    return float(lo), float(hi)


def read_rows(path: Path) -> list[dict[str, str]]:
    if not path.exists():
        return []
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def append_rows(path: Path, rows: list[dict[str, Any]]) -> None:
    new = not path.exists()
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", newline="") as f:
        w = csv.DictWriter(f, COLUMNS)
        if new:
            w.writeheader()
        for r in rows:
            w.writerow({k: (f"{v:.4f}" if isinstance(v, float) else v) for k, v in r.items() if k in COLUMNS})


def evaluation_explainers(train_explainer: str) -> list[str]:
    """The explainers agreement is scored with: never the one the consistency term trains on."""
    return [e for e in EVAL_EXPLAINERS if e != train_explainer]


def weighted_arm(
    arm: str, weights: list[float], fit: Any, val_agreement: Any, plain_val_acc: float, tol: float
) -> tuple[nn.Module, dict[str, Any]] | None:
    """Fine-tune from the pruned weights at each weight (``fit(w) -> (model, info, note)``) and return the candidate
    ``pick_on_validation`` chooses; None without weights (no such arm)."""
    candidates = []
    for w in weights:
        m, info, note = fit(w)
        info["val_spearman_ig"], info["weight"] = val_agreement(m), w
        print(f"  [{arm} w={w}] val ACC {info['val_acc']:.4f} val IG Spearman {info['val_spearman_ig']:.4f} {note}",
              flush=True)  # fmt: skip
        candidates.append((m, info))
    if not candidates:
        return None
    chosen = pick_on_validation(candidates, plain_val_acc, tol)
    print(f"  [{arm}] chose weight {chosen[1]['weight']} on validation", flush=True)
    return chosen


def fit_explain(ctx: dict[str, Any], w: float) -> tuple[nn.Module, dict[str, Any], str]:
    """The explain arm at weight ``w``: the consistency term (+ logit distillation with --explain_kd)."""
    args, m = ctx["args"], copy.deepcopy(ctx["pruned"])
    loss = ExplanationConsistencyLoss(
        copy.deepcopy(ctx["model"]).eval(),
        explainer=args.train_explainer,
        explainer_kwargs={"n_steps": args.train_ig_steps} if args.train_explainer == "ig" else None,
    )
    info = finetune(m, ctx["data"]["train"], ctx["data"]["val"], ctx["ft_epochs"], ctx["batch"], ctx["seed"],
                    consistency=loss, weight=w, teacher=ctx["teacher"], kd_alpha=args.explain_kd)  # fmt: skip
    return m, info, f"consistency {info['consistency_first']:.3f} -> {info['consistency_last']:.3f}"


def fit_feature(ctx: dict[str, Any], w: float) -> tuple[nn.Module, dict[str, Any], str]:
    """The feature arm at weight ``w``: kept-channel feature distillation (+ logit distillation with --explain_kd)."""
    m = copy.deepcopy(ctx["pruned"])
    feature = FeatureDistillationLoss(copy.deepcopy(ctx["model"]).eval(), ctx["kept"])
    info = finetune(m, ctx["data"]["train"], ctx["data"]["val"], ctx["ft_epochs"], ctx["batch"], ctx["seed"],
                    teacher=ctx["teacher"], kd_alpha=ctx["args"].explain_kd, feature=feature,
                    feature_weight=w)  # fmt: skip
    return m, info, f"term {feature.last:.4f}"


def pick_on_validation(
    candidates: list[tuple[nn.Module, dict[str, Any]]], plain_val_acc: float, tol: float
) -> tuple[nn.Module, dict[str, Any]]:
    """The candidate (one per weight) with the largest validation IG agreement among those whose validation ACC is
    not below the plain arm's minus ``tol``; when none is, the best validation ACC. The test set is not looked at."""
    ok = [c for c in candidates if c[1]["val_acc"] >= plain_val_acc - tol]
    return max(ok or candidates, key=lambda c: c[1]["val_spearman_ig"] if ok else c[1]["val_acc"])


def run_dataset(name: str, args: argparse.Namespace, csv_path: Path) -> None:
    cfg = DATASETS[name]
    path = run.DATA_DIR / cfg["file"]
    if not path.exists():
        print(f"[skip] {name}: {path} not present")
        return
    data = {s: load_split(path, s, args.limit) for s in ("train", "val", "test")}
    done = {(r["dataset"], r["macs_target"], r["seed"]) for r in read_rows(csv_path)}
    xtr, ytr = data["train"]
    eval_explainers = evaluation_explainers(args.train_explainer)
    kd = f"+kd{args.explain_kd:g}" if args.explain_kd > 0 else ""
    train_label = {
        "plain": "",
        "distill": kd.lstrip("+"),
        "explain": args.train_explainer + kd,
        "feature": "features" + kd,
    }
    for seed in args.seeds:  # each seed prunes its own base model (run.base_model: trained with that seed)
        todo = [r for r in args.ratios if (name, f"{r:.4f}", str(seed)) not in done]
        if not todo:
            print(f"[done] {name} seed {seed}")
            continue
        model, info = run.base_model(name, cfg, data, args.cache, epochs=args.epochs, seed=seed)
        model.eval()
        ft_epochs = args.ft_epochs if args.ft_epochs is not None else cfg["ft_epochs"]
        xt, yt = data["test"]
        yt_np = yt.numpy()
        p_base = predict(model, xt)
        acc_base = metrics(yt, p_base)[0]
        print(
            f"[base] {name} s{seed} {model_name(cfg)}: test ACC {acc_base:.4f} (epochs {info.get('epochs')})",
            flush=True,
        )
        xe, ye = xt[: args.n_expl], yt[: args.n_expl]
        sel_e = explained_selection(model, xe, ye, "label")
        base_maps = {e: explain(model, xe, sel_e, e, args.ig_steps) for e in eval_explainers}
        base_del = {e: deletion_aucs(model, xe, base_maps[e], sel_e) for e in eval_explainers}
        xv, yv = data["val"][0][: args.n_val], data["val"][1][: args.n_val]
        sel_v = explained_selection(model, xv, yv, "label")
        base_val_ig = explain(model, xv, sel_v, "ig", args.ig_steps)
        x1 = xt[:1]
        macs_base = count_macs(model, x1)

        for ratio in todo:
            g = torch.Generator().manual_seed(1000 + seed)
            calib = torch.randperm(len(xtr), generator=g)[: args.calib]
            cal_batches = list(batches(xtr[calib], ytr[calib], 32))
            pruned = copy.deepcopy(model)
            rel = channel_relevance(pruned, cal_batches, "lrp", progress=False)
            kept = kept_channels(
                model,
                prune(
                    pruned, rel, ratio, target="macs", example_inputs=x1, cost_aware=args.ranking == "cost"
                ).history,
            )
            recalibrate_batchnorm(pruned, cal_batches)
            pruned.eval()
            macs_removed = 1.0 - count_macs(pruned, x1) / macs_base
            acc_pr = metrics(yt, predict(pruned, xt))[0]
            print(
                f"[pruned] {name} {ratio}: {macs_removed:.3f} of MACs removed, test ACC {acc_pr:.4f}",
                flush=True,
            )

            def val_agreement(m: nn.Module, ref=base_val_ig, xv=xv, sel_v=sel_v) -> float:
                return agreement_from_maps(ref, explain(m, xv, sel_v, "ig", args.ig_steps))["spearman_median"]

            arms: dict[str, tuple[nn.Module, dict[str, Any]]] = {}
            teacher = copy.deepcopy(model).eval() if args.explain_kd > 0 else None
            plain = copy.deepcopy(pruned)
            ft = finetune(plain, data["train"], data["val"], ft_epochs, cfg["batch"], seed)
            ft["val_spearman_ig"] = val_agreement(plain)
            arms["plain"] = (plain, ft)
            print(
                f"  [plain] val ACC {ft['val_acc']:.4f} val IG Spearman {ft['val_spearman_ig']:.4f}",
                flush=True,
            )
            if args.explain_kd > 0:  # the distillation alone: what the term adds beyond it
                dm = copy.deepcopy(pruned)
                ftd = finetune(dm, data["train"], data["val"], ft_epochs, cfg["batch"], seed,
                               teacher=teacher, kd_alpha=args.explain_kd)  # fmt: skip
                ftd["val_spearman_ig"] = val_agreement(dm)
                arms["distill"] = (dm, ftd)
                print(
                    f"  [distill] val ACC {ftd['val_acc']:.4f} val IG Spearman {ftd['val_spearman_ig']:.4f}",
                    flush=True,
                )
            ctx = {"pruned": pruned, "model": model, "data": data, "ft_epochs": ft_epochs, "batch": cfg["batch"],
                   "seed": seed, "teacher": teacher, "kept": kept, "args": args}  # fmt: skip
            for arm, weights, fit in (
                ("explain", args.weights, fit_explain),
                ("feature", args.feature_weights, fit_feature),
            ):
                chosen = weighted_arm(
                    arm, weights, partial(fit, ctx), val_agreement, ft["val_acc"], args.val_acc_tol
                )
                if chosen is not None:
                    arms[arm] = chosen

            preds = {arm: predict(m, xt) for arm, (m, _) in arms.items()}
            correct = {arm: ((p >= 0.5).astype(np.int64) == yt_np).astype(float) for arm, p in preds.items()}
            rows = []
            for arm, (m, ftinfo) in arms.items():
                acc = float(correct[arm].mean())
                acc_lo, acc_hi = bootstrap(correct[arm], np.mean, args.n_boot)
                if arm != "plain":
                    diff = correct[arm] - correct["plain"]
                    d, (d_lo, d_hi) = float(diff.mean()), bootstrap(diff, np.mean, args.n_boot)
                else:
                    d = d_lo = d_hi = ""
                for e in eval_explainers:
                    maps = explain(m, xe, sel_e, e, args.ig_steps)
                    agree = agreement_from_maps(base_maps[e], maps, 0.1)
                    sp = np.asarray(agree["per_image"]["spearman"], dtype=float)
                    iou = np.asarray(agree["per_image"]["top10_iou"], dtype=float)
                    dl = deletion_aucs(m, xe, maps, sel_e)
                    rows.append(
                        {
                            "dataset": name,
                            "method": "lrp" if args.ranking == "cost" else "lrp-raw",
                            "macs_removed": macs_removed,
                            "seed": seed,
                            "finetune": arm,
                            "explainer_eval": e,
                            "spearman": agree["spearman_median"],
                            "iou10": agree["top10_iou_median"],
                            "deletion_auc_base": float(base_del[e].mean()),
                            "deletion_auc_pruned": float(dl.mean()),
                            "acc": acc,
                            "spearman_lo": bootstrap(sp, np.nanmedian, args.n_boot)[0],
                            "spearman_hi": bootstrap(sp, np.nanmedian, args.n_boot)[1],
                            "iou10_lo": bootstrap(iou, np.nanmedian, args.n_boot)[0],
                            "iou10_hi": bootstrap(iou, np.nanmedian, args.n_boot)[1],
                            "deletion_auc_pruned_lo": bootstrap(dl, np.mean, args.n_boot)[0],
                            "deletion_auc_pruned_hi": bootstrap(dl, np.mean, args.n_boot)[1],
                            "acc_lo": acc_lo,
                            "acc_hi": acc_hi,
                            "acc_diff_vs_plain": d,
                            "acc_diff_lo": d_lo,
                            "acc_diff_hi": d_hi,
                            "macs_target": f"{ratio:.4f}",
                            "weight": ftinfo.get("weight", 0.0),
                            "explainer_train": train_label[arm],
                            "val_spearman_ig": ftinfo["val_spearman_ig"],
                            "val_acc": ftinfo["val_acc"],
                            "acc_pruned_no_ft": acc_pr,
                            "acc_base": acc_base,
                            "ft_epochs": ft_epochs,
                            "n_expl": len(xe),
                            "ig_steps": args.ig_steps,
                            "model": model_name(cfg),
                        }
                    )
                    r = rows[-1]
                    print(
                        f"  [{arm} / {e}] Spearman {r['spearman']:.3f} IoU10 {r['iou10']:.3f} deletion AUC "
                        f"{r['deletion_auc_base']:.3f} -> {r['deletion_auc_pruned']:.3f} ACC {acc:.4f}",
                        flush=True,
                    )
            append_rows(csv_path, rows)


REFERENCE_COLUMNS = [
    "dataset", "seed", "comparison", "explainer", "spearman", "spearman_lo", "spearman_hi",
    "iou10", "iou10_lo", "iou10_hi", "acc_a", "acc_b", "ft_epochs", "kd_alpha", "n_expl", "ig_steps", "model",
]  # fmt: skip
REFERENCE_LABELS = {
    "ig_steps": "IG at --ig_steps vs 4x the steps, same unpruned model (the explainer's own noise)",
    "other_seed": "unpruned model vs the unpruned model of the next seed (independently trained)",
    "finetune_unpruned": "unpruned model vs itself after the plain fine-tune (no pruning; last improving epoch >= 1)",
    "finetune_unpruned_kd": "the same fine-tune with logit distillation from the model itself (--explain_kd)",
}


def reference_rows(name: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    """What agreement a pruned model could be expected to reach: agreement of maps that differ WITHOUT pruning.

    Per seed, on the same first ``--n_expl`` test images and selections as ``run_dataset``: the explainer's own
    noise (IG at ``--ig_steps`` vs 4x the steps), an independently trained unpruned model (the next seed's), and the
    unpruned model after the same fine-tune the pruned ones get (plain, and with ``--explain_kd`` distillation from
    itself) -- ``include_start=False``, so the fine-tune's weights are not the start's.
    """
    cfg = DATASETS[name]
    path = run.DATA_DIR / cfg["file"]
    if not path.exists():
        print(f"[skip] {name}: {path} not present")
        return []
    data = {s: load_split(path, s, args.limit) for s in ("train", "val", "test")}
    xt, yt = data["test"]
    xe, ye = xt[: args.n_expl], yt[: args.n_expl]
    ft_epochs = args.ft_epochs if args.ft_epochs is not None else cfg["ft_epochs"]
    rows: list[dict[str, Any]] = []
    for seed in args.seeds:
        model, _ = run.base_model(name, cfg, data, args.cache, epochs=args.epochs, seed=seed)
        other, _ = run.base_model(name, cfg, data, args.cache, epochs=args.epochs, seed=(seed + 1) % 3)
        model.eval(), other.eval()
        sel = explained_selection(model, xe, ye, "label")
        acc = metrics(yt, predict(model, xt))[0]
        maps = {e: explain(model, xe, sel, e, args.ig_steps) for e in EVAL_EXPLAINERS}
        pairs: list[tuple[str, str, torch.Tensor, float]] = [
            ("ig_steps", "ig", explain(model, xe, sel, "ig", 4 * args.ig_steps), acc)
        ]
        acc_other = metrics(yt, predict(other, xt))[0]
        pairs += [
            ("other_seed", e, explain(other, xe, sel, e, args.ig_steps), acc_other) for e in EVAL_EXPLAINERS
        ]
        variants = [("finetune_unpruned", 0.0)] + (
            [("finetune_unpruned_kd", args.explain_kd)] if args.explain_kd else []
        )
        for comparison, kd in variants:
            ft = copy.deepcopy(model)
            train(ft, data["train"], data["val"], ft_epochs, cfg["batch"], seed, include_start=False,
                  teacher=copy.deepcopy(model).eval() if kd else None, kd_alpha=kd)  # fmt: skip
            ft.eval()
            acc_ft = metrics(yt, predict(ft, xt))[0]
            pairs += [
                (comparison, e, explain(ft, xe, sel, e, args.ig_steps), acc_ft) for e in EVAL_EXPLAINERS
            ]
        for comparison, e, maps_b, acc_b in pairs:
            agree = agreement_from_maps(maps[e], maps_b, 0.1)
            sp = np.asarray(agree["per_image"]["spearman"], dtype=float)
            iou = np.asarray(agree["per_image"]["top10_iou"], dtype=float)
            sp_ci, iou_ci = (
                bootstrap(sp, np.nanmedian, args.n_boot),
                bootstrap(iou, np.nanmedian, args.n_boot),
            )
            rows.append({
                "dataset": name, "seed": seed, "comparison": comparison, "explainer": e,
                "spearman": agree["spearman_median"], "spearman_lo": sp_ci[0], "spearman_hi": sp_ci[1],
                "iou10": agree["top10_iou_median"], "iou10_lo": iou_ci[0], "iou10_hi": iou_ci[1],
                "acc_a": acc, "acc_b": acc_b, "ft_epochs": ft_epochs if comparison.startswith("finetune") else "",
                "kd_alpha": args.explain_kd if comparison == "finetune_unpruned_kd" else "",
                "n_expl": len(xe), "ig_steps": args.ig_steps, "model": model_name(cfg),
            })  # fmt: skip
            print(f"  [{name} s{seed} {comparison} / {e}] Spearman {rows[-1]['spearman']:.3f} IoU10 "
                  f"{rows[-1]['iou10']:.3f} ACC {acc:.3f} -> {acc_b:.3f}", flush=True)  # fmt: skip
    return rows


def reference_table(rows: list[dict[str, str]]) -> list[str]:
    """Markdown: the reference comparisons, mean over seeds (per-seed rows are in the CSV)."""
    groups: dict[tuple[str, str, str], list[dict[str, str]]] = {}
    for r in rows:
        groups.setdefault((r["dataset"], r["comparison"], r["explainer"]), []).append(r)
    lines = [
        "| dataset | comparison | explainer | seeds | Spearman (per seed) | top-10 % IoU (per seed) | ACC a -> b |",
        "|---|---|---|---|---|---|---|",
    ]
    for (d, c, e), g in groups.items():
        mean = lambda k, g=g: float(np.mean([float(x[k]) for x in g]))  # noqa: E731
        per = lambda k, g=g: ", ".join(_f(x[k], 2) for x in g)  # noqa: E731
        lines.append(
            f"| {d} | {c} | {e} | {len(g)} | {mean('spearman'):.3f} ({per('spearman')}) | "
            f"{mean('iou10'):.3f} ({per('iou10')}) | {mean('acc_a'):.3f} -> {mean('acc_b'):.3f} |"
        )
    lines += [""] + [f"- `{k}`: {v}" for k, v in REFERENCE_LABELS.items()]
    return lines


def plot_agreement(arm_rows: list[dict[str, str]], reference: list[dict[str, str]], out: Path) -> Path | None:
    """One panel per dataset: mean Spearman (bars) and top-10 % IoU (dots) of the pruned arms at each MACs budget
    beside the no-pruning references (dashed: the unpruned network after the same plain fine-tune), IG and LRP."""
    datasets = list(dict.fromkeys(r["dataset"] for r in arm_rows))
    if not datasets:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = [
        a for a in ("plain", "distill", "explain", "feature") if any(r["finetune"] == a for r in arm_rows)
    ]
    fig, axes = plt.subplots(1, len(datasets), figsize=(4.6 * len(datasets), 3.8), sharey=True, squeeze=False)
    mean = lambda rs, k: float(np.mean([float(r[k]) for r in rs])) if rs else float("nan")  # noqa: E731
    for ax, d in zip(axes[0], datasets):
        budgets = sorted({r["macs_target"] for r in arm_rows if r["dataset"] == d})
        labels = []
        for e_i, e in enumerate(EVAL_EXPLAINERS):
            for b in budgets:
                labels.append(f"{e} {float(b):.0%}")
                x0 = len(labels) - 1
                for a_i, a in enumerate(arms):
                    sel = [
                        r
                        for r in arm_rows
                        if (r["dataset"], r["macs_target"], r["finetune"], r["explainer_eval"])
                        == (d, b, a, e)
                    ]
                    width = 0.8 / len(arms)
                    x = x0 + (a_i - (len(arms) - 1) / 2) * width
                    ax.bar(
                        x,
                        mean(sel, "spearman"),
                        0.96 * width,
                        color=f"C{a_i}",
                        label=a if (e_i, b) == (0, budgets[0]) else None,
                    )
                    ax.plot(x, mean(sel, "iou10"), "k.", ms=5)
            ref = [
                r
                for r in reference
                if (r["dataset"], r["comparison"], r["explainer"]) == (d, "finetune_unpruned", e)
            ]
            if ref:
                xs = (len(labels) - len(budgets) - 0.4, len(labels) - 0.6)
                ax.plot(
                    xs,
                    [mean(ref, "spearman")] * 2,
                    "k--",
                    lw=1,
                    label="unpruned + same fine-tune" if e_i == 0 else None,
                )
                ax.plot(xs, [mean(ref, "iou10")] * 2, "k:", lw=1)
        ax.axhline(0.9, color="r", lw=0.6)
        ax.axhline(0.7, color="r", lw=0.6, ls=":")
        ax.set_xticks(range(len(labels)), labels, fontsize=7)
        ax.set_title(d)
    axes[0][0].set_ylabel("Spearman (bars) / top-10 % IoU (dots)")
    fig.legend(*axes[0][0].get_legend_handles_labels(), fontsize=7, loc="upper right", ncol=4)
    fig.suptitle("pruned vs unpruned maps, mean over seeds (red: the goals 0.9 / 0.7)", fontsize=9, x=0.3)
    fig.tight_layout(rect=(0, 0, 1, 0.93))
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out


VERDICT_MARK = "<!-- verdict: kept when the tables are regenerated -->"
PLOTTED = ("explanations_kd.csv", "explanations_feature.csv")
GOALS = "Spearman >= 0.9, top-10 % IoU >= 0.7, deletion AUC no worse than the unpruned model's, ACC within 0.5 pt of plain"


def _f(v: str, digits: int = 3) -> str:
    try:
        x = float(v)
    except (TypeError, ValueError):
        return ""
    return "n/a" if math.isnan(x) else f"{x:.{digits}f}"


def mean_goal_checks(goal_rows: list[tuple[str, dict[str, str]]]) -> list[str]:
    """The issue's goals on the seed means (how the issue states them), per file, setting, arm and explainer;
    Spearman to 4 decimals so a mean at the threshold is not rounded over it."""
    groups: dict[tuple[str, ...], list[dict[str, str]]] = {}
    for name, r in goal_rows:
        key = (name, r["dataset"], r["macs_target"], r["finetune"], r["explainer_eval"])
        groups.setdefault(key, []).append(r)
    groups = {k: g for k, g in groups.items() if len(g) >= 3}
    if not groups:
        return []
    lines = [
        "",
        "### Goal checks on the means of 3 or more seeds",
        "",
        "| file | dataset | MACs target | arm | explainer | seeds | Spearman | >= 0.9 | IoU | >= 0.7 | deletion AUC base -> "
        "pruned | no worse | ACC - plain (pt) | within 0.5 pt |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for (name, d, m, arm, e), g in groups.items():
        mean = {k: float(np.mean([float(x[k]) for x in g])) for k in
                ("spearman", "iou10", "deletion_auc_base", "deletion_auc_pruned", "acc_diff_vs_plain")}  # fmt: skip
        yes = lambda ok: "**yes**" if ok else "no"  # noqa: E731
        lines.append(
            f"| {name} | {d} | {_f(m, 2)} | {arm} | {e} | {len(g)} | {mean['spearman']:.4f} | "
            f"{yes(mean['spearman'] >= 0.9)} | {mean['iou10']:.3f} | {yes(mean['iou10'] >= 0.7)} | "
            f"{mean['deletion_auc_base']:.4f} -> {mean['deletion_auc_pruned']:.4f} | "
            f"{yes(mean['deletion_auc_pruned'] <= mean['deletion_auc_base'])} | {100 * mean['acc_diff_vs_plain']:+.1f} | "
            f"{yes(mean['acc_diff_vs_plain'] >= -0.005)} |"
        )
    return lines


def summarize(csv_paths: list[Path], md_path: Path, commands: list[str]) -> str:
    """``explanations.md``: one table per CSV (its command above it), the goal checks of every ``explain`` row,
    and the hand-written verdict kept from the existing file (everything after ``VERDICT_MARK``)."""
    lines = [
        "# Explanation-preserving fine-tuning (issue #16): plain vs explanation-consistency fine-tune",
        "",
        "Generated by `benchmarks/explanations.py --summary` from the CSVs below (module docstring: the protocol).",
        "LRP-pruned by MACs, BatchNorm re-calibrated, the same fine-tune (run.py's recipe and `ft_epochs`): `plain`,",
        "`explain` with `weight x` the consistency term (gradient x input maps, or few-step IG where a file's",
        "`explainer_train` says `ig`; `+kd0.9`: with logit distillation from the unpruned network, alpha 0.9, T 4;",
        "weight chosen on validation IG agreement), or `distill` (the distillation alone, the control of `+kd`).",
        "Agreement of pruned vs unpruned maps (median over the first 32 test images) with IG and LRP, never the",
        "explainer the term trains on; deletion AUC: mean, lower = more faithful; ACC on the whole test set.",
        "Brackets: 95 % bootstrap intervals (images; ACC difference paired over test images).",
        "",
        f"Goals of the issue: {GOALS}.",
    ]
    goal_rows = []
    for csv_path, command in zip(csv_paths, commands):
        rows = read_rows(csv_path)
        if not rows:
            continue
        lines += ["", f"## {csv_path.name}", "", "```", command, "```", ""]
        if "comparison" in rows[0]:  # a --reference file
            lines += reference_table(rows)
            continue
        lines += [
            "| dataset | seed | MACs removed | fine-tune | weight | explainer | Spearman | top-10 % IoU | deletion AUC base "
            "-> pruned | ACC | ACC - plain | val IG Spearman |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in rows:
            diff = (
                f"{_f(r['acc_diff_vs_plain'])} [{_f(r['acc_diff_lo'])}, {_f(r['acc_diff_hi'])}]"
                if r["acc_diff_vs_plain"]
                else ""
            )
            lines.append(
                f"| {r['dataset']} | {r['seed']} | {_f(r['macs_removed'], 2)} | {r['finetune']} | {_f(r['weight'], 1)} | "
                f"{r['explainer_eval']} | {_f(r['spearman'])} [{_f(r['spearman_lo'])}, {_f(r['spearman_hi'])}] | "
                f"{_f(r['iou10'])} [{_f(r['iou10_lo'])}, {_f(r['iou10_hi'])}] | "
                f"{_f(r['deletion_auc_base'])} -> {_f(r['deletion_auc_pruned'])} "
                f"[{_f(r['deletion_auc_pruned_lo'])}, {_f(r['deletion_auc_pruned_hi'])}] | "
                f"{_f(r['acc'])} [{_f(r['acc_lo'])}, {_f(r['acc_hi'])}] | {diff} | {_f(r['val_spearman_ig'])} |"
            )
            if r["finetune"] in ("explain", "feature"):
                goal_rows.append((csv_path.name, r))
        seeds = sorted({r["seed"] for r in rows})
        if len(seeds) > 1:  # each seed prunes its own base model: the mean over seeds, per setting
            groups: dict[tuple, list] = {}
            for r in rows:
                key = (r["dataset"], r["macs_target"], r["finetune"], r["explainer_eval"])
                groups.setdefault(key, []).append(r)
            lines += [
                "",
                f"Mean over seeds ({', '.join(seeds)}; settings with fewer seeds say so):",
                "",
                "| dataset | MACs removed | fine-tune | explainer | seeds | Spearman | top-10 % IoU | deletion AUC base -> "
                "pruned | ACC | ACC - plain |",
                "|---|---|---|---|---|---|---|---|---|---|",
            ]
            for (d, m, ft, e), g in groups.items():
                mean = lambda k, g=g: float(np.mean([float(x[k]) for x in g if x[k] != ""]))  # noqa: E731
                diff = f"{_f(mean('acc_diff_vs_plain'))}" if ft != "plain" else ""
                lines.append(
                    f"| {d} | {_f(m, 2)} | {ft} | {e} | {len(g)} | {_f(mean('spearman'))} | {_f(mean('iou10'))} | "
                    f"{_f(mean('deletion_auc_base'))} -> {_f(mean('deletion_auc_pruned'))} | {_f(mean('acc'))} | {diff} |"
                )
    arm_rows = list(  # the plain / distill arms of a later file repeat the same runs: keep the first
        {
            (r["dataset"], r["seed"], r["macs_target"], r["finetune"], r["explainer_eval"]): r
            for c in reversed(csv_paths)
            if c.name in PLOTTED
            for r in read_rows(c)
        }.values()
    )
    ref_rows = [r for c in csv_paths for r in read_rows(c) if "comparison" in r]
    png = plot_agreement(arm_rows, ref_rows, md_path.with_name("explanations_agreement.png"))
    if png is not None:
        lines += [
            "",
            f"Plot of {' and '.join(f'`{n}`' for n in PLOTTED)} beside the references: `{png.name}`.",
        ]
    if goal_rows:
        lines += [
            "",
            "## Goal checks (explain and feature rows)",
            "",
            "| file | dataset | seed | MACs removed | explainer | Spearman >= 0.9 | IoU >= 0.7 | deletion AUC no worse | ACC within 0.5 pt |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for name, r in goal_rows:
            ok = {
                "sp": float(r["spearman"]) >= 0.9,
                "iou": float(r["iou10"]) >= 0.7,
                "del": float(r["deletion_auc_pruned"]) <= float(r["deletion_auc_base"]),
                "acc": float(r["acc_diff_vs_plain"]) >= -0.005,
            }
            lines.append(
                f"| {name} | {r['dataset']} | {r['seed']} | {_f(r['macs_removed'], 2)} | {r['explainer_eval']} | "
                + " | ".join("yes" if v else "no" for v in ok.values())
                + " |"
            )
    lines += mean_goal_checks(goal_rows)
    verdict = ""
    if md_path.exists():
        old = md_path.read_text()
        if VERDICT_MARK in old:
            verdict = old.split(VERDICT_MARK, 1)[1].strip()
    lines += ["", VERDICT_MARK, "", verdict or "## Verdict\n\n(to be written)"]
    text = "\n".join(lines) + "\n"
    md_path.write_text(text)
    return text


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--datasets", nargs="+", default=["breastmnist"], choices=list(DATASETS))
    p.add_argument("--ratios", nargs="+", type=float, default=[0.5, 0.7], help="fractions of MACs removed")
    p.add_argument("--seeds", nargs="+", type=int, default=[0])
    p.add_argument(
        "--weights",
        nargs="*",
        type=float,
        default=[0.3, 1.0, 3.0],
        help="consistency weights tried (none: no explain arm)",
    )
    p.add_argument(
        "--feature_weights",
        nargs="*",
        type=float,
        default=[],
        help="kept-channel feature distillation weights tried in a 'feature' arm (chosen on validation as the "
        "explain arm's; with --explain_kd also logit distillation); none: no feature arm",
    )
    p.add_argument(
        "--val_acc_tol", type=float, default=0.01, help="validation ACC a weight may lose vs plain"
    )
    p.add_argument(
        "--train_explainer",
        default="grad_x_input",
        choices=["grad_x_input", "ig"],
        help="map the consistency term trains on (never an evaluation explainer of the run)",
    )
    p.add_argument("--train_ig_steps", type=int, default=4, help="IG steps of the 'ig' training explainer")
    p.add_argument(
        "--explain_kd",
        type=float,
        default=0.0,
        help="logit distillation from the unpruned model in the explain arm (run.train's kd_alpha, T = 4); "
        "> 0 adds a 'distill' arm (distillation only) as its control",
    )
    p.add_argument(
        "--ranking",
        default="cost",
        choices=["cost", "raw"],
        help="channels ranked for the MACs budget by LRP relevance per MACs saved (cost, the default) or by "
        "relevance alone (raw; rows say method lrp-raw)",
    )
    p.add_argument("--calib", type=int, default=256)
    p.add_argument("--n_expl", type=int, default=32)
    p.add_argument("--n_val", type=int, default=32)
    p.add_argument("--ig_steps", type=int, default=16)
    p.add_argument("--n_boot", type=int, default=1000)
    p.add_argument(
        "--epochs", type=int, default=None, help="override the base epochs (a different cache entry)"
    )
    p.add_argument("--ft_epochs", type=int, default=None, help="override DATASETS ft_epochs")
    p.add_argument("--limit", type=int, default=None, help="first N images of each split (smoke runs)")
    p.add_argument(
        "--cache", type=Path, default=run.CACHE, help="run.py's base-model cache (read; written if absent)"
    )
    p.add_argument("--out", type=Path, default=RESULTS / "explanations.csv")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument(
        "--summary",
        nargs="*",
        metavar="CSV=COMMAND",
        default=None,
        help="only write explanations.md from CSV files, each with the command that produced it",
    )
    p.add_argument("--md", type=Path, default=RESULTS / "explanations.md")
    p.add_argument(
        "--reference",
        action="store_true",
        help="only measure the agreement reached without pruning (reference_rows) into "
        "explanations_reference.csv (or --out)",
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.summary is not None:
        pairs = [item.split("=", 1) for item in args.summary]
        summarize([Path(c) for c, _ in pairs], args.md, [cmd for _, cmd in pairs])
        print(f"wrote {args.md}")
        return 0
    torch.set_num_threads(args.threads)
    if args.reference:
        out = args.out if args.out != RESULTS / "explanations.csv" else RESULTS / "explanations_reference.csv"
        for name in args.datasets:
            rows = reference_rows(name, args)
            new = not out.exists()
            with out.open("a", newline="") as f:
                w = csv.DictWriter(f, REFERENCE_COLUMNS)
                if new:
                    w.writeheader()
                w.writerows(
                    {k: (f"{v:.4f}" if isinstance(v, float) else v) for k, v in r.items()} for r in rows
                )
        print(f"wrote {out}")
        return 0
    for name in args.datasets:
        run_dataset(name, args, args.out)
    print(f"wrote {args.out}")
    return 0


__all__ = ["finetune", "main", "make_model", "summarize"]

if __name__ == "__main__":
    raise SystemExit(main())
