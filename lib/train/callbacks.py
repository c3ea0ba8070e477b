"""fastai callbacks and helpers of the CNN training loop (lib.train.fit): per-epoch reseeding for exact resume, the
resumable CSV log, epoch checkpoints with best-epoch tracking and early stopping, channels_last input, no-validation
runs (fold -1)."""
from __future__ import annotations

import csv
import random
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Dict, Optional, Protocol

import numpy as np
import torch
from lib.train import fastai_quiet  # noqa: F401  (before fastai: silences its torch.jit FutureWarning)
from fastai.callback.core import Callback, CancelFitException, CancelValidException
from fastai.callback.progress import CSVLogger

from lib.train import ddp
from lib.data.datasets import SubsampleSampler
from lib.paths import atomic_write, atomic_write_text


class CheckpointSettings(Protocol):
    """What the callbacks read of `lib.train.fit.TrainConfig` (a dataclass: checkpoints store `asdict(cfg)`)."""

    arch: str
    patience: Optional[int]
    save_every_epoch: bool
    keep_optimizer: str


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def epoch_seed(seed: int, epoch: int, rank: int) -> int:
    return int(seed) * 1_000_003 + 1000 * int(epoch) + int(rank)


# ---------------------------------------------------------------- callbacks
class EpochSeed(Callback):
    """Reseed every RNG from (seed, epoch, rank) before each epoch and move the sampler to the epoch: a resumed
    run draws the same batches and augmentations as an uninterrupted one (DataLoader workers derive their seeds
    from torch's RNG; lib.data.worker_init_fn reseeds albumentations in each worker)."""

    order = -30

    def __init__(self, seed: int, rank: int, sampler: SubsampleSampler, transform: Any) -> None:
        self.seed, self.rank, self.sampler, self.transform = seed, rank, sampler, transform

    def before_epoch(self) -> None:
        s = epoch_seed(self.seed, self.epoch, self.rank)
        seed_everything(s)
        self.sampler.set_epoch(self.epoch)
        if hasattr(self.transform, "set_random_seed"):
            self.transform.set_random_seed(s % 2**32)


class SkipValidation(Callback):
    """fold -1 (all data): no validation phase."""

    order = -5

    def before_validate(self) -> None:
        raise CancelValidException()


class ChannelsLastInput(Callback):
    """Feed the (already channels_last) model channels_last input batches."""

    def before_batch(self) -> None:
        self.learn.xb = tuple(x.contiguous(memory_format=torch.channels_last) for x in self.xb)


class ResumableCSVLogger(CSVLogger):
    """fastai's CSVLogger appending to log.csv: header only when new, no rows for epochs skipped on resume."""

    def __init__(self, fname: str = "log.csv", start_epoch: int = 0) -> None:
        super().__init__(fname, append=True)
        self.start_epoch = start_epoch

    def before_fit(self) -> None:
        path = Path(self.path) / self.fname
        path.parent.mkdir(parents=True, exist_ok=True)
        fresh = not path.exists() or path.stat().st_size == 0
        self.file = path.open("a")
        if fresh:
            self.file.write(",".join(self.recorder.metric_names) + "\n")
        self.old_logger, self.learn.logger = self.logger, self._write_line

    def _write_line(self, log: list) -> None:
        if int(log[0]) >= self.start_epoch:
            super()._write_line(log)


def truncate_log(path: Path, start_epoch: int) -> None:
    """Keep the header and rows of epochs < start_epoch (a killed run may have logged an unsaved epoch)."""
    if not path.exists():
        return
    rows = list(csv.reader(path.read_text().splitlines()))
    keep = rows[:1] + [r for r in rows[1:] if r and r[0].isdigit() and int(r[0]) < start_epoch]
    atomic_write_text(path, "".join(",".join(r) + "\n" for r in keep) if start_epoch > 0 else "")


def _atomic_save(obj: Any, path: Path) -> None:
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


def _plain(v: Any) -> Any:
    """Tensor / numpy scalars -> python numbers (checkpoints are loaded with weights_only=True)."""
    if isinstance(v, torch.Tensor) and v.ndim == 0:
        v = v.item()
    if isinstance(v, np.generic):
        v = v.item()
    return v


