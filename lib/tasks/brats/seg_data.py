"""Stage-1 data of the BraTS task: 2D slices of the task-1 NIfTI cases for the tumour segmentation network.

`extract_slices(task1_root, out_dir, exclude_ids)` reads every `BraTS2021_<id>/` case (the T4E seed: all four
modalities, all three planes), keeps the slices whose whole-tumour (WT) area exceeds `min_fraction` of the brain
area (non-zero voxels; then every `keep_every`-th of those, per case and plane) and writes one file per slice:

  out_dir/meta.json                      the extraction parameters (a folder with other parameters is refused)
  out_dir/slices/<id>/<plane>_<k>.npz    image float16 (4, S, S): flair, t1, t1ce, t2, each z-scored on its non-zero
                                         voxels over the whole volume (lib.io.mr_series "zscore_nonzero", zero
                                         background kept); mask uint8 (2, S, S) 0/1: WT = {1, 2, 4}, ET = {4}
  out_dir/cases/<id>.json                the case's rows (path relative to out_dir), written last: its presence
                                         marks the case done (resume)
  out_dir/slices.parquet                 case_id, plane, slice, path (absolute; rewritten on every call, so a moved
                                         folder is fixed by calling again), wt_frac, et_frac
  out_dir/bad_cases.csv                  folder, case_id, reason, detail of the cases that could not be read

Planes index the on-disk voxel array (X, Y, Z) (BraTS files are LPS): sagittal = x[i, :, :] (Y, Z), coronal =
x[:, j, :] (X, Z), axial = x[:, :, k] (X, Y); `slice` is that index. Slices are resized to S x S with cv2 (images
bilinear, masks nearest), so non-square slices (240 x 155) are stretched, as in the seed. wt_frac / et_frac are the
region's fraction of the slice's pixels at the native grid. Bad cases are retried on every call (a repaired case is
picked up); reasons: bad_name (folder not BraTS2021_<5 digits>), missing (a file), grid_mismatch (shape / affine
differs between files), invalid (unreadable NIfTI, not 3-D, labels outside {0, 1, 2, 4}).

The seed drops every task-2 patient from stage-1 training (the segmentation network later draws the masks stage 2
classifies, so a task-2 patient seen in stage 1 would leak): pass their IDs as `exclude_ids`.
"""
from __future__ import annotations

import json
import zlib
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple, Union

import cv2
import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset

from lib.io.mr_series import normalise
from lib.io.nifti import MODALITIES, BratsCase, BratsCaseError, case_files, case_id, read_brats_case, region_channels
from lib.paths import atomic_write, atomic_write_text
from lib.progress import progress_bar

PathLike = Union[str, Path]
VERSION = "brats-seg-slices-1"
PLANE_AXES: Dict[str, int] = {"sagittal": 0, "coronal": 1, "axial": 2}  # axis of the (X, Y, Z) array
SEG_REGIONS: Tuple[str, ...] = ("WT", "ET")
NORMALISER = "zscore_nonzero"
TABLE_COLUMNS = ["case_id", "plane", "slice", "path", "wt_frac", "et_frac"]
BAD_COLUMNS = ["folder", "case_id", "reason", "detail"]


def check_planes(planes: Sequence[str]) -> Tuple[str, ...]:
    unknown = [p for p in planes if p not in PLANE_AXES]
    if unknown or not planes:
        raise KeyError(f"unknown planes {unknown or list(planes)}; valid: {sorted(PLANE_AXES)}")
    return tuple(planes)


def normalised_stack(images: Dict[str, np.ndarray]) -> np.ndarray:
    """{modality: (X, Y, Z) raw MR units} -> (4, X, Y, Z) float32 in MODALITIES order, each z-scored on its
    non-zero voxels (zeros stay 0)."""
    return np.stack([normalise(images[m], NORMALISER) for m in MODALITIES])


def resize_slice(arr: np.ndarray, size: int, nearest: bool = False) -> np.ndarray:
    """(C, H, W) -> (C, size, size) with cv2 (bilinear, or nearest for masks), dtype kept."""
    hwc = np.ascontiguousarray(np.moveaxis(arr, 0, -1))
    out = cv2.resize(hwc, (size, size), interpolation=cv2.INTER_NEAREST if nearest else cv2.INTER_LINEAR)
    return np.moveaxis(out.reshape(size, size, -1), -1, 0)


def plane_slices(volume: np.ndarray, plane: str) -> np.ndarray:
    """(C, X, Y, Z) -> (n, C, H, W): the volume's slices along `plane` (PLANE_AXES), in index order."""
    return np.moveaxis(volume, 1 + PLANE_AXES[plane], 0)


