"""Vertebra crops, the visibility rule, patient_overall rules and the per-vertebra classifiers of the cspine task,
on hand-made masks and tiny tensors (8 slices x 32 px)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from lib.tasks.cspine.crops import (CropError, build_crops, crop_vertebra, expected_volumes, read_crop_table,
                                    study_stats, vertebra_boxes, vertebra_labels, visibility)
from lib.tasks.cspine.metric import CSPINE_LABELS, cspine_score
from lib.tasks.cspine.overall import OVERALL_RULES, compare_rules, create_rule

STUDIES = ("1.2.826.0.1.3680043.1", "1.2.826.0.1.3680043.2", "1.2.826.0.1.3680043.3")
# (z0, z1, y0, y1, x0, x1) of C1..C6 in the synthetic (24, 16, 16) mask; C7 absent. C1 touches slice 0 (cut).
BOXES = {"C1": (0, 2, 4, 8, 5, 9), "C2": (2, 6, 4, 10, 4, 10), "C3": (6, 10, 5, 11, 4, 10),
         "C4": (10, 14, 5, 11, 4, 10), "C5": (14, 18, 5, 11, 4, 10), "C6": (18, 22, 6, 12, 4, 10)}


def synthetic(shift: int = 0):
    """(HU (24, 16, 16) float32: air -1000, body 0, bone 700 HU; mask uint8 with C1..C6 of BOXES; spacing)."""
    mask = np.zeros((24, 16, 16), np.uint8)
    for name, (z0, z1, y0, y1, x0, x1) in BOXES.items():
        mask[z0:z1, y0 + shift:y1 + shift, x0:x1] = int(name[1:])
    hu = np.full(mask.shape, -1000.0, np.float32)
    hu[:, 2:15, 2:15] = 0.0
    hu[mask > 0] = 700.0
    return hu, mask, (1.0, 1.0, 1.0)


def labels_table(studies=STUDIES) -> pd.DataFrame:
    """train.csv rows: study 0 has C1 (cut) only; study 1 has C1 + C3; study 2 none."""
    rows = [dict(C1=1, C3=0), dict(C1=1, C3=1), dict(C1=0, C3=0)]
    table = pd.DataFrame([{**{f"C{i}": 0 for i in range(1, 8)}, **r} for r in rows[:len(studies)]])
    table.insert(0, "StudyInstanceUID", list(studies))
    table["patient_overall"] = table[[f"C{i}" for i in range(1, 8)]].max(axis=1)
    return table[["StudyInstanceUID", *CSPINE_LABELS]]


# ---------------------------------------------------------------- crops and visibility
def test_boxes_by_hand():
    _, mask, _ = synthetic()
    boxes = vertebra_boxes(mask)
    assert boxes == {**BOXES, "C7": None}
    with pytest.raises(CropError, match="Z, Y, X"):
        vertebra_boxes(mask[0])


def test_visibility_rule():
    _, mask, _ = synthetic()
    assert visibility(mask, "C2") == 1.0 and visibility(mask, 6) == 1.0  # inside the field of view
    assert visibility(mask, "C7") == 0.0  # absent
    assert visibility(mask, "C1", expected_mm3=100.0) == pytest.approx(2 * 4 * 4 / 100)  # cut: 32 voxels of 100
    assert visibility(mask, "C1", expected_mm3=100.0, spacing=(2.0, 1.0, 1.0)) == pytest.approx(0.64)
    assert visibility(mask, "C1", expected_mm3=10.0) == 1.0  # clipped
    with pytest.raises(CropError, match="cut by the volume's edge"):
        visibility(mask, "C1")
    with pytest.raises(CropError, match="vertebra must be"):
        visibility(mask, "C8")
    stats = pd.concat([study_stats(mask, (1, 1, 1)), study_stats(synthetic()[1][::-1].copy(), (1, 1, 1))])
    exp = expected_volumes(stats)
    assert exp["C2"] == 4 * 6 * 6 and "C7" not in exp
    assert "C1" not in exp  # C1 is cut in both masks (the flipped one has it at the last slice)


def test_labels_visibility_rule_recomputes_overall():
    row = labels_table().iloc[0]  # C1 fractured only, and C1 is cut by the edge
    visible = {"C1": 0.2, "C2": 1.0, "C3": 1.0}
    out = vertebra_labels(row, visible)
    assert out["C1"] == 0 and out["patient_overall"] == 0  # < 30 % visible -> 0, overall recomputed
    assert vertebra_labels(row, {"C1": 0.3})["C1"] == 1  # exactly 30 % is visible
    both = vertebra_labels(labels_table().iloc[1], visible)
    assert (both["C1"], both["C3"], both["patient_overall"]) == (0, 1, 1)
    assert vertebra_labels(labels_table().iloc[1], {})["patient_overall"] == 0  # nothing visible
    with pytest.raises(CropError, match="lacks"):
        vertebra_labels({"C1": 1}, visible)


def test_crop_shape_channels_dtype():
    hu, mask, _ = synthetic()
    crop = crop_vertebra(hu, mask, "C3", n_slices=8, size=32, margin=0.1)
    assert crop.shape == (3, 8, 32, 32) and crop.dtype == np.uint8
    assert np.array_equal(crop[0], crop[1])
    assert set(np.unique(crop[2])) <= {0, 255}
    centre = crop[:, 4, 16, 16]
    assert centre[2] == 255 and centre[0] == round(255 * (700 + 800) / 2800)  # bone window 600/2800: lo = -800 HU
    assert crop[2, :, 0, 0].max() == 0 and crop[2].mean() > 50  # the vertebra fills most of the crop, not the corner
    as_uint8 = crop_vertebra(np.full(hu.shape, 7, np.uint8), mask, 3, n_slices=8, size=32)
    assert as_uint8.dtype == np.uint8 and set(np.unique(as_uint8[0])) <= {0, 7}  # uint8 used as is (pad 0)
    edge = crop_vertebra(hu, mask, "C1", n_slices=8, size=32)  # box + margin leaves the volume: padded with air
    assert edge.shape == (3, 8, 32, 32)
    with pytest.raises(CropError, match="absent"):
        crop_vertebra(hu, mask, "C7")
    with pytest.raises(CropError, match="same"):
        crop_vertebra(hu[1:], mask, "C2")


def test_build_crops_table_and_resume(tmp_path):
    calls = []

    def load(study):
        calls.append(study)
        return synthetic(shift=STUDIES.index(study))

    out = tmp_path / "crops"
    expected = {"C1": 100.0, **{f"C{i}": 144.0 for i in range(2, 8)}}
    table = build_crops(STUDIES[:2], load, out, expected, labels_table(), n_slices=8, size=32)
    assert list(table.columns) == ["StudyInstanceUID", "vertebra", "path", "visible_frac", "label"]
    assert len(table) == 14 and calls == list(STUDIES[:2])
    c7 = table[table["vertebra"] == "C7"]
    assert (c7["path"] == "").all() and (c7["visible_frac"] == 0).all() and (c7["label"] == 0).all()
    s0 = table[table["StudyInstanceUID"] == STUDIES[0]].set_index("vertebra")
    assert s0.loc["C1", "visible_frac"] == pytest.approx(0.32) and s0.loc["C1", "label"] == 1  # 32 % >= 30 %
    assert np.load(s0.loc["C2", "path"]).shape == (3, 8, 32, 32)
    again = build_crops(STUDIES, load, out, expected, labels_table(), n_slices=8, size=32)
    assert calls == list(STUDIES) and len(again) == 21  # resumed: only the new study was loaded
    pd.testing.assert_frame_equal(again, read_crop_table(out / "crops.csv"))
    with pytest.raises(CropError, match="made with"):
        build_crops(STUDIES, load, out, expected, labels_table(), n_slices=6, size=32)
    strict = {"C1": 200.0, **{f"C{i}": 144.0 for i in range(2, 8)}}  # C1 now 16 % visible -> label 0
    low = build_crops(STUDIES[:1], load, tmp_path / "strict", strict, labels_table(), n_slices=8, size=32)
    assert low.set_index("vertebra").loc["C1", "label"] == 0


# ---------------------------------------------------------------- patient_overall rules
def test_overall_rules_by_hand():
    p = np.array([[0.1, 0.2, 0.0, 0.0, 0.5, 0.0, 0.0], [0.0] * 7])
    assert np.allclose(create_rule("max").predict(p), [0.5, 0.0])
    assert np.allclose(create_rule("noisy_or").predict(p), [1 - 0.9 * 0.8 * 0.5, 0.0])
    frame = pd.DataFrame(p, columns=[f"C{i}" for i in range(1, 8)])
    assert np.allclose(create_rule("noisy_or").predict(frame), create_rule("noisy_or").predict(p))
    rng = np.random.default_rng(0)
    probs = rng.uniform(0, 0.3, (40, 7))
    y = (rng.uniform(size=40) < 0.5).astype(int)
    probs[y == 1, 2] = 0.9
    fitted = create_rule("logistic").fit(probs, y).predict(probs)
    assert fitted.shape == (40,) and fitted[y == 1].mean() > fitted[y == 0].mean()
    with pytest.raises(RuntimeError, match="fit"):
        create_rule("logistic").predict(probs)
    with pytest.raises(KeyError, match="valid names: logistic, max, noisy_or"):
        OVERALL_RULES.get("mean")
    with pytest.raises(ValueError, match=r"\(N, 7\)"):
        create_rule("max").predict(p[:, :6])


def test_rule_state_round_trip_predicts_as_sklearn():
    """The Kaggle bundle stores a fitted rule as JSON: the rebuilt rule must predict what sklearn's model does."""
    from sklearn.linear_model import LogisticRegression

    from lib.tasks.cspine.overall import rule_from_state

    rng = np.random.default_rng(1)
    probs = rng.uniform(0, 0.4, (60, 7))
    y = (rng.uniform(size=60) < 0.4).astype(int)
    probs[y == 1, 4] = rng.uniform(0.5, 0.95, int(y.sum()))
    rule = create_rule("logistic", C=0.5).fit(probs, y)
    feats = rule._features(probs)
    sk = LogisticRegression(C=0.5, class_weight={0: 7.0, 1: 14.0}, max_iter=1000).fit(feats, y)
    assert np.allclose(rule.predict(probs), sk.predict_proba(feats)[:, 1], atol=1e-12)
    state = json.loads(json.dumps(rule.state()))
    assert state["rule"] == "logistic" and state["C"] == 0.5 and len(state["coef"]) == 7
    assert np.array_equal(rule_from_state(state).predict(probs), rule.predict(probs))
    assert np.array_equal(rule_from_state(create_rule("max").state()).predict(probs), probs.max(1))
    with pytest.raises(ValueError, match="7 finite coefficients"):
        rule_from_state({**state, "coef": state["coef"][:6]})
    with pytest.raises(RuntimeError, match="fit it before"):
        create_rule("logistic").state()
    with pytest.raises(KeyError, match="valid names"):
        rule_from_state({"rule": "median"})


