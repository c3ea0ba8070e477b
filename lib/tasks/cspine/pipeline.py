"""Stage-level helpers the cervical-spine notebooks call: the study volume cache of a run, mask prediction for every
study, per-vertebra crops from the native volumes, cross-validated vertebra classifiers, the patient_overall rule,
the OOF-tuned blend, the submission and the report table.

Run folder (beside the shared RunPaths files):
  volumes/studies.csv        study_id, split, shape, spacing, path, seg_path (the volume cache's rows of this run)
  volumes/bad.csv            studies the cache could not read (study_id, split, reason, detail)
  masks/<study>.npy          predicted C1..C7 labels on the cache grid; masks/meta.json (model identity)
  crops/<split>/crops.csv    lib.tasks.cspine.crops tables (train: visibility-rule labels)
  predictions/oof_<name>.csv, test_<name>.csv   StudyInstanceUID + C1..C7 (fold models; test = mean over folds)
  models/ensemble.json       blend weights, the fitted patient_overall rule, the prior (the Kaggle bundle reads it)
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from lib.evaluate.study_logloss import study_weighted_logloss
from lib.io.ids import child_path
from lib.paths import RunPaths, atomic_save_npy, atomic_write, atomic_write_text
from lib.progress import progress_bar
from lib.tasks.cspine.data import CspineData, write_submission
from lib.tasks.cspine.metric import (CSPINE_GROUP, CSPINE_LABELS, CSPINE_NEG_WEIGHTS, CSPINE_POS_WEIGHTS,
                                     cspine_prior_baseline, cspine_score)

if TYPE_CHECKING:
    from lib.imaging.windowing import Window

VERTEBRAE = CSPINE_LABELS[:7]
OVERALL = CSPINE_LABELS[7]
SPLITS = ("train", "test")


# ---------------------------------------------------------------- volumes
def cache_studies(rp: RunPaths, data: CspineData, size: Optional[Sequence[int]], spacing: Optional[Sequence[float]],
                  hu_window: Sequence[float], dtype: str = "uint8", workers: Optional[int] = None,
                  progress: bool = True, splits: Sequence[str] = SPLITS) -> Tuple[pd.DataFrame, pd.DataFrame]:
    """Cache the labelled training studies (with their segmentations) and the test studies to predict in one volume
    cache under RUN/cache/ (lib.imaging.volume_cache: resumable, parallel, a bad study is a row, not a crash).
    Writes and returns (RUN/volumes/studies.csv, RUN/volumes/bad.csv); records `volume_cache` and `studies`."""
    from lib.imaging.volume_cache import cache_dir_for, cache_volumes

    studies: Dict[str, Path] = {}
    split_of: Dict[str, str] = {}
    for split in splits:
        found = data.train_studies() if split == "train" else data.test_studies()
        studies.update(found)
        split_of.update({s: split for s in found})
    segs = data.segmentation_paths([s for s, k in split_of.items() if k == "train"]) if "train" in splits else {}
    grid = {"size": tuple(size) if size else None, "spacing": tuple(spacing) if spacing else None,
            "hu_window": tuple(float(v) for v in hu_window), "dtype": dtype}
    table, bad = cache_volumes(studies, rp.root / "cache", workers=workers, progress=progress, seg_paths=segs, **grid)
    table.insert(1, "split", table["study_id"].map(split_of))
    bad.insert(1, "split", bad["study_id"].map(split_of))
    out = rp.root / "volumes"
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / "studies.csv", lambda tmp: table.to_csv(tmp, index=False))
    atomic_write(out / "bad.csv", lambda tmp: bad.to_csv(tmp, index=False))
    rp.record("volume_cache", cache_dir_for(rp.root / "cache", **grid))
    rp.record("studies", out / "studies.csv")
    return table, bad


def read_studies(rp: RunPaths) -> pd.DataFrame:
    """RUN/volumes/studies.csv (shape / spacing as tuples, seg_path NaN without a mask)."""
    table = pd.read_csv(rp.lookup("studies"), dtype={"study_id": str, "split": str, "path": str})
    for col in ("shape", "spacing"):
        table[col] = [tuple(json.loads(v.replace("(", "[").replace(")", "]"))) for v in table[col]]
    return table


def seg_valid_ids(table: pd.DataFrame, valid_frac: float, seed: int) -> List[str]:
    """The held-out studies of the segmentation model: `valid_frac` of the masked training studies (at least 1)."""
    masked = sorted(table.loc[(table["split"] == "train") & table["seg_path"].notna(), "study_id"])
    if len(masked) < 2:
        raise ValueError(f"{len(masked)} training studies with a segmentation; the segmentation stage needs >= 2")
    n = min(len(masked) - 1, max(1, int(round(valid_frac * len(masked)))))
    return sorted(np.random.default_rng(seed).choice(masked, n, replace=False).tolist())


# ---------------------------------------------------------------- masks for every study
def _identity(path: Path) -> str:
    st = path.stat()
    return f"{path.name}:{st.st_size}:{st.st_mtime_ns}"


def predict_all_masks(rp: RunPaths, model_path: Path, overlap: float = 0.25, bs: int = 1, device: str = "auto",
                      progress: bool = True) -> pd.DataFrame:
    """Sliding-window C1..C7 masks of every cached study -> RUN/masks/<study>.npy (uint8 on the cache grid).

    Resumable: a study whose mask exists under the same model checkpoint and overlap is not predicted again (a new
    model empties the folder's record). Returns study_id, split, mask, voxels_C1..voxels_C7.
    """
    from lib.imaging.volume_cache import load_volume
    from lib.tasks.cspine.seg import load_seg3d, predict_masks

    out = rp.root / "masks"
    out.mkdir(parents=True, exist_ok=True)
    meta = {"model": _identity(model_path), "overlap": overlap}
    meta_path = out / "meta.json"
    same = meta_path.is_file() and json.loads(meta_path.read_text()) == meta
    atomic_write_text(meta_path, json.dumps(meta))
    model, cfg = load_seg3d(model_path)
    cache = rp.lookup("volume_cache")
    rows = []
    for row in progress_bar(read_studies(rp).to_dict("records"), desc="masks", unit="study", disable=not progress):
        path = child_path(out, row["study_id"], ".npy")
        if same and path.is_file():
            mask = np.load(path, mmap_mode="r")
        else:
            mask = predict_masks(model, load_volume(cache, row), roi=cfg.roi, overlap=overlap, bs=bs, device=device)
            atomic_save_npy(path, mask)
        counts = np.bincount(np.asarray(mask).ravel(), minlength=8)[1:8]
        rows.append({"study_id": row["study_id"], "split": row["split"], "mask": path.name,
                     **{f"voxels_{v}": int(c) for v, c in zip(VERTEBRAE, counts)}})
    table = pd.DataFrame(rows)
    atomic_write(out / "masks.csv", lambda tmp: table.to_csv(tmp, index=False))
    rp.record("masks", out)
    return table


def load_mask(rp: RunPaths, study: str) -> np.ndarray:
    return np.load(child_path(rp.lookup("masks"), study, ".npy"))


def mask_dice(rp: RunPaths, studies: Sequence[str]) -> pd.DataFrame:
    """Dice per vertebra of the predicted masks against the cached truth masks of `studies` (overlaps summed over
    the studies): one row per vertebra + "mean"."""
    from lib.imaging.volume_cache import load_segmentation
    from lib.tasks.cspine.seg_data import cervical_labels

    table = read_studies(rp).set_index("study_id")
    cls = np.arange(1, 8).reshape(-1, 1)
    total = None
    for s in studies:
        true = cervical_labels(load_segmentation(rp.lookup("volume_cache"), table.loc[s].to_dict())).reshape(1, -1)
        pred = load_mask(rp, s).reshape(1, -1)
        counts = np.stack([((pred == cls) & (true == cls)).sum(1), (pred == cls).sum(1), (true == cls).sum(1)])
        total = counts if total is None else total + counts
    inter, p, t = (total if total is not None else np.zeros((3, 7)))
    dice = np.where(p + t > 0, 2 * inter / np.maximum(p + t, 1), 1.0)
    out = pd.DataFrame({"vertebra": list(VERTEBRAE), "dice": dice})
    return pd.concat([out, pd.DataFrame([{"vertebra": "mean", "dice": float(dice.mean())}])], ignore_index=True)


# ---------------------------------------------------------------- crops from the native volumes
def native_loader(rp: RunPaths, data: CspineData):
    """study -> (HU volume on its native grid, the predicted mask resampled to it (nearest), native spacing): the
    seed's crops come from full-resolution CT, the mask from the downsampled segmentation grid."""
    from lib.imaging.volume_cache import resample
    from lib.io.ct_volume import read_ct_volume

    split = read_studies(rp).set_index("study_id")["split"].to_dict()

    def load(study: str):
        vol = read_ct_volume(data.images(split[study]) / study)
        mask = load_mask(rp, study)
        return vol.hu, resample(mask, vol.hu.shape, labels=True).astype(np.uint8), tuple(vol.spacing)

    return load


def expected_vertebra_volumes(rp: RunPaths) -> Dict[str, float]:
    """Median uncut volume (mm^3) per vertebra over the predicted masks of the training studies (the visibility
    rule's reference), measured on the cache grid."""
    from lib.tasks.cspine.crops import expected_volumes, study_stats

    table = read_studies(rp)
    stats = [study_stats(load_mask(rp, r["study_id"]), r["spacing"]) for r in table.to_dict("records")
             if r["split"] == "train"]
    return expected_volumes(pd.concat(stats, ignore_index=True)) if stats else {}


def make_crops(rp: RunPaths, data: CspineData, split: str, n_slices: int, size: int, margin: float,
               window: Union[str, "Window"] = "bone", threshold: float = 0.3, expected: Optional[Dict[str, float]] = None,
               progress: bool = True) -> pd.DataFrame:
    """Per-vertebra crops of every cached study of `split` into RUN/crops/<split>/ (lib.tasks.cspine.crops;
    `window` a WINDOWS name or a Window); training crops carry the visibility-rule labels of train.csv. Resumable.
    Records `crops_<split>`."""
    from lib.imaging.windowing import WINDOWS
    from lib.tasks.cspine.crops import build_crops

    studies = read_studies(rp)
    ids = studies.loc[studies["split"] == split, "study_id"].tolist()
    expected = expected_vertebra_volumes(rp) if expected is None else expected
    labels = data.labels() if split == "train" else None
    out = rp.root / "crops" / split
    load = native_loader(rp, data)
    # build_crops is resumable per study; the bar wraps its study loop
    table = build_crops(progress_bar(ids, desc=f"crops {split}", unit="study", disable=not progress), load, out,
                        expected, labels, n_slices=n_slices, size=size, margin=margin,
                        window=WINDOWS[window] if isinstance(window, str) else window,
                        threshold=threshold)
    rp.record(f"crops_{split}", out / "crops.csv")
    return table


# ---------------------------------------------------------------- classifiers
def _prediction_path(rp: RunPaths, kind: str, name: str) -> Path:
    return rp.root / "predictions" / f"{kind}_{name}.csv"


def read_prediction(rp: RunPaths, kind: str, name: str) -> pd.DataFrame:
    return pd.read_csv(_prediction_path(rp, kind, name), dtype={CSPINE_GROUP: str})


def classifier_cv(rp: RunPaths, name: str, cfg, crops: pd.DataFrame, test_crops: pd.DataFrame, labels: pd.DataFrame,
                  folds: pd.Series) -> Dict[str, object]:
    """Train one fold model per fold (`train_vertebra_classifier`, validated on the competition truth of its
    held-out studies), write predictions/oof_<name>.csv (C1..C7 out of fold) and test_<name>.csv (mean of the fold
    models, `fold_mean_test`). Returns {"oof", "test", "fold_scores"}."""
    from lib.tasks.cspine.classify import train_vertebra_classifier

    oofs, dirs, scores = [], [], {}
    for k in sorted(folds.unique()):
        valid_ids = set(folds.index[folds == k])
        tr = crops[~crops[CSPINE_GROUP].isin(valid_ids)].reset_index(drop=True)
        va = crops[crops[CSPINE_GROUP].isin(valid_ids)].reset_index(drop=True)
        truth = labels[labels[CSPINE_GROUP].isin(valid_ids)]
        res = train_vertebra_classifier(rp.root, f"{name}_fold{k}", tr, va, cfg, truth=truth)
        scores[int(k)] = res["valid_score"]
        oofs.append(res["oof"])
        dirs.append(res["model_dir"])
    oof = pd.concat(oofs, ignore_index=True)
    test = fold_mean_test(dirs, test_crops, cfg)
    (rp.root / "predictions").mkdir(parents=True, exist_ok=True)
    for kind, frame in (("oof", oof), ("test", test)):
        atomic_write(_prediction_path(rp, kind, name), lambda tmp, f=frame: f.to_csv(tmp, index=False))
    return {"oof": oof, "test": test, "fold_scores": scores}


def fold_mean_test(models: Sequence, test_crops: pd.DataFrame, cfg) -> pd.DataFrame:
    """StudyInstanceUID + C1..C7: the mean over the fold models (folders or checkpoint files) of their predictions
    on the test crops, in the crops' study order (empty without test crops). The run and its Kaggle kernel both
    predict the test set with this."""
    from lib.tasks.cspine.classify import load_vertebra_classifier, predict_vertebrae

    if not len(test_crops) or not len(models):
        return pd.DataFrame(columns=[CSPINE_GROUP, *VERTEBRAE])
    preds = [predict_vertebrae(load_vertebra_classifier(m, cfg), test_crops, cfg).set_index(CSPINE_GROUP)
             for m in models]
    return (sum(preds) / len(preds)).reset_index()


def per_label_losses(truth: pd.DataFrame, pred: pd.DataFrame) -> Dict[str, float]:
    """Weighted log loss of each label column alone (the metric's weights, pooled over studies)."""
    out = {}
    merged = truth.merge(pred, on=CSPINE_GROUP, suffixes=("", "_p"))
    for c in CSPINE_LABELS:
        y, p = merged[c].to_numpy(float), np.clip(merged[f"{c}_p"].to_numpy(float), 1e-15, 1 - 1e-15)
        w = np.where(y > 0, CSPINE_POS_WEIGHTS[c], CSPINE_NEG_WEIGHTS[c])
        out[c] = float((w * -(y * np.log(p) + (1 - y) * np.log1p(-p))).sum() / w.sum())
    return out


def score(truth: pd.DataFrame, pred: pd.DataFrame) -> float:
    """The competition's per-study weighted log loss of wide predictions (8 labels) against train.csv rows."""
    truth = truth[truth[CSPINE_GROUP].isin(pred[CSPINE_GROUP])]
    return study_weighted_logloss(truth, pred, CSPINE_LABELS, CSPINE_POS_WEIGHTS, CSPINE_NEG_WEIGHTS, CSPINE_GROUP)


def oof_table(oofs: Dict[str, pd.DataFrame], labels: pd.DataFrame, rules: Sequence[str] = ("max", "noisy_or",
              "logistic"), seed: int = 0) -> pd.DataFrame:
    """One row per (prediction set, overall rule) + the prior: the per-study score and each label's loss (OOF)."""
    from lib.tasks.cspine.overall import compare_rules

    rows = []
    for name, oof in oofs.items():
        truth = labels[labels[CSPINE_GROUP].isin(oof[CSPINE_GROUP])]
        cmp = compare_rules(oof, truth, list(rules), seed=seed).set_index("rule")
        for rule in rules:
            pred = oof_with_rule(oof, rule, truth, seed)
            rows.append({"model": name, "rule": rule, "score": float(cmp.loc[rule, "score"]),
                         **per_label_losses(truth, pred)})
    first = next(iter(oofs.values()))
    truth = labels[labels[CSPINE_GROUP].isin(first[CSPINE_GROUP])]
    prior = truth[[CSPINE_GROUP]].assign(**{c: float(labels[c].mean()) for c in CSPINE_LABELS})
    rows.append({"model": "prior", "rule": "-", "score": cspine_prior_baseline(truth, labels)[0],
                 **per_label_losses(truth, prior)})
    return pd.DataFrame(rows)


def oof_with_rule(oof: pd.DataFrame, rule: str, truth: pd.DataFrame, seed: int = 0, cv: int = 5) -> pd.DataFrame:
    """OOF vertebra predictions + patient_overall by `rule`, a fitted rule cross-fitted as in `compare_rules` (no
    study's overall comes from a rule fitted on it), so the per-label losses match the score column."""
    from lib.tasks.cspine.overall import cross_fitted, as_matrix, create_rule, with_overall

    r = create_rule(rule)
    if not r.needs_fit:
        return with_overall(oof, r)
    merged = (oof[[CSPINE_GROUP, *VERTEBRAE]].merge(truth[[CSPINE_GROUP, OVERALL]], on=CSPINE_GROUP)
              .sort_values(CSPINE_GROUP, kind="stable").reset_index(drop=True))  # the folds of `compare_rules`
    overall = cross_fitted(rule, as_matrix(merged), merged[OVERALL].to_numpy(np.int64), cv, seed)
    return merged[[CSPINE_GROUP, *VERTEBRAE]].assign(**{OVERALL: overall})


def fit_rule(rule: str, oof: pd.DataFrame, truth: pd.DataFrame):
    """The `rule` to apply at test time: a fitted rule is fitted on all of (oof, truth); a fit-free one as is."""
    from lib.tasks.cspine.overall import create_rule

    r = create_rule(rule)
    if r.needs_fit:
        merged = oof.merge(truth[[CSPINE_GROUP, OVERALL]], on=CSPINE_GROUP)
        r.fit(merged[list(VERTEBRAE)], merged[OVERALL].to_numpy())
    return r


def with_rule(vert: pd.DataFrame, rule: str, oof: pd.DataFrame, truth: pd.DataFrame, seed: int = 0) -> pd.DataFrame:
    """`vert` + patient_overall by `rule` (`fit_rule`: the test-time prediction; OOF rows themselves are scored by
    `oof_with_rule`)."""
    from lib.tasks.cspine.overall import with_overall

    return with_overall(vert, fit_rule(rule, oof, truth))


# ---------------------------------------------------------------- blend and submission
def blend_weights(oofs: Dict[str, pd.DataFrame], labels: pd.DataFrame, rule: str, method: str,
                  step: float = 0.1, seed: int = 0) -> Dict[str, float]:
    """Weights of the prediction sets: "mean" equal, "best" the single best OOF set, "tuned" the grid (step) on the
    simplex with the lowest OOF score (overall by a fit-free `rule`, or max while tuning a fitted one)."""
    names = list(oofs)
    if method == "mean" or len(names) == 1:
        return {n: 1.0 / len(names) for n in names}
    if method not in ("best", "tuned"):
        raise ValueError(f"blend method must be mean | best | tuned, got {method!r}")
    tune_rule = rule if rule in ("max", "noisy_or") else "max"
    studies = sorted(set.intersection(*(set(o[CSPINE_GROUP]) for o in oofs.values())))
    mats = [o.set_index(CSPINE_GROUP).loc[studies, list(VERTEBRAE)].to_numpy() for o in oofs.values()]
    truth = labels[labels[CSPINE_GROUP].isin(studies)]

    def loss(w: Sequence[float]) -> float:
        p = sum(wi * m for wi, m in zip(w, mats))
        vert = pd.DataFrame(p, columns=list(VERTEBRAE)).assign(**{CSPINE_GROUP: studies})
        return score(truth, with_rule(vert, tune_rule, vert, truth))

    if method == "best":
        best = min(range(len(names)), key=lambda i: loss([float(i == j) for j in range(len(names))]))
        return {n: float(i == best) for i, n in enumerate(names)}
    n_steps = int(round(1 / step))
    grid = [w for w in np.ndindex(*([n_steps + 1] * len(names))) if sum(w) == n_steps]
    best_w = min(grid, key=lambda w: loss([wi / n_steps for wi in w]))
    return {n: wi / n_steps for n, wi in zip(names, best_w)}


def blend(frames: Dict[str, pd.DataFrame], weights: Dict[str, float]) -> pd.DataFrame:
    """Weighted mean of C1..C7 over the prediction sets (studies present in all of them)."""
    studies = sorted(set.intersection(*(set(f[CSPINE_GROUP]) for f in frames.values())))
    p = sum(w * frames[n].set_index(CSPINE_GROUP).loc[studies, list(VERTEBRAE)].to_numpy()
            for n, w in weights.items())
    return pd.DataFrame(p, columns=list(VERTEBRAE)).assign(**{CSPINE_GROUP: studies})[[CSPINE_GROUP, *VERTEBRAE]]


def ensemble_path(rp: RunPaths) -> Path:
    return rp.root / "models" / "ensemble.json"


def save_ensemble(rp: RunPaths, weights: Dict[str, float], method: str, rule, prior: Dict[str, float]) -> Path:
    """RUN/models/ensemble.json: what the test predictions went through (blend weights, the fitted
    patient_overall rule's state, the prior of a study without a prediction); the Kaggle bundle reads it."""
    record = {"weights": {k: float(v) for k, v in weights.items()}, "method": method, "rule": rule.state(),
              "prior": {c: float(prior[c]) for c in CSPINE_LABELS}}
    path = ensemble_path(rp)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(record, indent=1))
    rp.record("ensemble", path)
    return path


