"""Stage-level helpers the BraTS notebooks call: mask prediction over the series cache, cross-validated classifiers
per MRI type, AUC tables, the blend, the submission and the figures."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from sklearn.metrics import roc_auc_score, roc_curve

from lib.evaluate.bootstrap import auc_ci, fold_auc_summary
from lib.io.ids import child_path
from lib.io.mr_series import SEQUENCES
from lib.paths import RunPaths, atomic_save_npy, atomic_write, atomic_write_text
from lib.progress import progress_bar
from lib.tasks.brats.data import LABEL, BratsData, read_ids_table, write_submission

STACK_COLUMNS = ["BraTS21ID", "sequence", "plane", "n_slices", "n_kept", "path"]


# ---------------------------------------------------------------- stage 1 on task 2: masks and stacks
def stacks_table_path(rp: RunPaths, split: str) -> Path:
    return rp.root / "stacks" / f"{split}.parquet"


def _series_table(rp: RunPaths, split: str) -> pd.DataFrame:
    return pd.read_parquet(rp.lookup("series_cache") / f"series_{split}.parquet")


def _model_identity(path: Path) -> str:
    st = path.stat()
    return f"{path.name}:{st.st_size}:{st.st_mtime_ns}"


def _non_negative(vol: np.ndarray) -> np.ndarray:
    """A z-scored volume (brain voxels of any sign, background exactly 0) shifted so the brain is > 0 and the
    background stays 0: what `masks.select_slices` reads as brain (> 0) and scales to uint8."""
    brain = vol != 0
    if not brain.any():
        return vol
    return np.where(brain, vol - vol[brain].min() + 1e-3, 0).astype(np.float32)


def predict_masks(rp: RunPaths, split: str, zoom: float, threshold: float, min_ratio: float, max_contours: int,
                  bs: int, device: Optional[str] = None, progress: bool = True) -> pd.DataFrame:
    """Predict WT / ET on every cached series of `split` (zoom TTA), keep the slices the contour filter passes and
    write `[image, WT, ET]` uint8 stacks (Z', 3, S, S) to RUN/stacks/<split>/<id>/<sequence>.npy.

    Returns and writes the stack table (STACK_COLUMNS; n_kept 0 = no slice passed, no file). Resumable: series
    done with the same model checkpoint and parameters are not predicted again.
    """
    from lib.tasks.brats.masks import select_slices, zoom_predict
    from lib.tasks.brats.preprocess import load_series
    from lib.train.seg import load_seg_model, predict_seg

    model_path = rp.lookup("seg_model")
    out = rp.root / "stacks" / split
    out.mkdir(parents=True, exist_ok=True)
    meta = {"model": _model_identity(model_path), "zoom": zoom, "threshold": threshold, "min_ratio": min_ratio,
            "max_contours": max_contours}
    table_path = stacks_table_path(rp, split)
    done: Dict[Tuple[str, str], dict] = {}
    meta_path = out / "meta.json"
    if table_path.exists() and meta_path.exists() and json.loads(meta_path.read_text()) == meta:
        done = {(r["BraTS21ID"], r["sequence"]): r for r in pd.read_parquet(table_path).to_dict("records")}
    atomic_write_text(meta_path, json.dumps(meta))
    model = load_seg_model(model_path)
    series_dir = rp.lookup("series_cache")
    rows = []
    series = _series_table(rp, split).to_dict("records")
    for row in progress_bar(series, desc=f"masks {split}", unit="series", disable=not progress):
        key = (str(row["BraTS21ID"]), str(row["sequence"]))
        if key in done:
            rows.append(done[key])
            continue
        vol = load_series(series_dir, row).astype(np.float32)
        probs = zoom_predict(lambda x: predict_seg(model, x, bs, device), vol[:, None], zoom)
        kept, stacks = select_slices(_non_negative(vol), probs[:, 0], probs[:, 1], threshold, min_ratio,
                                     max_contours)
        rel = ""
        if len(kept):
            target = child_path(child_path(out, key[0]), key[1], ".npy")
            target.parent.mkdir(parents=True, exist_ok=True)
            atomic_save_npy(target, stacks)
            rel = str(target.relative_to(rp.root))
        rows.append({"BraTS21ID": key[0], "sequence": key[1], "plane": row["plane"], "n_slices": int(len(vol)),
                     "n_kept": int(len(kept)), "path": rel})
    table = pd.DataFrame(rows, columns=STACK_COLUMNS)
    atomic_write(table_path, lambda p: table.to_parquet(p, index=False))
    return table


def seg_examples_figure(model_path: Path, slices: pd.DataFrame, n: int, seed: int) -> plt.Figure:
    """`n` validation slices (one modality each): image, true WT / ET contours (solid), predicted (dashed)."""
    from lib.tasks.brats.seg_data import SegSliceDataset
    from lib.train.seg import load_seg_model, predict_seg

    ds = SegSliceDataset(slices.reset_index(drop=True), augment=False)
    idx = np.random.default_rng(seed).choice(len(ds), size=min(n, len(ds)), replace=False)
    items = [ds[int(i)] for i in idx]
    images = np.stack([np.asarray(x) for x, _ in items]).astype(np.float32)
    truth = np.stack([np.asarray(y) for _, y in items])
    pred = predict_seg(load_seg_model(model_path), images, 16, None)
    fig, axes = plt.subplots(1, len(items), figsize=(2.2 * len(items), 2.4), squeeze=False)
    for ax, img, t, p in zip(axes[0], images, truth, pred):
        ax.imshow(img[0], cmap="gray")
        for k, colour in enumerate(("yellow", "cyan")):
            if t[k].any():
                ax.contour(t[k] > 0.5, levels=[0.5], colors=colour, linewidths=0.8)
            if (p[k] > 0.5).any():
                ax.contour(p[k] > 0.5, levels=[0.5], colors=colour, linewidths=0.8, linestyles="dashed")
        ax.axis("off")
    fig.suptitle("validation slices: WT (yellow), ET (cyan); truth solid, prediction dashed", fontsize=8)
    fig.tight_layout()
    return fig


def mask_strip_figures(rp: RunPaths, stacks: pd.DataFrame, n: int = 8) -> Iterator[Tuple[plt.Figure, str]]:
    """For the patient with the most kept slices: a strip per MRI type of its stacks with the predicted masks."""
    from lib.tasks.brats.eda import strip_figure

    have = stacks[stacks["n_kept"] > 0]
    if have.empty:
        return
    pid = have.groupby("BraTS21ID")["n_kept"].sum().idxmax()
    for row in have[have["BraTS21ID"] == pid].to_dict("records"):
        st = np.load(rp.root / row["path"])
        fig = strip_figure(st[:, 0].astype(np.float32), n, st[:, 1:].astype(np.float32) / 255,
                           title=f"{pid} {row['sequence']} ({row['plane']}): kept {row['n_kept']} of "
                                 f"{row['n_slices']} slices, WT (yellow) / ET (red) predicted")
        yield fig, f"masks_{row['sequence']}"


# ---------------------------------------------------------------- stage 2: folds, classifiers, AUC
def ensure_patient_folds(rp: RunPaths, labels: pd.Series, n_folds: int, seed: int) -> pd.Series:
    """RUN/folds.csv (BraTS21ID, fold): patient folds stratified on MGMT, written once and reused."""
    from lib.tasks.brats.classify import patient_folds

    if rp.folds.exists():
        folds = pd.read_csv(rp.folds, dtype={"BraTS21ID": str}).set_index("BraTS21ID")["fold"]
        if folds.nunique() != n_folds or set(folds.index) != set(labels.index):
            raise ValueError(f"{rp.folds} holds {folds.nunique()} folds over {len(folds)} patients, not n_folds="
                             f"{n_folds} over the {len(labels)} labelled ones; use a new run dir")
        return folds
    folds = patient_folds(labels, n_folds, seed)
    atomic_write_text(rp.folds, folds.rename("fold").rename_axis("BraTS21ID").reset_index().to_csv(index=False))
    rp.record("folds", rp.folds)
    return folds


def model_items(rp: RunPaths, split: str, mri: str, model: str) -> List[Tuple[str, Path]]:
    """(patient, input array path) of one MRI type: mask stacks for the 2D models, the normalised series volume
    for the 3D one; series without any kept slice are left out."""
    if model == "resnet10_3d":
        series = _series_table(rp, split)
        root = rp.lookup("series_cache")
        series = series[series["sequence"] == mri]
        return [(str(r.BraTS21ID), root / r.path) for r in series.itertuples()]
    st = pd.read_parquet(stacks_table_path(rp, split))
    st = st[(st["sequence"] == mri) & (st["n_kept"] > 0)]
    return [(str(r.BraTS21ID), rp.root / r.path) for r in st.itertuples()]


def classifier_cv(rp: RunPaths, mri: str, labels: pd.Series, folds: pd.Series, cfg) -> Dict[str, object]:
    """Train one classifier per fold on the MRI type `mri` -> {"oof": Series, "test": Series, "fold_auc": list}.

    OOF and fold-mean test predictions are written to predictions/oof_<model>_<mri>.csv / test_<...>.csv.
    """
    from lib.tasks.brats.classify import train_classifier

    name = f"{cfg.model}_{mri}"
    items = [(p, a) for p, a in model_items(rp, "train", mri, cfg.model) if p in labels.index]
    test_items = model_items(rp, "test", mri, cfg.model)
    oof, model_dirs, fold_auc = [], [], []
    for k in sorted(folds.unique()):
        valid_ids = set(folds.index[folds == k])
        tr = [it for it in items if it[0] not in valid_ids]
        va = [it for it in items if it[0] in valid_ids]
        res = train_classifier(rp.root, f"{name}_fold{k}", tr, va, labels, cfg)
        oof.append(res["oof"])
        fold_auc.append(res["valid_auc"])
        model_dirs.append(res["model_dir"])
    oof_s = pd.concat(oof).rename(LABEL).rename_axis("BraTS21ID")
    test_s = fold_mean_predictions(model_dirs, test_items, cfg)
    for path, s in ((rp.oof_predictions(name), oof_s), (rp.test_predictions(name), test_s.rename_axis("BraTS21ID"))):
        atomic_write_text(path, s.reset_index().to_csv(index=False))
    return {"oof": oof_s, "test": test_s, "fold_auc": fold_auc}


def fold_mean_predictions(models: Sequence[Path], items: Sequence[Tuple[str, Path]], cfg) -> pd.Series:
    """Every fold model (a `train_classifier` folder or its best.pth) predicts every item's patient; the mean over
    folds -> Series BraTS21ID -> probability, name MGMT_value (empty without items): the test rule of
    `classifier_cv` and of test-only inference alike."""
    from lib.tasks.brats.classify import load_classifier, predict_patients

    if not items:
        return pd.Series(dtype=float, name=LABEL)
    preds = [predict_patients(load_classifier(m, cfg), items, cfg) for m in models]
    if not preds:
        raise ValueError("fold_mean_predictions: no fold models given")
    return pd.concat(preds, axis=1).mean(axis=1).rename(LABEL)


def _mask_ratio(path: Path) -> float:
    """ET / WT pixel ratio over a stack's kept slices (channels 1, 2 of `[image, WT, ET]`, > 127 = in the mask)."""
    st = np.load(path, mmap_mode="r")
    wt = float((st[:, 1] > 127).sum())
    return float((st[:, 2] > 127).sum()) / wt if wt else float("nan")


def mask_ratio_features(rp: RunPaths, split: str, mri: str) -> pd.Series:
    """ET / WT area ratio per patient of the `split` stacks of MRI type `mri` (patients without kept slices or
    without WT pixels left out): Series BraTS21ID -> float."""
    st = pd.read_parquet(stacks_table_path(rp, split))
    st = st[(st["sequence"] == mri) & (st["n_kept"] > 0)]
    return pd.Series({str(r.BraTS21ID): _mask_ratio(rp.root / r.path) for r in st.itertuples()},
                     dtype=float).dropna()


def mask_ratio_model_path(rp: RunPaths, mri: str) -> Path:
    """RUN/models/mask_ratio/<mri>.json: the baseline's per-fold logistic regressions {"mri", "folds": {k:
    {"coef", "intercept"}}}."""
    return child_path(rp.root / "models" / "mask_ratio", mri, ".json")


def mask_ratio_predict(folds: Dict[str, Dict[str, float]], features: pd.Series) -> pd.Series:
    """Mean over the fold regressions of sigmoid(coef * ratio + intercept) -> Series BraTS21ID -> probability
    (empty without features)."""
    if not len(features):
        return pd.Series(dtype=float, name=LABEL)
    if not folds:
        raise ValueError("mask_ratio_predict: no fold regressions given")
    x = features.to_numpy(np.float64)
    probs = [1.0 / (1.0 + np.exp(-(float(f["coef"]) * x + float(f["intercept"])))) for f in folds.values()]
    return pd.Series(np.mean(probs, axis=0), index=features.index, name=LABEL)


def mask_ratio_cv(rp: RunPaths, mri: str, labels: pd.Series, folds: pd.Series) -> Dict[str, object]:
    """A one-feature baseline on the stage-1 masks: the ET / WT area ratio of a patient's series of type `mri`, a
    logistic regression fitted on the other folds (OOF) and, for the test set, the mean of the fold models.

    It says whether the masks carry MGMT signal, apart from what a CNN learns; written like a model's predictions
    (predictions/oof_mask_ratio_<mri>.csv, test_...).
    """
    from sklearn.linear_model import LogisticRegression

    train, test = mask_ratio_features(rp, "train", mri), mask_ratio_features(rp, "test", mri)
    train = train[train.index.isin(labels.index)]
    oof, coefs, fold_auc = [], {}, []
    for k in sorted(folds.unique()):
        va = train.index[folds.reindex(train.index).to_numpy() == k]
        tr = train.index.difference(va)
        clf = LogisticRegression().fit(train[tr].to_numpy()[:, None], labels[tr].to_numpy())
        p = pd.Series(clf.predict_proba(train[va].to_numpy()[:, None])[:, 1], index=va)
        oof.append(p)
        y = labels[va]
        fold_auc.append(float(roc_auc_score(y, p)) if y.nunique() == 2 else float("nan"))
        coefs[str(k)] = {"coef": float(clf.coef_[0, 0]), "intercept": float(clf.intercept_[0])}
    name = f"mask_ratio_{mri}"
    atomic_write_text(mask_ratio_model_path(rp, mri), json.dumps({"mri": mri, "folds": coefs}, indent=1))
    oof_s = pd.concat(oof).rename(LABEL).rename_axis("BraTS21ID")
    test_s = mask_ratio_predict(coefs, test)
    for path, ser in ((rp.oof_predictions(name), oof_s), (rp.test_predictions(name), test_s.rename_axis("BraTS21ID"))):
        atomic_write_text(path, ser.reset_index().to_csv(index=False))
    return {"oof": oof_s, "test": test_s, "fold_auc": fold_auc}


def auc_table(results: Dict[str, Dict[str, object]], labels: pd.Series, folds: pd.Series) -> pd.DataFrame:
    """Rows = MRI types + prior: OOF AUC over patients, per-fold mean and std, 95 % bootstrap interval, patients."""
    rows = {}
    for mri, res in results.items():
        oof = res["oof"]
        y = labels.reindex(oof.index).to_numpy()
        ci = auc_ci(y, oof.to_numpy())
        spread = fold_auc_summary(y, oof.to_numpy(), folds.reindex(oof.index).to_numpy())
        rows[mri] = {"oof_auc": ci["auc"], "fold_mean": spread["mean"], "fold_std": spread["std"], "ci_lo": ci["lo"],
                     "ci_hi": ci["hi"], "patients": len(oof)}
    rows["prior"] = {"oof_auc": 0.5, "fold_mean": 0.5, "fold_std": 0.0, "ci_lo": 0.5, "ci_hi": 0.5,
                     "patients": len(labels)}
    return pd.DataFrame(rows).T


def auc_metrics(table: pd.DataFrame, model: str) -> Dict[str, float]:
    """metrics.json keys: oof_auc_<row> (an MRI type of the model, or mask_ratio_<type>) and its spread."""
    out: Dict[str, float] = {}
    for mri, row in table.drop(index="prior").iterrows():
        out[f"oof_auc_{mri}"] = float(row["oof_auc"])
        for col in ("fold_mean", "fold_std", "ci_lo", "ci_hi"):
            out[f"oof_auc_{mri}_{col}"] = float(row[col])
    out["cls_model"] = model
    return out


# ---------------------------------------------------------------- blend, submission, summary
def _read_pred(path: Path) -> pd.Series:
    df = pd.read_csv(path, dtype={"BraTS21ID": str})
    return df.set_index("BraTS21ID")[LABEL].astype(float)


def blend(rp: RunPaths, labels: pd.Series, inputs: Sequence[str], method: str) -> Dict[str, object]:
    """Blend prediction sets on OOF: `mean` of probabilities, `rank_mean` of per-set ranks, or the `best` single
    set. A patient missing from some sets is averaged over the others."""
    names = list(inputs) or sorted(p.name[4:-4] for p in rp.predictions_dir.glob("oof_*.csv")
                                   if p.name != "oof_ensemble.csv")
    if not names:
        raise FileNotFoundError(f"no predictions/oof_*.csv in {rp.root}: run the classifier stage first")
    oof = pd.DataFrame({n: _read_pred(rp.oof_predictions(n)) for n in names}).reindex(labels.index)
    test = pd.DataFrame({n: _read_pred(rp.test_predictions(n)) for n in names})
    y = labels
    if method not in BLEND_METHODS:
        raise KeyError(f"unknown blend method {method!r}; valid: {', '.join(BLEND_METHODS)}")
    single = {n: roc_auc_score(y[oof[n].notna()], oof[n].dropna()) for n in names}
    best = max(single, key=single.get) if method == "best" else None
    oof_b = combine(oof, method, best)
    oof_b = oof_b.fillna(float(labels.mean()))  # a patient no input could predict: the prior, as in the submission
    auc = float(roc_auc_score(y, oof_b))
    table = pd.DataFrame({"oof_auc": {**single, "blend": auc}})
    atomic_write_text(rp.oof_predictions("ensemble"), oof_b.rename(LABEL).rename_axis("BraTS21ID").reset_index()
                      .to_csv(index=False))
    return {"oof_auc": auc, "test": blend_test(test, method, best), "table": table, "inputs": names, "best": best}


BLEND_METHODS = ("mean", "rank_mean", "best")


def combine(preds: pd.DataFrame, method: str, best: Optional[str] = None) -> pd.Series:
    """One column per prediction set (NaN: the set has no prediction for that patient) -> the blend: `mean` of
    probabilities, `rank_mean` of per-set percentile ranks over the patients present, or the column `best`."""
    if method == "best":
        if best not in preds.columns:
            raise KeyError(f"blend method 'best' needs one of the columns {list(preds.columns)}, got {best!r}")
        return preds[best]
    if method == "rank_mean":
        return preds.rank(pct=True).mean(axis=1)
    if method == "mean":
        return preds.mean(axis=1)
    raise KeyError(f"unknown blend method {method!r}; valid: {', '.join(BLEND_METHODS)}")


def blend_test(test: pd.DataFrame, method: str, best: Optional[str] = None) -> pd.Series:
    """The test blend as the submission takes it: `combine`, patients no set predicted dropped (they get the
    prior), clipped to [0, 1]."""
    return combine(test, method, best).dropna().clip(0, 1)


def write_brats_submission(rp: RunPaths, data: BratsData, test: pd.Series, prior: float) -> Tuple[Path, int]:
    return write_submission(test, data.sample_submission, rp.submission, prior)


def submission_auc(path: Path, truth: pd.Series) -> float:
    sub = read_ids_table(path, LABEL, "submission").set_index("BraTS21ID")[LABEL]
    return float(roc_auc_score(truth.reindex(sub.index), sub))


def summary(metrics: Dict[str, object]) -> str:
    """The demo's table: segmentation Dice, OOF AUC per MRI type and blended, the prior, the submission's AUC."""
    lines = [f"segmentation (validation cases): Dice WT {metrics.get('seg_valid_dice_wt', float('nan')):.3f}, "
             f"ET {metrics.get('seg_valid_dice_et', float('nan')):.3f}"]
    rows = []
    for mri in SEQUENCES:
        if f"oof_auc_{mri}" in metrics:
            rows.append((mri, metrics[f"oof_auc_{mri}"], metrics.get(f"oof_auc_{mri}_fold_std"),
                         metrics.get(f"oof_auc_{mri}_ci_lo"), metrics.get(f"oof_auc_{mri}_ci_hi")))
    for mri in SEQUENCES:
        key = f"oof_auc_mask_ratio_{mri}"
        if key in metrics:
            rows.append((f"ET/WT {mri}", metrics[key], metrics.get(f"{key}_fold_std"), metrics.get(f"{key}_ci_lo"),
                         metrics.get(f"{key}_ci_hi")))
    if "oof_auc" in metrics:
        rows.append(("blend", metrics["oof_auc"], None, None, None))
    rows.append(("prior", 0.5, 0.0, 0.5, 0.5))
    lines.append(f"OOF patient AUC ({metrics.get('cls_model', '?')}):")
    lines.append(f"  {'input':<14} {'AUC':>6} {'fold sd':>8} {'95% CI':>14}")
    for name, auc, sd, lo, hi in rows:
        sd_s = f"{sd:.3f}" if sd is not None else ""
        ci_s = f"[{lo:.3f}, {hi:.3f}]" if lo is not None else ""
        lines.append(f"  {name:<14} {auc:>6.3f} {sd_s:>8} {ci_s:>14}")
    if "test_submission_auc" in metrics:
        lines.append(f"submission AUC against the phantom's hidden labels: {metrics['test_submission_auc']:.3f}")
    return "\n".join(lines)


def roc_figures(rp: RunPaths, labels: pd.Series) -> Iterator[Tuple[plt.Figure, str]]:
    """OOF ROC curves per prediction set (one panel) and per fold of the blend (another)."""
    names = sorted(p.name[4:-4] for p in rp.predictions_dir.glob("oof_*.csv"))
    fig, ax = plt.subplots(figsize=(4, 4))
    for n in names:
        p = _read_pred(rp.oof_predictions(n))
        fpr, tpr, _ = roc_curve(labels.reindex(p.index), p)
        ax.plot(fpr, tpr, label=f"{n} ({roc_auc_score(labels.reindex(p.index), p):.3f})")
    ax.plot([0, 1], [0, 1], "k:", lw=0.8)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.legend(fontsize=6)
    fig.tight_layout()
    yield fig, "roc_per_input"
    if rp.folds.exists() and rp.oof_predictions("ensemble").exists():
        folds = pd.read_csv(rp.folds, dtype={"BraTS21ID": str}).set_index("BraTS21ID")["fold"]
        p = _read_pred(rp.oof_predictions("ensemble"))
        fig, ax = plt.subplots(figsize=(4, 4))
        for k in sorted(folds.unique()):
            ids = [i for i in p.index if folds.get(i) == k]
            y = labels.reindex(ids)
            if y.nunique() < 2:
                continue
            fpr, tpr, _ = roc_curve(y, p[ids])
            ax.plot(fpr, tpr, label=f"fold {k} ({roc_auc_score(y, p[ids]):.3f})")
        ax.plot([0, 1], [0, 1], "k:", lw=0.8)
        ax.legend(fontsize=6)
        ax.set_title("blend, per fold", fontsize=8)
        fig.tight_layout()
        yield fig, "roc_blend_per_fold"
