"""lib.train: the metric-weighted loss, fold splits, exact resume after a kill, fold -1, and 2-process DDP on CPU."""
from __future__ import annotations

import json
import math
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
import torch
from fastai.callback.core import Callback

from lib.tasks.ich.labels import SUBTYPES
from lib.evaluate.metrics import weighted_log_loss
from lib.tasks.ich.labels import WEIGHTS
from lib.train.fit import TrainConfig, WeightedBCE, launch, split_fold, train_fold

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one intra-op thread (conftest)


# every experiment setting, as TrainConfig has no defaults for them (the notebook's parameters cell holds them)
TINY = dict(arch="resnet18", img_size=32, pretrained_weights=None, mode="single", aug="light", epochs=1, lr=3e-3,
            wd=1e-2, bs=4, schedule="one_cycle", opt="adamw", neg_frac=1.0, seed=0, mixed_precision="auto",
            channels_last=False, drop_rate=0.0, pct_start=0.25, warmup_pct=0.05, max_train_items=None,
            max_valid_items=None, patience=None, num_workers=0, norm="timm")


def make_data(root: Path, n: int = 18, n_folds: int = 3, size: int = 40, seed: int = 0):
    """A cache of n random PNGs, labels with some positives, and folds (image i -> fold i % n_folds)."""
    rng = np.random.default_rng(seed)
    cache = root / "cache"
    cache.mkdir(parents=True)
    ids = [f"ID_{i:09x}" for i in range(n)]
    for i in ids:
        cv2.imwrite(str(cache / f"{i}.png"), rng.integers(0, 256, (size, size, 3), dtype=np.uint8))
    y = (rng.random((n, len(SUBTYPES))) < 0.3).astype(np.uint8)
    y[:, -1] = y[:, :-1].max(axis=1)
    labels = pd.DataFrame(y, index=pd.Index(ids, name="image_id"), columns=list(SUBTYPES))
    folds = pd.DataFrame({"image_id": ids, "patient_id": ids, "study_uid": ids, "series_uid": ids,
                          "fold": np.arange(n) % n_folds})
    return cache, folds, labels


def state_dicts_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def log_epochs(model_dir: Path) -> list:
    return pd.read_csv(model_dir / "log.csv")["epoch"].tolist()


def test_weighted_bce_hand_example():
    """One image, all logits 0 except `any` = L with label 1: (5 ln 2 + 2 softplus(-L)) / 7."""
    L = 2.0
    z = torch.tensor([[0, 0, 0, 0, 0, L]])
    y = torch.tensor([[0, 0, 0, 0, 0, 1.0]])
    expected = (5 * math.log(2) + 2 * math.log1p(math.exp(-L))) / 7
    assert WeightedBCE(WEIGHTS)(z, y).item() == pytest.approx(expected, rel=1e-6)


def test_weighted_bce_equals_competition_metric():
    rng = np.random.default_rng(1)
    z = rng.normal(0, 2, (64, 6)).clip(-8, 8)  # sigmoid stays inside [1e-6, 1 - 1e-6]: the metric does not clip
    y = (rng.random((64, 6)) < 0.3).astype(np.float64)
    loss = WeightedBCE(WEIGHTS)(torch.tensor(z, dtype=torch.float32), torch.tensor(y, dtype=torch.float32)).item()
    assert loss == pytest.approx(weighted_log_loss(y, 1 / (1 + np.exp(-z)), WEIGHTS), rel=1e-5)
    plain = torch.nn.functional.binary_cross_entropy_with_logits(torch.tensor(z), torch.tensor(y)).item()
    assert abs(loss - plain) > 1e-4  # the any-weighting matters


def test_config_rejects_unknown_keys():
    with pytest.raises(KeyError, match="valid keys"):
        TrainConfig.from_dict({"arch": "resnet18", "learning_rate": 1e-3})
    with pytest.raises(KeyError, match=r"needs values for \['img_size'"):
        TrainConfig.from_dict({"arch": "resnet18"})


def test_from_params_maps_the_notebooks_unset_literals():
    params = {**TINY, "pretrained_weights": "", "patience": 0, "max_train_items": 0, "max_valid_items": 5}
    cfg = TrainConfig.from_params(**params)
    assert (cfg.pretrained_weights, cfg.patience, cfg.max_train_items, cfg.max_valid_items) == (None, None, None, 5)
    assert TrainConfig.from_params(**{**params, "patience": 2}).patience == 2


