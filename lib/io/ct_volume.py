"""A CT DICOM study folder (`<slice_number>.dcm`, the RSNA 2022 cervical-spine layout) -> a HU volume, and the
study's NIfTI segmentation lined up with it.

Slices are ordered along the slice normal (cross product of the ImageOrientationPatient row and column
directions) by their ImagePositionPatient, never by `slice_number`: some studies run head-to-feet, others
feet-to-head. Index 0 of the volume is the slice with the *largest* position along the normal; for an axial
study (normal +z, superior in DICOM's LPS frame) that is the head end, so C1 comes first.

Pixels become HU as `raw * RescaleSlope + RescaleIntercept` (both conventions seen in the competition: intercept 0
with signed storage and -2048 padding, and intercept -1024 with unsigned storage), then values below `air_floor`
(-1024 HU by default) are raised to it, so padding reads the same under both. Compressed transfer syntaxes
(JPEG Lossless, JPEG-LS, JPEG 2000, RLE) decode through pydicom's plugins (pylibjpeg). A missing `Modality` tag is
tolerated.

A bad study raises `StudyError` with a short machine-readable `reason` (see `REASONS`) so a caller can write a
bad-study table (`StudyError.row()`) and go on; a few unreadable slices are instead dropped and listed in
`CTVolume.dropped`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import pydicom

PathLike = Union[str, Path]

#: StudyError reasons.
REASONS = {
    "no_slices": "the folder holds no <slice_number>.dcm file",
    "bad_file_name": "a file name is not <integer>.dcm",
    "duplicate_slice_number": "two files parse to the same slice_number (e.g. 7.dcm and 07.dcm)",
    "no_readable_slice": "no slice could be read and decoded",
    "too_many_dropped": "more unreadable slices than max_dropped",
    "missing_slice": "slice_numbers or slice positions have a gap (a file is missing)",
    "duplicate_position": "two slices lie at the same position along the normal",
    "mixed_orientation": "slices disagree on ImageOrientationPatient",
    "mixed_shape": "slices disagree on Rows x Columns",
    "mixed_spacing": "slices disagree on PixelSpacing",
    "mixed_thickness": "slices disagree on SliceThickness",
}


class StudyError(ValueError):
    """A study that cannot become one volume; `reason` is a key of REASONS, `detail` says which files and why."""

    def __init__(self, study: PathLike, reason: str, detail: str) -> None:
        if reason not in REASONS:
            raise KeyError(f"unknown StudyError reason {reason!r}; valid: {sorted(REASONS)}")
        self.study, self.reason, self.detail = str(study), reason, detail
        super().__init__(f"{study}: {reason}: {detail}")

    def row(self) -> Dict[str, str]:
        """One row of a bad-study table: study folder, reason, detail."""
        return {"study": self.study, "reason": self.reason, "detail": self.detail}


class SegmentationShapeError(ValueError):
    """A NIfTI mask whose shape does not match the study it should line up with."""


@dataclass(frozen=True)
class DroppedFile:
    """A slice left out of the volume: its path, slice_number and why it could not be used."""

    path: str
    slice_number: int
    reason: str


@dataclass
class CTVolume:
    """One study as a volume.

    hu: (Z, Y, X) float32 (or int16) HU, index 0 = largest position along the slice normal (head end for axial).
    spacing: (z, y, x) in mm: median distance between slice positions, PixelSpacing row and column spacing.
    slice_numbers: (Z,) int64, the file's slice_number of each volume slice, in volume order.
    positions: (Z,) float64 mm, each slice's position along the normal (descending).
    normal: (3,) unit slice normal in the patient (LPS) frame.
    dropped: unreadable slices left out (their positions are missing from the volume).
    """

    study: str
    hu: np.ndarray
    spacing: Tuple[float, float, float]
    slice_numbers: np.ndarray
    positions: np.ndarray
    normal: np.ndarray
    dropped: List[DroppedFile] = field(default_factory=list)

    @property
    def all_slice_numbers(self) -> np.ndarray:
        """Sorted slice_numbers of every file of the study, read or dropped (the rows of its NIfTI mask)."""
        return np.array(sorted([*self.slice_numbers.tolist(), *(d.slice_number for d in self.dropped)]), np.int64)


@dataclass
class _Slice:
    path: Path
    number: int
    position: float
    orientation: Tuple[float, ...]
    shape: Tuple[int, int]
    spacing: Tuple[float, float]
    thickness: Optional[float]
    hu: np.ndarray


def slice_files(folder: PathLike) -> Dict[int, Path]:
    """`<slice_number>.dcm` files of a study folder -> {slice_number: path}; StudyError on bad or duplicate names."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"study folder {folder} does not exist")
    out: Dict[int, Path] = {}
    for path in sorted(folder.glob("*.dcm")):
        try:
            number = int(path.stem)
        except ValueError:
            raise StudyError(folder, "bad_file_name", f"{path.name} is not <integer>.dcm") from None
        if number in out:
            raise StudyError(folder, "duplicate_slice_number", f"{out[number].name} and {path.name} are both {number}")
        out[number] = path
    if not out:
        raise StudyError(folder, "no_slices", f"no *.dcm file in {folder}")
    return out


