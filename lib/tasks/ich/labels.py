"""Label constants and the Kaggle long format (`ID_<image>_<subtype>,Label`) <-> wide table (one row per image)."""
from __future__ import annotations

from pathlib import Path
from typing import Union

import numpy as np
import pandas as pd

from lib.io.ids import BadIdError, check_ids
from lib.tasks.ich.data import ID_PATTERN

#: Label columns in the order of the Kaggle CSV rows; every (N, 6) array in this repo uses this order.
SUBTYPES = ("epidural", "intraparenchymal", "intraventricular", "subarachnoid", "subdural", "any")
#: Per-label weights of the competition metric (weighted multi-label log loss: any = 2, each subtype = 1).
WEIGHTS = np.array([2.0 if s == "any" else 1.0 for s in SUBTYPES], dtype=np.float64)


class LabelsError(ValueError):
    """A labels / submission CSV does not have the expected Kaggle format."""


def split_ids(ids: pd.Series, source: str = "labels") -> pd.DataFrame:
    """Split `ID_<image>_<subtype>` strings into `image_id` (`ID_<image>`) and `subtype` columns."""
    parts = ids.astype(str).str.rsplit("_", n=1, expand=True)
    if parts.shape[1] != 2 or parts.isna().any().any():
        bad = ids[parts.isna().any(axis=1)].head(3).tolist() if parts.shape[1] == 2 else ids.head(3).tolist()
        raise LabelsError(f"{source}: IDs must look like ID_<image>_<subtype>; got e.g. {bad}")
    out = pd.DataFrame({"image_id": parts[0].values, "subtype": parts[1].values})
    try:
        check_ids(pd.unique(out["image_id"]), ID_PATTERN, "image ID", source)
    except BadIdError as exc:
        raise LabelsError(str(exc)) from None
    unknown = sorted(set(out["subtype"]) - set(SUBTYPES))
    if unknown:
        raise LabelsError(f"{source}: unknown subtypes {unknown[:5]}; expected {list(SUBTYPES)}")
    return out


def read_long_csv(path: Union[str, Path], value_col: str = "Label") -> pd.DataFrame:
    """Read a Kaggle-format CSV and check its columns; returns the raw long table."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"labels file not found: {path}")
    df = pd.read_csv(path)
    missing = {"ID", value_col} - set(df.columns)
    if missing:
        raise LabelsError(f"{path}: missing columns {sorted(missing)}; expected columns ['ID', '{value_col}']")
    return df


def long_to_wide(df: pd.DataFrame, source: str = "labels", value_col: str = "Label") -> pd.DataFrame:
    """Long Kaggle rows -> wide table indexed by `image_id` with the 6 SUBTYPES columns.

    Exact duplicate rows (the 4 duplicated images of stage_2_train.csv) are dropped; conflicting duplicates
    (same ID, different label) and images without all 6 rows are errors.
    """
    df = df[["ID", value_col]].drop_duplicates()
    if df["ID"].duplicated().any():
        dup = df.loc[df["ID"].duplicated(), "ID"].head(3).tolist()
        raise LabelsError(f"{source}: conflicting labels for the same ID, e.g. {dup}")
    ids = split_ids(df["ID"], source)
    ids["value"] = df[value_col].to_numpy()
    if ids["value"].isna().any():
        raise LabelsError(f"{source}: {int(ids['value'].isna().sum())} empty {value_col} values")
    wide = ids.pivot(index="image_id", columns="subtype", values="value").reindex(columns=list(SUBTYPES))
    incomplete = wide.isna().any(axis=1)
    if incomplete.any():
        raise LabelsError(f"{source}: {int(incomplete.sum())} images lack some of the 6 subtype rows, "
                          f"e.g. {wide.index[incomplete][:3].tolist()}")
    wide.columns.name = None
    return wide


def read_labels(path: Union[str, Path]) -> pd.DataFrame:
    """`stage_2_train.csv` -> wide uint8 table (index `image_id`, columns SUBTYPES), duplicates removed."""
    wide = long_to_wide(read_long_csv(path), source=str(path))
    vals = wide.to_numpy()
    if not np.isin(vals, (0, 1)).all():
        raise LabelsError(f"{path}: labels must be 0 or 1")
    return wide.astype(np.uint8)


def wide_to_long(wide: pd.DataFrame, value_col: str = "Label") -> pd.DataFrame:
    """Wide table (index image_id, columns SUBTYPES) -> Kaggle long rows `ID,Label`, 6 rows per image."""
    missing = [s for s in SUBTYPES if s not in wide.columns]
    if missing:
        raise LabelsError(f"wide table lacks columns {missing}")
    vals = wide[list(SUBTYPES)].to_numpy()
    ids = np.char.add(np.repeat(wide.index.to_numpy().astype(str), len(SUBTYPES)),
                      np.tile(np.array(["_" + s for s in SUBTYPES]), len(wide)))
    return pd.DataFrame({"ID": ids, value_col: vals.reshape(-1)})


def write_long(wide: pd.DataFrame, path: Union[str, Path]) -> Path:
    """Write wide predictions as Kaggle `ID,Label` rows (6 per image), atomically; returns the path."""
    from lib.paths import atomic_write_text

    atomic_write_text(path, wide_to_long(wide).to_csv(index=False))
    return Path(path)
