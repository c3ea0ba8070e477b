"""Header index of a DICOM folder (one parallel header pass, no pixel decoding) and slice order along the normal.

`index(dir)` -> one row per usable file (schema `INDEX_COLUMNS` + `ORDER_COLUMNS`, in that column order);
files that cannot be used are listed with a human reason in `df.attrs["bad_files"]` (list of
`{"path", "reason"}` dicts; `bad_files_table(df)` gives them as a DataFrame) and in the bad-files CSV.
"""
from __future__ import annotations

import math
import os
import struct
import warnings
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import BinaryIO, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import numpy as np
import pandas as pd
import pydicom
from pydicom.dataelem import RawDataElement
from lib.progress import progress_bar

from lib.io.dicom import (DicomError, PathLike, describe_read_error, greyscale_problem, lenient_reading,
                          pixel_bytes)
from lib.io.ids import SAFE_ID, id_problem
from lib.paths import atomic_write

#: Columns written by the header pass, in order, with their pandas dtypes ("str" = pandas' default string dtype).
INDEX_COLUMNS: Dict[str, str] = {
    "image_id": "str", "patient_id": "str", "study_uid": "str", "series_uid": "str",
    "ipp_x": "float64", "ipp_y": "float64", "ipp_z": "float64",
    **{f"iop_{i}": "float64" for i in range(6)},
    "pos_normal": "float64", "pixel_spacing_row": "float64", "pixel_spacing_col": "float64",
    "rows": "int64", "columns": "int64", "bits_stored": "int64", "pixel_representation": "int64",
    "slope": "float64", "intercept": "float64", "window_center": "float64", "window_width": "float64",
    "photometric": "str", "transfer_syntax": "str", "path": "str",
}
#: Columns added by `order_slices`.
ORDER_COLUMNS: Dict[str, str] = {
    "slice_idx": "int64", "n_slices": "int64", "rel_pos": "float64", "spacing_prev": "float64",
    "spacing_next": "float64",
}
BAD_COLUMNS = ("path", "reason")
#: ID columns -> their DICOM keyword; the first two are required, the others may be empty.
ID_COLUMNS = {"image_id": "SOPInstanceUID", "series_uid": "SeriesInstanceUID", "study_uid": "StudyInstanceUID",
              "patient_id": "PatientID"}

#: Without these a file cannot be placed in a series or converted to HU: the index lists it as bad.
REQUIRED = ("SOPInstanceUID", "SeriesInstanceUID", "ImagePositionPatient", "ImageOrientationPatient",
            "RescaleIntercept", "Rows", "Columns", "BitsAllocated")
_SEQ_DELIMITER = b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"  # (FFFE,E0DD) length 0, little endian
_LONG_VRS = {b"OB", b"OW", b"OF", b"OD", b"OL", b"OV", b"UN", b"UT", b"UC", b"UR", b"SQ", b"SV", b"UV"}
_ASCII_VRS = (None, "DS", "IS", "UI", "CS")  # None = implicit VR: our tags' dictionary VRs are these (or US)
_POS_DECIMALS = 4  # positions / spacings are compared at 0.1 um: float noise must not reorder duplicates


