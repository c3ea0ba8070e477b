"""Train the cervical-spine 3D C1-C7 segmentor (seed: ir-CSN-50 encoder + (2+1)D decoder, AdamW + cosine,
focal-Jaccard loss) on random patches of cached volumes, and predict masks for whole studies.

Outputs in RUN/models/seg3d/ (the shared machinery of lib.train.seg / lib.train.callbacks):
  epoch{e}.pth        model, optimizer (newest epoch only unless keep_optimizer="all"), history, cfg, ...;
  best.pth            {"model", "epoch", "arch", "valid_dice", "cfg"} of the epoch with the highest mean validation
                      Dice over C1-C7 (`load_seg3d` rebuilds the network from it);
  log.csv             epoch, train_loss, valid_loss, dice, dice_c1..dice_c7, iou_c1..iou_c7, time;
  train_result.json   the returned dict.

Validation scores fixed patches (PatchDataset augment=False): argmax labels vs the mask, overlap counts summed over
the validation set (Dice 1.0 for a class absent from both). Resume (cfg.resume) continues from the newest epoch
checkpoint with the same weights, optimizer, RNG draws and cosine position as an uninterrupted run (CPU,
num_workers=0).
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, ClassVar, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import pandas as pd
import torch
from torch import nn

from lib.train import fastai_quiet  # noqa: F401  (before fastai: silences its torch.jit FutureWarning)
from fastai.callback.fp16 import MixedPrecision
from fastai.callback.schedule import ParamScheduler, SchedCos
from fastai.learner import Learner, Metric

from lib import config
from lib.evaluate.metrics import overlap_counts
from lib.imaging.volume_cache import to_unit
from lib.models.seg3d import SEG3D, FocalJaccardLoss, create_seg3d, sliding_window_predict
from lib.paths import RunPaths, atomic_write_text
from lib.tasks.cspine.seg_data import CERVICAL, N_CLASSES, PatchDataset
from lib.train.callbacks import EpochCheckpoint, EpochSeed, ResumableCSVLogger, seed_everything
from lib.train.fit import OPTIMIZERS, _initial_state, _opt_state
from lib.train.precision import PRECISIONS, resolve_device, resolve_precision
from lib.train.seg import ClassOverlap, SegOverlap, build_seg_dataloaders

PathLike = Union[str, Path]
IN_CHANNELS = 1
MONITOR = "dice"
MODEL_NAME = "seg3d"


@dataclass(kw_only=True)
class Seg3dConfig:
    """Everything a 3D segmentation training depends on (JSON/YAML friendly). Experiment settings have no defaults
    (the stage's notebook parameters cell holds them); run-time knobs keep neutral defaults."""

    UNSET: ClassVar[Dict[str, Any]] = {"pretrained_path": "", "patience": 0}

    arch: str                        # lib.models.seg3d.SEG3D name: "csn_unet" (seed), "unet", "segresnet"
    arch_kwargs: Dict[str, Any]      # builder keywords, e.g. {"depth": 50} for csn_unet
    pretrained_path: Optional[str]   # local encoder weights (csn_unet); None = random init (never downloaded)
    roi: Tuple[int, int, int]        # patch (Z, Y, X) voxels, training and sliding-window inference
    epochs: int
    lr: float                        # AdamW peak; cosine from lr to final_lr over all epochs
    final_lr: float
    wd: float                        # decoupled weight decay
    bs: int                          # training batch size; validation uses 2 * bs
    seed: int
    samples_per_volume: int          # training patches per volume and epoch
    valid_samples: int               # fixed validation patches per volume
    fg_prob: float                   # chance a patch is centred on a C1-C7 voxel
    flips: bool                      # random left-right flips in training
    focal_weight: float              # FocalJaccardLoss
    jaccard_weight: float
    focal_gamma: float
    num_workers: int = config.runtime(2)
    device: Optional[str] = config.runtime("auto")
    mixed_precision: str = config.runtime("auto")
    resume: bool = config.runtime(True)
    patience: Optional[int] = config.runtime(None)
    save_every_epoch: bool = config.runtime(True)
    keep_optimizer: str = config.runtime("last")

    def __post_init__(self) -> None:
        """Unknown names and impossible values fail here, before any data is read."""
        SEG3D.get(self.arch)
        self.roi = tuple(int(r) for r in self.roi)  # type: ignore[assignment]
        if len(self.roi) != 3 or min(self.roi) < 1:
            raise ValueError(f"Seg3dConfig.roi must be 3 sizes >= 1 (Z, Y, X), got {self.roi}")
        if self.epochs < 1 or self.bs < 1 or self.samples_per_volume < 1 or self.valid_samples < 1:
            raise ValueError(f"Seg3dConfig needs epochs, bs, samples_per_volume, valid_samples >= 1; got "
                             f"{self.epochs}, {self.bs}, {self.samples_per_volume}, {self.valid_samples}")
        if not 0 < self.final_lr <= self.lr or self.wd < 0 or not 0 <= self.fg_prob <= 1:
            raise ValueError(f"Seg3dConfig needs 0 < final_lr <= lr, wd >= 0, 0 <= fg_prob <= 1; got lr={self.lr}, "
                             f"final_lr={self.final_lr}, wd={self.wd}, fg_prob={self.fg_prob}")
        for key, valid in {"mixed_precision": PRECISIONS, "keep_optimizer": ("last", "all")}.items():
            if getattr(self, key) not in valid:
                raise ValueError(f"Seg3dConfig.{key} must be one of {valid}, got {getattr(self, key)!r}")
        self.loss()  # checks the loss weights

    def loss(self) -> FocalJaccardLoss:
        return FocalJaccardLoss(N_CLASSES, self.focal_weight, self.jaccard_weight, self.focal_gamma)

    def build(self, with_weights: bool = True) -> nn.Module:
        """The network (1 input channel, background + C1-C7 outputs); with_weights: load pretrained_path."""
        kwargs = dict(self.arch_kwargs)
        if with_weights and self.pretrained_path:
            kwargs["pretrained_path"] = self.pretrained_path
        return create_seg3d(self.arch, IN_CHANNELS, N_CLASSES, **kwargs)

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "Seg3dConfig":
        """Build from a dict; unknown keys or missing experiment settings are a KeyError naming them."""
        config.check_keys(cls, d)
        return cls(**d)

    @classmethod
    def from_params(cls, **params: Any) -> "Seg3dConfig":
        """Build from notebook parameters: the `UNSET` literals ("" or 0) become None (lib.config)."""
        return cls.from_dict(config.none_if_unset(params, cls.UNSET))


# ---------------------------------------------------------------- metrics
class MulticlassOverlap(SegOverlap):
    """Mean validation Dice over C1-C7 of argmax labels (logits (B, 8, ...) vs labels (B, ...)), overlap counts
    summed over the set; per-class Dice / IoU for ClassOverlap."""

    def accumulate(self, learn: Any) -> None:
        pred = learn.pred.detach().argmax(1).cpu().numpy()
        true = learn.y.detach().cpu().numpy()
        cls = np.arange(1, len(self.class_names) + 1).reshape(1, -1, *([1] * (pred.ndim - 1)))
        counts = np.stack(overlap_counts(pred[:, None] == cls, true[:, None] == cls))
        self.counts = counts if self.counts is None else self.counts + counts


def seg3d_metrics() -> List[Metric]:
    """dice (mean over C1-C7), dice_c1..dice_c7, iou_c1..iou_c7."""
    main = MulticlassOverlap(CERVICAL)
    return [main] + [ClassOverlap(main, kind, j) for kind in ("dice", "iou") for j in range(len(CERVICAL))]


# ---------------------------------------------------------------- training
def _split(table: pd.DataFrame, valid_ids: Sequence[str]) -> Tuple[pd.DataFrame, pd.DataFrame]:
    """(train rows, valid rows) of the studies with a mask; ValueError on unknown ids or an empty side."""
    for col in ("study_id", "seg_path"):
        if col not in table.columns:
            raise KeyError(f"table lacks a {col} column (a lib.imaging.volume_cache table); has {list(table.columns)}")
    rows = table[table["seg_path"].notna()].reset_index(drop=True)
    ids, valid = rows["study_id"].astype(str), {str(i) for i in valid_ids}
    unknown = sorted(valid - set(ids))
    if unknown:
        raise ValueError(f"valid_ids without a cached mask in the table: {unknown[:5]}")
    is_val = ids.isin(valid).to_numpy()
    if is_val.all() or not is_val.any():
        raise ValueError(f"{int((~is_val).sum())} training and {int(is_val.sum())} validation studies with masks; "
                         f"need > 0 of each")
    return rows[~is_val].reset_index(drop=True), rows[is_val].reset_index(drop=True)


def _best_scores(state: Dict[str, Any]) -> Dict[str, Optional[float]]:
    row = next((h for h in state["history"] if h.get("epoch") == state["best_epoch"]), {})
    out = {"valid_dice": row.get(MONITOR)}
    out.update({f"valid_{k}_{c}": row.get(f"{k}_{c.lower()}") for k in ("dice", "iou") for c in CERVICAL})
    return {k: (None if v is None else float(v)) for k, v in out.items()}


def _learner(cfg: Seg3dConfig, model: nn.Module, train_ds: PatchDataset, valid_ds: PatchDataset,
             device: torch.device, out_dir: Path) -> Tuple[Learner, Any]:
    dls, sampler = build_seg_dataloaders(train_ds, valid_ds, cfg, device)  # type: ignore[arg-type]
    learn = Learner(dls, model, loss_func=cfg.loss(), opt_func=OPTIMIZERS.get("adamw"), lr=cfg.lr, wd=cfg.wd,
                    metrics=seg3d_metrics(), path=out_dir, splitter=lambda m: [list(m.parameters())])
    return learn, sampler


def train_seg3d(run_dir: PathLike, table: pd.DataFrame, valid_ids: Sequence[str], cfg: Seg3dConfig,
                cache_dir: PathLike, cbs: Optional[list] = None) -> Dict[str, Any]:
    """Train on the masked studies of `table` (lib.imaging.volume_cache.cache_volumes, files under `cache_dir`)
    whose study_id is not in `valid_ids`, validate on the others; write RUN/models/seg3d/ (module docstring) and
    return {"valid_dice" (mean over C1-C7), "valid_dice_C1".."valid_dice_C7", "valid_iou_C1".., "best_epoch",
    "epochs_done", "resumed_from", ...}. `cbs`: extra fastai callbacks (tests)."""
    t0 = time.time()
    device = resolve_device(cfg.device or "auto")
    out_dir = RunPaths.at(run_dir).root / "models" / MODEL_NAME
    out_dir.mkdir(parents=True, exist_ok=True)
    train_rows, valid_rows = _split(table, valid_ids)
    state = _initial_state(out_dir, cfg, device)  # type: ignore[arg-type]
    train_ds = PatchDataset(cache_dir, train_rows, cfg.roi, cfg.samples_per_volume, True, cfg.fg_prob, cfg.flips)
    valid_ds = PatchDataset(cache_dir, valid_rows, cfg.roi, cfg.valid_samples, False, cfg.fg_prob, False, cfg.seed)
    seed_everything(cfg.seed)  # the initial weights; EpochSeed reseeds every epoch
    model = cfg.build(with_weights="model" not in state)
    if "model" in state:
        model.load_state_dict(state.pop("model"))
    model.to(device)
    learn, sampler = _learner(cfg, model, train_ds, valid_ds, device, out_dir)
    precision = resolve_precision(cfg.mixed_precision, device)
    fit_cbs: list = [ParamScheduler({"lr": SchedCos(cfg.lr, cfg.final_lr)}), EpochSeed(cfg.seed, 0, sampler, None),
                     EpochCheckpoint(out_dir, cfg, state, True, True, monitor=MONITOR, mode="max"),  # type: ignore
                     ResumableCSVLogger("log.csv", state["start_epoch"])]
    if precision:
        fit_cbs.append(MixedPrecision(precision))
    learn.create_opt()
    if "opt" in state:
        learn.opt.load_state_dict(_opt_state(state.pop("opt")))
    if state["start_epoch"] < cfg.epochs:
        learn.fit(cfg.epochs, cfg.lr, cbs=fit_cbs + list(cbs or []), start_epoch=state["start_epoch"])
    result = {**_best_scores(state), "best_epoch": state["best_epoch"], "epochs_done": len(state["history"]),
              "history": state["history"], "wall_time_s": state["elapsed_s"], "call_wall_time_s": time.time() - t0,
              "resumed_from": state.get("resumed_from"), "n_train": len(train_rows), "n_valid": len(valid_rows),
              "train_ids": train_rows["study_id"].tolist(), "valid_ids": valid_rows["study_id"].tolist(),
              "class_names": list(CERVICAL), "device": str(device), "precision": precision,
              "model_dir": str(out_dir), "cfg": asdict(cfg)}
    atomic_write_text(out_dir / "train_result.json", json.dumps(result, indent=1, default=str))
    return result


# ---------------------------------------------------------------- inference
def load_seg3d(path: PathLike) -> Tuple[nn.Module, Seg3dConfig]:
    """(network on CPU in eval mode, its Seg3dConfig) from best.pth / epoch{e}.pth (torch.load weights_only)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"3D segmentation checkpoint not found: {path}")
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(ckpt, dict) or "model" not in ckpt or "arch" not in ckpt.get("cfg", {}):
        raise ValueError(f"{path}: expected a lib.tasks.cspine.seg checkpoint with 'model' and 'cfg'")
    cfg = Seg3dConfig.from_dict(ckpt["cfg"])
    model = cfg.build(with_weights=False)
    model.load_state_dict(ckpt["model"])
    return model.eval(), cfg


def predict_masks(model_path: Union[PathLike, nn.Module], volume: np.ndarray, roi: Optional[Sequence[int]] = None,
                  overlap: float = 0.25, bs: int = 1, device: Optional[str] = "auto") -> np.ndarray:
    """A cached volume (Z, Y, X) uint8 / float16 (or float32 in [0, 1]) -> uint8 (Z, Y, X) labels 0..7 (argmax of
    the sliding-window probabilities). model_path: a checkpoint (roi defaults to its cfg.roi) or a network (roi
    required)."""
    if isinstance(model_path, nn.Module):
        model = model_path
        if roi is None:
            raise ValueError("predict_masks with a network object needs roi=(Z, Y, X)")
    else:
        model, cfg = load_seg3d(model_path)
        roi = roi or cfg.roi
    volume = np.asarray(volume)
    if volume.ndim != 3:
        raise ValueError(f"volume must be (Z, Y, X), got shape {volume.shape}")
    probs = sliding_window_predict(model, to_unit(volume), roi, overlap=overlap, bs=bs, device=device)
    return probs.argmax(0).astype(np.uint8)
