"""The competition metric, once: weighted multi-label log loss (any = 2, subtypes = 1), mean over all rows.

Equal to `sklearn.metrics.log_loss` on the flattened (image, label) rows with sample weights; see tests.
"""
from __future__ import annotations

from typing import Dict

import numpy as np

from lib.tasks.ich.labels import SUBTYPES, WEIGHTS

EPS = 1e-6


def _check(y_true: np.ndarray, y_pred: np.ndarray) -> tuple:
    y_true = np.asarray(y_true, dtype=np.float64)
    y_pred = np.asarray(y_pred, dtype=np.float64)
    if y_true.shape != y_pred.shape or y_true.ndim != 2 or y_true.shape[1] != len(SUBTYPES):
        raise ValueError(f"expected y_true and y_pred of shape (N, {len(SUBTYPES)}); "
                         f"got {y_true.shape} and {y_pred.shape}")
    if not np.isfinite(y_pred).all():
        raise ValueError("y_pred contains NaN or inf")
    return y_true, y_pred


def per_class_log_loss(y_true: np.ndarray, y_pred: np.ndarray, eps: float = EPS) -> np.ndarray:
    """(N, 6) labels and probabilities (SUBTYPES order) -> (6,) mean binary log loss per label."""
    y_true, y_pred = _check(y_true, y_pred)
    p = np.clip(y_pred, eps, 1 - eps)
    return -(y_true * np.log(p) + (1 - y_true) * np.log(1 - p)).mean(axis=0)


def weighted_log_loss(y_true: np.ndarray, y_pred: np.ndarray, eps: float = EPS) -> float:
    """(N, 6) labels and probabilities -> the competition score sum(w * ll) / sum(w) over all rows."""
    return float((per_class_log_loss(y_true, y_pred, eps) * WEIGHTS).sum() / WEIGHTS.sum())


def metric_report(y_true: np.ndarray, y_pred: np.ndarray, prefix: str, eps: float = EPS) -> Dict[str, float]:
    """`{prefix}_logloss` plus `{prefix}_logloss_<subtype>` for each label, as plain floats for metrics.json."""
    per = per_class_log_loss(y_true, y_pred, eps)
    out = {f"{prefix}_logloss": float((per * WEIGHTS).sum() / WEIGHTS.sum())}
    out.update({f"{prefix}_logloss_{s}": float(v) for s, v in zip(SUBTYPES, per)})
    return out


def prior_predictions(y_train: np.ndarray, n: int) -> np.ndarray:
    """The prior-only baseline: every image gets each label's prevalence in `y_train`; shape (n, 6)."""
    prev = np.asarray(y_train, dtype=np.float64).mean(axis=0)
    return np.tile(prev, (n, 1))