class _Header:
    """Read-only view of the header values we index, parsed straight from pydicom's raw elements.

    pydicom's per-element value conversion is ~2/3 of the header-pass time; DS/IS/UI/CS values are plain
    ASCII and US values one uint16, so they are parsed here (2.2x faster), with pydicom's conversion as the
    fallback for anything else (already converted elements, unexpected explicit VRs).
    """

    def __init__(self, ds: pydicom.Dataset) -> None:
        self.ds = ds

    def _elem(self, keyword: str) -> Optional[Union[RawDataElement, pydicom.DataElement]]:
        return self.ds.get_item(pydicom.datadict.tag_for_keyword(keyword), keep_deferred=True)

    def _converted(self, keyword: str) -> list:
        value = self.ds[pydicom.datadict.tag_for_keyword(keyword)].value
        if value is None or value == "" or value == b"":
            return []
        return list(value) if isinstance(value, (list, tuple, pydicom.multival.MultiValue)) else [value]

    def present(self, keyword: str) -> bool:
        elem = self._elem(keyword)
        return elem is not None and elem.value is not None and len(elem.value) > 0

    def strings(self, keyword: str) -> List[str]:
        """Values of a text element (DS, IS, UI, CS) as stripped strings; [] if absent or empty."""
        elem = self._elem(keyword)
        if elem is None:
            return []
        if isinstance(elem, RawDataElement) and elem.VR in _ASCII_VRS and elem.value is not None:
            text = elem.value.decode("latin-1").strip(" \x00")
            return [v.strip(" \x00") for v in text.split("\\")] if text else []
        return [str(v) for v in self._converted(keyword)]

    def text(self, keyword: str) -> str:
        return "\\".join(self.strings(keyword))

    def number(self, keyword: str, default: float = math.nan) -> float:
        """First value as float (multi-valued windows -> first); `default` if absent or not a number."""
        values = self.strings(keyword)
        return _to_float(values[0]) if values else default

    def us(self, keyword: str, default: int = 0) -> int:
        """An unsigned-short (US) element as int; `default` if absent."""
        elem = self._elem(keyword)
        if elem is None:
            return default
        if isinstance(elem, RawDataElement) and elem.VR in (None, "US") and elem.value and len(elem.value) == 2:
            return struct.unpack("<H" if elem.is_little_endian else ">H", elem.value)[0]
        values = self._converted(keyword)
        return int(values[0]) if values else default


def _to_float(value: str) -> float:
    try:
        return float(value)
    except ValueError:
        return math.nan


def _floats(hdr: _Header, keyword: str, n: int, source: str) -> List[float]:
    """`n` finite floats from a multi-valued DS element, or DicomError naming the element."""
    values = hdr.strings(keyword)
    out = [_to_float(v) for v in values]
    if len(out) != n or not all(math.isfinite(v) for v in out):
        raise DicomError(f"{source}: {keyword} must hold {n} numbers, got {values!r}")
    return out


def _unit_normal(iop: Sequence[float], source: str) -> Tuple[float, float, float]:
    """Unit slice normal = row direction x column direction."""
    (a1, a2, a3), (b1, b2, b3) = iop[:3], iop[3:]
    n = (a2 * b3 - a3 * b2, a3 * b1 - a1 * b3, a1 * b2 - a2 * b1)
    norm = math.sqrt(sum(v * v for v in n))
    if norm < 1e-6:
        raise DicomError(f"{source}: ImageOrientationPatient {list(iop)} has parallel row/column directions")
    return n[0] / norm, n[1] / norm, n[2] / norm


def _pixel_element(fp: BinaryIO, ds: pydicom.Dataset, source: str) -> Tuple[int, int, int]:
    """(declared PixelData length, offset of its value, file size), read from the element header at fp.

    fp is positioned at PixelData after a `stop_before_pixels` pass; a file without it is reported as truncated.
    Deflated files are inflated in memory by pydicom (offsets mean nothing): returns (-1, 0, 0), i.e. unchecked.
    """
    tsyntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    if tsyntax is not None and tsyntax.is_deflated:
        return -1, 0, 0
    start, size = fp.tell(), os.fstat(fp.fileno()).st_size
    head = fp.read(12)
    if len(head) < 8:
        raise DicomError(f"{source}: no PixelData element (file ends after {start} bytes of header; truncated?)")
    implicit, little = ds.original_encoding
    endian = ">" if little is False else "<"
    group, elem = struct.unpack(endian + "HH", head[:4])
    if (group, elem) != (0x7FE0, 0x0010):
        raise DicomError(f"{source}: expected PixelData (7FE0,0010), found ({group:04X},{elem:04X}); "
                         "float / double pixel data is not CT HU")
    if implicit is not False:
        return struct.unpack(endian + "I", head[4:8])[0], start + 8, size
    if head[4:6] in _LONG_VRS and len(head) == 12:
        return struct.unpack(endian + "I", head[8:12])[0], start + 12, size
    return struct.unpack(endian + "H", head[6:8])[0], start + 8, size


