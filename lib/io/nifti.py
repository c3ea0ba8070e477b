"""NIfTI volumes (nibabel) and the BraTS 2021 task-1 case folder.

A volume is returned in its on-disk voxel order (`canonical=False`, what BraTS code and the seed assume: BraTS files
are LPS, affine `diag(-1, -1, 1)` with y offset 239) or reoriented to the closest RAS+ axes (`canonical=True`).
Arrays index voxels as (i, j, k) = (X, Y, Z) along the affine's columns; spacing is in mm, affines map voxel
indices to nibabel's RAS+ world millimetres.

BraTS task 1: `BraTS2021_<id>/BraTS2021_<id>_{flair,t1,t1ce,t2,seg}.nii.gz`, all on one grid. Labels: 1 = NCR
(necrotic core), 2 = ED (oedema), 4 = ET (enhancing tumour); 3 is unused. Regions: WT = {1, 2, 4}, TC = {1, 4},
ET = {4}.
"""
from __future__ import annotations

import gzip
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional, Tuple, Union

import nibabel as nib
import numpy as np

from lib.paths import atomic_write

PathLike = Union[str, Path]

MODALITIES: Tuple[str, ...] = ("flair", "t1", "t1ce", "t2")
LABELS: Dict[int, str] = {0: "background", 1: "NCR", 2: "ED", 4: "ET"}
REGIONS: Dict[str, Tuple[int, ...]] = {"WT": (1, 2, 4), "TC": (1, 4), "ET": (4,)}
CASE_RE = re.compile(r"^BraTS2021_(\d{5})$")
AFFINE_ATOL = 1e-4  # mm: modalities of one case must share the affine to this tolerance


class BratsCaseError(ValueError):
    """A BraTS case folder that is not usable: missing file, or modalities on different grids."""


@dataclass(frozen=True)
class NiftiVolume:
    """One NIfTI volume: `data` (X, Y, Z) in the file's dtype (int16 images / uint8 seg for BraTS), `affine` (4, 4)
    float64 voxel -> RAS+ mm, `spacing` (3,) mm per axis, `axcodes` e.g. ('L', 'P', 'S')."""

    data: np.ndarray
    affine: np.ndarray
    spacing: Tuple[float, float, float]
    axcodes: Tuple[str, str, str]
    path: Path


def read_nifti(path: PathLike, canonical: bool = False) -> NiftiVolume:
    """Read a .nii / .nii.gz file; `canonical=True` reorients to the closest RAS+ voxel axes (data flipped and
    permuted accordingly, affine updated). Scaled files (scl_slope set) come back as float, others keep their dtype."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"NIfTI file not found: {path}")
    try:
        img = nib.load(str(path))
    except (nib.filebasedimages.ImageFileError, OSError, EOFError, ValueError) as exc:
        raise ValueError(f"{path}: not a readable NIfTI file ({exc})") from exc
    if len(img.shape) != 3:
        raise ValueError(f"{path}: expected a 3-D volume, got shape {img.shape}")
    if canonical:
        img = nib.as_closest_canonical(img)
    zooms = tuple(float(z) for z in img.header.get_zooms()[:3])
    return NiftiVolume(data=np.asanyarray(img.dataobj), affine=np.asarray(img.affine, dtype=np.float64),
                       spacing=zooms, axcodes=tuple(nib.aff2axcodes(img.affine)), path=path)  # type: ignore[arg-type]


def nifti_bytes(data: np.ndarray, affine: np.ndarray) -> bytes:
    """A 3-D array (X, Y, Z) + affine (4, 4) as .nii.gz bytes: sform and qform set (code 'scanner'), units mm,
    no intensity scaling, the array's dtype on disk; gzip with mtime 0 so equal inputs give equal bytes."""
    img = nib.Nifti1Image(np.asarray(data), np.asarray(affine, dtype=np.float64))
    img.header.set_xyzt_units("mm")
    img.set_sform(affine, code="scanner")
    img.set_qform(affine, code="scanner")
    return gzip.compress(img.to_bytes(), compresslevel=6, mtime=0)


def write_nifti(path: PathLike, data: np.ndarray, affine: np.ndarray) -> None:
    """Write `nifti_bytes(data, affine)` to `path` (.nii.gz) atomically; the folder must exist."""
    payload = nifti_bytes(data, affine)
    atomic_write(path, lambda tmp: tmp.write_bytes(payload))


