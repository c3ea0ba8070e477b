"""Stage 2 of BraTS: train a patient-level MGMT classifier (one MRI type, one fold) with a fastai Learner; resumable.

Models by `ClsConfig.model` (`lib.models.slice_sequence.CLASSIFIERS`): "cnn_lstm" (the seed: chunks of `length`
kept slices, stride `stride`, of the `[image, WT, ET]` stacks, `ChunkDataset`) and "resnet10_3d" (1st place: one
`length`-slice 3D stack around the largest brain slice, `CentralStackDataset`). Loss BCE-with-logits, optimiser Adam
with torch.optim.Adam's defaults (betas 0.9 / 0.999, eps 1e-8, no weight decay; fastai's implementation), constant
lr. A patient's probability is the mean over its chunks (`patient_mean`).

Outputs in RUN/models/cls/<name>/:
  epoch{e}.pth       {"model", "opt", "epoch", "best_epoch", "best_value", "history", "cfg", "elapsed_s",
                      "smooth_loss"}, the newest epoch only (the previous one is removed once this one is written);
  best.pth           {"model", "epoch", "valid_auc", "cfg"} of the epoch with the highest validation patient AUC;
  log.csv            epoch, train_loss, valid_loss, patient_auc, time;
  oof.csv            BraTS21ID, MGMT_value: the best model's validation predictions;
  train_result.json  valid_auc, best_epoch, history, wall time, cfg.
Every file is written atomically. Resume (cfg.resume): the newest epoch checkpoint restores model + optimizer, fit
restarts at the next epoch, and every epoch reseeds the RNGs from (seed, epoch), so on CPU with num_workers=0 a
killed-and-resumed run ends with the weights of an uninterrupted one; a finished run is not trained again.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler

from lib.data.datasets import ImageLoader  # forked workers survive cv2's thread pool
from lib.train import fastai_quiet  # noqa: F401  (before fastai: silences its torch.jit FutureWarning)
from fastai.callback.core import Callback
from fastai.data.core import DataLoaders
from fastai.learner import Learner, Metric
from fastai.optimizer import Adam
from fastcore.foundation import L

from lib import config
from lib.io.ids import id_problem
from lib.models.slice_sequence import CLASSIFIERS, create_classifier
from lib.paths import RunPaths, atomic_write, atomic_write_text
from lib.registry import Registry
from lib.tasks.brats.chunks import ID_NAME, PRED_NAME, CentralStackDataset, ChunkDataset, Item, brats_id, patient_mean
from lib.train.callbacks import EpochSeed, ResumableCSVLogger, seed_everything
from lib.train.resume import EpochSampler, initial_state
from lib.train.precision import resolve_device

PathLike = Union[str, Path]
METRIC = "patient_auc"
ADAM = partial(Adam, mom=0.9, sqr_mom=0.999, eps=1e-8, wd=0.0)  # torch.optim.Adam's defaults
_RESUME_FREE = {"resume", "num_workers", "device"}  # may change between a killed run and its resume


@dataclass(kw_only=True)
class ClsConfig:
    """One classifier run. Experiment settings have no defaults (the stage's notebook parameters hold them; the
    seed: cnn_lstm, eca_nfnet_l0, hidden 64, length 35, stride 5; 1st place: resnet10_3d, 256 px, Adam 1e-4, bs 8)."""

    model: str                        # CLASSIFIERS name: cnn_lstm | resnet10_3d
    backbone: str                     # timm / MODEL_ZOO name of the per-slice CNN (cnn_lstm only)
    hidden: int                       # BiLSTM hidden size per direction (cnn_lstm only)
    img_size: Optional[int]           # slices resized to img_size x img_size px; None = as stored
    length: int                       # slices per chunk (cnn_lstm) / depth of the central stack (resnet10_3d)
    stride: int                       # chunk start step in slices (cnn_lstm only)
    epochs: int
    lr: float
    bs: int
    seed: int
    pretrained_path: Optional[str]    # local weights file (timm backbone / MONAI resnet10); None = random init
    num_workers: int = config.runtime(0)
    device: str = config.runtime("auto")
    resume: bool = config.runtime(True)

    def __post_init__(self) -> None:
        RECIPES.get(self.model)
        CLASSIFIERS.get(self.model)
        for key in ("length", "stride", "epochs", "bs"):
            if int(getattr(self, key)) < 1:
                raise ValueError(f"ClsConfig.{key} must be >= 1, got {getattr(self, key)!r}")
        if not self.lr > 0:
            raise ValueError(f"ClsConfig.lr must be > 0, got {self.lr!r}")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "ClsConfig":
        """Build from a dict; unknown or missing keys are a KeyError naming them."""
        config.check_keys(cls, d)
        return cls(**d)


# ---------------------------------------------------------------- model + dataset per model name
@dataclass(frozen=True)
class Recipe:
    """How `ClsConfig` builds a model's dataset and the keyword arguments of `create_classifier`."""

    dataset: Callable[[Sequence[Item], Optional[Mapping[Any, Any]], ClsConfig], Dataset]
    model_kwargs: Callable[[ClsConfig], Dict[str, Any]]


