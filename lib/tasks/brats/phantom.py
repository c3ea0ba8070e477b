"""Synthetic BraTS 2021 data: task-1 NIfTI cases and task-2 (RSNA-MICCAI radiogenomic) MR DICOM series.

`python -m lib.tasks.brats.phantom --out DIR [--patients N] [--seed S] [--size S] [--slices MIN MAX]` writes

- `DIR/task1/BraTS2021_<id>/BraTS2021_<id>_{flair,t1,t1ce,t2,seg}.nii.gz`: images int16, seg uint8 {0, 1, 2, 4}, the
  real files' affine style (`diag(-s, -s, s)`, y offset (size - 1) * s, axcodes LPS) on a size x size x
  round(155 * size / 240) grid of s = 240 / size mm voxels (the real 240 x 240 x 155 at 1 mm with `--size 240`);
- `DIR/task2/{train,test}/<BraTS21ID>/{FLAIR,T1w,T1wCE,T2w}/Image-<N>.dcm` (MR, MONOCHROME2, uint16),
  `DIR/task2/train_labels.csv` and `DIR/task2/sample_submission.csv` (`BraTS21ID,MGMT_value`, 5-digit string IDs,
  0.5 in the sample), exactly the Kaggle layout;
- `DIR/_truth/`: `test_labels.csv` (the hidden test truth), `patients.csv` (one row per patient: split, trees,
  MGMT, the MGMT feature, tumour sizes, bad sequences), `series.csv` (plane, matrix, slices, numbering per
  series), `phantom.json` (parameters and counts; written last, so its presence marks a finished data set).

One patient list feeds both trees: task-2 train patients are in task 1 or not, some patients are task-1 only
(what the seed trains stage 1 on), test patients are task-2 only. IDs 00109, 00123 and 00709 are always task-2
train patients with the organisers' bad sequences: 00109 FLAIR folder empty, 00123 T1w and T2w folders missing,
00709 FLAIR images all 0.

Anatomy (head coordinates: LPS mm, origin at the brain centre): a skull-stripped ellipsoid brain (white matter,
a grey-matter shell, two CSF ventricles) with zero background, and a lobulated tumour of nested shells on one
normalised distance d (distance from the tumour centre over the lobulated TC radius): NCR d < 1 - rim, ET shell
1 - rim <= d < 1, oedema 1 <= d < wt_ratio. Contrasts: FLAIR and T2 bright oedema, T1CE bright enhancing rim,
T1 dark core (table CONTRAST, arbitrary MR units, times a per-volume gain).

DICOM quirks: plane per series (axial / sagittal / coronal, tilted up to 8 degrees) in ImageOrientationPatient and
a matching ImagePositionPatient; matrices from MATRICES scaled by size / 240; slice counts from `slices`, always
>= 12 so `Image-N` numeric and alphabetical orders differ; numbering ascending, descending or interleaved with
respect to the slice position (NUMBERING); 2-3 blank (all-0) slices at both ends; series not registered to each
other or to task 1 (a few mm of offset).

MGMT signal (weak by design): MGMT_value is tied to `rim`, the ET shell thickness as a fraction of the TC
radius (so also the ET / TC voxel ratio, about 1 - (1 - rim)^3, and the bright T1CE rim). rim = 0.35 + 0.08 *
(signal * (MGMT - 0.5) + z), z ~ N(0, 1) clipped to +-2.5: the AUC of the true rim is Phi(signal / sqrt 2), 0.68 at
the default signal 0.66; a model sees rim only through the images, so it can do worse. MGMT prevalence is 52.5 %
within each split (rounded). Same arguments -> same bytes.
"""
from __future__ import annotations

import argparse
import io
import json
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import pandas as pd
import pydicom
from pydicom.dataset import Dataset, FileDataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage

from lib.io.mr_series import SEQUENCES
from lib.io.nifti import MODALITIES, nifti_bytes
from lib.paths import atomic_write, atomic_write_text
from lib.progress import progress_bar