# ------------------------------------------------------------------------------------------------- BraTS task 1
@dataclass(frozen=True)
class BratsCase:
    """One task-1 case: `images[modality]` (X, Y, Z) in file dtype (int16), `seg` (X, Y, Z) uint8 or None,
    the shared `affine` (4, 4), `spacing` (3,) mm and `axcodes`."""

    case_id: str
    images: Dict[str, np.ndarray]
    seg: Optional[np.ndarray]
    affine: np.ndarray
    spacing: Tuple[float, float, float]
    axcodes: Tuple[str, str, str]

    def stack(self) -> np.ndarray:
        """(4, X, Y, Z) float32 in MODALITIES order (raw intensities, not normalised)."""
        return np.stack([self.images[m].astype(np.float32) for m in MODALITIES])


def case_id(case_dir: PathLike) -> str:
    """The 5-digit ID of a `BraTS2021_<id>` folder (the task-2 `BraTS21ID` of the same patient)."""
    m = CASE_RE.match(Path(case_dir).name)
    if not m:
        raise BratsCaseError(f"{case_dir}: folder name must be BraTS2021_<5 digits>")
    return m.group(1)


def case_files(case_dir: PathLike, with_seg: bool = True) -> Dict[str, Path]:
    """{modality or 'seg': path} of a case folder; BratsCaseError naming the first missing file."""
    case_dir = Path(case_dir)
    cid = case_id(case_dir)
    names = MODALITIES + (("seg",) if with_seg else ())
    files = {n: case_dir / f"BraTS2021_{cid}_{n}.nii.gz" for n in names}
    for path in files.values():
        if not path.is_file():
            raise BratsCaseError(f"{path}: missing (a BraTS case needs {', '.join(names)})")
    return files


def read_brats_case(case_dir: PathLike, with_seg: bool = True, canonical: bool = False) -> BratsCase:
    """Read a task-1 case folder; BratsCaseError naming the file whose shape or affine differs from the FLAIR's."""
    files = case_files(case_dir, with_seg)
    vols = {name: read_nifti(path, canonical=canonical) for name, path in files.items()}
    ref = vols[MODALITIES[0]]
    for name, vol in vols.items():
        if vol.data.shape != ref.data.shape:
            raise BratsCaseError(f"{vol.path}: shape {vol.data.shape} differs from {ref.path.name} {ref.data.shape}")
        if not np.allclose(vol.affine, ref.affine, atol=AFFINE_ATOL):
            raise BratsCaseError(f"{vol.path}: affine differs from {ref.path.name}'s\n{vol.affine}\nvs\n{ref.affine}")
    seg = vols["seg"].data if with_seg else None
    if seg is not None:
        check_labels(seg, where=str(files["seg"]))
        seg = seg.astype(np.uint8, copy=False)
    return BratsCase(case_id=case_id(case_dir), images={m: vols[m].data for m in MODALITIES}, seg=seg,
                     affine=ref.affine, spacing=ref.spacing, axcodes=ref.axcodes)


# ----------------------------------------------------------------------------------------------------- labels
def check_labels(seg: np.ndarray, where: str = "seg") -> None:
    """ValueError naming `where` if `seg` holds a value outside {0, 1, 2, 4} (or non-integer values)."""
    values = np.unique(seg)
    bad = [v for v in values.tolist() if v not in LABELS]
    if bad:
        raise ValueError(f"{where}: labels {bad} are not BraTS labels {sorted(LABELS)} (label 3 is unused)")


def label_counts(seg: np.ndarray) -> Dict[int, int]:
    """Voxels per BraTS label {0, 1, 2, 4} (absent labels count 0)."""
    check_labels(seg)
    values, counts = np.unique(seg, return_counts=True)
    found = dict(zip(values.tolist(), counts.tolist()))
    return {label: int(found.get(label, 0)) for label in LABELS}


def region_masks(seg: np.ndarray) -> Dict[str, np.ndarray]:
    """{'WT', 'TC', 'ET'}: bool masks of `seg`'s shape (WT = {1, 2, 4}, TC = {1, 4}, ET = {4})."""
    check_labels(seg)
    return {name: np.isin(seg, labels) for name, labels in REGIONS.items()}


def region_channels(seg: np.ndarray, regions: Tuple[str, ...] = ("WT", "TC", "ET")) -> np.ndarray:
    """(len(regions), *seg.shape) uint8 0/1 channels, e.g. the seed's 2-channel target with regions=('WT', 'ET')."""
    unknown = [r for r in regions if r not in REGIONS]
    if unknown:
        raise KeyError(f"unknown BraTS regions {unknown}; valid: {sorted(REGIONS)}")
    masks = region_masks(seg)
    return np.stack([masks[r] for r in regions]).astype(np.uint8)
