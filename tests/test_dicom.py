"""lib.dicom / lib.dicom_index on small DICOMs generated with pydicom (fast; no real data needed)."""
from __future__ import annotations

import math
import random
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, ImplicitVRLittleEndian, JPEG2000Lossless, RLELossless

from lib.io import dicom, dicom_index
from lib.io.dicom import DicomError, lenient_reading

AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)


@lenient_reading()  # the RSNA files' `ID_...` strings in UI fields, without a pydicom warning per element
def write_ct(path: Path, pixels: np.ndarray, *, sop: str = "ID_000000001", series: str = "ID_s1",
             ipp: Sequence[float] = (0.0, 0.0, 0.0), iop: Sequence[float] = AXIAL, bits_stored: int = 0,
             pixrep: int = -1, intercept: float = -1024.0, slope: float = 1.0, photometric: str = "MONOCHROME2",
             wc: object = ("00036", "00036"), ww: object = ("00080", "00080"),
             syntax: str = ExplicitVRLittleEndian, drop: Sequence[str] = (), patient: str = "ID_p1",
             study: str = "ID_st1") -> Path:
    """A minimal CT slice like the RSNA files (2-D uint16/int16 `pixels`; or (H, W, 3) uint8 for colour)."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID, meta.TransferSyntaxUID = CTImageStorage, sop, syntax
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality = CTImageStorage, sop, "CT"
    ds.PatientID, ds.StudyInstanceUID, ds.SeriesInstanceUID = patient, study, series
    ds.ImagePositionPatient, ds.ImageOrientationPatient = list(ipp), list(iop)
    ds.PixelSpacing = [0.5, 0.5]
    ds.Rows, ds.Columns = pixels.shape[:2]
    ds.SamplesPerPixel = pixels.shape[2] if pixels.ndim == 3 else 1
    if pixels.ndim == 3:
        ds.PlanarConfiguration = 0
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = pixels.dtype.itemsize * 8
    ds.BitsStored = bits_stored or ds.BitsAllocated
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = pixrep if pixrep >= 0 else int(pixels.dtype.kind == "i")
    ds.RescaleIntercept, ds.RescaleSlope = intercept, slope
    ds.WindowCenter = list(wc) if isinstance(wc, tuple) else wc
    ds.WindowWidth = list(ww) if isinstance(ww, tuple) else ww
    ds.PixelData = pixels.tobytes()
    for keyword in drop:
        delattr(ds, keyword)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def tiny(value: int = 0, dtype: type = np.int16, shape: tuple = (4, 4)) -> np.ndarray:
    return np.full(shape, value, dtype=dtype)


# -- HU conversion -----------------------------------------------------------------------------------------------
def test_12bit_fix_exact_values(tmp_path: Path) -> None:
    # 12-bit unsigned storage of signed HU with intercept 0: -1000 HU was stored as 4096 - 1000 = 3096.
    raw = np.array([[3096, 0], [1040, 4095]], dtype=np.uint16)
    path = write_ct(tmp_path / "a.dcm", raw, bits_stored=12, pixrep=0, intercept=0.0)
    expected = np.array([[-1000, 0], [1040, -1]], dtype=np.float32)
    np.testing.assert_array_equal(dicom.read_hu(path), expected)


def test_no_12bit_fix_with_normal_intercept(tmp_path: Path) -> None:
    raw = np.array([[3096, 0], [1040, 4095]], dtype=np.uint16)
    path = write_ct(tmp_path / "a.dcm", raw, bits_stored=12, pixrep=0, intercept=-1024.0)
    hu = dicom.read_hu(path)
    assert hu.dtype == np.float32
    np.testing.assert_array_equal(hu, np.array([[2072, -1024], [16, 3071]], dtype=np.float32))


@pytest.mark.parametrize("bits, pxrep, intercept, expected", [
    (12, 0, 0.0, True), (12, 0, -99.0, True), (12, 0, -100.0, False), (12, 0, -1024.0, False),
    (12, 1, 0.0, False), (16, 0, 0.0, False), (16, 1, -1024.0, False)])
def test_needs_12bit_fix(bits: int, pxrep: int, intercept: float, expected: bool) -> None:
    assert dicom.needs_12bit_fix(bits, pxrep, intercept) is expected


def test_slope_intercept_and_clipping(tmp_path: Path) -> None:
    raw = np.array([[-2000, 0, 1024, 5000]], dtype=np.int16)
    hu = dicom.read_hu(write_ct(tmp_path / "a.dcm", raw, intercept=-1024.0))
    np.testing.assert_array_equal(hu, np.array([[-1024, -1024, 0, 3071]], dtype=np.float32))
    hu2 = dicom.read_hu(write_ct(tmp_path / "b.dcm", np.array([[10, 20]], dtype=np.int16), slope=2.0, intercept=-5.0))
    np.testing.assert_array_equal(hu2, np.array([[15, 35]], dtype=np.float32))


def test_monochrome1_is_inverted(tmp_path: Path) -> None:
    raw = np.array([[0, 100, 200]], dtype=np.int16)
    hu = dicom.read_hu(write_ct(tmp_path / "a.dcm", raw, intercept=0.0, photometric="MONOCHROME1"))
    np.testing.assert_array_equal(hu, np.array([[200, 100, 0]], dtype=np.float32))


def test_missing_intercept_reads_as_zero_but_index_flags_it(tmp_path: Path) -> None:
    raw = np.array([[-1000, 40]], dtype=np.int16)
    path = write_ct(tmp_path / "a.dcm", raw, drop=["RescaleIntercept"])
    np.testing.assert_array_equal(dicom.read_hu(path), raw.astype(np.float32))
    idx = dicom_index.index([path], progress=False)
    assert len(idx) == 0
    assert "missing RescaleIntercept" in dicom_index.bad_files_table(idx)["reason"].iloc[0]


def test_colour_and_8bit_rejected(tmp_path: Path) -> None:
    rgb = write_ct(tmp_path / "rgb.dcm", np.zeros((4, 4, 3), np.uint8), photometric="RGB")
    with pytest.raises(DicomError, match="colour rendering"):
        dicom.read_hu(rgb)
    grey8 = write_ct(tmp_path / "g8.dcm", np.zeros((4, 4), np.uint8))
    with pytest.raises(DicomError, match="8-bit"):
        dicom.read_hu(grey8)


def test_read_hu_errors_name_the_problem(tmp_path: Path) -> None:
    text = tmp_path / "notes.dcm"
    text.write_text("this is not a DICOM file\n")
    with pytest.raises(DicomError, match="not a DICOM file") as err:
        dicom.read_hu(text)
    assert str(text) in str(err.value)
    empty = tmp_path / "empty.dcm"
    empty.write_bytes(b"")
    with pytest.raises(DicomError, match="empty file"):
        dicom.read_hu(empty)
    good = write_ct(tmp_path / "good.dcm", tiny(shape=(16, 16)))
    cut = tmp_path / "cut.dcm"
    cut.write_bytes(good.read_bytes()[:-100])
    with pytest.raises(DicomError, match="truncated"):
        dicom.read_hu(cut)
    ds = pydicom.dcmread(good)
    ds.compress(RLELossless, generate_instance_uid=False)
    ds.save_as(tmp_path / "rle.dcm", enforce_file_format=True)
    (tmp_path / "rle_cut.dcm").write_bytes((tmp_path / "rle.dcm").read_bytes()[:-30])
    with pytest.raises(DicomError, match="truncated"):
        dicom.read_hu(tmp_path / "rle_cut.dcm")
    with pytest.raises(FileNotFoundError):
        dicom.read_hu(tmp_path / "missing.dcm")


@pytest.mark.parametrize("syntax", [RLELossless, JPEG2000Lossless])
def test_compressed_round_trip(tmp_path: Path, syntax: str) -> None:
    raw = ((np.arange(32 * 32).reshape(32, 32) % 2500) - 1200).astype(np.int16)
    plain = write_ct(tmp_path / "plain.dcm", raw, intercept=0.0)
    ds = pydicom.dcmread(plain)
    ds.compress(syntax, generate_instance_uid=False)
    ds.save_as(tmp_path / "comp.dcm", enforce_file_format=True)
    np.testing.assert_array_equal(dicom.read_hu(tmp_path / "comp.dcm"), np.clip(raw, -1024, 3071).astype(np.float32))


# -- index: schema, bad files ------------------------------------------------------------------------------------
def make_series(root: Path, n: int = 3, series: str = "ID_s1", start: int = 0, dz: float = 5.0) -> list:
    return [write_ct(root / f"ID_{series[-2:]}{i:03d}.dcm", tiny(i), sop=f"ID_{series[-2:]}{i:03d}", series=series,
                     ipp=(0.0, 0.0, (start + i) * dz)) for i in range(n)]


def test_index_schema_and_values(tmp_path: Path) -> None:
    make_series(tmp_path / "a", 3)
    write_ct(tmp_path / "a" / "sub" / "ID_UPPER.DCM", tiny(), sop="ID_upper", series="ID_s2", wc="40", ww="80",
             syntax=ImplicitVRLittleEndian)
    (tmp_path / "a" / "readme.txt").write_text("ignored: not *.dcm")
    idx = dicom_index.index(tmp_path / "a", progress=False)
    expected = {**dicom_index.INDEX_COLUMNS, **dicom_index.ORDER_COLUMNS}
    assert list(idx.columns) == list(expected)
    assert {c: str(t) for c, t in idx.dtypes.items()} == expected
    assert len(idx) == 4 and dicom_index.bad_files_table(idx).empty
    row = idx.set_index("image_id").loc["ID_s1001"]
    assert row["ipp_z"] == 5.0 and row["pos_normal"] == 5.0 and row["window_center"] == 36.0
    assert row["window_width"] == 80.0 and row["intercept"] == -1024.0 and row["rows"] == 4
    assert row["transfer_syntax"] == ExplicitVRLittleEndian and Path(row["path"]).is_absolute()
    upper = idx.set_index("image_id").loc["ID_upper"]
    assert upper["window_center"] == 40.0 and upper["transfer_syntax"] == ImplicitVRLittleEndian


def test_missing_window_is_nan(tmp_path: Path) -> None:
    path = write_ct(tmp_path / "a.dcm", tiny(), drop=["WindowCenter", "WindowWidth", "PixelSpacing"])
    idx = dicom_index.index([path], progress=False)
    assert math.isnan(idx["window_center"].iloc[0]) and math.isnan(idx["window_width"].iloc[0])
    assert math.isnan(idx["pixel_spacing_row"].iloc[0])


def test_bad_files_listed_with_reasons(tmp_path: Path) -> None:
    root = tmp_path / "data"
    good = make_series(root, 3)
    (root / "ID_text.dcm").write_text("not dicom at all")
    full = write_ct(tmp_path / "tmp.dcm", tiny(shape=(16, 16)), sop="ID_trunc")
    (root / "ID_trunc.dcm").write_bytes(full.read_bytes()[:-100])
    (root / "ID_head.dcm").write_bytes(full.read_bytes()[:200])
    write_ct(root / "ID_noipp.dcm", tiny(), sop="ID_noipp", drop=["ImagePositionPatient"])
    write_ct(root / "ID_noicpt.dcm", tiny(), sop="ID_noicpt", drop=["RescaleIntercept"])
    write_ct(root / "ID_rgb.dcm", np.zeros((4, 4, 3), np.uint8), sop="ID_rgb", photometric="RGB")
    write_ct(root / "zz_copy.dcm", tiny(), sop="ID_s1000")  # same SOPInstanceUID as ID_s1000.dcm
    short = pydicom.dcmread(write_ct(tmp_path / "short.dcm", tiny(), sop="ID_short"))
    short.Rows = 8  # header promises 8x4 pixels, PixelData holds 4x4
    short.save_as(root / "ID_short.dcm", enforce_file_format=True)
    ds = pydicom.dcmread(write_ct(tmp_path / "rle.dcm", tiny(7, shape=(16, 16)), sop="ID_rle"))
    ds.compress(RLELossless, generate_instance_uid=False)
    ds.save_as(tmp_path / "rle_full.dcm", enforce_file_format=True)
    (root / "ID_rle.dcm").write_bytes((tmp_path / "rle_full.dcm").read_bytes()[:-30])

    out = tmp_path / "run" / "index" / "train.parquet"
    idx = dicom_index.index(root, out=out, progress=False)
    assert sorted(idx["path"]) == sorted(str(p) for p in good)
    bad = dicom_index.bad_files_table(idx).set_index("path")["reason"]
    reasons = {Path(p).name: r for p, r in bad.items()}
    assert set(reasons) == {"ID_text.dcm", "ID_trunc.dcm", "ID_head.dcm", "ID_noipp.dcm", "ID_noicpt.dcm",
                            "ID_rgb.dcm", "zz_copy.dcm", "ID_rle.dcm", "ID_short.dcm"}
    assert "not a DICOM file" in reasons["ID_text.dcm"]
    assert "truncated" in reasons["ID_trunc.dcm"] and "truncated" in reasons["ID_head.dcm"]
    assert "truncated" in reasons["ID_rle.dcm"]
    assert "PixelData holds 32 bytes but Rows x Columns x BitsAllocated need 64" in reasons["ID_short.dcm"]
    assert reasons["ID_noipp.dcm"] == "missing ImagePositionPatient"
    assert reasons["ID_noicpt.dcm"] == "missing RescaleIntercept"
    assert "colour" in reasons["ID_rgb.dcm"]
    assert "duplicate SOPInstanceUID ID_s1000" in reasons["zz_copy.dcm"]
    # saved: parquet round-trips exactly, bad files CSV next to it
    pd.testing.assert_frame_equal(pd.read_parquet(out), idx)
    saved_bad = pd.read_csv(out.with_name("bad_files_train.csv"))
    assert list(saved_bad.columns) == ["path", "reason"] and len(saved_bad) == 9


def test_index_inputs(tmp_path: Path) -> None:
    files = make_series(tmp_path, 2)
    idx = dicom_index.index([str(files[1]), files[0], tmp_path / "gone.dcm"], progress=False,
                      bad_out=tmp_path / "bad.csv")
    assert list(idx["image_id"]) == ["ID_s1000", "ID_s1001"]
    assert pd.read_csv(tmp_path / "bad.csv")["reason"].tolist() == ["file not found"]
    with pytest.raises(FileNotFoundError, match="not found"):
        dicom_index.index(tmp_path / "nope", progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"no \*\.dcm"):
        dicom_index.index(tmp_path / "empty", progress=False)


def test_parallel_equals_serial(tmp_path: Path) -> None:
    for s in range(3):
        make_series(tmp_path, 4, series=f"ID_s{s}")
    (tmp_path / "bad.dcm").write_text("x")
    serial = dicom_index.index(tmp_path, workers=1, progress=False)
    parallel = dicom_index.index(tmp_path, workers=2, chunksize=2, progress=False)
    pd.testing.assert_frame_equal(serial, parallel)
    assert serial.attrs["bad_files"] == parallel.attrs["bad_files"] and len(serial.attrs["bad_files"]) == 1


# -- slice order -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("in_plane_shift", [5.0 / math.tan(math.radians(30.0)), 20.0])
def test_gantry_tilt_orders_along_normal(tmp_path: Path, in_plane_shift: float) -> None:
    """30 deg tilt; the origin also moves along the column direction, so z is constant (shift 8.66) or falls."""
    tilt = math.radians(30.0)
    col = np.array([0.0, math.cos(tilt), -math.sin(tilt)])
    iop = (1.0, 0.0, 0.0, *col)
    normal = np.cross(iop[:3], iop[3:])
    ipps = [np.array([-100.0, -80.0, 50.0]) + k * 5.0 * normal + k * in_plane_shift * col for k in range(6)]
    order = list(range(6))
    random.Random(0).shuffle(order)  # image ids / file names unrelated to position
    for name_rank, k in enumerate(order):
        write_ct(tmp_path / f"ID_{name_rank:03d}.dcm", tiny(k), sop=f"ID_{name_rank:03d}", ipp=ipps[k], iop=iop)
    idx = dicom_index.index(tmp_path, progress=False)
    truth = [f"ID_{order.index(k):03d}" for k in range(6)]
    assert list(idx.sort_values("slice_idx")["image_id"]) == truth
    z = idx.sort_values("slice_idx")["ipp_z"].to_numpy()
    if in_plane_shift < 10:
        assert np.ptp(z) < 1e-3  # z carries no order information at all
    else:
        assert (np.diff(z) < -1).all()  # sorting by z would reverse the stack
    np.testing.assert_allclose(idx["spacing_prev"], [0, 5, 5, 5, 5, 5], atol=1e-4)
    np.testing.assert_allclose(idx["spacing_next"], [5, 5, 5, 5, 5, 0], atol=1e-4)
    np.testing.assert_allclose(idx["rel_pos"], np.arange(6) / 5)
    assert (idx["n_slices"] == 6).all()


def frame(rows: list) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=["series_uid", "image_id", "pos_normal"])


def test_order_ties_are_deterministic_with_zero_spacing() -> None:
    df = frame([("S", "ID_c", 10.0), ("S", "ID_b", 5.0), ("S", "ID_a", 5.0), ("T", "ID_z", 1.0)])
    for shuffled in (df, df.iloc[::-1], df.sample(frac=1.0, random_state=3)):
        out = dicom_index.order_slices(shuffled)
        assert list(out["image_id"]) == ["ID_a", "ID_b", "ID_c", "ID_z"]
        assert list(out["slice_idx"]) == [0, 1, 2, 0] and list(out["n_slices"]) == [3, 3, 3, 1]
        assert list(out["spacing_prev"]) == [0.0, 0.0, 5.0, 0.0]
        assert list(out["spacing_next"]) == [0.0, 5.0, 0.0, 0.0]
        assert list(out["rel_pos"]) == [0.0, 0.5, 1.0, 0.0]


def test_order_float_noise_does_not_beat_tie_break() -> None:
    out = dicom_index.order_slices(frame([("S", "ID_a", 5.0 + 1e-9), ("S", "ID_b", 5.0)]))
    assert list(out["image_id"]) == ["ID_a", "ID_b"] and list(out["spacing_next"]) == [0.0, 0.0]


def test_order_slices_is_idempotent_and_checks_columns() -> None:
    df = frame([("S", f"ID_{i}", float(-i)) for i in range(5)])
    once = dicom_index.order_slices(df)
    pd.testing.assert_frame_equal(dicom_index.order_slices(once.sample(frac=1.0, random_state=1)), once)
    assert list(once["image_id"]) == [f"ID_{i}" for i in range(4, -1, -1)]
    with pytest.raises(KeyError, match="pos_normal"):
        dicom_index.order_slices(df.drop(columns="pos_normal"))
