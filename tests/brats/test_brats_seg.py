"""BraTS stage 1 (2D tumour segmentation): the smp model factory, Dice + BCE loss, Dice / IoU metrics, slice
extraction from task-1 NIfTI (exclusion of task-2 patients, thinning, resume, bad cases), the slice dataset, case
split, and a tiny fastai training run with its artefacts, exact resume after a kill, and inference."""
from __future__ import annotations

import gzip
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from fastai.callback.core import Callback

from lib.evaluate.metrics import METRICS, dice_per_channel, iou_per_channel, overlap_counts
from lib.io.mr_series import normalise
from lib.io.nifti import MODALITIES, read_brats_case, region_channels, write_nifti
from lib.models.segmentation import SEG_ARCHS, DiceBCELoss, create_seg_model, freeze_encoder
from lib.tasks.brats.phantom import generate
from lib.tasks.brats.seg_data import SegSliceDataset, extract_slices, load_slice_table, select_slices, split_cases
from lib.train.callbacks import EpochCheckpoint, seed_everything
from lib.train.seg import SegConfig, load_seg_model, predict_seg, train_seg

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one intra-op thread (conftest)
REAL_CASE = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "real" / "brats2021_task1" / \
    "BraTS2021_00006"
TINY = dict(arch="unet", encoder="tu-mobilenetv3_small_050", encoder_weights=None, img_size=32, epochs=2,
            freeze_epochs=1, lr=1e-3, bs=4, seed=0, dice_weight=1.0, bce_weight=1.0, num_workers=0)


@pytest.fixture(scope="module")
def phantom(tmp_path_factory) -> Path:
    """8 patients on a 32 x 32 x 21 grid: 3 task-1 cases, one of them also a task-2 train patient (~2 s)."""
    out = tmp_path_factory.mktemp("brats")
    generate(out, patients=8, size=32, slices=(12, 12), progress=False)
    return out