def select_slices(wt: np.ndarray, plane: str, min_fraction: float, keep_every: int,
                  brain: Optional[np.ndarray] = None) -> Tuple[np.ndarray, np.ndarray]:
    """(indices, WT fractions of the slice) of the slices along `plane` of the (X, Y, Z) WT mask whose tumour area
    exceeds `min_fraction` of the brain area (the seed's filter; `brain` (X, Y, Z) bool, None: of the whole slice),
    thinned to every keep_every-th."""
    axes = tuple(a for a in range(3) if a != PLANE_AXES[plane])
    frac = wt.mean(axis=axes)
    if brain is None:
        ratio = frac
    else:
        ratio = wt.sum(axis=axes) / np.maximum(brain.sum(axis=axes), 1)
    keep = np.flatnonzero(ratio > min_fraction)[::keep_every]
    return keep, frac[keep]


def _save_npz(path: Path, image: np.ndarray, mask: np.ndarray) -> None:
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as fh:  # a file object: np.savez would append .npz to a temp file's name
            np.savez_compressed(fh, image=image, mask=mask)
    atomic_write(path, write)


def _read_case(folder: Path) -> Tuple[Optional[BratsCase], Optional[Tuple[str, str]]]:
    """(BratsCase, None) or (None, (reason, detail))."""
    try:
        case_files(folder)
    except BratsCaseError as exc:
        return None, ("missing", str(exc))
    try:
        return read_brats_case(folder), None
    except BratsCaseError as exc:
        return None, ("grid_mismatch", str(exc))
    except (ValueError, OSError, EOFError, zlib.error) as exc:
        return None, ("invalid", f"{type(exc).__name__}: {exc}")


def extract_case(case: BratsCase, out_dir: Path, size: int, planes: Sequence[str], min_fraction: float,
                 keep_every: int) -> List[dict]:
    """Write the kept slices of one BratsCase under out_dir/slices/<id>/; returns their table rows."""
    masks = region_channels(case.seg, SEG_REGIONS)  # (2, X, Y, Z) uint8
    image = normalised_stack(case.images)
    brain = np.stack([case.images[m] != 0 for m in MODALITIES]).any(axis=0)  # skull-stripped: brain = non-zero
    folder = out_dir / "slices" / case.case_id
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for plane in planes:
        keep, wt_frac = select_slices(masks[0], plane, min_fraction, keep_every, brain)
        img_sl, mask_sl = plane_slices(image, plane), plane_slices(masks, plane)
        for k, frac in zip(keep.tolist(), wt_frac.tolist()):
            rel = f"slices/{case.case_id}/{plane}_{k:03d}.npz"
            _save_npz(out_dir / rel, resize_slice(img_sl[k], size).astype(np.float16),
                      resize_slice(mask_sl[k], size, nearest=True).astype(np.uint8))
            rows.append(dict(case_id=case.case_id, plane=plane, slice=k, path=rel, wt_frac=float(frac),
                             et_frac=float(mask_sl[k][1].mean())))
    return rows


def _prepare(out_dir: Path, meta: dict) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "meta.json"
    if path.exists():
        old = json.loads(path.read_text())
        if old != meta:
            raise ValueError(f"{out_dir}: meta.json {old} differs from this extraction {meta}; use another folder "
                             f"or delete it to rebuild")
    else:
        atomic_write_text(path, json.dumps(meta, indent=1))
    (out_dir / "cases").mkdir(exist_ok=True)
    for tmp in out_dir.glob("slices/*/.*.tmp"):  # left by a killed run (atomic_write's temp files)
        tmp.unlink(missing_ok=True)


def _case_folders(task1_root: Path) -> List[Path]:
    if not task1_root.is_dir():
        raise FileNotFoundError(f"task-1 folder not found: {task1_root} (expected BraTS2021_<id>/ case folders)")
    return sorted(p for p in task1_root.iterdir() if p.is_dir())