def _check_pixel_length(fp: BinaryIO, element: Tuple[int, int, int], expected: int, source: str) -> None:
    """Cheap truncation check without reading the pixels.

    Uncompressed: declared length >= `expected` (Rows*Columns*BitsAllocated/8) and the value fits in the file.
    Encapsulated (compressed, undefined length): the file's last KiB holds the sequence delimiter (FFFE,E0DD).
    """
    length, value_start, size = element
    if length < 0:
        return
    if length == 0xFFFFFFFF:
        fp.seek(max(value_start, size - 1024))
        if _SEQ_DELIMITER not in fp.read():
            raise DicomError(f"{source}: truncated file: compressed PixelData has no end-of-sequence delimiter")
        return
    if length < expected:
        raise DicomError(f"{source}: PixelData holds {length} bytes but Rows x Columns x BitsAllocated need "
                         f"{expected} (truncated pixel data or wrong image size in the header)")
    if value_start + length > size:
        raise DicomError(f"{source}: truncated file: PixelData declares {length} bytes but only "
                         f"{max(size - value_start, 0)} remain")


def _header_row(hdr: _Header, path: str) -> Tuple[tuple, int]:
    """Header -> (one index row in INDEX_COLUMNS order, expected uncompressed PixelData bytes)."""
    missing = [k for k in REQUIRED if not hdr.present(k)]
    if missing:
        raise DicomError(f"{path}: missing {', '.join(missing)}")
    ipp = _floats(hdr, "ImagePositionPatient", 3, path)
    iop = _floats(hdr, "ImageOrientationPatient", 6, path)
    normal = _unit_normal(iop, path)
    intercept = hdr.number("RescaleIntercept")
    if not math.isfinite(intercept):
        raise DicomError(f"{path}: RescaleIntercept must be a number, got {hdr.strings('RescaleIntercept')!r}")
    rows, cols, bits = hdr.us("Rows"), hdr.us("Columns"), hdr.us("BitsAllocated")
    spp, frames = hdr.us("SamplesPerPixel", 1), hdr.number("NumberOfFrames", 1.0)
    frames = int(frames) if math.isfinite(frames) else 1
    photometric = hdr.text("PhotometricInterpretation")
    reason = greyscale_problem(spp, photometric or "MONOCHROME2", bits, frames)
    if reason:
        raise DicomError(f"{path}: {reason}")
    spacing = hdr.strings("PixelSpacing")
    spacing = [_to_float(v) for v in spacing] if len(spacing) == 2 else [math.nan, math.nan]
    tsyntax = getattr(getattr(hdr.ds, "file_meta", None), "TransferSyntaxUID", None)
    row = (
        hdr.text("SOPInstanceUID"), str(hdr.ds.get("PatientID", "") or ""), hdr.text("StudyInstanceUID"),
        hdr.text("SeriesInstanceUID"), *ipp, *iop, sum(p * n for p, n in zip(ipp, normal)), *spacing,
        rows, cols, hdr.us("BitsStored", bits), hdr.us("PixelRepresentation", 0),
        hdr.number("RescaleSlope", 1.0), intercept, hdr.number("WindowCenter"), hdr.number("WindowWidth"),
        photometric, str(tsyntax or ""), path,
    )
    return row, pixel_bytes(rows, cols, spp, frames, bits)


def header_record(path: PathLike) -> tuple:
    """Read one file's header (no pixel decoding) -> tuple in INDEX_COLUMNS order, or DicomError with the reason."""
    path = os.path.abspath(path)
    try:
        with open(path, "rb") as fp, lenient_reading():
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ds = pydicom.dcmread(fp, stop_before_pixels=True)
            element = _pixel_element(fp, ds, path)
            row, expected = _header_row(_Header(ds), path)
            _check_pixel_length(fp, element, expected, path)
    except DicomError:
        raise
    except FileNotFoundError as exc:
        raise DicomError(f"{path}: file not found") from exc
    except Exception as exc:  # pydicom raises many types for broken files; one bad file must not stop a run
        raise DicomError(f"{path}: {describe_read_error(exc, path)}") from exc
    return row


def _scan(paths: Sequence[str]) -> Tuple[List[tuple], List[Tuple[str, str]]]:
    """Worker: header rows of the good files and (path, reason) of the bad ones."""
    rows, bad = [], []
    for path in paths:
        try:
            rows.append(header_record(path))
        except Exception as exc:  # noqa: BLE001 - recorded, never raised
            reason = str(exc)
            bad.append((path, reason[len(path) + 2:] if reason.startswith(path + ": ") else reason))
    return rows, bad


