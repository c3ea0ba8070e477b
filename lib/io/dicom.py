"""DICOM ingest: HU conversion with the RSNA header fixes.

`read_hu` is the one place pixels become Hounsfield units. The header index (`index`) and slice order
(`order_slices`) live in `lib.io.dicom_index`, which builds on this module.

Decoding: uncompressed data needs only numpy; JPEG Lossless / JPEG-LS / JPEG 2000 need the pylibjpeg plugins
(`pylibjpeg-libjpeg`, `pylibjpeg-openjpeg`), RLE has pydicom's own decoder. JPEG 2000 streams whose signedness
disagrees with PixelRepresentation (pydicom issue #1149, `J2K_pixelrep_mismatch.dcm`) are re-signed by pydicom 3's
default processing ("JPEG-LS or JPEG 2000 encoded data whose signedness doesn't match the expected pixel
representation will be converted to match"); we rely on that and a real-data test pins it.
"""
from __future__ import annotations

import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional, Union

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError

PathLike = Union[str, Path]

HU_MIN, HU_MAX = -1024.0, 3071.0



@contextmanager
def lenient_reading() -> Iterator[None]:
    """pydicom's value validation off inside the block, the caller's settings restored after it.

    RSNA files carry `ID_...` strings in UI fields: expected, not worth a warning per file. pydicom converts values
    lazily, so values read from a dataset after the block validate under the caller's settings again.
    """
    with pydicom.config.disable_value_validation():
        yield


class DicomError(ValueError):
    """A file that is not a usable CT slice (not DICOM, truncated, no pixels, colour screenshot, ...)."""


def _first(value: object, default: float) -> float:
    """First value of a possibly multi-valued DICOM number (`['00036', '00036']` -> 36.0)."""
    if value is None or value == "":
        return default
    if isinstance(value, (list, tuple, pydicom.multival.MultiValue)):
        value = value[0] if len(value) else default
    try:
        return float(value)
    except (TypeError, ValueError):
        return default


def needs_12bit_fix(bits_stored: int, pixel_representation: int, intercept: float) -> bool:
    """The RSNA header bug: 12-bit unsigned storage of signed data with intercept > -100.

    Such files store raw values that wrap around 4096 under their near-zero intercept; `fix_12bit` repairs them.
    """
    return int(bits_stored) == 12 and int(pixel_representation) == 0 and float(intercept) > -100


def fix_12bit(raw: np.ndarray) -> tuple:
    """Jeremy Howard's `fix_pxrepr`: raw + 1000, values >= 4096 lose 4096, intercept becomes -1000.

    Returns (fixed raw as int32, new intercept).
    """
    px = raw.astype(np.int32) + 1000
    px[px >= 4096] -= 4096
    return px, -1000.0


def pixel_bytes(rows: int, columns: int, samples: int, frames: int, bits_allocated: int) -> int:
    """Bytes of uncompressed PixelData for the given geometry (bits rounded up to whole bytes)."""
    return (int(rows) * int(columns) * int(samples) * int(frames) * int(bits_allocated) + 7) // 8


def expected_pixel_bytes(ds: pydicom.Dataset) -> int:
    """Bytes of uncompressed PixelData implied by Rows x Columns x SamplesPerPixel x frames x BitsAllocated."""
    return pixel_bytes(ds.Rows, ds.Columns, getattr(ds, "SamplesPerPixel", 1) or 1,
                       getattr(ds, "NumberOfFrames", 1) or 1, ds.BitsAllocated)


def greyscale_problem(samples_per_pixel: int, photometric: str, bits_allocated: int, frames: int) -> Optional[str]:
    """Why these header values do not describe one greyscale 16-bit CT slice, or None if they do."""
    photometric = str(photometric).upper()
    if int(samples_per_pixel) != 1 or not photometric.startswith("MONOCHROME"):
        return (f"{photometric} with {samples_per_pixel} samples per pixel is a colour rendering, not CT "
                "attenuation data; HU cannot be computed from it")
    if int(bits_allocated) == 8:
        return "8-bit pixels are a screenshot-style rendering, not CT attenuation data"
    if int(frames) != 1:
        return f"multi-frame object with {frames} frames; expected a single 2-D slice"
    return None


def check_greyscale_slice(ds: pydicom.Dataset, source: str = "<dataset>") -> None:
    """Header-only check that `ds` describes one greyscale 16-bit CT slice; raises DicomError naming why not.

    The header index applies the same rule (`greyscale_problem`), so a file rejected here never reaches the cache.
    """
    reason = greyscale_problem(int(getattr(ds, "SamplesPerPixel", 1) or 1),
                               str(getattr(ds, "PhotometricInterpretation", "MONOCHROME2")),
                               int(getattr(ds, "BitsAllocated", 16) or 16), int(getattr(ds, "NumberOfFrames", 1) or 1))
    if reason:
        raise DicomError(f"{source}: {reason}")