PathLike = Union[str, Path]
VERSION = "brats-phantom-1"
SEQ_MODALITY = {"FLAIR": "flair", "T1w": "t1", "T1wCE": "t1ce", "T2w": "t2"}
WM, GM, CSF = 10, 11, 12  # tissue codes besides the BraTS labels 1 (NCR), 2 (ED), 4 (ET); 0 = background
CONTRAST = {  # mean intensity per tissue, arbitrary MR units (times a per-volume gain)
    "flair": {WM: 300, GM: 380, CSF: 80, 1: 350, 4: 560, 2: 720},
    "t1": {WM: 620, GM: 450, CSF: 150, 1: 200, 4: 480, 2: 420},
    "t1ce": {WM: 640, GM: 470, CSF: 160, 1: 220, 4: 1350, 2: 440},
    "t2": {WM: 360, GM: 520, CSF: 1400, 1: 1000, 4: 700, 2: 950},
}
MATRICES = ((256, 256), (320, 320), (512, 512), (512, 384), (256, 192))  # (rows, cols) at --size 240
PLANES = {"axial": 0.5, "sagittal": 0.25, "coronal": 0.25}  # share of series
BASE_ORIENTATION = {"axial": ((1, 0, 0), (0, 1, 0)), "coronal": ((1, 0, 0), (0, 0, -1)),
                    "sagittal": ((0, 1, 0), (0, 0, -1))}  # (row direction, column direction), LPS
NUMBERING = {"ascending": 0.55, "descending": 0.35, "interleaved": 0.10}  # Image-N vs position along the normal
BAD_CASES = {"00109": {"FLAIR": "empty"}, "00123": {"T1w": "missing", "T2w": "missing"}, "00709": {"FLAIR": "blank"}}
RIM_MEAN, RIM_SD = 0.35, 0.08
MAX_ID = 1666  # task-1 IDs run 00000..01666
UID_ROOT = "1.2.826.0.1.3680043.8.498."


def theoretical_auc(signal: float) -> float:
    """AUC of the true rim fraction for MGMT at a given `signal` (class separation in noise SDs)."""
    return 0.5 * (1.0 + math.erf(signal / 2.0))


# --------------------------------------------------------------------------------------------------- anatomy
@dataclass(frozen=True)
class Anatomy:
    """One patient's brain and tumour in head coordinates (LPS mm, origin at the brain centre)."""

    radii: np.ndarray  # (3,) brain semi-axes
    ventricles: np.ndarray  # (2, 3) centres; semi-axes VENTRICLE_RADII
    centre: np.ndarray  # (3,) tumour centre
    r_tc: float  # mm, TC radius before lobulation
    rim: float  # ET shell thickness / TC radius: the MGMT feature
    wt_ratio: float  # WT radius / TC radius
    lobes: np.ndarray  # (3, 4): direction wave vectors (3) + phase of the radius modulation
    texture: np.ndarray  # (4, 4): spatial wave vectors (1/mm) + phase of the tissue texture


VENTRICLE_RADII = np.array([7.0, 18.0, 9.0])
LOBE_AMP = 0.12


def make_anatomy(rng: np.random.Generator, mgmt: int, signal: float) -> Anatomy:
    """Draw a brain and a tumour that fits inside it (WT within 85 % of the brain's normalised radius)."""
    radii = np.array([68.0, 84.0, 62.0]) * rng.uniform(0.94, 1.06, 3)
    z = float(np.clip(rng.normal(), -2.5, 2.5))
    rim = RIM_MEAN + RIM_SD * (signal * (mgmt - 0.5) + z)
    r_tc, wt_ratio = rng.uniform(10.0, 20.0), rng.uniform(1.3, 1.7)
    reach = (0.85 - r_tc * wt_ratio * (1 + LOBE_AMP) / radii.min())
    u = rng.normal(size=3)
    centre = radii * u / np.linalg.norm(u) * reach * rng.uniform(0.2, 1.0) ** (1 / 3)
    side = rng.uniform(5.0, 8.0)
    vent = np.array([[-side, 4.0, 8.0], [side, 4.0, 8.0]])
    lobes = np.column_stack([rng.normal(size=(3, 3)) * 2.0, rng.uniform(0, 2 * np.pi, 3)])
    tex = np.column_stack([rng.normal(size=(4, 3)) * 0.25, rng.uniform(0, 2 * np.pi, 4)])
    return Anatomy(radii, vent, centre, float(r_tc), float(rim), float(wt_ratio), lobes, tex)


