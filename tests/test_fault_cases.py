"""The fault catalogue (benchmarks/fault_cases.py): its classifier, and its representative subset ends in no bad outcome."""

from __future__ import annotations

import csv
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT

SCRIPT = ROOT / "benchmarks" / "fault_cases.py"


@pytest.fixture(scope="module")
def fc():
    spec = importlib.util.spec_from_file_location("fault_cases", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["fault_cases"] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_catalogue_size_and_areas(fc):
    areas = {c.area for c in fc.CASES}
    assert len(fc.CASES) >= 110 and areas == {"api", "data", "checkpoints", "cli", "concurrency", "kills"}
    assert len({c.id for c in fc.CASES}) == len(fc.CASES)
    assert 8 <= len(fc.select(quick=True)) <= 12


def test_classifier_tells_the_outcomes_apart(fc, tmp_path):
    ctx = fc.Ctx(tmp_path, fc.Shared(tmp_path))
    kept = tmp_path / "kept.bin"
    kept.write_bytes(b"original")

    def fail(msg):
        raise ValueError(msg)

    assert fc.expect_error(ctx, lambda: fail("bad ratio 1.5"), "ratio", "1.5").outcome == "clear_error"
    assert fc.expect_error(ctx, lambda: fail("something broke"), "ratio").outcome == "raw_error"
    assert fc.expect_error(ctx, lambda: None, "ratio").outcome == "silent_wrong"
    assert (
        fc.expect_error(ctx, lambda: kept.write_bytes(b"changed") and fail("ratio"), "ratio").outcome
        == "lost_file"
    )
    kept.write_bytes(b"original")
    assert fc.expect_ok(ctx, lambda: 1, lambda r: None).outcome == "handled"
    assert fc.expect_ok(ctx, lambda: 1, lambda r: "wrong size").outcome == "silent_wrong"
    assert fc.expect_ok(ctx, lambda: kept.unlink(), lambda r: None).outcome == "lost_file"
    # a payload that runs code when unpickled leaves the marker the runner looks for
    import pickle

    pickle.loads(pickle.dumps(fc.RunsCode(ctx.marker)))
    assert ctx.marker.exists()


def test_quick_subset_has_no_bad_outcome(tmp_path):
    """About ten representative cases (API, data, checkpoint, command line, two runs at once, a SIGKILL + resume)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--out", str(tmp_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    rows = list(csv.DictReader((tmp_path / "fault_cases.csv").open()))
    assert {r["area"] for r in rows} == {"api", "data", "checkpoints", "cli", "concurrency", "kills"}, (
        proc.stdout
    )
    bad = [r for r in rows if r["outcome"] not in ("clear_error", "handled")]
    assert not bad, bad
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "| all |" in Path(tmp_path / "fault_cases.md").read_text()
