"""Task-2 DICOM series -> a normalised slice cache: one float16 (Z, S, S) volume per patient and MRI type.

Each series is read once (`lib.io.mr_series.read_mr_series`: `Image-N` files ordered along the slice normal),
blank end slices are dropped (the seed's > 10 % non-zero rule), intensities normalised on the non-zero voxels by a
registered MR normaliser (`zscore_nonzero` default), and each slice is padded to a square with 0 (background)
and resized to S x S. Cache layout: `<out>/<key>/<BraTS21ID>/<sequence>.npy` (float16), `series.parquet`
(BraTS21ID, sequence, plane, n_slices, n_raw, spacing, path, fingerprint) and `bad_series.csv` (BraTS21ID,
sequence, reason, detail). The folder name is the parameter key; each entry is keyed by the identity of its files
(names, sizes, mtimes): a changed series is read again, an unchanged one never. A series that cannot be used is a
bad-series row with its reason; the run goes on.
"""
from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import cv2
import numpy as np
import pandas as pd

from lib.io.ids import child_path, id_problem
from lib.io.mr_series import SEQUENCES, BadSeriesError, drop_blank, normalise, read_mr_series, series_files
from lib.paths import atomic_save_npy, atomic_write, atomic_write_text
from lib.progress import progress_bar

PathLike = Union[str, Path]
ID_PATTERN = r"[0-9]{5}"  # BraTS21ID: a zero-padded 5-digit string
SERIES_COLUMNS = ["BraTS21ID", "sequence", "plane", "n_slices", "n_raw", "dz", "dy", "dx", "path", "fingerprint"]
BAD_COLUMNS = ["BraTS21ID", "sequence", "reason", "detail"]


def cache_key(size: int, normaliser: str) -> str:
    return f"series-s{int(size)}-{normaliser}"


def square_resize(img: np.ndarray, size: int) -> np.ndarray:
    """(H, W) float -> (size, size) float32: centred zero padding to a square, then area/linear resize."""
    h, w = img.shape
    side = max(h, w)
    out = np.zeros((side, side), np.float32)
    top, left = (side - h) // 2, (side - w) // 2
    out[top:top + h, left:left + w] = img
    interp = cv2.INTER_AREA if side > size else cv2.INTER_LINEAR
    return cv2.resize(out, (size, size), interpolation=interp)


def fingerprint(series_dir: Path) -> str:
    """Identity of a series folder: sha1 over its `Image-N.dcm` names, sizes and mtimes ('' when unreadable)."""
    try:
        files = series_files(series_dir)
    except BadSeriesError:
        return ""
    h = hashlib.sha1()
    for f in files:
        st = f.stat()
        h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns};".encode())
    return h.hexdigest()


def _one(task: Tuple[str, str, str, str, int, str]) -> dict:
    """Worker: one (patient, sequence) -> a series row, or a bad row (key 'reason')."""
    pid, seq, series_dir, out_dir, size, normaliser = task
    base = {"BraTS21ID": pid, "sequence": seq}
    try:
        series = read_mr_series(series_dir)
    except BadSeriesError as exc:
        return {**base, "reason": exc.reason, "detail": exc.detail}
    kept = drop_blank(series)
    if kept is None:
        return {**base, "reason": "blank", "detail": "no slice with more than 10 % non-zero pixels"}
    vol = normalise(kept.volume, normaliser)
    stack = np.stack([square_resize(s, size) for s in vol]).astype(np.float16)
    target = child_path(child_path(out_dir, pid), seq, ".npy")
    target.parent.mkdir(parents=True, exist_ok=True)
    atomic_save_npy(target, stack)
    dz, dy, dx = kept.spacing
    return {**base, "plane": kept.plane, "n_slices": len(stack), "n_raw": len(series.volume), "dz": dz, "dy": dy,
            "dx": dx, "path": str(target.relative_to(out_dir))}