def _numbers(value: object, n: int, what: str, path: Path) -> Tuple[float, ...]:
    if value is None or len(value) != n:  # type: ignore[arg-type]
        raise ValueError(f"{path}: {what} missing or not {n} numbers")
    return tuple(float(v) for v in value)  # type: ignore[union-attr]


def slice_normal(orientation: Sequence[float]) -> np.ndarray:
    """Unit normal (3,) of a slice from its 6 ImageOrientationPatient direction cosines (row x column)."""
    row, col = np.asarray(orientation[:3], float), np.asarray(orientation[3:6], float)
    normal = np.cross(row, col)
    return normal / np.linalg.norm(normal)


def read_slice_hu(path: PathLike, air_floor: Optional[float] = -1024.0) -> Tuple[pydicom.Dataset, np.ndarray]:
    """One DICOM file -> (dataset, HU (rows, cols) float32); values below `air_floor` raised to it (None: keep).

    Raises whatever pydicom raises on unreadable or undecodable files (the volume reader catches it).
    """
    ds = pydicom.dcmread(path)
    raw = ds.pixel_array
    if raw.ndim != 2:
        raise ValueError(f"{path}: pixel array has shape {raw.shape}; expected one 2-D greyscale slice")
    slope = float(getattr(ds, "RescaleSlope", 1) or 1)
    intercept = float(getattr(ds, "RescaleIntercept", 0) or 0)
    hu = raw.astype(np.float32) * np.float32(slope) + np.float32(intercept)
    if air_floor is not None:
        np.maximum(hu, np.float32(air_floor), out=hu)
    return ds, hu


def _read_slice(path: Path, number: int, air_floor: Optional[float]) -> _Slice:
    ds, hu = read_slice_hu(path, air_floor)
    orientation = _numbers(getattr(ds, "ImageOrientationPatient", None), 6, "ImageOrientationPatient", path)
    ipp = np.asarray(_numbers(getattr(ds, "ImagePositionPatient", None), 3, "ImagePositionPatient", path))
    spacing = _numbers(getattr(ds, "PixelSpacing", None), 2, "PixelSpacing", path)
    thickness = getattr(ds, "SliceThickness", None)
    return _Slice(path, number, float(ipp @ slice_normal(orientation)), tuple(round(v, 4) for v in orientation),
                  hu.shape, (round(spacing[0], 6), round(spacing[1], 6)),
                  None if thickness in (None, "") else round(float(thickness), 4), hu)


def _check_same(study: Path, slices: List[_Slice], attr: str, reason: str) -> None:
    values = {getattr(s, attr) for s in slices} - {None}
    if len(values) > 1:
        examples = {v: next(s.path.name for s in slices if getattr(s, attr) == v) for v in sorted(values, key=str)}
        raise StudyError(study, reason, f"{attr} takes {len(values)} values: " +
                         ", ".join(f"{v} (e.g. {name})" for v, name in examples.items()))


def _check_gaps(study: Path, numbers: Sequence[int], positions: np.ndarray, n_dropped: int) -> float:
    """StudyError when slice_numbers skip or positions (descending) have more holes than dropped files; -> dz mm."""
    missing = sorted(set(range(min(numbers), max(numbers) + 1)) - set(numbers))
    if missing:
        raise StudyError(study, "missing_slice", f"slice_numbers {missing[:10]} missing between {min(numbers)} and "
                                                 f"{max(numbers)}")
    steps = -np.diff(positions)
    if len(steps) == 0:
        return 1.0
    if np.any(steps < 1e-3):
        i = int(np.argmin(steps))
        raise StudyError(study, "duplicate_position", f"two slices at {positions[i]:.3f} mm along the normal")
    dz = round(float(np.median(steps)), 6)
    holes = int(np.sum(np.rint(steps / dz) - 1))
    if holes > n_dropped:
        i = int(np.argmax(steps))
        raise StudyError(study, "missing_slice", f"{holes} slice position(s) missing (largest step {steps[i]:.3f} mm "
                                                 f"vs median {dz:.3f} mm) with {n_dropped} file(s) dropped")
    return dz


