"""lib.io.nifti and lib.io.mr_series: NIfTI round trip and orientation, the BraTS case reader and regions (incl. the
real case BraTS2021_00006), MR series order along the normal, planes, bad-series reasons, MR normalisers."""
from __future__ import annotations

import io
from pathlib import Path
from typing import Sequence

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileDataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage

from lib.io.mr_series import (NORMALISERS, BadSeriesError, bad_series_table, content_slices, drop_blank, normalise,
                              plane_from_normal, read_mr_series, read_patient, series_files, slice_normal)
from lib.io.nifti import (MODALITIES, BratsCaseError, case_id, label_counts, read_brats_case, read_nifti,
                          region_channels, region_masks, write_nifti)

LPS_AFFINE = np.array([[-1.0, 0, 0, 0], [0, -1.0, 0, 5.0], [0, 0, 1.0, 0], [0, 0, 0, 1]])  # BraTS style, 6-voxel y


# ------------------------------------------------------------------------------------------------------- NIfTI
def test_nifti_round_trip_and_canonical(tmp_path: Path) -> None:
    data = np.arange(6 * 6 * 4, dtype=np.int16).reshape(6, 6, 4)
    write_nifti(tmp_path / "v.nii.gz", data, LPS_AFFINE)
    vol = read_nifti(tmp_path / "v.nii.gz")
    assert vol.data.dtype == np.int16 and np.array_equal(vol.data, data)
    assert np.allclose(vol.affine, LPS_AFFINE) and vol.spacing == (1.0, 1.0, 1.0) and vol.axcodes == ("L", "P", "S")
    ras = read_nifti(tmp_path / "v.nii.gz", canonical=True)
    assert ras.axcodes == ("R", "A", "S") and np.array_equal(ras.data, data[::-1, ::-1, :])
    # the same voxel maps to the same world point in both orientations
    assert np.allclose(vol.affine @ [0, 0, 0, 1], ras.affine @ [5, 5, 0, 1])
    assert list(tmp_path.iterdir()) == [tmp_path / "v.nii.gz"]  # no temp file left behind


def test_nifti_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nope.nii.gz"):
        read_nifti(tmp_path / "nope.nii.gz")
    (tmp_path / "junk.nii.gz").write_bytes(b"not a nifti")
    with pytest.raises(ValueError, match="junk.nii.gz"):
        read_nifti(tmp_path / "junk.nii.gz")


def _case(root: Path, cid: str = "00042", shape=(6, 6, 4)) -> Path:
    case = root / f"BraTS2021_{cid}"
    case.mkdir(parents=True)
    seg = np.zeros(shape, np.uint8)
    seg[2:4, 2:4, 1:3] = 2
    seg[2, 2, 1:3] = 4
    seg[2, 2, 1] = 1
    for m in MODALITIES:
        write_nifti(case / f"BraTS2021_{cid}_{m}.nii.gz", np.full(shape, 7, np.int16), LPS_AFFINE)
    write_nifti(case / f"BraTS2021_{cid}_seg.nii.gz", seg, LPS_AFFINE)
    return case


def test_brats_case_reader(tmp_path: Path) -> None:
    c = read_brats_case(_case(tmp_path))
    assert c.case_id == "00042" and c.seg is not None and c.seg.dtype == np.uint8
    assert c.stack().shape == (4, 6, 6, 4) and c.stack().dtype == np.float32
    assert label_counts(c.seg) == {0: 136, 1: 1, 2: 6, 4: 1}
    assert read_brats_case(tmp_path / "BraTS2021_00042", with_seg=False).seg is None


def test_brats_case_errors_name_the_file(tmp_path: Path) -> None:
    case = _case(tmp_path)
    write_nifti(case / "BraTS2021_00042_t1ce.nii.gz", np.zeros((6, 6, 5), np.int16), LPS_AFFINE)
    with pytest.raises(BratsCaseError, match=r"BraTS2021_00042_t1ce.nii.gz: shape \(6, 6, 5\)"):
        read_brats_case(case)
    shifted = LPS_AFFINE.copy()
    shifted[2, 3] = 1.0
    write_nifti(case / "BraTS2021_00042_t1ce.nii.gz", np.zeros((6, 6, 4), np.int16), shifted)
    with pytest.raises(BratsCaseError, match="BraTS2021_00042_t1ce.nii.gz: affine differs"):
        read_brats_case(case)
    (case / "BraTS2021_00042_t2.nii.gz").unlink()
    with pytest.raises(BratsCaseError, match="BraTS2021_00042_t2.nii.gz: missing"):
        read_brats_case(case)
    with pytest.raises(BratsCaseError, match="BraTS2021_<5 digits>"):
        case_id(tmp_path / "case_42")


