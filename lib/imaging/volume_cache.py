"""CT study folders -> resampled, windowed 3D volumes (+ label volumes) as `.npy` files: a resumable, parallel cache.

Layout: `<cache_root>/<key>/` where `key` names the parameters (`volume_key`), with
  meta.json            the parameters; a folder whose meta.json holds other parameters is refused (ValueError);
  <study>.npy          (Z, Y, X) uint8 (HU window -> 0..255) or float16 (HU window -> [0, 1]), C-order, np.load
                       (mmap_mode='r') friendly; axis 0 along the slice normal as lib.io.ct_volume orders it;
  <study>_seg.npy      (Z, Y, X) uint8 labels on the same grid (nearest-neighbour resampling), when a mask is given;
  <study>.json         the study's record: fingerprint (file names, sizes, mtimes of its slices and mask), shape,
                       spacing, or its bad-study reason; written last, so a study whose record exists is complete;
  table.json, bad.csv  the returned tables, written at the end of a call.

Resampling: `spacing=(dz, dy, dx)` mm gives shape round(native shape * native spacing / spacing); `size=(Z, Y, X)`
gives that shape (spacing then follows from the extent); neither keeps the native grid. Images interpolate
trilinearly (torch.nn.functional.interpolate, align_corners=False) after clipping to the HU window; labels take
'nearest-exact'. A study is re-read only when its fingerprint changed (or its files are missing); a bad study (any
lib.io.ct_volume.StudyError, or a mask that does not line up: reason 'bad_segmentation') becomes a row of the bad
table and is remembered under the same fingerprint rule, never a crash.
"""
from __future__ import annotations

import hashlib
import json
import os
import signal
import sys
from multiprocessing import get_context
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import pandas as pd

from lib.paths import atomic_save_npy, atomic_write_text
from lib.progress import progress_bar

PathLike = Union[str, Path]
Triple = Tuple[float, float, float]
CACHE_VERSION = "volume-cache-1"
DTYPES = ("uint8", "float16")
TABLE_COLUMNS = ["study_id", "shape", "spacing", "path", "seg_path", "fingerprint"]
BAD_COLUMNS = ["study_id", "reason", "detail"]


# ---------------------------------------------------------------- parameters and identity
def _triple(value: Optional[Sequence[float]], name: str, kind: type) -> Optional[Tuple]:
    if value is None:
        return None
    out = tuple(kind(v) for v in value)
    if len(out) != 3 or min(out) <= 0:
        raise ValueError(f"{name} must be 3 positive numbers (Z, Y, X), got {value!r}")
    return out


def volume_meta(spacing: Optional[Sequence[float]] = None, size: Optional[Sequence[int]] = None,
                hu_window: Tuple[float, float] = (-1000.0, 2000.0), dtype: str = "uint8") -> Dict[str, Any]:
    """The meta.json content of a cache folder (checked parameters); ValueError on impossible ones."""
    if spacing is not None and size is not None:
        raise ValueError(f"give spacing or size, not both (spacing={spacing!r}, size={size!r})")
    lo, hi = (float(v) for v in hu_window)
    if not hi > lo:
        raise ValueError(f"hu_window must be (lo, hi) HU with hi > lo, got {hu_window!r}")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    return {"version": CACHE_VERSION, "spacing": _triple(spacing, "spacing", float), "size": _triple(size, "size", int),
            "hu_window": (lo, hi), "dtype": dtype}


def volume_key(meta: Mapping[str, Any]) -> str:
    """Folder name of a parameter set, e.g. 'sp2x1x1-w-1000_2000-uint8-3fa9c2d1' (readable part + hash)."""
    grid = ("sp" + "x".join(f"{v:g}" for v in meta["spacing"]) if meta["spacing"] else
            "sz" + "x".join(str(v) for v in meta["size"]) if meta["size"] else "native")
    lo, hi = meta["hu_window"]
    digest = hashlib.sha1(json.dumps(meta, sort_keys=True).encode()).hexdigest()[:8]
    return f"{grid}-w{lo:g}_{hi:g}-{meta['dtype']}-{digest}"


