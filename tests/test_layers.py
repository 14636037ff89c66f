"""The package's import-linter contracts (.importlinter) hold, and an upward import breaks them."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT

LINT = Path(sys.executable).parent / "lint-imports"
pytestmark = pytest.mark.skipif(
    not LINT.exists(), reason="import-linter is not installed (pip install -e .[test])"
)


def _lint(root: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(root))
    return subprocess.run(
        [str(LINT), "--config", str(root / ".importlinter"), "--no-cache"],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_contracts_kept():
    proc = _lint(ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert "broken" in proc.stdout and "0 broken" in proc.stdout


def test_an_upward_import_breaks_the_layers(tmp_path):
    copy = tmp_path / "repo"
    shutil.copytree(
        ROOT / "monai_iaprune", copy / "monai_iaprune", ignore=shutil.ignore_patterns("__pycache__")
    )
    shutil.copy(ROOT / ".importlinter", copy / ".importlinter")
    ddp = copy / "monai_iaprune" / "utils" / "ddp.py"
    ddp.write_text(ddp.read_text() + "\nfrom monai_iaprune.handlers import relevance_collector  # noqa\n")
    proc = _lint(copy)
    assert proc.returncode != 0, proc.stdout[-3000:]
    assert "monai_iaprune.utils.ddp -> monai_iaprune.handlers.relevance_collector" in proc.stdout, (
        proc.stdout[-3000:]
    )