RECIPES: Registry[Recipe] = Registry("classifier recipe")
RECIPES.add("cnn_lstm", Recipe(
    dataset=lambda items, labels, cfg: ChunkDataset(items, labels, cfg.length, cfg.stride, cfg.img_size or None),
    model_kwargs=lambda cfg: dict(backbone=cfg.backbone, hidden=cfg.hidden, pretrained_path=cfg.pretrained_path)))
RECIPES.add("resnet10_3d", Recipe(
    dataset=lambda items, labels, cfg: CentralStackDataset(items, labels, cfg.length, cfg.img_size or None),
    model_kwargs=lambda cfg: dict(pretrained_path=cfg.pretrained_path)))


def build_model(cfg: ClsConfig) -> nn.Module:
    """The classifier of `cfg` (random init, or the backbone from cfg.pretrained_path)."""
    return create_classifier(cfg.model, **RECIPES.get(cfg.model).model_kwargs(cfg))


def build_dataset(items: Sequence[Item], labels: Optional[Mapping[Any, Any]], cfg: ClsConfig) -> Dataset:
    return RECIPES.get(cfg.model).dataset(items, labels, cfg)


def collate(batch: List[Dict[str, Any]]) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Dataset dicts -> (x float32 (B, ...), mask bool (B, T), y float32 (B,)): fastai's (xb..., yb) tuple."""
    return tuple(torch.stack([b[k] for b in batch]) for k in ("x", "mask", "y"))  # type: ignore[return-value]


def _loader(ds: Dataset, cfg: ClsConfig, device: torch.device, sampler: Optional[Sampler] = None) -> DataLoader:
    drop = sampler is not None and len(ds) > cfg.bs
    return ImageLoader(ds, batch_size=cfg.bs, sampler=sampler, shuffle=False, drop_last=drop, collate_fn=collate,
                      num_workers=cfg.num_workers, pin_memory=device.type == "cuda")


# ---------------------------------------------------------------- metric and checkpoints
def patient_auc(patients: Sequence[str], labels: Mapping[str, float], chunk_patients: Sequence[str],
                chunk_probs: np.ndarray, fill_value: float = 0.5) -> float:
    """ROC AUC over `patients` of the mean chunk probability (patients without chunks: fill_value); NaN with one
    class."""
    from sklearn.metrics import roc_auc_score

    probs = patient_mean(chunk_patients, chunk_probs).reindex(list(patients)).fillna(fill_value)
    y = np.asarray([labels[p] for p in patients], np.float64)
    return float(roc_auc_score(y, probs.to_numpy())) if 0 < y.sum() < len(y) else float("nan")


class PatientAUC(Metric):
    """fastai metric: validation ROC AUC over patients of the mean of their chunk probabilities (higher = better)."""

    def __init__(self, patients: Sequence[str], labels: Mapping[str, float], chunk_patients: Sequence[str]) -> None:
        self.patients, self.labels, self.chunk_patients = list(patients), dict(labels), list(chunk_patients)
        self.probs: List[torch.Tensor] = []

    def reset(self) -> None:
        self.probs = []

    def accumulate(self, learn: Learner) -> None:
        self.probs.append(torch.sigmoid(learn.pred.detach().float()).reshape(-1).cpu())

    @property
    def value(self) -> float:
        probs = torch.cat(self.probs).numpy() if self.probs else np.zeros(0)
        return patient_auc(self.patients, self.labels, self.chunk_patients[:len(probs)], probs)

    @property
    def name(self) -> str:
        return METRIC


def _plain(v: Any) -> Any:
    """Tensor / numpy scalars -> python numbers (checkpoints are loaded with weights_only=True)."""
    if isinstance(v, torch.Tensor) and v.ndim == 0:
        return v.item()
    return v.item() if isinstance(v, np.generic) else v


def _save(obj: Any, path: Path) -> None:
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