def cache_dir_for(cache_root: PathLike, **params: Any) -> Path:
    """The folder `cache_volumes(..., **params)` writes under `cache_root` (params: spacing, size, hu_window, dtype)."""
    return Path(cache_root) / volume_key(volume_meta(**params))


def _prepare_dir(cache_root: PathLike, meta: Dict[str, Any]) -> Path:
    out = Path(cache_root) / volume_key(meta)
    out.mkdir(parents=True, exist_ok=True)
    meta_path = out / "meta.json"
    plain = json.loads(json.dumps(meta))
    if meta_path.exists():
        saved = json.loads(meta_path.read_text())
        if saved != plain:
            raise ValueError(f"{out} holds a cache with other parameters {saved}; wanted {plain}: use another "
                             f"cache_root or remove the folder")
    else:
        atomic_write_text(meta_path, json.dumps(plain, indent=1, sort_keys=True) + "\n")
    return out


def study_fingerprint(folder: PathLike, seg_path: Optional[PathLike] = None) -> str:
    """sha1 (hex) of the names, sizes and mtimes (ns) of a study's `*.dcm` files and its mask file; changes whenever
    a file is added, removed, rewritten or touched. A missing folder or mask fingerprints as missing."""
    items: List[Tuple[str, int, int]] = []
    folder = Path(folder)
    paths = sorted(folder.glob("*.dcm")) if folder.is_dir() else []
    for p in paths + ([Path(seg_path)] if seg_path else []):
        try:
            st = p.stat()
            items.append((p.name if p.parent == folder else f"seg:{p}", int(st.st_size), int(st.st_mtime_ns)))
        except OSError:
            items.append((str(p), -1, -1))
    if not folder.is_dir():
        items.append((f"missing:{folder}", -1, -1))
    return hashlib.sha1(json.dumps(items).encode()).hexdigest()


# ---------------------------------------------------------------- one study
def resampled_shape(shape: Sequence[int], spacing: Sequence[float], target: Optional[Sequence[float]] = None,
                    size: Optional[Sequence[int]] = None) -> Tuple[Tuple[int, int, int], Triple]:
    """(shape, spacing mm) of a (Z, Y, X) grid resampled to `target` spacing or to `size` (neither: unchanged)."""
    shape_f, spacing_f = np.asarray(shape, float), np.asarray(spacing, float)
    if size is not None:
        new = np.asarray(size, int)
    elif target is not None:
        new = np.maximum(np.rint(shape_f * spacing_f / np.asarray(target, float)), 1).astype(int)
    else:
        new = shape_f.astype(int)
    out_spacing = shape_f * spacing_f / new
    return tuple(int(v) for v in new), tuple(round(float(v), 6) for v in out_spacing)  # type: ignore[return-value]


def resample(array: np.ndarray, shape: Sequence[int], labels: bool = False) -> np.ndarray:
    """(Z, Y, X) array -> `shape`: trilinear (float32 out) for images, nearest-exact (dtype kept) for labels."""
    import torch
    import torch.nn.functional as F

    if tuple(array.shape) == tuple(shape):
        return array
    x = torch.from_numpy(np.ascontiguousarray(array))[None, None]
    if labels:
        out = F.interpolate(x, size=tuple(shape), mode="nearest-exact")
    else:
        out = F.interpolate(x.float(), size=tuple(shape), mode="trilinear", align_corners=False)
    return out[0, 0].numpy()


def window(hu: np.ndarray, hu_window: Tuple[float, float], dtype: str) -> np.ndarray:
    """HU -> uint8 round(255 (clip(hu) - lo) / (hi - lo)) or float16 (clip(hu) - lo) / (hi - lo) in [0, 1]."""
    lo, hi = hu_window
    unit = (np.clip(hu, lo, hi, dtype=np.float32) - np.float32(lo)) / np.float32(hi - lo)
    return np.rint(unit * 255).astype(np.uint8) if dtype == "uint8" else unit.astype(np.float16)


