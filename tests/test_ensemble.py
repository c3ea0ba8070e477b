"""Blending by image id, simplex weights tuned on OOF, and the OOF-gated any >= max(subtypes) step."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from lib.ensemble import BLENDS, BlendError, blend, fit_blend, per_input_losses, read_predictions, write_predictions
from lib.tasks.ich.labels import WEIGHTS
from lib.tasks.ich.postprocess import any_ge_max, maybe_postprocess
from lib.tasks.ich.labels import SUBTYPES, wide_to_long
from lib.evaluate.metrics import weighted_log_loss

IDS = [f"ID_{i:09x}" for i in range(400)]


def wide(values: np.ndarray, ids=IDS) -> pd.DataFrame:
    return pd.DataFrame(values, index=pd.Index(ids, name="image_id"), columns=list(SUBTYPES))


@pytest.fixture(scope="module")
def problem():
    """Labels and three OOF tables: two informative with independent noise, one constant prior."""
    rng = np.random.default_rng(0)
    y = wide((rng.random((len(IDS), 6)) < 0.2).astype(np.uint8))
    logit = np.where(y.to_numpy() == 1, 1.5, -1.5)

    def noisy(scale: float) -> pd.DataFrame:
        return wide(1 / (1 + np.exp(-(logit + rng.normal(scale=scale, size=logit.shape)))))

    preds = {"a": noisy(1.5), "b": noisy(2.0), "prior": wide(np.full((len(IDS), 6), 0.2))}
    return y, preds


def test_blend_aligns_on_image_id_not_position():
    a = wide(np.full((4, 6), 0.2), IDS[:4])
    b = wide(np.arange(24, dtype=float).reshape(4, 6) / 100, IDS[:4])
    shuffled = b.iloc[[2, 0, 3, 1]]
    out = blend({"a": a, "b": shuffled}, {"a": 0.25, "b": 0.75})
    assert list(out.index) == IDS[:4]
    np.testing.assert_allclose(out.to_numpy(), 0.25 * a.to_numpy() + 0.75 * b.to_numpy())
    np.testing.assert_allclose(blend({"a": a, "b": shuffled}).to_numpy(), (a.to_numpy() + b.to_numpy()) / 2)


def test_blend_refuses_different_image_sets_and_bad_weights():
    a = wide(np.full((4, 6), 0.2), IDS[:4])
    with pytest.raises(BlendError, match="1 missing"):
        blend({"a": a, "b": a.iloc[:3]})
    with pytest.raises(BlendError, match="1 extra"):
        blend({"a": a, "b": wide(np.full((4, 6), 0.2), IDS[:3] + [IDS[9]])})
    with pytest.raises(BlendError, match="sum to 1"):
        blend({"a": a, "b": a}, {"a": 0.5, "b": 0.6})


@pytest.mark.parametrize("method", ["weighted", "weighted_per_class"])
def test_fitted_weights_on_simplex_and_not_worse_than_best_input(problem, method: str):
    y, preds = problem
    w = fit_blend(preds, y, WEIGHTS, method=method)
    mat = np.stack([np.broadcast_to(np.asarray(w[n], float), (6,)) for n in preds])
    assert (mat >= 0).all() and np.allclose(mat.sum(0), 1.0)
    single = per_input_losses(preds, y, WEIGHTS)
    blended = weighted_log_loss(y.to_numpy(), blend(preds, w).reindex(y.index).to_numpy(), WEIGHTS)
    assert blended <= min(single.values()) - 1e-3  # two independent noisy inputs: the blend must gain
    assert w_total(w, "prior") < w_total(w, "a")


def w_total(w, name: str) -> float:
    return float(np.mean(w[name]))


def test_mean_method_and_unknown_method(problem):
    y, preds = problem
    assert fit_blend(preds, y, WEIGHTS, method="mean") == pytest.approx({n: 1 / 3 for n in preds})
    with pytest.raises(KeyError, match="weighted"):
        fit_blend(preds, y, WEIGHTS, method="median")
    assert {"mean", "weighted", "weighted_per_class"} <= set(BLENDS.names())


def test_any_ge_max_and_postprocess_gate():
    p = wide(np.array([[0.1, 0.7, 0.0, 0.0, 0.0, 0.3], [0.1, 0.2, 0.0, 0.0, 0.0, 0.5]]), IDS[:2])
    np.testing.assert_allclose(any_ge_max(p)["any"], [0.7, 0.5])
    np.testing.assert_allclose(any_ge_max(p)["intraparenchymal"], [0.7, 0.2])
    y_pos = wide(np.array([[0, 1, 0, 0, 0, 1], [0, 0, 0, 0, 0, 1]]), IDS[:2])
    keep, before, after = maybe_postprocess(p, y_pos)
    assert keep and after < before
    y_neg = wide(np.array([[0, 0, 0, 0, 0, 0], [0, 0, 0, 0, 0, 1]]), IDS[:2])
    keep, before, after = maybe_postprocess(p, y_neg)
    assert not keep and after > before


def test_read_and_write_predictions_wide(tmp_path: Path):
    p = wide(np.random.default_rng(1).random((5, 6)), IDS[:5])
    write_predictions(p, tmp_path / "wide.csv")
    back = read_predictions(tmp_path / "wide.csv", list(p.columns)).reindex(p.index)
    np.testing.assert_allclose(back.to_numpy(), p.to_numpy())
    wide_to_long(p).to_csv(tmp_path / "long.csv", index=False)  # the Kaggle long format is the task's to read
    with pytest.raises(BlendError, match="image_id"):
        read_predictions(tmp_path / "long.csv", list(p.columns))


def test_write_predictions_round_trips_and_is_atomic(tmp_path: Path):
    ids = pd.Index(["ID_b", "ID_a"], name="image_id")
    df = pd.DataFrame(np.linspace(0.01, 0.99, 12).reshape(2, 6), index=ids, columns=list(SUBTYPES))
    path = write_predictions(df, tmp_path / "predictions" / "oof_cnn.csv")
    pd.testing.assert_frame_equal(read_predictions(path, list(SUBTYPES)), df)
    assert path.read_text() == df.to_csv() and [p.name for p in path.parent.iterdir()] == ["oof_cnn.csv"]
