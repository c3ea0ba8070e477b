"""The cervical-spine task's data folder (the Kaggle download of RSNA 2022 as `python -m lib.phantom cspine` writes
it), its label tables and its submission.

Layout: `train_images/<StudyInstanceUID>/<slice_number>.dcm`, `test_images/...`, `train.csv`
(StudyInstanceUID,patient_overall,C1..C7), `train_bounding_boxes.csv`, `segmentations/<StudyInstanceUID>.nii`,
`test.csv` (row_id,StudyInstanceUID,prediction_type), `sample_submission.csv` (row_id,fractured). Quirks handled here:
the broken training study 1.2.826.0.1.3680043.20574 is dropped (as every top solution did); the public `test.csv`
names studies that are not in `test_images/`, so the studies to predict are the folders present in `test_images/`
(`CspineData.test_studies`), and the submission has 8 rows per such study.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import pandas as pd

from lib.io.ids import id_problem
from lib.paths import PathLike, atomic_write_text, resolve_data_dir
from lib.tasks.cspine.metric import CSPINE_GROUP, CSPINE_LABELS

COMPETITION = "rsna-2022-cervical-spine-fracture-detection"
MARKER = "train.csv"
ID_PATTERN = r"1\.2\.826\.0\.1\.3680043\.[0-9]+"
BROKEN_STUDIES = ("1.2.826.0.1.3680043.20574",)  # unreadable in the real download; dropped by everyone


class CspineDataError(ValueError):
    """A label / test / submission file that does not have the expected layout."""


def _check_ids(ids: pd.Series, source: str) -> None:
    bad = [p for p in (id_problem(str(i), ID_PATTERN, CSPINE_GROUP) for i in ids) if p]
    if bad:
        raise CspineDataError(f"{source}: {len(bad)} invalid {CSPINE_GROUP}s, e.g. {bad[:2]}")
    dup = ids[ids.duplicated()].tolist()
    if dup:
        raise CspineDataError(f"{source}: duplicated {CSPINE_GROUP} {dup[:3]}")


def read_train_labels(path: PathLike, drop: tuple = BROKEN_STUDIES) -> pd.DataFrame:
    """train.csv -> StudyInstanceUID (str) + the 8 labels (int 0/1), the broken studies dropped; CspineDataError for
    missing columns, bad / duplicated IDs or labels other than 0/1."""
    df = pd.read_csv(path, dtype={CSPINE_GROUP: str})
    missing = [c for c in (CSPINE_GROUP, *CSPINE_LABELS) if c not in df.columns]
    if missing:
        raise CspineDataError(f"{path}: missing columns {missing}")
    _check_ids(df[CSPINE_GROUP], str(path))
    values = df[list(CSPINE_LABELS)]
    if not values.isin([0, 1]).all(axis=None):
        raise CspineDataError(f"{path}: labels must be 0 or 1")
    df = df[~df[CSPINE_GROUP].isin(drop)]
    return df[[CSPINE_GROUP, *CSPINE_LABELS]].astype({c: np.int64 for c in CSPINE_LABELS}).reset_index(drop=True)


@dataclass(frozen=True)
class CspineData:
    root: Path

    @classmethod
    def at(cls, data_dir: Optional[PathLike]) -> "CspineData":
        return cls(resolve_data_dir(data_dir, COMPETITION, "sample_submission.csv"))

    def images(self, split: str) -> Path:
        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        return self.root / f"{split}_images"

    @property
    def train_labels(self) -> Path:
        return self.root / "train.csv"

    @property
    def boxes(self) -> Path:
        return self.root / "train_bounding_boxes.csv"

    @property
    def segmentations(self) -> Path:
        return self.root / "segmentations"

    @property
    def test_csv(self) -> Path:
        return self.root / "test.csv"

    @property
    def sample_submission(self) -> Path:
        return self.root / "sample_submission.csv"

    @property
    def truth(self) -> Path:
        """The phantom's hidden test labels (absent for the real download)."""
        return self.root / "_truth" / "test_labels.csv"

    def check(self, need_train: bool = True) -> "CspineData":
        """FileNotFoundError naming every missing piece of the layout (need_train False: a kernel's test-only mount)."""
        need = [self.images("test"), self.test_csv]
        need += [self.images("train"), self.train_labels, self.segmentations] if need_train else []
        missing = [str(p) for p in need if not p.exists()]
        if missing:
            raise FileNotFoundError(f"{self.root} is not the RSNA 2022 cervical-spine layout; missing: {missing}")
        return self

    def labels(self) -> pd.DataFrame:
        return read_train_labels(self.train_labels)

    def train_studies(self) -> Dict[str, Path]:
        """{study: folder} of the labelled studies, in train.csv order (a study without a folder is kept: the volume
        cache lists it as bad, with the reason)."""
        return {s: self.images("train") / s for s in self.labels()[CSPINE_GROUP]}

    def segmentation_paths(self, studies: List[str]) -> Dict[str, Path]:
        """{study: .nii} for the studies of `studies` that have a segmentation file (.nii or .nii.gz)."""
        out = {}
        for s in studies:
            for ext in (".nii", ".nii.gz"):
                if (self.segmentations / f"{s}{ext}").is_file():
                    out[s] = self.segmentations / f"{s}{ext}"
                    break
        return out

    def test_studies(self) -> Dict[str, Path]:
        """{study: folder} to predict: every study folder present in test_images/, test.csv's order first, then
        the folders it does not name (sorted). test.csv is not the list: the public copy names studies that are not
        in test_images/ and the hidden re-run swaps both, so a study named but absent is skipped."""
        test = read_test_csv(self.test_csv)
        folder = self.images("test")
        present = {p.name for p in folder.iterdir() if p.is_dir()} if folder.is_dir() else set()
        named = [s for s in dict.fromkeys(test[CSPINE_GROUP]) if s in present]
        studies = named + sorted(present - set(named))
        for s in studies:
            problem = id_problem(s, ID_PATTERN, CSPINE_GROUP)
            if problem:
                raise CspineDataError(f"test_images/: {problem}")
        return {s: self.images("test") / s for s in studies}

    def truth_labels(self) -> Optional[pd.DataFrame]:
        return read_train_labels(self.truth, drop=()) if self.truth.exists() else None


