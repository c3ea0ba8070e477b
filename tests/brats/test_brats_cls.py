"""BraTS stage 2: zoomed mask prediction, the contour slice filter, chunking, the slice-sequence classifiers, the
central stack, bootstrap / fold AUCs, and a tiny resumable classifier training run."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from fastai.callback.core import Callback
from sklearn.metrics import roc_auc_score

from lib.evaluate.bootstrap import auc_ci, fold_auc_summary, rank_auc
from lib.models.slice_sequence import CLASSIFIERS, CnnLstm, central_stack, central_start, create_classifier
from lib.tasks.brats.chunks import CentralStackDataset, ChunkDataset, brats_id, chunk_starts, patient_mean
from lib.tasks.brats.classify import ClsConfig, patient_folds, predict_patients, train_classifier
from lib.tasks.brats.masks import contour_filter, select_slices, stack_slice, zoom_geometry, zoom_predict

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one intra-op thread (conftest)

TINY = dict(model="cnn_lstm", backbone="resnet10t", hidden=8, img_size=None, length=4, stride=2, epochs=2, lr=1e-3,
            bs=2, seed=0, pretrained_path=None, num_workers=0, device="cpu")


# ---------------------------------------------------------------- masks
def test_zoom_predict_identity_round_trip():
    """An identity predictor gets the zoomed image and hands back the input inside the crop's region, 0 outside."""
    h = w = 40
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    img = np.stack([xx / w, yy / h])[None]  # (1, 2, 40, 40): smooth ramps survive bilinear resampling
    out = zoom_predict(lambda b: b, img, zoom=1.2)
    (hz, wz), (top, left) = zoom_geometry(h, w, 1.2)
    assert (hz, wz, top, left) == (48, 48, 4, 4) and out.shape == img.shape and out.dtype == np.float32
    # original pixel i sits at crop coordinate (i + 0.5) * 1.2 - 4: pixels 3 .. 36 inside the crop (0 .. 40),
    # 4 .. 35 at least half a pixel from its edge, where bilinear resampling of a ramp is exact
    inside = slice(4, 36)
    np.testing.assert_allclose(out[..., inside, inside], img[..., inside, inside], atol=1e-5)
    assert not out[..., :3, :].any() and not out[..., 37:, :].any() and not out[..., :, :3].any()
    assert np.array_equal(zoom_predict(lambda b: b, img, zoom=1.0), img)


def test_zoom_predict_masks_map_back_to_original_frame():
    img = np.zeros((2, 1, 48, 48), np.float32)
    img[0, 0, 10:22, 26:38] = 1.0  # an off-centre square
    seen = []

    def predict(b: np.ndarray) -> torch.Tensor:
        seen.append(int((b[0, 0] > 0.5).sum()))
        return torch.from_numpy(np.concatenate([b > 0.5, b <= 0.5], axis=1).astype(np.float32))  # K = 2

    out = zoom_predict(predict, img, zoom=1.2, batch_size=1)
    assert out.shape == (2, 2, 48, 48) and len(seen) == 2
    assert seen[0] == pytest.approx(144 * 1.44, rel=0.1)  # the predictor saw the magnified square
    back, truth = out[0, 0] > 0.5, img[0, 0] > 0.5
    assert (back & truth).sum() / (back | truth).sum() > 0.9
    with pytest.raises(ValueError, match="zoom must be >= 1"):
        zoom_predict(predict, img, zoom=0.8)
    with pytest.raises(ValueError, match="predict_fn returned shape"):
        zoom_predict(lambda b: b[:, :, :10], img)


def _square(mask: np.ndarray, y: int, x: int, n: int, m: int = 0) -> None:
    mask[y:y + n, x:x + (m or n)] = True


