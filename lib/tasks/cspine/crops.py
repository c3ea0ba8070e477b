"""Per-vertebra crops of a cervical-spine CT (the 4th-place input) and their labels under the visibility rule.

A study's segmentation (Z, Y, X) uint8 holds 1..7 for C1..C7 (other values, e.g. the thoracic 8..n of the
competition's masks, are ignored) on the grid of its HU volume (`lib.io.ct_volume.segmentation_for`).

Visibility rule (the 4th place's: a vertebra less than 30 % visible gets label 0). The visible fraction of a
vertebra is estimated as follows (`visibility`):
  * absent from the mask: 0;
  * its box touches neither the first nor the last slice: 1 (the whole vertebra lies inside the field of view
    along z; the in-plane field of view always covers the spine);
  * cut by the first or last slice: its volume in mm^3 over `expected_mm3`, the median volume of that vertebra
    over the studies where it is not cut (`expected_volumes`), clipped to [0, 1].
`vertebra_labels` then sets the label of a vertebra below `threshold` (0.3) to 0 and recomputes patient_overall as
the max over the seven vertebra labels. These are *training* targets; the competition truth stays train.csv.

Crop (`crop_vertebra`): the vertebra's box grown by `margin` of its extent on each side, made square in-plane (side
= the larger in-plane extent), padded with air outside the volume, resampled to `n_slices` x `size` x `size`
(image linear, mask nearest) -> uint8 (3, n_slices, size, size): [windowed image, windowed image, mask of that
vertebra * 255].

`build_crops` writes RUN-chosen `out_dir/<study>_C<k>.npy` (atomic) and `out_dir/crops.csv` (StudyInstanceUID,
vertebra, path, visible_frac, label), one row per (study, vertebra) with path "" for a vertebra absent from the
mask; rerunning skips the studies already in the table whose files exist (resumable).
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Callable, Dict, Iterable, Mapping, Optional, Sequence, Tuple, Union

import cv2
import numpy as np
import pandas as pd

from lib.imaging.windowing import WINDOWS, Window, window_uint8
from lib.io.ids import child_path, id_problem
from lib.paths import atomic_save_npy, atomic_write_text
from lib.tasks.cspine.metric import CSPINE_GROUP, CSPINE_LABELS

PathLike = Union[str, Path]
Box3 = Tuple[int, int, int, int, int, int]  # (z0, z1, y0, y1, x0, x1), half-open voxel index ranges
VERTEBRAE: Tuple[str, ...] = CSPINE_LABELS[:7]
OVERALL = CSPINE_LABELS[7]
TABLE_COLUMNS = (CSPINE_GROUP, "vertebra", "path", "visible_frac", "label")
VISIBLE_THRESHOLD = 0.3
HU_AIR = -1024.0
_log = logging.getLogger(__name__)
#: A loader for build_crops: study id -> (HU volume (Z, Y, X) float32, mask (Z, Y, X) uint8, spacing (z, y, x) mm).
Loader = Callable[[str], Tuple[np.ndarray, np.ndarray, Tuple[float, float, float]]]


class CropError(ValueError):
    """A mask, volume or crop table that does not have the expected shape, values or columns."""


def _index(vertebra: Union[int, str]) -> int:
    """'C3' or 3 -> 3; anything else -> CropError."""
    k = int(vertebra[1:]) if isinstance(vertebra, str) and vertebra[:1] == "C" and vertebra[1:].isdigit() else vertebra
    if not isinstance(k, (int, np.integer)) or not 1 <= int(k) <= 7:
        raise CropError(f"vertebra must be 1..7 or one of {list(VERTEBRAE)}, got {vertebra!r}")
    return int(k)


def vertebra_boxes(mask: np.ndarray) -> Dict[str, Optional[Box3]]:
    """mask (Z, Y, X) integer labels -> {"C1".."C7": (z0, z1, y0, y1, x0, x1) half-open, or None when absent}."""
    if mask.ndim != 3:
        raise CropError(f"mask must be (Z, Y, X), got shape {mask.shape}")
    return {name: _box(mask == k) for k, name in enumerate(VERTEBRAE, start=1)}


def _box(hit: np.ndarray) -> Optional[Box3]:
    """Bounding box (z0, z1, y0, y1, x0, x1), half-open, of a (Z, Y, X) bool array; None when it is all False."""
    if not hit.any():
        return None
    ranges = []
    for axis in range(3):
        idx = np.flatnonzero(hit.any(axis=tuple(a for a in range(3) if a != axis)))
        ranges += [int(idx[0]), int(idx[-1]) + 1]
    return tuple(ranges)  # type: ignore[return-value]


def vertebra_volume_mm3(mask: np.ndarray, vertebra: Union[int, str], spacing: Sequence[float] = (1, 1, 1)) -> float:
    """Volume of one vertebra in mm^3 (voxel count times the voxel volume from spacing (z, y, x) mm)."""
    return float((mask == _index(vertebra)).sum()) * float(np.prod(spacing))


def touches_edge(box: Optional[Box3], n_slices: int) -> bool:
    """True when a box reaches the volume's first (0) or last (n_slices - 1) slice."""
    return box is not None and (box[0] == 0 or box[1] == n_slices)


