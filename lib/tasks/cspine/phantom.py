"""Synthetic RSNA 2022 cervical-spine data set: axial neck CT with C1-C7 (+ T1-T3) and fractures, Kaggle layout.

`python -m lib.phantom cspine --out DIR [--studies N] [--seed S] [--size S] [--slices MIN MAX] [--test-studies N]`
(or `python -m lib.tasks.cspine.phantom ...`) writes DIR/train_images/<StudyInstanceUID>/<slice_number>.dcm,
DIR/test_images/..., train.csv, train_bounding_boxes.csv (a subset of fractured studies), segmentations/<uid>.nii
(a subset overlapping the box subset), test.csv (naming one study that is *not* in test_images and leaving one out,
like the downloadable dev copy), sample_submission.csv, and the hidden truth in DIR/_truth/ (test_labels.csv in
train.csv format; studies.csv: per-study quirks; vertebrae.csv: fracture kind and visible fraction per vertebra;
phantom.json: parameters, counts and encoder availability). Same arguments -> same bytes.

Quirks mixed over studies: slice_number running head-to-feet or feet-to-head (IPP z descending or ascending with
it); intercept 0 with signed storage and -2048 padding vs intercept -1024 with unsigned 12-bit storage; RLE Lossless
and JPEG 2000 Lossless files beside uncompressed Explicit VR LE (JPEG Lossless .4.70 has no encoder in pydicom, so it
is not produced); studies without a Modality tag; fractured C1/C7 only partly (10-25 %) in the field of view.
Slice spacing is the z extent over the slice count (a few mm at CI sizes, below 1 mm at 200+ slices).
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
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, JPEG2000Lossless, RLELossless

from lib.paths import atomic_write, atomic_write_text
from lib.progress import progress_bar

PathLike = Union[str, Path]
VERSION = "cspine-phantom-1"
UID_ROOT = "1.2.826.0.1.3680043"
CERVICAL = tuple(f"C{i}" for i in range(1, 8))
NAMES = CERVICAL + ("T1", "T2", "T3")  # segmentation label = index + 1
#: Real train.csv counts (2,019 studies): per-vertebra positives and fractured vertebrae per fractured study.
P_OVERALL = 961 / 2019
VERTEBRA_COUNTS = (146, 285, 73, 108, 162, 277, 393)
N_FRACTURED_COUNTS = {1: 623, 2: 239, 3: 64, 4: 26, 5: 7, 6: 2}
#: (top, bottom) depth in mm below the top of C1 at scale 1; C2 starts with the dens inside the C1 ring.
LEVELS = ((0, 10), (2, 27), (32, 46), (51, 65), (70, 84), (89, 103), (108, 123), (128, 146), (151, 170), (175, 195))
DENS_MM = 9.0
ENCODINGS = ("s16_0", "u12_1024")  # signed, intercept 0, padding -2048 | unsigned 12-bit, intercept -1024
SYNTAXES = {"explicit": ExplicitVRLittleEndian, "rle": RLELossless, "j2k": JPEG2000Lossless}
PAD_HU = -2048.0
_MARKER = "phantom.json"
_OURS = ("train_images", "test_images", "segmentations", "_truth", "train.csv", "train_bounding_boxes.csv",
         "test.csv", "sample_submission.csv")


@dataclass
class StudyPlan:
    """Everything needed to render and write one study. Depths are mm below the top of C1 (caudal positive)."""

    index: int
    split: str
    uid: str
    seed: int
    n_slices: int
    size: int
    pixel_spacing: float
    d_top: float  # depth of the head-end slice
    dz: float  # slice spacing (mm)
    direction: str  # "head_first": slice_number 1 at the head end (IPP z falls with slice_number) | "feet_first"
    encoding: str
    syntax: str
    modality: bool
    scale: float
    spine_x: float  # lateral offset of the spine (mm, patient left +): makes the mask left-right asymmetric
    spine_y: float  # AP position of the canal centre at C1 (mm, posterior +)
    lordosis: float  # anterior bulge (mm) mid-neck
    tilt: float  # AP drift (mm) over the column: with the lordosis, makes the mask head-feet asymmetric
    origin: Tuple[float, float, float]  # IPP of the head-end slice's first pixel
    fractured: Dict[str, int] = field(default_factory=dict)
    fractures: Dict[str, dict] = field(default_factory=dict)  # name -> plane (point, normal, half width), kind
    cut: str = ""  # "C1" / "C7": that vertebra only partly in the field of view
    seg: bool = False
    boxes: bool = False

    def depth(self, k: np.ndarray) -> np.ndarray:
        """Depth (mm) of spatial slice k (0 = head end)."""
        return self.d_top + np.asarray(k, float) * self.dz

    def slice_number(self, k: int) -> int:
        return k + 1 if self.direction == "head_first" else self.n_slices - k

    def levels(self) -> List[Tuple[float, float]]:
        return [(t * self.scale, b * self.scale) for t, b in LEVELS]

    def visible_fraction(self, name: str) -> float:
        top, bottom = self.levels()[NAMES.index(name)]
        lo, hi = self.d_top, float(self.depth(self.n_slices - 1))
        return max(0.0, min(bottom, hi) - max(top, lo)) / (bottom - top)


# ------------------------------------------------------------------------------------------------------ planning
def _shares(rng: np.random.Generator, n: int, shares: Dict[str, float]) -> List[str]:
    """n values with the given shares (each at least once when n allows), in a random order."""
    names = list(shares)
    counts = {k: max(1 if n >= len(names) else 0, int(round(shares[k] * n))) for k in names[1:]}
    counts[names[0]] = max(0, n - sum(counts.values()))
    values = [k for k in names for _ in range(counts[k])][:n]
    return [values[i] for i in rng.permutation(len(values))]


def _sample_labels(rng: np.random.Generator, fractured: bool) -> Dict[str, int]:
    """C1..C7 labels: none, or 1-6 fractured vertebrae drawn with the real per-vertebra frequencies."""
    labels = dict.fromkeys(CERVICAL, 0)
    if fractured:
        ks, ps = zip(*N_FRACTURED_COUNTS.items())
        k = int(rng.choice(ks, p=np.array(ps) / sum(ps)))
        w = np.array(VERTEBRA_COUNTS, float)
        for i in rng.choice(7, size=k, replace=False, p=w / w.sum()):
            labels[CERVICAL[i]] = 1
    return labels


def _fracture(plan: StudyPlan, name: str, rng: np.random.Generator, width: float = 1.0) -> dict:
    """A fracture plane through the vertebra's main bone at a random height and tilt; 'line' or 'cortical'; about
    one voxel thick times `width`."""
    top, bottom = plan.levels()[NAMES.index(name)]
    d = top + rng.uniform(0.3, 0.7) * (bottom - top)
    cx, cy = _canal(plan, d)
    body = _body(plan, NAMES.index(name))
    point = (cx + rng.uniform(-0.3, 0.3) * body[0], cy - body[2] + rng.uniform(-0.2, 0.2) * body[1], d)
    if name == "C1":
        point = (cx + rng.choice([-1, 1]) * (body[3] + 4.0 * plan.scale), cy - 0.5 * body[3], d)
    normal = rng.normal(size=3)
    normal[2] *= 2.0  # mostly sloping across the slices
    return {"point": [float(v) for v in point], "normal": [float(v) for v in normal / np.linalg.norm(normal)],
            "half_width": 0.55 * width * max(plan.pixel_spacing, plan.dz), "kind": str(rng.choice(["line", "cortical"]))}


def plan_dataset(seed: int = 0, studies: int = 12, size: int = 128, slices: Tuple[int, int] = (40, 64),
                 test_studies: int = 3, fracture_width: float = 1.0) -> List[StudyPlan]:
    """Plan every study (labels, geometry, quirks) without rendering; cheap, so prevalences can be checked at scale.
    `fracture_width` scales the fracture planes' thickness (1: about one voxel, a hairline break at any size)."""
    rng = np.random.default_rng(seed)
    n_test = min(test_studies, studies - 1)
    numbers = rng.choice(64000, size=studies, replace=False) + 1000
    seeds = [int(s.generate_state(1)[0]) for s in np.random.SeedSequence(seed).spawn(studies)]
    direction = _shares(rng, studies, {"head_first": 0.5, "feet_first": 0.5})
    encoding = _shares(rng, studies, {"s16_0": 0.5, "u12_1024": 0.5})
    syntax = _shares(rng, studies, {"explicit": 0.65, "rle": 0.2, "j2k": 0.15})
    no_modality = _shares(rng, studies, {"yes": 0.7, "no": 0.3})
    overall = _shares(rng, studies, {"no": 1 - P_OVERALL, "yes": P_OVERALL})
    plans, cut_left = [], 1  # the first fractured C1/C7 study is always cut, later ones with p = 0.3
    for i in range(studies):
        r = np.random.default_rng(seeds[i])
        ps = float(np.round(r.uniform(0.25, 0.45) * 512 / size, 4))
        plan = StudyPlan(i, "test" if i >= studies - n_test else "train", f"{UID_ROOT}.{numbers[i]}", seeds[i], 2,
                         size, ps, 0.0, 1.0, direction[i], encoding[i], syntax[i], no_modality[i] == "yes",
                         float(r.uniform(0.9, 1.1)), float(r.choice([-1, 1]) * r.uniform(7, 12)),
                         float(r.uniform(10, 18)), float(r.uniform(4, 8)), float(r.uniform(4, 10)), (0.0, 0.0, 0.0))
        plan.fractured = _sample_labels(r, overall[i] == "yes")
        levels = plan.levels()
        d_top, d_bottom = -r.uniform(4, 15), levels[7 + int(r.integers(0, 3))][0] + r.uniform(4, 14)
        cut = r.random() < 0.3 or cut_left > 0
        if plan.fractured["C7"] and cut:
            plan.cut, d_bottom = "C7", levels[6][0] + r.uniform(0.1, 0.25) * (levels[6][1] - levels[6][0])
        elif plan.fractured["C1"] and cut:
            plan.cut, d_top = "C1", levels[0][1] - r.uniform(0.1, 0.25) * (levels[0][1] - levels[0][0])
        cut_left -= bool(plan.cut)
        plan.n_slices = int(r.integers(slices[0], slices[1] + 1))
        plan.dz = float(np.round((d_bottom - d_top) / (plan.n_slices - 1), 3))
        plan.d_top = float(np.round(d_top, 3))
        half = size * ps / 2
        plan.origin = (float(np.round(-half + r.uniform(-5, 5), 3)), float(np.round(-half + r.uniform(-5, 5), 3)),
                       float(np.round(r.uniform(1700, 2000), 3)))
        plan.fractures = {n: _fracture(plan, n, r, fracture_width) for n in CERVICAL if plan.fractured[n]}
        plans.append(plan)
    _assign_subsets(rng, [p for p in plans if p.split == "train"])
    return plans