def test_regions_by_hand() -> None:
    seg = np.array([0, 1, 2, 4, 4, 2], np.uint8)
    m = region_masks(seg)
    assert m["WT"].tolist() == [False, True, True, True, True, True]
    assert m["TC"].tolist() == [False, True, False, True, True, False]
    assert m["ET"].tolist() == [False, False, False, True, True, False]
    assert region_channels(seg, ("WT", "ET")).tolist() == [[0, 1, 1, 1, 1, 1], [0, 0, 0, 1, 1, 0]]
    with pytest.raises(ValueError, match=r"labels \[3\]"):
        region_masks(np.array([0, 3], np.uint8))
    with pytest.raises(KeyError, match="NCR"):
        region_channels(seg, ("NCR",))


@pytest.mark.realdata
def test_real_brats_case_00006(real_dir: Path) -> None:
    case = real_dir / "brats2021_task1" / "BraTS2021_00006"
    if not case.is_dir():
        pytest.skip(f"real BraTS case not found at {case}")
    c = read_brats_case(case)
    assert c.case_id == "00006" and c.seg.shape == (240, 240, 155) and c.axcodes == ("L", "P", "S")
    assert all(img.dtype == np.int16 for img in c.images.values()) and c.spacing == (1.0, 1.0, 1.0)
    assert np.allclose(c.affine, np.array([[-1, 0, 0, 0], [0, -1, 0, 239], [0, 0, 1, 0], [0, 0, 0, 1]]))
    assert label_counts(c.seg) == {0: 8_790_089, 1: 25_506, 2: 85_957, 4: 26_448}
    sizes = {k: int(v.sum()) for k, v in region_masks(c.seg).items()}
    assert sizes == {"WT": 25_506 + 85_957 + 26_448, "TC": 25_506 + 26_448, "ET": 26_448}
    assert int(c.images["flair"].max()) == 4050 and int(c.images["t1ce"].max()) == 15956
    assert all(int(img[0, 0, 0]) == 0 for img in c.images.values())  # zero background (skull-stripped)


