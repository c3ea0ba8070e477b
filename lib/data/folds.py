"""Cross-validation folds grouped by PatientID and stratified on the patients' label profile.

The stage-2 test set shares no patient with train, so folds must be grouped by patient. Within that
constraint, patients are dealt to folds with the iterative stratification of Sechidis et al. (2011), applied to one
binary vector per patient: "has at least one positive slice of subtype s" for the 6 labels, plus a "heavy" flag
(more positive slices than the median positive patient) so the slice-level prevalence also balances. A fold's need
for a patient is its relative deficit summed over the patient's labels (so the union label `any` balances too); ties
go to the fold with the most room left in *images*, so folds also hold similar numbers of slices.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional, Tuple, Union

import numpy as np
import pandas as pd

from lib.paths import atomic_write_text

PathLike = Union[str, Path]
FOLD_COLUMNS = ("image_id", "patient_id", "study_uid", "series_uid", "fold")
META_COLUMNS = FOLD_COLUMNS[:4]

_log = logging.getLogger(__name__)


class FoldsError(ValueError):
    """A folds table (or its inputs) does not have the expected columns or grouping."""


def patient_profiles(images: pd.DataFrame, labels: pd.DataFrame, heavy_label: Optional[str] = None
                     ) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-patient stratification vectors.

    `images` has image_id and patient_id; `labels` is the wide 0/1 table indexed by image_id, one column per label.
    A patient is "heavy" with more positive images of `heavy_label` (default: any label) than the median positive
    patient. Returns (patient ids (P,) sorted, flags (P, L+1) bool = L "some positive image" flags + "heavy",
    n_images (P,) int).
    """
    cols = list(labels.columns)
    lab = labels.reindex(images["image_id"].to_numpy())[cols].to_numpy().astype(np.int64)
    per = pd.DataFrame(lab, columns=cols)
    per["_positive"] = per[heavy_label] if heavy_label is not None else (lab.sum(1) > 0).astype(np.int64)
    per["patient_id"] = images["patient_id"].to_numpy()
    per["n_images"] = 1
    grouped = per.groupby("patient_id", sort=True).sum()
    pos = grouped[cols].to_numpy()
    n_any = grouped["_positive"].to_numpy()
    median_pos = np.median(n_any[n_any > 0]) if (n_any > 0).any() else 0.0
    heavy = n_any > median_pos
    flags = np.concatenate([pos > 0, heavy[:, None]], axis=1)
    return grouped.index.to_numpy(), flags, grouped["n_images"].to_numpy()


def _pick(candidates: np.ndarray, room: np.ndarray, rng: np.random.Generator) -> int:
    """Among candidate folds, the one with most room left (images); remaining ties broken at random."""
    best = candidates[room[candidates] == room[candidates].max()]
    return int(best[0] if len(best) == 1 else rng.choice(best))


def iterative_stratification(flags: np.ndarray, sizes: np.ndarray, n_folds: int, seed: int = 42) -> np.ndarray:
    """Iterative stratification of P groups with binary label flags (P, L) and sizes (P,) -> fold (P,) int64.

    Sechidis et al.: repeatedly take the label with the fewest unassigned positive groups and deal each such group
    to the fold that most lacks it. Variant for correlated labels (`any` is the union of the subtypes, so it is
    never the rarest and plain Sechidis leaves it unbalanced): "most lacks" scores a fold by the summed *relative*
    deficit over all the group's labels, sum_l flag_l * wanted_fl / (n_l / K), which the rare labels dominate.
    Ties: most room in `sizes` units, then random. Groups with no flag are dealt largest first to the fold with the
    most room. Deterministic for `seed`.
    """
    n_groups = len(flags)
    flags = np.asarray(flags, dtype=bool)
    rng = np.random.default_rng(seed)
    order = rng.permutation(n_groups)
    per_fold = flags.sum(0) / n_folds  # (L,) positives each fold should get
    want = np.tile(per_fold, (n_folds, 1)).astype(np.float64)  # (K, L) positives still wanted
    room = np.full(n_folds, sizes.sum() / n_folds, dtype=np.float64)  # (K,) images still wanted
    fold = np.full(n_groups, -1, dtype=np.int64)
    all_folds = np.arange(n_folds)

    def assign(g: int, f: int) -> None:
        fold[g] = f
        want[f] -= flags[g]
        room[f] -= sizes[g]

    while True:
        counts = flags[order][fold[order] < 0].sum(0)
        if counts.sum() == 0:
            break
        label = int(np.argmin(np.where(counts > 0, counts, np.iinfo(np.int64).max)))
        for g in order[(fold[order] < 0) & flags[order, label]]:
            score = (want[:, flags[g]] / per_fold[flags[g]]).sum(1)  # (K,)
            lacking = all_folds[np.isclose(score, score.max(), rtol=0.0, atol=1e-9)]
            assign(int(g), _pick(lacking, room, rng))
    rest = order[fold[order] < 0]
    for g in rest[np.argsort(-sizes[rest], kind="stable")]:
        assign(int(g), _pick(all_folds, room, rng))
    return fold