def _assign_subsets(rng: np.random.Generator, train: List[StudyPlan]) -> None:
    """Boxes for about half the fractured train studies, masks for ~30 % of train studies, at least one with both."""
    fractured = [p for p in train if any(p.fractured.values())]
    for p in fractured:
        p.boxes = bool(rng.random() < 0.5)
    if fractured and not any(p.boxes for p in fractured):
        fractured[0].boxes = True
    for p in train:
        p.seg = bool(rng.random() < 0.3)
    if train and not any(p.seg and (p.boxes or not fractured) for p in train):
        next(p for p in train if p.boxes or not fractured).seg = True


# ------------------------------------------------------------------------------------------------------ anatomy
def _canal(plan: StudyPlan, d: float) -> Tuple[float, float]:
    """Canal centre (x, y) mm at depth d: lateral offset, lordosis (anterior bulge) and a linear AP drift."""
    t = min(max(d / (195.0 * plan.scale), 0.0), 1.0)
    return plan.spine_x, plan.spine_y - plan.lordosis * math.sin(math.pi * t) + plan.tilt * t


def _body(plan: StudyPlan, i: int) -> Tuple[float, float, float, float]:
    """(lateral semi-axis, AP semi-axis, centre distance anterior of the canal centre, canal radius) in mm."""
    a, b = 8.5 + 0.55 * i, 6.5 + 0.4 * i
    rc = 7.5 - 0.1 * i
    return a * plan.scale, b * plan.scale, (rc + 2.0 + b) * plan.scale, rc * plan.scale


