"""Smoke run of the whole notebook chain on a tiny phantom, through the runner, checking the external contract."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest
from pydicom.encaps import encapsulate
from pydicom.uid import RLELossless

from lib.io.dicom import DicomError, lenient_reading, read_hu
from lib.tasks.ich.labels import SUBTYPES
from lib.tasks.ich.phantom import generate
from test_figures import check_run_figures

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("phantom") / "data"
    generate(out, studies=8, seed=5, size=64, test_frac=0.25, slices=(8, 12), workers=1, progress=False)
    spoil(out)
    return out


def _readable(folder: Path) -> list:
    """The folder's files that decode (the phantom has its own bad files; spoil good ones)."""
    good = []
    for f in sorted(folder.glob("*.dcm")):
        try:
            read_hu(f)
            good.append(f)
        except DicomError:
            pass
    return good


@lenient_reading()
def spoil(root: Path) -> None:
    """What a careless or hostile download holds (issue 11), none of which may stop the run: a truncated test
    file, a labelled train file whose pixel data does not decode (passes the header check, the cache rejects
    it), and train files whose SOPInstanceUID is a path (`../../../../pwned`, `ID_sub/dir/x`)."""
    test = _readable(root / "stage_2_test")[0]
    test.write_bytes(test.read_bytes()[:-200])
    train = _readable(root / "stage_2_train")
    ds = pydicom.dcmread(train[0])  # RLE-compressed garbage: the header pass accepts it, decoding fails
    ds.file_meta.TransferSyntaxUID = RLELossless
    ds.PixelData = encapsulate([b"\x01" * 64])
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True
    ds.save_as(train[0], enforce_file_format=True)
    for name, sop in (("ID_fff0001", "../../../../pwned"), ("ID_fff0002", "ID_sub/dir/x")):
        ds = pydicom.dcmread(train[1])
        ds.SOPInstanceUID = sop
        ds.save_as(root / "stage_2_train" / f"{name}.dcm")


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
    # the spoilt files: listed with reasons, never written outside the run, the unreadable test image at the prior
    assert metrics["n_test_images_prior"] == 1
    assert not list(tiny_data.parent.rglob("pwned*")) and not list(out.rglob("pwned*"))
    reasons = " ".join(pd.read_csv(out / "index" / "bad_files_train.csv")["reason"])
    assert "'../../../../pwned' is not a safe ID" in reasons and "'ID_sub/dir/x' is not a safe ID" in reasons
    assert "truncated" in " ".join(pd.read_csv(out / "index" / "bad_files_test.csv")["reason"])
    assert "left out 1 of" in (out / "notebooks" / "02_train_cnn_fold0.ipynb").read_text()
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