def _tasks(split_dir: Path, sequences: Sequence[str]) -> Tuple[List[Tuple[str, str, Path]], List[dict]]:
    """(patient, sequence, folder) of every series to read, and bad rows for folders whose name is not an ID."""
    todo, bad = [], []
    for pdir in sorted(p for p in split_dir.iterdir() if p.is_dir()):
        problem = id_problem(pdir.name, ID_PATTERN, "BraTS21ID")
        if problem:
            bad.append({"BraTS21ID": pdir.name, "sequence": "", "reason": "bad_id", "detail": problem})
            continue
        todo += [(pdir.name, seq, pdir / seq) for seq in sequences]
    return todo, bad


def cache_series(split_dir: PathLike, cache_root: PathLike, size: int = 256, normaliser: str = "zscore_nonzero",
                 sequences: Sequence[str] = SEQUENCES, workers: Optional[int] = None,
                 progress: bool = True) -> Tuple[pd.DataFrame, pd.DataFrame]:
    """Cache every series of `split_dir` (`task2/train` or `task2/test`) -> (series table, bad-series table).

    Resumable and exact: a series whose folder fingerprint is unchanged is taken from the cache; everything else is
    read again. `workers` processes (None: all cores; 1: in this process).
    """
    split_dir = Path(split_dir)
    if not split_dir.is_dir():
        raise FileNotFoundError(f"{split_dir} does not exist (expected task2/train or task2/test of the Kaggle layout)")
    normalise(np.ones((1, 2, 2), np.float32), normaliser)  # unknown name -> KeyError listing the valid ones now
    out = Path(cache_root) / cache_key(size, normaliser)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"size": int(size), "normaliser": normaliser, "dtype": "float16", "version": 1}
    meta_path = out / "meta.json"
    if meta_path.exists() and json.loads(meta_path.read_text()) != meta:
        raise ValueError(f"{meta_path} does not match {meta}; delete the folder to rebuild")
    atomic_write_text(meta_path, json.dumps(meta, indent=1))
    table_path, bad_path = out / f"series_{split_dir.name}.parquet", out / f"bad_series_{split_dir.name}.csv"
    old = pd.read_parquet(table_path) if table_path.exists() else pd.DataFrame(columns=SERIES_COLUMNS)
    old_fp = {(r.BraTS21ID, r.sequence): (r.fingerprint, r) for r in old.itertuples(index=False)}
    todo, bad = _tasks(split_dir, sequences)
    rows, run = [], []
    for pid, seq, folder in todo:
        fp = fingerprint(folder)
        hit = old_fp.get((pid, seq))
        if fp and hit is not None and hit[0] == fp and (out / hit[1].path).exists():
            rows.append(hit[1]._asdict())
        else:
            run.append(((pid, seq, str(folder), str(out), int(size), normaliser), fp))
    workers = max(1, min(workers or os.cpu_count() or 1, len(run) or 1))
    pool = ProcessPoolExecutor(workers) if workers > 1 else None
    try:
        with progress_bar(total=len(run), desc=f"series {split_dir.name}", unit="series", disable=not progress) as bar:
            results = (pool.map(_one, [t for t, _ in run], chunksize=2) if pool else map(_one, [t for t, _ in run]))
            for (_, fp), res in zip(run, results):
                if "reason" in res:
                    bad.append(res)
                else:
                    rows.append({**res, "fingerprint": fp})
                bar.update()
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
    table = pd.DataFrame(rows, columns=SERIES_COLUMNS).sort_values(["BraTS21ID", "sequence"]).reset_index(drop=True)
    table["BraTS21ID"] = table["BraTS21ID"].astype(str)
    bad_df = pd.DataFrame(bad, columns=BAD_COLUMNS).sort_values(["BraTS21ID", "sequence"]).reset_index(drop=True)
    atomic_write(table_path, lambda p: table.to_parquet(p, index=False))
    atomic_write_text(bad_path, bad_df.to_csv(index=False))
    if progress:
        print(f"series cache {out.name}/{split_dir.name}: {len(table)} series ({len(run)} read now), "
              f"{len(bad_df)} bad")
    return table, bad_df


def load_series(cache_dir: PathLike, row: Dict[str, object]) -> np.ndarray:
    """The cached float16 (Z, S, S) volume of a series-table row."""
    return np.load(Path(cache_dir) / str(row["path"]))
