"""Train a 2D segmentation network (lib.models.segmentation) with a fastai `Learner` over plain torch DataLoaders;
resumable exactly like the classifier trainer (lib.train.fit), task-agnostic (class names and the dataset come in).

Outputs in RUN/models/seg/:
  epoch{e}.pth        {"model", "opt" (newest epoch only unless keep_optimizer="all"), "epoch", "best_epoch",
                       "best_value", "history", "cfg", "elapsed_s", "smooth_loss"[, "scaler"]}, atomic, every epoch;
  best.pth            {"model", "epoch", "arch", "valid_dice", "cfg"} of the epoch with the highest validation mean
                      Dice over the classes (`load_seg_model` rebuilds the network from it);
  log.csv             epoch, train_loss, valid_loss, dice, dice_<class>..., iou_<class>..., time;
  train_result.json   the returned dict plus history, cfg, sizes, device, precision.

Training: DiceBCELoss, fastai Adam with decoupled weight decay (fastai's default wd 0.01); the encoder is frozen
for the first `freeze_epochs` (decoder warm-up) and trains after; the learning rate follows one fastai one-cycle
(pct_start 0.25, lr / 25 -> lr -> lr / 1e5) over the warm-up epochs and another over the rest (like fastai's
`fine_tune`: the unfrozen encoder starts at a low rate), or one cycle over all epochs when nothing or everything is
frozen. Validation metrics threshold sigmoid probabilities at 0.5 and sum the overlap over the whole validation set
(lib.evaluate.metrics.dice_per_channel / iou_per_channel). Resume (cfg.resume) restores model, optimizer, scaler and
fastai's smoothed loss from the newest epoch checkpoint and reseeds every epoch from (seed, epoch), so on CPU with
num_workers=0 a killed-and-resumed run ends with the weights of an uninterrupted one.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from lib.train import fastai_quiet  # noqa: F401  (before fastai: silences its torch.jit FutureWarning)
from fastai.callback.core import Callback
from fastai.callback.fp16 import MixedPrecision
from fastai.callback.schedule import ParamScheduler, combine_scheds, combined_cos
from fastai.data.core import DataLoaders
from fastai.learner import Learner, Metric

from lib import config
from lib.data.datasets import ImageLoader, SubsampleSampler, worker_init_fn  # ImageLoader: forked workers survive cv2's pool
from lib.evaluate.metrics import dice_from_counts, iou_from_counts, overlap_counts
from lib.models.segmentation import SEG_ARCHS, DiceBCELoss, check_encoder, create_seg_model, freeze_encoder
from lib.paths import RunPaths, atomic_write_text
from lib.train.callbacks import EpochCheckpoint, EpochSeed, ResumableCSVLogger, seed_everything
from lib.train.fit import OPTIMIZERS, _initial_state, _opt_state  # the classifier trainer's resume state
from lib.train.precision import PRECISIONS, autocast_dtype, resolve_device, resolve_precision

PathLike = Union[str, Path]
DatasetFn = Callable[[pd.DataFrame, bool], Dataset]  # (slice table, augment) -> Dataset of (image, mask) tensors
THRESHOLD = 0.5  # sigmoid probability -> binary mask for the validation metrics
MONITOR = "dice"  # best.pth: the highest mean validation Dice over the classes


@dataclass(kw_only=True)
class SegConfig:
    """Everything a segmentation training depends on (JSON/YAML friendly). Experiment settings have no defaults
    (the stage's notebook parameters cell holds them); run-time knobs keep neutral defaults."""

    UNSET: ClassVar[Dict[str, Any]] = {"encoder_weights": "", "patience": 0}

    arch: str                       # lib.models.segmentation.SEG_ARCHS name, e.g. "unetplusplus"
    encoder: str                    # smp encoder name, e.g. "densenet121" (or "tu-<timm model>")
    encoder_weights: Optional[str]  # local encoder state_dict file; None = random init (never downloaded)
    img_size: int                   # slice edge in pixels (the data's; divisible by 32)
    epochs: int                     # total epochs, warm-up included
    freeze_epochs: int              # first epochs with the encoder frozen (0 = none)
    lr: float                       # peak learning rate of each one-cycle
    bs: int                         # training batch size (>= 2: BatchNorm); validation uses 2 * bs
    seed: int
    dice_weight: float              # DiceBCELoss weights
    bce_weight: float
    num_workers: int = config.runtime(2)
    device: Optional[str] = config.runtime("auto")  # "auto" / None: cuda if available, else cpu
    mixed_precision: str = config.runtime("auto")   # lib.train.precision rule: bf16/fp16 on CUDA, off on CPU
    resume: bool = config.runtime(True)
    patience: Optional[int] = config.runtime(None)  # early stopping on the validation Dice; None = off
    save_every_epoch: bool = config.runtime(True)   # False: only the newest epoch{e}.pth is kept
    keep_optimizer: str = config.runtime("last")    # optimizer state in the newest epoch{e}.pth only | "all"

    def __post_init__(self) -> None:
        """Unknown names and impossible values fail here, before any data is read."""
        SEG_ARCHS.get(self.arch)
        check_encoder(self.encoder)
        if self.img_size < 32 or self.img_size % 32:
            raise ValueError(f"SegConfig.img_size must be a positive multiple of 32, got {self.img_size}")
        if not 0 <= self.freeze_epochs <= self.epochs or self.epochs < 1:
            raise ValueError(f"SegConfig needs epochs >= 1 and 0 <= freeze_epochs <= epochs; got epochs="
                             f"{self.epochs}, freeze_epochs={self.freeze_epochs}")
        if self.bs < 2 or self.lr <= 0:
            raise ValueError(f"SegConfig needs bs >= 2 (BatchNorm) and lr > 0; got bs={self.bs}, lr={self.lr}")
        choices = {"mixed_precision": PRECISIONS, "keep_optimizer": ("last", "all")}
        for key, valid in choices.items():
            if getattr(self, key) not in valid:
                raise ValueError(f"SegConfig.{key} must be one of {valid}, got {getattr(self, key)!r}")
        DiceBCELoss(self.dice_weight, self.bce_weight)  # checks the weights

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "SegConfig":
        """Build from a dict; unknown keys or missing experiment settings are a KeyError naming them."""
        config.check_keys(cls, d)
        return cls(**d)

    @classmethod
    def from_params(cls, **params: Any) -> "SegConfig":
        """Build from notebook parameters: the `UNSET` literals ("" or 0) become None (lib.config)."""
        return cls.from_dict(config.none_if_unset(params, cls.UNSET))


# ---------------------------------------------------------------- fastai pieces
class SegOverlap(Metric):
    """Validation mean Dice over the classes; also keeps per-class Dice and IoU for `ClassOverlap`. Overlap counts
    (lib.evaluate.metrics.overlap_counts) are summed over the batches: Dice / IoU of the whole validation set."""

    def __init__(self, class_names: Sequence[str], threshold: float = THRESHOLD) -> None:
        self.class_names, self.threshold = tuple(class_names), float(threshold)
        self.scores: Dict[str, np.ndarray] = {}

    def reset(self) -> None:
        self.counts: Optional[np.ndarray] = None

    def accumulate(self, learn: Any) -> None:
        pred = (torch.sigmoid(learn.pred.detach().float()) > self.threshold).cpu().numpy()
        true = (learn.y.detach() > 0.5).cpu().numpy()
        counts = np.stack(overlap_counts(pred, true))  # (3, C): intersection, predicted, true
        self.counts = counts if self.counts is None else self.counts + counts

    @property
    def value(self) -> Optional[float]:
        if self.counts is None:
            return None
        self.scores = {"dice": dice_from_counts(*self.counts), "iou": iou_from_counts(*self.counts)}
        return float(self.scores["dice"].mean())

    @property
    def name(self) -> str:
        return MONITOR


class ClassOverlap(Metric):
    """One class's Dice or IoU, read from the SegOverlap computed just before it."""

    def __init__(self, parent: SegOverlap, kind: str, j: int) -> None:
        self.parent, self.kind, self.j = parent, kind, j

    @property
    def value(self) -> Optional[float]:
        scores = self.parent.scores.get(self.kind)
        return None if scores is None else float(scores[self.j])

    @property
    def name(self) -> str:
        return f"{self.kind}_{self.parent.class_names[self.j].lower()}"


def seg_metrics(class_names: Sequence[str]) -> List[Metric]:
    """dice (mean), dice_<class>..., iou_<class>... (class names lower-cased)."""
    main = SegOverlap(class_names)
    return [main] + [ClassOverlap(main, kind, j) for kind in ("dice", "iou") for j in range(len(class_names))]


class EncoderWarmup(Callback):
    """Encoder frozen during epochs < `freeze_epochs`, trainable after (and after the fit)."""

    def __init__(self, model: nn.Module, freeze_epochs: int) -> None:
        self.net, self.freeze_epochs = model, int(freeze_epochs)

    def before_epoch(self) -> None:
        freeze_encoder(self.net, self.epoch < self.freeze_epochs)

    def after_fit(self) -> None:
        freeze_encoder(self.net, False)


def _one_cycle(lr: float) -> Dict[str, Callable]:
    return {"lr": combined_cos(0.25, lr / 25, lr, lr / 1e5), "mom": combined_cos(0.25, 0.95, 0.85, 0.95)}


def seg_schedule(cfg: SegConfig) -> ParamScheduler:
    """One one-cycle over the warm-up epochs and one over the rest (one over all when 0 or all epochs freeze)."""
    if not 0 < cfg.freeze_epochs < cfg.epochs:
        return ParamScheduler(_one_cycle(cfg.lr))
    f = cfg.freeze_epochs / cfg.epochs
    warm, main = _one_cycle(cfg.lr), _one_cycle(cfg.lr)
    return ParamScheduler({k: combine_scheds([f, 1 - f], [warm[k], main[k]]) for k in warm})


def _all_params(model: nn.Module) -> List[List[nn.Parameter]]:
    """One parameter group with every parameter, frozen or not (fastai's default splitter drops frozen ones)."""
    return [list(model.parameters())]


def build_seg_dataloaders(train_ds: Dataset, valid_ds: Dataset, cfg: SegConfig,
                          device: torch.device) -> Tuple[DataLoaders, SubsampleSampler]:
    """(fastai DataLoaders over plain torch DataLoaders, the train sampler reshuffled per epoch by EpochSeed)."""
    sampler = SubsampleSampler(np.ones(len(train_ds)), 1.0, cfg.seed, shuffle=True, rank=0, num_replicas=1)
    common = dict(num_workers=cfg.num_workers, worker_init_fn=worker_init_fn, pin_memory=device.type == "cuda")
    train_dl = ImageLoader(train_ds, batch_size=cfg.bs, sampler=sampler, drop_last=len(sampler) > cfg.bs, **common)
    valid_dl = ImageLoader(valid_ds, batch_size=cfg.bs * 2, shuffle=False, **common)
    dls = DataLoaders(train_dl, valid_dl, path=".")
    dls._device = device  # plain torch DataLoaders have no .to(); fastai moves each batch to dls.device
    return dls, sampler


# ---------------------------------------------------------------- training
def _split(table: pd.DataFrame, valid_ids: Sequence[str]) -> Tuple[pd.DataFrame, pd.DataFrame]:
    if "case_id" not in table.columns:
        raise KeyError(f"table lacks a case_id column; has {list(table.columns)}")
    ids, valid = table["case_id"].astype(str), {str(i) for i in valid_ids}
    unknown = sorted(valid - set(ids))
    if unknown:
        raise ValueError(f"valid_ids not in the table: {unknown[:5]}")
    is_val = ids.isin(valid).to_numpy()
    if is_val.all() or not is_val.any():
        raise ValueError(f"{int((~is_val).sum())} training and {int(is_val.sum())} validation slices; need > 0 of "
                         f"each")
    return table[~is_val].reset_index(drop=True), table[is_val].reset_index(drop=True)


def _check_item(ds: Dataset, cfg: SegConfig, class_names: Sequence[str]) -> int:
    """The data's input channels; ValueError if its masks do not have one channel per class or the size is off."""
    image, mask = ds[0]
    if mask.shape[0] != len(class_names) or image.shape[-2:] != (cfg.img_size, cfg.img_size):
        raise ValueError(f"dataset items are image {tuple(image.shape)}, mask {tuple(mask.shape)}; expected "
                         f"(C, {cfg.img_size}, {cfg.img_size}) and {len(class_names)} mask channels "
                         f"{list(class_names)}")
    return int(image.shape[0])


def _best_scores(state: Dict[str, Any], class_names: Sequence[str]) -> Dict[str, Optional[float]]:
    row = next((h for h in state["history"] if h.get("epoch") == state["best_epoch"]), {})
    keys = [MONITOR] + [f"{k}_{c.lower()}" for k in ("dice", "iou") for c in class_names]
    return {f"valid_{k}": (None if row.get(k) is None else float(row[k])) for k in keys}


def train_seg(run_dir: PathLike, table: pd.DataFrame, valid_ids: Sequence[str], cfg: SegConfig, dataset: DatasetFn,
              class_names: Sequence[str], cbs: Optional[list] = None) -> Dict[str, Any]:
    """Train on the rows of `table` whose case_id is not in `valid_ids`, validate on the others; write
    RUN/models/seg/ (module docstring) and return {"valid_dice", "valid_dice_<class>", "valid_iou_<class>"... of the
    best epoch, "best_epoch", "epochs_done", "resumed_from", ...} (also train_result.json).

    dataset(rows, augment) -> torch Dataset of (image float32 (C_in, S, S), mask float32 (len(class_names), S, S));
    class_names: the mask channels in order (BraTS: ("WT", "ET")). `cbs`: extra fastai callbacks (tests).
    """
    t0 = time.time()
    device = resolve_device(cfg.device or "auto")
    out_dir = RunPaths.at(run_dir).root / "models" / "seg"
    out_dir.mkdir(parents=True, exist_ok=True)
    train_rows, valid_rows = _split(table, valid_ids)
    state = _initial_state(out_dir, cfg, device)
    train_ds, valid_ds = dataset(train_rows, True), dataset(valid_rows, False)
    in_channels = _check_item(valid_ds, cfg, class_names)
    seed_everything(cfg.seed)  # the initial weights; EpochSeed reseeds every epoch
    model = create_seg_model(cfg.arch, cfg.encoder, in_channels, len(class_names), cfg.encoder_weights)
    if "model" in state:
        model.load_state_dict(state.pop("model"))
    model.to(device)
    torch.backends.cudnn.benchmark = device.type == "cuda"
    dls, sampler = build_seg_dataloaders(train_ds, valid_ds, cfg, device)
    learn = Learner(dls, model, loss_func=DiceBCELoss(cfg.dice_weight, cfg.bce_weight),
                    opt_func=OPTIMIZERS.get("adamw"), lr=cfg.lr, metrics=seg_metrics(class_names), path=out_dir,
                    splitter=_all_params)
    precision = resolve_precision(cfg.mixed_precision, device)
    fit_cbs: list = [seg_schedule(cfg), EpochSeed(cfg.seed, 0, sampler, None), EncoderWarmup(model, cfg.freeze_epochs),
                     EpochCheckpoint(out_dir, cfg, state, True, True, monitor=MONITOR, mode="max"),
                     ResumableCSVLogger("log.csv", state["start_epoch"])]
    if precision:
        fit_cbs.append(MixedPrecision(precision))
    learn.create_opt()
    if "opt" in state:
        learn.opt.load_state_dict(_opt_state(state.pop("opt")))
    if state["start_epoch"] < cfg.epochs:
        learn.fit(cfg.epochs, cfg.lr, cbs=fit_cbs + list(cbs or []), start_epoch=state["start_epoch"])
    result = {**_best_scores(state, class_names), "best_epoch": state["best_epoch"],
              "epochs_done": len(state["history"]), "history": state["history"], "wall_time_s": state["elapsed_s"],
              "call_wall_time_s": time.time() - t0, "resumed_from": state.get("resumed_from"),
              "n_train": len(train_rows), "n_valid": len(valid_rows),
              "n_train_cases": int(train_rows["case_id"].nunique()),
              "n_valid_cases": int(valid_rows["case_id"].nunique()),
              "class_names": list(class_names), "in_channels": in_channels, "device": str(device),
              "precision": precision, "model_dir": str(out_dir), "cfg": asdict(cfg)}
    atomic_write_text(out_dir / "train_result.json", json.dumps(result, indent=1))
    return result


# ---------------------------------------------------------------- inference
def _state_shape(sd: Dict[str, torch.Tensor], path: PathLike) -> Tuple[int, int]:
    """(in_channels, classes) of a saved smp model: its first conv's input, its segmentation head's output."""
    convs = [v for v in sd.values() if v.ndim == 4]
    head = sd.get("segmentation_head.0.weight")
    if not convs or head is None:
        raise ValueError(f"{path}: not an smp segmentation model state (no conv / segmentation_head.0.weight)")
    return int(convs[0].shape[1]), int(head.shape[0])


def load_seg_model(path: PathLike) -> nn.Module:
    """A trained network from best.pth / epoch{e}.pth (torch.load weights_only=True), on CPU in eval mode; the
    architecture comes from the checkpoint's cfg, channels and classes from its weights."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"segmentation checkpoint not found: {path}")
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(ckpt, dict) or "model" not in ckpt or not {"arch", "encoder"} <= set(ckpt.get("cfg", {})):
        raise ValueError(f"{path}: expected a lib.train.seg checkpoint with 'model' and 'cfg' (arch, encoder)")
    in_channels, classes = _state_shape(ckpt["model"], path)
    model = create_seg_model(ckpt["cfg"]["arch"], ckpt["cfg"]["encoder"], in_channels, classes)
    model.load_state_dict(ckpt["model"])
    return model.eval()


def predict_seg(model: nn.Module, images: np.ndarray, bs: int, device: Optional[str] = "auto") -> np.ndarray:
    """images float (N, C_in, S, S) as trained (z-scored) -> float32 (N, classes, S, S) sigmoid probabilities,
    batches of `bs` under the lib.train.precision rule (bf16 / fp16 autocast on CUDA)."""
    images = np.asarray(images)
    if images.ndim != 4:
        raise ValueError(f"images must be (N, C, S, S), got shape {images.shape}")
    dev = resolve_device(device or "auto")  # None: as "auto"
    dtype = autocast_dtype("auto", dev)
    model.to(dev).eval()
    out: List[np.ndarray] = []
    with torch.inference_mode():
        for i in range(0, len(images), int(bs)):
            x = torch.from_numpy(np.ascontiguousarray(images[i:i + bs], dtype=np.float32)).to(dev)
            with torch.autocast(dev.type, dtype=dtype or torch.float32, enabled=dtype is not None):
                logits = model(x)
            out.append(torch.sigmoid(logits.float()).cpu().numpy())
    if not out:
        classes = model.segmentation_head[0].out_channels
        return np.zeros((0, classes, *images.shape[2:]), np.float32)
    return np.concatenate(out).astype(np.float32, copy=False)