@pytest.fixture(scope="module")
def slices(phantom: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("slices")
    extract_slices(phantom / "task1", out, exclude_ids=[], size=32, progress=False)
    return out


def task2_ids(phantom: Path) -> set:
    return {p.name for split in ("train", "test") for p in (phantom / "task2" / split).iterdir()}


# ------------------------------------------------------------------------------------------------ model factory
def test_unetplusplus_densenet121_builds_offline() -> None:
    model = create_seg_model("unetplusplus", "densenet121", in_channels=4, classes=2)
    with torch.no_grad():
        assert model.eval()(torch.zeros(1, 4, 64, 64)).shape == (1, 2, 64, 64)
    assert "unetplusplus" in SEG_ARCHS and "fpn" in SEG_ARCHS


def test_unknown_names_list_the_valid_ones() -> None:
    with pytest.raises(KeyError, match="unetplusplus"):
        create_seg_model("unet3000", "resnet18", 4, 2)
    with pytest.raises(KeyError, match="densenet121"):
        create_seg_model("unet", "resnet9000", 4, 2)
    with pytest.raises(KeyError, match="valid keys"):
        SegConfig.from_dict({**TINY, "learning_rate": 1.0})
    with pytest.raises(ValueError, match="multiple of 32"):
        SegConfig(**{**TINY, "img_size": 40})
    assert SegConfig.from_params(**{**TINY, "encoder_weights": ""}).encoder_weights is None


def test_encoder_weights_from_a_local_file(tmp_path: Path) -> None:
    """A 3-channel encoder file loads into a 4-channel model the way smp adapts ImageNet weights; a file of
    another encoder is a ValueError naming it."""
    src = create_seg_model("unet", "resnet18", in_channels=3, classes=2)
    torch.save(src.encoder.state_dict(), tmp_path / "enc.pth")
    model = create_seg_model("unet", "resnet18", 4, 2, encoder_weights_path=tmp_path / "enc.pth")
    w3, w4 = src.encoder.conv1.weight, model.encoder.conv1.weight
    assert w4.shape[1] == 4
    torch.testing.assert_close(w4[:, 3], w3[:, 0] * 3 / 4)
    torch.testing.assert_close(model.encoder.layer4[1].conv2.weight, src.encoder.layer4[1].conv2.weight)
    torch.save({"conv1.weight": torch.zeros(64, 3, 7, 7), "junk.weight": torch.zeros(3)}, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="bad.pth"):
        create_seg_model("unet", "resnet18", 4, 2, encoder_weights_path=tmp_path / "bad.pth")
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        create_seg_model("unet", "resnet18", 4, 2, encoder_weights_path=tmp_path / "nope.pth")
    freeze_encoder(model, True)
    assert not any(p.requires_grad for p in model.encoder.parameters())
    assert all(p.requires_grad for p in model.decoder.parameters())
    assert all(p.requires_grad for p in freeze_encoder(model, False).parameters())


# ------------------------------------------------------------------------------------------------ loss, metrics
def test_dice_bce_loss_hand_example() -> None:
    """Logits 0 (p = 0.5) on a 2 x 2 target with one positive: Dice = (2 * 0.5 + 1) / (2 + 1 + 1) = 0.5,
    BCE = ln 2, so the loss is 0.5 + ln 2 (weights 1, 1)."""
    z, y = torch.zeros(1, 1, 2, 2), torch.tensor([[[[1.0, 0], [0, 0]]]])
    assert DiceBCELoss()(z, y).item() == pytest.approx(0.5 + math.log(2), rel=1e-6)
    assert DiceBCELoss(dice_weight=2.0, bce_weight=0.0)(z, y).item() == pytest.approx(1.0, rel=1e-6)
    with pytest.raises(ValueError, match="positive sum"):
        DiceBCELoss(0.0, 0.0)


def test_dice_iou_by_hand_incl_empty_masks() -> None:
    """Over the whole set: channel 0 has 3 predicted, 2 true, 1 shared pixels -> Dice 2/5, IoU 1/4; channel 1 is
    empty in both -> 1.0; channel 2 misses its one pixel -> 0."""
    pred = np.zeros((2, 3, 2, 2), bool)
    true = np.zeros((2, 3, 2, 2), bool)
    pred[0, 0, 0, 0] = pred[0, 0, 0, 1] = pred[1, 0, 1, 1] = True
    true[0, 0, 0, 0] = true[1, 0, 0, 0] = True
    true[1, 2, 1, 0] = True
    np.testing.assert_allclose(dice_per_channel(pred, true), [0.4, 1.0, 0.0])
    np.testing.assert_allclose(iou_per_channel(pred, true.astype(np.uint8)), [0.25, 1.0, 0.0])
    assert [c.tolist() for c in overlap_counts(pred, true)] == [[1, 0, 0], [3, 0, 0], [2, 0, 1]]
    assert METRICS.get("dice") is dice_per_channel and METRICS.get("iou") is iou_per_channel
    with pytest.raises(ValueError, match="binary"):
        dice_per_channel(pred * 0.5, true)
    with pytest.raises(ValueError, match="one shape"):
        iou_per_channel(pred[:1], true)


# ------------------------------------------------------------------------------------------------ slices
def test_extract_slices_contents(phantom: Path, slices: Path) -> None:
    table = load_slice_table(slices)
    assert list(table.columns) == ["case_id", "plane", "slice", "path", "wt_frac", "et_frac"]
    assert set(table["plane"]) == {"axial", "coronal", "sagittal"} and (table["wt_frac"] > 0).all()
    pd.testing.assert_frame_equal(pd.read_parquet(slices / "slices.parquet"), table)
    row = table[table["plane"] == "axial"].iloc[0]
    case = read_brats_case(phantom / "task1" / f"BraTS2021_{row.case_id}")
    with np.load(row.path) as z:
        image, mask = z["image"], z["mask"]
    assert image.dtype == np.float16 and image.shape == (4, 32, 32)
    assert mask.dtype == np.uint8 and mask.shape == (2, 32, 32)
    k = int(row.slice)  # 32 x 32 axial slices are not resized: compare with the volume directly
    want = np.stack([normalise(case.images[m], "zscore_nonzero")[:, :, k] for m in MODALITIES])
    np.testing.assert_allclose(image.astype(np.float32), want, atol=2e-3, rtol=2e-3)
    np.testing.assert_array_equal(mask, region_channels(case.seg[:, :, k], ("WT", "ET")))
    assert row.wt_frac == pytest.approx(mask[0].mean()) and row.et_frac == pytest.approx(mask[1].mean())
    assert json.loads((slices / "meta.json").read_text())["size"] == 32
    assert pd.read_csv(slices / "bad_cases.csv").empty


def test_select_slices_threshold_and_thinning() -> None:
    wt = np.zeros((4, 4, 6), np.uint8)
    for k, n in enumerate([0, 1, 2, 3, 1, 4]):  # axial WT fraction n / 16
        wt[:, :, k].flat[:n] = 1
    keep, frac = select_slices(wt, "axial", min_fraction=1 / 16, keep_every=1)
    assert keep.tolist() == [2, 3, 5] and frac.tolist() == [2 / 16, 3 / 16, 4 / 16]
    assert select_slices(wt, "axial", 1 / 16, keep_every=2)[0].tolist() == [2, 5]
    brain = np.zeros_like(wt, dtype=bool)  # the seed's rule: tumour area / brain area, here brain = 8 of 16 pixels
    brain[:2] = True
    assert select_slices(wt, "axial", 2 / 8, keep_every=1, brain=brain)[0].tolist() == [3, 5]


def test_task2_patients_excluded_and_resume(phantom: Path, tmp_path: Path) -> None:
    excluded = task2_ids(phantom)
    in_task1 = {p.name[-5:] for p in (phantom / "task1").iterdir()}
    assert excluded & in_task1, "the phantom has a patient in both trees"
    out = tmp_path / "sl"
    table = extract_slices(phantom / "task1", out, excluded, size=32, progress=False)
    assert set(table["case_id"]) == in_task1 - excluded
    assert not any((out / "slices" / i).exists() for i in excluded)
    files = {p: p.stat().st_mtime_ns for p in (out / "slices").rglob("*.npz")}
    again = extract_slices(phantom / "task1", out, excluded, size=32, progress=False)  # nothing redone
    pd.testing.assert_frame_equal(again, table)
    assert {p: p.stat().st_mtime_ns for p in (out / "slices").rglob("*.npz")} == files
    redo = table["case_id"].iloc[0]
    (out / "cases" / f"{redo}.json").unlink()  # as if killed before the case finished
    third = extract_slices(phantom / "task1", out, excluded, size=32, progress=False)
    pd.testing.assert_frame_equal(third, table)
    changed = {p for p, t in files.items() if p.stat().st_mtime_ns != t}
    assert changed and {p.parent.name for p in changed} == {redo}
    with pytest.raises(ValueError, match="meta.json"):
        extract_slices(phantom / "task1", out, excluded, size=64, progress=False)
    with pytest.raises(ValueError, match="5-digit"):
        extract_slices(phantom / "task1", out, [6], size=32, progress=False)
    moved = tmp_path / "moved"
    out.rename(moved)  # the table follows a moved folder
    assert all(Path(p).is_file() and str(p).startswith(str(moved)) for p in load_slice_table(moved)["path"])


def test_bad_cases_are_listed_not_fatal(phantom: Path, tmp_path: Path) -> None:
    root = tmp_path / "task1"
    shutil.copytree(phantom / "task1", root)
    good = sorted(p.name for p in root.iterdir())
    a, b, c = (root / f"BraTS2021_9999{i}" for i in range(3))
    for d in (a, b, c):
        shutil.copytree(root / good[0], d)
        for f in d.iterdir():
            f.rename(d / f.name.replace(good[0], d.name))
    (a / f"{a.name}_t2.nii.gz").unlink()                                                   # missing file
    write_nifti(b / f"{b.name}_t1.nii.gz", np.zeros((32, 32, 5), np.int16), np.eye(4))      # other grid
    (c / f"{c.name}_seg.nii.gz").write_bytes(gzip.compress(b"not a nifti"))               # unreadable
    (root / "notes").mkdir()                                                               # not a case folder
    out = tmp_path / "sl"
    table = extract_slices(root, out, [], size=32, planes=("axial",), progress=False)
    assert set(table["case_id"]) == {g[-5:] for g in good} and set(table["plane"]) == {"axial"}
    bad = pd.read_csv(out / "bad_cases.csv", dtype=str).set_index("folder")
    assert bad["reason"].to_dict() == {a.name: "missing", b.name: "grid_mismatch", c.name: "invalid",
                                       "notes": "bad_name"}
    assert "t2" in bad.loc[a.name, "detail"]


def test_dataset_flips_and_case_split(slices: Path) -> None:
    table = load_slice_table(slices)
    stack, mask = SegSliceDataset(table, augment=False, channels="stack")[0]
    assert stack.dtype == mask.dtype == torch.float32 and stack.shape == (4, 32, 32) and mask.shape == (2, 32, 32)
    single = SegSliceDataset(table, augment=False)  # the seed: one modality per item, 4 items per slice
    assert len(single) == 4 * len(table)
    for m in range(4):
        image, mask_m = single[m]
        assert image.shape == (1, 32, 32) and torch.equal(image[0], stack[m]) and torch.equal(mask_m, mask)
    image = single[0][0]
    aug = SegSliceDataset(table, augment=True)
    torch.manual_seed(0)
    flips = set()
    for _ in range(12):
        im, mk = aug[0]
        dims = next(d for d in ([], [-1], [-2], [-1, -2]) if torch.equal(mk, mask.flip(d) if d else mask))
        assert torch.equal(im, image.flip(dims) if dims else image)  # the image got the mask's flip
        flips.add(tuple(dims))
    assert len(flips) > 1
    ids = table["case_id"].unique()
    tr, va = split_cases(table["case_id"], 0.34, seed=1)
    assert sorted(tr + va) == sorted(ids) and not set(tr) & set(va) and len(va) == 1
    assert split_cases(ids, 0.34, seed=1) == (tr, va)
    with pytest.raises(ValueError, match="valid_frac"):
        split_cases(ids, 1.0, seed=0)


@pytest.mark.realdata
@pytest.mark.slow
def test_real_case_axial_slices(tmp_path: Path) -> None:
    """BraTS2021_00006 (240 x 240 x 155): every 8th tumour axial slice at 64 px; WT fractions from the real seg."""
    if not REAL_CASE.is_dir():
        pytest.skip(f"real BraTS case not found at {REAL_CASE}")
    shutil.copytree(REAL_CASE, tmp_path / "task1" / REAL_CASE.name)
    table = extract_slices(tmp_path / "task1", tmp_path / "sl", [], size=64, planes=("axial",), keep_every=8,
                           progress=False)
    seg = read_brats_case(REAL_CASE).seg
    brain = np.stack([v != 0 for v in read_brats_case(REAL_CASE).images.values()]).any(axis=0)
    keep, frac = select_slices(region_channels(seg, ("WT",))[0], "axial", 0.01, 8, brain)
    assert table["slice"].tolist() == keep.tolist() and np.allclose(table["wt_frac"], frac) and len(table) > 2
    with np.load(table["path"].iloc[0]) as z:
        assert z["image"].shape == (4, 64, 64) and set(np.unique(z["mask"])) <= {0, 1} and z["mask"][0].any()


# ------------------------------------------------------------------------------------------------ training
class Kill(Callback):
    """Simulate a kill in epoch `at` after its log row is written but before its checkpoint is."""

    order = 62  # CSVLogger (60) < Kill < EpochCheckpoint (65)

    def __init__(self, at: int) -> None:
        self.at = at

    def after_epoch(self) -> None:
        if self.epoch == self.at:
            raise RuntimeError("simulated kill")


def test_epoch_checkpoint_mode_is_checked(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="'min' or 'max'"):
        EpochCheckpoint(tmp_path, SegConfig(**TINY), {}, True, True, monitor="dice", mode="up")


@pytest.mark.slow
def test_train_resume_and_predict(slices: Path, tmp_path: Path) -> None:
    table = load_slice_table(slices)
    _, valid = split_cases(table["case_id"], 0.34, seed=0)
    cfg = SegConfig(**TINY, device=None)
    full = train_seg(tmp_path / "a", table, valid, cfg, SegSliceDataset, ("WT", "ET"))
    mdir = tmp_path / "a" / "models" / "seg"
    assert {p.name for p in mdir.iterdir()} == {"log.csv", "best.pth", "epoch0.pth", "epoch1.pth",
                                                "train_result.json"}
    assert {"valid_dice_wt", "valid_dice_et", "valid_iou_wt", "valid_iou_et", "best_epoch"} <= set(full)
    assert 0 <= full["valid_dice_wt"] <= 1 and full["best_epoch"] in (0, 1)
    assert pd.read_csv(mdir / "log.csv").columns.tolist() == ["epoch", "train_loss", "valid_loss", "dice", "dice_wt",
                                                             "dice_et", "iou_wt", "iou_et", "time"]
    assert json.loads((mdir / "train_result.json").read_text())["best_epoch"] == full["best_epoch"]
    # warm-up: the encoder's weights did not move in epoch 0 (freeze_epochs=1), they did in epoch 1
    seed_everything(cfg.seed)  # as train_seg does before building the network
    init = create_seg_model(cfg.arch, cfg.encoder, 1, 2).state_dict()
    ep0, ep1 = (torch.load(mdir / f"epoch{e}.pth", weights_only=True)["model"] for e in (0, 1))
    enc = [k for k, v in init.items() if k.startswith("encoder.") and v.is_floating_point() and "running" not in k]
    assert all(torch.equal(ep0[k], init[k]) for k in enc) and not all(torch.equal(ep1[k], init[k]) for k in enc)
    assert not torch.equal(ep0["segmentation_head.0.weight"], init["segmentation_head.0.weight"])

    # killed in epoch 1, resumed: the same weights and log as the uninterrupted run
    with pytest.raises(RuntimeError, match="simulated kill"):
        train_seg(tmp_path / "b", table, valid, cfg, SegSliceDataset, ("WT", "ET"), cbs=[Kill(1)])
    resumed = train_seg(tmp_path / "b", table, valid, cfg, SegSliceDataset, ("WT", "ET"))
    assert resumed["resumed_from"].endswith("epoch0.pth")
    b1 = torch.load(tmp_path / "b" / "models" / "seg" / "epoch1.pth", weights_only=True)["model"]
    assert all(torch.equal(b1[k], ep1[k]) for k in ep1)
    assert [h["train_loss"] for h in resumed["history"]] == [h["train_loss"] for h in full["history"]]
    assert pd.read_csv(tmp_path / "b" / "models" / "seg" / "log.csv")["epoch"].tolist() == [0, 1]

    # a finished run is not redone
    log = (mdir / "log.csv").read_text()
    again = train_seg(tmp_path / "a", table, valid, cfg, SegSliceDataset, ("WT", "ET"))
    assert again["resumed_from"].endswith("epoch1.pth") and again["epochs_done"] == 2
    assert (mdir / "log.csv").read_text() == log
    with pytest.raises(ValueError, match="config changed"):
        train_seg(tmp_path / "a", table, valid, SegConfig(**{**TINY, "lr": 2e-3}, device=None), SegSliceDataset, ("WT", "ET"))

    model = load_seg_model(mdir / "best.pth")
    images = np.stack([np.load(p)["image"][:1] for p in table["path"][:3]])
    probs = predict_seg(model, images, bs=2, device=None)  # None: as "auto" (cpu here)
    assert probs.dtype == np.float32 and probs.shape == (3, 2, 32, 32) and 0 <= probs.min() <= probs.max() <= 1
    with torch.no_grad():
        want = torch.sigmoid(model(torch.from_numpy(images.astype(np.float32)))).numpy()
    np.testing.assert_allclose(probs, want, atol=1e-6)
