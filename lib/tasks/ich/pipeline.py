"""Stage-level helpers the notebooks call: cached header index, header summaries, sample picking."""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import pandas as pd
from scipy.special import expit

from lib.io import dicom, dicom_index
from lib.ensemble import mean_frames
from lib.tasks.ich.labels import SUBTYPES
from lib.paths import RunPaths, atomic_write_text
from lib.tasks.ich.data import ID_PATTERN, CompetitionData


def ensure_index(data: CompetitionData, rp: RunPaths, split: str, workers: Optional[int] = None) -> pd.DataFrame:
    """The split's header index, kept in the run dir and brought up to date with the data folder.

    Files are re-read when new or when their size or mtime changed since the saved index (a repaired file leaves
    the bad list); unchanged ones are taken from it. IDs are checked against the task's pattern
    (`lib.tasks.ich.data.ID_PATTERN`): a file with an unsafe or foreign ID is a bad file.
    """
    folder = data.image_dir(split)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} does not exist (expected the Kaggle layout under {data.root})")
    path = rp.index(split)
    df = dicom_index.index(folder, out=path, bad_out=rp.bad_files(split), workers=workers or None,
                           id_pattern=ID_PATTERN, reuse=True)
    rp.record(f"index_{split}", path)
    return df


def bad_files(rp: RunPaths, split: str) -> pd.DataFrame:
    """The split's bad-files table (path, reason); empty when none."""
    path = rp.bad_files(split)
    return pd.read_csv(path) if path.exists() and path.stat().st_size else pd.DataFrame(columns=["path", "reason"])


def tilt_degrees(index: pd.DataFrame) -> pd.Series:
    """Gantry tilt per image in degrees: angle between the slice normal and the patient z axis."""
    row = index[["iop_0", "iop_1", "iop_2"]].to_numpy(dtype=np.float64)
    col = index[["iop_3", "iop_4", "iop_5"]].to_numpy(dtype=np.float64)
    normal = np.cross(row, col)
    normal /= np.maximum(np.linalg.norm(normal, axis=1, keepdims=True), 1e-9)
    return pd.Series(np.degrees(np.arccos(np.clip(np.abs(normal[:, 2]), 0, 1))), index=index.index, name="tilt_deg")


def header_quirks(index: pd.DataFrame) -> pd.DataFrame:
    """Counts of the RSNA header quirks (12-bit intercept bug, signed pixels, odd matrix sizes, tilt, ...)."""
    fix = [dicom.needs_12bit_fix(b, p, i) for b, p, i in
           zip(index["bits_stored"], index["pixel_representation"], index["intercept"])]
    rows = {
        "images": len(index),
        "series": index["series_uid"].nunique(),
        "patients": index["patient_id"].nunique(),
        "12-bit intercept fix needed": int(np.sum(fix)),
        "signed pixels (PixelRepresentation 1)": int((index["pixel_representation"] == 1).sum()),
        "not 512x512": int(((index["rows"] != 512) | (index["columns"] != 512)).sum()),
        "tilted (> 1 deg)": int((tilt_degrees(index) > 1).sum()),
        "duplicate positions (spacing 0 inside a series)": int(((index["spacing_next"] == 0)
                                                                 & (index["slice_idx"] < index["n_slices"] - 1)).sum()),
    }
    return pd.DataFrame({"count": rows})


def pick_positive_series(index: pd.DataFrame, labels: pd.DataFrame, min_pos: int = 3, seed: int = 0) -> str:
    """A series id with at least `min_pos` positive slices (any), else the one with the most; deterministic."""
    any_pos = index[["image_id", "series_uid"]].merge(labels[["any"]], left_on="image_id", right_index=True)
    per = any_pos.groupby("series_uid")["any"].sum().sort_index()
    good = per[per >= min_pos]
    if good.empty:
        return str(per.idxmax())
    return str(good.index[np.random.default_rng(seed).integers(len(good))])


