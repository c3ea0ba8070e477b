"""`python -m lib.bench loader`: can the data loader feed the trainer? One JSON line of images/s.

    python -m lib.bench loader [--data DIR | --cache DIR] [--arch resnet18] [--size 128] [--bs 32] [--workers N]
                               [--steps S] [--loader-steps L] [--aug demo] [--mode single|adjacent]

  loader_ips            the training DataLoader (lib.data.datasets.ImageDataset + the `--aug` recipe, `--workers` processes,
                        collate to (images, targets)) iterated alone over a cache of PNGs: `--cache` (a cache folder),
                        else `--data` (the first 256 DICOMs of DATA/stage_2_train rendered by lib.imaging.windowing into a
                        temporary cache), else a synthetic cache of head-like PNGs;
  step_ips              model train steps (forward + backward + fastai Adam step) on synthetic tensors of the same
                        shape, no loader; loader_vs_step = loader_ips / step_ips (>= 3: the loader is not the limit).
On CUDA also (bf16 autocast + channels_last, as lib.train.fit runs):
  model_only_ips        the train step on tensors already on the GPU;
  train_ips             a fastai Learner (lib.train.fit callbacks) fed by the real loader (pinned memory);
  train_vs_model_only   train_ips / model_only_ips (>= 0.7: loading and fastai overhead cost < 30 %).
Timings skip the first batches (worker start-up, cudnn autotune). Register with `add_loader_parser(subparsers)`.
"""
from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List

import cv2
import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, RandomSampler

from lib.tasks import get_task

WARM = 3  # batches / steps excluded from every timing


def synthetic_cache(folder: Path, n: int, size: int, seed: int = 0) -> List[str]:
    """n head-like uint8 (size, size, 3) PNGs (bright ellipse + smooth texture + noise) -> their image ids."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    ids = []
    for i in range(n):
        img = np.zeros((size, size, 3), np.uint8)
        axes = (int(size * rng.uniform(0.3, 0.45)), int(size * rng.uniform(0.35, 0.48)))
        cv2.ellipse(img, (size // 2, size // 2), axes, float(rng.uniform(0, 180)), 0, 360, (200, 120, 90), -1)
        tex = cv2.GaussianBlur(rng.normal(0, 40, (size, size, 3)).astype(np.float32), (0, 0), 3)
        img = np.clip(img + tex * (img > 0) + rng.normal(0, 4, img.shape), 0, 255).astype(np.uint8)
        ids.append(f"ID_{i:09x}")
        cv2.imwrite(str(folder / f"{ids[-1]}.png"), img)
    return ids


def _cache_ids(args: argparse.Namespace, tmp: Path) -> tuple:
    """(cache folder, image ids, description) from --cache, --data or a synthetic cache."""
    if args.cache:
        ids = sorted(p.stem for p in Path(args.cache).glob("*.png"))
        if not ids:
            raise FileNotFoundError(f"--cache {args.cache} holds no <image_id>.png files")
        return Path(args.cache), ids, str(args.cache)
    if args.data:
        from lib.imaging.windowing import build_cache

        files = sorted((Path(args.data) / get_task("ich").layout["train_images"]).glob("*.dcm"))[:256]
        if not files:
            raise FileNotFoundError(f"--data {args.data}: no DICOMs in stage_2_train/")
        res = build_cache([(f.stem, f) for f in files], tmp, img_size=args.size, progress=False)
        return res.dir, sorted(p.stem for p in res.dir.glob("*.png")), f"{len(files)} DICOMs of {args.data}"
    ids = synthetic_cache(tmp / "synthetic", 256, args.size)
    return tmp / "synthetic", ids, "synthetic"


def make_loader(cache: Path, ids: List[str], args: argparse.Namespace, n_items: int, pin: bool) -> DataLoader:
    """The training DataLoader of lib.train.fit (transform, collate, worker seeding) over `n_items` random draws."""
    from lib.data.augment import create_transform
    from lib.data.datasets import ImageDataset, ImageLoader, worker_init_fn
    from lib.train.fit import collate_xy, norm_stats

    nb = None
    if args.mode == "adjacent":
        nb = pd.DataFrame({"image_id": ids, "prev_id": [ids[max(i - 1, 0)] for i in range(len(ids))],
                           "next_id": [ids[min(i + 1, len(ids) - 1)] for i in range(len(ids))]})
    mean, std = norm_stats(args.arch)
    ds = ImageDataset(cache, ids, np.zeros((len(ids), 6), np.float32), mode=args.mode, neighbours=nb,
                      transform=create_transform(args.aug, args.size), mean=mean, std=std)
    sampler = RandomSampler(ds, replacement=True, num_samples=n_items)
    return ImageLoader(ds, batch_size=args.bs, sampler=sampler, num_workers=args.workers, collate_fn=collate_xy,
                      worker_init_fn=worker_init_fn, pin_memory=pin, drop_last=True)


def loader_ips(dl: DataLoader, bs: int) -> float:
    t0, n = None, 0
    for i, _ in enumerate(dl):
        if i == WARM - 1:
            t0 = time.perf_counter()
        elif i >= WARM:
            n += bs
    return n / (time.perf_counter() - t0)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def step_ips(args: argparse.Namespace, device: torch.device, amp: bool) -> float:
    """Forward + backward + fastai Adam step on synthetic (bs, 3, size, size) tensors already on `device`."""
    from fastai.optimizer import Adam

    from lib.models.factory import create_model
    from lib.train.fit import WeightedBCE

    model = create_model(args.arch, num_classes=len(get_task("ich").labels)).to(device).train()
    x = torch.randn(args.bs, 3, args.size, args.size, device=device)
    y = (torch.rand(args.bs, 6, device=device) < 0.2).float()
    if amp:
        model, x = model.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
    opt, loss_fn = Adam(list(model.parameters()), lr=1e-4), WeightedBCE(get_task("ich").weights).to(device)
    warm = WARM if device.type == "cuda" else 1  # CPU steps are slow and need no autotuning
    for i in range(warm + args.steps):
        if i == warm:
            _sync(device)
            t0 = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
            loss = loss_fn(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad()
    _sync(device)
    return args.steps * args.bs / (time.perf_counter() - t0)


def learner_ips(dl: DataLoader, args: argparse.Namespace, device: torch.device) -> float:
    """A fastai Learner with lib.train.fit's precision / channels_last callbacks, fed by the real loader."""
    from fastai.callback.core import Callback
    from fastai.callback.fp16 import MixedPrecision
    from fastai.data.core import DataLoaders
    from fastai.learner import Learner

    from lib.models.factory import create_model
    from lib.train.fit import OPTIMIZERS, ChannelsLastInput, SkipValidation, WeightedBCE

    class Timer(Callback):
        def after_batch(self) -> None:
            if self.iter == WARM - 1:
                _sync(device)
                self.t0 = time.perf_counter()

        def after_train(self) -> None:
            _sync(device)
            self.ips = (self.n_iter - WARM) * args.bs / (time.perf_counter() - self.t0)

    dls = DataLoaders(dl, DataLoader([]))
    dls._device = device
    model = create_model(args.arch, num_classes=len(get_task("ich").labels))
    model = model.to(device).to(memory_format=torch.channels_last)
    timer = Timer()
    learn = Learner(dls, model, WeightedBCE(get_task("ich").weights), opt_func=OPTIMIZERS.get("adamw"), lr=1e-4,
                    cbs=[MixedPrecision("bf16"), ChannelsLastInput(), SkipValidation(), timer])
    with learn.no_bar(), learn.no_logging():
        learn.fit(1)
    return timer.ips


