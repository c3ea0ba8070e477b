"""The phantom's DICOM writer: RSNA's pixel storage variants (incl. the 12-bit header bug) and one CT slice as file
bytes, with `ID_...` strings in the UID fields as in the competition files (pydicom's validation is off while
building them)."""
from __future__ import annotations

import contextlib
import io
import math
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Tuple

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileDataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from lib.tasks.ich.phantom_anatomy import Bleed, Head, Pose

#: Pixel storage variants of the RSNA files and their share of series. "bug12" is the RSNA 12-bit header bug.
ENCODINGS = {
    "bug12": 0.20,  # BitsStored 12, unsigned, intercept 0: raw = HU mod 4096 (-1000 -> 3096); needs the fix
    "u12": 0.30,  # BitsStored 12, unsigned, intercept -1024
    "s16": 0.30,  # BitsStored 16, signed, intercept -1024 (half of them: -3024 HU outside the FOV circle)
    "s16_0": 0.08,  # BitsStored 16, signed, intercept 0
    "s12_0": 0.07,  # BitsStored 12, signed, intercept 0
    "u16": 0.05,  # BitsStored 16, unsigned, intercept -1024
}


@dataclass
class StudyPlan:
    """Everything needed to render and write one study (= one series)."""

    index: int
    split: str
    patient_id: str
    study_uid: str
    series_uid: str
    image_ids: List[str]  # one per image; with dup >= 0 the last one repeats position `dup`
    z: np.ndarray  # height above the skull base (mm) per slice position, ascending
    dist: np.ndarray  # position along the slice normal (mm) per slice position
    head: Head
    pose: Pose
    enc: str
    seed: np.random.SeedSequence
    explicit: bool = False
    tilt: float = 0.0
    multi_window: bool = False
    window: Tuple[int, int] = (40, 80)
    origin: Tuple[float, float, float] = (0.0, 0.0, 0.0)
    dup: int = -1
    gap: bool = False
    fov_pad: bool = False
    corrupt: int = -1
    bleeds: List[Bleed] = field(default_factory=list)


# ----------------------------------------------------------------------------------------------- pixel encoding
def encode_hu(hu: np.ndarray, encoding: str) -> Tuple[np.ndarray, Dict[str, object]]:
    """Float HU (rows, cols) -> (raw little-endian uint16/int16 pixels, header values) for one ENCODINGS name."""
    v = np.rint(hu)
    if encoding == "bug12":  # signed data written as 12-bit unsigned: lib.io.dicom.fix_12bit undoes it
        raw, hdr = np.mod(np.clip(v, -1000, 3095), 4096).astype("<u2"), (12, 0, "0")
    elif encoding == "u12":
        raw, hdr = np.clip(v + 1024, 0, 4095).astype("<u2"), (12, 0, "-1024")
    elif encoding == "s16":
        raw, hdr = np.clip(v + 1024, -32768, 32767).astype("<i2"), (16, 1, "-1024")
    elif encoding == "s16_0":
        raw, hdr = np.clip(v, -32768, 32767).astype("<i2"), (16, 1, "0")
    elif encoding == "s12_0":
        raw, hdr = np.clip(v, -2048, 2047).astype("<i2"), (12, 1, "0")
    elif encoding == "u16":
        raw, hdr = np.clip(v + 1024, 0, 65535).astype("<u2"), (16, 0, "-1024")
    else:
        raise ValueError(f"unknown pixel encoding {encoding!r}; expected one of {sorted(ENCODINGS)}")
    return raw, {"BitsStored": hdr[0], "PixelRepresentation": hdr[1], "RescaleIntercept": hdr[2]}


@contextlib.contextmanager
def _no_validation() -> Iterator[None]:
    """RSNA puts `ID_...` strings in UI fields: switch pydicom's value validation off while building and writing
    a file (pydicom validates values on assignment with the *reading* mode, on dcmwrite with the writing mode)."""
    settings = pydicom.config.settings
    old = settings.reading_validation_mode, settings.writing_validation_mode
    settings.reading_validation_mode = settings.writing_validation_mode = pydicom.config.IGNORE
    try:
        yield
    finally:
        settings.reading_validation_mode, settings.writing_validation_mode = old


def _ds(v: float, digits: int = 4) -> str:
    """A number as a DICOM DS string (<= 16 chars)."""
    s = f"{v:.{digits}f}".rstrip("0").rstrip(".")
    return "0" if s in ("", "-0") else s


def dicom_bytes(plan: StudyPlan, image_id: str, dist: float, raw: np.ndarray, hdr: Dict[str, object],
                media_uid: str) -> bytes:
    """One RSNA-style CT slice as DICOM file bytes (PixelData is the last element)."""
    with _no_validation():
        return _dicom_bytes(plan, image_id, dist, raw, hdr, media_uid)


def _dicom_bytes(plan: StudyPlan, image_id: str, dist: float, raw: np.ndarray, hdr: Dict[str, object],
                 media_uid: str) -> bytes:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = media_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian if plan.explicit else ImplicitVRLittleEndian
    meta.ImplementationClassUID = "1.2.3.4"
    meta.ImplementationVersionName = "RSNA Challenge 2019"
    ds = FileDataset("", Dataset(), file_meta=meta, preamble=b"\0" * 128)
    t = math.radians(plan.tilt)
    normal = (0.0, math.sin(t), math.cos(t))
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = image_id
    ds.Modality = "CT"
    ds.PatientID = plan.patient_id
    ds.StudyInstanceUID = plan.study_uid
    ds.SeriesInstanceUID = plan.series_uid
    ds.StudyID = ""
    ds.ImagePositionPatient = [_ds(o + dist * n) for o, n in zip(plan.origin, normal)]
    ds.ImageOrientationPatient = ["1", "0", "0", "0", _ds(math.cos(t), 6), _ds(-math.sin(t), 6)]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = raw.shape
    ds.PixelSpacing = [f"{plan.pose.ps:.8g}"] * 2
    ds.BitsAllocated = 16
    ds.BitsStored = hdr["BitsStored"]
    ds.HighBit = int(hdr["BitsStored"]) - 1
    ds.PixelRepresentation = hdr["PixelRepresentation"]
    center, width = plan.window
    if plan.multi_window:
        ds.WindowCenter, ds.WindowWidth = [f"{center:05d}"] * 2, [f"{width:05d}"] * 2
    else:
        ds.WindowCenter, ds.WindowWidth = str(center), str(width)
    ds.RescaleIntercept = hdr["RescaleIntercept"]
    ds.RescaleSlope = "1"
    ds.PixelData = raw.tobytes()
    buf = io.BytesIO()
    pydicom.dcmwrite(buf, ds, enforce_file_format=True)
    return buf.getvalue()
