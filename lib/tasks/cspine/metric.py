"""The RSNA 2022 cervical-spine score: its labels, weights and `row_id,fractured` format over the shared per-study
weighted log loss (`lib.evaluate.study_logloss`)."""
from __future__ import annotations

import re
from typing import Optional, Sequence, Tuple

import pandas as pd

from lib.evaluate.study_logloss import EPS, study_weighted_logloss

CSPINE_LABELS: Tuple[str, ...] = tuple(f"C{i}" for i in range(1, 8)) + ("patient_overall",)
CSPINE_NEG_WEIGHTS = {**{f"C{i}": 1.0 for i in range(1, 8)}, "patient_overall": 7.0}
CSPINE_POS_WEIGHTS = {**{f"C{i}": 2.0 for i in range(1, 8)}, "patient_overall": 14.0}
CSPINE_GROUP = "StudyInstanceUID"


def submission_to_wide(sub: pd.DataFrame, labels: Sequence[str] = CSPINE_LABELS, group: str = CSPINE_GROUP,
                       value: str = "fractured") -> pd.DataFrame:
    """`row_id,<value>` rows with row_id `<group id>_<label>` -> one row per group id with a column per label."""
    if "row_id" not in sub.columns or value not in sub.columns:
        raise KeyError(f"submission needs columns row_id and {value}; has {list(sub.columns)}")
    pattern = "^(.+)_(" + "|".join(re.escape(label) for label in labels) + ")$"
    parts = sub["row_id"].astype(str).str.extract(pattern)
    if parts.isna().any(axis=None):
        bad = sub["row_id"][parts[0].isna()].tolist()[:3]
        raise ValueError(f"row_id must be <{group}>_<label> with label in {list(labels)}; bad: {bad}")
    long = pd.DataFrame({group: parts[0], "label": parts[1], value: sub[value].astype(float)})
    if long.duplicated([group, "label"]).any():
        raise ValueError("submission repeats a row_id")
    return long.pivot(index=group, columns="label", values=value).reset_index().rename_axis(columns=None)


def cspine_score(truth: pd.DataFrame, submission: pd.DataFrame, per_study: bool = True,
                 eps: float = EPS) -> float:
    """The RSNA 2022 score of a `row_id,fractured` submission against a train.csv-format truth table."""
    return study_weighted_logloss(truth, submission_to_wide(submission), CSPINE_LABELS, CSPINE_POS_WEIGHTS,
                                  CSPINE_NEG_WEIGHTS, CSPINE_GROUP, per_group=per_study, eps=eps)


def cspine_prior_baseline(truth: pd.DataFrame, reference: Optional[pd.DataFrame] = None) -> Tuple[float, float]:
    """(per-study, pooled) score of predicting each label's prevalence in `reference` (default: `truth`) for all."""
    reference = truth if reference is None else reference
    pred = truth[[CSPINE_GROUP]].copy()
    for label in CSPINE_LABELS:
        pred[label] = float(reference[label].mean())
    args = (truth, pred, CSPINE_LABELS, CSPINE_POS_WEIGHTS, CSPINE_NEG_WEIGHTS, CSPINE_GROUP)
    return study_weighted_logloss(*args, per_group=True), study_weighted_logloss(*args, per_group=False)
