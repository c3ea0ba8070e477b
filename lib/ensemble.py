"""Blending of wide prediction tables (index image_id, one probability column per label) by registry name.

Label names come from the tables (or the labels table they are fitted against), the metric weights from the task:
nothing here knows a task. Blends are probability averages (rank-free). "weighted" tunes non-negative weights
summing to 1 on OOF by minimising `lib.evaluate.metrics.weighted_log_loss` (convex in the weights: SLSQP from the
uniform start, checked against every single input); "weighted_per_class" does the same per label column (the
metric is separable by column).
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import pandas as pd
from scipy.optimize import minimize

from lib.evaluate.metrics import weighted_log_loss
from lib.paths import PathLike, atomic_write
from lib.registry import Registry

Weights = Dict[str, Union[float, np.ndarray]]
BLENDS: Registry = Registry("blend method")


class BlendError(ValueError):
    """Prediction tables that cannot be blended (different image sets, missing columns, bad weights)."""


def read_predictions(path: PathLike, labels: Sequence[str]) -> pd.DataFrame:
    """A wide predictions CSV (image_id + one column per label) -> float64 df indexed by image_id, `labels` order."""
    df = pd.read_csv(path, dtype={"image_id": str})
    missing = sorted({"image_id", *labels} - set(df.columns))
    if missing:
        raise BlendError(f"{path}: expected columns image_id + {list(labels)}; missing {missing}")
    return df.set_index("image_id")[list(labels)].astype(np.float64)


def write_predictions(df: pd.DataFrame, path: PathLike) -> Path:
    """Write a wide predictions table (index image_id, one column per label) atomically, as the CSV
    `read_predictions` reads (byte for byte what `df.to_csv` writes, with the index named image_id)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: df.rename_axis("image_id").to_csv(tmp))
    return path


def align(preds: Mapping[str, pd.DataFrame], labels: Optional[Sequence[str]] = None) -> Tuple[pd.Index, np.ndarray]:
    """Stack tables on the first one's image order -> (index, (M, N, L) float64); raise if image sets differ.

    `labels`: the columns to stack (default: the first table's columns)."""
    if not preds:
        raise BlendError("no predictions to blend")
    names = list(preds)
    cols = list(labels) if labels is not None else list(preds[names[0]].columns)
    ref = preds[names[0]].index
    if ref.duplicated().any():
        raise BlendError(f"{names[0]}: duplicated image ids, e.g. {ref[ref.duplicated()][:3].tolist()}")
    arrays = []
    for name in names:
        df = preds[name]
        missing = [s for s in cols if s not in df.columns]
        if missing:
            raise BlendError(f"{name}: lacks columns {missing}")
        if len(df) != len(ref) or not df.index.isin(ref).all() or df.index.duplicated().any():
            extra, lack = df.index.difference(ref), ref.difference(df.index)
            raise BlendError(f"{name} covers different images than {names[0]}: {len(lack)} missing "
                             f"(e.g. {lack[:3].tolist()}), {len(extra)} extra (e.g. {extra[:3].tolist()})")
        arrays.append(df.reindex(ref)[cols].to_numpy(np.float64))
    stacked = np.stack(arrays)
    if not np.isfinite(stacked).all():
        raise BlendError("predictions contain NaN or inf")
    return ref, stacked


def mean_frames(frames: List[pd.DataFrame]) -> pd.DataFrame:
    """Average prediction frames (same columns) over models, aligned on the first frame's index; frames covering
    different images are an error (a silent reindex would average in NaNs)."""
    ref = frames[0].index
    for f in frames[1:]:
        if len(f) != len(ref) or not f.index.isin(ref).all():
            raise ValueError("predictions of different models cover different images")
    return sum(f.reindex(ref) for f in frames) / len(frames)


def _weight_matrix(names: list, weights: Weights, n_labels: int) -> np.ndarray:
    """Weights dict (scalar or per-label (L,) values) -> (M, L) matrix; checks names, sign and column sums."""
    if set(weights) != set(names):
        raise BlendError(f"weights name {sorted(weights)}; predictions name {sorted(names)}")
    w = np.stack([np.broadcast_to(np.asarray(weights[n], np.float64), (n_labels,)) for n in names])
    if (w < 0).any() or not np.allclose(w.sum(0), 1.0, atol=1e-6):
        raise BlendError(f"weights must be >= 0 and sum to 1 per class; column sums {w.sum(0).round(6).tolist()}")
    return w