def tumour_distance(anat: Anatomy, pts: np.ndarray) -> np.ndarray:
    """(N,) normalised tumour distance d of points (N, 3) head mm: < 1 - rim NCR, < 1 TC, < wt_ratio WT."""
    v = pts - anat.centre
    r = np.linalg.norm(v, axis=-1)
    u = v / np.maximum(r, 1e-6)[:, None]
    m = 1.0 + LOBE_AMP * np.sin(u @ anat.lobes[:, :3].T + anat.lobes[:, 3]).mean(axis=-1)
    return r / (anat.r_tc * m)


def tissue_at(anat: Anatomy, pts: np.ndarray) -> np.ndarray:
    """(N,) uint8 tissue code of points (N, 3) head mm: 0 outside the brain, BraTS labels 1/2/4, WM, GM, CSF."""
    q = ((pts / anat.radii) ** 2).sum(axis=-1)
    t = np.where(q < 1.0, np.where(q > 0.85 ** 2, GM, WM), 0).astype(np.uint8)
    for c in anat.ventricles:
        box = np.all(np.abs(pts - c) < VENTRICLE_RADII, axis=-1) & (t > 0)
        inside = (((pts[box] - c) / VENTRICLE_RADII) ** 2).sum(axis=-1) < 1.0
        t[np.flatnonzero(box)[inside]] = CSF
    reach = anat.r_tc * anat.wt_ratio * (1 + LOBE_AMP)
    near = np.flatnonzero(np.all(np.abs(pts - anat.centre) < reach, axis=-1) & (t > 0))
    d = tumour_distance(anat, pts[near])
    for label, limit in ((2, anat.wt_ratio), (4, 1.0), (1, 1.0 - anat.rim)):
        t[near[d < limit]] = label
    return t


_LUT = {m: np.array([CONTRAST[m].get(i, 0) for i in range(256)], dtype=np.float32) for m in CONTRAST}


def intensity(anat: Anatomy, modality: str, pts: np.ndarray, tissue: np.ndarray, gain: float,
              rng: np.random.Generator) -> np.ndarray:
    """(N,) float32 MR intensity (arbitrary units, 0 outside the brain): contrast x texture x gain + 2 % noise."""
    out = np.zeros(len(pts), np.float32)
    idx = np.flatnonzero(tissue)
    tex = np.sin(pts[idx] @ anat.texture[:, :3].T + anat.texture[:, 3]).mean(axis=-1)
    img = _LUT[modality][tissue[idx]] * (1.0 + 0.08 * tex) * gain
    img += rng.normal(0.0, 1.0, len(idx)) * (0.02 * gain * 400.0)
    out[idx] = np.maximum(img, 1.0)
    return out


# ----------------------------------------------------------------------------------------------------- plans
@dataclass(frozen=True)
class SeriesPlan:
    """One task-2 series: geometry (LPS mm), Image-N numbers per spatial slice, gain, bad-case kind."""

    patient: str
    sequence: str
    plane: str
    rows: int
    cols: int
    row_dir: np.ndarray  # (3,) ImageOrientationPatient[:3]
    col_dir: np.ndarray  # (3,) ImageOrientationPatient[3:]
    first: np.ndarray  # (3,) ImagePositionPatient of spatial slice 0
    step: float  # mm between slices along the normal
    pixel_spacing: float
    numbers: Tuple[int, ...]  # Image-N of spatial slice k (ascending position along row_dir x col_dir)
    numbering: str
    head_origin: np.ndarray  # (3,) LPS position of the head-coordinate origin
    gain: float
    bad: str  # '' | 'empty' | 'missing' | 'blank'
    series_uid: str
    noise_seed: Tuple[int, ...]

    @property
    def normal(self) -> np.ndarray:
        return np.cross(self.row_dir, self.col_dir)


