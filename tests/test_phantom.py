"""Synthetic RSNA-layout data set (lib.phantom): layout, determinism, split, labels, header quirks, bleed contrast."""
from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import math
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest

from lib.io.dicom import DicomError, dataset_to_hu, lenient_reading, read_dataset, read_hu
from lib.tasks.ich.labels import SUBTYPES, read_labels
from lib.tasks.ich.phantom import ENCODINGS, dicom_bytes, encode_hu, generate, main, plan_dataset

KW = dict(studies=6, seed=3, size=64, test_frac=0.34, slices=(10, 14), progress=False)


@pytest.fixture(scope="module")
def ds_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("phantom") / "data"
    generate(out, workers=1, **KW)
    return out


@pytest.fixture(scope="module")
def truth(ds_dir: Path) -> pd.DataFrame:
    return pd.read_csv(ds_dir / "_truth" / "slices.csv")


@pytest.fixture(scope="module")
def manifest(ds_dir: Path) -> dict:
    return json.loads((ds_dir / "_truth" / "phantom.json").read_text())


@pytest.fixture(scope="module")
def headers(ds_dir: Path, manifest: dict) -> pd.DataFrame:
    rows = []
    for path in sorted(ds_dir.glob("stage_2_*/*.dcm")):
        if path.stem in manifest["corrupt"]:
            continue
        with lenient_reading():  # the ID_... UIDs are converted here, after read_dataset returned
            d = read_dataset(path, stop_before_pixels=True)
            rows.append(dict(file=path.stem, split=path.parent.name, sop=str(d.SOPInstanceUID),
                             patient=str(d.PatientID), study=str(d.StudyInstanceUID), series=str(d.SeriesInstanceUID),
                             ipp=[float(v) for v in d.ImagePositionPatient],
                             iop=[float(v) for v in d.ImageOrientationPatient], rows=int(d.Rows),
                             cols=int(d.Columns), thickness="SliceThickness" in d, instance="InstanceNumber" in d))
    return pd.DataFrame(rows)


def _hashes(root: Path) -> dict:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_layout_and_csv_format(ds_dir: Path, truth: pd.DataFrame, manifest: dict) -> None:
    train_ids = {p.stem for p in (ds_dir / "stage_2_train").iterdir()}
    test_ids = {p.stem for p in (ds_dir / "stage_2_test").iterdir()}
    assert all(p.suffix == ".dcm" for p in ds_dir.glob("stage_2_*/*")), "only DICOM files in the image folders"
    assert all(re.fullmatch(r"ID_[0-9a-f]{9}", i) for i in train_ids | test_ids)
    raw = pd.read_csv(ds_dir / "stage_2_train.csv")
    assert list(raw.columns) == ["ID", "Label"] and set(raw["Label"]) <= {0, 1}
    parts = raw["ID"].str.rsplit("_", n=1, expand=True)
    assert (parts[1].to_numpy().reshape(-1, 6) == np.array(SUBTYPES)).all(), "6 rows per image in SUBTYPES order"
    assert (parts[0].to_numpy().reshape(-1, 6) == parts[0].to_numpy().reshape(-1, 6)[:, :1]).all()
    assert raw.duplicated().sum() == 6 * len(manifest["duplicated_rows"]) == 24, "4 images' rows appear twice"
    wide = read_labels(ds_dir / "stage_2_train.csv")
    assert set(wide.index) == train_ids, "every train DICOM (the corrupt one included) is labelled, nothing else"
    assert manifest["corrupt"][0] in wide.index
    sub = pd.read_csv(ds_dir / "stage_2_sample_submission.csv")
    assert set(sub["ID"].str.rsplit("_", n=1).str[0]) == test_ids and (sub["Label"] == 0.5).all()
    assert len(sub) == 6 * len(test_ids)
    test_truth = read_labels(ds_dir / "_truth" / "stage_2_test_truth.csv")
    assert set(test_truth.index) == test_ids and not (ds_dir / "stage_2_test" / "_truth").exists()
    assert set(truth["image_id"]) == train_ids | test_ids


