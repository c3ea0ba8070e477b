"""Labels long <-> wide (incl. duplicates and bad CSVs) and the competition metric vs scikit-learn."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import log_loss

from lib.tasks.ich import labels as L
from lib.evaluate import metrics as M


def _long(rows):
    return pd.DataFrame(rows, columns=["ID", "Label"])


def _image_rows(img, vals):
    return [(f"{img}_{s}", v) for s, v in zip(L.SUBTYPES, vals)]


def test_long_wide_round_trip_with_duplicates(tmp_path):
    rows = _image_rows("ID_aaa", [0, 1, 0, 0, 0, 1]) + _image_rows("ID_bbb", [0] * 6)
    rows += _image_rows("ID_aaa", [0, 1, 0, 0, 0, 1])  # an exactly duplicated image, as in stage_2_train.csv
    path = tmp_path / "l.csv"
    _long(rows).to_csv(path, index=False)
    wide = L.read_labels(path)
    assert list(wide.columns) == list(L.SUBTYPES) and list(wide.index) == ["ID_aaa", "ID_bbb"]
    assert wide.loc["ID_aaa", "intraparenchymal"] == 1 and wide.loc["ID_aaa", "any"] == 1
    assert wide.dtypes.unique().tolist() == [np.uint8]
    back = L.wide_to_long(wide)
    assert len(back) == 12 and back["ID"].iloc[5] == "ID_aaa_any" and back["Label"].iloc[1] == 1
    assert L.long_to_wide(back).equals(wide.astype(back["Label"].dtype))


@pytest.mark.parametrize("rows, match", [
    (_image_rows("ID_a", [0] * 5), r"lack some of the 6"),
    ([("ID_a_epidural", 0), ("ID_a_epidural", 1)] + _image_rows("ID_a", [0] * 6)[1:], r"conflicting"),
    ([("ID_a_sdh", 0)], r"unknown subtypes \['sdh'\]"),
    ([("noseparator", 0)], r"ID_<image>_<subtype>|unknown subtypes"),
])
def test_bad_label_rows(tmp_path, rows, match):
    path = tmp_path / "bad.csv"
    _long(rows).to_csv(path, index=False)
    with pytest.raises(L.LabelsError, match=match):
        L.read_labels(path)


def test_missing_columns_and_file(tmp_path):
    path = tmp_path / "cols.csv"
    pd.DataFrame({"ID": ["ID_a_any"], "Target": [1]}).to_csv(path, index=False)
    with pytest.raises(L.LabelsError, match=r"missing columns \['Label'\]"):
        L.read_labels(path)
    with pytest.raises(FileNotFoundError):
        L.read_labels(tmp_path / "nope.csv")


def test_metric_hand_worked_example():
    y = np.array([[0, 0, 0, 0, 0, 1]], dtype=float)
    p = np.full((1, 6), 0.5)
    # every row has loss ln 2 -> weighted mean is ln 2
    assert M.weighted_log_loss(y, p, L.WEIGHTS) == pytest.approx(np.log(2))
    p = np.array([[0.1, 0.1, 0.1, 0.1, 0.1, 0.9]])
    expected = (5 * -np.log(0.9) + 2 * -np.log(0.9)) / 7
    assert M.weighted_log_loss(y, p, L.WEIGHTS) == pytest.approx(expected)
    p2 = np.array([[0.1, 0.1, 0.1, 0.1, 0.1, 0.5]])  # a worse `any` costs twice a subtype
    worse_any = M.weighted_log_loss(y, p2, L.WEIGHTS) - M.weighted_log_loss(y, p, L.WEIGHTS)
    p3 = np.array([[0.5, 0.1, 0.1, 0.1, 0.1, 0.9]])
    worse_sub = M.weighted_log_loss(np.zeros_like(y) + y, p3, L.WEIGHTS) - M.weighted_log_loss(y, p, L.WEIGHTS)
    assert worse_any == pytest.approx(2 * worse_sub)


def test_metric_equals_sklearn_flattened_weighted():
    rng = np.random.default_rng(0)
    y = (rng.random((200, 6)) < 0.2).astype(float)
    p = rng.uniform(0.001, 0.999, (200, 6))
    w = np.tile(L.WEIGHTS, 200)
    ref = log_loss(y.ravel(), p.ravel(), sample_weight=w, labels=[0, 1])
    assert M.weighted_log_loss(y, p, L.WEIGHTS) == pytest.approx(ref, rel=1e-9)
    per = M.per_class_log_loss(y, p)
    assert per[0] == pytest.approx(log_loss(y[:, 0], p[:, 0], labels=[0, 1]))
    rep = M.metric_report(y, p, "oof_cnn", L.SUBTYPES, L.WEIGHTS)
    assert rep["oof_cnn_logloss"] == pytest.approx(ref) and "oof_cnn_logloss_any" in rep


def test_metric_clips_and_rejects_bad_shapes():
    y = np.ones((1, 6))
    assert np.isfinite(M.weighted_log_loss(y, np.zeros((1, 6)), L.WEIGHTS))
    assert M.weighted_log_loss(y, np.zeros((1, 6)), L.WEIGHTS) == pytest.approx(-np.log(1e-6))
    with pytest.raises(ValueError, match=r"weights must be 5"):
        M.weighted_log_loss(np.ones((2, 5)), np.ones((2, 5)), L.WEIGHTS)
    with pytest.raises(ValueError, match=r"shape"):
        M.weighted_log_loss(np.ones((2, 6)), np.ones((3, 6)), L.WEIGHTS)
    with pytest.raises(ValueError, match=r"NaN"):
        M.weighted_log_loss(y, np.full((1, 6), np.nan), L.WEIGHTS)


def test_one_metric_for_training_loss_and_score():
    """The torch training loss on logits equals the numpy metric on sigmoid(logits), also over masked rows."""
    import torch

    rng = np.random.default_rng(3)
    z = rng.normal(0, 2, (4, 7, 6))
    y = (rng.random((4, 7, 6)) < 0.3).astype(np.float64)
    mask = rng.random((4, 7)) < 0.6
    loss = M.weighted_bce_with_logits(torch.tensor(z), torch.tensor(y), L.WEIGHTS, torch.tensor(mask)).item()
    assert loss == pytest.approx(M.weighted_log_loss(y[mask], 1 / (1 + np.exp(-z[mask])), L.WEIGHTS), rel=1e-5)
    assert set(M.METRICS.names()) >= {"weighted_log_loss", "mean_auc"}
    assert M.METRICS.get("weighted_log_loss") is M.weighted_log_loss


def test_mean_auc_skips_single_class_labels():
    y = np.array([[0, 1], [1, 1], [0, 1], [1, 1]], dtype=float)
    p = np.array([[0.1, 0.5], [0.9, 0.5], [0.2, 0.5], [0.8, 0.5]])
    assert M.mean_auc(y, p) == pytest.approx(1.0)


def test_prior_predictions():
    y = np.array([[1, 0, 0, 0, 0, 1], [0, 0, 0, 0, 0, 0]])
    assert np.allclose(M.prior_predictions(y, 3), [[0.5, 0, 0, 0, 0, 0.5]] * 3)


def test_kaggle_paths_find_nested_competition_and_datasets(tmp_path, monkeypatch):
    from lib import paths
    from lib.tasks.ich.data import COMPETITION, MARKER

    monkeypatch.setenv("KAGGLE_INPUT_ROOT", str(tmp_path))
    monkeypatch.setenv("KAGGLE_KERNEL_RUN_TYPE", "Batch")
    with pytest.raises(FileNotFoundError, match="stage_2_test"):
        paths.resolve_data_dir("", COMPETITION, MARKER)
    nested = tmp_path / COMPETITION / COMPETITION
    (nested / "stage_2_test").mkdir(parents=True)
    assert paths.resolve_data_dir("", COMPETITION, MARKER) == nested
    newer = tmp_path / "competitions" / COMPETITION
    (newer / "stage_2_test").mkdir(parents=True)
    assert paths.resolve_data_dir("", COMPETITION, MARKER) == newer
    (tmp_path / "datasets" / "me" / "w").mkdir(parents=True)
    (tmp_path / "w2").mkdir()
    assert paths.attached_dataset("me/w") == tmp_path / "datasets" / "me" / "w"
    assert paths.attached_dataset("me/w2") == tmp_path / "w2"
    with pytest.raises(FileNotFoundError, match="not attached"):
        paths.attached_dataset("me/none")