@dataclass(frozen=True)
class PatientPlan:
    """One patient: ID, task-2 split ('train' | 'test' | '' = task 1 only), task-1 membership, MGMT, anatomy."""

    pid: str
    split: str
    task1: bool
    mgmt: int
    anatomy: Anatomy
    gains: Dict[str, float]  # task-1 per-modality gains
    study_uid: str
    noise_seed: Tuple[int, ...]
    series: List[SeriesPlan] = field(default_factory=list)


def _pick(rng: np.random.Generator, shares: Dict[str, float]) -> str:
    names = list(shares)
    return names[int(rng.choice(len(names), p=np.array(list(shares.values())) / sum(shares.values())))]


def _rotation(axis: np.ndarray, angle: float) -> np.ndarray:
    """(3, 3) rotation about a unit axis (Rodrigues)."""
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + math.sin(angle) * k + (1 - math.cos(angle)) * (k @ k)


def _uid(rng: np.random.Generator) -> str:
    return f"{UID_ROOT}{int(rng.integers(10 ** 11, 10 ** 12))}.{int(rng.integers(10 ** 11, 10 ** 12))}"


def plan_series(rng: np.random.Generator, pid: str, seq_index: int, anat: Anatomy, origin: np.ndarray, size: int,
                slices: Tuple[int, int], seed: int) -> SeriesPlan:
    """Plane, matrix, slice geometry and numbering of one series; the brain's extent sets the slice step so that
    2-3 slices at each end lie outside it."""
    seq = SEQUENCES[seq_index]
    plane = _pick(rng, PLANES)
    rot = _rotation(np.array(BASE_ORIENTATION[plane][0], float), math.radians(rng.uniform(-8, 8)))
    row_dir, col_dir = np.array(BASE_ORIENTATION[plane][0], float), rot @ np.array(BASE_ORIENTATION[plane][1], float)
    normal = np.cross(row_dir, col_dir)
    rows, cols = (max(16, 2 * round(v * size / 480)) for v in MATRICES[int(rng.integers(len(MATRICES)))])
    n, blank = int(rng.integers(slices[0], slices[1] + 1)), int(rng.integers(2, 4))
    half = float(np.sqrt(((anat.radii * normal) ** 2).sum()))
    step = half / ((n - 1) / 2 - blank + 0.5)
    ps = rng.uniform(220.0, 250.0) / max(rows, cols)
    head = origin + rng.normal(0.0, 3.0, 3)
    shift = rng.uniform(-8, 8, 2)  # mm in plane; along the normal at most a quarter step, so the end slices stay blank
    centre = head + shift[0] * row_dir + shift[1] * col_dir + rng.uniform(-0.25, 0.25) * step * normal
    first = centre - (cols - 1) / 2 * ps * row_dir - (rows - 1) / 2 * ps * col_dir - (n - 1) / 2 * step * normal
    numbering = _pick(rng, NUMBERING)
    if numbering == "ascending":
        numbers = tuple(range(1, n + 1))
    elif numbering == "descending":
        numbers = tuple(range(n, 0, -1))
    else:  # interleaved acquisition: even positions get the first numbers
        order = list(range(0, n, 2)) + list(range(1, n, 2))
        numbers = tuple(int(v) + 1 for v in np.argsort(order))
    return SeriesPlan(pid, seq, plane, rows, cols, row_dir, col_dir, first, float(step), float(ps), numbers, numbering,
                      head, float(np.exp(rng.uniform(np.log(0.5), np.log(3.0)))), BAD_CASES.get(pid, {}).get(seq, ""),
                      _uid(rng), (seed, int(pid), seq_index, 1))