def _vertebra(plan: StudyPlan, i: int, d: float, u: np.ndarray, v: np.ndarray, rng: np.random.Generator
              ) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Bone of vertebra i on one slice: (bone mask, HU float32, cortex mask), all (Y, X); HU meaningful in the mask."""
    top, bottom = plan.levels()[i]
    t = (d - top) / (bottom - top)
    cx, cy = _canal(plan, d)
    a, b, off, rc = _body(plan, i)
    x, y = u - cx, v - cy
    cortex = np.zeros(u.shape, bool)
    inner = np.zeros(u.shape, bool)
    if i == 0:  # atlas: anterior arch, lateral masses, posterior ring
        e = (x / (6.5 * plan.scale)) ** 2 + ((y + rc + 11 * plan.scale) / (2.5 * plan.scale)) ** 2
        cortex |= e < 1
        for side in (-1, 1):
            inner |= (x - side * (rc + 4 * plan.scale)) ** 2 + (y + 0.5 * rc) ** 2 < (5.0 * plan.scale) ** 2
    elif i == 1 and d < top + DENS_MM * plan.scale:  # dens of C2, inside the atlas ring
        inner |= x ** 2 + (y + rc + 4.5 * plan.scale) ** 2 < (4.0 * plan.scale) ** 2
    else:
        e = (x / a) ** 2 + ((y + off) / b) ** 2
        inner |= e < (1 - 1.6 / min(a, b)) ** 2
        cortex |= (e < 1) & ~inner
    if 0.1 < t < 0.9:  # posterior arch, spinous and transverse processes
        r2 = x ** 2 + y ** 2
        cortex |= (r2 > rc ** 2) & (r2 < (rc + 3.0 * plan.scale) ** 2) & (y > -0.3 * rc)
        cortex |= (np.abs(x) < 2.0 * plan.scale) & (y > rc) & (y < rc + (9 + 2.5 * i) * plan.scale)
        cortex |= (np.abs(y + 0.3 * rc) < 2.5 * plan.scale) & (np.abs(x) > rc) & (np.abs(x) < rc + 11 * plan.scale)
    hu = np.where(cortex, 1150 + rng.normal(0, 90, u.shape), 320 + rng.normal(0, 60, u.shape))
    return cortex | inner, hu.astype(np.float32), cortex


def render_slice(plan: StudyPlan, k: int) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Spatial slice k (0 = head end) -> (HU float32 (S, S) with PAD_HU outside the FOV circle, labels uint8 (S, S),
    fracture mask bool (S, S))."""
    rng = np.random.default_rng((plan.seed, k))
    s, ps = plan.size, plan.pixel_spacing
    d = float(plan.depth(k))
    u = (plan.origin[0] + np.arange(s) * ps)[None, :].repeat(s, 0)  # patient x (mm)
    v = (plan.origin[1] + np.arange(s) * ps)[:, None].repeat(s, 1)  # patient y (mm), posterior +
    hu = (-1000 + rng.normal(0, 10, (s, s))).astype(np.float32)
    neck = (u / (62 * plan.scale)) ** 2 + (v / (52 * plan.scale)) ** 2
    hu[neck < 1] = -90 + rng.normal(0, 15, int((neck < 1).sum()))
    soft = neck < 0.85
    hu[soft] = 40 + rng.normal(0, 20, int(soft.sum()))
    hu[(u ** 2 + (v + 24 * plan.scale) ** 2) < (8 * plan.scale) ** 2] = -1000
    labels = np.zeros((s, s), np.uint8)
    broken = np.zeros((s, s), bool)
    for i, (top, bottom) in enumerate(plan.levels()):
        if not top <= d <= bottom:
            if i > 1 and bottom < d < bottom + 5 * plan.scale:  # disc below vertebra i
                cx, cy = _canal(plan, d)
                a, b, off, _ = _body(plan, i)
                hu[((u - cx) / a) ** 2 + ((v - cy + off) / b) ** 2 < 1] = 80
            continue
        mask, bone, cortex = _vertebra(plan, i, d, u, v, rng)
        frac = plan.fractures.get(NAMES[i])
        if frac is not None:
            dist = np.abs((u - frac["point"][0]) * frac["normal"][0] + (v - frac["point"][1]) * frac["normal"][1]
                          + (d - frac["point"][2]) * frac["normal"][2])
            near = (u - frac["point"][0]) ** 2 + (v - frac["point"][1]) ** 2 < (14 * plan.scale) ** 2
            hit = mask & near & (dist < frac["half_width"]) & (cortex if frac["kind"] == "cortical" else True)
            bone[hit] = 60 + rng.normal(0, 15, int(hit.sum()))
            broken |= hit
        hu[mask] = bone[mask]
        labels[mask] = i + 1
    fov = (u - u.mean()) ** 2 + (v - v.mean()) ** 2 > (s * ps / 2) ** 2
    hu[fov] = PAD_HU
    labels[fov] = 0
    return hu, labels, broken & ~fov