def test_compare_rules_uses_the_per_study_metric():
    truth = labels_table()
    vert = [f"C{i}" for i in range(1, 8)]
    oof = truth[["StudyInstanceUID"]].copy()
    for k, c in enumerate(vert):
        oof[c] = np.array([0.6, 0.3, 0.05]) / (k + 1)
    table = compare_rules(oof, truth, rules=["max", "noisy_or"]).set_index("rule")
    for rule, fn in (("max", lambda p: p.max(1)), ("noisy_or", lambda p: 1 - np.prod(1 - p, 1))):
        wide = oof.assign(patient_overall=fn(oof[vert].to_numpy()))
        sub = wide.melt(id_vars="StudyInstanceUID", var_name="label", value_name="fractured")
        sub["row_id"] = sub["StudyInstanceUID"] + "_" + sub["label"]
        assert table.loc[rule, "score"] == pytest.approx(cspine_score(truth, sub[["row_id", "fractured"]]))
    rng = np.random.default_rng(1)
    big_truth = pd.concat([truth] * 6, ignore_index=True)
    big_truth["StudyInstanceUID"] = [f"s{i}" for i in range(len(big_truth))]
    big_oof = big_truth[["StudyInstanceUID"]].assign(**{c: rng.uniform(0, 1, len(big_truth)) for c in vert})
    all_rules = compare_rules(big_oof, big_truth, cv=3)
    assert list(all_rules["rule"]) == ["logistic", "max", "noisy_or"] and np.isfinite(all_rules["score"]).all()