def _assign(rng: np.random.Generator, ids: List[str]) -> Dict[str, Tuple[str, bool]]:
    """{id: (split, in task 1)}: ~25 % task-1 only, ~20 % of the rest test, half the other train also task 1."""
    n = len(ids)
    n_t1, n_test = max(1, round(0.25 * n)), max(1, round(0.2 * (n - round(0.25 * n))))
    free = [i for i in rng.permutation(ids).tolist() if i not in BAD_CASES]
    out = {i: ("", True) for i in free[:n_t1]}
    out.update({i: ("test", False) for i in free[n_t1:n_t1 + n_test]})
    rest = free[n_t1 + n_test:]
    n_both = max(1, round(0.5 * len(rest)))
    out.update({i: ("train", k < n_both) for k, i in enumerate(rest)})
    out.update({i: ("train", False) for i in BAD_CASES})
    return out


def _mgmt(rng: np.random.Generator, ids: List[str]) -> Dict[str, int]:
    """52.5 % positives (rounded, at least one of each class when n >= 2) in a random order."""
    k = min(max(round(0.525 * len(ids)), 1), max(len(ids) - 1, 1))
    pos = set(rng.permutation(ids)[:k].tolist())
    return {i: int(i in pos) for i in ids}


def plan_dataset(patients: int = 20, seed: int = 0, size: int = 96, slices: Tuple[int, int] = (14, 40),
                 signal: float = 0.66) -> List[PatientPlan]:
    """All patients (sorted by ID) with anatomy, MGMT and series plans; cheap (no pixels)."""
    if patients < 8 or not 32 <= size <= 512 or not 12 <= slices[0] <= slices[1]:
        raise ValueError(f"need patients >= 8, 32 <= size <= 512 and 12 <= slices[0] <= slices[1]; got "
                         f"patients={patients}, size={size}, slices={tuple(slices)}")
    rng = np.random.default_rng([seed, 1])
    others = rng.choice(np.setdiff1d(np.arange(MAX_ID + 1), [int(i) for i in BAD_CASES]), patients - len(BAD_CASES),
                        replace=False)
    ids = sorted(list(BAD_CASES) + [f"{int(i):05d}" for i in others])
    where = _assign(rng, ids)
    mgmt: Dict[str, int] = {}
    for split in ("train", "test", ""):
        mgmt.update(_mgmt(rng, [i for i in ids if where[i][0] == split]))
    plans = []
    for pid in ids:
        prng = np.random.default_rng([seed, int(pid), 2])
        anat = make_anatomy(prng, mgmt[pid], signal)
        gains = {m: float(prng.uniform(0.7, 1.5)) for m in MODALITIES}
        plan = PatientPlan(pid, where[pid][0], where[pid][1], mgmt[pid], anat, gains, _uid(prng), (seed, int(pid), 3))
        if plan.split:
            origin = np.array([prng.uniform(-10, 10), prng.uniform(-40, 0), prng.uniform(-10, 30)])
            plan.series.extend(plan_series(prng, pid, k, anat, origin, size, slices, seed) for k in range(4))
        plans.append(plan)
    return plans


# --------------------------------------------------------------------------------------------------- rendering
def task1_grid(size: int) -> Tuple[Tuple[int, int, int], np.ndarray]:
    """(shape (X, Y, Z), affine (4, 4)) of the task-1 grid: s = 240 / size mm voxels, diag(-s, -s, s), y offset
    (size - 1) * s; `size=240` gives the real BraTS 240 x 240 x 155 grid and affine."""
    s = 240.0 / size
    affine = np.diag([-s, -s, s, 1.0])
    affine[1, 3] = (size - 1) * s
    return (size, size, int(round(155 * size / 240))), affine