def render_study(plan: StudyPlan) -> Tuple[np.ndarray, np.ndarray]:
    """(HU float32 (N, S, S), labels uint8 (N, S, S)) in spatial order, index 0 = head end (as lib.io reads it)."""
    out = [render_slice(plan, k)[:2] for k in range(plan.n_slices)]
    return np.stack([o[0] for o in out]), np.stack([o[1] for o in out])


# ------------------------------------------------------------------------------------------------------ writing
def encode(hu: np.ndarray, encoding: str) -> Tuple[np.ndarray, Dict[str, object]]:
    """HU (S, S) float -> (stored pixels int16/uint16, header values) for an ENCODINGS name."""
    v = np.rint(hu)
    if encoding == "s16_0":
        return np.clip(v, -2048, 32767).astype(np.int16), {"BitsStored": 16, "PixelRepresentation": 1,
                                                           "RescaleIntercept": "0"}
    if encoding == "u12_1024":
        return np.clip(v + 1024, 0, 4095).astype(np.uint16), {"BitsStored": 12, "PixelRepresentation": 0,
                                                              "RescaleIntercept": "-1024"}
    raise ValueError(f"unknown encoding {encoding!r}; expected one of {list(ENCODINGS)}")


def dicom_bytes(plan: StudyPlan, k: int, hu: np.ndarray) -> bytes:
    """Spatial slice k of `plan` as DICOM file bytes (the plan's encoding, transfer syntax and Modality quirk)."""
    raw, hdr = encode(hu, plan.encoding)
    number = plan.slice_number(k)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = f"{plan.uid}.1.{number}"
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset("", Dataset(), file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, f"{plan.uid}.1.{number}"
    if plan.modality:
        ds.Modality = "CT"
    ds.PatientID = ds.PatientName = plan.uid.rsplit(".", 1)[1]
    ds.StudyInstanceUID, ds.SeriesInstanceUID = plan.uid, f"{plan.uid}.1"
    ds.InstanceNumber = number
    ds.SliceThickness = f"{plan.dz:g}"
    z = plan.origin[2] - plan.depth(k) + plan.d_top
    ds.ImagePositionPatient = [f"{plan.origin[0]:.3f}", f"{plan.origin[1]:.3f}", f"{z:.3f}"]
    ds.ImageOrientationPatient = ["1", "0", "0", "0", "1", "0"]
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.Rows, ds.Columns = raw.shape
    ds.PixelSpacing = [f"{plan.pixel_spacing:g}"] * 2
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, hdr["BitsStored"], int(hdr["BitsStored"]) - 1
    ds.PixelRepresentation = hdr["PixelRepresentation"]
    ds.WindowCenter, ds.WindowWidth = "500", "2500"
    ds.RescaleIntercept, ds.RescaleSlope = hdr["RescaleIntercept"], "1"
    if plan.syntax == "explicit":
        ds.PixelData = raw.tobytes()
    else:
        ds.compress(SYNTAXES[plan.syntax], arr=raw, generate_instance_uid=False)
    buf = io.BytesIO()
    pydicom.dcmwrite(buf, ds, enforce_file_format=True)
    return buf.getvalue()


def nifti_array(labels: np.ndarray, plan: StudyPlan) -> np.ndarray:
    """Spatial-order labels (N, Y, X) -> the RSNA sagittal-style stored array (X, Y, N) such that
    `stored[:, ::-1, ::-1].transpose(2, 1, 0)` is the label volume in ascending slice_number order."""
    by_number = labels if plan.direction == "head_first" else labels[::-1]
    return np.ascontiguousarray(by_number.transpose(2, 1, 0)[:, ::-1, ::-1])


def nifti_affine(plan: StudyPlan) -> np.ndarray:
    """RAS affine of `nifti_array`: i = column (R = -x), j = flipped row (A = -y), k = reversed slice_number."""
    ps, n, s = plan.pixel_spacing, plan.n_slices, plan.size
    z_head = plan.origin[2]
    z_k0 = z_head - (n - 1) * plan.dz if plan.direction == "head_first" else z_head  # slice_number n (k=0 in nii)
    sz = plan.dz if plan.direction == "head_first" else -plan.dz
    return np.array([[-ps, 0, 0, -plan.origin[0]], [0, ps, 0, -plan.origin[1] - (s - 1) * ps], [0, 0, sz, z_k0],
                     [0, 0, 0, 1]], float)


def _write_nifti(path: Path, labels: np.ndarray, plan: StudyPlan) -> None:
    import nibabel as nib

    img = nib.Nifti1Image(nifti_array(labels, plan), nifti_affine(plan))
    img.header.set_xyzt_units("mm")
    img.set_sform(img.affine, code=1)
    img.set_qform(img.affine, code=1)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: tmp.write_bytes(img.to_bytes()))


