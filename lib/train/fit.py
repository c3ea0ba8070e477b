"""Train one fold of the 2D classifier with a fastai `Learner` over plain torch DataLoaders; resumable; DDP-ready.

    python -m lib.train.fit --run-dir RUN --cache-dir CACHE --fold 0 --config cfg.json --labels labels.parquet \
        --weights '[1, 1, 1, 1, 1, 2]'
    torchrun --nproc_per_node 4 -m lib.train.fit ...   # the same code as 4 DDP processes (see lib.train.ddp)

Outputs in `RunPaths.at(run_dir).model_dir(fold)` (fold -1 = all labelled images, no validation):
  epoch{e}.pth        {"model", "opt" (latest epoch only unless keep_optimizer="all"), "epoch", "best_epoch",
                       "best_value", "history", "cfg", "elapsed_s"[, "scaler"]}, written atomically after every epoch;
  best.pth            {"model", "epoch", "arch", "valid_logloss", "cfg"} of the epoch with the lowest validation
                      weighted log loss (fold -1: the last epoch);
  log.csv             fastai CSVLogger rows (epoch, train_loss, valid_loss, logloss, logloss_<subtype>..., time);
  train_result.json   best_epoch, best_valid_logloss, history, wall_time_s, cfg, world_size, device.
Resume (cfg.resume): the newest epoch checkpoint restores model + optimizer (+ GradScaler), fit restarts with
`start_epoch` = that epoch + 1 (fastai's SkipToEpoch; the LR schedule is positioned by epoch / n_epoch), and every
epoch reseeds python / numpy / torch / albumentations from (seed, epoch, rank), so on CPU with num_workers=0 an
interrupted-and-resumed run ends with exactly the weights of an uninterrupted one (tests/test_train.py).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, ClassVar, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import pandas as pd
import torch

from lib.train import fastai_quiet  # noqa: F401  (before fastai: silences its torch.jit FutureWarning)
from fastai.callback.fp16 import MixedPrecision
from fastai.callback.progress import ProgressCallback
from fastai.callback.schedule import ParamScheduler, SchedCos, SchedLin, combine_scheds
from fastai.data.core import DataLoaders
from fastai.learner import Learner
from fastai.optimizer import Adam
from fastcore.basics import noop
from fastcore.foundation import L
from functools import partial
from torch import nn

from lib import config
from lib.train import ddp
from lib.train.precision import PRECISIONS, resolve_precision  # noqa: F401 (re-exported)
from lib.data.augment import AUGMENTATIONS, create_transform
from lib.data.datasets import MODES, ImageDataset, ImageLoader, SubsampleSampler, worker_init_fn
from lib.models.factory import Norm, check_norm, create_model, norm_stats  # noqa: F401 (norm_stats re-exported)
from lib.evaluate.metrics import weighted_bce_with_logits
from lib.paths import RunPaths, atomic_write_text
from lib.registry import Registry
from lib.train.callbacks import (ChannelsLastInput, EpochCheckpoint, EpochSeed, ResumableCSVLogger,  # noqa: F401
                                 SkipValidation, seed_everything, truncate_log)

PathLike = Union[str, Path]
REPO = Path(__file__).resolve().parents[2]
SCHEDULES: Registry = Registry("lr schedule")
OPTIMIZERS: Registry = Registry("optimizer")
# changing these between a killed run and its resume would silently change the experiment
_RESUME_FREE = {"resume", "num_workers", "device", "save_every_epoch", "keep_optimizer", "patience"}


@dataclass(kw_only=True)
class TrainConfig:
    """Everything one fold's training depends on (JSON/YAML friendly). `bs` is per process (global = bs * N).

    Experiment settings have no defaults: notebooks/ich/02_train_cnn.ipynb's parameters cell is their one source
    (`from_params` maps its unset literals, lib.config); run-time knobs keep neutral defaults.
    """

    UNSET: ClassVar[Dict[str, Any]] = {"pretrained_weights": "", "patience": 0, "max_train_items": 0,
                                       "max_valid_items": 0}

    arch: str
    img_size: int
    pretrained_weights: Optional[str]         # local timm/torchvision state_dict file; None = random init
    mode: str                                 # "single" 3-window slice | "adjacent" slices s-1, s, s+1
    aug: str                                  # lib.data.augment recipe name for training (validation uses "none")
    epochs: int
    lr: float
    wd: float
    bs: int
    schedule: str                             # one_cycle | cosine (linear warm-up + cosine) | constant
    opt: str                                  # adamw (decoupled wd) | adam (L2 wd, the 2nd place's Adam)
    neg_frac: float                           # fraction of any-negative slices drawn per epoch (1 = all)
    seed: int
    mixed_precision: str                      # auto (bf16/fp16 on CUDA, off on CPU) | bf16 | fp16 | no
    channels_last: bool
    drop_rate: float
    pct_start: float                          # one_cycle warm-up fraction
    warmup_pct: float                         # cosine warm-up fraction
    max_train_items: Optional[int]            # random subset (smoke tests); None = all
    max_valid_items: Optional[int]
    patience: Optional[int]                   # early stopping on the validation log loss (epochs without gain)
    norm: Norm                                # input mean/std: "timm" (the model's timm config) | "imagenet" |
    #                                           {"mean": [r, g, b], "std": [r, g, b]} (fractions of 255)
    num_workers: int = config.runtime(4)
    per_class_metrics: bool = config.runtime(True)  # also log the per-subtype validation losses
    resume: bool = config.runtime(True)
    save_every_epoch: bool = config.runtime(True)   # False: only the newest epoch{e}.pth is kept
    keep_optimizer: str = config.runtime("last")    # "last": optimizer state only in the newest epoch{e}.pth | "all"
    device: str = config.runtime("auto")

    def __post_init__(self) -> None:
        """Unknown names fail here, before any data is read (KeyError / ValueError listing the valid values)."""
        SCHEDULES.get(self.schedule)
        OPTIMIZERS.get(self.opt)
        AUGMENTATIONS.get(self.aug)
        choices = {"mode": MODES, "mixed_precision": PRECISIONS, "keep_optimizer": ("last", "all")}
        for key, valid in choices.items():
            if getattr(self, key) not in valid:
                raise ValueError(f"TrainConfig.{key} must be one of {valid}, got {getattr(self, key)!r}")
        if not 0.0 < self.neg_frac <= 1.0:
            raise ValueError(f"TrainConfig.neg_frac must be in (0, 1], got {self.neg_frac}")
        check_norm(self.norm)

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "TrainConfig":
        """Build from a dict; unknown keys or missing experiment settings are a KeyError naming them."""
        config.check_keys(cls, d)
        return cls(**d)

    @classmethod
    def from_params(cls, **params: Any) -> "TrainConfig":
        """Build from notebook parameters: the `UNSET` literals ("" or 0) become None (lib.config)."""
        return cls.from_dict(config.none_if_unset(params, cls.UNSET))

    @classmethod
    def from_json(cls, path: PathLike) -> "TrainConfig":
        return cls.from_dict(json.loads(Path(path).read_text()))


# ---------------------------------------------------------------- loss and metrics
class WeightedBCE(nn.Module):
    """BCE-with-logits weighted like the metric: sum over (rows, labels) of w * bce / (N * sum(w)), `weights` the
    task's metric weights per label (ICH: any = 2, subtypes 1).

    logits, target: float (N, L) in the task's label order. Equals
    `lib.evaluate.metrics.weighted_log_loss(target, sigmoid(logits), weights)`
    (without its probability clipping).
    """

    def __init__(self, weights: Sequence[float]) -> None:
        super().__init__()
        self.register_buffer("weights", torch.as_tensor(np.asarray(weights, np.float32)))

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return weighted_bce_with_logits(logits, target, self.weights)


# ---------------------------------------------------------------- optimizers and schedules
OPTIMIZERS.add("adamw", partial(Adam, decouple_wd=True))
OPTIMIZERS.add("adam", partial(Adam, decouple_wd=False))


@SCHEDULES.register("one_cycle")
def _fit_one_cycle(learn: Learner, cfg: TrainConfig, cbs: list, start_epoch: int) -> None:
    learn.fit_one_cycle(cfg.epochs, cfg.lr, pct_start=cfg.pct_start, wd=cfg.wd, cbs=cbs, start_epoch=start_epoch)


@SCHEDULES.register("cosine")
def _fit_cosine(learn: Learner, cfg: TrainConfig, cbs: list, start_epoch: int) -> None:
    """Linear warm-up from lr/25 over `warmup_pct` of the steps, then cosine annealing to lr/1e4."""
    lr, w = cfg.lr, float(cfg.warmup_pct)
    sched = combine_scheds([w, 1 - w], [SchedLin(lr / 25, lr), SchedCos(lr, lr / 1e4)]) if w > 0 \
        else SchedCos(lr, lr / 1e4)
    learn.fit(cfg.epochs, lr, wd=cfg.wd, cbs=[ParamScheduler({"lr": sched})] + cbs, start_epoch=start_epoch)


@SCHEDULES.register("constant")
def _fit_constant(learn: Learner, cfg: TrainConfig, cbs: list, start_epoch: int) -> None:
    """Constant lr (the 2nd place: Adam 2e-5, no scheduler)."""
    learn.fit(cfg.epochs, cfg.lr, wd=cfg.wd, cbs=cbs, start_epoch=start_epoch)


# ---------------------------------------------------------------- data
def collate_xy(items: List[Dict[str, Any]]) -> Tuple[torch.Tensor, torch.Tensor]:
    """Dataset dict items -> (images float32 (B, 3, S, S), targets float32 (B, 6)), the tuple fastai expects."""
    return torch.stack([it["image"] for it in items]), torch.stack([it["target"] for it in items])


def _subset(ids: np.ndarray, n: Optional[int], seed: int) -> np.ndarray:
    if n is None or n >= len(ids):
        return ids
    return ids[np.sort(np.random.default_rng(seed).choice(len(ids), size=int(n), replace=False))]


def split_fold(folds: pd.DataFrame, labels: pd.DataFrame, fold: int, cfg: TrainConfig) -> Tuple[np.ndarray, ...]:
    """(train ids, train labels (N, L) float32, valid ids, valid labels) of `fold` (-1: all images, no valid);
    L = the columns of the wide `labels` table, in its order."""
    missing = [c for c in ("image_id", "fold") if c not in folds.columns]
    if missing:
        raise KeyError(f"folds lacks columns {missing}; expected image_id, fold (lib.data.folds.make_folds)")
    if fold >= 0 and fold not in set(folds["fold"].astype(int)):
        raise ValueError(f"fold {fold} is not in the folds table (folds: {sorted(set(folds['fold'].astype(int)))})")
    ids = folds["image_id"].astype(str).to_numpy()
    lab = labels.reindex(ids)
    if lab.isna().any(axis=1).any():
        bad = ids[lab.isna().any(axis=1).to_numpy()]
        raise KeyError(f"{len(bad)} images of the folds table have no labels, e.g. {bad[:3].tolist()}")
    y = lab.to_numpy(np.float32)
    is_val = folds["fold"].astype(int).to_numpy() == fold
    tr = _subset(np.flatnonzero(~is_val), cfg.max_train_items, cfg.seed)
    va = _subset(np.flatnonzero(is_val), cfg.max_valid_items, cfg.seed)
    return ids[tr], y[tr], ids[va], y[va]


def build_dataloaders(cache_dir: PathLike, split: Tuple[np.ndarray, ...], cfg: TrainConfig, env: ddp.DistEnv,
                      neighbours: Optional[pd.DataFrame] = None, model: Optional[nn.Module] = None
                      ) -> Tuple[DataLoaders, SubsampleSampler, Any]:
    """fastai DataLoaders over plain torch DataLoaders (train: SubsampleSampler sharded by rank; valid: strided
    shards), the train sampler and the train transform (for per-epoch reseeding). Inputs are normalised with
    `norm_stats(model or cfg.arch, cfg.norm)`."""
    tr_ids, tr_y, va_ids, va_y = split
    mean, std = norm_stats(model if model is not None else cfg.arch, cfg.norm)
    tf = create_transform(cfg.aug, cfg.img_size)
    common = dict(mode=cfg.mode, neighbours=neighbours, mean=mean, std=std)
    train_ds = ImageDataset(cache_dir, tr_ids, tr_y, transform=tf, **common)
    valid_ds = ImageDataset(cache_dir, va_ids, va_y, transform=create_transform("none", cfg.img_size), **common)
    # a negative image has no positive label (for ICH: any = 0)
    sampler = SubsampleSampler(tr_y.max(axis=1), cfg.neg_frac, cfg.seed, shuffle=True,
                               rank=env.rank, num_replicas=env.world_size)
    loader = dict(num_workers=cfg.num_workers, collate_fn=collate_xy, worker_init_fn=worker_init_fn,
                  pin_memory=env.device.type == "cuda")
    train_dl = ImageLoader(train_ds, batch_size=cfg.bs, sampler=sampler, drop_last=len(sampler) > cfg.bs, **loader)
    valid_dl = ImageLoader(valid_ds, batch_size=cfg.bs * 2, shuffle=False, **loader,
                          sampler=ddp.ShardSampler(len(valid_ds), env.rank, env.world_size))
    dls = DataLoaders(train_dl, valid_dl, path=".")
    dls._device = env.device  # plain torch DataLoaders have no .to(); fastai moves each batch to dls.device
    return dls, sampler, tf


# ---------------------------------------------------------------- resume
def _epoch_of(path: Path) -> int:
    digits = path.stem[len("epoch"):]
    return int(digits) if digits.isdigit() else -1


def latest_checkpoint(out_dir: Path) -> Optional[Path]:
    """The newest `epoch{e}.pth` in `out_dir` that holds an optimizer state (files are written atomically)."""
    for path in sorted(out_dir.glob("epoch*.pth"), key=_epoch_of, reverse=True):
        if _epoch_of(path) >= 0 and "opt" in torch.load(path, map_location="cpu", weights_only=True, mmap=True):
            return path
    return None


def _check_resumable(saved: Dict[str, Any], cfg: TrainConfig, path: Path) -> None:
    now = asdict(cfg)
    diff = {k: (saved.get(k), now[k]) for k in now if k not in _RESUME_FREE and saved.get(k) != now[k]}
    if diff:
        raise ValueError(f"cannot resume from {path}: config changed {diff} (saved, now); use resume=False or a new "
                         f"run dir")


def _initial_state(out_dir: Path, cfg: TrainConfig, device: torch.device, write: bool = True) -> Dict[str, Any]:
    """Training state: fresh, or loaded from the newest epoch checkpoint when cfg.resume; `write`: trim log.csv to
    the epochs before the restart (rank 0 only)."""
    state = {"start_epoch": 0, "best_epoch": None, "best_value": None, "history": [], "elapsed_s": 0.0}
    path = latest_checkpoint(out_dir) if cfg.resume else None
    if path is None:
        if write:  # a fresh start: stale epochs of an earlier run must not be resumed from or exported later
            for old in [*out_dir.glob("epoch*.pth"), out_dir / "best.pth", out_dir / "train_result.json",
                        out_dir / "log.csv"]:
                old.unlink(missing_ok=True)
        return state
    ckpt = torch.load(path, map_location=device, weights_only=True)
    _check_resumable(ckpt["cfg"], cfg, path)
    state.update({k: ckpt[k] for k in ("best_epoch", "best_value", "history", "elapsed_s")})
    state.update(start_epoch=int(ckpt["epoch"]) + 1, model=ckpt["model"], opt=ckpt["opt"],
                 scaler=ckpt.get("scaler"), smooth_loss=ckpt.get("smooth_loss"), resumed_from=str(path))
    if write:
        truncate_log(out_dir / "log.csv", state["start_epoch"])
    return state


# ---------------------------------------------------------------- one fold
def _opt_state(saved: Dict[str, Any]) -> Dict[str, Any]:
    return {"state": list(saved["state"]), "hypers": L(saved["hypers"])}


def _fit_callbacks(learn: Learner, cfg: TrainConfig, env: ddp.DistEnv, state: Dict[str, Any], out_dir: Path,
                   has_valid: bool, sampler: SubsampleSampler, tf: Any, net: nn.Module) -> Tuple[list, Optional[str]]:
    """The callbacks of this fit and the resolved mixed precision; rank > 0 gets no progress bar and no logging."""
    cbs: list = [EpochSeed(cfg.seed, env.rank, sampler, tf),
                 EpochCheckpoint(out_dir, cfg, state, env.is_main, has_valid)]
    if env.distributed:
        cbs.append(ddp.DDPCallback(net))
    if not has_valid:
        cbs.append(SkipValidation())
        learn.recorder.valid_metrics = False
    precision = resolve_precision(cfg.mixed_precision, env.device)
    if precision:
        cbs.append(MixedPrecision(precision))
    if cfg.channels_last:
        cbs.append(ChannelsLastInput())
    if env.is_main:
        cbs.append(ResumableCSVLogger("log.csv", state["start_epoch"]))
    else:
        learn.remove_cb(ProgressCallback)
        learn.logger = noop
    return cbs, precision


def train_fold(run_dir: PathLike, cache_dir: PathLike, folds: pd.DataFrame, labels: pd.DataFrame, fold: int,
               cfg: TrainConfig, weights: Sequence[float], neighbours: Optional[pd.DataFrame] = None,
               cbs: Optional[list] = None, dump_state: Optional[str] = None) -> Dict[str, Any]:
    """Train the 2D classifier on folds != `fold`, validate on fold == `fold` (fold -1: everything, no validation).

    folds: image_id, fold (lib.data.folds); labels: wide 0/1 table (index image_id, one column per label of the task, in
    its order); weights: the task's metric weight per label (loss and validation metric); neighbours: table
    of lib.data.datasets.neighbours for mode="adjacent". Writes to RunPaths.at(run_dir).model_dir(fold) (see module doc) and
    returns the train_result.json dict. Under torchrun (WORLD_SIZE > 1) this is one DDP rank; only rank 0 writes.
    `cbs`: extra fastai callbacks (tests); `dump_state`: test hook, each rank saves its final model state_dict to
    dump_state.format(rank=rank).
    """
    t0 = time.time()
    with ddp.process_group(cfg.device) as env:
        out_dir = RunPaths.at(run_dir).model_dir(fold)
        split = split_fold(folds, labels, int(fold), cfg)
        has_valid = int(fold) >= 0
        if not len(split[0]) or (has_valid and not len(split[2])):
            raise ValueError(f"fold {fold}: {len(split[0])} training and {len(split[2])} validation images; need >0")
        state = _initial_state(out_dir, cfg, env.device, write=env.is_main)
        ddp.barrier()  # every rank has read the checkpoint before rank 0 writes anything
        seed_everything(cfg.seed)
        if len(weights) != labels.shape[1]:
            raise ValueError(f"{len(weights)} metric weights for {labels.shape[1]} label columns "
                             f"{list(labels.columns)}")
        model = create_model(cfg.arch, num_classes=labels.shape[1], pretrained=cfg.pretrained_weights is not None,
                             pretrained_weights=cfg.pretrained_weights, drop_rate=cfg.drop_rate)
        if "model" in state:
            model.load_state_dict(state.pop("model"))
        model.to(env.device)
        torch.backends.cudnn.benchmark = env.device.type == "cuda"
        if cfg.channels_last:
            model.to(memory_format=torch.channels_last)
        dls, sampler, tf = build_dataloaders(cache_dir, split, cfg, env, neighbours, model=model)
        net = ddp.wrap(model, env)
        metrics = ddp.make_metrics(list(labels.columns), weights, cfg.per_class_metrics) if has_valid else None
        learn = Learner(dls, net, loss_func=WeightedBCE(weights), opt_func=OPTIMIZERS.get(cfg.opt), lr=cfg.lr,
                        wd=cfg.wd, metrics=metrics, path=out_dir)
        fit_cbs, precision = _fit_callbacks(learn, cfg, env, state, out_dir, has_valid, sampler, tf, net)
        learn.create_opt()
        if "opt" in state:
            learn.opt.load_state_dict(_opt_state(state.pop("opt")))
        if state["start_epoch"] < cfg.epochs:
            SCHEDULES.get(cfg.schedule)(learn, cfg, fit_cbs + list(cbs or []), state["start_epoch"])
        if dump_state:
            torch.save(model.state_dict(), str(dump_state).format(rank=env.rank))
        result = {"fold": int(fold), "best_epoch": state["best_epoch"], "best_valid_logloss": state["best_value"],
                  "epochs_done": len(state["history"]), "history": state["history"], "wall_time_s": state["elapsed_s"],
                  "call_wall_time_s": time.time() - t0, "resumed_from": state.get("resumed_from"),
                  "n_train": len(split[0]), "n_valid": len(split[2]), "world_size": env.world_size,
                  "device": str(env.device), "precision": precision, "model_dir": str(out_dir), "cfg": asdict(cfg),
                  "labels": [str(c) for c in labels.columns]}
        if env.is_main:
            atomic_write_text(out_dir / "train_result.json", json.dumps(result, indent=1))
        ddp.barrier()
    return result


# ---------------------------------------------------------------- launching (notebooks) and the CLI
def _read_table(path: PathLike, kind: str) -> pd.DataFrame:
    """Read labels / folds / neighbours: parquet or CSV; labels are the wide table (image_id + one column per label;
    a task's own format, e.g. ICH's `ID,Label` rows, is converted by the caller)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{kind} file not found: {path}")
    df = pd.read_parquet(path) if path.suffix == ".parquet" else pd.read_csv(path, dtype={"image_id": str})
    if kind == "labels":
        if df.index.name == "image_id":  # a parquet written from the indexed table
            return df
        if "image_id" not in df.columns:
            raise ValueError(f"{path}: labels must be a wide table with an image_id column; "
                             f"columns: {list(df.columns)}")
        return df.set_index("image_id")
    return df.astype({"image_id": str})