def render_task1(plan: PatientPlan, size: int) -> Tuple[Dict[str, np.ndarray], np.ndarray, np.ndarray]:
    """({modality: (X, Y, Z) int16}, seg (X, Y, Z) uint8 {0, 1, 2, 4}, affine (4, 4)) of one patient."""
    shape, affine = task1_grid(size)
    centre = affine[:3, :3] @ ((np.array(shape) - 1) / 2.0) + affine[:3, 3]
    ii, jj = (a.reshape(-1) for a in np.meshgrid(np.arange(shape[0]), np.arange(shape[1]), indexing="ij"))
    rng = np.random.default_rng(plan.noise_seed)
    images = {m: np.zeros(shape, np.int16) for m in MODALITIES}
    seg = np.zeros(shape, np.uint8)
    for k in range(shape[2]):
        vox = np.column_stack([ii, jj, np.full_like(ii, k)]).astype(np.float64)
        pts = (vox @ affine[:3, :3].T + affine[:3, 3] - centre) * np.array([-1.0, -1.0, 1.0])  # RAS -> LPS head mm
        tissue = tissue_at(plan.anatomy, pts)
        seg[:, :, k] = np.where(np.isin(tissue, (1, 2, 4)), tissue, 0).reshape(shape[:2])
        for m in MODALITIES:
            img = intensity(plan.anatomy, m, pts, tissue, plan.gains[m], rng)
            images[m][:, :, k] = np.clip(np.rint(img), 0, 32767).astype(np.int16).reshape(shape[:2])
    return images, seg, affine


def render_series(sp: SeriesPlan, anat: Anatomy) -> np.ndarray:
    """(slices, rows, cols) uint16 pixels of one series in spatial order (ascending along the normal)."""
    n = len(sp.numbers)
    out = np.zeros((n, sp.rows, sp.cols), np.uint16)
    if sp.bad == "blank":
        return out
    rng = np.random.default_rng(sp.noise_seed)
    ii, jj = np.meshgrid(np.arange(sp.rows), np.arange(sp.cols), indexing="ij")
    inplane = (ii[..., None] * sp.col_dir + jj[..., None] * sp.row_dir).reshape(-1, 3) * sp.pixel_spacing
    for k in range(n):
        pts = sp.first + k * sp.step * sp.normal + inplane - sp.head_origin
        img = intensity(anat, SEQ_MODALITY[sp.sequence], pts, tissue_at(anat, pts), sp.gain, rng)
        out[k] = np.clip(np.rint(img), 0, 65535).astype(np.uint16).reshape(sp.rows, sp.cols)
    return out


def _ds(v: float) -> str:
    """A number as a DICOM DS string (<= 16 characters, 6 decimals)."""
    s = f"{v:.6f}".rstrip("0").rstrip(".")
    return "0" if s in ("", "-0") else s