def extract_slices(task1_root: PathLike, out_dir: PathLike, exclude_ids: Iterable[str], size: int = 224,
                   planes: Sequence[str] = ("axial", "coronal", "sagittal"), min_fraction: float = 0.01,
                   keep_every: int = 1, progress: bool = True) -> pd.DataFrame:
    """Extract the training slices of every case under `task1_root` except `exclude_ids` (5-digit BraTS IDs) into
    `out_dir` (module docstring); resumable: cases whose out_dir/cases/<id>.json exists are not redone. Returns the
    slices table (TABLE_COLUMNS, `path` absolute) of the cases not excluded, also written as slices.parquet, and
    writes bad_cases.csv."""
    task1_root, out_dir = Path(task1_root), Path(out_dir)
    planes = check_planes(planes)
    if size < 8 or keep_every < 1 or not 0 <= min_fraction < 1:
        raise ValueError(f"need size >= 8, keep_every >= 1, 0 <= min_fraction < 1; got size={size}, "
                         f"keep_every={keep_every}, min_fraction={min_fraction}")
    exclude = {str(i) for i in exclude_ids}
    bad_ids = sorted(i for i in exclude if not (len(i) == 5 and i.isdigit()))
    if bad_ids:
        raise ValueError(f"exclude_ids must be 5-digit BraTS IDs (zero-padded strings), got {bad_ids[:5]}")
    meta = dict(version=VERSION, size=int(size), planes=list(planes), min_fraction=float(min_fraction),
                keep_every=int(keep_every), modalities=list(MODALITIES), regions=list(SEG_REGIONS),
                normaliser=NORMALISER)
    _prepare(out_dir, meta)
    rows: List[dict] = []
    bad: List[dict] = []
    for folder in progress_bar(_case_folders(task1_root), desc="seg slices", unit="case", disable=not progress):
        try:
            cid = case_id(folder)
        except BratsCaseError as exc:
            bad.append(dict(folder=folder.name, case_id="", reason="bad_name", detail=str(exc)))
            continue
        if cid in exclude:
            continue
        done = out_dir / "cases" / f"{cid}.json"
        if done.exists():
            rows += json.loads(done.read_text())
            continue
        case, why = _read_case(folder)
        if why is not None:
            bad.append(dict(folder=folder.name, case_id=cid, reason=why[0], detail=why[1]))
            continue
        case_rows = extract_case(case, out_dir, size, planes, min_fraction, keep_every)
        atomic_write_text(done, json.dumps(case_rows))
        rows += case_rows
    table = pd.DataFrame(rows, columns=TABLE_COLUMNS).astype({"case_id": str, "plane": str, "slice": "int64"})
    table["path"] = [str(out_dir.resolve() / p) for p in table["path"]]
    atomic_write(out_dir / "slices.parquet", lambda tmp: table.to_parquet(tmp, index=False))
    atomic_write_text(out_dir / "bad_cases.csv", pd.DataFrame(bad, columns=BAD_COLUMNS).to_csv(index=False))
    return table


def load_slice_table(out_dir: PathLike) -> pd.DataFrame:
    """out_dir/slices.parquet, `path` pointing into `out_dir` as it is now (the folder may have moved since)."""
    out_dir = Path(out_dir)
    path = out_dir / "slices.parquet"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: run extract_slices into {out_dir} first")
    table = pd.read_parquet(path)
    rel = [str(Path(p).relative_to(Path(p).parents[2])) for p in table["path"]]  # slices/<id>/<plane>_<k>.npz
    return table.assign(case_id=table["case_id"].astype(str), path=[str(out_dir.resolve() / r) for r in rel])


class SegSliceDataset(Dataset):
    """Slices of an extract_slices table -> (image float32 (C, S, S) z-scored, mask float32 (2, S, S) 0/1 WT, ET).

    channels: "single" (the seed, and what stage 2 feeds the model: every (slice, modality) pair is its own item
    with a 1-channel image, item i = slice i // 4, modality MODALITIES[i % 4]) or "stack" (one item per slice, the
    4 co-registered modalities as channels). augment: a random horizontal and a random vertical flip (each p = 0.5,
    the same for image and mask), drawn from torch's RNG (reseeded per epoch by lib.train.callbacks.EpochSeed;
    torch seeds each DataLoader worker)."""

    def __init__(self, table: pd.DataFrame, augment: bool, channels: str = "single") -> None:
        if "path" not in table.columns:
            raise KeyError(f"table lacks a path column; has {list(table.columns)} (use load_slice_table)")
        if channels not in ("single", "stack"):
            raise ValueError(f"channels must be 'single' or 'stack', got {channels!r}")
        self.paths = [str(p) for p in table["path"]]
        self.augment, self.channels = bool(augment), channels
        self.per_slice = len(MODALITIES) if channels == "single" else 1

    def __len__(self) -> int:
        return len(self.paths) * self.per_slice

    def __getitem__(self, i: int) -> Tuple[torch.Tensor, torch.Tensor]:
        with np.load(self.paths[i // self.per_slice]) as z:
            image = z["image"].astype(np.float32)
            mask = torch.from_numpy(z["mask"].astype(np.float32))
        if self.per_slice > 1:
            image = image[i % self.per_slice][None]
        image = torch.from_numpy(np.ascontiguousarray(image))
        if self.augment:
            flip = torch.rand(2)
            dims = [d for d, r in zip((-1, -2), flip.tolist()) if r < 0.5]
            if dims:
                image, mask = image.flip(dims), mask.flip(dims)
        return image, mask


def split_cases(case_ids: Iterable[str], valid_frac: float, seed: int) -> Tuple[List[str], List[str]]:
    """(train IDs, valid IDs), both sorted: the unique case IDs shuffled with `seed`, round(valid_frac * n) (at
    least 1) for validation; every slice of a case lands on one side."""
    ids = sorted({str(i) for i in case_ids})
    if not 0 < valid_frac < 1 or len(ids) < 2:
        raise ValueError(f"need 0 < valid_frac < 1 and >= 2 cases; got valid_frac={valid_frac}, {len(ids)} cases")
    n_valid = min(max(1, int(round(valid_frac * len(ids)))), len(ids) - 1)
    order = np.random.default_rng(seed).permutation(len(ids))
    valid = sorted(ids[i] for i in order[:n_valid])
    return [i for i in ids if i not in set(valid)], valid