# ---------------------------------------------------------------- dataset, folds, models, training
def _tiny_cfg(**kw):
    from lib.tasks.cspine.classify import CspineConfig

    base = dict(model="twofive_lstm", backbone="resnet10t", head="lstm", context=2, img_size=32, n_slices=8,
                overall_rule="max", epochs=2, lr=1e-3, bs=4, seed=0, pretrained_path=None, device="cpu")
    return CspineConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def crop_table(tmp_path_factory):
    out = tmp_path_factory.mktemp("cspine_crops")
    expected = {"C1": 100.0, **{f"C{i}": 144.0 for i in range(2, 8)}}
    return build_crops(STUDIES, lambda s: synthetic(shift=STUDIES.index(s)), out, expected, labels_table(),
                       n_slices=8, size=32)


def test_dataset_shapes(crop_table):
    from lib.tasks.cspine.classify import CropDataset, collate

    ds = CropDataset(crop_table, n_slices=6, img_size=16)
    assert len(ds) == 18  # C7 has no crop in any study
    item = ds[0]
    assert item["x"].shape == (3, 6, 16, 16) and item["x"].dtype == torch.float32
    assert 0.0 <= float(item["x"].min()) and float(item["x"].max()) <= 1.0 and item["y"].shape == ()
    x, y = collate([ds[0], ds[1]])
    assert x.shape == (2, 3, 6, 16, 16) and y.shape == (2,)