def visibility(mask: np.ndarray, vertebra: Union[int, str], expected_mm3: Optional[float] = None,
               spacing: Sequence[float] = (1, 1, 1)) -> float:
    """Estimated visible fraction in [0, 1] of a vertebra (the rule of the module docstring). A vertebra cut by
    the first/last slice needs `expected_mm3` (its median uncut volume); without it -> CropError."""
    name = VERTEBRAE[_index(vertebra) - 1]
    box = _box(mask == _index(vertebra))
    if box is None:
        return 0.0
    if not touches_edge(box, mask.shape[0]):
        return 1.0
    if expected_mm3 is None or not expected_mm3 > 0:
        raise CropError(f"{name} is cut by the volume's edge: its visible fraction needs expected_mm3 > 0 "
                        f"(median uncut volume, `expected_volumes`), got {expected_mm3!r}")
    return float(np.clip(vertebra_volume_mm3(mask, name, spacing) / expected_mm3, 0.0, 1.0))


def expected_volumes(stats: pd.DataFrame) -> Dict[str, float]:
    """Median uncut volume per vertebra from rows (vertebra, volume_mm3, cut bool) of many studies; a vertebra
    never seen uncut is left out."""
    uncut = stats[~stats["cut"].astype(bool) & (stats["volume_mm3"] > 0)]
    return {str(k): float(v) for k, v in uncut.groupby("vertebra")["volume_mm3"].median().items()}


def study_stats(mask: np.ndarray, spacing: Sequence[float]) -> pd.DataFrame:
    """Per vertebra of one mask: vertebra, volume_mm3, cut (touches the first/last slice)."""
    boxes = vertebra_boxes(mask)
    return pd.DataFrame({"vertebra": list(VERTEBRAE),
                         "volume_mm3": [vertebra_volume_mm3(mask, v, spacing) for v in VERTEBRAE],
                         "cut": [touches_edge(boxes[v], mask.shape[0]) for v in VERTEBRAE]})


def vertebra_labels(study_labels: Mapping[str, float], visible: Mapping[str, float],
                    threshold: float = VISIBLE_THRESHOLD) -> Dict[str, int]:
    """C1..C7 labels (0/1) with a vertebra less than `threshold` visible set to 0 (missing from `visible`: 0
    visible), and patient_overall recomputed as their max. `study_labels`: a train.csv row (any mapping)."""
    missing = [v for v in VERTEBRAE if v not in study_labels]
    if missing:
        raise CropError(f"study_labels lacks {missing}; expected the train.csv columns {list(CSPINE_LABELS)}")
    out = {v: int(int(study_labels[v]) == 1 and float(visible.get(v, 0.0)) >= threshold) for v in VERTEBRAE}
    out[OVERALL] = max(out[v] for v in VERTEBRAE)
    return out


def _span(lo: int, hi: int, margin: float, side: Optional[float] = None) -> Tuple[int, int]:
    """[lo, hi) grown by margin * extent each side (or centred at `side` * (1 + 2 margin) long), integer bounds."""
    centre, length = (lo + hi) / 2, (hi - lo if side is None else side) * (1 + 2 * margin)
    a = int(np.floor(centre - length / 2))
    return a, max(a + 1, int(np.ceil(centre + length / 2)))


