"""The RSNA 2022 weighted log loss: a hand-worked example, a reference loop, and the prior baseline on train.csv."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from lib.evaluate.study_logloss import global_weighted_logloss, grouped_weighted_logloss, study_weighted_logloss
from lib.tasks.cspine.metric import (CSPINE_LABELS, CSPINE_NEG_WEIGHTS, CSPINE_POS_WEIGHTS,
                                     cspine_prior_baseline, cspine_score, submission_to_wide)




def test_hand_worked_example():
    # Two labels: A (neg 1 / pos 2), B (neg 7 / pos 14); two studies.
    # s1: A y=1 p=0.5 -> ll=ln2, w=2; B y=0 p=0.5 -> ll=ln2, w=7.  sum w*ll / sum w = 9 ln2 / 9 = ln2 = 0.693147
    # s2: A y=0 p=1-1/e -> ll=-ln(1/e)=1, w=1; B y=1 p=1/e^2 -> ll=2, w=14.  (1*1 + 14*2) / 15 = 29/15 = 1.933333
    # per study = (ln2 + 29/15) / 2 = 1.313240;  pooled = (9 ln2 + 29) / (9 + 15) = 1.468264
    truth = pd.DataFrame({"sid": ["s1", "s2"], "A": [1, 0], "B": [0, 1]})
    pred = pd.DataFrame({"sid": ["s2", "s1"], "A": [1 - 1 / math.e, 0.5], "B": [math.e ** -2, 0.5]})  # keyed by sid
    args = (truth, pred, ["A", "B"], {"A": 2, "B": 14}, {"A": 1, "B": 7}, "sid")
    assert study_weighted_logloss(*args) == pytest.approx((math.log(2) + 29 / 15) / 2, abs=1e-12)
    assert study_weighted_logloss(*args, per_group=False) == pytest.approx((9 * math.log(2) + 29) / 24, abs=1e-12)
    assert round((math.log(2) + 29 / 15) / 2, 6) == 1.313240 and round((9 * math.log(2) + 29) / 24, 6) == 1.468264


def _reference(truth: pd.DataFrame, sub: pd.DataFrame) -> float:
    """Plain loop over studies and labels, the way the competition's reference code reads."""
    pred = dict(zip(sub["row_id"], sub["fractured"]))
    scores = []
    for _, row in truth.iterrows():
        num = den = 0.0
        for label in CSPINE_LABELS:
            y = row[label]
            p = min(max(pred[f"{row['StudyInstanceUID']}_{label}"], 1e-15), 1 - 1e-15)
            w = CSPINE_POS_WEIGHTS[label] if y == 1 else CSPINE_NEG_WEIGHTS[label]
            num += w * -(y * math.log(p) + (1 - y) * math.log(1 - p))
            den += w
        scores.append(num / den)
    return sum(scores) / len(scores)


def _random_case(seed: int, n: int = 30):
    rng = np.random.default_rng(seed)
    truth = pd.DataFrame({"StudyInstanceUID": [f"1.2.826.0.1.3680043.{i}" for i in range(n)]})
    for label in CSPINE_LABELS[:-1]:
        truth[label] = (rng.random(n) < 0.2).astype(int)
    truth["patient_overall"] = truth[list(CSPINE_LABELS[:-1])].max(axis=1)
    rows = [(f"{u}_{lab}", float(rng.choice([0.0, 1.0, rng.random()]))) for u in truth["StudyInstanceUID"]
            for lab in CSPINE_LABELS]
    sub = pd.DataFrame(rows, columns=["row_id", "fractured"]).sample(frac=1.0, random_state=seed)
    return truth, sub


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_equals_reference_loop(seed):
    truth, sub = _random_case(seed)
    assert cspine_score(truth, sub) == pytest.approx(_reference(truth, sub), rel=1e-12)


def test_global_form_and_generic_core():
    y = np.array([1, 0, 0, 1])
    p = np.array([0.9, 0.2, 0.4, 0.3])
    w = np.array([2.0, 1.0, 7.0, 14.0])
    ll = -np.log([0.9, 0.8, 0.6, 0.3])
    assert global_weighted_logloss(y, p, w) == pytest.approx((w * ll).sum() / w.sum())
    groups = np.array(["a", "a", "b", "b"])
    expect = ((w[:2] * ll[:2]).sum() / 3 + (w[2:] * ll[2:]).sum() / 21) / 2
    assert grouped_weighted_logloss(y, p, w, groups) == pytest.approx(expect)


def test_missing_prediction_and_bad_row_id():
    truth, sub = _random_case(0, n=3)
    with pytest.raises(KeyError, match="no prediction"):
        cspine_score(truth, sub[~sub["row_id"].str.startswith(truth["StudyInstanceUID"][1] + "_")])
    with pytest.raises(ValueError, match="row_id"):
        submission_to_wide(pd.DataFrame({"row_id": ["x_C9"], "fractured": [0.5]}))


def test_sample_submission_constant_half():
    # p = 0.5 everywhere -> every row's ll is ln 2, whatever the weights -> ln 2 both ways
    truth, sub = _random_case(3, n=5)
    sub["fractured"] = 0.5
    assert cspine_score(truth, sub) == pytest.approx(math.log(2))
    assert cspine_score(truth, sub, per_study=False) == pytest.approx(math.log(2))


@pytest.mark.realdata
def test_prior_baseline_on_real_train_csv(real_dir):
    path = real_dir / "rsna2022_cspine" / "train.csv"
    if not path.is_file():
        pytest.skip(f"{path} not found")
    truth = pd.read_csv(path)
    assert len(truth) == 2019
    per_study, pooled = cspine_prior_baseline(truth)
    assert (round(per_study, 4), round(pooled, 4)) == (0.5638, 0.6127)
