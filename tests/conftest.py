"""Shared test fixtures: real data location, tiny deterministic settings."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
DATA_DIR = Path(os.environ.get("MONAI_IAPRUNE_DATA", ROOT.parent / "shared" / "data"))
MEDMNIST = DATA_DIR / "medmnist"
NIFTI = DATA_DIR / "nifti"

if "OMP_NUM_THREADS" not in os.environ:  # respect a caller that limits threads (shared machines)
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def require_file(path: Path) -> Path:
    """Skip the test with a reason when a real-data file is absent."""
    if not path.exists():
        pytest.skip(f"real data not present: {path} (see shared/data/README.md)")
    return path
