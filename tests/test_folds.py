"""Folds: patient grouping, label stratification (vs a random group split), determinism, I/O validation."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Tuple

import numpy as np
import pandas as pd
import pytest

from lib.data.folds import FOLD_COLUMNS, FoldsError, fold_summary, make_folds, read_folds, write_folds
from lib.tasks.ich.labels import SUBTYPES

# patient-level probability of having each subtype; epidural is rare, as in RSNA (anchors 0.3)
SUBTYPE_P = {"epidural": 0.02, "intraparenchymal": 0.08, "intraventricular": 0.06, "subarachnoid": 0.08,
             "subdural": 0.10}


def synthetic(n_patients: int = 300, seed: int = 0) -> Tuple[pd.DataFrame, pd.DataFrame]:
    """(meta, wide labels) for `n_patients` patients with 1-2 series of 20-40 slices and runs of positive slices."""
    rng = np.random.default_rng(seed)
    meta_rows, lab_rows = [], []
    for p in range(n_patients):
        for s in range(rng.integers(1, 3)):
            n = int(rng.integers(20, 41))
            lab = np.zeros((n, len(SUBTYPES)), np.uint8)
            for j, sub in enumerate(SUBTYPES[:5]):
                if rng.random() < SUBTYPE_P[sub]:
                    start = int(rng.integers(0, n - 3))
                    lab[start:start + int(rng.integers(2, 15)), j] = 1
            lab[:, 5] = lab[:, :5].max(1)
            for k in range(n):
                image_id = f"ID_{p:04d}{s}{k:02d}"
                meta_rows.append((image_id, f"P{p:04d}", f"ST{p:04d}{s}", f"SE{p:04d}{s}"))
                lab_rows.append((image_id, *lab[k]))
    meta = pd.DataFrame(meta_rows, columns=["image_id", "patient_id", "study_uid", "series_uid"])
    labels = pd.DataFrame(lab_rows, columns=["image_id", *SUBTYPES]).set_index("image_id").astype(np.uint8)
    return meta, labels


@pytest.fixture(scope="module")
def data() -> Tuple[pd.DataFrame, pd.DataFrame]:
    return synthetic()


def patient_prevalence_error(folds: pd.DataFrame, labels: pd.DataFrame) -> np.ndarray:
    """(K, 6) |fold share of patients with label s - overall share|."""
    df = folds[["patient_id", "fold"]].copy()
    df[list(SUBTYPES)] = labels.reindex(folds["image_id"].to_numpy()).to_numpy()
    per_patient = df.groupby("patient_id").max()
    overall = per_patient[list(SUBTYPES)].mean().to_numpy()
    by_fold = per_patient.groupby("fold")[list(SUBTYPES)].mean().to_numpy()
    return np.abs(by_fold - overall)


def random_group_split(meta: pd.DataFrame, n_folds: int, seed: int) -> pd.DataFrame:
    patients = meta["patient_id"].unique()
    fold_of = dict(zip(patients, np.random.default_rng(seed).permutation(len(patients)) % n_folds))
    return meta.assign(fold=meta["patient_id"].map(fold_of))


def test_columns_and_groups(data) -> None:
    meta, labels = data
    folds = make_folds(meta, labels, n_folds=5, seed=42)
    assert tuple(folds.columns) == FOLD_COLUMNS
    assert len(folds) == len(labels) and folds["image_id"].is_unique
    assert (folds.groupby("patient_id")["fold"].nunique() == 1).all()
    assert sorted(folds["fold"].unique()) == [0, 1, 2, 3, 4]
    assert folds["fold"].dtype == np.int64


def test_stratified_beats_random_group_split(data) -> None:
    meta, labels = data
    folds = make_folds(meta, labels, n_folds=5, seed=42)
    err = patient_prevalence_error(folds, labels)
    patients_per_fold = meta["patient_id"].nunique() / 5
    # each fold holds the overall share of patients per label up to ~one patient (and fold-size jitter)
    assert err.max() <= 2.0 / patients_per_fold, err
    random_err = np.mean([patient_prevalence_error(random_group_split(meta, 5, s), labels).mean() for s in range(5)])
    assert err.mean() < 0.5 * random_err
    # slice-level prevalence of `any` and image counts also balance
    summary = fold_summary(folds, labels)
    assert np.abs(summary["any"] - labels["any"].mean()).max() < 0.03
    assert summary["n_images"].max() / summary["n_images"].min() < 1.1


def test_deterministic_and_seed_dependent(data) -> None:
    meta, labels = data
    a = make_folds(meta, labels, n_folds=5, seed=7)
    b = make_folds(meta.sample(frac=1.0, random_state=1), labels, n_folds=5, seed=7)
    pd.testing.assert_frame_equal(a, b)
    c = make_folds(meta, labels, n_folds=5, seed=8)
    assert not a["fold"].equals(c["fold"])


def test_unreadable_images_are_dropped_and_counted(data, caplog) -> None:
    meta, labels = data
    gone = meta["image_id"].iloc[[3, 50, 400]].tolist()
    with caplog.at_level(logging.WARNING, logger="lib.data.folds"):
        folds = make_folds(meta[~meta["image_id"].isin(gone)], labels, n_folds=5)
    assert folds.attrs["n_dropped"] == 3
    assert not folds["image_id"].isin(gone).any() and len(folds) == len(labels) - 3
    assert "3 labelled images" in caplog.text


def test_every_fold_nonempty_with_few_patients() -> None:
    meta, labels = synthetic(n_patients=6, seed=3)
    folds = make_folds(meta, labels, n_folds=5)
    assert folds["fold"].nunique() == 5


def test_too_many_folds() -> None:
    meta, labels = synthetic(n_patients=4, seed=3)
    with pytest.raises(FoldsError, match="n_folds=5.*4"):
        make_folds(meta, labels, n_folds=5)


def test_write_read_round_trip(data, tmp_path: Path) -> None:
    meta, labels = data
    folds = make_folds(meta, labels, n_folds=3)
    path = write_folds(folds, tmp_path / "folds.csv")
    back = read_folds(path)
    pd.testing.assert_frame_equal(back.reset_index(drop=True), folds.reset_index(drop=True), check_dtype=False)
    assert back["fold"].dtype.kind == "i"


def test_read_folds_rejects_bad_tables(tmp_path: Path) -> None:
    good = pd.DataFrame({"image_id": ["ID_a", "ID_b"], "patient_id": ["P1", "P1"], "study_uid": ["S", "S"],
                         "series_uid": ["E", "E"], "fold": [0, 0]})
    path = tmp_path / "f.csv"
    good.drop(columns="series_uid").to_csv(path, index=False)
    with pytest.raises(FoldsError, match="series_uid"):
        read_folds(path)
    good.assign(fold=[0, 1]).to_csv(path, index=False)
    with pytest.raises(FoldsError, match="P1"):
        read_folds(path)
    with pytest.raises(FileNotFoundError):
        read_folds(tmp_path / "missing.csv")


def test_missing_patient_id_is_an_error(data) -> None:
    meta, labels = data
    bad = meta.copy()
    bad.loc[5, "patient_id"] = None
    with pytest.raises(FoldsError, match="patient_id"):
        make_folds(bad, labels)
