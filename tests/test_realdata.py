"""lib.dicom on the 76 real DICOM files in ../shared/data/real (PROVENANCE.md); skipped when that folder is absent.

The folder comes from the `real_dir` fixture (conftest): `<repo>/../shared/data/real`, or $RSNA_REAL_DATA.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from lib.io import dicom, dicom_index
from lib.tasks.ich.labels import SUBTYPES, read_labels

pytestmark = pytest.mark.realdata

#: Files read_hu must reject, with a fragment of the reason.
READ_HU_FAILS = {"edge_cases/deid-data/ctbrain1.dcm": "colour rendering"}  # 8-bit YBR_FULL_422 JPEG screenshot
#: Files the header index lists as bad: the screenshot, and the uncompressed twin of 693_J2KR (same SOP UID).
INDEX_BAD = {**READ_HU_FAILS, "edge_cases/pydicom-data/693_UNCR.dcm": "duplicate SOPInstanceUID"}
SERIES = "rsna_ich/train_series_ID_44cfc8e964"


@pytest.fixture(scope="module")
def manifest(real_dir: Path) -> pd.DataFrame:
    return pd.read_csv(real_dir / "MANIFEST.csv", dtype={"window_center": str, "window_width": str})


@pytest.fixture(scope="module")
def idx(real_dir: Path) -> pd.DataFrame:
    return dicom_index.index(real_dir, workers=2, progress=False)


def rel(real_dir: Path, paths: pd.Series) -> list:
    return [Path(p).relative_to(real_dir).as_posix() for p in paths]


def test_read_hu_every_file(real_dir: Path, manifest: pd.DataFrame) -> None:
    """Each file decodes to rows x cols of plausible CT HU, or is rejected with the expected reason."""
    problems = {}
    for row in manifest.itertuples():
        try:
            hu = dicom.read_hu(real_dir / row.file)
        except dicom.DicomError as exc:
            if row.file not in READ_HU_FAILS or READ_HU_FAILS[row.file] not in str(exc):
                problems[row.file] = f"unexpected DicomError: {exc}"
            continue
        if row.file in READ_HU_FAILS:
            problems[row.file] = "decoded but should have been rejected"
        elif hu.shape != (row.rows, row.cols) or hu.dtype != np.float32:
            problems[row.file] = f"shape {hu.shape} {hu.dtype}, manifest says {row.rows}x{row.cols}"
        else:  # head/neck CT: mostly air or soft tissue, little bone; a wrong sign/bit fix breaks this
            air_or_soft = np.mean((hu <= -900) | ((hu >= -100) & (hu <= 100)))
            bone = np.mean(hu >= 300)
            if air_or_soft < 0.5 or bone > 0.2 or hu.min() < dicom.HU_MIN or hu.max() > dicom.HU_MAX:
                problems[row.file] = f"implausible HU: air+soft {air_or_soft:.2f}, bone {bone:.2f}"
    assert not problems, problems
    assert len(manifest) == 76


def test_compressed_decoders_agree(real_dir: Path) -> None:
    """JPEG 2000 lossless == uncompressed twin exactly; JPEG 2000 lossy close to it (pylibjpeg-openjpeg)."""
    base = real_dir / "edge_cases"
    uncompressed = dicom.read_hu(base / "pydicom-data/693_UNCR.dcm")
    np.testing.assert_array_equal(dicom.read_hu(base / "pydicom-data/693_J2KR.dcm"), uncompressed)
    lossy = dicom.read_hu(base / "pydicom/693_J2KI.dcm")
    assert np.median(np.abs(lossy - uncompressed)) < 30


def test_j2k_pixel_representation_mismatch(real_dir: Path) -> None:
    """Unsigned J2K stream, PixelRepresentation 1, intercept 0: pydicom re-signs it, so air reads ~-1000 HU."""
    hu = dicom.read_hu(real_dir / "edge_cases/pydicom/J2K_pixelrep_mismatch.dcm")
    air = hu[(hu > -1100) & (hu < -900)]
    assert air.size > 0.05 * hu.size and abs(np.median(air) - (-1000)) < 30
    assert np.mean((hu >= 0) & (hu <= 80)) > 0.1  # brain / soft tissue present


def test_index_covers_every_file(real_dir: Path, manifest: pd.DataFrame, idx: pd.DataFrame) -> None:
    bad = dicom_index.bad_files_table(idx)
    indexed, rejected = set(rel(real_dir, idx["path"])), dict(zip(rel(real_dir, bad["path"]), bad["reason"]))
    assert indexed.isdisjoint(rejected)
    assert indexed | set(rejected) == set(manifest["file"])
    assert set(rejected) == set(INDEX_BAD), rejected
    for name, fragment in INDEX_BAD.items():
        assert fragment in rejected[name]
    assert idx["image_id"].is_unique
    by_file = idx.assign(file=rel(real_dir, idx["path"])).set_index("file")
    man = manifest.set_index("file").loc[by_file.index]
    np.testing.assert_array_equal(by_file["rows"], man["rows"])
    np.testing.assert_allclose(by_file["ipp_z"], man["ipp_z"], atol=1e-3)
    assert (by_file["image_id"] == man["sop_uid"]).all()
    # multi-valued windows: first value (`00036\00036` -> 36, `40\40\40` -> 40); CT_small has none -> NaN
    assert (by_file.loc[by_file.index.str.startswith(SERIES), "window_center"] == 36.0).all()
    assert by_file.loc["edge_cases/pydicom/J2K_pixelrep_mismatch.dcm", "window_width"] == 100.0
    assert np.isnan(by_file.loc["edge_cases/pydicom/CT_small.dcm", "window_center"])


def test_rsna_series_ordered_by_position(real_dir: Path, idx: pd.DataFrame) -> None:
    series = idx[idx["series_uid"] == "ID_44cfc8e964"].sort_values("slice_idx")
    assert len(series) == 33 and (series["n_slices"] == 33).all()
    assert list(series["slice_idx"]) == list(range(33))
    assert (np.diff(series["ipp_z"]) > 0).all()
    np.testing.assert_allclose(series["ipp_z"].iloc[[0, -1]], [93.3, 253.3], atol=1e-3)
    np.testing.assert_allclose(series["spacing_prev"].iloc[1:], 5.0, atol=1e-3)
    assert series["spacing_prev"].iloc[0] == 0 and series["spacing_next"].iloc[-1] == 0
    assert (series["patient_id"] == "ID_cd5a85fd").all() and (series["study_uid"] == "ID_74f2e4ee2b").all()


def test_tilted_slice_normal(idx: pd.DataFrame) -> None:
    row = idx.set_index("image_id").loc["ID_07c9bea25"]
    iop = row[[f"iop_{i}" for i in range(6)]].to_numpy(float)
    np.testing.assert_allclose(iop[3:], [0, 0.8988, -0.4384], atol=1e-3)
    normal = np.cross(iop[:3], iop[3:])
    np.testing.assert_allclose(normal, [0, 0.4384, 0.8988], atol=1e-3)  # 26 deg gantry tilt
    expected = np.dot(row[["ipp_x", "ipp_y", "ipp_z"]].to_numpy(float), normal / np.linalg.norm(normal))
    assert row["pos_normal"] == pytest.approx(expected, abs=1e-6)
    assert abs(row["pos_normal"] - row["ipp_z"]) > 10


def test_cq500_stack_ordered_by_position(real_dir: Path, idx: pd.DataFrame) -> None:
    stack = idx[idx["path"].str.contains("CQ500-CT-0_thin_every8th")].sort_values("slice_idx")
    assert len(stack) == 30
    names = [Path(p).name for p in stack["path"]]
    assert names != sorted(names)  # file names are not in position order...
    assert (np.diff(stack["ipp_z"]) > 0).all()  # ...but slice_idx follows the position
    tilt = np.degrees(np.arccos(np.cross(stack[["iop_0", "iop_1", "iop_2"]], stack[["iop_3", "iop_4", "iop_5"]])[:, 2]))
    np.testing.assert_allclose(tilt, 8.5, atol=0.5)
    np.testing.assert_allclose(stack["spacing_prev"].iloc[1:], 5.0 * np.cos(np.radians(tilt[1:])), atol=2e-3)


def test_duplicate_position_in_real_series(idx: pd.DataFrame) -> None:
    """693_J2KR and 693_J2KI: two encodings of one slice (different SOP UIDs, same position) -> tie, spacing 0."""
    pair = idx[idx["series_uid"] == "1.2.276.0.7230010.3.1.3.296485376.1.1521713419.1802493"]
    assert len(pair) == 2 and list(pair["image_id"]) == sorted(pair["image_id"])
    assert (pair[["spacing_prev", "spacing_next"]].to_numpy() == 0).all()


def test_labels_match_provenance(real_dir: Path, idx: pd.DataFrame) -> None:
    labels = read_labels(real_dir / "rsna_ich" / "labels_stage_2_train_format.csv")
    assert list(labels.columns) == list(SUBTYPES) and len(labels) == 37
    assert set(labels.index) <= set(idx["image_id"])
    series = idx.loc[idx["series_uid"] == "ID_44cfc8e964", ["image_id", "slice_idx"]]
    lab = series.merge(labels, left_on="image_id", right_index=True).sort_values("slice_idx")
    assert len(lab) == 33
    assert lab[list(SUBTYPES)].sum().to_dict() == {"epidural": 0, "intraparenchymal": 12, "intraventricular": 4,
                                                   "subarachnoid": 17, "subdural": 15, "any": 18}
    assert (lab["any"] == lab[list(SUBTYPES[:-1])].max(axis=1)).all()
    assert labels.loc["ID_2008dd408"].to_dict() == {"epidural": 1, "intraparenchymal": 0, "intraventricular": 0,
                                                    "subarachnoid": 1, "subdural": 1, "any": 1}
    assert labels.loc["ID_6c5d82413"].sum() == 0 and labels.loc["ID_07c9bea25", "subdural"] == 1
