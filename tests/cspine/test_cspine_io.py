"""lib.io.ct_volume on generated cervical-spine studies (both slice directions, RLE / JPEG 2000, both intercept
conventions, NIfTI masks) and the bad-study reasons; plus the real slice test1.dcm."""
from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pydicom
import pytest

from lib.io.ct_volume import (SegmentationShapeError, StudyError, read_ct_volume, read_slice_hu, segmentation_for,
                              segmentation_to_volume)
from lib.tasks.cspine.phantom import encode, plan_dataset, render_study, write_study

ARGS = dict(seed=3, studies=8, size=64, slices=(16, 24), test_studies=2)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A small generated set and its plans (same arguments -> the same studies)."""
    from lib.tasks.cspine.phantom import generate

    out = tmp_path_factory.mktemp("cspine")
    generate(out, progress=False, **ARGS)
    plans = {p.uid: p for p in plan_dataset(ARGS["seed"], ARGS["studies"], ARGS["size"], ARGS["slices"],
                                            ARGS["test_studies"])}
    return out, plans



def _folder(out: Path, plan) -> Path:
    return out / f"{plan.split}_images" / plan.uid


def _expected_hu(plan) -> np.ndarray:
    """What the reader should return: the rendered HU through the plan's storage, floored at -1024."""
    hu, _ = render_study(plan)
    raw = np.stack([encode(s, plan.encoding)[0] for s in hu]).astype(np.float32)
    return np.maximum(raw + (0 if plan.encoding == "s16_0" else -1024), -1024)


def test_both_slice_directions_and_all_syntaxes_read_exactly(data):
    out, plans = data
    seen = set()
    for plan in plans.values():
        vol = read_ct_volume(_folder(out, plan))
        assert vol.hu.dtype == np.float32 and vol.hu.shape == (plan.n_slices, plan.size, plan.size)
        np.testing.assert_array_equal(vol.hu, _expected_hu(plan))  # head end first, whichever way the files run
        numbers = vol.slice_numbers.tolist()
        assert numbers == (sorted(numbers) if plan.direction == "head_first" else sorted(numbers, reverse=True))
        assert np.all(np.diff(vol.positions) < 0) and vol.dropped == []
        assert vol.spacing == pytest.approx((plan.dz, plan.pixel_spacing, plan.pixel_spacing), abs=1e-3)
        ts = pydicom.dcmread(next(_folder(out, plan).glob("*.dcm")), stop_before_pixels=True).file_meta
        seen.add((plan.direction, str(ts.TransferSyntaxUID)))
    assert {d for d, _ in seen} == {"head_first", "feet_first"}
    assert {t for _, t in seen} >= {"1.2.840.10008.1.2.1", "1.2.840.10008.1.2.5", "1.2.840.10008.1.2.4.90"}


def test_int16_output(data):
    out, plans = data
    plan = next(iter(plans.values()))
    vol = read_ct_volume(_folder(out, plan), dtype=np.int16)
    assert vol.hu.dtype == np.int16
    np.testing.assert_array_equal(vol.hu, _expected_hu(plan).astype(np.int16))


def test_intercept_conventions_give_the_same_hu(data, tmp_path):
    _, plans = data
    base = next(p for p in plans.values() if p.syntax == "explicit")
    vols = {}
    for enc in ("s16_0", "u12_1024"):
        plan = replace(base, encoding=enc, split=enc, seg=False, boxes=False)
        write_study(tmp_path, plan)
        ds = pydicom.dcmread(next((tmp_path / f"{enc}_images" / plan.uid).glob("*.dcm")))
        assert (float(ds.RescaleIntercept), int(ds.PixelRepresentation)) == ((0, 1) if enc == "s16_0" else (-1024, 0))
        vols[enc] = read_ct_volume(tmp_path / f"{enc}_images" / plan.uid).hu
    np.testing.assert_array_equal(vols["s16_0"], vols["u12_1024"])
    assert vols["s16_0"].min() == -1024 and vols["s16_0"].max() > 900  # padding floored; bone present


def _bone_share(hu: np.ndarray, seg: np.ndarray) -> float:
    return float((hu[seg > 0] > 150).mean())


def test_segmentation_lines_up_and_a_flipped_reader_fails(data, tmp_path):
    out, plans = data
    base = next(p for p in plans.values() if p.split == "train")
    seg_plans = [replace(base, direction=d, seg=True, boxes=False, split=d) for d in ("head_first", "feet_first")]
    for plan in seg_plans:  # same study written both ways, each in its own folder (the mask name is the uid)
        write_study(tmp_path / plan.direction, plan)
    seg_plans += [p for p in plans.values() if p.seg]
    for plan in seg_plans:
        out = tmp_path / plan.split if plan.split in ("head_first", "feet_first") else data[0]
        vol = read_ct_volume(_folder(out, plan))
        seg = segmentation_for(vol, out / "segmentations" / f"{plan.uid}.nii")
        assert seg.dtype == np.uint8 and seg.shape == vol.hu.shape
        np.testing.assert_array_equal(seg, render_study(plan)[1])
        assert _bone_share(vol.hu, seg) > 0.9  # independent of the generator: mask voxels are bone
        for wrong in (seg[:, :, ::-1], seg[:, ::-1, :], seg[::-1]):  # mirrored in x, flipped in y, flipped in z
            assert not np.array_equal(wrong, seg)
            assert _bone_share(vol.hu, wrong) < 0.75
        # reading without the axis flips (only the transpose) is caught too
        import nibabel as nib
        naive = np.asarray(nib.load(str(out / "segmentations" / f"{plan.uid}.nii")).dataobj).transpose(2, 1, 0)
        assert _bone_share(vol.hu, naive[np.argsort(np.argsort(vol.slice_numbers))]) < 0.75
        # C1 (label 1) lies at the head end, T labels at the feet end
        z1, z7 = (np.nonzero(seg == lab)[0].mean() for lab in (1, 7))
        assert z1 < z7


