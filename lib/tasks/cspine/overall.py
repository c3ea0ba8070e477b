"""patient_overall from the seven vertebra probabilities, by registry name (`OVERALL_RULES`), and their comparison
under the competition's per-study metric.

Rules (each a class with `fit(probs (N, 7), y (N,)) -> self`, `predict(probs (N, 7)) -> (N,) float64` and `state()`,
a JSON-able dict `rule_from_state` turns back into the fitted rule; probs are P(fracture) of C1..C7 in that column
order, or a DataFrame holding those columns):
  max       the largest vertebra probability (the 4th place; needs no fit);
  noisy_or  1 - prod_k (1 - p_k): the vertebrae as independent causes (needs no fit);
  logistic  sklearn LogisticRegression on the logits of the probabilities sorted in decreasing order, fitted on
            out-of-fold predictions with the metric's overall-row class weights (positive 14 : negative 7).
"""
from __future__ import annotations

from typing import Any, Dict, Optional, Union

import numpy as np
import pandas as pd

from lib.evaluate.study_logloss import study_weighted_logloss
from lib.registry import Registry
from lib.tasks.cspine.metric import CSPINE_GROUP, CSPINE_LABELS, CSPINE_NEG_WEIGHTS, CSPINE_POS_WEIGHTS

VERTEBRAE = CSPINE_LABELS[:7]
OVERALL = CSPINE_LABELS[7]
Probs = Union[np.ndarray, pd.DataFrame]
OVERALL_RULES: Registry = Registry("patient_overall rule")


def as_matrix(probs: Probs) -> np.ndarray:
    """(N, 7) float64 in [0, 1] from an array or a DataFrame with columns C1..C7; anything else -> ValueError."""
    if isinstance(probs, pd.DataFrame):
        missing = [c for c in VERTEBRAE if c not in probs.columns]
        if missing:
            raise KeyError(f"vertebra probabilities lack columns {missing}; have {list(probs.columns)}")
        probs = probs[list(VERTEBRAE)].to_numpy()
    p = np.asarray(probs, np.float64)
    if p.ndim != 2 or p.shape[1] != len(VERTEBRAE):
        raise ValueError(f"vertebra probabilities must be (N, {len(VERTEBRAE)}), got shape {p.shape}")
    if np.isnan(p).any() or (p < 0).any() or (p > 1).any():
        raise ValueError("vertebra probabilities must be finite and in [0, 1]")
    return p


class _FitFree:
    """A rule with nothing to fit."""

    needs_fit = False

    def fit(self, probs: Probs, y: np.ndarray) -> "_FitFree":
        return self


@OVERALL_RULES.register("max")
class MaxRule(_FitFree):
    """patient_overall = max_k p_k."""

    def predict(self, probs: Probs) -> np.ndarray:
        return as_matrix(probs).max(1)

    def state(self) -> Dict[str, Any]:
        return {"rule": "max"}


@OVERALL_RULES.register("noisy_or")
class NoisyOrRule(_FitFree):
    """patient_overall = 1 - prod_k (1 - p_k)."""

    def predict(self, probs: Probs) -> np.ndarray:
        return 1.0 - np.prod(1.0 - as_matrix(probs), axis=1)

    def state(self) -> Dict[str, Any]:
        return {"rule": "noisy_or"}


@OVERALL_RULES.register("logistic")
class LogisticRule:
    """Logistic regression on the decreasingly sorted vertebra logits (clipped at +-`clip`), class weights of the
    metric's overall row; `C` the inverse L2 strength (sklearn)."""

    needs_fit = True

    def __init__(self, C: float = 1.0, clip: float = 8.0) -> None:
        self.C, self.clip = float(C), float(clip)
        self.coef: Optional[np.ndarray] = None
        self.intercept = 0.0

    def _features(self, probs: Probs) -> np.ndarray:
        p = np.clip(-np.sort(-as_matrix(probs), axis=1), 1e-6, 1 - 1e-6)
        return np.clip(np.log(p / (1 - p)), -self.clip, self.clip)

    def fit(self, probs: Probs, y: np.ndarray) -> "LogisticRule":
        from sklearn.linear_model import LogisticRegression

        y = np.asarray(y).astype(np.int64).ravel()
        if len(np.unique(y)) < 2:
            raise ValueError(f"logistic rule: y_overall needs both classes, got only {np.unique(y).tolist()}")
        weights = {0: CSPINE_NEG_WEIGHTS[OVERALL], 1: CSPINE_POS_WEIGHTS[OVERALL]}
        model = LogisticRegression(C=self.C, class_weight=weights, max_iter=1000).fit(self._features(probs), y)
        self.coef, self.intercept = model.coef_[0].astype(np.float64), float(model.intercept_[0])
        return self

    def predict(self, probs: Probs) -> np.ndarray:
        """sigmoid(features @ coef + intercept): sklearn's predict_proba[:, 1] of a binary model, from the stored
        coefficients (so a rule loaded from `state` predicts exactly as the fitted one)."""
        if self.coef is None:
            raise RuntimeError("logistic rule: call fit(oof_vertebra_probs, y_overall) before predict")
        from scipy.special import expit

        return expit(self._features(probs) @ self.coef + self.intercept)

    def state(self) -> Dict[str, Any]:
        """JSON-able parameters of the fitted rule (`rule_from_state` rebuilds it: the Kaggle bundle stores it)."""
        if self.coef is None:
            raise RuntimeError("logistic rule: fit it before saving its state")
        return {"rule": "logistic", "C": self.C, "clip": self.clip, "coef": self.coef.tolist(),
                "intercept": self.intercept}


