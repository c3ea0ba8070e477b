"""The ICH download's layout: `CompetitionData.at(data_dir)` names every path of stage_2_{train,test} and the CSVs.

On Kaggle an empty `data_dir` finds the attached competition (`lib.paths.competition_dir`, any mount layout).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from lib.paths import PathLike, resolve_data_dir

COMPETITION = "rsna-intracranial-hemorrhage-detection"
MARKER = "stage_2_test"  # a folder every copy of the stage-2 download has
#: Every RSNA image / series / study / patient ID (header UID fields and CSV rows) looks like this.
ID_PATTERN = r"ID_[0-9a-fA-F]+"


@dataclass(frozen=True)
class CompetitionData:
    """The Kaggle layout: stage_2_train/ID_*.dcm, stage_2_test/ID_*.dcm, stage_2_train.csv, sample submission."""

    root: Path

    @classmethod
    def at(cls, data_dir: Optional[PathLike]) -> "CompetitionData":
        return cls(resolve_data_dir(data_dir, COMPETITION, MARKER))

    @property
    def train_dir(self) -> Path:
        return self.root / "stage_2_train"

    @property
    def test_dir(self) -> Path:
        return self.root / "stage_2_test"

    @property
    def train_labels(self) -> Path:
        return self.root / "stage_2_train.csv"

    @property
    def sample_submission(self) -> Path:
        return self.root / "stage_2_sample_submission.csv"

    def image_dir(self, split: str) -> Path:
        """`split` is 'train' or 'test'."""
        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        return self.train_dir if split == "train" else self.test_dir

    def check(self, need_train: bool = True) -> "CompetitionData":
        """Raise FileNotFoundError naming every missing piece of the layout."""
        need = [self.test_dir, self.sample_submission] + ([self.train_dir, self.train_labels] if need_train else [])
        missing = [str(p) for p in need if not p.exists()]
        if missing:
            raise FileNotFoundError(f"{self.root} is not in the Kaggle layout; missing: {missing}")
        return self


