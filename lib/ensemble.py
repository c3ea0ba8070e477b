"""Blending of wide prediction tables (index image_id, SUBTYPES probability columns) by registry name.

Blends are probability averages (never rank averages). "weighted" tunes non-negative weights summing to 1 on OOF
by minimising `lib.metrics.weighted_log_loss` (convex in the weights: SLSQP from the uniform start, checked against
every single input); "weighted_per_class" does the same per label column (the metric is separable by column).
"""
from __future__ import annotations

from typing import Callable, Dict, Mapping, Tuple, Union

import numpy as np
import pandas as pd
from scipy.optimize import minimize

from lib.tasks.ich.labels import SUBTYPES, long_to_wide
from lib.evaluate.metrics import EPS, weighted_log_loss
from lib.paths import PathLike
from lib.registry import Registry

Weights = Dict[str, Union[float, np.ndarray]]
BLENDS: Registry = Registry("blend method")


class BlendError(ValueError):
    """Prediction tables that cannot be blended (different image sets, missing columns, bad weights)."""


def read_predictions(path: PathLike) -> pd.DataFrame:
    """A predictions CSV, wide (image_id + SUBTYPES) or Kaggle long (ID, Label) -> wide df indexed by image_id."""
    df = pd.read_csv(path)
    if {"ID", "Label"} <= set(df.columns):
        return long_to_wide(df, source=str(path)).astype(np.float64)
    missing = sorted({"image_id", *SUBTYPES} - set(df.columns))
    if missing:
        raise BlendError(f"{path}: expected columns ID,Label or image_id + {list(SUBTYPES)}; missing {missing}")
    return df.set_index("image_id")[list(SUBTYPES)].astype(np.float64)


def align(preds: Mapping[str, pd.DataFrame]) -> Tuple[pd.Index, np.ndarray]:
    """Stack tables on the first one's image order -> (index, (M, N, 6) float64); raise if image sets differ."""
    if not preds:
        raise BlendError("no predictions to blend")
    names = list(preds)
    ref = preds[names[0]].index
    if ref.duplicated().any():
        raise BlendError(f"{names[0]}: duplicated image ids, e.g. {ref[ref.duplicated()][:3].tolist()}")
    arrays = []
    for name in names:
        df = preds[name]
        missing = [s for s in SUBTYPES if s not in df.columns]
        if missing:
            raise BlendError(f"{name}: lacks columns {missing}")
        if len(df) != len(ref) or not df.index.isin(ref).all() or df.index.duplicated().any():
            extra, lack = df.index.difference(ref), ref.difference(df.index)
            raise BlendError(f"{name} covers different images than {names[0]}: {len(lack)} missing "
                             f"(e.g. {lack[:3].tolist()}), {len(extra)} extra (e.g. {extra[:3].tolist()})")
        arrays.append(df.reindex(ref)[list(SUBTYPES)].to_numpy(np.float64))
    stacked = np.stack(arrays)
    if not np.isfinite(stacked).all():
        raise BlendError("predictions contain NaN or inf")
    return ref, stacked


def mean_frames(frames: list) -> pd.DataFrame:
    """Average prediction frames (same columns) over models, aligned on the first frame's index; frames covering
    different images are an error (a silent reindex would average in NaNs)."""
    ref = frames[0].index
    for f in frames[1:]:
        if len(f) != len(ref) or not f.index.isin(ref).all():
            raise ValueError("predictions of different models cover different images")
    return sum(f.reindex(ref) for f in frames) / len(frames)


def _weight_matrix(names: list, weights: Weights) -> np.ndarray:
    """Weights dict (scalar or per-class (6,) values) -> (M, 6) matrix; checks names, sign and column sums."""
    if set(weights) != set(names):
        raise BlendError(f"weights name {sorted(weights)}; predictions name {sorted(names)}")
    w = np.stack([np.broadcast_to(np.asarray(weights[n], np.float64), (len(SUBTYPES),)) for n in names])
    if (w < 0).any() or not np.allclose(w.sum(0), 1.0, atol=1e-6):
        raise BlendError(f"weights must be >= 0 and sum to 1 per class; column sums {w.sum(0).round(6).tolist()}")
    return w