def test_contour_filter_by_hand():
    """cv2 areas: an n x m block has (n-1)(m-1). Brain 21 x 21 -> 400."""
    brain = np.zeros((40, 40), bool)
    _square(brain, 5, 5, 21)
    small, large, edge = (np.zeros_like(brain) for _ in range(3))
    _square(small, 10, 10, 3)          # 4 / 400 = 0.01
    _square(large, 10, 10, 6)          # 25 / 400 = 0.0625
    _square(edge, 10, 10, 3, 6)        # 10 / 400 = 0.025: not > 0.025
    assert not contour_filter(brain, small) and contour_filter(brain, large)
    assert not contour_filter(brain, edge) and contour_filter(brain, edge, min_ratio=0.02)
    assert not contour_filter(brain, np.zeros_like(brain)) and not contour_filter(np.zeros_like(brain), large)
    blobs = large.copy()
    for k in range(5):                 # 1 + 5 separate blobs = 6 contours
        _square(blobs, 18, 6 + 4 * k, 2)
    assert not contour_filter(brain, blobs) and contour_filter(brain, blobs, max_contours=6)
    with pytest.raises(ValueError, match="one shape"):
        contour_filter(brain, large[:10])


def test_stack_slice_and_select_slices():
    img = np.array([[0, 50], [100, 200]], np.float32)
    wt, et = np.array([[0, 1], [1, 1]], bool), np.array([[0, 0], [0, 1]], np.uint8)
    s = stack_slice(img, wt, et)
    assert s.dtype == np.uint8 and s.shape == (3, 2, 2)
    assert s[0].tolist() == [[0, 64], [128, 255]] and s[1].tolist() == [[0, 255], [255, 255]]
    assert s[2].tolist() == [[0, 0], [0, 255]]
    assert stack_slice(img, wt, et, vmax=100)[0].tolist() == [[0, 128], [255, 255]]

    vol = np.zeros((4, 32, 32), np.float32)
    vol[:, 4:28, 4:28] = 100.0          # brain 24 x 24 -> area 529
    wt_p, et_p = np.zeros_like(vol), np.zeros_like(vol)
    wt_p[0, 10:12, 10:12] = 0.9         # area 1: too small
    wt_p[1:3, 10:18, 10:18] = 0.9       # area 49: kept
    et_p[2, 12:14, 12:14] = 0.8
    wt_p[3, 10:18, 10:18] = 0.4         # below threshold
    kept, stacks = select_slices(vol, wt_p, et_p)
    assert kept.tolist() == [1, 2] and stacks.shape == (2, 3, 32, 32) and stacks.dtype == np.uint8
    assert (stacks[:, 1] == 255).sum(axis=(1, 2)).tolist() == [64, 64]
    assert stacks[0, 2].max() == 0 and (stacks[1, 2] == 255).sum() == 4 and stacks[0, 0, 5, 5] == 255
    kept, stacks = select_slices(vol[3:], wt_p[3:], et_p[3:])
    assert kept.shape == (0,) and stacks.shape == (0, 3, 32, 32)


# ---------------------------------------------------------------- chunks
def test_chunk_starts():
    assert chunk_starts(40) == [0, 5] and chunk_starts(35) == [0] and chunk_starts(10) == [0]
    assert chunk_starts(0) == [] and chunk_starts(47) == [0, 5, 10]
    assert chunk_starts(47, cover_end=True) == [0, 5, 10, 12] and chunk_starts(36, cover_end=True) == [0, 1]
    assert chunk_starts(45, cover_end=True) == [0, 5, 10]
    with pytest.raises(ValueError, match="stride"):
        chunk_starts(10, stride=0)


def test_chunk_dataset_shapes_and_masks(tmp_path):
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (6, 3, 8, 8), dtype=np.uint8)
    b = rng.integers(0, 256, (3, 3, 8, 8), dtype=np.uint8)
    np.save(tmp_path / "b.npy", b)
    items = [(12, a), ("34", tmp_path / "b.npy"), ("00056", np.zeros((0, 3, 8, 8), np.uint8))]
    ds = ChunkDataset(items, {"00012": 1, 34: 0, "56": 1}, length=4, stride=2)
    assert len(ds) == 3 and ds.patients == ["00012", "00012", "00034"]  # 56 has no slices: no chunk
    it = ds[1]
    assert it["x"].shape == (4, 3, 8, 8) and it["x"].dtype == torch.float32 and it["mask"].all()
    np.testing.assert_allclose(it["x"].numpy(), a[2:6] / 255.0, rtol=1e-6)
    it = ds[2]
    assert it["mask"].tolist() == [True, True, True, False] and not it["x"][3].any()
    assert it["y"].dtype == torch.float32 and it["y"].ndim == 0 and it["y"].item() == 0 and it["patient"] == "00034"
    test = ChunkDataset(items[:1], None, length=4, stride=2, size=16)
    assert test[0]["x"].shape == (4, 3, 16, 16) and torch.isnan(test[0]["y"])
    with pytest.raises(KeyError, match="no label"):
        ChunkDataset(items, {"00012": 1}, length=4)
    with pytest.raises(ValueError, match="Z, 3, H, W"):
        ChunkDataset([("1", a[:, 0])], None)