def write_study(out: Path, plan: StudyPlan) -> List[dict]:
    """Render and write one study's DICOMs (and its mask); returns its box rows (one per fractured slice)."""
    folder = out / f"{plan.split}_images" / plan.uid
    folder.mkdir(parents=True)
    labels, boxes = [], []
    for k in range(plan.n_slices):
        hu, lab, broken = render_slice(plan, k)
        (folder / f"{plan.slice_number(k)}.dcm").write_bytes(dicom_bytes(plan, k, hu))
        labels.append(lab)
        if plan.boxes and broken.any():
            rows, cols = np.nonzero(broken)
            boxes.append({"StudyInstanceUID": plan.uid, "x": float(cols.min()), "y": float(rows.min()),
                          "width": float(cols.max() - cols.min() + 1), "height": float(rows.max() - rows.min() + 1),
                          "slice_number": plan.slice_number(k)})
    if plan.seg:
        _write_nifti(out / "segmentations" / f"{plan.uid}.nii", np.stack(labels), plan)
    return boxes


def _prepare_out(out: Path) -> None:
    """Create `out`; clear a previous phantom there; refuse to touch data we did not write."""
    present = [n for n in _OURS if (out / n).exists()]
    if present and not (out / "_truth" / _MARKER).is_file():
        raise FileExistsError(f"{out} already holds {present} not written by this phantom; choose an empty folder")
    for n in present:
        shutil.rmtree(out / n) if (out / n).is_dir() else (out / n).unlink()
    for sub in ("train_images", "test_images", "segmentations", "_truth"):
        (out / sub).mkdir(parents=True)