def _take(array: np.ndarray, bounds: Sequence[Tuple[int, int]], fill: float) -> np.ndarray:
    """array[z0:z1, y0:y1, x0:x1] where bounds may leave the array; outside is `fill`."""
    out = np.full(tuple(b - a for a, b in bounds), fill, dtype=array.dtype)
    src = tuple(slice(max(a, 0), min(b, n)) for (a, b), n in zip(bounds, array.shape))
    dst = tuple(slice(s.start - a, s.stop - a) for s, (a, _) in zip(src, bounds))
    if all(s.stop > s.start for s in src):
        out[dst] = array[src]
    return out


def _resample(stack: np.ndarray, n_slices: int, size: int, nearest: bool) -> np.ndarray:
    """(D, H, W) -> (n_slices, size, size): linear (or nearest) in z, cv2 linear (or nearest) in-plane."""
    pos = np.linspace(0, stack.shape[0] - 1, n_slices)
    if nearest:
        zs = stack[np.round(pos).astype(np.int64)]
    else:
        lo = np.floor(pos).astype(np.int64)
        hi, t = np.minimum(lo + 1, stack.shape[0] - 1), (pos - lo).astype(np.float32)[:, None, None]
        zs = stack[lo].astype(np.float32) * (1 - t) + stack[hi].astype(np.float32) * t
    interp = cv2.INTER_NEAREST if nearest else cv2.INTER_LINEAR
    return np.stack([cv2.resize(np.ascontiguousarray(s), (size, size), interpolation=interp) for s in zs])


def crop_vertebra(volume: np.ndarray, mask: np.ndarray, vertebra: Union[int, str], n_slices: int = 40,
                  size: int = 256, margin: float = 0.1, window: Window = WINDOWS["bone"]) -> np.ndarray:
    """One vertebra's crop -> uint8 (3, n_slices, size, size): [image, image, vertebra mask * 255].

    volume: (Z, Y, X) float HU (windowed with `window` to uint8) or uint8 (used as is); mask: the same shape,
    labels 1..7. Absent vertebra -> CropError.
    """
    if volume.shape != mask.shape or volume.ndim != 3:
        raise CropError(f"volume {volume.shape} and mask {mask.shape} must be the same (Z, Y, X) shape")
    k = _index(vertebra)
    box = _box(mask == k)
    if box is None:
        raise CropError(f"C{k} is absent from the mask (labels present: {np.unique(mask).tolist()})")
    z0, z1, y0, y1, x0, x1 = box
    side = max(y1 - y0, x1 - x0)
    bounds = [_span(z0, z1, margin), _span(y0, y1, margin, side), _span(x0, x1, margin, side)]
    if volume.dtype == np.uint8:
        img = _take(volume, bounds, 0)
    else:
        img = window_uint8(_take(volume.astype(np.float32, copy=False), bounds, HU_AIR), window)
    seg = (_take(mask, bounds, 0) == k).astype(np.uint8) * 255
    img = np.clip(np.round(_resample(img, n_slices, size, nearest=False)), 0, 255).astype(np.uint8)
    seg = _resample(seg, n_slices, size, nearest=True).astype(np.uint8)
    return np.stack([img, img, seg])


# ---------------------------------------------------------------- crop table (resumable)
def _read_table(path: Path) -> pd.DataFrame:
    if not path.is_file():
        return pd.DataFrame({c: pd.Series(dtype=object) for c in TABLE_COLUMNS})
    table = pd.read_csv(path, dtype={CSPINE_GROUP: str, "vertebra": str, "path": str}, keep_default_na=False,
                        na_values={"label": [""], "visible_frac": [""]})
    missing = [c for c in TABLE_COLUMNS if c not in table.columns]
    if missing:
        raise CropError(f"{path}: missing columns {missing}; expected {list(TABLE_COLUMNS)}")
    return table


def _absolute(table: pd.DataFrame, out_dir: Path) -> pd.DataFrame:
    """The table with each crop file name (as stored) made an absolute path under `out_dir` ("" stays "")."""
    root = out_dir.resolve()
    return table.assign(path=[str(root / p) if p else "" for p in table["path"]]).reset_index(drop=True)