def test_patient_mean_and_ids():
    s = patient_mean([12, "00012", "7"], torch.tensor([0.2, 0.4, 0.9]))
    assert s.index.tolist() == ["00007", "00012"] and s.name == "MGMT_value" and s.index.name == "BraTS21ID"
    assert s.tolist() == pytest.approx([0.9, 0.3])
    with pytest.raises(ValueError, match="one each"):
        patient_mean(["1"], [0.1, 0.2])
    with pytest.raises(ValueError, match="BraTS21ID"):
        brats_id("ab12")


# ---------------------------------------------------------------- models
def test_cnn_lstm_forward_backward_and_mask():
    torch.manual_seed(0)
    model = create_classifier("cnn_lstm", backbone="resnet10t", hidden=8)
    assert isinstance(model, CnnLstm) and model.num_features == 512
    x = torch.rand(2, 4, 3, 32, 32)
    mask = torch.tensor([[True, True, False, False], [True, True, True, True]])
    out = model(x, mask)
    assert out.shape == (2,)
    out.sum().backward()
    assert model.fc.weight.grad is not None and model.cnn.conv1[0].weight.grad.abs().sum() > 0
    model.eval()
    with torch.no_grad():
        ref = model(x, mask)
        noisy = x.clone()
        noisy[0, 2:] = torch.rand(2, 3, 32, 32)  # padded slices' content must not matter
        alone = model(x[:1, :2], mask[:1, :2])    # nor how much padding follows the real slices
    assert torch.allclose(model(noisy, mask), ref, atol=1e-6) and torch.allclose(alone, ref[:1], atol=1e-5)
    with pytest.raises(KeyError, match="cnn_lstm, resnet10_3d"):
        create_classifier("lstm_cnn")
    assert CLASSIFIERS.names() == ["cnn_lstm", "resnet10_3d"]


@pytest.mark.slow  # importing monai takes 5-20 s on the shared CPUs
def test_resnet10_3d_forward(tmp_path):
    model = create_classifier("resnet10_3d")
    out = model(torch.rand(1, 1, 8, 32, 32))
    assert out.shape == (1,) and torch.isfinite(out).all()
    torch.save({f"module.{k}": v for k, v in model.net.state_dict().items()}, tmp_path / "w.pth")
    again = create_classifier("resnet10_3d", pretrained_path=tmp_path / "w.pth")
    assert torch.equal(again.net.conv1.weight, model.net.conv1.weight)
    assert not torch.equal(again.net.fc.weight, model.net.fc.weight)  # the classifier is not loaded
    rng = np.random.default_rng(0)
    vols = [(f"{i:05d}", rng.integers(0, 256, (6, 32, 32), dtype=np.uint8)) for i in range(6)]
    labels = {pid: i % 2 for i, (pid, _) in enumerate(vols)}
    cfg = ClsConfig(**{**TINY, "model": "resnet10_3d", "length": 8, "epochs": 1})
    res = train_classifier(tmp_path / "run", "FLAIR_fold1", vols[:4], vols[4:], labels, cfg)
    assert res["n_train_chunks"] == 4 and res["oof"].index.tolist() == ["00004", "00005"]
    assert (tmp_path / "run/models/cls/FLAIR_fold1/best.pth").is_file()