def _csv(path: Path, frame: pd.DataFrame) -> None:
    atomic_write_text(path, frame.to_csv(index=False, lineterminator="\n"))


def label_table(plans: Sequence[StudyPlan]) -> pd.DataFrame:
    """train.csv format: StudyInstanceUID, patient_overall, C1..C7 (overall = any vertebra)."""
    rows = [{"StudyInstanceUID": p.uid, "patient_overall": int(any(p.fractured.values())), **p.fractured}
            for p in plans]
    return pd.DataFrame(rows, columns=["StudyInstanceUID", "patient_overall", *CERVICAL])


def _write_tables(out: Path, plans: List[StudyPlan], boxes: List[dict], ghost: str) -> None:
    train = [p for p in plans if p.split == "train"]
    test = [p for p in plans if p.split == "test"]
    _csv(out / "train.csv", label_table(train))
    _csv(out / "train_bounding_boxes.csv",
         pd.DataFrame(boxes, columns=["StudyInstanceUID", "x", "y", "width", "height", "slice_number"]))
    named = [p.uid for p in test[:-1]] + [ghost]  # the dev copy's test.csv does not match test_images
    kinds = [*CERVICAL, "patient_overall"]
    tc = pd.DataFrame([(f"{u}_{t}", u, t) for u in named for t in kinds],
                      columns=["row_id", "StudyInstanceUID", "prediction_type"])
    _csv(out / "test.csv", tc)
    _csv(out / "sample_submission.csv", pd.DataFrame({"row_id": tc["row_id"], "fractured": 0.5}))
    _csv(out / "_truth" / "test_labels.csv", label_table(test))
    _csv(out / "_truth" / "studies.csv", pd.DataFrame(
        [{"StudyInstanceUID": p.uid, "split": p.split, "n_slices": p.n_slices, "size": p.size,
          "pixel_spacing": p.pixel_spacing, "slice_spacing": p.dz, "direction": p.direction, "encoding": p.encoding,
          "syntax": p.syntax, "modality": int(p.modality), "cut": p.cut, "seg": int(p.seg), "boxes": int(p.boxes),
          "seed": p.seed} for p in plans]))
    _csv(out / "_truth" / "vertebrae.csv", pd.DataFrame(
        [{"StudyInstanceUID": p.uid, "vertebra": n, "label": NAMES.index(n) + 1, "fractured": p.fractured[n],
          "kind": p.fractures[n]["kind"] if n in p.fractures else "",
          "visible_fraction": round(p.visible_fraction(n), 4)}
         for p in plans for n in CERVICAL]))


