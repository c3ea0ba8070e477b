"""Exact resume for the per-model trainers of the tasks (BraTS and cervical-spine classifiers): the newest epoch
checkpoint's state and a sampler whose order depends only on (seed, epoch)."""
from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any, Collection, Dict, Iterator

import numpy as np
import torch
from torch.utils.data import Sampler

from lib.train.callbacks import truncate_log

#: Files a fresh (not resumed) run deletes from its model folder, besides epoch*.pth.
RUN_FILES = ("best.pth", "log.csv", "oof.csv", "train_result.json")


class EpochSampler(Sampler[int]):
    """A permutation of range(n) drawn from (seed, epoch): the same batches in a resumed run."""

    def __init__(self, n: int, seed: int) -> None:
        self.n, self.seed, self.epoch = int(n), int(seed), 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __iter__(self) -> Iterator[int]:
        return iter(np.random.default_rng([self.seed, self.epoch]).permutation(self.n).tolist())

    def __len__(self) -> int:
        return self.n


def epoch_of(path: Path) -> int:
    """N of an `epochN.pth` file, -1 for any other name."""
    digits = path.stem[len("epoch"):]
    return int(digits) if digits.isdigit() else -1


def initial_state(out_dir: Path, cfg: Any, device: torch.device, resume_free: Collection[str]) -> Dict[str, Any]:
    """Fresh state (stale files removed), or the newest epoch checkpoint's when cfg.resume; the saved config must
    equal `cfg` (a dataclass) except for the `resume_free` fields."""
    state: Dict[str, Any] = {"start_epoch": 0, "best_epoch": None, "best_value": None, "history": [],
                             "elapsed_s": 0.0}
    found = sorted((p for p in out_dir.glob("epoch*.pth") if epoch_of(p) >= 0), key=epoch_of)
    if not cfg.resume or not found:
        for old in [*out_dir.glob("epoch*.pth"), *(out_dir / f for f in RUN_FILES)]:
            old.unlink(missing_ok=True)
        return state
    ckpt = torch.load(found[-1], map_location=device, weights_only=True)
    now = asdict(cfg)
    diff = {k: (ckpt["cfg"].get(k), now[k]) for k in now if k not in resume_free and ckpt["cfg"].get(k) != now[k]}
    if diff:
        raise ValueError(f"cannot resume from {found[-1]}: config changed {diff} (saved, now); use resume=False or "
                         "another name")
    state.update({k: ckpt[k] for k in ("best_epoch", "best_value", "history", "elapsed_s")})
    state.update(start_epoch=int(ckpt["epoch"]) + 1, model=ckpt["model"], opt=ckpt["opt"],
                 smooth_loss=ckpt.get("smooth_loss"), resumed_from=str(found[-1]))
    truncate_log(out_dir / "log.csv", state["start_epoch"])
    return state
