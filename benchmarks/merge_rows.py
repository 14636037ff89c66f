"""Merge the output folders of separate ``run.py`` processes (e.g. ``device_grid.sh``'s, one per criterion, unpacked
from ``grid.tgz``) into ``benchmarks/results`` and ``benchmarks/cache``.

Usage (from the repository root)::

    python benchmarks/merge_rows.py /tmp/grid [/tmp/grid2 ...]     # each holds <name>/accuracy.csv ... and cache/
    python benchmarks/run.py --report-only                         # tables, curves, goals from the merged rows

Rows already in the target CSV (same dataset, method, ratio, seed) are kept and the incoming duplicate is
dropped, as ``run.py`` itself skips rows it has; run_info.json entries and base_models.json entries are added;
the cached base models and test predictions (``cache/`` and every ``<name>/preds/``) are copied (an existing
file is kept). The target CSV is replaced
atomically.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import CACHE, COLUMNS, RESULTS, read_rows  # noqa: E402


def _key(r: dict[str, str]) -> tuple[str, str, str, str]:
    return r["dataset"], r["method"], f"{float(r['params_removed']):.2f}", r["seed"]


def merge(sources: list[Path], out: Path = RESULTS, cache: Path = CACHE) -> int:
    target = out / "accuracy.csv"
    rows = read_rows(target)
    have = {_key(r) for r in rows}
    added = 0
    info_path = out / "run_info.json"
    run_info = json.loads(info_path.read_text()) if info_path.exists() else {}
    base_path = out / "base_models.json"
    base = json.loads(base_path.read_text()) if base_path.exists() else {}
    for src in sources:
        for f in sorted(src.glob("*/accuracy.csv")):
            for r in read_rows(f):
                if _key(r) not in have:
                    have.add(_key(r))
                    rows.append(r)
                    added += 1
        for f in sorted(src.glob("*/run_info.json")):
            run_info.setdefault("runs", []).extend(json.loads(f.read_text()).get("runs", []))
        for f in sorted(src.glob("*/base_models.json")):
            for k, v in json.loads(f.read_text()).items():
                base.setdefault(k, v)
        # the cache (base models, and predictions of runs that wrote to it) and each run's own preds/ folder
        copies = [(f, cache / f.relative_to(src / "cache")) for f in (src / "cache").rglob("*")]
        copies += [(f, cache / "preds" / f.name) for f in src.glob("*/preds/*")]
        for f, dst in copies:
            if f.is_file() and not dst.exists():
                dst.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(f, dst)
    out.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out, prefix=".accuracy.csv.", suffix=".tmp")
    with os.fdopen(fd, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=COLUMNS, extrasaction="ignore", restval="")
        w.writeheader()
        w.writerows(rows)
    os.replace(tmp, target)
    info_path.write_text(json.dumps(run_info, indent=1))
    base_path.write_text(json.dumps(base, indent=1))
    return added


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("sources", nargs="+", type=Path)
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--cache", type=Path, default=CACHE)
    a = p.parse_args(argv)
    print(f"{merge(a.sources, a.out, a.cache)} rows added to {a.out / 'accuracy.csv'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