def read_ensemble(path: Path) -> Dict[str, object]:
    """An ensemble record (`save_ensemble`); ValueError naming what a malformed one lacks."""
    record = json.loads(Path(path).read_text())
    missing = [k for k in ("weights", "method", "rule", "prior") if k not in record]
    if missing or set(record.get("prior", {})) != set(CSPINE_LABELS) or not any(
            w > 0 for w in record.get("weights", {}).values()):
        raise ValueError(f"{path}: not an ensemble record (needs weights with one > 0, method, rule, and a prior of "
                         f"{list(CSPINE_LABELS)}; lacks {missing})")
    return record


def apply_ensemble(tests: Dict[str, pd.DataFrame], record: Dict[str, object]) -> pd.DataFrame:
    """Wide test predictions (8 labels) from each model's fold-mean vertebra predictions and an ensemble record
    (`save_ensemble`): the weighted blend, then patient_overall by the recorded (fitted) rule."""
    from lib.tasks.cspine.overall import rule_from_state, with_overall

    weights = {n: w for n, w in record["weights"].items() if w > 0}
    missing = sorted(set(weights) - set(tests))
    if missing:
        raise KeyError(f"the ensemble blends {sorted(weights)}; no test predictions for {missing}")
    return with_overall(blend({n: tests[n] for n in weights}, weights), rule_from_state(record["rule"]))


