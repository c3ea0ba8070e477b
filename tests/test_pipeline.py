"""Smoke run of the whole notebook chain on a tiny phantom, through the runner, checking the external contract."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from lib.tasks.ich.labels import SUBTYPES
from lib.tasks.ich.phantom import generate
from test_figures import check_run_figures

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("phantom") / "data"
    generate(out, studies=8, seed=5, size=64, test_frac=0.25, slices=(8, 12), workers=1, progress=False)
    return out


def _check_kaggle_csv(path: Path, sample: pd.DataFrame) -> pd.DataFrame:
    sub = pd.read_csv(path)
    assert list(sub.columns) == ["ID", "Label"]
    assert set(sub["ID"]) == set(sample["ID"]) and len(sub) == len(sample)
    assert sub["Label"].between(0, 1).all() and sub["Label"].notna().all()
    images = sub["ID"].str.rsplit("_", n=1).str[0]
    assert (images.value_counts() == len(SUBTYPES)).all()
    return sub


@pytest.mark.slow
def test_smoke_chain_writes_the_contract(tiny_data, tmp_path):
    out = tmp_path / "run"
    env = dict(os.environ, MPLBACKEND="Agg")  # as the Makefile exports it: the kernels must still draw inline
    proc = subprocess.run([sys.executable, "-m", "lib.run", str(REPO / "params" / "ich" / "smoke.yaml"), "--data",
                           str(tiny_data), "--out", str(out)], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    check_run_figures(out)
    sample = pd.read_csv(tiny_data / "stage_2_sample_submission.csv")
    for name in ("submission.csv", "predictions/test_cnn.csv", "predictions/test_seq.csv"):
        _check_kaggle_csv(out / name, sample)
    metrics = json.loads((out / "metrics.json").read_text())
    for key in ("oof_cnn_logloss", "oof_seq_logloss", "oof_ensemble_logloss"):
        assert np.isfinite(metrics[key]), key
        for s in SUBTYPES:
            assert np.isfinite(metrics[f"{key}_{s}"])
    manifest = json.loads((out / "manifest.json").read_text())
    assert all(s["status"] == "ok" for s in manifest["stages"])
    assert {s["notebook"] for s in manifest["stages"]} >= {"notebooks/02_train_cnn_fold1.ipynb",
                                                           "notebooks/06_report.ipynb"}
    assert (out / "notebooks" / "00_eda.ipynb").exists()
    # the OOF table the demo prints
    table = subprocess.run([sys.executable, "-m", "lib.report", str(out)], cwd=REPO, capture_output=True, text=True)
    assert table.returncode == 0 and "ensemble" in table.stdout
    compare = subprocess.run([sys.executable, "-m", "lib.report", "--compare", str(out)], cwd=REPO,
                             capture_output=True, text=True)
    assert compare.returncode == 0 and "resnet18" in compare.stdout and "smoke" in compare.stdout


@pytest.mark.slow
def test_runner_stops_on_a_failing_stage(tiny_data, tmp_path):
    """A stage that cannot run (no cache recorded yet) fails the run with a non-zero exit naming the notebook."""
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "lib.run", str(REPO / "params" / "ich" / "smoke.yaml"), "--data",
                           str(tiny_data), "--out", str(out), "--stages", "train_cnn"],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 1
    assert "02_train_cnn.ipynb" in proc.stderr and "cache" in proc.stderr
