"""lib.windowing: window values by hand, policies, head crop, cache build / resume / bad files; lib.bench CLI."""
from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from lib.bench import preprocess as bench
from lib.io.dicom import read_hu
from lib.imaging.windowing import (POLICIES, WINDOWS, Box, Window, apply_window, build_cache, cache_key, create_policy,
                           head_box, load_cached, render, square_crop, window_uint8)


# ---------------------------------------------------------------- fixtures
def write_ct(path: Path, hu: np.ndarray) -> Path:
    """A minimal CT DICOM: int16 pixels = HU + 1024, RescaleIntercept -1024, slope 1."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality = CTImageStorage, meta.MediaStorageSOPInstanceUID, "CT"
    ds.Rows, ds.Columns = hu.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    ds.RescaleIntercept, ds.RescaleSlope = -1024, 1
    ds.PixelData = np.round(hu + 1024).astype(np.int16).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def head_phantom(shape=(512, 512), centre=(200, 300), radii=(110, 130), arc=True) -> np.ndarray:
    """HU image: air, an elliptic head (scalp 40, skull 1000, brain 35) and a thin table arc (400 HU) below it."""
    yy, xx = np.mgrid[:shape[0], :shape[1]].astype(np.float32)
    d = np.hypot((yy - centre[0]) / radii[0], (xx - centre[1]) / radii[1])
    hu = np.full(shape, -1000.0, np.float32)
    hu[d < 1.0] = 40
    hu[d < 0.95] = 1000
    hu[d < 0.88] = 35
    if arc:  # a head-rest arc (radius 600 px, 4 px thick, 400 HU) 40 px below the head, wider than the head
        ring = np.abs(np.hypot(yy - (centre[0] + radii[0] + 40 - 600), xx - centre[1]) - 600) < 2
        hu[ring & (yy > centre[0] + radii[0])] = 400
    return hu


@pytest.fixture()
def ct_dir(tmp_path: Path) -> Path:
    """6 small CT slices ID_000 .. ID_005 (64 x 64 heads of different sizes)."""
    for k in range(6):
        write_ct(tmp_path / "dcm" / f"ID_{k:03d}.dcm", head_phantom((64, 64), (30, 32), (14 + k, 16 + k), arc=False))
    return tmp_path / "dcm"


def pairs(folder: Path) -> list:
    return [(p.stem, p) for p in sorted(folder.glob("*.dcm"))]


# ---------------------------------------------------------------- windows
def test_brain_window_edges_by_hand():
    brain = WINDOWS["brain"]
    hu = np.array([-1000, 0, 20, 40, 60, 80, 3000], np.float32)
    np.testing.assert_allclose(apply_window(hu, brain), [0, 0, 0.25, 0.5, 0.75, 1.0, 1.0], atol=1e-6)
    # uint8 = floor(255 * x + 0.5): 20 HU -> 63.75 -> 64, 40 -> 127.5 -> 128, 60 -> 191.25 -> 191
    assert window_uint8(hu, brain).tolist() == [0, 0, 64, 128, 191, 255, 255]
    assert apply_window(hu, brain).dtype == np.float32 and window_uint8(hu, brain).dtype == np.uint8


@pytest.mark.parametrize("name, lo, hi", [("subdural", -20, 180), ("soft_tissue", -150, 230), ("bone", -800, 2000)])
def test_other_window_edges(name, lo, hi):
    w = WINDOWS[name]
    assert (w.lo, w.hi) == (lo, hi)
    np.testing.assert_allclose(apply_window(np.array([lo - 1, lo, (lo + hi) / 2, hi, hi + 1]), w),
                               [0, 0, 0.5, 1, 1], atol=1e-6)


def test_window_is_keyword_only_frozen_and_checked():
    with pytest.raises(TypeError):
        Window(40, 80)  # a bare (center, width) pair is exactly the bug this type prevents
    with pytest.raises(dataclasses.FrozenInstanceError):
        WINDOWS["brain"].center = 50
    with pytest.raises(ValueError, match="width"):
        Window(center=40, width=0)
    assert WINDOWS["brain"] == Window(center=40, width=80) and WINDOWS["subdural"] == Window(center=80, width=200)


# ---------------------------------------------------------------- policies
def test_unknown_policy_lists_names():
    with pytest.raises(KeyError) as err:
        create_policy("brian")
    for name in ("brain_subdural_soft", "bsb", "bone", "brain"):
        assert name in str(err.value)


def test_policies_channel_values():
    hu = np.full((4, 5), 40.0, np.float32)
    # 40 HU: brain (40/80) 128; subdural (80/200) 60*255/200 = 76.5 -> 77; soft (40/380) 128; bone (600/2800) 77
    assert create_policy("brain_subdural_soft")(hu)[0, 0].tolist() == [128, 77, 128]
    assert create_policy("bone")(hu)[0, 0].tolist() == [128, 77, 77]
    assert create_policy("brain")(hu)[0, 0].tolist() == [128, 128, 128]
    for name in POLICIES.names():
        out = create_policy(name)(hu)
        assert out.shape == (4, 5, 3) and out.dtype == np.uint8


def test_bsb_hist_channel_is_monotone_and_spans_range():
    hu = np.linspace(-1000, 2000, 64 * 64, dtype=np.float32).reshape(64, 64)
    hist = create_policy("bsb")(hu)[..., 2].ravel()
    assert hist.min() == 0 and hist.max() == 255 and np.all(np.diff(hist.astype(int)) >= 0)


# ---------------------------------------------------------------- crop
def test_crop_drops_table_arc_and_centres_head():
    hu = head_phantom()  # head: rows 90..310, cols 170..430; arc rows ~330..350
    box = head_box(hu)
    assert box is not None
    assert 75 <= box.top <= 92 and 308 <= box.bottom <= 325 and 155 <= box.left <= 172 and 428 <= box.right <= 445
    sq = square_crop(hu, box)
    assert sq.shape[0] == sq.shape[1] == max(box.bottom - box.top, box.right - box.left)
    assert (sq > 300).sum() > 0 and not np.any((sq > 300) & (sq < 500))  # skull kept, no 400 HU arc pixel
    img = render(hu, "brain", img_size=96)
    assert img.shape == (96, 96, 3)
    rows, cols = np.nonzero(img[..., 0])
    assert abs((rows.min() + rows.max()) / 2 - 47.5) <= 1.5 and abs((cols.min() + cols.max()) / 2 - 47.5) <= 1.5


def test_non_512_and_non_square_inputs():
    hu = head_phantom((300, 380), (150, 190), (90, 100))
    box = head_box(hu)
    assert box is not None and box.bottom <= 300 and box.right <= 380
    assert render(hu, img_size=64).shape == (64, 64, 3)
    # crop=False pads to a centred square instead of stretching: a circle stays a circle
    disc = head_phantom((100, 200), (50, 100), (40, 40), arc=False)
    img = render(disc, "brain", img_size=100, crop=False)
    rows, cols = np.nonzero(img[..., 0])
    assert abs((rows.max() - rows.min()) - (cols.max() - cols.min())) <= 1


def test_near_empty_slice_uses_whole_image():
    hu = np.full((128, 128), -1000.0, np.float32)
    hu[60:63, 60:63] = 40  # a speck, far below min_frac
    assert head_box(hu) is None
    np.testing.assert_array_equal(square_crop(hu, None), hu)
    assert render(hu, img_size=32).shape == (32, 32, 3)
    assert square_crop(np.zeros((10, 4), np.float32), Box(0, 10, 0, 4)).shape == (10, 10)


# ---------------------------------------------------------------- cache
def test_cache_key_is_pure_and_checked():
    assert cache_key("brain_subdural_soft", 256, True, "png") == "brain_subdural_soft-s256-crop-png"
    assert cache_key("bone", 128, False, "npy") == "bone-s128-full-npy"
    with pytest.raises(ValueError, match="format"):
        cache_key(fmt="jpg")
    with pytest.raises(KeyError, match="valid names"):
        cache_key("nope")


def test_cache_resume_subset_then_all(ct_dir: Path, tmp_path: Path):
    items = pairs(ct_dir)
    first = build_cache(items[:3], tmp_path / "cache", img_size=32, workers=1, progress=False)
    assert (first.written, first.skipped, first.bad) == (3, 0, 0)
    assert first.dir == tmp_path / "cache" / "brain_subdural_soft-s32-crop-png"
    stamps = {p.name: p.stat().st_mtime_ns for p in first.dir.glob("*.png")}
    df = pd.DataFrame(items + items[:1], columns=["image_id", "path"])  # an exact repeat is dropped
    second = build_cache(df, tmp_path / "cache", img_size=32, workers=2, progress=False)
    assert (second.written, second.skipped, second.bad) == (3, 3, 0)
    assert {p.name: p.stat().st_mtime_ns for p in first.dir.glob("*.png") if p.name in stamps} == stamps
    assert sorted(p.stem for p in first.dir.glob("*.png")) == [i for i, _ in items]
    meta = json.loads((first.dir / "meta.json").read_text())
    assert meta["policy"] == "brain_subdural_soft" and meta["img_size"] == 32 and meta["crop"] is True
    assert [w["center"] for w in meta["windows"]] == [40, 80, 40] and meta["fmt"] == "png"
    assert not (first.dir / "bad.csv").exists()
    with pytest.raises(ValueError, match="ID_000"):
        build_cache([("ID_000", items[0][1]), ("ID_000", items[1][1])], tmp_path / "cache", img_size=32)


def test_leftover_temp_file_is_ignored_and_cleaned(ct_dir: Path, tmp_path: Path):
    out = tmp_path / "cache" / cache_key(img_size=32)
    out.mkdir(parents=True)
    tmp = out / ".ID_000.png.4242.tmp"  # what a build killed mid-write leaves behind
    tmp.write_bytes(b"\x89PNG half a file")
    res = build_cache(pairs(ct_dir), tmp_path / "cache", img_size=32, workers=1, progress=False)
    assert (res.written, res.skipped) == (6, 0) and not tmp.exists()
    assert load_cached(res.dir, "ID_000").shape == (32, 32, 3)
    assert not list(out.glob(".*"))


def test_bad_files_recorded_not_raised(ct_dir: Path, tmp_path: Path):
    (ct_dir / "ID_bad.dcm").write_bytes(b"this is not a DICOM file" * 10)
    items = pairs(ct_dir) + [("ID_gone", ct_dir / "ID_gone.dcm")]
    res = build_cache(items, tmp_path / "cache", img_size=32, workers=2, progress=False)
    assert (res.written, res.bad) == (6, 2)
    bad = pd.read_csv(res.dir / "bad.csv")
    assert bad["image_id"].tolist() == ["ID_bad", "ID_gone"]
    assert bad["reason"].str.contains("DicomError").iloc[0] and bad["reason"].str.contains("FileNotFound").iloc[1]
    again = build_cache(items[:6], tmp_path / "cache", img_size=32, workers=1, progress=False)
    assert (again.written, again.skipped, again.bad) == (0, 6, 0)
    assert len(pd.read_csv(res.dir / "bad.csv")) == 2  # rows of images not retried are kept


@pytest.mark.parametrize("fmt", ["png", "npy"])
def test_load_cached_round_trip_channel_order(tmp_path: Path, fmt: str):
    write_ct(tmp_path / "dcm" / "ID_flat.dcm", np.full((40, 40), 60.0, np.float32))
    res = build_cache(pairs(tmp_path / "dcm"), tmp_path / "cache", img_size=16, crop=False, fmt=fmt, workers=1,
                      progress=False)
    img = load_cached(res.dir, "ID_flat")
    assert img.shape == (16, 16, 3) and img.dtype == np.uint8
    # 60 HU: brain 191.25 -> 191, subdural 102.0 -> 102, soft tissue 140.9 -> 141 (R, G, B = policy order)
    assert img[8, 8].tolist() == [191, 102, 141]
    with pytest.raises(FileNotFoundError, match="ID_nope"):
        load_cached(res.dir, "ID_nope")


def test_stale_meta_is_refused(ct_dir: Path, tmp_path: Path):
    res = build_cache(pairs(ct_dir)[:1], tmp_path / "cache", img_size=32, workers=1, progress=False)
    meta = json.loads((res.dir / "meta.json").read_text())
    (res.dir / "meta.json").write_text(json.dumps({**meta, "version": -1}))
    with pytest.raises(ValueError, match="meta.json"):
        build_cache(pairs(ct_dir), tmp_path / "cache", img_size=32, workers=1, progress=False)


# ---------------------------------------------------------------- bench CLI
def test_bench_preprocess_cli(tmp_path: Path, capsys):
    for k in range(3):
        write_ct(tmp_path / "stage_2_train" / f"ID_{k:03d}.dcm", head_phantom())
    write_ct(tmp_path / "stage_2_train" / "ID_small.dcm", head_phantom((64, 64), (30, 32), (14, 16), arc=False))
    res = bench.main(["preprocess", "--data", str(tmp_path), "--n", "5", "--size", "32", "--repeat", "1",
                      "--workers", "2"])
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == res
    assert res["n"] == 3 and res["workers"] == 2  # only the 512 x 512 files are timed
    for key in ("ceiling_ips", "naive_ips", "ours_1proc_ips", "ours_parallel_ips", "ours_vs_naive",
                "ours_vs_ceiling", "parallel_speedup"):
        assert res[key] > 0


# ---------------------------------------------------------------- real data
@pytest.mark.realdata
def test_real_series_cache(real_dir: Path, tmp_path: Path):
    files = sorted((real_dir / "rsna_ich" / "train_series_ID_44cfc8e964").glob("*.dcm"))[:4]
    res = build_cache([(f.stem, f) for f in files], tmp_path, img_size=64, workers=1, progress=False)
    assert (res.written, res.bad) == (4, 0)
    for f in files:
        box = head_box(read_hu(f))
        assert box is not None and box.bottom - box.top > 100
        img = load_cached(res.dir, f.stem)
        assert img.shape == (64, 64, 3) and img[..., 0].mean() > 20


def test_pool_survives_busy_cv2_threads_in_parent(ct_dir: Path, tmp_path: Path):
    """Regression: a parent whose cv2 thread pool had run made every forked worker hang in its first cv2 call."""
    code = ("import sys, cv2, numpy as np; from lib.imaging.windowing import build_cache; cv2.setNumThreads(4); "
            "[cv2.resize(np.ones((2048, 2048), np.float32), (999, 999)) for _ in range(5)]; "
            "items = [(p.stem, p) for p in sorted(__import__('pathlib').Path(sys.argv[1]).glob('*.dcm'))]; "
            "r = build_cache(items, sys.argv[2], img_size=16, workers=2, progress=False); print(r.written)")
    out = subprocess.run([sys.executable, "-c", code, str(ct_dir), str(tmp_path)], capture_output=True, text=True,
                         timeout=120, cwd=Path(__file__).resolve().parents[1])
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "6"