def test_header_fields_like_rsna(headers: pd.DataFrame) -> None:
    assert (headers["file"] == headers["sop"]).all(), "file stem == SOPInstanceUID"
    assert headers["patient"].str.fullmatch(r"ID_[0-9a-f]{8}").all()
    assert headers["study"].str.fullmatch(r"ID_[0-9a-f]{10}").all()
    assert headers["series"].str.fullmatch(r"ID_[0-9a-f]{10}").all()
    assert (headers.groupby("study")["series"].nunique() == 1).all(), "exactly one series per study"
    assert not headers["thickness"].any() and not headers["instance"].any()


def test_deterministic_for_a_seed(ds_dir: Path, tmp_path: Path) -> None:
    generate(tmp_path / "again", workers=2, **KW)  # a process pool must not change a byte
    assert _hashes(tmp_path / "again") == _hashes(ds_dir)
    generate(tmp_path / "other", workers=1, **{**KW, "seed": 4})
    assert _hashes(tmp_path / "other").keys() != _hashes(ds_dir).keys()


def test_patient_level_split(headers: pd.DataFrame) -> None:
    by_split = headers.groupby("split")["patient"].apply(set)
    assert by_split["stage_2_train"] and by_split["stage_2_test"]
    assert not by_split["stage_2_train"] & by_split["stage_2_test"]
    studies = headers.groupby("patient")["study"].nunique()
    assert studies.between(1, 3).all()


def test_labels_consistent(ds_dir: Path, truth: pd.DataFrame) -> None:
    for path in (ds_dir / "stage_2_train.csv", ds_dir / "_truth" / "stage_2_test_truth.csv"):
        wide = read_labels(path)
        assert (wide["any"] == wide[list(SUBTYPES[:5])].max(axis=1)).all(), f"any != OR of subtypes in {path.name}"
        t = truth.set_index("image_id").loc[wide.index, list(SUBTYPES)]
        assert (t.to_numpy() == wide.to_numpy()).all()
    train = truth[truth["split"] == "train"]
    assert (train[list(SUBTYPES)].sum() > 0).all(), "every subtype is present in train"
    assert (truth["any"] == 0).any()


def test_corrupt_file_fails_to_decode(ds_dir: Path, manifest: dict, truth: pd.DataFrame) -> None:
    (bad,) = manifest["corrupt"]
    with pytest.raises(DicomError):
        read_hu(ds_dir / "stage_2_train" / f"{bad}.dcm")
    for image_id in truth.loc[truth["split"] == "train", "image_id"].head(12):
        if image_id != bad:
            assert read_hu(ds_dir / "stage_2_train" / f"{image_id}.dcm").shape[0] > 0


def test_12bit_bug_series_decodes_to_plausible_hu(ds_dir: Path, truth: pd.DataFrame) -> None:
    rows = truth[(truth["encoding"] == "bug12") & ~truth["corrupt"] & truth["u"].between(0.4, 0.7)]
    assert len(rows), "the test set has a 12-bit bug series"
    r = rows.iloc[0]
    path = ds_dir / f"stage_2_{r['split']}" / f"{r['image_id']}.dcm"
    ds = pydicom.dcmread(path)
    assert (int(ds.BitsStored), int(ds.PixelRepresentation)) == (12, 0) and float(ds.RescaleIntercept) > -100
    naive = ds.pixel_array.astype(np.float32) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    assert naive[:4, :4].mean() > 3000, "air is stored wrapped (-1000 -> ~3096)"
    hu = read_hu(path)
    assert abs(float(np.median(hu[:4, :4])) + 1000) < 30, "air ~ -1000 HU after the fix"
    assert ((hu > 15) & (hu < 55)).mean() > 0.1, "a brain-density region is present"


@pytest.mark.parametrize("encoding", sorted(ENCODINGS))
def test_every_pixel_encoding_round_trips_through_read_hu(encoding: str) -> None:
    plan = dataclasses.replace(plan_dataset(0, 1, 64, 0.0, (8, 8))[0], enc=encoding, explicit=encoding == "u12")
    hu = np.random.default_rng(1).uniform(-1010, 2000, (16, 12)).astype(np.float32)
    raw, hdr = encode_hu(hu, encoding)
    got = dataset_to_hu(pydicom.dcmread(io.BytesIO(dicom_bytes(plan, "ID_012345678", 5.0, raw, hdr, "1"))))
    lo, hi = (-1000, 3071) if encoding == "bug12" else (-1024, 2047 if encoding == "s12_0" else 3071)
    assert np.array_equal(got, np.clip(np.rint(hu), lo, hi))


