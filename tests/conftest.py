"""Shared fixtures: the real-data folder, a tiny phantom data set, and GPU skipping."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def real_data_dir() -> Path:
    """../shared/data/real next to the repo (or $RSNA_REAL_DATA)."""
    env = os.environ.get("RSNA_REAL_DATA")
    return Path(env) if env else REPO.parent / "shared" / "data" / "real"


@pytest.fixture(scope="session")
def real_dir() -> Path:
    path = real_data_dir()
    if not (path / "MANIFEST.csv").is_file():
        pytest.skip(f"real DICOM files not found at {path} (set RSNA_REAL_DATA or put ../shared beside the repo)")
    return path


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture()
def one_thread():
    """Tiny CPU models run fastest on one intra-op thread; on 2 shared cores, 2 threads oversubscribe (8-20x slower)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