def list_dicom_files(paths_or_dir: Union[PathLike, Iterable[PathLike]]) -> List[str]:
    """A directory -> its `*.dcm` files (recursive, any case), sorted absolute paths; a list -> absolute paths."""
    if isinstance(paths_or_dir, (str, os.PathLike)):
        root = Path(paths_or_dir)
        if not root.is_dir():
            raise FileNotFoundError(f"DICOM directory not found: {root} (pass a directory or a list of files)")
        files = [os.path.join(d, f) for d, _, names in os.walk(root) for f in names if f.lower().endswith(".dcm")]
        if not files:
            raise FileNotFoundError(f"no *.dcm files under {root}")
    else:
        files = [str(p) for p in paths_or_dir]
    return sorted(os.path.abspath(f) for f in files)


def _scan_all(files: List[str], workers: Optional[int], progress: bool,
              chunksize: Optional[int]) -> Tuple[List[tuple], List[Tuple[str, str]]]:
    workers = (os.cpu_count() or 1) if workers is None else max(1, int(workers))
    chunksize = chunksize or max(1, min(512, math.ceil(len(files) / (workers * 8))))
    chunks = [files[i:i + chunksize] for i in range(0, len(files), chunksize)]
    rows, bad = [], []
    with progress_bar(total=len(files), desc="DICOM headers", unit="file", disable=not progress) as bar:
        def collect(result: Tuple[List[tuple], List[Tuple[str, str]]], n: int) -> None:
            rows.extend(result[0])
            bad.extend(result[1])
            bar.update(n)
            bar.set_postfix(bad=len(bad), refresh=False)
        if workers == 1 or len(chunks) <= 1:
            for chunk in chunks:
                collect(_scan(chunk), len(chunk))
        else:
            with ProcessPoolExecutor(max_workers=min(workers, len(chunks))) as pool:
                for chunk, result in zip(chunks, pool.map(_scan, chunks)):
                    collect(result, len(chunk))
    return rows, bad


def _drop_bad_ids(df: pd.DataFrame, pattern: Optional[str]) -> Tuple[pd.DataFrame, List[Tuple[str, str]]]:
    """Rows whose header IDs are unsafe or miss the task's `pattern` (`lib.io.ids`) -> bad files with the reason.

    Checked here, once, because the IDs become file names (the cache) and keys of every later table.
    """
    bad_mask = np.zeros(len(df), dtype=bool)
    reasons: Dict[int, str] = {}
    for col, keyword in ID_COLUMNS.items():
        s = df[col].astype(str)
        ok = s.str.fullmatch(SAFE_ID) & ~s.str.contains("..", regex=False)
        if pattern is not None:
            ok &= s.str.fullmatch(pattern)
        if col in ("study_uid", "patient_id"):
            ok |= s.eq("")
        ok = ok.fillna(False).to_numpy(dtype=bool)
        for i in np.flatnonzero(~ok & ~bad_mask):
            reasons[int(i)] = str(id_problem(s.iloc[i], pattern, keyword))
        bad_mask |= ~ok
    if not bad_mask.any():
        return df, []
    paths = df["path"].to_numpy()
    return df.loc[~bad_mask], [(str(paths[i]), reasons[i]) for i in sorted(reasons)]


def _drop_duplicate_ids(df: pd.DataFrame) -> Tuple[pd.DataFrame, List[Tuple[str, str]]]:
    """Keep the first file (by path) of each SOPInstanceUID; list the others as bad."""
    df = df.sort_values("path", kind="stable")
    dup = df["image_id"].duplicated(keep="first").to_numpy()
    if not dup.any():
        return df, []
    first = df.loc[~dup].set_index("image_id")["path"]
    bad = [(p, f"duplicate SOPInstanceUID {i}: already indexed from {first[i]}")
           for i, p in zip(df.loc[dup, "image_id"], df.loc[dup, "path"])]
    return df.loc[~dup], bad


def file_identity(files: Sequence[str]) -> pd.DataFrame:
    """(path, size, mtime_ns) of each file: what "unchanged" means for the index and the caches built from it."""
    recs = []
    for f in files:
        try:
            st = os.stat(f)
            recs.append((f, int(st.st_size), int(st.st_mtime_ns)))
        except OSError:
            recs.append((f, -1, -1))
    return pd.DataFrame.from_records(recs, columns=["path", "size", "mtime_ns"]).astype(
        {"path": "str", "size": "int64", "mtime_ns": "int64"})


