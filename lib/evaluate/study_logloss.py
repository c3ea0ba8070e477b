"""Weighted binary log loss normalised within each study, then averaged over studies (RSNA 2022 cervical spine).

Each (study, label) row has loss `ll = -[y log p + (1 - y) log(1 - p)]` (p clipped to [eps, 1 - eps]) and weight
`w = w_pos` if y = 1 else `w_neg`. The competition score (reference code of discussion 341854, also in MLE-bench's
grader) is `mean over studies of (sum_j w_j ll_j / sum_j w_j)` over the study's rows; `global_weighted_logloss`
is the pooled `sum w ll / sum w` over all rows, kept for comparison (the prior baseline on the real train.csv
scores 0.5638 per study vs 0.6127 pooled).

Everything here is generic (labels, weights and grouping are arguments); the cervical-spine wrapper with its labels
and weights (vertebrae 1/2, `patient_overall` 7/14) is `lib.tasks.cspine.metric`.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import pandas as pd

EPS = 1e-15


def binary_logloss(y: np.ndarray, p: np.ndarray, eps: float = EPS) -> np.ndarray:
    """Elementwise log loss (any shape, y in {0, 1}, p probabilities clipped to [eps, 1 - eps]) in nats."""
    y = np.asarray(y, np.float64)
    p = np.clip(np.asarray(p, np.float64), eps, 1 - eps)
    return -(y * np.log(p) + (1 - y) * np.log1p(-p))


def row_weights(y: np.ndarray, w_pos: np.ndarray, w_neg: np.ndarray) -> np.ndarray:
    """Per-row weight `w_pos` where y = 1, else `w_neg` (arrays broadcast; float64 out)."""
    y = np.asarray(y, np.float64)
    return y * np.asarray(w_pos, np.float64) + (1 - y) * np.asarray(w_neg, np.float64)


def grouped_weighted_logloss(y: np.ndarray, p: np.ndarray, weights: np.ndarray, groups: np.ndarray,
                             eps: float = EPS) -> float:
    """Mean over groups of `sum w ll / sum w` within the group. All inputs (N,) row-aligned; groups any hashable."""
    frame = pd.DataFrame({"g": np.asarray(groups), "w": np.asarray(weights, np.float64)})
    frame["wll"] = frame["w"] * binary_logloss(y, p, eps)
    sums = frame.groupby("g", sort=False)[["wll", "w"]].sum()
    if (sums["w"] <= 0).any():
        raise ValueError(f"groups {list(sums.index[sums['w'] <= 0])[:5]} have zero total weight")
    return float((sums["wll"] / sums["w"]).mean())


def global_weighted_logloss(y: np.ndarray, p: np.ndarray, weights: np.ndarray, eps: float = EPS) -> float:
    """Pooled `sum w ll / sum w` over all rows (N,)."""
    w = np.asarray(weights, np.float64)
    return float((w * binary_logloss(y, p, eps)).sum() / w.sum())


def wide_to_long(frame: pd.DataFrame, labels: Sequence[str], group: str) -> pd.DataFrame:
    """One row per group with a column per label -> long rows (group, label, value), sorted by group then label."""
    missing = [c for c in (group, *labels) if c not in frame.columns]
    if missing:
        raise KeyError(f"columns {missing} missing; have {list(frame.columns)}")
    if frame[group].duplicated().any():
        raise ValueError(f"{group} values repeat: {frame[group][frame[group].duplicated()].tolist()[:5]}")
    long = frame.melt(id_vars=[group], value_vars=list(labels), var_name="label", value_name="value")
    return long.sort_values([group, "label"], kind="stable").reset_index(drop=True)


def study_weighted_logloss(truth: pd.DataFrame, pred: pd.DataFrame, labels: Sequence[str],
                           pos_weights: Mapping[str, float], neg_weights: Mapping[str, float],
                           group: str, per_group: bool = True, eps: float = EPS) -> float:
    """Weighted log loss of wide `pred` against wide `truth` (one row per `group` value, one column per label).

    Rows are matched by the `group` key, never by position; a group in `truth` without a prediction raises KeyError.
    per_group=True: mean over groups of the within-group normalised loss (the competition form); False: pooled.
    """
    bad = [c for c in labels if c not in pos_weights or c not in neg_weights]
    if bad:
        raise KeyError(f"labels {bad} have no positive/negative weight; weights given for {sorted(pos_weights)}")
    t = wide_to_long(truth, labels, group)
    q = wide_to_long(pred, labels, group).set_index([group, "label"])["value"]
    key = pd.MultiIndex.from_frame(t[[group, "label"]])
    absent = t.loc[~key.isin(q.index), group].unique()
    if len(absent):
        raise KeyError(f"no prediction for {len(absent)} {group} value(s), e.g. {list(absent[:3])}")
    p = q.reindex(key).to_numpy(np.float64)
    y = t["value"].to_numpy(np.float64)
    w = row_weights(y, t["label"].map(pos_weights).to_numpy(), t["label"].map(neg_weights).to_numpy())
    if per_group:
        return grouped_weighted_logloss(y, p, w, t[group].to_numpy(), eps)
    return global_weighted_logloss(y, p, w, eps)