def read_crop_table(path: PathLike) -> pd.DataFrame:
    """The crops.csv of `build_crops` with absolute crop paths (path "" = no crop; label NaN = unlabelled study).
    The file stores names relative to its folder, so a crop folder can be moved (e.g. into a Kaggle dataset)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"crop table not found: {path}")
    return _absolute(_read_table(path), path.parent)


def _done(table: pd.DataFrame, out_dir: Path) -> set:
    """Studies with all 7 rows whose crop files exist."""
    ok = np.array([p == "" or (out_dir / p).is_file() for p in table["path"]], dtype=bool)
    full = table.loc[ok].groupby(CSPINE_GROUP)["vertebra"].nunique()
    return set(full.index[full == len(VERTEBRAE)])


def _check_meta(out_dir: Path, meta: dict) -> None:
    path = out_dir / "crops_meta.json"
    if path.is_file() and json.loads(path.read_text()) != meta:
        raise CropError(f"{out_dir} holds crops made with {json.loads(path.read_text())}, not {meta}; use another "
                        "folder")
    atomic_write_text(path, json.dumps(meta, indent=1))


def build_crops(studies: Iterable[str], load: Loader, out_dir: PathLike, expected_mm3: Mapping[str, float],
                labels: Optional[pd.DataFrame] = None, n_slices: int = 40, size: int = 256, margin: float = 0.1,
                window: Window = WINDOWS["bone"], threshold: float = VISIBLE_THRESHOLD) -> pd.DataFrame:
    """Crop every vertebra of every study into `out_dir` (see the module docstring) and return the crop table.

    load: study -> (HU (Z, Y, X), mask (Z, Y, X) uint8, spacing (z, y, x) mm); expected_mm3: median uncut volume
    per vertebra (`expected_volumes` over `study_stats` of the training masks; a cut vertebra without one counts as
    fully visible, with a warning); labels: train.csv (labels via `vertebra_labels`) or None (test: label NaN).
    The table (crop paths absolute, as `read_crop_table` gives) is rewritten atomically after each study, so a
    killed run resumes where it stopped.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    _check_meta(out_dir, {"n_slices": n_slices, "size": size, "margin": margin, "window": [window.center,
                          window.width], "threshold": threshold, "expected_mm3": dict(sorted(expected_mm3.items()))})
    lab = None if labels is None else labels.set_index(CSPINE_GROUP)
    table_path = out_dir / "crops.csv"
    table = _read_table(table_path)
    done = _done(table, out_dir)
    table = table[table[CSPINE_GROUP].isin(done)]
    for study in studies:
        if study in done:
            continue
        problem = id_problem(study, what="StudyInstanceUID")
        if problem:
            raise CropError(problem)
        if lab is not None and study not in lab.index:
            raise CropError(f"study {study!r} has no row in labels")
        rows = _crop_study(study, load, out_dir, expected_mm3, n_slices, size, margin, window)
        vis = {r["vertebra"]: r["visible_frac"] for r in rows}
        targets = vertebra_labels(lab.loc[study], vis, threshold) if lab is not None else {}
        for r in rows:
            r["label"] = targets.get(r["vertebra"], np.nan)
        table = pd.concat([table, pd.DataFrame(rows, columns=list(TABLE_COLUMNS))], ignore_index=True)
        atomic_write_text(table_path, table.to_csv(index=False))
        done.add(study)
    return _absolute(table, out_dir)


def _crop_study(study: str, load: Loader, out_dir: Path, expected_mm3: Mapping[str, float], n_slices: int,
                size: int, margin: float, window: Window) -> list:
    volume, mask, spacing = load(study)
    boxes = vertebra_boxes(mask)
    rows = []
    for v in VERTEBRAE:
        if boxes[v] is not None and touches_edge(boxes[v], mask.shape[0]) and v not in expected_mm3:
            _log.warning("%s %s is cut by the volume's edge and has no expected volume: counted fully visible",
                         study, v)
            frac = 1.0
        else:
            frac = visibility(mask, v, expected_mm3.get(v), spacing)
        path = ""
        if boxes[v] is not None:
            path = child_path(out_dir, f"{study}_{v}", ".npy").name
            atomic_save_npy(out_dir / path, crop_vertebra(volume, mask, v, n_slices, size, margin, window))
        rows.append({CSPINE_GROUP: study, "vertebra": v, "path": path, "visible_frac": frac})
    return rows