def read_test_csv(path: PathLike) -> pd.DataFrame:
    df = pd.read_csv(path, dtype=str)
    missing = {"row_id", CSPINE_GROUP, "prediction_type"} - set(df.columns)
    if missing:
        raise CspineDataError(f"{path}: missing columns {sorted(missing)}")
    return df


def submission_frame(pred: pd.DataFrame, studies: List[str], prior: Dict[str, float]) -> tuple:
    """Wide predictions (StudyInstanceUID + the 8 labels) -> (`row_id,fractured` with 8 rows per study of `studies`,
    in that order and label order; the number of studies filled with `prior`, a study without a prediction).
    CspineDataError for NaN / inf or values outside [0, 1]."""
    wide = pred.set_index(CSPINE_GROUP)[list(CSPINE_LABELS)].astype(np.float64)
    values = wide.to_numpy()
    if not np.isfinite(values).all():
        raise CspineDataError("predictions contain NaN or inf")
    if ((values < 0) | (values > 1)).any():
        raise CspineDataError("predictions outside [0, 1]")
    wide = wide.reindex(studies)
    n_prior = int(wide.isna().any(axis=1).sum())
    wide = wide.fillna({c: float(prior[c]) for c in CSPINE_LABELS})
    rows = [(f"{s}_{c}", float(wide.at[s, c])) for s in studies for c in CSPINE_LABELS]
    return pd.DataFrame(rows, columns=["row_id", "fractured"]), n_prior


def write_submission(pred: pd.DataFrame, studies: List[str], prior: Dict[str, float], path: PathLike) -> tuple:
    """`submission_frame` written atomically to `path`; returns (path, n studies at the prior)."""
    sub, n_prior = submission_frame(pred, studies, prior)
    if len(sub) != 8 * len(studies) or sub["row_id"].duplicated().any():
        raise CspineDataError("submission must hold 8 distinct rows per study")
    atomic_write_text(path, sub.to_csv(index=False))
    return Path(path), n_prior
