"""MR DICOM series of the RSNA-MICCAI (BraTS 2021 task 2) layout, and MR intensity normalisation.

A series is a folder of `Image-<N>.dcm` files (`train/<BraTS21ID>/{FLAIR,T1w,T1wCE,T2w}/`). `Image-N` sorts
numerically (`Image-2` before `Image-10`), but numeric order is not spatial order: some series are numbered
against the slice direction or interleaved. `read_mr_series` orders slices by their position along the slice normal
(ImagePositionPatient . (row x column direction of ImageOrientationPatient)) and names the acquisition plane from
the normal's largest component (x -> sagittal, y -> coronal, z -> axial; DICOM patient axes LPS).

A series that cannot be used raises `BadSeriesError` with a short `reason` ('missing', 'empty', 'bad_name',
'unreadable', 'no_geometry', 'mixed_size', 'mixed_orientation', 'blank') for a caller's bad-patient table; the
organisers' known bad cases 00109, 00123 and 00709 are of this kind.

Normalisers (registry `NORMALISERS`): raw MR values (uint16 stored values x RescaleSlope + RescaleIntercept,
arbitrary scanner units) in, float32 out, zero background kept at 0 (the data are skull-stripped).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import pandas as pd
import pydicom
from pydicom.errors import InvalidDicomError

from lib.progress import progress_bar
from lib.registry import Registry

PathLike = Union[str, Path]

SEQUENCES: Tuple[str, ...] = ("FLAIR", "T1w", "T1wCE", "T2w")
PLANES: Tuple[str, ...] = ("sagittal", "coronal", "axial")  # indexed by the normal's dominant LPS axis
FILE_RE = re.compile(r"^Image-(\d+)\.dcm$")
ORIENTATION_ATOL = 1e-3  # direction cosines of one series must agree to this
BLANK_FRACTION = 0.10  # the seed's check_empty: a slice counts as content when > 10 % of its pixels are non-zero


class BadSeriesError(ValueError):
    """A series folder that cannot be read as one volume; `reason` is a short code, `path` the folder or file."""

    def __init__(self, path: PathLike, reason: str, detail: str) -> None:
        super().__init__(f"{path}: {reason}: {detail}")
        self.path, self.reason, self.detail = Path(path), reason, detail


@dataclass(frozen=True)
class MRSeries:
    """One series ordered along its normal: `volume` (Z, H, W) float32 raw MR units (H = Rows, W = Columns),
    `spacing` (dz, dy, dx) mm (slice step, row spacing, column spacing), `normal` (3,) unit LPS vector,
    `positions` (Z,) mm along the normal (ascending), `files` in volume order, `plane` 'axial'|'coronal'|'sagittal'."""

    volume: np.ndarray
    plane: str
    spacing: Tuple[float, float, float]
    normal: np.ndarray
    positions: np.ndarray
    files: List[Path]


def image_number(path: PathLike) -> int:
    """N of `Image-N.dcm`; ValueError for any other name."""
    m = FILE_RE.match(Path(path).name)
    if not m:
        raise ValueError(f"{path}: not an Image-<N>.dcm file name")
    return int(m.group(1))


def series_files(series_dir: PathLike) -> List[Path]:
    """The `.dcm` files of a series folder in numeric `Image-N` order; BadSeriesError if missing/empty/misnamed."""
    series_dir = Path(series_dir)
    if not series_dir.is_dir():
        raise BadSeriesError(series_dir, "missing", "no such series folder")
    files = [p for p in series_dir.iterdir() if p.suffix.lower() == ".dcm"]
    if not files:
        raise BadSeriesError(series_dir, "empty", "no .dcm files")
    bad = sorted(p.name for p in files if not FILE_RE.match(p.name))
    if bad:
        raise BadSeriesError(series_dir, "bad_name", f"files not named Image-<N>.dcm: {bad[:5]}")
    return sorted(files, key=image_number)


def plane_from_normal(normal: Sequence[float]) -> str:
    """'sagittal' | 'coronal' | 'axial' from the dominant LPS component of a slice normal."""
    n = np.abs(np.asarray(normal, dtype=np.float64))
    if n.shape != (3,) or not np.isfinite(n).all() or n.max() == 0:
        raise ValueError(f"slice normal must be a finite non-zero 3-vector, got {normal!r}")
    return PLANES[int(np.argmax(n))]


def slice_normal(orientation: Sequence[float]) -> np.ndarray:
    """Unit normal (3,) = row direction x column direction of an ImageOrientationPatient 6-vector."""
    iop = np.asarray([float(v) for v in orientation], dtype=np.float64)
    if iop.shape != (6,):
        raise ValueError(f"ImageOrientationPatient needs 6 values, got {len(iop)}")
    n = np.cross(iop[:3], iop[3:])
    norm = np.linalg.norm(n)
    if norm < 1e-6:
        raise ValueError(f"ImageOrientationPatient {orientation!r} has parallel row and column directions")
    return n / norm


def _read(path: Path) -> Tuple[pydicom.Dataset, np.ndarray]:
    """(dataset, float32 pixels (Rows, Columns) in raw MR units) or BadSeriesError 'unreadable'."""
    try:
        ds = pydicom.dcmread(path)
        px = ds.pixel_array
    except (InvalidDicomError, OSError, EOFError, ValueError, AttributeError, KeyError, TypeError) as exc:
        raise BadSeriesError(path, "unreadable", f"{type(exc).__name__}: {exc}") from exc
    if px.ndim != 2:
        raise BadSeriesError(path, "unreadable", f"expected one grey-level frame, got pixel shape {px.shape}")
    slope, intercept = float(ds.get("RescaleSlope", 1) or 1), float(ds.get("RescaleIntercept", 0) or 0)
    return ds, (px.astype(np.float32) * np.float32(slope) + np.float32(intercept))


def read_mr_series(series_dir: PathLike, allow_blank: bool = False) -> MRSeries:
    """Read a series folder into an MRSeries ordered along the slice normal (ties: by Image-N).

    Raises BadSeriesError for a missing or empty folder, unreadable files, missing geometry, mixed in-plane sizes
    or orientations, and (unless `allow_blank`) a series whose every pixel is 0.
    """
    files = series_files(series_dir)
    dss, pixels = zip(*(_read(p) for p in files))
    shapes = sorted({px.shape for px in pixels})
    if len(shapes) > 1:
        raise BadSeriesError(series_dir, "mixed_size", f"in-plane sizes {shapes}")
    try:
        iops = np.array([[float(v) for v in ds.ImageOrientationPatient] for ds in dss])
        ipps = np.array([[float(v) for v in ds.ImagePositionPatient] for ds in dss])
        normal = slice_normal(iops[0])
        row_spacing, col_spacing = (float(v) for v in dss[0].PixelSpacing)
    except (AttributeError, TypeError, ValueError) as exc:
        raise BadSeriesError(series_dir, "no_geometry", f"{type(exc).__name__}: {exc}") from exc
    if not np.allclose(iops, iops[0], atol=ORIENTATION_ATOL):
        raise BadSeriesError(series_dir, "mixed_orientation", "ImageOrientationPatient differs between files")
    dist = ipps @ normal
    order = np.lexsort((np.arange(len(files)), dist))  # by position, then by Image-N
    volume = np.stack([pixels[i] for i in order])
    if not allow_blank and not volume.any():
        raise BadSeriesError(series_dir, "blank", f"all {len(files)} images are 0 everywhere")
    steps = np.diff(dist[order])
    dz = float(np.median(steps)) if len(steps) else float(dss[0].get("SliceThickness", 1.0) or 1.0)
    return MRSeries(volume=volume, plane=plane_from_normal(normal), spacing=(dz, row_spacing, col_spacing),
                    normal=normal, positions=dist[order], files=[files[i] for i in order])


def content_slices(volume: np.ndarray, min_fraction: float = BLANK_FRACTION) -> np.ndarray:
    """(Z,) bool: slices of a (Z, H, W) volume whose non-zero pixel share exceeds `min_fraction` (the seed's filter)."""
    return (volume != 0).reshape(len(volume), -1).mean(axis=1) > min_fraction


def read_patient(patient_dir: PathLike, sequences: Sequence[str] = SEQUENCES,
                 allow_blank: bool = False) -> Tuple[Dict[str, MRSeries], Dict[str, BadSeriesError]]:
    """({sequence: MRSeries} of the good series, {sequence: BadSeriesError} of the bad ones) of one patient folder."""
    good: Dict[str, MRSeries] = {}
    bad: Dict[str, BadSeriesError] = {}
    for seq in sequences:
        try:
            good[seq] = read_mr_series(Path(patient_dir) / seq, allow_blank=allow_blank)
        except BadSeriesError as exc:
            bad[seq] = exc
    return good, bad


def bad_series_table(split_dir: PathLike, sequences: Sequence[str] = SEQUENCES, progress: bool = True) -> pd.DataFrame:
    """One row per bad series under `split_dir` (`train/` or `test/`): BraTS21ID (str), sequence, reason, detail.
    Reads every series (pixels too, to find blank ones)."""
    rows = []
    patients = sorted(p for p in Path(split_dir).iterdir() if p.is_dir())
    for pdir in progress_bar(patients, desc="series check", unit="patient", disable=not progress):
        _, bad = read_patient(pdir, sequences)
        rows += [dict(BraTS21ID=pdir.name, sequence=s, reason=e.reason, detail=e.detail) for s, e in bad.items()]
    return pd.DataFrame(rows, columns=["BraTS21ID", "sequence", "reason", "detail"])


# ------------------------------------------------------------------------------------------------ normalisation
Normaliser = Callable[..., np.ndarray]
NORMALISERS: Registry[Normaliser] = Registry("MR normaliser")


def _foreground(volume: np.ndarray) -> np.ndarray:
    return np.asarray(volume, dtype=np.float32)[np.asarray(volume) != 0]


@NORMALISERS.register("zscore_nonzero")
def zscore_nonzero(volume: np.ndarray, eps: float = 1e-6) -> np.ndarray:
    """(mean, std over non-zero voxels) z-score: raw MR units in, float32 out (foreground ~ N(0, 1)), zeros stay 0."""
    vol = np.asarray(volume, dtype=np.float32)
    fg = _foreground(vol)
    if fg.size == 0:
        return np.zeros_like(vol)
    out = (vol - fg.mean()) / max(float(fg.std()), eps)
    return np.where(vol != 0, out, 0).astype(np.float32)


@NORMALISERS.register("percentile")
def percentile(volume: np.ndarray, lower: float = 1.0, upper: float = 99.0) -> np.ndarray:
    """Clip to the [lower, upper] percentiles of the non-zero voxels and scale to [0, 1]: raw MR units in,
    float32 in [0, 1] out, zeros stay 0."""
    if not 0 <= lower < upper <= 100:
        raise ValueError(f"need 0 <= lower < upper <= 100, got lower={lower}, upper={upper}")
    vol = np.asarray(volume, dtype=np.float32)
    fg = _foreground(vol)
    if fg.size == 0:
        return np.zeros_like(vol)
    lo, hi = np.percentile(fg, [lower, upper])
    out = (np.clip(vol, lo, hi) - lo) / max(float(hi - lo), 1e-6)
    return np.where(vol != 0, out, 0).astype(np.float32)


def normalise(volume: np.ndarray, name: str = "zscore_nonzero", **kwargs: float) -> np.ndarray:
    """Apply the registered normaliser `name` (KeyError listing the valid names otherwise)."""
    return NORMALISERS.get(name)(volume, **kwargs)


def drop_blank(series: MRSeries, min_fraction: float = BLANK_FRACTION) -> Optional[MRSeries]:
    """The series restricted to `content_slices` (None if none is left); files and positions follow."""
    keep = content_slices(series.volume, min_fraction)
    if not keep.any():
        return None
    idx = np.flatnonzero(keep)
    return MRSeries(volume=series.volume[idx], plane=series.plane, spacing=series.spacing, normal=series.normal,
                    positions=series.positions[idx], files=[series.files[i] for i in idx])