class EpochCheckpoint(Callback):
    """After each epoch: record the log row, track the best validation `monitor` (a metric name of the log row,
    `mode` "min": lower is better, "max": higher; default the ICH weighted log loss), write epoch{e}.pth (+ best.pth,
    whose score key is `valid_<monitor>`) on rank 0, prune old optimizer states, stop early after `patience` epochs
    without improvement."""

    order = 65  # after Recorder (50) and CSVLogger (60): the epoch's row is complete

    def __init__(self, out_dir: Path, cfg: CheckpointSettings, state: Dict[str, Any], is_main: bool,
                 has_valid: bool, monitor: str = "logloss", mode: str = "min") -> None:
        if mode not in ("min", "max"):
            raise ValueError(f"EpochCheckpoint mode must be 'min' or 'max', got {mode!r}")
        self.out_dir, self.cfg, self.state, self.is_main, self.has_valid = out_dir, cfg, state, is_main, has_valid
        self.monitor, self.mode = monitor, mode

    def _better(self, value: float, best: Optional[float]) -> bool:
        return best is None or (value < best if self.mode == "min" else value > best)

    def before_fit(self) -> None:
        self.t0 = time.time()
        scaler = getattr(self.learn, "scaler", None)
        if scaler is not None and self.state.get("scaler"):
            scaler.load_state_dict(self.state["scaler"])
        smooth = self.state.get("smooth_loss")
        if smooth is not None:  # Recorder (order 50) has just reset it: continue the run's running mean instead
            self.recorder.smooth_loss.count = int(smooth["count"])
            self.recorder.smooth_loss.val = smooth["val"].to(self.dls.device)

    def after_epoch(self) -> None:
        st, e = self.state, int(self.epoch)
        if e < st["start_epoch"]:
            return
        row = {k: _plain(v) for k, v in zip(self.recorder.metric_names, self.recorder.log)}
        st["history"].append(row)
        value = row.get(self.monitor) if self.has_valid else None
        improved = value is not None and np.isfinite(value) and self._better(value, st["best_value"])
        if improved or not self.has_valid:
            st["best_epoch"], st["best_value"] = e, value
        st["elapsed_s"] += time.time() - self.t0
        self.t0 = time.time()
        if self.is_main:
            self._save(e, improved or not self.has_valid)
        if self.cfg.patience and self.has_valid and e - st["best_epoch"] >= self.cfg.patience:
            raise CancelFitException()

    def _save(self, e: int, best: bool) -> None:
        st, model = self.state, ddp.unwrap(self.learn.model).state_dict()
        opt = self.learn.opt.state_dict()
        hypers = [{k: _plain(v) for k, v in h.items()} for h in opt["hypers"]]
        ckpt = {"model": model, "opt": {"state": list(opt["state"]), "hypers": hypers}, "epoch": e,
                "best_epoch": st["best_epoch"], "best_value": st["best_value"], "history": st["history"],
                "cfg": asdict(self.cfg), "elapsed_s": st["elapsed_s"],
                "smooth_loss": {"count": int(self.recorder.smooth_loss.count),
                                "val": torch.as_tensor(self.recorder.smooth_loss.val).detach().cpu().clone()}}
        scaler = getattr(self.learn, "scaler", None)
        if scaler is not None:
            ckpt["scaler"] = scaler.state_dict()
        _atomic_save(ckpt, self.out_dir / f"epoch{e}.pth")
        if best:
            _atomic_save({"model": model, "epoch": e, "arch": self.cfg.arch, f"valid_{self.monitor}": st["best_value"],
                          "cfg": asdict(self.cfg)}, self.out_dir / "best.pth")
        prev = self.out_dir / f"epoch{e - 1}.pth"
        if prev.exists() and not self.cfg.save_every_epoch:
            prev.unlink()
        elif prev.exists() and self.cfg.keep_optimizer == "last":
            old = torch.load(prev, map_location="cpu", weights_only=True)
            if old.pop("opt", None) is not None:
                _atomic_save(old, prev)