def generate(out: PathLike, studies: int = 12, seed: int = 0, size: int = 128, slices: Tuple[int, int] = (40, 64),
             test_studies: int = 3, progress: bool = True, fracture_width: float = 1.0) -> Dict[str, object]:
    """Write the data set under `out` (layout in the module docstring); returns a summary dict (also phantom.json)."""
    if not 0.5 <= fracture_width <= 8:
        raise ValueError(f"fracture_width must be in [0.5, 8] (x about one voxel), got {fracture_width}")
    if studies < 2 or size < 32 or not 8 <= slices[0] <= slices[1] or test_studies < 1:
        raise ValueError(f"need studies >= 2, size >= 32, 8 <= slices[0] <= slices[1], test_studies >= 1; got "
                         f"studies={studies}, size={size}, slices={tuple(slices)}, test_studies={test_studies}")
    t0 = time.perf_counter()
    out = Path(out)
    _prepare_out(out)
    plans = plan_dataset(seed, studies, size, (int(slices[0]), int(slices[1])), test_studies, fracture_width)
    used = {p.uid for p in plans}
    ghost = next(f"{UID_ROOT}.{n}" for n in range(999, 0, -1) if f"{UID_ROOT}.{n}" not in used)
    boxes: List[dict] = []
    for plan in progress_bar(plans, desc="cspine phantom", unit="study", disable=not progress):
        boxes += write_study(out, plan)
    _write_tables(out, plans, boxes, ghost)
    train = label_table([p for p in plans if p.split == "train"])
    summary = {"version": VERSION, "params": {"studies": studies, "seed": seed, "size": size, "slices": list(slices),
                                              "test_studies": test_studies, "fracture_width": fracture_width},
               "train_studies": len(train), "test_studies": studies - len(train),
               "images": sum(p.n_slices for p in plans), "segmentations": sum(p.seg for p in plans),
               "box_studies": len({b["StudyInstanceUID"] for b in boxes}), "box_rows": len(boxes),
               "train_positives": {c: int(train[c].sum()) for c in ["patient_overall", *CERVICAL]},
               "ghost_test_study": ghost, "syntaxes": sorted({p.syntax for p in plans}),
               "not_produced": "JPEG Lossless (1.2.840.10008.1.2.4.70): pydicom has no encoder for it"}
    atomic_write_text(out / "_truth" / _MARKER, json.dumps(summary, indent=2, sort_keys=True) + "\n")
    summary["seconds"], summary["out"] = round(time.perf_counter() - t0, 2), str(out)
    return summary


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, object]:
    """CLI: generate the data set and print a one-line summary."""
    ap = argparse.ArgumentParser(prog="python -m lib.phantom cspine", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="output folder (Kaggle layout + _truth/)")
    ap.add_argument("--studies", type=int, default=12)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--size", type=int, default=128, help="matrix (rows = cols); the real data are 512")
    ap.add_argument("--slices", type=int, nargs=2, default=(40, 64), metavar=("MIN", "MAX"))
    ap.add_argument("--test-studies", type=int, default=3, help="studies in test_images")
    ap.add_argument("--fracture-width", type=float, default=1.0,
                    help="fracture thickness in about-one-voxel units (1: a hairline break)")
    a = ap.parse_args(argv)
    s = generate(a.out, studies=a.studies, seed=a.seed, size=a.size, slices=tuple(a.slices),
                 test_studies=a.test_studies, fracture_width=a.fracture_width)
    pos = " ".join(f"{k}={v}" for k, v in s["train_positives"].items())
    print(f"cspine phantom: {s['images']} images ({s['train_studies']} train / {s['test_studies']} test studies, "
          f"{s['segmentations']} masks, {s['box_rows']} box rows) in {s['seconds']:.1f}s -> {s['out']}; "
          f"train positives: {pos}")
    return s


if __name__ == "__main__":
    main()