def _files_path(out: Path) -> Path:
    return out.with_name(f"{out.stem}.files.parquet")


def _reusable(out: Path, bad_out: Path, ident: pd.DataFrame) -> Tuple[List[tuple], List[Tuple[str, str]], set]:
    """Header rows and scan failures of a previous `index(out=...)` for the files whose identity is unchanged.

    Only what the header pass itself produced is reused (rows; unreadable-file reasons); ID and duplicate checks
    are redone over the whole set. Anything missing or unreadable -> nothing reused.
    """
    try:
        prev = pd.read_parquet(_files_path(out))
        old = pd.read_parquet(out)
        old_bad = pd.read_csv(bad_out, dtype=str, keep_default_na=False) if bad_out.exists() else None
    except Exception:  # noqa: BLE001 - a damaged previous index is simply rebuilt
        return [], [], set()
    same = ident.merge(prev, on=["path", "size", "mtime_ns"], how="inner")
    rows_ok = set(same.loc[same["state"] == "row", "path"])
    bad_ok = set(same.loc[same["state"] == "bad", "path"])
    old = old[old["path"].isin(rows_ok)]
    rows = list(old[list(INDEX_COLUMNS)].astype(INDEX_COLUMNS).itertuples(index=False, name=None))
    bad: List[Tuple[str, str]] = []
    if old_bad is not None and bad_ok:
        hit = old_bad[old_bad["path"].isin(bad_ok)].drop_duplicates("path")
        bad = list(zip(hit["path"], hit["reason"]))
    done = set(old["path"]) | {p for p, _ in bad}
    return rows, bad, done


def index(paths_or_dir: Union[PathLike, Iterable[PathLike]], out: Optional[PathLike] = None,
          bad_out: Optional[PathLike] = None, workers: Optional[int] = None, progress: bool = True,
          chunksize: Optional[int] = None, id_pattern: Optional[str] = None, reuse: bool = False) -> pd.DataFrame:
    """One header pass over DICOM files -> ordered index (INDEX_COLUMNS + ORDER_COLUMNS), one row per usable file.

    paths_or_dir: a directory (all `*.dcm` below it) or an explicit list of files. Reads headers only
    (`stop_before_pixels`), in `workers` processes (default os.cpu_count(); 1 = in this process).
    Files that are not DICOM, truncated, colour/8-bit renderings, or lack SOPInstanceUID / SeriesInstanceUID /
    ImagePositionPatient / ImageOrientationPatient / RescaleIntercept / Rows / Columns / PixelData, every
    repeat of a SOPInstanceUID after the first path, and files whose SOP / series / study / patient IDs are unsafe
    or miss `id_pattern` (the task's, see `lib.io.ids`; unsafe IDs are refused without one), go to
    `df.attrs["bad_files"]` (list of {"path", "reason"}; see `bad_files_table`). Rows are sorted by series_uid,
    slice_idx.
    out: parquet path to save (without attrs), with `<stem>.files.parquet` beside it: each file's identity
    (size, mtime_ns) at the time it was read. bad_out: CSV (path, reason), default `<out dir>/bad_files_<stem>.csv`.
    reuse: with `out`, re-read only files that are new or whose size or mtime changed since the saved index; the
    rest is taken from it (a repaired file is re-read; an unchanged folder reads no header at all).
    """
    files = list_dicom_files(paths_or_dir)
    ident = file_identity(files)
    out = Path(out) if out is not None else None
    bad_path = (Path(bad_out) if bad_out is not None else
                out.with_name(f"bad_files_{out.stem}.csv") if out is not None else None)
    old_rows: List[tuple] = []
    old_bad: List[Tuple[str, str]] = []
    done: set = set()
    if reuse and out is not None and out.exists():
        old_rows, old_bad, done = _reusable(out, bad_path, ident)
    todo = [f for f in files if f not in done]
    if reuse and out is not None and progress and done:
        print(f"header index {out.name}: {len(done)} files unchanged, reading {len(todo)}")
    rows, bad = _scan_all(todo, workers, progress, chunksize) if todo else ([], [])
    scanned_bad = {p for p, _ in bad} | {p for p, _ in old_bad}
    rows, bad = old_rows + rows, old_bad + bad
    df = pd.DataFrame.from_records(rows, columns=list(INDEX_COLUMNS)).astype(INDEX_COLUMNS)
    df, id_bad = _drop_bad_ids(df, id_pattern)
    df, dup_bad = _drop_duplicate_ids(df)
    df = order_slices(df)
    bad_df = pd.DataFrame(bad + id_bad + dup_bad, columns=list(BAD_COLUMNS)).astype("str")
    bad_df = bad_df.sort_values("path", kind="stable").reset_index(drop=True)
    if out is not None:
        state = np.where(ident["path"].isin(set(df["path"])), "row",
                         np.where(ident["path"].isin(scanned_bad), "bad", "derived"))
        _save(df, out, bad_path, bad_df, ident.assign(state=state))
    elif bad_path is not None:
        _save(None, None, bad_path, bad_df)
    df.attrs["bad_files"] = bad_df.to_dict("records")
    return df