class AucCheckpoint(Callback):
    """After each epoch: record the log row, track the best validation patient AUC (NaN never counts as better,
    but the first epoch is best until a finite AUC appears), write epoch{e}.pth (+ best.pth), drop epoch{e-1}.pth."""

    order = 65  # after Recorder (50) and CSVLogger (60): the epoch's row is complete

    def __init__(self, out_dir: Path, cfg: ClsConfig, state: Dict[str, Any]) -> None:
        self.out_dir, self.cfg, self.state = out_dir, cfg, state

    def before_fit(self) -> None:
        self.t0 = time.time()
        smooth = self.state.get("smooth_loss")
        if smooth is not None:  # Recorder has just reset it: continue the run's running mean instead
            self.recorder.smooth_loss.count = int(smooth["count"])
            self.recorder.smooth_loss.val = smooth["val"].to(self.dls.device)

    def after_epoch(self) -> None:
        st, e = self.state, int(self.epoch)
        if e < st["start_epoch"]:
            return
        row = {k: _plain(v) for k, v in zip(self.recorder.metric_names, self.recorder.log)}
        st["history"].append(row)
        value = row.get(METRIC)
        better = value is not None and np.isfinite(value) and (st["best_value"] is None or value > st["best_value"])
        if better or st["best_epoch"] is None:
            st["best_epoch"], st["best_value"] = e, (float(value) if better else None)
        st["elapsed_s"] += time.time() - self.t0
        self.t0 = time.time()
        self._write(e, best=st["best_epoch"] == e)

    def _write(self, e: int, best: bool) -> None:
        st, model, opt = self.state, self.learn.model.state_dict(), self.learn.opt.state_dict()
        hypers = [{k: _plain(v) for k, v in h.items()} for h in opt["hypers"]]
        smooth = {"count": int(self.recorder.smooth_loss.count),
                  "val": torch.as_tensor(self.recorder.smooth_loss.val).detach().cpu().clone()}
        _save({"model": model, "opt": {"state": list(opt["state"]), "hypers": hypers}, "epoch": e,
               "best_epoch": st["best_epoch"], "best_value": st["best_value"], "history": st["history"],
               "cfg": asdict(self.cfg), "elapsed_s": st["elapsed_s"], "smooth_loss": smooth},
              self.out_dir / f"epoch{e}.pth")
        if best:
            _save({"model": model, "epoch": e, "valid_auc": st["best_value"], "cfg": asdict(self.cfg)},
                  self.out_dir / "best.pth")
        (self.out_dir / f"epoch{e - 1}.pth").unlink(missing_ok=True)


# ---------------------------------------------------------------- train / predict
def model_dir(run_dir: PathLike, name: str) -> Path:
    """RUN/models/cls/<name>/ (created); `name` must be a plain ID such as FLAIR_fold0."""
    problem = id_problem(name, what="classifier run name")
    if problem:
        raise ValueError(problem)
    path = RunPaths.at(run_dir).root / "models" / "cls" / name
    path.mkdir(parents=True, exist_ok=True)
    return path