def _check_columns(df: pd.DataFrame, needed: Tuple[str, ...], source: str) -> None:
    missing = [c for c in needed if c not in df.columns]
    if missing:
        raise FoldsError(f"{source}: missing columns {missing}; expected {list(needed)}")


def make_folds(meta: pd.DataFrame, labels: pd.DataFrame, n_folds: int = 5, seed: int = 42,
               heavy_label: Optional[str] = None) -> pd.DataFrame:
    """Patient-grouped, label-stratified folds for every labelled image that is in the header index.

    meta: header index (image_id, patient_id, study_uid, series_uid; one row per readable file).
    labels: wide 0/1 table (index image_id, one column per label of the task); `heavy_label`: see
    `patient_profiles` (ICH uses `any`).
    Returns one row per labelled readable image, sorted by image_id: image_id, patient_id, study_uid, series_uid,
    fold (int64 in 0..n_folds-1). Labelled images missing from `meta` (unreadable) are dropped; their number is
    logged and stored in `result.attrs["n_dropped"]`. Deterministic for `seed`.
    """
    _check_columns(meta, META_COLUMNS, "meta")
    if labels.shape[1] == 0 or (heavy_label is not None and heavy_label not in labels.columns):
        raise FoldsError(f"labels: need label columns (and {heavy_label!r}); got {list(labels.columns)}")
    if n_folds < 2:
        raise FoldsError(f"n_folds must be >= 2, got {n_folds}")
    if meta["image_id"].duplicated().any():
        dup = meta.loc[meta["image_id"].duplicated(), "image_id"].head(3).tolist()
        raise FoldsError(f"meta: duplicated image_id, e.g. {dup}")
    if meta["patient_id"].isna().any():
        bad = meta.loc[meta["patient_id"].isna(), "image_id"].head(3).tolist()
        raise FoldsError(f"meta: empty patient_id for {int(meta['patient_id'].isna().sum())} images, e.g. {bad}")
    in_meta = labels.index.isin(meta["image_id"])
    n_dropped = int((~in_meta).sum())
    if n_dropped:
        _log.warning("make_folds: %d labelled images are not in the header index (unreadable) and are dropped, "
                     "e.g. %s", n_dropped, labels.index[~in_meta][:3].tolist())
    images = meta.loc[meta["image_id"].isin(labels.index), list(META_COLUMNS)]
    images = images.sort_values("image_id", kind="stable").reset_index(drop=True)
    patients, flags, sizes = patient_profiles(images, labels, heavy_label)
    if n_folds > len(patients):
        raise FoldsError(f"n_folds={n_folds} is larger than the number of labelled patients ({len(patients)})")
    fold_of = dict(zip(patients, iterative_stratification(flags, sizes, n_folds, seed)))
    images["fold"] = images["patient_id"].map(fold_of).astype(np.int64)
    images.attrs["n_dropped"] = n_dropped
    return images


def fold_summary(folds: pd.DataFrame, labels: pd.DataFrame) -> pd.DataFrame:
    """Per fold: n_patients, n_images and the slice-level prevalence of each label (one row per fold)."""
    cols = list(labels.columns)
    lab = labels.reindex(folds["image_id"].to_numpy())[cols].to_numpy(dtype=np.float64)
    df = pd.DataFrame(lab, columns=cols)
    df["fold"] = folds["fold"].to_numpy()
    out = df.groupby("fold")[cols].mean()
    out.insert(0, "n_images", df.groupby("fold").size())
    out.insert(0, "n_patients", folds.groupby("fold")["patient_id"].nunique())
    return out


def validate_folds(df: pd.DataFrame, source: str = "folds") -> pd.DataFrame:
    """Check columns, integer folds 0..K-1, unique image ids and no patient in two folds; returns the columns."""
    _check_columns(df, FOLD_COLUMNS, source)
    df = df[list(FOLD_COLUMNS)].copy()
    if df["fold"].isna().any() or not np.issubdtype(df["fold"].dtype, np.integer):
        raise FoldsError(f"{source}: column 'fold' must hold integers, got dtype {df['fold'].dtype}")
    folds = np.unique(df["fold"].to_numpy())
    if len(folds) and (folds.min() < 0):
        raise FoldsError(f"{source}: fold numbers must be >= 0, got {folds.tolist()}")
    if df["image_id"].duplicated().any():
        dup = df.loc[df["image_id"].duplicated(), "image_id"].head(3).tolist()
        raise FoldsError(f"{source}: duplicated image_id, e.g. {dup}")
    split = df.groupby("patient_id")["fold"].nunique()
    if (split > 1).any():
        raise FoldsError(f"{source}: patients in more than one fold, e.g. {split.index[split > 1][:3].tolist()}")
    return df


def write_folds(df: pd.DataFrame, path: PathLike) -> Path:
    """Validate and write the folds table as CSV (columns FOLD_COLUMNS) atomically; returns the path."""
    df = validate_folds(df)
    atomic_write_text(path, df.to_csv(index=False))
    return Path(path)


def read_folds(path: PathLike) -> pd.DataFrame:
    """Read and validate a folds CSV written by `write_folds`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"folds file not found: {path}")
    df = pd.read_csv(path, dtype={c: str for c in META_COLUMNS})
    return validate_folds(df, source=str(path))
