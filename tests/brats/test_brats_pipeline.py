"""BraTS task: the label / submission files, the task-2 series cache, and the whole chain through the runner."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from lib.tasks.brats.data import BratsData, BratsDataError, read_labels, write_submission
from lib.tasks.brats.phantom import generate
from lib.tasks.brats.preprocess import cache_key, cache_series, load_series

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def brats_data(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("brats") / "data"
    generate(out, patients=14, seed=3, size=48, slices=(12, 16), progress=False)
    return out


# ---------------------------------------------------------------- labels and submission
def test_labels_keep_zero_padded_ids_and_refuse_bad_ones(tmp_path: Path):
    p = tmp_path / "l.csv"
    p.write_text("BraTS21ID,MGMT_value\n00012,1\n00003,0\n")
    assert read_labels(p).to_dict() == {"00012": 1, "00003": 0}
    for body, match in (("12,1\n", "invalid IDs"), ("00012,1\n00012,0\n", "duplicated"), ("../../x,1\n", "invalid"),
                        ("00012,2\n", "0 or 1")):
        p.write_text("BraTS21ID,MGMT_value\n" + body)
        with pytest.raises(BratsDataError, match=match):
            read_labels(p)


def test_submission_follows_the_sample_and_fills_the_prior(tmp_path: Path):
    sample = tmp_path / "s.csv"
    sample.write_text("BraTS21ID,MGMT_value\n00013,0.5\n00001,0.5\n00015,0.5\n")
    path, n_prior = write_submission(pd.Series({"00001": 0.2, "00013": 0.9}), sample, tmp_path / "sub.csv", 0.525)
    sub = pd.read_csv(path, dtype={"BraTS21ID": str})
    assert sub["BraTS21ID"].tolist() == ["00013", "00001", "00015"] and n_prior == 1
    assert sub["MGMT_value"].tolist() == [0.9, 0.2, 0.525]
    with pytest.raises(BratsDataError, match="NaN"):
        write_submission(pd.Series({"00001": np.nan}), sample, tmp_path / "x.csv", 0.5)
    with pytest.raises(BratsDataError, match="outside"):
        write_submission(pd.Series({"00001": 1.7}), sample, tmp_path / "x.csv", 0.5)


def test_layout_names_what_is_missing(tmp_path: Path, brats_data: Path):
    assert BratsData.at(brats_data).check().task2_dir == brats_data / "task2"
    with pytest.raises(FileNotFoundError, match="task1"):
        BratsData.at(tmp_path).check()
    # the bare Kaggle download (what /kaggle/input mounts) is its own task-2 folder
    bare = tmp_path / "kaggle"
    shutil.copytree(brats_data / "task2", bare)
    assert BratsData.at(bare).check(need_task1=False).task2_dir == bare


# ---------------------------------------------------------------- series cache
def test_series_cache_orders_normalises_and_lists_bad_series(tmp_path: Path, brats_data: Path):
    table, bad = cache_series(brats_data / "task2" / "train", tmp_path / "cache", size=32, workers=1, progress=False)
    truth = pd.read_csv(brats_data / "_truth" / "series.csv", dtype={"BraTS21ID": str})
    truth = truth[(truth["split"] == "train")]
    assert set(bad["BraTS21ID"]) == set(truth.loc[truth["bad"].notna(), "BraTS21ID"])
    assert (table["BraTS21ID"].str.fullmatch(r"[0-9]{5}")).all()
    merged = table.merge(truth, on=["BraTS21ID", "sequence"], suffixes=("", "_truth"))
    assert (merged["plane"] == merged["plane_truth"]).all()
    assert (merged["n_slices"] <= merged["slices"]).all()  # blank ends dropped, never added
    row = table.iloc[0].to_dict()
    vol = load_series(tmp_path / "cache" / cache_key(32, "zscore_nonzero"), row)
    assert vol.dtype == np.float16 and vol.shape == (row["n_slices"], 32, 32)
    fg = vol[vol != 0].astype(np.float32)
    assert abs(fg.mean()) < 0.5 and 0.5 < fg.std() < 1.5


def test_series_cache_rereads_only_a_changed_series(tmp_path: Path, brats_data: Path):
    src = tmp_path / "train"
    shutil.copytree(brats_data / "task2" / "train", src)
    first, _ = cache_series(src, tmp_path / "cache", size=32, workers=1, progress=False)
    stamp = {r.path: (tmp_path / "cache" / cache_key(32, "zscore_nonzero") / r.path).stat().st_mtime_ns
             for r in first.itertuples()}
    changed = first.iloc[0]
    f = sorted((src / changed.BraTS21ID / changed.sequence).glob("*.dcm"))[0]
    os.utime(f, ns=(f.stat().st_atime_ns, f.stat().st_mtime_ns + 5_000_000_000))
    second, _ = cache_series(src, tmp_path / "cache", size=32, workers=1, progress=False)
    now = {r.path: (tmp_path / "cache" / cache_key(32, "zscore_nonzero") / r.path).stat().st_mtime_ns
           for r in second.itertuples()}
    assert [p for p in now if now[p] != stamp[p]] == [changed.path]
    (src / "12x45").mkdir()  # a folder whose name is not a BraTS21ID: a bad row, not a crash
    _, bad = cache_series(src, tmp_path / "cache", size=32, workers=1, progress=False)
    assert "bad_id" in set(bad["reason"])


# ---------------------------------------------------------------- the chain
@pytest.mark.slow
def test_smoke_chain_through_the_runner(brats_data: Path, tmp_path: Path):
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "lib.run", str(REPO / "params" / "brats" / "smoke.yaml"), "--data",
                           str(brats_data), "--out", str(out)], cwd=REPO, capture_output=True, text=True,
                          timeout=1500, env=dict(os.environ, MPLBACKEND="Agg"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    for key in ("seg_valid_dice_wt", "seg_valid_dice_et", "oof_auc", "oof_auc_FLAIR", "oof_auc_T2w",
                "test_submission_auc"):
        assert np.isfinite(metrics[key]), key
    sample = pd.read_csv(brats_data / "task2" / "sample_submission.csv", dtype={"BraTS21ID": str})
    sub = pd.read_csv(out / "submission.csv", dtype={"BraTS21ID": str})
    assert list(sub.columns) == ["BraTS21ID", "MGMT_value"] and sub["BraTS21ID"].tolist() == sample["BraTS21ID"].tolist()
    assert sub["MGMT_value"].between(0, 1).all()
    assert (out / "report.html").exists()
    table = subprocess.run([sys.executable, "-m", "lib.report", str(out)], cwd=REPO, capture_output=True, text=True)
    assert table.returncode == 0 and "Dice WT" in table.stdout and "prior" in table.stdout
    again = subprocess.run([sys.executable, "-m", "lib.run", str(REPO / "params" / "brats" / "smoke.yaml"), "--data",
                            str(brats_data), "--out", str(out), "--resume"], cwd=REPO, capture_output=True, text=True,
                           timeout=600)
    assert again.returncode == 0 and again.stdout.count("skipped") == 7, again.stdout[-2000:]


def test_benchmarks_print_one_json_line(brats_data: Path):
    pre = subprocess.run([sys.executable, "-m", "lib.bench", "brats-preprocess", "--data", str(brats_data), "--size",
                          "32", "--repeat", "1", "--workers", "2"], cwd=REPO, capture_output=True, text=True,
                         timeout=600)
    assert pre.returncode == 0, pre.stderr[-2000:]
    out = json.loads(pre.stdout.strip().splitlines()[-1])
    assert out["series"] > 0 and out["ours_parallel_series_s"] > 0 and out["naive_series_s"] > 0
    cls = subprocess.run([sys.executable, "-m", "lib.bench", "brats-classifier", "--size", "32", "--length", "4",
                          "--steps", "1", "--bs", "2"], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert cls.returncode == 0, cls.stderr[-2000:]
    assert json.loads(cls.stdout.strip().splitlines()[-1])["train_chunks_s"] > 0