# ------------------------------------------------------------------------------------------------ MR DICOM series
def _dcm(path: Path, pixels: np.ndarray, ipp: Sequence[float], iop: Sequence[float], number: int) -> None:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.TransferSyntaxUID = MRImageStorage, ExplicitVRLittleEndian
    meta.MediaStorageSOPInstanceUID = f"1.2.3.{number}"
    ds = FileDataset("", Dataset(), file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality, ds.InstanceNumber = MRImageStorage, f"1.2.3.{number}", "MR", number
    ds.ImagePositionPatient = [f"{v:.6f}" for v in ipp]
    ds.ImageOrientationPatient = [f"{v:.6f}" for v in iop]
    ds.PixelSpacing = ["0.5", "0.75"]
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.PixelData = pixels.astype("<u2").tobytes()
    buf = io.BytesIO()
    pydicom.dcmwrite(buf, ds, enforce_file_format=True)
    path.write_bytes(buf.getvalue())


SAGITTAL = (0, 1, 0, 0, 0, -1)  # normal (-1, 0, 0)


def _series(folder: Path, n: int = 12, iop=SAGITTAL, shape=(4, 5)) -> np.ndarray:
    """Slice k (spatial, ascending along the normal) holds value k + 1 and is written as Image-(n - k)."""
    folder.mkdir(parents=True)
    normal = np.cross(iop[:3], iop[3:])
    for k in range(n):
        _dcm(folder / f"Image-{n - k}.dcm", np.full(shape, k + 1), normal * 3.0 * k + [10, 20, 30], iop, n - k)
    return normal


def test_numeric_file_order(tmp_path: Path) -> None:
    _series(tmp_path / "FLAIR")
    names = [p.name for p in series_files(tmp_path / "FLAIR")]
    assert names == [f"Image-{i}.dcm" for i in range(1, 13)] and names != sorted(names)


@pytest.mark.parametrize("iop,plane", [(SAGITTAL, "sagittal"), ((1, 0, 0, 0, 0, -1), "coronal"),
                                       ((1, 0, 0, 0, 0.996195, -0.087156), "axial")])
def test_order_along_normal(tmp_path: Path, iop, plane: str) -> None:
    normal = _series(tmp_path / "S", iop=iop)
    s = read_mr_series(tmp_path / "S")
    assert s.plane == plane and np.allclose(s.normal, normal / np.linalg.norm(normal))
    assert s.volume.dtype == np.float32 and s.volume.shape == (12, 4, 5)
    assert s.volume[:, 0, 0].tolist() == list(range(1, 13))  # spatial order, although Image-N runs backwards
    assert [p.name for p in s.files] == [f"Image-{12 - k}.dcm" for k in range(12)]
    assert np.allclose(s.spacing, (3.0, 0.5, 0.75)) and np.all(np.diff(s.positions) > 0)


def test_planes_and_normals() -> None:
    assert [plane_from_normal(n) for n in ((-1, 0, 0), (0, 0.9, 0.2), (0.1, 0, -1))] == ["sagittal", "coronal", "axial"]
    assert np.allclose(slice_normal([1, 0, 0, 0, 1, 0]), [0, 0, 1])
    with pytest.raises(ValueError, match="parallel"):
        slice_normal([1, 0, 0, 1, 0, 0])


def test_bad_series_reasons(tmp_path: Path) -> None:
    def reason(folder: Path) -> str:
        with pytest.raises(BadSeriesError) as err:
            read_mr_series(folder)
        assert str(folder) in str(err.value)
        return err.value.reason

    assert reason(tmp_path / "absent") == "missing"
    (tmp_path / "empty").mkdir()
    assert reason(tmp_path / "empty") == "empty"
    _series(tmp_path / "mixed")
    _dcm(tmp_path / "mixed" / "Image-13.dcm", np.ones((6, 5)), (0, 0, 99), SAGITTAL, 13)
    assert reason(tmp_path / "mixed") == "mixed_size"
    _series(tmp_path / "junk")
    (tmp_path / "junk" / "Image-13.dcm").write_bytes(b"\0" * 300)
    assert reason(tmp_path / "junk") == "unreadable"
    _series(tmp_path / "named")
    (tmp_path / "named" / "img1.dcm").write_bytes(b"")
    assert reason(tmp_path / "named") == "bad_name"
    (tmp_path / "blank").mkdir()
    for i in range(1, 4):
        _dcm(tmp_path / "blank" / f"Image-{i}.dcm", np.zeros((4, 4)), (0, 0, i), SAGITTAL, i)
    assert reason(tmp_path / "blank") == "blank"
    assert read_mr_series(tmp_path / "blank", allow_blank=True).volume.shape == (3, 4, 4)


def test_patient_and_bad_table(tmp_path: Path) -> None:
    _series(tmp_path / "train" / "00001" / "FLAIR")
    _series(tmp_path / "train" / "00001" / "T1w")
    good, bad = read_patient(tmp_path / "train" / "00001")
    assert sorted(good) == ["FLAIR", "T1w"] and {s: e.reason for s, e in bad.items()} == {"T1wCE": "missing",
                                                                                        "T2w": "missing"}
    table = bad_series_table(tmp_path / "train", progress=False)
    assert table[["BraTS21ID", "sequence", "reason"]].values.tolist() == [["00001", "T1wCE", "missing"],
                                                                         ["00001", "T2w", "missing"]]


def test_blank_slices() -> None:
    vol = np.zeros((4, 10, 10), np.float32)
    vol[1, :5] = 1  # 50 %
    vol[2, 0, :5] = 1  # 5 %: below the seed's 10 %
    assert content_slices(vol).tolist() == [False, True, False, False]
    assert content_slices(vol, 0.0).tolist() == [False, True, True, False]


def test_drop_blank(tmp_path: Path) -> None:
    _series(tmp_path / "S", n=3)
    s = read_mr_series(tmp_path / "S")
    s.volume[0] = 0
    kept = drop_blank(s)
    assert kept is not None and kept.volume.shape[0] == 2 and kept.files == s.files[1:]


def test_normalisers() -> None:
    rng = np.random.default_rng(0)
    vol = np.zeros((4, 16, 16), np.uint16)
    vol[:, 4:12, 4:12] = rng.integers(200, 3000, (4, 8, 8))
    z = normalise(vol, "zscore_nonzero")
    assert z.dtype == np.float32 and (z[vol == 0] == 0).all()
    assert abs(float(z[vol > 0].mean())) < 1e-5 and abs(float(z[vol > 0].std()) - 1) < 1e-4
    p = normalise(vol, "percentile", lower=1, upper=99)
    assert p.dtype == np.float32 and (p[vol == 0] == 0).all() and p.min() == 0 and p.max() == pytest.approx(1.0)
    hi = np.percentile(vol[vol > 0], 99)
    assert np.allclose(p[vol >= hi], 1.0)
    assert not normalise(np.zeros((2, 2)), "percentile").any()
    assert {"zscore_nonzero", "percentile"} <= set(NORMALISERS.names())
    with pytest.raises(KeyError, match="percentile"):
        normalise(vol, "minmax")
