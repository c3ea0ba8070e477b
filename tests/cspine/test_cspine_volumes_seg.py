"""Cervical spine 3D segmentation chain on a tiny phantom: the volume cache (resampling, windowing, file identity,
bad studies, refusal of other parameters, the process pool), the native ir-CSN, the SEG3D factory, the focal-Jaccard
loss on a hand example, sliding-window inference, patches, and a tiny fastai training with its artefacts, exact
resume after a kill, no redo of a finished run, and predicted masks."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Dict, Tuple

import numpy as np
import pandas as pd
import pytest
import torch
from fastai.callback.core import Callback

import lib.io.ct_volume as ct_volume
from lib.imaging.volume_cache import (cache_dir_for, cache_volumes, load_segmentation, load_volume, read_cache_table,
                                      resampled_shape, window)
from lib.io.ct_volume import read_ct_volume
from lib.models.csn import IrCSN, csn_encoder
from lib.models.seg3d import SEG3D, FocalJaccardLoss, create_seg3d, sliding_window_predict
from lib.tasks.cspine.phantom import generate
from lib.tasks.cspine.seg import Seg3dConfig, load_seg3d, predict_masks, train_seg3d
from lib.tasks.cspine.seg_data import PatchDataset, cervical_labels

WINDOW = (-1000.0, 2000.0)


@pytest.fixture(scope="module")
def phantom(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("cspine")
    generate(out, studies=6, seed=1, size=32, slices=(16, 24), test_studies=1, progress=False)
    return out


def _studies(root: Path) -> Tuple[Dict[str, Path], Dict[str, Path]]:
    studies = {p.name: p for p in sorted((root / "train_images").iterdir())}
    segs = {p.stem: p for p in sorted((root / "segmentations").glob("*.nii"))}
    return studies, segs


@pytest.fixture(scope="module")
def cached(phantom: Path, tmp_path_factory: pytest.TempPathFactory) -> Tuple[Path, pd.DataFrame]:
    studies, segs = _studies(phantom)
    root = tmp_path_factory.mktemp("cache")
    table, bad = cache_volumes(studies, root, hu_window=WINDOW, workers=0, progress=False, seg_paths=segs)
    assert bad.empty and len(table) == len(studies)
    return cache_dir_for(root, hu_window=WINDOW), table


class Counter:
    """Counts read_ct_volume calls (the cache imports it at call time in its worker function)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.read: list = []
        monkeypatch.setattr(ct_volume, "read_ct_volume", self)

    def __call__(self, folder, *args, **kwargs):
        self.read.append(Path(folder).name)
        return read_ct_volume(folder, *args, **kwargs)


# ---------------------------------------------------------------- volume cache
def test_window_by_hand() -> None:
    hu = np.array([-1100, -1000, 500, 2000, 2500], np.float32)
    assert window(hu, WINDOW, "uint8").tolist() == [0, 0, 128, 255, 255]  # 1500 / 3000 * 255 = 127.5 -> 128
    np.testing.assert_allclose(window(hu, WINDOW, "float16").astype(float), [0, 0, 0.5, 1, 1])
    assert resampled_shape((20, 32, 32), (2.5, 0.5, 0.5), (5.0, 1.0, 1.0)) == ((10, 16, 16), (5.0, 1.0, 1.0))
    assert resampled_shape((20, 32, 30), (2.5, 0.5, 0.5), size=(8, 16, 16))[1] == (6.25, 1.0, 0.9375)


