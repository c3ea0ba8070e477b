"""Uncertainty of a patient-level ROC AUC: a percentile bootstrap over patients, and the spread over CV folds.

With a few hundred patients and an AUC near 0.6 (BraTS MGMT), fold-to-fold and bootstrap spreads of several
points are normal; report them beside every CV number.
"""
from __future__ import annotations

from typing import Any, Dict, List, Sequence, Tuple, Union

import numpy as np
import pandas as pd
from scipy.stats import rankdata
from sklearn.metrics import roc_auc_score

ArrayLike = Union[Sequence[float], np.ndarray, pd.Series]


def _pair(y: ArrayLike, p: ArrayLike) -> Tuple[np.ndarray, np.ndarray]:
    """(y 0/1, p scores) as float64 (N,) arrays; two Series are aligned on y's index (missing p -> KeyError)."""
    if isinstance(y, pd.Series) and isinstance(p, pd.Series):
        missing = y.index.difference(p.index)
        if len(missing):
            raise KeyError(f"{len(missing)} labelled IDs have no prediction, e.g. {list(missing[:3])}")
        p = p.reindex(y.index)
    y, p = np.asarray(y, np.float64).reshape(-1), np.asarray(p, np.float64).reshape(-1)
    if y.shape != p.shape:
        raise ValueError(f"y and p must have one value per patient each, got {y.shape} and {p.shape}")
    if not np.isin(y, (0.0, 1.0)).all():
        raise ValueError(f"y must be 0/1, got values {sorted(set(y.tolist()))[:5]}")
    if not np.isfinite(p).all():
        raise ValueError("p contains NaN or inf")
    return y, p


def rank_auc(y: np.ndarray, p: np.ndarray) -> np.ndarray:
    """ROC AUC along the last axis by the Mann-Whitney U statistic (ties count 1/2, as sklearn's ROC AUC).

    y: 0/1 (..., N), p: scores (..., N) -> AUC (...), NaN where a row has one class only.
    """
    ranks = rankdata(p, axis=-1)
    n_pos = y.sum(-1)
    n_neg = y.shape[-1] - n_pos
    with np.errstate(invalid="ignore", divide="ignore"):
        auc = ((ranks * y).sum(-1) - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)
    return np.where((n_pos > 0) & (n_neg > 0), auc, np.nan)


def auc_ci(y: ArrayLike, p: ArrayLike, n_boot: int = 1000, alpha: float = 0.05, seed: int = 0) -> Dict[str, Any]:
    """Patient ROC AUC with a percentile bootstrap interval: {"auc", "lo", "hi", "n_boot" (resamples used)}.

    y: 0/1 per patient, p: score per patient (Series are aligned by index). Each of the `n_boot` resamples draws N
    patients with replacement (`np.random.default_rng(seed).integers(0, N, (n_boot, N))`); resamples with one class
    only are skipped; lo / hi are the alpha/2 and 1 - alpha/2 quantiles (numpy's linear rule) of the rest.
    """
    y, p = _pair(y, p)
    if not 0 < y.sum() < len(y):
        raise ValueError(f"y needs both classes for an AUC; got {int(y.sum())} positives of {len(y)}")
    if not 0 < alpha < 1 or n_boot < 1:
        raise ValueError(f"need 0 < alpha < 1 and n_boot >= 1, got alpha={alpha}, n_boot={n_boot}")
    idx = np.random.default_rng(seed).integers(0, len(y), size=(int(n_boot), len(y)))
    boots = rank_auc(y[idx], p[idx])
    boots = boots[np.isfinite(boots)]
    lo, hi = (np.quantile(boots, [alpha / 2, 1 - alpha / 2]) if len(boots) else (np.nan, np.nan))
    return {"auc": float(roc_auc_score(y, p)), "lo": float(lo), "hi": float(hi), "n_boot": int(len(boots))}


def fold_auc_summary(y: ArrayLike, p: ArrayLike, folds: ArrayLike) -> Dict[str, Any]:
    """Per-fold ROC AUC of out-of-fold predictions: {"mean", "std" (population, ddof 0), "per_fold" (list, fold
    order), "folds" (the sorted fold values), "pooled" (AUC over all rows)}. A fold with one class only gets NaN in
    per_fold and is left out of mean and std. y, p, folds: one per patient (Series are aligned on y's index)."""
    if isinstance(y, pd.Series) and isinstance(folds, pd.Series):
        folds = folds.reindex(y.index)
    y_arr, p_arr = _pair(y, p)
    f = np.asarray(folds).reshape(-1)
    if f.shape != y_arr.shape or pd.isna(f).any():
        raise ValueError(f"folds must give one fold per patient, got shape {f.shape} for {y_arr.shape} "
                         "(or missing folds)")
    names = sorted(set(f.tolist()))
    per: List[float] = []
    for k in names:
        yk, pk = y_arr[f == k], p_arr[f == k]
        per.append(float(roc_auc_score(yk, pk)) if 0 < yk.sum() < len(yk) else float("nan"))
    ok = np.asarray([v for v in per if np.isfinite(v)])
    pooled = float(roc_auc_score(y_arr, p_arr)) if 0 < y_arr.sum() < len(y_arr) else float("nan")
    return {"mean": float(ok.mean()) if len(ok) else float("nan"), "std": float(ok.std()) if len(ok) else float("nan"),
            "per_fold": per, "folds": names, "pooled": pooled}