def _check_native_length(ds: pydicom.Dataset, source: str) -> None:
    """Uncompressed PixelData shorter than Rows x Columns x BitsAllocated/8 means a truncated file."""
    tsyntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    if tsyntax is not None and tsyntax.is_encapsulated:
        return
    have, need = len(ds.PixelData), expected_pixel_bytes(ds)
    if have < need:
        raise DicomError(f"{source}: truncated file: PixelData holds {have} bytes, {ds.Rows}x{ds.Columns} "
                         f"pixels at {ds.BitsAllocated} bits need {need}")


def dataset_to_hu(ds: pydicom.Dataset, source: str = "<dataset>") -> np.ndarray:
    """Decoded dataset -> float32 HU (rows, cols), clipped to [-1024, 3071] (header values read leniently).

    A missing RescaleIntercept is taken as 0 and a missing RescaleSlope as 1 (pydicom's and the DICOM default);
    the header index (`lib.io.dicom_index.index`) lists files without RescaleIntercept as bad instead.
    MONOCHROME1 slices are mirrored about the mid-range of the slice (`max + min - hu`).
    """
    with lenient_reading():
        return _dataset_to_hu(ds, source)


def _dataset_to_hu(ds: pydicom.Dataset, source: str) -> np.ndarray:
    if "PixelData" not in ds:
        raise DicomError(f"{source}: no PixelData element (not an image, or the file is truncated)")
    check_greyscale_slice(ds, source)
    _check_native_length(ds, source)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            raw = ds.pixel_array
    except Exception as exc:  # pydicom/plugins raise many types for broken or undecodable pixel data
        raise DicomError(f"{source}: pixel data cannot be decoded ({type(exc).__name__}: {exc})") from exc
    if raw.ndim != 2:
        raise DicomError(f"{source}: expected a single 2-D slice, got pixel array of shape {raw.shape}")
    slope = _first(getattr(ds, "RescaleSlope", 1.0), 1.0)
    intercept = _first(getattr(ds, "RescaleIntercept", 0.0), 0.0)
    bits = int(getattr(ds, "BitsStored", 16) or 16)
    pxrep = int(getattr(ds, "PixelRepresentation", 0) or 0)
    if needs_12bit_fix(bits, pxrep, intercept):
        raw, intercept = fix_12bit(raw)
    hu = raw.astype(np.float32) * np.float32(slope) + np.float32(intercept)
    photometric = str(getattr(ds, "PhotometricInterpretation", "MONOCHROME2")).upper()
    if photometric == "MONOCHROME1":  # inverted greyscale: high stored values are dark
        hu = np.float32(hu.max() + hu.min()) - hu
    return np.clip(hu, HU_MIN, HU_MAX, out=hu)


def read_dataset(path: PathLike, stop_before_pixels: bool = False) -> pydicom.Dataset:
    """`pydicom.dcmread` with a DicomError naming the file and the kind of failure (not DICOM, truncated, ...).

    FileNotFoundError is passed through unchanged. The read runs under `lenient_reading`; values accessed later
    validate under the caller's pydicom settings (wrap the access in `lenient_reading()` to keep RSNA UIDs quiet).
    """
    path = Path(path)
    try:
        with warnings.catch_warnings(record=True) as caught, lenient_reading():
            warnings.simplefilter("always")
            ds = pydicom.dcmread(path, stop_before_pixels=stop_before_pixels)
    except FileNotFoundError:
        raise
    except Exception as exc:
        raise DicomError(f"{path}: {describe_read_error(exc, path)}") from exc
    # pydicom only warns (and drops the element) when the file ends inside compressed PixelData
    eof = [str(w.message) for w in caught if "end of file" in str(w.message).lower()]
    if eof:
        raise DicomError(f"{path}: truncated file ({eof[0]})")
    return ds


def describe_read_error(exc: BaseException, path: PathLike) -> str:
    """Human reason for a `dcmread` failure: 'empty file', 'not a DICOM file (...)', 'truncated file (...)'."""
    detail = f"{type(exc).__name__}: {exc}"
    if isinstance(exc, InvalidDicomError):
        try:
            if Path(path).stat().st_size == 0:
                return "empty file (0 bytes)"
        except OSError:
            pass
        return "not a DICOM file (no 'DICM' prefix or file meta header)"
    if isinstance(exc, EOFError) or "end of file" in str(exc).lower():
        return f"truncated file: ends inside a header element ({detail})"
    if isinstance(exc, OSError):
        return f"file cannot be read ({detail})"
    return f"not a readable DICOM file ({detail})"


def read_hu(path: PathLike) -> np.ndarray:
    """Read one CT slice -> float32 HU array (rows, cols) in [-1024, 3071].

    Applies slope/intercept, the RSNA 12-bit intercept fix, MONOCHROME1 inversion and clipping; rejects
    colour / 8-bit renderings, multi-frame objects and truncated files with a DicomError naming the file.
    """
    return dataset_to_hu(read_dataset(path), source=str(path))



def read_hu_or_none(path: PathLike) -> Optional[np.ndarray]:
    """`read_hu`, or None for a file that cannot be decoded (DicomError, missing): for views and samples that
    skip bad files rather than stop (the cache build lists them with the reason)."""
    try:
        return read_hu(path)
    except (DicomError, FileNotFoundError):
        return None