def test_tilted_series_and_slice_order(headers: pd.DataFrame, truth: pd.DataFrame, manifest: dict) -> None:
    tilted = set(manifest["quirks"]["tilt"])
    assert tilted and len(tilted) < headers["series"].nunique()
    pos = truth.set_index("image_id")["pos_idx"]
    for series, g in headers.groupby("series"):
        iop = np.array(g["iop"].tolist())
        assert np.allclose(iop, iop[0])
        row, col = iop[0, :3], iop[0, 3:]
        angle = math.degrees(math.atan2(-col[2], col[1]))
        assert (10 <= angle <= 25) if series in tilted else angle == 0
        proj = np.array(g["ipp"].tolist()) @ np.cross(row, col)
        order = np.argsort(proj, kind="stable")
        assert (np.diff(pos.loc[g["file"]].to_numpy()[order]) >= 0).all(), "normal projection gives the true order"


def test_other_header_quirks(headers: pd.DataFrame, manifest: dict) -> None:
    q = manifest["quirks"]
    odd = headers[headers["series"].isin(q["odd_size"])]
    assert len(odd) and ((odd["rows"] != 64) | (odd["cols"] != 64)).all()
    for series in q["dup_position"]:
        ipp = headers.loc[headers["series"] == series, "ipp"].map(tuple)
        assert ipp.duplicated().sum() == 1, "one duplicated slice position"
    assert q["explicit_vr"] and q["multi_window"]


def test_bleed_core_brighter_than_same_place_unlabelled(ds_dir: Path, truth: pd.DataFrame) -> None:
    bleeds = pd.read_csv(ds_dir / "_truth" / "bleeds.csv")
    t = truth.set_index("image_id")
    core, faint = [], []
    for _, b in bleeds[bleeds["probe_radius_px"] >= 1].iterrows():
        me = t.loc[b["image_id"]]
        if me["corrupt"]:
            continue
        r, c = int(b["probe_row"]), int(b["probe_col"])
        on = read_hu(ds_dir / f"stage_2_{me['split']}" / f"{b['image_id']}.dcm")[r, c]
        series = truth[(truth["series_uid"] == b["series_uid"]) & (truth["any"] == 0) & ~truth["corrupt"]]
        near = series.iloc[np.argsort((series["pos_idx"] - me["pos_idx"]).abs().to_numpy(), kind="stable")]
        for _, other in near[(near["pos_idx"] - me["pos_idx"]).abs() <= 3].iterrows():
            off = read_hu(ds_dir / f"stage_2_{other['split']}" / f"{other['image_id']}.dcm")[r, c]
            if -20 <= off <= 60:  # the same place holds soft tissue / brain there, not air or bone
                (core if b["frac"] == 1 else faint).append(float(on - off))
                break
    assert len(core) >= 5
    assert np.median(core) > 15 and np.mean(np.array(core) > 8) >= 0.8, f"core contrast {np.round(core, 1)}"
    if faint:
        assert np.median(faint) < np.median(core), "partial-volume end slices are fainter than core slices"


def test_cli_prints_summary_and_overwrites_own_folder(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    args = ["--out", str(tmp_path / "d"), "--studies", "2", "--size", "32", "--slices", "8", "8", "--workers", "1"]
    main(args)
    s = main(args)
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith("phantom: ") and "train positives" in line and s["images"] >= 16
    (tmp_path / "foreign" / "stage_2_train").mkdir(parents=True)
    with pytest.raises(FileExistsError, match="not written by lib.phantom"):
        generate(tmp_path / "foreign", studies=1, size=32, slices=(8, 8), workers=1, progress=False)


@pytest.mark.slow
def test_default_demo_set_is_fast_and_balanced(tmp_path: Path) -> None:
    s = generate(tmp_path / "demo", progress=False)
    assert s["seconds"] < 90, f"default demo set took {s['seconds']} s"
    tr = s["train"]
    assert 800 <= s["images"] <= 1300 and all(tr["positives"][k] > 0 for k in SUBTYPES)
    assert 0.35 <= (tr["studies_with_bleed"] + s["test"]["studies_with_bleed"]) / s["studies"] <= 0.75
    assert 0.08 <= tr["positive_rate"]["any"] <= 0.4