def mr_dicom_bytes(plan: PatientPlan, sp: SeriesPlan, k: int, pixels: np.ndarray) -> bytes:
    """Spatial slice `k` of a series as MR Image Storage file bytes (Explicit VR LE, MONOCHROME2, uint16)."""
    number = sp.numbers[k]
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = MRImageStorage
    meta.MediaStorageSOPInstanceUID = f"{sp.series_uid}.{number}"
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = UID_ROOT + "1"
    ds = FileDataset("", Dataset(), file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = MRImageStorage, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.PatientID, ds.PatientName = "MR", plan.pid, plan.pid
    ds.StudyInstanceUID, ds.SeriesInstanceUID = plan.study_uid, sp.series_uid
    ds.SeriesDescription, ds.SeriesNumber, ds.InstanceNumber = sp.sequence, SEQUENCES.index(sp.sequence) + 1, number
    pos = sp.first + k * sp.step * sp.normal
    ds.ImagePositionPatient = [_ds(v) for v in pos]
    ds.ImageOrientationPatient = [_ds(v) for v in np.concatenate([sp.row_dir, sp.col_dir])]
    ds.SliceLocation = _ds(float(pos @ sp.normal))
    ds.SliceThickness = ds.SpacingBetweenSlices = _ds(sp.step)
    ds.PixelSpacing = [_ds(sp.pixel_spacing)] * 2
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.Rows, ds.Columns = pixels.shape
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.PixelData = np.ascontiguousarray(pixels, dtype="<u2").tobytes()
    buf = io.BytesIO()
    pydicom.dcmwrite(buf, ds, enforce_file_format=True)
    return buf.getvalue()


# ------------------------------------------------------------------------------------------------------ outputs
_MARKER = "PHANTOM"
_OURS = ("task1", "task2", "_truth")


def _prepare_out(out: Path) -> None:
    """Create `out`; clear a previous phantom there; refuse to touch data we did not write."""
    present = [n for n in _OURS if (out / n).exists()]
    if present and not (out / "_truth" / _MARKER).is_file():
        raise FileExistsError(f"{out} already holds {present} not written by the BraTS phantom; choose an empty folder")
    for n in present:
        shutil.rmtree(out / n)
    for sub in ("task1", "task2/train", "task2/test", "_truth"):
        (out / sub).mkdir(parents=True)
    (out / "_truth" / _MARKER).write_text(f"written by lib.tasks.brats.phantom ({VERSION}); may be overwritten\n")


def _write_bytes(path: Path, payload: bytes) -> None:
    atomic_write(path, lambda tmp: tmp.write_bytes(payload))


def write_patient(out: Path, plan: PatientPlan, size: int) -> List[Dict[str, object]]:
    """Write the patient's task-1 case and task-2 series; returns one truth row per series."""
    if plan.task1:
        case = out / "task1" / f"BraTS2021_{plan.pid}"
        case.mkdir(parents=True)
        images, seg, affine = render_task1(plan, size)
        for name, data in list(images.items()) + [("seg", seg)]:
            _write_bytes(case / f"BraTS2021_{plan.pid}_{name}.nii.gz", nifti_bytes(data, affine))
    rows = []
    for sp in plan.series:
        rows.append(dict(BraTS21ID=plan.pid, split=plan.split, sequence=sp.sequence, plane=sp.plane, rows=sp.rows,
                         cols=sp.cols, slices=len(sp.numbers), numbering=sp.numbering, step_mm=round(sp.step, 4),
                         pixel_spacing_mm=round(sp.pixel_spacing, 4), bad=sp.bad))
        folder = out / "task2" / plan.split / plan.pid / sp.sequence
        if sp.bad == "missing":
            continue
        folder.mkdir(parents=True)
        if sp.bad == "empty":
            continue
        pixels = render_series(sp, plan.anatomy)
        for k in range(len(sp.numbers)):
            _write_bytes(folder / f"Image-{sp.numbers[k]}.dcm", mr_dicom_bytes(plan, sp, k, pixels[k]))
    return rows


def _csv(path: Path, df: pd.DataFrame) -> None:
    atomic_write_text(path, df.to_csv(index=False))


def _write_tables(out: Path, plans: List[PatientPlan], series_rows: List[Dict], params: Dict) -> Dict[str, object]:
    """Kaggle CSVs, truth CSVs and phantom.json (last); returns the counts."""
    pats = pd.DataFrame([dict(BraTS21ID=p.pid, split=p.split, task1=p.task1, task2=bool(p.split), MGMT_value=p.mgmt,
                              rim=round(p.anatomy.rim, 6), r_tc_mm=round(p.anatomy.r_tc, 3),
                              wt_ratio=round(p.anatomy.wt_ratio, 4),
                              bad=";".join(f"{s}:{k}" for s, k in BAD_CASES.get(p.pid, {}).items()))
                         for p in plans])
    labels = pats[["BraTS21ID", "MGMT_value"]]
    _csv(out / "task2" / "train_labels.csv", labels[pats["split"] == "train"])
    _csv(out / "task2" / "sample_submission.csv", labels[pats["split"] == "test"].assign(MGMT_value=0.5))
    _csv(out / "_truth" / "test_labels.csv", labels[pats["split"] == "test"])
    _csv(out / "_truth" / "patients.csv", pats)
    _csv(out / "_truth" / "series.csv", pd.DataFrame(series_rows))
    counts = dict(patients=len(pats), task1=int(pats["task1"].sum()), train=int((pats["split"] == "train").sum()),
                  test=int((pats["split"] == "test").sum()), both=int((pats["task1"] & pats["task2"]).sum()),
                  task1_only=int((pats["task1"] & ~pats["task2"]).sum()),
                  train_positive=int(pats.loc[pats["split"] == "train", "MGMT_value"].sum()))
    manifest = dict(version=VERSION, params=params, counts=counts, bad_cases=BAD_CASES,
                    mgmt_feature=dict(name="rim", mean=RIM_MEAN, sd=RIM_SD,
                                      theoretical_auc=round(theoretical_auc(params["signal"]), 4)),
                    task1_grid=dict(shape=list(task1_grid(params["size"])[0]),
                                    affine=task1_grid(params["size"])[1].tolist()))
    atomic_write_text(out / "_truth" / "phantom.json", json.dumps(manifest, indent=1) + "\n")
    return counts


def generate(out: PathLike, patients: int = 20, seed: int = 0, size: int = 96, slices: Tuple[int, int] = (14, 40),
             signal: float = 0.66, progress: bool = True) -> Dict[str, object]:
    """Write the synthetic BraTS data set under `out` (see the module docstring); returns a summary dict.

    size: task-1 grid edge in voxels (240 = the real grid; the default 96 = 2.5 mm voxels keeps the demo fast) and
    the DICOM matrix scale (MATRICES x size / 240). slices: (min, max) slices per series. signal: MGMT separation of
    the rim feature in noise SDs (0 = no signal). Timing on one core: the default 20 patients take ~20 s (~70 MB);
    at --size 240 a task-1 case takes ~7 s and a full-matrix series ~1 s.
    """
    t0 = time.perf_counter()
    out = Path(out)
    plans = plan_dataset(patients, seed, size, (int(slices[0]), int(slices[1])), signal)
    _prepare_out(out)
    series_rows: List[Dict[str, object]] = []
    for plan in progress_bar(plans, desc="brats phantom", unit="patient", disable=not progress):
        series_rows += write_patient(out, plan, size)
    params = dict(patients=patients, seed=seed, size=size, slices=list(slices), signal=signal)
    counts = _write_tables(out, plans, series_rows, params)
    return dict(out_dir=str(out), **counts, seconds=round(time.perf_counter() - t0, 2))


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, object]:
    """CLI (`python -m lib.phantom brats ...` passes the arguments after `brats`): generate and print a summary."""
    ap = argparse.ArgumentParser(prog="python -m lib.phantom brats", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="output folder (task1/, task2/, _truth/)")
    ap.add_argument("--patients", type=int, default=20, help="patients in all (>= 8; includes 00109, 00123, 00709)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--size", type=int, default=96, help="task-1 grid edge (240 = real) and DICOM matrix scale")
    ap.add_argument("--slices", type=int, nargs=2, default=(14, 40), metavar=("MIN", "MAX"), help="slices per series")
    ap.add_argument("--signal", type=float, default=0.66, help="MGMT separation of the rim feature, in noise SDs")
    a = ap.parse_args(argv)
    s = generate(a.out, patients=a.patients, seed=a.seed, size=a.size, slices=tuple(a.slices), signal=a.signal)
    print(f"brats phantom: {s['patients']} patients ({s['task1']} task 1, {s['train']} train / {s['test']} test, "
          f"{s['both']} in both trees) in {s['seconds']:.1f}s -> {s['out_dir']}")
    return s


if __name__ == "__main__":
    main()