def _as_frame(obj: Union[pd.DataFrame, PathLike, None], kind: str, default: Optional[Path]) -> Optional[pd.DataFrame]:
    if isinstance(obj, pd.DataFrame):
        return obj
    if obj is None and default is None:
        return None
    return _read_table(obj if obj is not None else default, kind)


def launch(run_dir: PathLike, cache_dir: PathLike, fold: int, cfg: TrainConfig,
           labels: Union[pd.DataFrame, PathLike], weights: Sequence[float], nproc: int = 1,
           folds: Union[pd.DataFrame, PathLike, None] = None, neighbours: Union[pd.DataFrame, PathLike, None] = None,
           extra_args: Sequence[str] = ()) -> Dict[str, Any]:
    """Train one fold from a notebook: in this process when nproc == 1, else `torchrun --nproc_per_node nproc`.

    labels: the wide table (or its parquet/CSV file); weights: the task's metric weight per label column; folds
    default: the run's folds.csv. DataFrames are handed to torchrun through temporary parquet files.
    """
    rp = RunPaths.at(run_dir)
    if nproc <= 1:
        return train_fold(run_dir, cache_dir, _as_frame(folds, "folds", rp.folds), _as_frame(labels, "labels", None),
                          fold, cfg, weights, neighbours=_as_frame(neighbours, "neighbours", None))
    gpus = torch.cuda.device_count() if cfg.device in ("auto", "cuda") else 0
    if gpus and nproc > gpus:
        raise ValueError(f"nproc={nproc} DDP processes need one GPU each, but {gpus} CUDA device(s) are visible "
                         f"(nccl refuses two ranks on one GPU); use nproc <= {gpus} or device='cpu' (gloo)")
    with tempfile.TemporaryDirectory(prefix="rsna_launch_") as tmp:
        args = ["--run-dir", str(rp.root), "--cache-dir", str(cache_dir), "--fold", str(fold),
                "--config", str(Path(tmp) / "cfg.json"), "--weights", json.dumps([float(w) for w in weights])]
        atomic_write_text(Path(tmp) / "cfg.json", json.dumps(asdict(cfg)))
        for flag, obj in (("--folds", folds), ("--labels", labels), ("--neighbours", neighbours)):
            if isinstance(obj, pd.DataFrame):
                obj.to_parquet(Path(tmp) / f"{flag[2:]}.parquet")
                obj = Path(tmp) / f"{flag[2:]}.parquet"
            if obj is not None:
                args += [flag, str(obj)]
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={int(nproc)}",
               "-m", "lib.train.fit", *args, *extra_args]
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
        subprocess.run(cmd, check=True, cwd=str(REPO), env=env)
    return json.loads((rp.model_dir(fold) / "train_result.json").read_text())


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m lib.train.fit", description="Train one fold of the 2D classifier.")
    p.add_argument("--run-dir", required=True)
    p.add_argument("--cache-dir", required=True, help="windowed image cache folder (<image_id>.png)")
    p.add_argument("--fold", type=int, required=True, help="validation fold; -1 = train on all labelled images")
    p.add_argument("--config", required=True, help="JSON file with TrainConfig fields")
    p.add_argument("--folds", default=None, help="folds CSV/parquet (default: RUN/folds.csv)")
    p.add_argument("--labels", required=True, help="wide labels (parquet or CSV: image_id + one column per label)")
    p.add_argument("--weights", required=True, help="JSON list: the metric weight of each label column")
    p.add_argument("--neighbours", default=None, help="neighbours table (mode='adjacent')")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="override config fields (JSON values)")
    p.add_argument("--dump-final-state", default=None, help="test hook: each rank saves its final state_dict here "
                   "(a path containing {rank})")
    return p


def _parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    a = build_parser().parse_args(argv)
    conf = json.loads(Path(a.config).read_text())
    for item in a.set:
        key, _, value = item.partition("=")
        conf[key] = _parse_value(value)
    rp = RunPaths.at(a.run_dir)
    labels = _read_table(a.labels, "labels")
    folds = _read_table(a.folds or rp.folds, "folds")
    nb = _read_table(a.neighbours, "neighbours") if a.neighbours else None
    return train_fold(a.run_dir, a.cache_dir, folds, labels, a.fold, TrainConfig.from_dict(conf),
                      json.loads(a.weights), neighbours=nb, dump_state=a.dump_final_state)


if __name__ == "__main__":
    main()