def subtype_examples(index: pd.DataFrame, labels: pd.DataFrame) -> Dict[str, str]:
    """For each subtype, the image id at the middle of its longest positive run in a series (a clear core slice)."""
    merged = index[["image_id", "series_uid", "slice_idx"]].merge(labels, left_on="image_id", right_index=True)
    out: Dict[str, str] = {}
    for s in SUBTYPES:
        pos = merged[merged[s] == 1]
        if pos.empty:
            continue
        series = pos.groupby("series_uid").size().sort_values(ascending=False).index[0]
        run = pos[pos["series_uid"] == series].sort_values("slice_idx")
        out[s] = str(run["image_id"].iloc[len(run) // 2])
    return out


def ensure_folds(rp: RunPaths, index: pd.DataFrame, labels: pd.DataFrame, n_folds: int, seed: int) -> pd.DataFrame:
    """The run's folds.csv: written once (patient-grouped, multilabel-stratified) and read by every later stage.

    An existing file with a different number of folds is an error, never silently replaced.
    """
    from lib.data.folds import make_folds, read_folds, write_folds

    if rp.folds.exists():
        folds = read_folds(rp.folds)
        if folds["fold"].nunique() != n_folds:
            raise ValueError(f"{rp.folds} has {folds['fold'].nunique()} folds but n_folds={n_folds}; "
                             "use a new run dir (folds are fixed for a run)")
        return folds
    folds = make_folds(index, labels[list(SUBTYPES)], n_folds=n_folds, seed=seed, heavy_label="any")
    write_folds(folds, rp.folds)
    rp.record("folds", rp.folds)
    return folds


def fold_prior_predictions(folds: pd.DataFrame, labels: pd.DataFrame) -> pd.DataFrame:
    """The prior-only baseline, out of fold: each image gets the label prevalence of the *other* folds."""
    y = labels.reindex(folds["image_id"])[list(SUBTYPES)].to_numpy(dtype=np.float64)
    out = np.zeros_like(y)
    f = folds["fold"].to_numpy()
    for k in np.unique(f):
        out[f == k] = y[f != k].mean(axis=0)
    return pd.DataFrame(out, index=pd.Index(folds["image_id"].to_numpy(), name="image_id"), columns=list(SUBTYPES))


def cnn_predictions(rp: RunPaths, folds: pd.DataFrame) -> Optional[Dict[str, pd.DataFrame]]:
    """OOF and fold-averaged test probabilities of the CNN stage (wide, keyed by image_id), or None if some fold's
    embedding export is still missing."""
    from lib.train.embed import load_embeddings, oof_table

    ks = sorted(folds["fold"].unique())
    if not all(rp.embedding_logits("oof", k).exists() for k in ks):
        return None
    ids, logits = oof_table(rp.root, folds)
    oof = pd.DataFrame(expit(logits.astype(np.float64)), index=pd.Index(ids, name="image_id"),
                       columns=list(SUBTYPES))
    test = None
    if all(rp.embedding_logits("test", k).exists() for k in ks):
        frames = []
        for k in ks:
            _, lg, idx = load_embeddings(rp.embedding("test", k))
            probs = expit(lg[idx["row"].to_numpy()].astype(np.float64))
            frames.append(pd.DataFrame(probs, index=idx["image_id"].astype(str), columns=list(SUBTYPES)))
        test = mean_frames(frames)
        test.index.name = "image_id"
    return {"oof": oof, "test": test}


def unreadable(rp: RunPaths, cache_dir: Optional[Path] = None) -> pd.DataFrame:
    """The run's one list of files no stage can use: the header index's bad files (split, path, reason) and the
    images the cache build rejected (its bad.csv: pixel data that does not decode), with `image_id` where known."""
    frames = []
    for split in ("train", "test"):
        b = bad_files(rp, split)
        if len(b):
            frames.append(b.assign(split=split, stage="index"))
    cache_bad = Path(cache_dir) / "bad.csv" if cache_dir is not None else None
    if cache_bad is not None and cache_bad.is_file():
        frames.append(pd.read_csv(cache_bad, dtype=str).assign(stage="cache"))
    cols = ["image_id", "split", "path", "reason", "stage"]
    return pd.concat(frames, ignore_index=True).reindex(columns=cols) if frames else pd.DataFrame(columns=cols)


def usable_index(index: pd.DataFrame, rp: RunPaths, cache_dir: Path) -> pd.DataFrame:
    """Index rows whose image the cache holds: images the cache build rejected are left out (and counted by
    `unreadable`), so training, embedding and folds never ask the cache for them."""
    bad = set(unreadable(rp, cache_dir)["image_id"].dropna())
    keep = ~index["image_id"].isin(bad)
    if not keep.all():
        print(f"left out {int((~keep).sum())} of {len(index)} indexed images that the cache could not decode "
              "(pipeline.unreadable lists them with the reason)")
    return index[keep].reset_index(drop=True)


def test_images_at_prior(data: CompetitionData, rp: RunPaths, cache_dir: Path) -> List[str]:
    """Sample-submission images that no stage can predict (not in the usable test index: unreadable, bad ID or
    rejected by the cache); the submission gives them the training prevalence."""
    from lib.tasks.ich.labels import split_ids

    sample = pd.read_csv(data.sample_submission)
    wanted = split_ids(sample["ID"], source=str(data.sample_submission))["image_id"].unique()
    have = set(usable_index(ensure_index(data, rp, "test"), rp, cache_dir)["image_id"])
    return sorted(i for i in wanted if i not in have)