def bad_files_table(df: pd.DataFrame) -> pd.DataFrame:
    """`df.attrs["bad_files"]` of an `index` result as a DataFrame (path, reason); empty if none."""
    return pd.DataFrame(df.attrs.get("bad_files", []), columns=list(BAD_COLUMNS)).astype("str")


def _save(df: Optional[pd.DataFrame], out: Optional[Path], bad_out: Path, bad_df: pd.DataFrame,
          files: Optional[pd.DataFrame] = None) -> None:
    """Write parquet and CSV via a temp file + rename, so a crash never leaves a half-written index.

    The file identities go last: an index interrupted before them is not trusted by the next `reuse`.
    """
    targets = [(bad_out, lambda p: bad_df.to_csv(p, index=False))]
    if df is not None and out is not None:
        targets.append((out, lambda p: df.to_parquet(p, index=False)))
        if files is not None:
            _files_path(out).unlink(missing_ok=True)
            targets.append((_files_path(out), lambda p: files.to_parquet(p, index=False)))
    for path, write in targets:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, write)


def order_slices(df: pd.DataFrame, series_key: str = "series_uid") -> pd.DataFrame:
    """Order slices inside each series along the slice normal; vectorised (no per-series Python loop).

    Sort key: (series_key, pos_normal rounded to 1e-4 mm, image_id), so duplicate positions are ordered by
    image_id. Adds (replacing any existing) slice_idx 0..n-1, n_slices, rel_pos = slice_idx/(n-1) (0 if n==1),
    spacing_prev / spacing_next = mm along the normal to the previous / next slice (0 at the ends and for
    duplicate positions). NaN pos_normal sorts last. Returns a new frame sorted by (series_key, slice_idx),
    index reset.
    """
    missing = {series_key, "pos_normal", "image_id"} - set(df.columns)
    if missing:
        raise KeyError(f"order_slices needs columns {sorted(missing)}; got {list(df.columns)}")
    out = df.drop(columns=[c for c in ORDER_COLUMNS if c in df.columns])
    out = out.assign(_key=out["pos_normal"].astype("float64").round(_POS_DECIMALS))
    out = out.sort_values([series_key, "_key", "image_id"], kind="mergesort").reset_index(drop=True)
    series = out[series_key].to_numpy()
    key = out.pop("_key").to_numpy()
    same_prev = np.zeros(len(out), dtype=bool)
    same_prev[1:] = series[1:] == series[:-1]
    gap = np.zeros(len(out))
    gap[1:] = np.round(key[1:] - key[:-1], _POS_DECIMALS)
    groups = out.groupby(series_key, sort=False, dropna=False)
    slice_idx = groups.cumcount().to_numpy(np.int64)
    n_slices = groups[series_key].transform("size").to_numpy(np.int64)
    same_next, gap_next = np.zeros(len(out), dtype=bool), np.zeros(len(out))
    same_next[:-1], gap_next[:-1] = same_prev[1:], gap[1:]
    out["slice_idx"] = slice_idx
    out["n_slices"] = n_slices
    out["rel_pos"] = np.where(n_slices > 1, slice_idx / np.maximum(n_slices - 1, 1), 0.0)
    out["spacing_prev"] = np.where(same_prev, gap, 0.0)
    out["spacing_next"] = np.where(same_next, gap_next, 0.0)
    return out