def test_cache_resamples_and_keeps_identity(phantom: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    studies, segs = _studies(phantom)
    target = (4.0, 2.0, 2.0)
    counter = Counter(monkeypatch)
    table, bad = cache_volumes(studies, tmp_path, spacing=target, workers=0, progress=False, seg_paths=segs)
    assert bad.empty and sorted(counter.read) == sorted(studies) and table["study_id"].tolist() == list(studies)
    cdir = cache_dir_for(tmp_path, spacing=target)
    assert (cdir / "meta.json").is_file() and read_cache_table(cdir)["shape"].tolist() == table["shape"].tolist()
    for _, row in table.iterrows():
        native = read_ct_volume(studies[row["study_id"]])
        want_shape, want_spacing = resampled_shape(native.hu.shape, native.spacing, target)
        img = load_volume(cdir, row)
        assert isinstance(img, np.memmap) and img.dtype == np.uint8 and img.shape == want_shape == row["shape"]
        assert row["spacing"] == want_spacing and np.allclose(row["spacing"], target, rtol=0.25)
        if row["study_id"] in segs:
            seg = load_segmentation(cdir, row)
            assert seg.shape == img.shape and seg.dtype == np.uint8 and set(np.unique(seg)) <= set(range(11))
            assert (seg > 0).any()
        else:
            assert pd.isna(row["seg_path"])
            with pytest.raises(ValueError, match="no segmentation"):
                load_segmentation(cdir, row)

    # unchanged studies are not re-read; touching one file re-reads that study only
    counter.read.clear()
    again, _ = cache_volumes(studies, tmp_path, spacing=target, workers=0, progress=False, seg_paths=segs)
    assert counter.read == [] and again.equals(table)
    first = next(iter(studies))
    dcm = sorted(studies[first].glob("*.dcm"))[0]
    st = dcm.stat()
    os.utime(dcm, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    again, _ = cache_volumes(studies, tmp_path, spacing=target, workers=0, progress=False, seg_paths=segs)
    assert counter.read == [first]
    assert again.loc[0, "fingerprint"] != table.loc[0, "fingerprint"] and again["shape"].equals(table["shape"])

    # a broken study (a middle slice removed) -> a bad row, the others untouched
    broken = tmp_path / "studies" / "broken"
    shutil.copytree(studies[first], broken)
    (broken / "5.dcm").unlink()
    counter.read.clear()
    table2, bad2 = cache_volumes({**studies, "broken": broken}, tmp_path, spacing=target, workers=0, progress=False,
                                 seg_paths=segs)
    assert counter.read == ["broken"] and "broken" not in set(table2["study_id"])
    assert bad2.to_dict("records")[0]["study_id"] == "broken" and bad2.loc[0, "reason"] == "missing_slice"

    # fixed size + float16; a folder whose meta.json holds other parameters is refused
    sized, _ = cache_volumes(studies, tmp_path, size=(8, 16, 16), dtype="float16", workers=0, progress=False)
    cdir16 = cache_dir_for(tmp_path, size=(8, 16, 16), dtype="float16")
    vol = load_volume(cdir16, sized.iloc[0], mmap=False)
    assert set(sized["shape"]) == {(8, 16, 16)} and vol.dtype == np.float16 and 0 <= vol.min() <= vol.max() <= 1
    (cdir16 / "meta.json").write_text(json.dumps({"spacing": None}))
    with pytest.raises(ValueError, match="other parameters"):
        cache_volumes(studies, tmp_path, size=(8, 16, 16), dtype="float16", workers=0, progress=False)
    with pytest.raises(ValueError, match="not both"):
        cache_volumes(studies, tmp_path, spacing=target, size=(8, 16, 16))


def test_cache_process_pool(phantom: Path, tmp_path: Path) -> None:
    studies, segs = _studies(phantom)
    serial, _ = cache_volumes(studies, tmp_path / "a", size=(8, 16, 16), workers=0, progress=False, seg_paths=segs)
    pooled, _ = cache_volumes(studies, tmp_path / "b", size=(8, 16, 16), workers=2, progress=False, seg_paths=segs)
    assert pooled.equals(serial)
    a, b = cache_dir_for(tmp_path / "a", size=(8, 16, 16)), cache_dir_for(tmp_path / "b", size=(8, 16, 16))
    for _, row in serial.iterrows():
        assert np.array_equal(load_volume(a, row), load_volume(b, row))


# ---------------------------------------------------------------- networks and loss
@pytest.mark.parametrize("depth", [26, 50])
def test_csn_shapes(depth: int) -> None:
    model = IrCSN(depth, in_channels=3, num_classes=7).eval()
    x = torch.randn(1, 3, 8, 32, 32)
    with torch.no_grad():
        feats, logits = model.forward_features(x), model(x)
    assert [tuple(f.shape[1:]) for f in feats] == [(64, 8, 16, 16), (256, 8, 8, 8), (512, 4, 4, 4), (1024, 2, 2, 2),
                                                   (2048, 1, 1, 1)]
    assert logits.shape == (1, 7)
    if depth == 50:  # the parameter count of mmaction2's / pytorchvideo's ir-CSN-50 backbone
        assert round(sum(p.numel() for p in model.parameters() if p.ndim) / 1e6 - 2048 * 7 / 1e6, 1) == 12.3
    enc = csn_encoder(26, in_channels=1)
    assert enc.out_channels == [64, 256, 512, 1024, 2048]


def test_csn_loads_mmaction_style_weights(tmp_path: Path) -> None:
    """A 3-channel checkpoint with mmaction2's 'backbone.' keys under 'state_dict' loads into a 1-channel encoder."""
    src = IrCSN(26, in_channels=3)
    path = tmp_path / "csn.pth"
    torch.save({"state_dict": {f"backbone.{k}": v for k, v in src.state_dict().items()}}, path)
    enc = csn_encoder(26, in_channels=1, pretrained_path=path)
    got = enc.net.state_dict()
    assert torch.equal(got["layer4.1.conv2.0.conv.weight"], src.state_dict()["layer4.1.conv2.0.conv.weight"])
    torch.testing.assert_close(got["conv1.conv.weight"], src.conv1.conv.weight.sum(1, keepdim=True))
    torch.save({"conv1.conv.weight": src.conv1.conv.weight}, path)
    with pytest.raises(KeyError, match="lacks"):
        csn_encoder(26, in_channels=1, pretrained_path=path)
    with pytest.raises(ValueError, match="depth must be one of"):
        IrCSN(34)


def test_seg3d_factory() -> None:
    small = {"csn_unet": {"depth": 26, "decoder_channels": (32, 16, 16, 8, 8)},
             "unet": {"channels": (4, 8, 16), "num_res_units": 1}, "segresnet": {"init_filters": 8}}
    assert SEG3D.names() == sorted(small)
    x = torch.randn(1, 1, 8, 24, 24)
    for name, kwargs in small.items():
        with torch.no_grad():
            assert create_seg3d(name, 1, 8, **kwargs).eval()(x).shape == (1, 8, 8, 24, 24), name
    with pytest.raises(KeyError, match="csn_unet, segresnet, unet"):
        create_seg3d("vnet", 1, 8)


def test_focal_jaccard_loss_by_hand() -> None:
    # uniform logits, 2 classes, every voxel background: p = 0.5 everywhere
    # focal = 0.5^2 * ln 2; Jaccard: class 0 I = 4, U = 8 -> 0.5; class 1 I = 0, U = 4 -> 1; mean 0.75
    logits, target = torch.zeros(1, 2, 2, 2, 2), torch.zeros(1, 2, 2, 2, dtype=torch.long)
    assert FocalJaccardLoss(2)(logits, target).item() == pytest.approx(0.25 * np.log(2) + 0.75, rel=1e-5)
    weighted = FocalJaccardLoss(2, focal_weight=0.0, class_weights=(3.0, 1.0))
    assert weighted(logits, target).item() == pytest.approx((3 * 0.5 + 1 * 1.0) / 4, rel=1e-5)
    sure = torch.stack([torch.full((2, 2, 2), 20.0), torch.full((2, 2, 2), -20.0)])[None]
    assert FocalJaccardLoss(2)(sure, target).item() == pytest.approx(0.0, abs=1e-4)  # absent class predicted absent
    with pytest.raises(ValueError, match="logits"):
        FocalJaccardLoss(3)(logits, target)


def test_sliding_window_shape() -> None:
    torch.manual_seed(0)
    model = create_seg3d("unet", 1, 8, channels=(4, 8, 16), num_res_units=1)
    vol = np.random.default_rng(0).random((13, 40, 28), dtype=np.float32)
    probs = sliding_window_predict(model, vol, roi=(8, 16, 16), overlap=0.25, bs=2, device="cpu")
    assert probs.shape == (8, 13, 40, 28) and probs.dtype == np.float32
    np.testing.assert_allclose(probs.sum(0), 1.0, atol=1e-4)


# ---------------------------------------------------------------- patches and training
def test_patches(cached: Tuple[Path, pd.DataFrame]) -> None:
    cdir, table = cached
    rows = table[table["seg_path"].notna()]
    assert cervical_labels(np.array([0, 3, 7, 8, 10], np.uint8)).tolist() == [0, 3, 7, 0, 0]
    ds = PatchDataset(cdir, rows, (8, 16, 16), 3, augment=False, fg_prob=1.0, flips=False, seed=0)
    x, y = ds[0]
    assert len(ds) == 3 * len(rows) and x.shape == (1, 8, 16, 16) and x.dtype == torch.float32
    assert y.shape == (8, 16, 16) and y.dtype == torch.int64 and 0 < y.max() <= 7 and 0 <= x.min() <= x.max() <= 1
    assert torch.equal(ds[1][0], PatchDataset(cdir, rows, (8, 16, 16), 3, False, 1.0, False, seed=0)[1][0])
    big = PatchDataset(cdir, rows, (64, 48, 48), 1, augment=True, fg_prob=0.5, flips=True)
    assert big[0][0].shape == (1, 64, 48, 48)  # smaller volumes are zero-padded
    with pytest.raises(ValueError, match="seg_path"):
        PatchDataset(cdir, table, (8, 16, 16), 1, False, 1.0, False)


TINY = dict(arch="unet", arch_kwargs={"channels": [4, 8, 16], "num_res_units": 1}, pretrained_path=None,
            roi=[8, 16, 16], epochs=2, lr=3e-3, final_lr=1e-4, wd=1e-2, bs=2, seed=0, samples_per_volume=4,
            valid_samples=2, fg_prob=0.8, flips=True, focal_weight=1.0, jaccard_weight=1.0, focal_gamma=2.0,
            num_workers=0, device="cpu")


class Kill(Callback):
    def __init__(self, at: int) -> None:
        self.at = at

    def after_epoch(self) -> None:
        if self.epoch == self.at:
            raise RuntimeError("simulated kill")


def test_config_checks() -> None:
    with pytest.raises(KeyError, match="unknown Seg3dConfig keys"):
        Seg3dConfig.from_dict({**TINY, "img_size": 3})
    with pytest.raises(KeyError, match="valid names"):
        Seg3dConfig(**{**TINY, "arch": "vnet"})
    assert Seg3dConfig.from_params(**{**TINY, "pretrained_path": ""}).pretrained_path is None


@pytest.mark.slow
def test_train_resume_and_predict(cached: Tuple[Path, pd.DataFrame], tmp_path: Path) -> None:
    cdir, table = cached
    masked = table.loc[table["seg_path"].notna(), "study_id"].tolist()
    valid = masked[-1:]
    cfg = Seg3dConfig.from_dict(TINY)
    full = train_seg3d(tmp_path / "a", table, valid, cfg, cdir)
    mdir = tmp_path / "a" / "models" / "seg3d"
    assert {p.name for p in mdir.iterdir()} == {"log.csv", "best.pth", "epoch0.pth", "epoch1.pth", "train_result.json"}
    assert {"valid_dice", *(f"valid_dice_C{i}" for i in range(1, 8))} <= set(full)
    assert 0 <= full["valid_dice"] <= 1 and full["best_epoch"] in (0, 1) and full["n_valid"] == 1
    log = pd.read_csv(mdir / "log.csv")
    assert log["epoch"].tolist() == [0, 1] and {"dice", "dice_c1", "dice_c7", "iou_c7"} <= set(log.columns)
    assert json.loads((mdir / "train_result.json").read_text())["best_epoch"] == full["best_epoch"]

    # killed after epoch 0, resumed: the same weights and losses as the uninterrupted run
    with pytest.raises(RuntimeError, match="simulated kill"):
        train_seg3d(tmp_path / "b", table, valid, cfg, cdir, cbs=[Kill(1)])
    resumed = train_seg3d(tmp_path / "b", table, valid, cfg, cdir)
    assert resumed["resumed_from"].endswith("epoch0.pth")
    a1, b1 = (torch.load(d / "models" / "seg3d" / "epoch1.pth", weights_only=True)["model"]
              for d in (tmp_path / "a", tmp_path / "b"))
    assert all(torch.equal(a1[k], b1[k]) for k in a1)
    assert [h["train_loss"] for h in resumed["history"]] == [h["train_loss"] for h in full["history"]]

    # a finished run is not redone; a changed experiment setting is refused
    text = (mdir / "log.csv").read_text()
    again = train_seg3d(tmp_path / "a", table, valid, cfg, cdir)
    assert again["epochs_done"] == 2 and again["resumed_from"].endswith("epoch1.pth")
    assert (mdir / "log.csv").read_text() == text
    with pytest.raises(ValueError, match="config changed"):
        train_seg3d(tmp_path / "a", table, valid, Seg3dConfig.from_dict({**TINY, "lr": 1e-3}), cdir)

    model, saved = load_seg3d(mdir / "best.pth")
    assert saved.roi == (8, 16, 16)
    vol = load_volume(cdir, table.iloc[0])
    mask = predict_masks(mdir / "best.pth", vol, device="cpu")
    assert mask.shape == vol.shape and mask.dtype == np.uint8 and mask.max() <= 7
    assert np.array_equal(predict_masks(model, vol, roi=(8, 16, 16), device="cpu"), mask)
