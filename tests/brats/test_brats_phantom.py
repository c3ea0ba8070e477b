"""Synthetic BraTS data (lib.tasks.brats.phantom): both trees' layout and IDs, Image-N numbering, the three bad cases,
order along the normal per plane, DICOM header realism, determinism, nested tumour regions, the weak MGMT signal."""
from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Dict

import numpy as np
import pandas as pd
import pydicom
import pytest
from scipy import ndimage
from sklearn.metrics import roc_auc_score

from lib.io.mr_series import SEQUENCES, bad_series_table, content_slices, read_mr_series, series_files
from lib.io.nifti import read_brats_case, region_masks
from lib.tasks.brats.phantom import BAD_CASES, generate, main, plan_dataset, render_series, task1_grid, theoretical_auc

KW = dict(patients=9, seed=5, size=48, slices=(12, 16))


@pytest.fixture(scope="module")
def ds_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("brats") / "data"
    generate(out, progress=False, **KW)
    return out


@pytest.fixture(scope="module")
def patients(ds_dir: Path) -> pd.DataFrame:
    return pd.read_csv(ds_dir / "_truth" / "patients.csv", dtype={"BraTS21ID": str, "split": str},
                       keep_default_na=False)


def _ids(folder: Path) -> set:
    return {p.name for p in folder.iterdir() if p.is_dir()}


def test_layout_and_ids(ds_dir: Path, patients: pd.DataFrame) -> None:
    task1 = _ids(ds_dir / "task1")
    assert task1 and all(re.fullmatch(r"BraTS2021_\d{5}", n) for n in task1)
    for case in task1:
        assert sorted(p.name for p in (ds_dir / "task1" / case).iterdir()) == sorted(
            f"{case}_{m}.nii.gz" for m in ("flair", "t1", "t1ce", "t2", "seg"))
    train, test = _ids(ds_dir / "task2" / "train"), _ids(ds_dir / "task2" / "test")
    assert all(re.fullmatch(r"\d{5}", i) for i in train | test) and train.isdisjoint(test) and test
    labels = pd.read_csv(ds_dir / "task2" / "train_labels.csv", dtype={"BraTS21ID": str})
    assert list(labels.columns) == ["BraTS21ID", "MGMT_value"] and set(labels["BraTS21ID"]) == train
    assert set(labels["MGMT_value"]) == {0, 1}
    assert (ds_dir / "task2" / "train_labels.csv").read_text().splitlines()[1][:5].isdigit()  # "00xyz", not "xyz"
    sub = pd.read_csv(ds_dir / "task2" / "sample_submission.csv", dtype={"BraTS21ID": str})
    assert list(sub.columns) == ["BraTS21ID", "MGMT_value"] and set(sub["BraTS21ID"]) == test
    assert (sub["MGMT_value"] == 0.5).all()
    truth = pd.read_csv(ds_dir / "_truth" / "test_labels.csv", dtype={"BraTS21ID": str})
    assert set(truth["BraTS21ID"]) == test and truth["MGMT_value"].isin([0, 1]).all()
    in1 = {n.split("_")[1] for n in task1}
    assert in1 & train and in1 - train - test and not in1 & test  # overlap, task-1 only, test kept out of task 1
    assert set(patients["BraTS21ID"]) == in1 | train | test and len(patients) == KW["patients"]
    for pid in train | test:
        assert _ids(ds_dir / "task2" / ("train" if pid in train else "test") / pid) <= set(SEQUENCES)


def test_image_numbering(ds_dir: Path) -> None:
    series = pd.read_csv(ds_dir / "_truth" / "series.csv", dtype={"BraTS21ID": str}, keep_default_na=False)
    for row in series[series["bad"].isin(["", "blank"])].itertuples():
        files = series_files(ds_dir / "task2" / row.split / row.BraTS21ID / row.sequence)
        names = [p.name for p in files]
        assert names == [f"Image-{i}.dcm" for i in range(1, row.slices + 1)] and row.slices >= 12
        assert sorted(names) != names  # alphabetical order is wrong
    assert {"ascending", "descending"} <= set(series["numbering"])
    assert series[["rows", "cols"]].drop_duplicates().shape[0] > 1 and series["slices"].nunique() > 1


def test_bad_cases(ds_dir: Path, patients: pd.DataFrame) -> None:
    train = ds_dir / "task2" / "train"
    assert set(BAD_CASES) <= _ids(train)
    assert (train / "00109" / "FLAIR").is_dir() and not any((train / "00109" / "FLAIR").iterdir())
    assert not (train / "00123" / "T1w").exists() and not (train / "00123" / "T2w").exists()
    table = bad_series_table(train, progress=False)
    got = {(r.BraTS21ID, r.sequence): r.reason for r in table.itertuples()}
    assert got == {("00109", "FLAIR"): "empty", ("00123", "T1w"): "missing", ("00123", "T2w"): "missing",
                   ("00709", "FLAIR"): "blank"}
    assert set(patients.loc[patients["bad"] != "", "BraTS21ID"]) == set(BAD_CASES)


