"""The cervical-spine phantom: Kaggle layout and CSV formats, the test.csv mismatch, masks and boxes, quirks,
determinism, and prevalences near the real train.csv."""
from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest

from lib.tasks.cspine.phantom import CERVICAL, generate, label_table, main, plan_dataset, render_slice

ARGS = dict(seed=5, studies=8, size=64, slices=(16, 24), test_studies=2)
UID = re.compile(r"^1\.2\.826\.0\.1\.3680043\.\d+$")
KINDS = [*CERVICAL, "patient_overall"]


@pytest.fixture(scope="module")
def out(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("cspine_phantom")
    generate(path, progress=False, **ARGS)
    return path


def _tree_digest(root: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(p for p in root.rglob("*") if p.is_file()):
        h.update(str(f.relative_to(root)).encode() + f.read_bytes())
    return h.hexdigest()


def test_layout_and_csv_formats(out):
    train = pd.read_csv(out / "train.csv")
    assert list(train.columns) == ["StudyInstanceUID", "patient_overall", *CERVICAL]
    assert train["StudyInstanceUID"].str.match(UID).all()
    assert (train["patient_overall"] == train[list(CERVICAL)].max(axis=1)).all()
    assert sorted(p.name for p in (out / "train_images").iterdir()) == sorted(train["StudyInstanceUID"])
    for study in (out / "train_images").iterdir():
        numbers = sorted(int(f.stem) for f in study.glob("*.dcm"))
        assert numbers == list(range(1, len(numbers) + 1)) and 16 <= len(numbers) <= 24
    boxes = pd.read_csv(out / "train_bounding_boxes.csv")
    assert list(boxes.columns) == ["StudyInstanceUID", "x", "y", "width", "height", "slice_number"] and len(boxes)
    fractured = set(train.loc[train["patient_overall"] == 1, "StudyInstanceUID"])
    assert set(boxes["StudyInstanceUID"]) <= fractured
    segs = {p.stem for p in (out / "segmentations").glob("*.nii")}
    assert segs and segs <= set(train["StudyInstanceUID"]) and segs & set(boxes["StudyInstanceUID"])
    truth = pd.read_csv(out / "_truth" / "test_labels.csv")
    assert list(truth.columns) == list(train.columns)
    assert sorted(p.name for p in (out / "test_images").iterdir()) == sorted(truth["StudyInstanceUID"])
    assert json.loads((out / "_truth" / "phantom.json").read_text())["params"]["seed"] == ARGS["seed"]


def test_test_csv_names_a_missing_study_and_matches_sample_submission(out):
    test = pd.read_csv(out / "test.csv")
    sub = pd.read_csv(out / "sample_submission.csv")
    assert list(test.columns) == ["row_id", "StudyInstanceUID", "prediction_type"]
    assert list(sub.columns) == ["row_id", "fractured"] and (sub["fractured"] == 0.5).all()
    assert list(sub["row_id"]) == list(test["row_id"])
    assert (test["row_id"] == test["StudyInstanceUID"] + "_" + test["prediction_type"]).all()
    assert all(sorted(g) == sorted(KINDS) for _, g in test.groupby("StudyInstanceUID")["prediction_type"])
    on_disk = {p.name for p in (out / "test_images").iterdir()}
    named = set(test["StudyInstanceUID"])
    assert named - on_disk and on_disk - named  # the dev copy's mismatch: the kernel must fall back to test_images


def test_boxes_cover_the_fracture(out):
    boxes = pd.read_csv(out / "train_bounding_boxes.csv")
    plans = {p.uid: p for p in plan_dataset(ARGS["seed"], ARGS["studies"], ARGS["size"], ARGS["slices"],
                                            ARGS["test_studies"])}
    for row in boxes.itertuples():
        plan = plans[row.StudyInstanceUID]
        k = next(k for k in range(plan.n_slices) if plan.slice_number(k) == row.slice_number)
        rows, cols = np.nonzero(render_slice(plan, k)[2])
        assert (cols.min(), rows.min(), cols.max() + 1, rows.max() + 1) == (row.x, row.y, row.x + row.width,
                                                                            row.y + row.height)


def test_nifti_is_stored_sagittal_style(out):
    import nibabel as nib

    studies = pd.read_csv(out / "_truth" / "studies.csv").set_index("StudyInstanceUID")
    for path in (out / "segmentations").glob("*.nii"):
        img = nib.load(str(path))
        info = studies.loc[path.stem]
        assert img.shape == (ARGS["size"], ARGS["size"], info["n_slices"]) and img.get_data_dtype() == np.uint8
        values = set(np.unique(np.asarray(img.dataobj)).tolist())
        assert {0, 1, 2, 7} <= values <= set(range(11))
        assert img.affine[0, 0] < 0 < img.affine[1, 1]


def test_quirks_are_all_present(out):
    studies = pd.read_csv(out / "_truth" / "studies.csv")
    assert set(studies["direction"]) == {"head_first", "feet_first"}
    assert set(studies["encoding"]) == {"s16_0", "u12_1024"}
    assert set(studies["syntax"]) == {"explicit", "rle", "j2k"}
    assert set(studies["modality"]) == {0, 1}
    for row in studies.itertuples():
        ds = pydicom.dcmread(out / f"{row.split}_images" / row.StudyInstanceUID / "1.dcm", stop_before_pixels=True)
        assert ("Modality" in ds) == bool(row.modality)
        assert ds.SOPInstanceUID == f"{row.StudyInstanceUID}.1.1" and ds.StudyInstanceUID == row.StudyInstanceUID
    vert = pd.read_csv(out / "_truth" / "vertebrae.csv")
    partial = vert[(vert["fractured"] == 1) & (vert["visible_fraction"] < 0.3)]
    assert len(partial) >= 1 and set(partial["vertebra"]) <= {"C1", "C7"}


def test_deterministic_for_a_seed(tmp_path):
    small = dict(studies=3, size=32, slices=(8, 10), test_studies=1, progress=False)
    generate(tmp_path / "a", seed=1, **small)
    generate(tmp_path / "b", seed=1, **small)
    generate(tmp_path / "c", seed=2, **small)
    assert _tree_digest(tmp_path / "a") == _tree_digest(tmp_path / "b") != _tree_digest(tmp_path / "c")
    generate(tmp_path / "a", seed=1, **small)  # regenerating over a previous phantom is allowed
    assert _tree_digest(tmp_path / "a") == _tree_digest(tmp_path / "b")


def test_refuses_a_folder_it_did_not_write(tmp_path):
    (tmp_path / "train.csv").write_text("real data\n")
    with pytest.raises(FileExistsError, match="not written"):
        generate(tmp_path, studies=2, size=32, slices=(8, 8), test_studies=1, progress=False)


def test_prevalence_near_the_real_train_csv():
    labels = label_table(plan_dataset(seed=11, studies=3000, size=64, slices=(8, 8), test_studies=1))
    real = {"patient_overall": 0.476, "C1": 0.072, "C2": 0.141, "C3": 0.036, "C4": 0.053, "C5": 0.080, "C6": 0.137,
            "C7": 0.195}
    got = labels.drop(columns="StudyInstanceUID").mean()
    for name, p in real.items():
        assert abs(got[name] - p) < 0.025, (name, got[name], p)
    assert (labels["patient_overall"] == labels[list(CERVICAL)].max(axis=1)).all()


def test_cli(tmp_path, capsys):
    summary = main(["--out", str(tmp_path), "--studies", "2", "--seed", "4", "--size", "32", "--slices", "8", "9",
                    "--test-studies", "1"])
    assert summary["train_studies"] == 1 and summary["test_studies"] == 1
    assert "cspine phantom:" in capsys.readouterr().out
    with pytest.raises(ValueError, match="studies"):
        generate(tmp_path / "x", studies=1)


def test_fracture_width_thickens_the_break_only():
    """--fracture-width scales the fracture planes (the demo's experiment knob); labels and anatomy stay the same."""
    thin, thick = plan_dataset(seed=2, studies=12, size=64), plan_dataset(seed=2, studies=12, size=64,
                                                                          fracture_width=3)
    fractured = [i for i, p in enumerate(thin) if p.fractures]
    assert fractured and [p.fractured for p in thin] == [p.fractured for p in thick]
    for i in fractured:
        for name, f in thin[i].fractures.items():
            assert thick[i].fractures[name]["half_width"] == pytest.approx(3 * f["half_width"])
    broken = [sum(int(render_slice(ps[i], k)[2].sum()) for i in fractured for k in range(ps[i].n_slices))
              for ps in (thin, thick)]
    assert 0 < broken[0] < broken[1]
    with pytest.raises(ValueError, match="fracture_width"):
        generate("/nonexistent", fracture_width=0.1)
