"""The BraTS task's data folder, its label file and its submission.

One folder holds both trees, as `python -m lib.phantom brats` writes them: `task2/` is the Kaggle download
(`train/<BraTS21ID>/{FLAIR,T1w,T1wCE,T2w}/Image-N.dcm`, `test/`, `train_labels.csv`, `sample_submission.csv`) and
`task1/` the BraTS 2021 task-1 NIfTI set (`BraTS2021_<id>/BraTS2021_<id>_{flair,t1,t1ce,t2,seg}.nii.gz`). IDs are
zero-padded 5-digit strings, read as str everywhere.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import pandas as pd

from lib.io.ids import id_problem
from lib.paths import PathLike, atomic_write_text, resolve_data_dir

COMPETITION = "rsna-miccai-brain-tumor-radiogenomic-classification"
MARKER = "sample_submission.csv"  # what every copy of the download has
ID_PATTERN = r"[0-9]{5}"
LABEL = "MGMT_value"


class BratsDataError(ValueError):
    """A label / submission file or folder that does not have the expected layout."""


@dataclass(frozen=True)
class BratsData:
    """`<root>/task2/` (Kaggle layout) and `<root>/task1/` (NIfTI)."""

    root: Path

    @classmethod
    def at(cls, data_dir: Optional[PathLike]) -> "BratsData":
        return cls(resolve_data_dir(data_dir, COMPETITION, MARKER))

    @property
    def task1_dir(self) -> Path:
        return self.root / "task1"

    @property
    def task2_dir(self) -> Path:
        """`<root>/task2/`, or the root itself when it is the bare Kaggle download (the /kaggle/input mount)."""
        nested = self.root / "task2"
        return nested if nested.is_dir() or not (self.root / "sample_submission.csv").exists() else self.root

    def split_dir(self, split: str) -> Path:
        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        return self.task2_dir / split

    @property
    def train_labels(self) -> Path:
        return self.task2_dir / "train_labels.csv"

    @property
    def sample_submission(self) -> Path:
        return self.task2_dir / "sample_submission.csv"

    @property
    def truth(self) -> Path:
        """The phantom's test labels (absent for the real download)."""
        return self.root / "_truth" / "test_labels.csv"

    def check(self, need_task1: bool = True, need_train: bool = True) -> "BratsData":
        """FileNotFoundError naming every missing piece of the layout (need_train False: test-only inference, as
        in a kernel, needs only test/ and sample_submission.csv)."""
        need = [self.split_dir("test"), self.sample_submission]
        need += [self.split_dir("train"), self.train_labels] if need_train else []
        need += [self.task1_dir] if need_task1 else []
        missing = [str(p) for p in need if not p.exists()]
        if missing:
            raise FileNotFoundError(f"{self.root} is not the BraTS layout (task2/ = the Kaggle download, task1/ = "
                                    f"the task-1 NIfTI set); missing: {missing}")
        return self


def read_ids_table(path: PathLike, value_col: str, source: Optional[str] = None) -> pd.DataFrame:
    """`BraTS21ID,<value_col>` CSV -> table with string IDs; BratsDataError for bad, duplicated or missing IDs."""
    source = source or str(path)
    df = pd.read_csv(path, dtype={"BraTS21ID": str})
    missing = {"BraTS21ID", value_col} - set(df.columns)
    if missing:
        raise BratsDataError(f"{source}: missing columns {sorted(missing)}; expected BraTS21ID,{value_col}")
    bad = [(i, id_problem(i, ID_PATTERN, "BraTS21ID")) for i in df["BraTS21ID"]]
    bad = [r for _, r in bad if r]
    if bad:
        raise BratsDataError(f"{source}: {len(bad)} invalid IDs (5-digit zero-padded strings), e.g. {bad[:2]}")
    dup = df["BraTS21ID"][df["BraTS21ID"].duplicated()].tolist()
    if dup:
        raise BratsDataError(f"{source}: duplicated BraTS21ID {dup[:5]}")
    return df


def read_labels(path: PathLike) -> pd.Series:
    """train_labels.csv -> Series BraTS21ID (str) -> MGMT_value (0/1 int)."""
    df = read_ids_table(path, LABEL)
    if not df[LABEL].isin([0, 1]).all():
        raise BratsDataError(f"{path}: {LABEL} must be 0 or 1")
    return df.set_index("BraTS21ID")[LABEL].astype(int)


def write_submission(pred: pd.Series, sample_submission: PathLike, path: PathLike,
                     prior: float) -> tuple:
    """Write `BraTS21ID,MGMT_value` in the sample's ID order; patients without a prediction get `prior`.

    pred: Series ID -> probability. Refuses NaN/inf; probabilities are clipped to [0, 1] after a check that they
    are inside it. Returns (path, number of patients at the prior).
    """
    sample = read_ids_table(sample_submission, LABEL, "sample submission")
    p = pd.Series(pred, dtype=np.float64)
    if not np.isfinite(p.to_numpy()).all():
        raise BratsDataError("predictions contain NaN or inf")
    if ((p < 0) | (p > 1)).any():
        raise BratsDataError(f"predictions outside [0, 1]: e.g. {p[(p < 0) | (p > 1)].head(3).to_dict()}")
    out = p.reindex(sample["BraTS21ID"])
    n_prior = int(out.isna().sum())
    out = out.fillna(float(prior))
    sub = pd.DataFrame({"BraTS21ID": sample["BraTS21ID"].to_numpy(), LABEL: out.to_numpy()})
    atomic_write_text(path, sub.to_csv(index=False))
    return Path(path), n_prior


def truth_labels(data: BratsData) -> Optional[pd.Series]:
    """The phantom's hidden test labels, or None for real data."""
    return read_labels(data.truth) if data.truth.exists() else None