def read_ct_volume(folder: PathLike, dtype: type = np.float32, air_floor: Optional[float] = -1024.0,
                   max_dropped: int = 1) -> CTVolume:
    """Read a study folder of `<slice_number>.dcm` into a CTVolume (see its docstring for shapes and units).

    dtype: np.float32 or np.int16 (HU rounded). air_floor: HU floor (None keeps the raw padding, e.g. -2048).
    max_dropped: unreadable slices tolerated (listed in `dropped`); more raise StudyError('too_many_dropped').
    """
    folder = Path(folder)
    if np.dtype(dtype) not in (np.dtype(np.float32), np.dtype(np.int16)):
        raise ValueError(f"dtype must be float32 or int16, got {np.dtype(dtype)}")
    files = slice_files(folder)
    slices: List[_Slice] = []
    dropped: List[DroppedFile] = []
    for number, path in files.items():
        try:
            slices.append(_read_slice(path, number, air_floor))
        except Exception as exc:  # noqa: BLE001 - any unreadable/undecodable file is dropped and reported
            dropped.append(DroppedFile(str(path), number, f"{type(exc).__name__}: {exc}"[:300]))
    if not slices:
        raise StudyError(folder, "no_readable_slice", f"all {len(files)} file(s) failed; first: {dropped[0].reason}")
    if len(dropped) > max_dropped:
        raise StudyError(folder, "too_many_dropped", f"{len(dropped)} unreadable slices (max {max_dropped}): " +
                         ", ".join(Path(d.path).name for d in dropped[:5]))
    for attr, reason in (("orientation", "mixed_orientation"), ("shape", "mixed_shape"),
                         ("spacing", "mixed_spacing"), ("thickness", "mixed_thickness")):
        _check_same(folder, slices, attr, reason)
    slices.sort(key=lambda s: -s.position)
    positions = np.array([s.position for s in slices])
    dz = _check_gaps(folder, list(files), positions, len(dropped))
    stack = np.stack([s.hu for s in slices])
    hu = stack if np.dtype(dtype) == np.float32 else np.clip(np.rint(stack), -32768, 32767).astype(np.int16)
    dy, dx = slices[0].spacing
    return CTVolume(str(folder), hu, (dz, float(dy), float(dx)), np.array([s.number for s in slices], np.int64),
                    positions, slice_normal(slices[0].orientation), dropped)


def nifti_to_slice_order(array: np.ndarray) -> np.ndarray:
    """An RSNA 2022 mask as stored (X, Y, N), sagittal-style -> (N, Y, X) rows in ascending slice_number order.

    `out[z, y, x] = nii[x, Y-1-y, N-1-z]` (discussion 340612's `arr[:, ::-1, ::-1].transpose(2, 1, 0)`).
    """
    if array.ndim != 3:
        raise SegmentationShapeError(f"segmentation array has {array.ndim} dimensions; expected 3 (X, Y, slices)")
    return array[:, ::-1, ::-1].transpose(2, 1, 0)


def segmentation_to_volume(nii_path: PathLike, slice_numbers: Optional[Sequence[int]] = None,
                           all_slice_numbers: Optional[Sequence[int]] = None,
                           in_plane: Optional[Tuple[int, int]] = None) -> np.ndarray:
    """A study's NIfTI mask -> (Z, Y, X) uint8 labels (1-7 = C1-C7, 8+ = T1..., 0 other) lined up with its volume.

    slice_numbers: the volume's slice_numbers in volume order (`CTVolume.slice_numbers`); None keeps the mask in
    ascending slice_number order. all_slice_numbers: every slice_number of the study incl. dropped files
    (`CTVolume.all_slice_numbers`; default: sorted `slice_numbers`): mask row k belongs to the k-th of them.
    in_plane: (Y, X) the mask must have. A mismatch raises SegmentationShapeError naming the file.
    """
    import nibabel as nib  # only segmentation users need nibabel

    nii_path = Path(nii_path)
    data = np.asarray(nib.load(str(nii_path)).dataobj)
    try:
        labels = nifti_to_slice_order(data)
    except SegmentationShapeError as exc:
        raise SegmentationShapeError(f"{nii_path}: {exc}") from None
    if np.issubdtype(labels.dtype, np.floating):
        labels = np.rint(labels)
    labels = np.ascontiguousarray(labels).astype(np.uint8)
    if in_plane is not None and labels.shape[1:] != tuple(in_plane):
        raise SegmentationShapeError(f"{nii_path}: mask slices are {labels.shape[1:]} (Y, X); the study's are "
                                     f"{tuple(in_plane)}")
    if slice_numbers is None:
        return labels
    every = sorted(all_slice_numbers) if all_slice_numbers is not None else sorted(slice_numbers)
    if labels.shape[0] != len(every):
        raise SegmentationShapeError(f"{nii_path}: mask has {labels.shape[0]} slices (stored shape {data.shape}); "
                                     f"the study has {len(every)} slice files")
    rank = {int(n): k for k, n in enumerate(every)}
    try:
        rows = [rank[int(n)] for n in slice_numbers]
    except KeyError as exc:
        raise SegmentationShapeError(f"{nii_path}: slice_number {exc.args[0]} is not among all_slice_numbers") from None
    return labels[rows]


def segmentation_for(volume: CTVolume, nii_path: PathLike) -> np.ndarray:
    """`segmentation_to_volume` for a CTVolume: (Z, Y, X) uint8 labels aligned voxel for voxel with `volume.hu`."""
    return segmentation_to_volume(nii_path, volume.slice_numbers, volume.all_slice_numbers, volume.hu.shape[1:])