def blend(preds: Mapping[str, pd.DataFrame], weights: Weights | None = None) -> pd.DataFrame:
    """Weighted probability average of aligned tables (weights None: plain mean) -> wide df (first table's order)."""
    index, stacked = align(preds)
    names = list(preds)
    w = _weight_matrix(names, weights) if weights is not None else np.full((len(names), len(SUBTYPES)), 1 / len(names))
    out = (stacked * w[:, None, :]).sum(0)
    return pd.DataFrame(out, index=index, columns=list(SUBTYPES))


def _column_loss(y: np.ndarray, p: np.ndarray) -> float:
    p = np.clip(p, EPS, 1 - EPS)
    return float(-(y * np.log(p) + (1 - y) * np.log(1 - p)).mean())


def simplex_minimize(loss: Callable[[np.ndarray], float], m: int) -> np.ndarray:
    """Minimise `loss(w)` over the probability simplex in R^m (SLSQP from uniform; never worse than any vertex)."""
    starts = [np.full(m, 1 / m)] + [np.eye(m)[i] for i in range(m)]
    res = minimize(loss, starts[0], method="SLSQP", bounds=[(0.0, 1.0)] * m,
                   constraints=[{"type": "eq", "fun": lambda w: w.sum() - 1.0}], options={"ftol": 1e-10})
    cands = starts + ([np.clip(res.x, 0, None) / np.clip(res.x, 0, None).sum()] if np.isfinite(res.x).all() else [])
    return min(cands, key=loss)


@BLENDS.register("mean")
def _fit_mean(stacked: np.ndarray, y: np.ndarray) -> np.ndarray:
    return np.full(stacked.shape[0], 1 / stacked.shape[0])


@BLENDS.register("weighted")
def _fit_weighted(stacked: np.ndarray, y: np.ndarray) -> np.ndarray:
    return simplex_minimize(lambda w: weighted_log_loss(y, np.tensordot(w, stacked, axes=1)), stacked.shape[0])


@BLENDS.register("weighted_per_class")
def _fit_weighted_per_class(stacked: np.ndarray, y: np.ndarray) -> np.ndarray:
    cols = [simplex_minimize(lambda w, c=c: _column_loss(y[:, c], w @ stacked[:, :, c]), stacked.shape[0])
            for c in range(len(SUBTYPES))]
    return np.stack(cols, axis=1)


def fit_blend(oof_preds: Mapping[str, pd.DataFrame], y: pd.DataFrame, method: str = "weighted") -> Weights:
    """Tune blend weights on OOF tables against labels `y` (wide, index image_id) -> {name: float or (6,) array}."""
    fit = BLENDS.get(method)
    index, stacked = align(oof_preds)
    yy = y.reindex(index)[list(SUBTYPES)]
    if yy.isna().any().any():
        raise BlendError(f"labels lack {int(yy.isna().any(axis=1).sum())} of the OOF images")
    w = fit(stacked, yy.to_numpy(np.float64))
    return {n: (float(w[i]) if w.ndim == 1 else w[i].copy()) for i, n in enumerate(oof_preds)}


def any_ge_max(df: pd.DataFrame) -> pd.DataFrame:
    """Consistency step: any = max(any, max over the 5 subtypes)."""
    out = df.copy()
    out["any"] = np.maximum(df["any"].to_numpy(), df[list(SUBTYPES[:-1])].to_numpy().max(axis=1))
    return out


def maybe_postprocess(oof_pred: pd.DataFrame, y: pd.DataFrame) -> Tuple[bool, float, float]:
    """Whether `any_ge_max` lowers the OOF loss -> (keep, loss_before, loss_after)."""
    yy = y.reindex(oof_pred.index)[list(SUBTYPES)].to_numpy(np.float64)
    before = weighted_log_loss(yy, oof_pred[list(SUBTYPES)].to_numpy())
    after = weighted_log_loss(yy, any_ge_max(oof_pred)[list(SUBTYPES)].to_numpy())
    return after < before, before, after


def per_input_losses(oof_preds: Mapping[str, pd.DataFrame], y: pd.DataFrame) -> Dict[str, float]:
    """OOF weighted log loss of each input table (for the blend report)."""
    index, stacked = align(oof_preds)
    yy = y.reindex(index)[list(SUBTYPES)].to_numpy(np.float64)
    return {n: weighted_log_loss(yy, stacked[i]) for i, n in enumerate(oof_preds)}