def train_classifier(run_dir: PathLike, name: str, train_items: Sequence[Item], valid_items: Sequence[Item],
                     labels: Mapping[Any, Any], cfg: ClsConfig, cbs: Optional[list] = None) -> Dict[str, Any]:
    """Train on `train_items`, validate on `valid_items` (patient AUC each epoch), keep the best epoch.

    items: (patient ID, stack or .npy path) as the model's dataset takes them (cnn_lstm: uint8 (Z, 3, H, W) slice
    stacks; resnet10_3d: (Z, H, W) volumes); labels: patient -> 0/1 for every item. Returns {"valid_auc",
    "best_epoch", "oof": pd.Series BraTS21ID -> probability of the best model, "history", "epochs_done",
    "resumed_from", "model_dir"}. `cbs`: extra fastai callbacks (tests).
    """
    t0 = time.time()
    out_dir, device = model_dir(run_dir, name), resolve_device(cfg.device)
    labels = {brats_id(k): float(v) for k, v in dict(labels).items()}
    train_ds, valid_ds = build_dataset(train_items, labels, cfg), build_dataset(valid_items, labels, cfg)
    if not len(train_ds) or not len(valid_ds):
        raise ValueError(f"{name}: {len(train_ds)} training and {len(valid_ds)} validation chunks; need > 0 each")
    state = initial_state(out_dir, cfg, device, _RESUME_FREE)
    seed_everything(cfg.seed)
    model = build_model(cfg)
    if "model" in state:
        model.load_state_dict(state.pop("model"))
    model.to(device)
    sampler = EpochSampler(len(train_ds), cfg.seed)
    dls = DataLoaders(_loader(train_ds, cfg, device, sampler), _loader(valid_ds, cfg, device), path=".")
    dls._device = device  # plain torch DataLoaders: fastai moves each batch to dls.device
    valid_patients = [brats_id(p) for p, _ in valid_items]
    metric = PatientAUC(valid_patients, labels, valid_ds.patients)
    learn = Learner(dls, model, loss_func=nn.BCEWithLogitsLoss(), opt_func=ADAM, lr=cfg.lr,
                    wd=0.0, metrics=[metric], path=out_dir)
    learn.create_opt()
    if "opt" in state:
        saved = state.pop("opt")
        learn.opt.load_state_dict({"state": list(saved["state"]), "hypers": L(saved["hypers"])})
    fit_cbs = [EpochSeed(cfg.seed, 0, sampler, None), AucCheckpoint(out_dir, cfg, state),
               ResumableCSVLogger("log.csv", state["start_epoch"])]
    if state["start_epoch"] < cfg.epochs:
        learn.fit(cfg.epochs, cfg.lr, wd=0.0, cbs=fit_cbs + list(cbs or []), start_epoch=state["start_epoch"])
    model.load_state_dict(torch.load(out_dir / "best.pth", map_location=device, weights_only=True)["model"])
    oof = predict_patients(model, valid_items, cfg)
    atomic_write(out_dir / "oof.csv", lambda tmp: oof.to_csv(tmp, header=True))
    result = {"valid_auc": state["best_value"], "best_epoch": state["best_epoch"], "history": state["history"],
              "epochs_done": len(state["history"]), "resumed_from": state.get("resumed_from"),
              "wall_time_s": state["elapsed_s"], "call_wall_time_s": time.time() - t0, "model_dir": str(out_dir),
              "n_train_chunks": len(train_ds), "n_valid_chunks": len(valid_ds), "device": str(device),
              "cfg": asdict(cfg)}
    atomic_write_text(out_dir / "train_result.json", json.dumps(result, indent=1))
    return {**result, "oof": oof}


@torch.no_grad()
def predict_patients(model: nn.Module, items: Sequence[Item], cfg: ClsConfig, fill_value: float = 0.5) -> pd.Series:
    """Patient probabilities (mean of the sigmoid over each patient's chunks): pd.Series indexed by BraTS21ID in
    item order, name MGMT_value; a patient without chunks (no kept slice) gets `fill_value`."""
    ds = build_dataset(items, None, cfg)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    probs = [torch.sigmoid(model(x.to(device), m.to(device)).float()).cpu()
             for x, m, _ in _loader(ds, cfg, device)]
    model.train(was_training)
    chunk_probs = torch.cat(probs).numpy() if probs else np.zeros(0)
    ids = pd.Index([brats_id(p) for p, _ in items], name=ID_NAME)
    return patient_mean(ds.patients, chunk_probs).reindex(ids).fillna(fill_value).rename(PRED_NAME)


def patient_folds(labels: pd.Series, n_folds: int = 5, seed: int = 0) -> pd.Series:
    """Stratified patient folds: pd.Series BraTS21ID (sorted) -> fold int in [0, n_folds), by sklearn's
    StratifiedKFold(shuffle=True, random_state=seed) on the labels sorted by ID (so input order does not matter)."""
    from sklearn.model_selection import StratifiedKFold

    y = pd.Series(np.asarray(labels, np.int64), index=pd.Index([brats_id(p) for p in labels.index], name=ID_NAME))
    if y.index.duplicated().any():
        raise ValueError(f"labels has duplicate patients, e.g. {list(y.index[y.index.duplicated()][:3])}")
    y = y.sort_index()
    folds = pd.Series(-1, index=y.index, name="fold", dtype=np.int64)
    split = StratifiedKFold(n_splits=int(n_folds), shuffle=True, random_state=int(seed))
    for k, (_, va) in enumerate(split.split(np.zeros(len(y)), y.to_numpy())):
        folds.iloc[va] = k
    return folds


def load_classifier(model_dir: PathLike, cfg: ClsConfig) -> nn.Module:
    """The best epoch's model of a `train_classifier` run folder (RUN/models/cls/<name>/best.pth), or that
    checkpoint file itself (a weights bundle's copy), in eval mode on the config's device."""
    path = Path(model_dir)
    path = path if path.suffix == ".pth" else path / "best.pth"
    if not path.is_file():
        raise FileNotFoundError(f"classifier checkpoint not found: {path}")
    device = resolve_device(cfg.device)
    model = build_model(cfg)
    model.load_state_dict(torch.load(path, map_location=device, weights_only=True)["model"])
    return model.to(device).eval()