def write_cspine_submission(rp: RunPaths, data: CspineData, test: pd.DataFrame, prior: Dict[str, float]
                            ) -> Tuple[Path, int]:
    """submission.csv: 8 rows per study present in test_images (`CspineData.test_studies`), prior for a study no
    model could predict (unreadable, or no crop)."""
    return write_submission(test, list(data.test_studies()), prior, rp.submission)


def submission_score(path: Path, truth: pd.DataFrame) -> float:
    sub = pd.read_csv(path)
    return cspine_score(truth, sub)


def summary(metrics: Dict[str, object]) -> str:
    """The report table `python -m lib.report RUN` prints for this task."""
    lines = ["RSNA 2022 cervical spine: per-study weighted log loss (lower is better)"]
    if "seg_valid_dice" in metrics:
        per = " ".join(f"{v} {metrics.get(f'seg_valid_dice_{v}', float('nan')):.3f}" for v in VERTEBRAE)
        lines.append(f"  segmentation valid Dice (mean C1-C7) {metrics['seg_valid_dice']:.3f}   [{per}]")
    for key, label in (("oof_logloss_prior", "prior (train prevalence)"), ("oof_logloss", "OOF (blend)"),
                       ("test_submission_logloss", "submission vs the phantom's truth"),
                       ("test_submission_logloss_prior", "prior on the test studies")):
        if key in metrics:
            lines.append(f"  {label:<36} {metrics[key]:.4f}")
    for key in sorted(k for k in metrics if k.startswith("oof_logloss_") and k != "oof_logloss_prior"):
        lines.append(f"    {key:<34} {metrics[key]:.4f}")
    for key in ("overall_rule", "ensemble_weights", "n_test_studies_prior", "n_bad_studies"):
        if key in metrics:
            lines.append(f"  {key}: {metrics[key]}")
    return "\n".join(lines)