def run_loader_bench(args: argparse.Namespace) -> Dict[str, Any]:
    """Run the benchmark described in the module doc; returns the dict `lib.bench` prints as one JSON line."""
    from lib.train.ddp import resolve_device

    device = resolve_device(args.device)
    if args.workers is None:
        args.workers = os.cpu_count() or 1
    if args.steps is None:
        args.steps = 30 if device.type == "cuda" else 3
    tmp = Path(tempfile.mkdtemp(prefix="rsna_bench_loader_"))
    try:
        cache, ids, source = _cache_ids(args, tmp)
        dl = make_loader(cache, ids, args, (WARM + args.loader_steps) * args.bs, pin=device.type == "cuda")
        out: Dict[str, Any] = {"device": str(device), "arch": args.arch, "size": args.size, "bs": args.bs,
                               "workers": args.workers, "aug": args.aug, "mode": args.mode, "cache": source,
                               "cache_images": len(ids), "loader_ips": round(loader_ips(dl, args.bs), 1)}
        out["step_ips"] = round(step_ips(args, device, amp=False), 1)
        out["loader_vs_step"] = round(out["loader_ips"] / out["step_ips"], 2)
        if device.type == "cuda":
            out["model_only_ips"] = round(step_ips(args, device, amp=True), 1)
            dl = make_loader(cache, ids, args, (WARM + args.steps) * args.bs, pin=True)
            out["train_ips"] = round(learner_ips(dl, args, device), 1)
            out["train_vs_model_only"] = round(out["train_ips"] / out["model_only_ips"], 2)
            out.update(precision="bf16", channels_last=True)
        return out
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def add_loader_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the `loader` subcommand to `python -m lib.bench` (sets func=run_loader_bench)."""
    p = sub.add_parser("loader", help="training DataLoader images/s vs model train-step images/s")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--data", default=None, help="Kaggle-layout folder: cache its first 256 train DICOMs")
    src.add_argument("--cache", default=None, help="an existing cache folder of <image_id>.png")
    p.add_argument("--arch", default="resnet18", help="model name (lib.models.factory)")
    p.add_argument("--size", type=int, default=128, help="training image side in pixels")
    p.add_argument("--bs", type=int, default=32, help="batch size")
    p.add_argument("--workers", type=int, default=None, help="DataLoader worker processes (default: all cores)")
    p.add_argument("--steps", type=int, default=None, help="timed model steps, also Learner steps on CUDA "
                   "(default: 3 on CPU, 30 on CUDA)")
    p.add_argument("--loader-steps", type=int, default=40, help="timed loader batches")
    p.add_argument("--aug", default="demo", help="augmentation recipe (lib.data.augment)")
    p.add_argument("--mode", default="single", choices=("single", "adjacent"), help="dataset input mode")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.set_defaults(func=run_loader_bench)
    return p