def test_central_stack_picks_largest_area_slice():
    vol = np.zeros((7, 6, 6), np.int16)
    for z, n in enumerate([1, 2, 3, 4, 5, 6, 2]):
        vol[z, :n, :n] = z + 1
    assert central_start(vol, 4) == 3
    st = central_stack(vol, 4)
    assert st.shape == (4, 6, 6) and st.dtype == np.int16 and np.array_equal(st[2], vol[5])
    assert np.array_equal(st, vol[3:7])
    st = central_stack(vol, 6)  # slices 2..7: the last is past the end -> zeros
    assert np.array_equal(st[:5], vol[2:7]) and not st[5].any()
    vol[0, :, :] = 1  # now slice 0 is the largest: window -1..1
    st = central_stack(vol, 3)
    assert not st[0].any() and np.array_equal(st[1:], vol[:2])


def test_central_stack_dataset():
    vol = np.zeros((5, 8, 8), np.uint8)
    vol[1:4, 2:6, 2:6] = 255
    vol[2] = 255
    ds = CentralStackDataset([("3", vol)], {"00003": 1}, depth=4, size=16)
    it = ds[0]
    assert it["x"].shape == (1, 4, 16, 16) and it["x"].max() == 1.0 and it["mask"].tolist() == [True] * 4
    it = CentralStackDataset([("3", vol)], None, depth=8)[0]
    assert it["mask"].tolist() == [False, False, True, True, True, True, True, False]  # window -2 .. 5


# ---------------------------------------------------------------- bootstrap and fold AUCs
def test_auc_ci_matches_sklearn_loop():
    y = np.array([0, 0, 1, 0, 0, 0])
    p = np.array([0.1, 0.4, 0.4, 0.35, 0.8, 0.2])  # a tie across classes
    res = auc_ci(y, p, n_boot=300, seed=3)
    assert res["auc"] == pytest.approx(roc_auc_score(y, p))
    idx = np.random.default_rng(3).integers(0, 6, size=(300, 6))
    boots = [roc_auc_score(y[i], p[i]) for i in idx if 0 < y[i].sum() < 6]
    assert res["n_boot"] == len(boots) < 300  # one-class resamples are skipped
    assert [res["lo"], res["hi"]] == pytest.approx(np.quantile(boots, [0.025, 0.975]).tolist())
    rng = np.random.default_rng(0)
    yy, pp = rng.integers(0, 2, (5, 30)), rng.integers(0, 5, (5, 30)).astype(float)
    assert rank_auc(yy, pp) == pytest.approx([roc_auc_score(a, b) for a, b in zip(yy, pp)])
    with pytest.raises(ValueError, match="both classes"):
        auc_ci([1, 1], [0.2, 0.3])
    s = auc_ci(pd.Series(y, index=list("abcdef")), pd.Series(p[::-1], index=list("fedcba")), n_boot=10)
    assert s["auc"] == pytest.approx(res["auc"])  # Series are aligned by index


def test_fold_auc_summary_by_hand():
    y = [0, 1, 0, 1, 1, 0, 1, 1]
    p = [0.1, 0.9, 0.8, 0.3, 0.5, 0.5, 0.2, 0.7]
    folds = [0, 0, 0, 0, 1, 1, 1, 2]  # fold 0: 3/4 pairs; fold 1: (1/2 + 0) / 2; fold 2: one class
    res = fold_auc_summary(y, p, folds)
    assert res["per_fold"][:2] == pytest.approx([0.75, 0.25]) and np.isnan(res["per_fold"][2])
    assert res["folds"] == [0, 1, 2] and res["mean"] == pytest.approx(0.5) and res["std"] == pytest.approx(0.25)
    assert res["pooled"] == pytest.approx(roc_auc_score(y, p))


# ---------------------------------------------------------------- folds, config, training
def test_patient_folds_stratified():
    labels = pd.Series([1, 0] * 10, index=[str(i) for i in range(20)])
    f = patient_folds(labels, n_folds=5, seed=1)
    assert f.index[0] == "00000" and f.name == "fold" and sorted(f.unique()) == [0, 1, 2, 3, 4]
    pos = pd.Series(labels.to_numpy(), index=[brats_id(i) for i in labels.index]).groupby(f).sum()
    assert pos.tolist() == [2] * 5
    assert patient_folds(labels.iloc[::-1], 5, 1).equals(f)