def test_segmentation_shape_mismatch(data):
    out, plans = data
    plan = next(p for p in plans.values() if p.seg)
    nii = out / "segmentations" / f"{plan.uid}.nii"
    numbers = list(range(1, plan.n_slices))  # one slice short
    with pytest.raises(SegmentationShapeError, match="slices"):
        segmentation_to_volume(nii, numbers)
    with pytest.raises(SegmentationShapeError, match=r"\(Y, X\)"):
        segmentation_to_volume(nii, in_plane=(plan.size + 1, plan.size))
    assert segmentation_to_volume(nii).shape == (plan.n_slices, plan.size, plan.size)


def _copy(out: Path, plan, tmp_path: Path) -> Path:
    dst = tmp_path / plan.uid
    shutil.copytree(_folder(out, plan), dst)
    return dst


def _reason(folder: Path, **kw) -> str:
    with pytest.raises(StudyError) as info:
        read_ct_volume(folder, **kw)
    assert info.value.row()["reason"] == info.value.reason and str(folder) in str(info.value)
    return info.value.reason


def test_bad_studies_give_specific_reasons(data, tmp_path):
    out, plans = data
    plan = next(p for p in plans.values() if p.syntax == "explicit")
    folder = _copy(out, plan, tmp_path / "missing")
    (folder / "5.dcm").unlink()
    assert _reason(folder) == "missing_slice"

    folder = _copy(out, plan, tmp_path / "dup")
    shutil.copy(folder / "5.dcm", folder / "05.dcm")
    assert _reason(folder) == "duplicate_slice_number"

    folder = _copy(out, plan, tmp_path / "thick")
    ds = pydicom.dcmread(folder / "3.dcm")
    ds.SliceThickness = "5"
    ds.save_as(folder / "3.dcm")
    assert _reason(folder) == "mixed_thickness"

    folder = _copy(out, plan, tmp_path / "shape")
    ds = pydicom.dcmread(folder / "3.dcm")
    small = ds.pixel_array[:40, :40].copy()
    ds.Rows, ds.Columns, ds.PixelData = 40, 40, small.tobytes()
    ds.save_as(folder / "3.dcm")
    assert _reason(folder) == "mixed_shape"

    folder = _copy(out, plan, tmp_path / "garbage")
    for f in folder.glob("*.dcm"):
        f.write_bytes(b"not a dicom file")
    assert _reason(folder) == "no_readable_slice"

    empty = tmp_path / "empty"
    empty.mkdir()
    assert _reason(empty) == "no_slices"


def test_one_corrupt_slice_is_dropped_and_reported(data, tmp_path):
    out, plans = data
    plan = next(p for p in plans.values() if p.seg)
    folder = _copy(out, plan, tmp_path)
    data_bytes = (folder / "4.dcm").read_bytes()
    (folder / "4.dcm").write_bytes(data_bytes[: len(data_bytes) // 3])  # truncated inside PixelData
    vol = read_ct_volume(folder)
    assert [(Path(d.path).name, d.slice_number) for d in vol.dropped] == [("4.dcm", 4)]
    assert vol.hu.shape[0] == plan.n_slices - 1 and 4 not in vol.slice_numbers
    seg = segmentation_for(vol, out / "segmentations" / f"{plan.uid}.nii")  # still lines up without slice 4
    full = render_study(plan)[1]
    keep = [k for k in range(plan.n_slices) if plan.slice_number(k) != 4]
    np.testing.assert_array_equal(seg, full[keep])
    (folder / "6.dcm").write_bytes(b"\0" * 200)
    assert _reason(folder) == "too_many_dropped"
    assert read_ct_volume(folder, max_dropped=2).hu.shape[0] == plan.n_slices - 2


def test_files_without_modality_are_read(data):
    out, plans = data
    plan = next(p for p in plans.values() if not p.modality)
    ds = pydicom.dcmread(next(_folder(out, plan).glob("*.dcm")))
    assert "Modality" not in ds
    assert read_ct_volume(_folder(out, plan)).hu.shape[0] == plan.n_slices


@pytest.mark.realdata
def test_real_slice_reads_to_plausible_hu(real_dir, tmp_path):
    path = real_dir / "edge_cases" / "rsna2022-cspine" / "test1.dcm"
    if not path.is_file():
        pytest.skip(f"{path} not found")
    ds, hu = read_slice_hu(path, air_floor=None)
    assert "Modality" not in ds and float(ds.RescaleIntercept) == 0
    assert hu.shape == (512, 512) and hu.min() == -2048 and hu.max() == 2347
    inside = hu[hu > -2048]
    assert -1100 < np.percentile(inside, 5) < -800 and np.percentile(inside, 99.9) > 300  # air ... bone
    (tmp_path / "16").mkdir()
    shutil.copy(path, tmp_path / "16" / "16.dcm")
    vol = read_ct_volume(tmp_path / "16")
    assert vol.hu.shape == (1, 512, 512) and vol.hu.min() == -1024
    assert vol.spacing[1:] == pytest.approx((0.312, 0.312)) and vol.positions[0] == pytest.approx(1949.0)