# ---------------------------------------------------------------- figures
def reformat_figures(rp: RunPaths, data: CspineData, studies: Sequence[str]) -> Iterator[Tuple[plt.Figure, str]]:
    """Mid-sagittal and mid-coronal reformats of cached studies with the predicted mask overlaid."""
    from lib.imaging.volume_cache import load_volume

    table = read_studies(rp).set_index("study_id")
    for s in studies:
        row = table.loc[s].to_dict()
        vol = np.asarray(load_volume(rp.lookup("volume_cache"), row))
        mask = load_mask(rp, s)
        fig, axes = plt.subplots(1, 2, figsize=(8, 4))
        for ax, axis, title in zip(axes, (2, 1), ("sagittal", "coronal")):
            mid = vol.shape[axis] // 2
            img, m = np.take(vol, mid, axis=axis), np.take(mask, mid, axis=axis)
            ax.imshow(img, cmap="gray", aspect="auto")
            ax.imshow(np.ma.masked_equal(m, 0), cmap="tab10", vmin=0, vmax=9, alpha=0.45, aspect="auto")
            ax.set_title(f"{title} (predicted C1-C7)")
            ax.axis("off")
        fig.suptitle(s, fontsize=8)
        yield fig, f"reformat_{s.split('.')[-1]}"