def test_split_fold(tmp_path):
    _, folds, labels = make_data(tmp_path, n=9)
    cfg = TrainConfig(**TINY)
    tr, ytr, va, yva = split_fold(folds, labels, 1, cfg)
    assert set(va) == set(folds.loc[folds.fold == 1, "image_id"]) and not set(tr) & set(va)
    np.testing.assert_array_equal(yva, labels.loc[va].to_numpy(np.float32))
    tr_all, _, va_all, _ = split_fold(folds, labels, -1, cfg)
    assert len(tr_all) == 9 and len(va_all) == 0
    with pytest.raises(ValueError, match="fold 7"):
        split_fold(folds, labels, 7, cfg)
    with pytest.raises(KeyError, match="no labels"):
        split_fold(folds, labels.iloc[:-1], 0, cfg)


class Kill(Callback):
    """Simulate a kill in epoch `at` after its log row is written but before its checkpoint is."""

    order = 62  # CSVLogger (60) < Kill < EpochCheckpoint (65)

    def __init__(self, at: int) -> None:
        self.at = at

    def after_epoch(self) -> None:
        if self.epoch == self.at:
            raise RuntimeError("simulated kill")


def test_resume_after_kill_equals_uninterrupted(tmp_path):
    cache, folds, labels = make_data(tmp_path)
    cfg = TrainConfig(**{**TINY, "epochs": 3, "drop_rate": 0.2, "neg_frac": 0.7, "aug": "demo"})
    full = train_fold(tmp_path / "a", cache, folds, labels, 0, cfg, WEIGHTS)
    with pytest.raises(RuntimeError, match="simulated kill"):
        train_fold(tmp_path / "b", cache, folds, labels, 0, cfg, WEIGHTS, cbs=[Kill(2)])
    mdir_a, mdir_b = (tmp_path / r / "models/cnn/fold0" for r in "ab")
    assert sorted(p.name for p in mdir_b.glob("epoch*.pth")) == ["epoch0.pth", "epoch1.pth"]
    assert log_epochs(mdir_b) == [0, 1, 2]  # epoch 2 was logged but never checkpointed
    assert "opt" not in torch.load(mdir_b / "epoch0.pth", weights_only=True)  # keep_optimizer="last"

    resumed = train_fold(tmp_path / "b", cache, folds, labels, 0, cfg, WEIGHTS)
    assert resumed["resumed_from"].endswith("epoch1.pth")
    assert log_epochs(mdir_b) == [0, 1, 2]  # the stale row was replaced, not duplicated
    assert [h["epoch"] for h in resumed["history"]] == [0, 1, 2]
    final_a = torch.load(mdir_a / "epoch2.pth", weights_only=True)["model"]
    final_b = torch.load(mdir_b / "epoch2.pth", weights_only=True)["model"]
    assert state_dicts_equal(final_a, final_b)
    assert resumed["best_epoch"] == full["best_epoch"]
    assert resumed["history"][2]["logloss"] == pytest.approx(full["history"][2]["logloss"], abs=1e-12)
    # the logs are equal too: the resumed epoch's train_loss continues fastai's smoothed loss (it used to restart)
    log_a, log_b = (pd.read_csv(m / "log.csv").drop(columns="time") for m in (mdir_a, mdir_b))
    pd.testing.assert_frame_equal(log_a, log_b, check_exact=True)
    assert [h["train_loss"] for h in resumed["history"]] == [h["train_loss"] for h in full["history"]]
    best = torch.load(mdir_a / "best.pth", weights_only=True)
    assert best["epoch"] == full["best_epoch"]
    assert best["valid_logloss"] == pytest.approx(min(h["logloss"] for h in full["history"]))
    saved = json.loads((mdir_b / "train_result.json").read_text())
    assert saved["epochs_done"] == 3 and saved["cfg"]["epochs"] == 3


