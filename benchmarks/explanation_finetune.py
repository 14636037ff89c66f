"""Quick real-data check of explanation-preserving fine-tuning (issue #16): plain vs explanation-consistency.

BreastMNIST (28x28, 2 classes): a small MONAI ResNet-18 trained ``--epochs`` epochs, pruned to remove 50 % of
its MACs (LRP relevance, BatchNorm re-calibrated), then fine-tuned ``--ft_epochs`` epochs in a MONAI
``SupervisedTrainer`` twice from the same pruned weights and the same seed: plain cross-entropy, and with
``ExplanationConsistencyHandler`` (gradient x input maps, teacher = the unpruned network). Agreement with the
unpruned network is measured with explainers the student was *not* trained on: captum IG (``--ig_steps``
steps) and LRP, median Spearman over ``--n_expl`` held-out test images; ACC / AUC on the whole test set.

    python benchmarks/explanation_finetune.py            # writes benchmarks/results/explanations_quick.csv

No timing is recorded (shared machine). Skips with a message when the data file is absent.
"""

from __future__ import annotations

import argparse
import copy
import csv
import sys
from pathlib import Path

import numpy as np
import torch
from monai.engines import SupervisedTrainer
from torch import nn
from torch.utils.data import DataLoader

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from run import load_split, make_model, metrics, predict, train  # noqa: E402

from monai_iaprune import channel_relevance, prune, recalibrate_batchnorm  # noqa: E402
from monai_iaprune.handlers import ExplanationConsistencyHandler  # noqa: E402
from monai_iaprune.relevance.differentiable_maps import gradient_x_input  # noqa: E402
from monai_iaprune.report.explanations import agreement_from_maps, explanation_agreement  # noqa: E402

DATA = ROOT.parent.parent / "shared" / "data" / "medmnist" / "breastmnist.npz"
FIELDS = [
    "dataset",
    "arm",
    "explainer_train",
    "weight",
    "seed",
    "params",
    "macs_removed",
    "test_acc",
    "test_auc",
    "ig_spearman",
    "ig_top10_iou",
    "lrp_spearman",
    "gxi_spearman",
    "n_expl",
]


def _loader(x: torch.Tensor, y: torch.Tensor, batch: int, seed: int) -> DataLoader:
    items = [{"image": xi, "label": int(yi)} for xi, yi in zip(x, y)]
    return DataLoader(items, batch_size=batch, shuffle=True, generator=torch.Generator().manual_seed(seed))


def finetune(
    model: nn.Module,
    train_xy: tuple,
    epochs: int,
    seed: int,
    handler: ExplanationConsistencyHandler | None,
) -> nn.Module:
    """Adam (lr 1e-3) fine-tuning in a MONAI SupervisedTrainer, optionally with the consistency handler."""
    torch.manual_seed(seed)
    trainer = SupervisedTrainer(
        device=torch.device("cpu"),
        max_epochs=epochs,
        train_data_loader=_loader(*train_xy, 32, seed),
        network=model,
        optimizer=torch.optim.Adam(model.parameters(), lr=1e-3),
        loss_function=nn.CrossEntropyLoss(),
        train_handlers=[handler] if handler is not None else None,
    )
    trainer.run()
    return model.eval()


def evaluate(base: nn.Module, model: nn.Module, test_xy: tuple, n_expl: int, ig_steps: int) -> dict:
    acc, auc = metrics(test_xy[1], predict(model, test_xy[0]))
    xe, ye = test_xy[0][:n_expl], test_xy[1][:n_expl]
    ig = explanation_agreement(base, model, (xe, ye), "ig", max_samples=None, n_steps=ig_steps)
    try:
        lrp = explanation_agreement(base, model, (xe, ye), "lrp", max_samples=None)["spearman_median"]
    except Exception as e:  # LRP is optional here: the IG column is the check
        print(f"LRP agreement unavailable: {e}")
        lrp = float("nan")
    # the training explainer, for contrast: agreement on what the consistency term fitted
    sel = nn.functional.one_hot(ye, 2).float()
    gxi = agreement_from_maps(
        gradient_x_input(base, xe, lambda o: sel)[0].sum(1).detach(),
        gradient_x_input(model, xe, lambda o: sel)[0].sum(1).detach(),
    )["spearman_median"]
    return {
        "gxi_spearman": gxi,
        "params": sum(p.numel() for p in model.parameters()),
        "test_acc": acc,
        "test_auc": auc,
        "ig_spearman": ig["spearman_median"],
        "ig_top10_iou": ig["top10_iou_median"],
        "lrp_spearman": lrp,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, default=DATA)
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--ft_epochs", type=int, default=2)
    p.add_argument("--weight", type=float, default=1.0, help="explanation-consistency weight")
    p.add_argument("--ratio", type=float, default=0.5, help="fraction of MACs removed")
    p.add_argument("--n_expl", type=int, default=32)
    p.add_argument("--ig_steps", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "explanations_quick.csv")
    args = p.parse_args(argv)
    if not args.data.exists():
        print(f"skipped: {args.data} not found (see shared/data/README.md)")
        return 0
    torch.set_num_threads(2)
    tr, va, te = (load_split(args.data, s) for s in ("train", "val", "test"))

    torch.manual_seed(args.seed)
    base = make_model(2, (8, 16, 32, 64), stem_stride=1)
    train(base, tr, va, args.epochs, 32, seed=args.seed)
    base.eval()
    rows = [{"arm": "unpruned", **evaluate(base, base, te, args.n_expl, args.ig_steps), "macs_removed": 0.0}]

    rel = channel_relevance(base, _loader(*tr, 32, args.seed), "lrp", max_batches=4, progress=False)
    pruned = copy.deepcopy(base)
    res = prune(pruned, rel, args.ratio, target="macs", example_inputs=tr[0][:1])
    recalibrate_batchnorm(pruned, _loader(*tr, 32, args.seed), max_batches=8)
    pruned.eval()
    macs_removed = 1.0 - res.macs_after / res.macs_before
    rows.append({"arm": "pruned", **evaluate(base, pruned, te, args.n_expl, args.ig_steps)})

    plain = finetune(copy.deepcopy(pruned), tr, args.ft_epochs, args.seed, None)
    rows.append({"arm": "finetune_plain", **evaluate(base, plain, te, args.n_expl, args.ig_steps)})
    handler = ExplanationConsistencyHandler(
        args.weight, explainer="grad_x_input", teacher=copy.deepcopy(base)
    )
    consistent = finetune(copy.deepcopy(pruned), tr, args.ft_epochs, args.seed, handler)
    rows.append(
        {
            "arm": "finetune_consistency",
            "explainer_train": "grad_x_input",
            "weight": args.weight,
            **evaluate(base, consistent, te, args.n_expl, args.ig_steps),
        }
    )

    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("w", newline="") as f:
        w = csv.DictWriter(f, FIELDS)
        w.writeheader()
        for r in rows:
            r.setdefault("macs_removed", macs_removed)
            r.update(dataset="breastmnist", seed=args.seed, n_expl=args.n_expl)
            w.writerow(
                {k: (f"{v:.4f}" if isinstance(v, float) and not np.isnan(v) else v) for k, v in r.items()}
            )
    for r in rows:
        print(
            f"{r['arm']:>22}: ACC {r['test_acc']:.3f} AUC {r['test_auc']:.3f} "
            f"IG Spearman {r['ig_spearman']:.3f} top10 IoU {r['ig_top10_iou']:.3f} LRP Spearman {r['lrp_spearman']:.3f} "
            f"grad x input Spearman {r['gxi_spearman']:.3f}"
        )
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