def prior_score(truth: pd.DataFrame, prior: Dict[str, float], studies: Sequence[str]) -> float:
    """The per-study score of predicting `prior` (training prevalences) for every label of `studies`."""
    pred = pd.DataFrame({CSPINE_GROUP: list(studies), **{c: float(prior[c]) for c in CSPINE_LABELS}})
    return score(truth, pred)


def fold_table(rp: RunPaths) -> pd.DataFrame:
    """Per model and fold: the best epoch's validation score (train_result.json of each fold model)."""
    rows = []
    for path in sorted((rp.root / "models" / "cspine").glob("*/train_result.json")):
        res = json.loads(path.read_text())
        model, _, fold = path.parent.name.rpartition("_fold")
        rows.append({"model": model, "fold": int(fold), "valid_score": res["valid_score"],
                     "best_epoch": res["best_epoch"], "epochs_done": res["epochs_done"],
                     "n_train_crops": res["n_train_crops"], "n_valid_crops": res["n_valid_crops"],
                     "wall_time_s": round(res["wall_time_s"], 1)})
    table = pd.DataFrame(rows)
    if len(table):
        stats = table.groupby("model")["valid_score"].agg(["mean", "std"]).reset_index()
        table = pd.concat([table, stats.rename(columns={"mean": "valid_score", "std": "std"}).assign(fold=-1)],
                          ignore_index=True)
    return table