def test_config_and_folds():
    from lib.tasks.cspine.classify import CspineConfig, study_folds

    with pytest.raises(KeyError, match="valid names"):
        _tiny_cfg(model="unet")
    with pytest.raises(KeyError, match="ir_csn_152"):
        _tiny_cfg(model="csn3d", backbone="resnet10t")
    with pytest.raises(ValueError, match="needs a fit"):
        _tiny_cfg(overall_rule="logistic")
    with pytest.raises(KeyError, match="needs values"):
        CspineConfig.from_dict({"model": "csn3d"})
    train = pd.concat([labels_table()] * 4, ignore_index=True)
    train["StudyInstanceUID"] = [f"1.2.{i}" for i in range(len(train))]
    folds = study_folds(train, n_folds=3, seed=0)
    assert sorted(folds.index) == sorted(train["StudyInstanceUID"]) and set(folds) == {0, 1, 2}
    assert folds.equals(study_folds(train.iloc[::-1], n_folds=3, seed=0))
    assert (train.set_index("StudyInstanceUID")["patient_overall"].groupby(folds).sum() > 0).all()


def test_twofive_forward_backward(one_thread):
    from lib.tasks.cspine.classify import build_model

    model = build_model(_tiny_cfg(head="gru_conv"))
    x = torch.rand(2, 3, 8, 32, 32)
    images = model.slice_images(x)
    assert images.shape == (2, 8, 6, 32, 32)
    assert torch.equal(images[:, 3, 0], x[:, 0, 1]) and torch.equal(images[:, 3, 4], x[:, 0, 5])  # t-2 .. t+2
    assert torch.equal(images[:, 0, 0], x[:, 0, 0]) and torch.equal(images[:, 3, 5], x[:, 2, 3])  # clamp; mask
    out = model(x)
    assert out.shape == (2,)
    out.sum().backward()
    assert all(p.grad is not None for p in model.cnn.parameters() if p.requires_grad)


def test_csn3d_forward_backward(one_thread):
    pytest.importorskip("lib.models.csn", reason="lib/models/csn.py (IrCSN) is not there yet")
    from lib.tasks.cspine.classify import build_model

    model = build_model(_tiny_cfg(model="csn3d", backbone="ir_csn_26"))
    out = model(torch.rand(2, 3, 8, 32, 32))  # B=2: layer4 is 1x1x1 here, BatchNorm needs > 1 value in training
    assert out.shape == (2,)
    out.sum().backward()


def test_weighted_bce_by_hand():
    from lib.tasks.cspine.classify import WeightedBCE

    logits, y = torch.tensor([0.0, 2.0]), torch.tensor([1.0, 0.0])
    ll = torch.nn.functional.binary_cross_entropy_with_logits(logits, y, reduction="none")
    assert WeightedBCE()(logits, y).item() == pytest.approx(((2 * ll[0] + ll[1]) / 3).item())


@pytest.mark.slow
def test_tiny_training_resume(crop_table, tmp_path, one_thread):
    from fastai.callback.core import Callback, CancelFitException

    from lib.tasks.cspine.classify import train_vertebra_classifier

    class StopAfterFirst(Callback):
        order = 70  # after EpochCheckpoint wrote epoch0.pth

        def after_epoch(self):
            raise CancelFitException()

    class CountBatches(Callback):
        def __init__(self):
            self.n = 0

        def after_batch(self):
            self.n += 1

    train_rows = crop_table[crop_table["StudyInstanceUID"] != STUDIES[2]]
    valid_rows = crop_table[crop_table["StudyInstanceUID"] == STUDIES[2]]
    cfg = _tiny_cfg(head="lstm")
    full = train_vertebra_classifier(tmp_path / "a", "fold0", train_rows, valid_rows, cfg)
    assert full["epochs_done"] == 2 and np.isfinite(full["valid_score"])
    assert list(full["oof"].columns) == ["StudyInstanceUID", *CSPINE_LABELS[:7]]
    assert full["oof"]["C7"].iloc[0] == pytest.approx(0.01)  # no crop -> ABSENT_PROB
    part = train_vertebra_classifier(tmp_path / "b", "fold0", train_rows, valid_rows, cfg, cbs=[StopAfterFirst()])
    assert part["epochs_done"] == 1
    resumed = train_vertebra_classifier(tmp_path / "b", "fold0", train_rows, valid_rows, cfg)
    assert resumed["epochs_done"] == 2 and resumed["resumed_from"].endswith("epoch0.pth")
    a = torch.load(Path(full["model_dir"]) / "epoch1.pth", weights_only=True)["model"]
    b = torch.load(Path(resumed["model_dir"]) / "epoch1.pth", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)  # exact resume
    counter = CountBatches()
    done = train_vertebra_classifier(tmp_path / "b", "fold0", train_rows, valid_rows, cfg, cbs=[counter])
    assert counter.n == 0 and done["epochs_done"] == 2 and done["valid_score"] == pytest.approx(resumed["valid_score"])
    log = pd.read_csv(Path(done["model_dir"]) / "log.csv")
    assert log["epoch"].tolist() == [0, 1] and "cspine_logloss" in log.columns