def blend(preds: Mapping[str, pd.DataFrame], weights: Optional[Weights] = None) -> pd.DataFrame:
    """Weighted probability average of aligned tables (weights None: plain mean) -> wide df (first table's order
    and columns)."""
    cols = list(next(iter(preds.values())).columns) if preds else []
    index, stacked = align(preds, cols)
    names = list(preds)
    w = (_weight_matrix(names, weights, len(cols)) if weights is not None
         else np.full((len(names), len(cols)), 1 / len(names)))
    out = (stacked * w[:, None, :]).sum(0)
    return pd.DataFrame(out, index=index, columns=cols)


def _column_loss(y: np.ndarray, p: np.ndarray) -> float:
    return weighted_log_loss(y[:, None], p[:, None], [1.0])


def simplex_minimize(loss: Callable[[np.ndarray], float], m: int) -> np.ndarray:
    """Minimise `loss(w)` over the probability simplex in R^m (SLSQP from uniform; never worse than any vertex)."""
    starts = [np.full(m, 1 / m)] + [np.eye(m)[i] for i in range(m)]
    res = minimize(loss, starts[0], method="SLSQP", bounds=[(0.0, 1.0)] * m,
                   constraints=[{"type": "eq", "fun": lambda w: w.sum() - 1.0}], options={"ftol": 1e-10})
    cands = starts + ([np.clip(res.x, 0, None) / np.clip(res.x, 0, None).sum()] if np.isfinite(res.x).all() else [])
    return min(cands, key=loss)


@BLENDS.register("mean")
def _fit_mean(stacked: np.ndarray, y: np.ndarray, label_weights: np.ndarray) -> np.ndarray:
    return np.full(stacked.shape[0], 1 / stacked.shape[0])


@BLENDS.register("weighted")
def _fit_weighted(stacked: np.ndarray, y: np.ndarray, label_weights: np.ndarray) -> np.ndarray:
    return simplex_minimize(lambda w: weighted_log_loss(y, np.tensordot(w, stacked, axes=1), label_weights),
                            stacked.shape[0])


@BLENDS.register("weighted_per_class")
def _fit_weighted_per_class(stacked: np.ndarray, y: np.ndarray, label_weights: np.ndarray) -> np.ndarray:
    cols = [simplex_minimize(lambda w, c=c: _column_loss(y[:, c], w @ stacked[:, :, c]), stacked.shape[0])
            for c in range(stacked.shape[2])]
    return np.stack(cols, axis=1)


def _targets(y: pd.DataFrame, index: pd.Index) -> np.ndarray:
    yy = y.reindex(index)
    if yy.isna().any().any():
        raise BlendError(f"labels lack {int(yy.isna().any(axis=1).sum())} of the OOF images")
    return yy.to_numpy(np.float64)


def fit_blend(oof_preds: Mapping[str, pd.DataFrame], y: pd.DataFrame, label_weights: Sequence[float],
              method: str = "weighted") -> Weights:
    """Tune blend weights on OOF tables against labels `y` (wide, index image_id, the label columns) and the
    metric's `label_weights` -> {name: float or (L,) array}."""
    fit = BLENDS.get(method)
    index, stacked = align(oof_preds, list(y.columns))
    w = fit(stacked, _targets(y, index), np.asarray(label_weights, np.float64))
    return {n: (float(w[i]) if w.ndim == 1 else w[i].copy()) for i, n in enumerate(oof_preds)}


def per_input_losses(oof_preds: Mapping[str, pd.DataFrame], y: pd.DataFrame,
                     label_weights: Sequence[float]) -> Dict[str, float]:
    """OOF weighted log loss of each input table (for the blend report)."""
    index, stacked = align(oof_preds, list(y.columns))
    yy = _targets(y, index)
    return {n: weighted_log_loss(yy, stacked[i], label_weights) for i, n in enumerate(oof_preds)}


def gated(transform: Callable[[pd.DataFrame], pd.DataFrame], oof_pred: pd.DataFrame, y: pd.DataFrame,
          label_weights: Sequence[float]) -> Tuple[bool, float, float]:
    """Whether a post-processing `transform` lowers the OOF loss -> (keep, loss_before, loss_after)."""
    cols = list(y.columns)
    yy = _targets(y, oof_pred.index)
    before = weighted_log_loss(yy, oof_pred[cols].to_numpy(), label_weights)
    after = weighted_log_loss(yy, transform(oof_pred)[cols].to_numpy(), label_weights)
    return after < before, before, after