def reliability_figures(rp: RunPaths, labels: pd.DataFrame, bins: int = 5) -> Iterator[Tuple[plt.Figure, str]]:
    """Reliability curve (mean prediction vs observed rate per quantile bin) of each model's OOF per label."""
    for name in rp.metrics().get("cls_models", []):
        oof = read_prediction(rp, "oof", name).merge(labels, on=CSPINE_GROUP, suffixes=("", "_y"))
        fig, ax = plt.subplots(figsize=(4.5, 4.5))
        for c in VERTEBRAE:
            p, y = oof[c].to_numpy(float), oof[f"{c}_y"].to_numpy(float)
            edges = np.unique(np.quantile(p, np.linspace(0, 1, bins + 1)))
            idx = np.clip(np.searchsorted(edges, p, side="right") - 1, 0, len(edges) - 2) if len(edges) > 1 else \
                np.zeros(len(p), int)
            pts = [(p[idx == b].mean(), y[idx == b].mean()) for b in np.unique(idx)]
            ax.plot(*zip(*pts), marker="o", lw=1, label=c)
        ax.plot([0, 1], [0, 1], color="grey", ls="--", lw=0.8)
        ax.set(xlabel="mean OOF prediction", ylabel="observed fracture rate", title=f"{name}: OOF reliability")
        ax.legend(fontsize=7)
        yield fig, f"reliability_{name}"