def create_rule(name: str, **kwargs: Any) -> Any:
    """A new (unfitted) rule registered as `name`."""
    return OVERALL_RULES.get(name)(**kwargs)


def rule_from_state(state: Dict[str, Any]) -> Any:
    """A fitted rule from its `state()` (a fit-free rule from its name); ValueError for a malformed state."""
    name = state.get("rule")
    rule = create_rule(name, **{k: state[k] for k in ("C", "clip") if k in state})
    if rule.needs_fit:
        coef = np.asarray(state.get("coef", []), np.float64)
        if coef.shape != (len(VERTEBRAE),) or not np.isfinite(coef).all() or "intercept" not in state:
            raise ValueError(f"rule {name!r}: state needs {len(VERTEBRAE)} finite coefficients and an intercept, "
                             f"got {state}")
        rule.coef, rule.intercept = coef, float(state["intercept"])
    return rule


def with_overall(vert: pd.DataFrame, rule: Any) -> pd.DataFrame:
    """`vert` (StudyInstanceUID, C1..C7 probabilities) with a patient_overall column from a fitted `rule`."""
    out = vert[[CSPINE_GROUP, *VERTEBRAE]].copy()
    out[OVERALL] = rule.predict(out)
    return out


def cross_fitted(name: str, probs: np.ndarray, y: np.ndarray, cv: int, seed: int) -> np.ndarray:
    """Out-of-fold overall predictions of a fitted rule (stratified `cv` folds over studies)."""
    from sklearn.model_selection import StratifiedKFold

    pred = np.zeros(len(y), np.float64)
    n_splits = int(min(cv, np.bincount(y.astype(np.int64), minlength=2).min()))
    if n_splits < 2:
        raise ValueError(f"rule {name!r} needs >= 2 studies of each overall class to cross-fit, got {np.bincount(y)}")
    for tr, va in StratifiedKFold(n_splits, shuffle=True, random_state=seed).split(probs, y):
        pred[va] = create_rule(name).fit(probs[tr], y[tr]).predict(probs[va])
    return pred


def compare_rules(oof: pd.DataFrame, truth: pd.DataFrame, rules: Optional[list] = None, cv: int = 5,
                  seed: int = 0) -> pd.DataFrame:
    """Per-study competition score (`study_weighted_logloss` over the 8 labels) of each rule's patient_overall.

    oof: StudyInstanceUID + C1..C7 out-of-fold probabilities; truth: train.csv rows of the same studies. Rules that
    need a fit are cross-fitted (`cv` stratified folds over the studies), so no study is scored by a rule fitted on
    it; the folds depend on the studies, not on the row order (a blend that reorders rows scores the same). Returns
    one row per rule: rule, score (lower is better), overall_logloss (the overall row alone, unweighted).
    """
    merged = (oof[[CSPINE_GROUP, *VERTEBRAE]].merge(truth[[CSPINE_GROUP, OVERALL]], on=CSPINE_GROUP, how="inner")
              .sort_values(CSPINE_GROUP, kind="stable").reset_index(drop=True))  # folds independent of row order
    if len(merged) != len(oof):
        raise KeyError(f"{len(oof) - len(merged)} oof studies have no truth row")
    probs, y = as_matrix(merged), merged[OVERALL].to_numpy(np.int64)
    rows = []
    for name in rules or OVERALL_RULES.names():
        rule = create_rule(name)
        overall = cross_fitted(name, probs, y, cv, seed) if rule.needs_fit else rule.predict(probs)
        pred = merged[[CSPINE_GROUP, *VERTEBRAE]].assign(**{OVERALL: overall})
        score = study_weighted_logloss(truth[truth[CSPINE_GROUP].isin(pred[CSPINE_GROUP])], pred, CSPINE_LABELS,
                                       CSPINE_POS_WEIGHTS, CSPINE_NEG_WEIGHTS, CSPINE_GROUP)
        p = np.clip(overall, 1e-15, 1 - 1e-15)
        rows.append({"rule": name, "score": score,
                     "overall_logloss": float(-(y * np.log(p) + (1 - y) * np.log1p(-p)).mean())})
    return pd.DataFrame(rows)


def rule_summary() -> Dict[str, str]:
    """name -> first docstring line of every registered rule."""
    return {n: (OVERALL_RULES.get(n).__doc__ or "").strip().splitlines()[0] for n in OVERALL_RULES.names()}