def to_unit(volume: np.ndarray) -> np.ndarray:
    """A cached volume (uint8 0..255 or float16 [0, 1]) -> float32 in [0, 1], the models' input scale."""
    if volume.dtype == np.uint8:
        return np.asarray(volume, np.float32) / np.float32(255)
    return np.asarray(volume, np.float32)


def _record_path(out: Path, study: str) -> Path:
    return out / f"{study}.json"


def _process(job: Tuple[str, str, Optional[str], str, Dict[str, Any], str]) -> Dict[str, Any]:
    """Read, resample, window and write one study; returns its record (a bad study: reason + detail)."""
    from lib.io.ct_volume import SegmentationShapeError, StudyError, read_ct_volume, segmentation_for

    study, folder, seg_path, out_s, meta, fingerprint = job
    out = Path(out_s)
    record: Dict[str, Any] = {"study_id": study, "fingerprint": fingerprint}
    try:
        vol = read_ct_volume(folder)
        seg = segmentation_for(vol, seg_path) if seg_path else None
    except StudyError as exc:
        return {**record, "reason": exc.reason, "detail": exc.detail}
    except (SegmentationShapeError, OSError, ValueError) as exc:  # nibabel / shape problems of the mask
        return {**record, "reason": "bad_segmentation", "detail": f"{type(exc).__name__}: {exc}"[:500]}
    shape, spacing = resampled_shape(vol.hu.shape, vol.spacing, meta["spacing"], meta["size"])
    lo, hi = meta["hu_window"]
    image = window(resample(np.clip(vol.hu, lo, hi), shape), (lo, hi), meta["dtype"])
    atomic_save_npy(out / f"{study}.npy", image)
    if seg is not None:
        atomic_save_npy(out / f"{study}_seg.npy", resample(seg, shape, labels=True).astype(np.uint8))
    return {**record, "shape": list(shape), "spacing": list(spacing), "path": f"{study}.npy",
            "seg_path": f"{study}_seg.npy" if seg is not None else None}


def _cached(out: Path, study: str, fingerprint: str) -> Optional[Dict[str, Any]]:
    """The stored record when it is complete and its fingerprint matches, else None (the study is redone)."""
    path = _record_path(out, study)
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if record.get("fingerprint") != fingerprint:
        return None
    files = [record.get("path"), record.get("seg_path")] if "reason" not in record else []
    return record if all((out / f).is_file() for f in files if f) else None


# ---------------------------------------------------------------- the pool
def _worker_init() -> None:
    import torch

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C and ends the pool
    torch.set_num_threads(1)  # processes are the parallelism


def _n_workers(workers: Optional[int], n_jobs: int) -> int:
    n_cpu = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(n_cpu if workers is None else int(workers), n_jobs))


def _run(jobs: List[tuple], workers: Optional[int], progress: bool, out: Path) -> List[Dict[str, Any]]:
    n = _n_workers(workers, len(jobs))
    bar = progress_bar(total=len(jobs), desc="volume cache", unit="study", disable=not progress)
    records: List[Dict[str, Any]] = []

    def done(record: Dict[str, Any]) -> None:
        atomic_write_text(_record_path(out, record["study_id"]), json.dumps(record) + "\n")
        records.append(record)
        bar.update(1)
    try:
        if n <= 1:
            for job in jobs:
                done(_process(job))
        else:
            ctx = get_context("fork" if sys.platform.startswith("linux") else "spawn")
            with ctx.Pool(n, initializer=_worker_init) as pool:
                for record in pool.imap_unordered(_process, jobs):
                    done(record)
    finally:
        bar.close()
    return records