def test_cls_config_checks():
    with pytest.raises(KeyError, match="cnn_lstm, resnet10_3d"):
        ClsConfig(**{**TINY, "model": "gru"})
    with pytest.raises(KeyError, match="unknown ClsConfig keys"):
        ClsConfig.from_dict({**TINY, "dropuot": 0.1})
    with pytest.raises(ValueError, match="stride"):
        ClsConfig(**{**TINY, "stride": 0})


class Kill(Callback):
    """Simulate a kill in epoch `at` after its log row is written but before its checkpoint is."""

    order = 62

    def __init__(self, at: int) -> None:
        self.at = at

    def after_epoch(self) -> None:
        if self.epoch == self.at:
            raise RuntimeError("simulated kill")


class CountBatches(Callback):
    def __init__(self) -> None:
        self.n = 0

    def after_batch(self) -> None:
        self.n += int(self.training)


def tiny_data(n: int = 8, z: int = 6, size: int = 32):
    """n patients of z random slices (length 4, stride 2: 2 chunks each); half train, half valid."""
    rng = np.random.default_rng(0)
    items = [(f"{i:05d}", rng.integers(0, 256, (z, 3, size, size), dtype=np.uint8)) for i in range(n)]
    labels = {pid: i % 2 for i, (pid, _) in enumerate(items)}
    return items[: n // 2], items[n // 2:], labels


@pytest.mark.slow
def test_train_classifier_checkpoints_and_resumes(tmp_path):
    train, valid, labels = tiny_data()
    cfg = ClsConfig(**TINY)
    full = train_classifier(tmp_path / "a", "FLAIR_fold0", train, valid, labels, cfg)
    mdir_a, mdir_b = (tmp_path / r / "models/cls/FLAIR_fold0" for r in "ab")
    assert sorted(p.name for p in mdir_a.iterdir()) == ["best.pth", "epoch1.pth", "log.csv", "oof.csv",
                                                        "train_result.json"]
    assert full["epochs_done"] == 2 and full["oof"].index.tolist() == [p for p, _ in valid]
    assert full["valid_auc"] == pytest.approx(roc_auc_score([labels[p] for p, _ in valid], full["oof"]), abs=1e-6)
    assert full["valid_auc"] == pytest.approx(max(h["patient_auc"] for h in full["history"]))

    with pytest.raises(RuntimeError, match="simulated kill"):
        train_classifier(tmp_path / "b", "FLAIR_fold0", train, valid, labels, cfg, cbs=[Kill(1)])
    assert sorted(p.name for p in mdir_b.glob("epoch*.pth")) == ["epoch0.pth"]
    counter = CountBatches()
    resumed = train_classifier(tmp_path / "b", "FLAIR_fold0", train, valid, labels, cfg, cbs=[counter])
    assert resumed["resumed_from"].endswith("epoch0.pth") and counter.n == 4  # epoch 1 only: 8 chunks / bs 2
    final_a, final_b = (torch.load(m / "epoch1.pth", weights_only=True)["model"] for m in (mdir_a, mdir_b))
    assert all(torch.equal(final_a[k], final_b[k]) for k in final_a)
    assert [h["patient_auc"] for h in resumed["history"]] == [h["patient_auc"] for h in full["history"]]
    pd.testing.assert_series_equal(resumed["oof"], full["oof"])
    assert pd.read_csv(mdir_b / "log.csv")["epoch"].tolist() == [0, 1]

    counter = CountBatches()
    again = train_classifier(tmp_path / "b", "FLAIR_fold0", train, valid, labels, cfg, cbs=[counter])
    assert counter.n == 0 and again["resumed_from"].endswith("epoch1.pth") and again["best_epoch"] == full["best_epoch"]
    with pytest.raises(ValueError, match="config changed"):
        train_classifier(tmp_path / "b", "FLAIR_fold0", train, valid, labels, ClsConfig(**{**TINY, "lr": 1.0}))
    model = create_classifier("cnn_lstm", backbone="resnet10t", hidden=8)
    model.load_state_dict(torch.load(mdir_a / "best.pth", weights_only=True)["model"])
    pd.testing.assert_series_equal(predict_patients(model, valid, cfg), full["oof"])