def test_all_data_fold_adjacent_then_rerun_is_a_no_op(tmp_path):
    from lib.data.datasets import neighbours

    cache, folds, labels = make_data(tmp_path, n=10)
    index = pd.DataFrame({"image_id": folds.image_id, "series_uid": np.arange(10) // 5, "slice_idx": np.arange(10) % 5})
    nb = neighbours(index)
    cfg = TrainConfig(**{**TINY, "schedule": "constant", "opt": "adam", "wd": 0.0, "mode": "adjacent"})
    res = launch(tmp_path / "run", cache, -1, cfg, nproc=1, folds=folds, labels=labels, weights=WEIGHTS,
                 neighbours=nb)  # in-process
    mdir = tmp_path / "run/models/cnn/all"
    assert res["best_valid_logloss"] is None and res["best_epoch"] == 0 and res["n_train"] == 10
    assert (mdir / "best.pth").exists()
    assert list(pd.read_csv(mdir / "log.csv").columns) == ["epoch", "train_loss", "time"]
    again = train_fold(tmp_path / "run", cache, folds, labels, -1, cfg, WEIGHTS, neighbours=nb)
    assert again["resumed_from"].endswith("epoch0.pth") and log_epochs(mdir) == [0]
    with pytest.raises(ValueError, match="config changed"):
        train_fold(tmp_path / "run", cache, folds, labels, -1, TrainConfig(**{**TINY, "mode": "adjacent", "lr": 1.0}),
                   WEIGHTS, neighbours=nb)
    with pytest.raises(ValueError, match="needs the `neighbours` table"):
        train_fold(tmp_path / "run2", cache, folds, labels, -1, cfg, WEIGHTS)


def test_config_validates_names():
    with pytest.raises(KeyError, match="valid names"):
        TrainConfig(**{**TINY, "schedule": "cosine_restarts"})
    with pytest.raises(ValueError, match="mode"):
        TrainConfig(**{**TINY, "mode": "stack"})


@pytest.mark.slow
def test_ddp_two_processes_end_with_identical_weights(tmp_path, monkeypatch):
    from lib.train.embed import load_model
    from lib.data.augment import create_transform
    from lib.data.datasets import ImageDataset
    from lib.train.fit import norm_stats

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    cache, folds, labels = make_data(tmp_path, n=24)
    cfg = TrainConfig(**{**TINY, "schedule": "cosine"})
    dump = tmp_path / "rank{rank}.pt"
    res = launch(tmp_path / "run", cache, 0, cfg, nproc=2, folds=folds, labels=labels, weights=WEIGHTS,
                 extra_args=["--dump-final-state", str(dump)])
    r0, r1 = (torch.load(str(dump).format(rank=r), weights_only=True) for r in (0, 1))
    assert state_dicts_equal(r0, r1)
    mdir = tmp_path / "run/models/cnn/fold0"
    assert state_dicts_equal(r0, torch.load(mdir / "best.pth", weights_only=True)["model"])
    assert res["world_size"] == 2 and res["n_valid"] == 8 and log_epochs(mdir) == [0]
    # the logged metric is over the full validation set (gathered from both ranks), not one rank's shard
    model, _ = load_model(mdir / "best.pth", "resnet18", torch.device("cpu"))
    va = folds.loc[folds.fold == 0, "image_id"].tolist()
    mean, std = norm_stats("resnet18")
    ds = ImageDataset(cache, va, labels.loc[va].to_numpy(), transform=create_transform("none", 32), mean=mean, std=std)
    with torch.no_grad():
        p = torch.sigmoid(model(torch.stack([ds[i]["image"] for i in range(len(ds))]))).numpy()
    assert res["best_valid_logloss"] == pytest.approx(weighted_log_loss(labels.loc[va].to_numpy(), p, WEIGHTS), abs=1e-5)


@pytest.mark.gpu
def test_cuda_bf16_channels_last_smoke(tmp_path):
    cache, folds, labels = make_data(tmp_path, n=12)
    cfg = TrainConfig(**{**TINY, "channels_last": True, "bs": 4})
    res = train_fold(tmp_path / "run", cache, folds, labels, 0, cfg, WEIGHTS)
    assert res["device"].startswith("cuda") and res["precision"] in ("bf16", "fp16")
    assert np.isfinite(res["best_valid_logloss"])


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="nccl DDP needs one GPU per rank (2+ GPUs)")
def test_ddp_nccl_two_gpus_end_with_identical_weights(tmp_path):
    cache, folds, labels = make_data(tmp_path, n=24)
    cfg = TrainConfig(**{**TINY, "schedule": "cosine", "bs": 4})
    dump = tmp_path / "rank{rank}.pt"
    res = launch(tmp_path / "run", cache, 0, cfg, nproc=2, folds=folds, labels=labels, weights=WEIGHTS,
                 extra_args=["--dump-final-state", str(dump)])
    r0, r1 = (torch.load(str(dump).format(rank=r), weights_only=True, map_location="cpu") for r in (0, 1))
    assert state_dicts_equal(r0, r1)
    assert res["world_size"] == 2 and res["device"].startswith("cuda") and np.isfinite(res["best_valid_logloss"])


def test_launch_refuses_more_ranks_than_gpus(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    cache, folds, labels = make_data(tmp_path, n=6)
    with pytest.raises(ValueError, match="one GPU each"):
        launch(tmp_path / "run", cache, 0, TrainConfig(**TINY), nproc=2, folds=folds, labels=labels, weights=WEIGHTS)