# ---------------------------------------------------------------- public API
def cache_volumes(studies: Mapping[str, PathLike], cache_root: PathLike, spacing: Optional[Sequence[float]] = None,
                  size: Optional[Sequence[int]] = None, hu_window: Tuple[float, float] = (-1000.0, 2000.0),
                  dtype: str = "uint8", workers: Optional[int] = None, progress: bool = True,
                  seg_paths: Optional[Mapping[str, PathLike]] = None) -> Tuple[pd.DataFrame, pd.DataFrame]:
    """Cache every study {study_id: DICOM folder} (+ masks {study_id: .nii}) under `cache_root` (module docstring).

    Returns (table: study_id, shape (Z, Y, X), spacing (dz, dy, dx) mm, path, seg_path (file names inside the cache
    folder; seg_path missing, pd.isna, without a mask), fingerprint; bad: study_id, reason, detail), in `studies`
    order.
    workers: processes (None: one per CPU; <= 1: in this process). Only new or changed studies are read.
    """
    meta = volume_meta(spacing, size, hu_window, dtype)
    seg_paths = dict(seg_paths or {})
    unknown = sorted(set(seg_paths) - set(studies))
    if unknown:
        raise KeyError(f"seg_paths names studies not in `studies`: {unknown[:5]}")
    for study in studies:
        if not study or "/" in study or study.startswith("."):
            raise ValueError(f"study_id {study!r} cannot be a file name in the cache")
    out = _prepare_dir(cache_root, meta)
    records: Dict[str, Dict[str, Any]] = {}
    jobs = []
    for study, folder in studies.items():
        seg = str(seg_paths[study]) if study in seg_paths else None
        fp = study_fingerprint(folder, seg)
        hit = _cached(out, study, fp)
        if hit is None:
            jobs.append((study, str(folder), seg, str(out), meta, fp))
        else:
            records[study] = hit
    records.update({r["study_id"]: r for r in _run(jobs, workers, progress, out)})
    ordered = [records[s] for s in studies]
    good = [r for r in ordered if "reason" not in r]
    table = pd.DataFrame([{k: r.get(k) for k in TABLE_COLUMNS} for r in good], columns=TABLE_COLUMNS)
    table["shape"] = [tuple(v) for v in table["shape"]]
    table["spacing"] = [tuple(v) for v in table["spacing"]]
    bad = pd.DataFrame([{k: r[k] for k in BAD_COLUMNS} for r in ordered if "reason" in r], columns=BAD_COLUMNS)
    atomic_write_text(out / "table.json", json.dumps(good, indent=0) + "\n")
    atomic_write_text(out / "bad.csv", bad.to_csv(index=False))
    return table, bad


def read_cache_table(cache_dir: PathLike) -> pd.DataFrame:
    """The table.json of a cache folder as `cache_volumes` returned it (shape / spacing as tuples)."""
    path = Path(cache_dir) / "table.json"
    if not path.is_file():
        raise FileNotFoundError(f"no volume cache table at {path} (run cache_volumes first)")
    table = pd.DataFrame(json.loads(path.read_text()), columns=TABLE_COLUMNS)
    table["shape"] = [tuple(v) for v in table["shape"]]
    table["spacing"] = [tuple(v) for v in table["spacing"]]
    return table


def _load(cache_dir: PathLike, name: Optional[str], what: str, mmap: bool) -> np.ndarray:
    if not isinstance(name, str) or not name:
        raise ValueError(f"this table row has no {what} file")
    path = Path(cache_dir) / name
    if not path.is_file():
        raise FileNotFoundError(f"cached {what} missing: {path}")
    return np.load(path, mmap_mode="r" if mmap else None)


def load_volume(cache_dir: PathLike, row: Mapping[str, Any], mmap: bool = True) -> np.ndarray:
    """A table row's image (Z, Y, X) uint8 / float16 (read-only memory map when `mmap`)."""
    return _load(cache_dir, row["path"], "image", mmap)


def load_segmentation(cache_dir: PathLike, row: Mapping[str, Any], mmap: bool = True) -> np.ndarray:
    """A table row's label volume (Z, Y, X) uint8 on the image's grid; ValueError when the row has none."""
    return _load(cache_dir, row.get("seg_path"), "segmentation", mmap)
