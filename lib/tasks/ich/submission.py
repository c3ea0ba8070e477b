"""Kaggle submission: wide predictions -> `ID,Label` rows, validated against the sample submission, written atomically.

An invalid submission is an error, never a file: `write_submission` refuses non-finite predictions, warns about
probabilities outside [0, 1] (a bug upstream, not rounding), clips to [clip, 1 - clip], validates, and only then
writes. Test images without a prediction (unreadable DICOMs) get the prior through `fill_missing`, counted.
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Mapping, Tuple, Union

import numpy as np
import pandas as pd

from lib.tasks.ich.labels import SUBTYPES, LabelsError, split_ids, wide_to_long
from lib.paths import PathLike, atomic_write_text

CLIP = 1e-6


class SubmissionError(ValueError):
    """A submission that Kaggle would reject or mis-score."""


def to_long(wide: pd.DataFrame) -> pd.DataFrame:
    """Wide predictions (index image_id, SUBTYPES columns) -> Kaggle rows `ID,Label` (6 per image)."""
    try:
        return wide_to_long(wide)
    except LabelsError as err:
        raise SubmissionError(f"predictions table: {err}") from err


def _sample_ids(sample_submission: Union[PathLike, pd.DataFrame]) -> pd.Index:
    """IDs of the sample submission (a path or an already-read table), in its row order."""
    if isinstance(sample_submission, pd.DataFrame):
        df, name = sample_submission, "sample submission table"
    else:
        df, name = pd.read_csv(sample_submission), str(sample_submission)
    if "ID" not in df.columns:
        raise SubmissionError(f"{name} has no ID column; columns: {list(df.columns)}")
    return pd.Index(df["ID"].astype(str))


def _examples(values: pd.Index) -> list:
    return [str(v) for v in values[:3]]


def validate_submission(sub_long: pd.DataFrame, sample_submission: Union[PathLike, pd.DataFrame],
                        clip: float = CLIP) -> None:
    """Raise SubmissionError unless `sub_long` has columns ID,Label, the sample's ID set exactly, 6 rows per image
    (one per subtype), no NaN, and every Label within [clip, 1 - clip]."""
    _validate(sub_long, _sample_ids(sample_submission), clip)


def _validate(sub_long: pd.DataFrame, sample: pd.Index, clip: float) -> None:
    missing_cols = sorted({"ID", "Label"} - set(sub_long.columns))
    if missing_cols:
        raise SubmissionError(f"submission lacks columns {missing_cols}; expected ID,Label")
    ids = pd.Index(sub_long["ID"].astype(str))
    if ids.duplicated().any():
        dup = ids[ids.duplicated()]
        raise SubmissionError(f"{len(dup)} duplicated ID rows, e.g. {_examples(dup)}")
    try:
        parts = split_ids(pd.Series(ids), source="submission")
    except LabelsError as err:
        raise SubmissionError(str(err)) from err
    per_image = parts.groupby("image_id")["subtype"].nunique()
    if (per_image != len(SUBTYPES)).any():
        bad = per_image.index[per_image != len(SUBTYPES)]
        raise SubmissionError(f"{len(bad)} images do not have exactly 6 rows (one per subtype), e.g. {_examples(bad)}")
    lack, extra = sample.difference(ids), ids.difference(sample)
    if len(lack) or len(extra):
        n_img = [len({i.rsplit("_", 1)[0] for i in part}) for part in (lack, extra)]
        raise SubmissionError(f"IDs differ from the sample submission: {len(lack)} IDs missing ({n_img[0]} images, "
                              f"e.g. {_examples(lack)}), {len(extra)} IDs extra ({n_img[1]} images, "
                              f"e.g. {_examples(extra)})")
    labels = pd.to_numeric(sub_long["Label"], errors="coerce").to_numpy(np.float64)
    if np.isnan(labels).any():
        raise SubmissionError(f"{int(np.isnan(labels).sum())} Label values are NaN or not numbers, "
                              f"e.g. IDs {_examples(ids[np.isnan(labels)])}")
    tol = 1e-12
    out = (labels < clip - tol) | (labels > 1 - clip + tol)
    if out.any():
        raise SubmissionError(f"{int(out.sum())} Label values outside [{clip}, {1 - clip}], "
                              f"e.g. IDs {_examples(ids[out])}; clip before validating")


def write_submission(wide_pred: pd.DataFrame, path: PathLike, sample_submission: Union[PathLike, pd.DataFrame],
                     clip: float = CLIP) -> Path:
    """Clip to [clip, 1 - clip], convert to ID,Label in the sample's row order, validate, then write atomically.

    NaN survives clipping and fails validation; nothing is written unless the submission is valid.
    """
    if not 0 < clip < 0.5:
        raise ValueError(f"clip must be in (0, 0.5); got {clip}")
    values = wide_pred[[s for s in SUBTYPES if s in wide_pred.columns]].to_numpy(np.float64)
    bad = ~np.isfinite(values)
    if bad.any():
        rows = wide_pred.index[bad.any(axis=1)]
        raise SubmissionError(f"{int(bad.sum())} predictions are NaN or infinite, e.g. images {_examples(rows)}; "
                              "nothing written")
    outside = (values < 0) | (values > 1)
    if outside.any():
        warnings.warn(f"{int(outside.sum())} predictions lie outside [0, 1] (min {values.min():.4g}, max "
                      f"{values.max():.4g}), e.g. images {_examples(wide_pred.index[outside.any(axis=1)])}; "
                      f"clipped to [{clip}, {1 - clip}]", UserWarning, stacklevel=2)
    sub = to_long(wide_pred)
    sub["Label"] = np.clip(sub["Label"].to_numpy(np.float64), clip, 1 - clip)
    order = _sample_ids(sample_submission)
    _validate(sub, order, clip)
    sub = sub.set_index("ID").reindex(order).rename_axis("ID").reset_index()
    path = Path(path)
    atomic_write_text(path, sub.to_csv(index=False))
    return path


def fill_missing(pred: pd.DataFrame, sample_submission: Union[PathLike, pd.DataFrame],
                 prior: Mapping[str, float]) -> Tuple[pd.DataFrame, int]:
    """Images of the sample submission without a prediction (unreadable test DICOMs) get `prior` (per label, e.g.
    the training prevalence) -> (table covering every sample image, number of images filled)."""
    ids = pd.Index(split_ids(pd.Series(_sample_ids(sample_submission)), source="sample submission")["image_id"]
                   .unique(), name="image_id")
    lack = ids.difference(pred.index)
    if not len(lack):
        return pred, 0
    row = [float(prior[s]) for s in pred.columns]
    filler = pd.DataFrame([row] * len(lack), index=lack, columns=pred.columns)
    return pd.concat([pred, filler]), len(lack)