def test_order_along_normal_recovers_volume(ds_dir: Path) -> None:
    planes = set()
    for plan in plan_dataset(**KW):
        for sp in plan.series:
            if sp.bad:
                continue
            s = read_mr_series(ds_dir / "task2" / plan.split / plan.pid / sp.sequence)
            assert s.plane == sp.plane and np.array_equal(s.volume, render_series(sp, plan.anatomy))
            assert [p.name for p in s.files] == [f"Image-{n}.dcm" for n in sp.numbers]
            assert np.allclose(s.spacing, (sp.step, sp.pixel_spacing, sp.pixel_spacing), atol=1e-4)
            has = content_slices(s.volume, 0.0)
            assert not has[:2].any() and not has[-2:].any() and has.any()  # blank slices at both ends
            planes.add(s.plane)
    assert planes == {"axial", "coronal", "sagittal"}


def test_dicom_header(ds_dir: Path) -> None:
    path = next((ds_dir / "task2" / "test").glob("*/*/Image-1.dcm"))
    ds = pydicom.dcmread(path)
    assert ds.Modality == "MR" and ds.PhotometricInterpretation == "MONOCHROME2"
    assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.4"  # MR Image Storage
    assert (ds.BitsAllocated, ds.BitsStored, ds.PixelRepresentation) == (16, 16, 0)
    assert ds.pixel_array.dtype == np.uint16 and ds.PatientID == path.parents[1].name
    assert ds.SeriesDescription == path.parent.name and ds.InstanceNumber == 1
    assert ds.StudyInstanceUID.startswith("1.2.826.0.1.3680043.8.498.")


def _digest(root: Path) -> Dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*"))
            if p.is_file()}


def test_deterministic_and_cli(ds_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    again = tmp_path / "again"
    argv = ["--out", str(again), "--patients", "9", "--seed", "5", "--size", "48", "--slices", "12", "16"]
    s = main(argv)
    assert "brats phantom: 9 patients" in capsys.readouterr().out and s["patients"] == 9
    assert _digest(again) == _digest(ds_dir)
    other = plan_dataset(**{**KW, "seed": 6})
    assert [p.pid for p in other] != [p.pid for p in plan_dataset(**KW)]


def test_refuses_foreign_folder(tmp_path: Path) -> None:
    (tmp_path / "task2").mkdir()
    with pytest.raises(FileExistsError, match="not written by the BraTS phantom"):
        generate(tmp_path, progress=False, **KW)
    with pytest.raises(ValueError, match="patients >= 8"):
        plan_dataset(patients=5)


def test_task1_grid_and_nested_regions(ds_dir: Path, patients: pd.DataFrame) -> None:
    shape, affine = task1_grid(48)
    assert shape == (48, 48, 31) and np.allclose(affine, [[-5, 0, 0, 0], [0, -5, 0, 235], [0, 0, 5, 0], [0, 0, 0, 1]])
    real_shape, real_affine = task1_grid(240)  # the real BraTS grid and affine
    assert real_shape == (240, 240, 155)
    assert np.allclose(real_affine, [[-1, 0, 0, 0], [0, -1, 0, 239], [0, 0, 1, 0], [0, 0, 0, 1]])
    rim = patients.set_index("BraTS21ID")["rim"]
    for case in sorted((ds_dir / "task1").iterdir()):
        c = read_brats_case(case)
        assert c.seg.shape == shape and np.allclose(c.affine, affine) and c.axcodes == ("L", "P", "S")
        assert all(img.dtype == np.int16 for img in c.images.values()) and c.seg.dtype == np.uint8
        assert set(np.unique(c.seg).tolist()) == {0, 1, 2, 4}
        m = region_masks(c.seg)
        assert (m["ET"] <= m["TC"]).all() and (m["TC"] <= m["WT"]).all()
        assert (ndimage.binary_dilation(m["TC"]) <= m["WT"]).all()  # the oedema ring encloses the core
        brain = c.images["t1"] > 0
        assert (m["WT"] <= brain).all() and c.images["flair"][0, 0, 0] == 0  # inside the brain, zero background
        centre = np.argwhere(m["TC"]).mean(axis=0)
        radius = {lab: np.linalg.norm(np.argwhere(c.seg == lab) - centre, axis=1).mean() for lab in (1, 4, 2)}
        assert radius[1] < radius[4] < radius[2]  # NCR inside the ET shell inside the oedema
        fl, t1, t1ce = (c.images[k].astype(float) for k in ("flair", "t1", "t1ce"))
        assert fl[c.seg == 2].mean() > 1.5 * fl[brain & ~m["WT"]].mean()  # FLAIR-bright oedema
        assert t1ce[c.seg == 4].mean() > 1.5 * t1ce[brain & ~m["WT"]].mean()  # enhancing rim
        assert t1[c.seg == 1].mean() < 0.6 * t1[brain & ~m["WT"]].mean()  # dark core on T1
        et_tc = m["ET"].sum() / m["TC"].sum()  # the MGMT feature is visible in the seg
        assert abs(et_tc - (1 - (1 - rim[c.case_id]) ** 3)) < 0.08


def test_mgmt_signal_is_weak() -> None:
    plans = plan_dataset(patients=400, seed=0, size=48)
    y = np.array([p.mgmt for p in plans])
    rim = np.array([p.anatomy.rim for p in plans])
    auc = roc_auc_score(y, rim)
    assert 0.55 < auc < 0.85 and abs(auc - theoretical_auc(0.66)) < 0.08
    assert abs(y.mean() - 0.525) < 0.02
    assert roc_auc_score(y, [p.anatomy.r_tc for p in plans]) == pytest.approx(0.5, abs=0.1)  # no other feature leaks
