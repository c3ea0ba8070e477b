"""`python -m lib.bench brats-preprocess | brats-classifier`: the BraTS task's preprocessing and classifier speed
(declared in the task spec's `extra["bench"]`, so `lib.bench` lists them without importing this package).

    python -m lib.bench brats-preprocess --data DIR [--size 256] [--workers N] [--repeat 3]
    python -m lib.bench brats-classifier [--backbone resnet10t] [--size 64] [--length 16] [--bs 4] [--steps 5]

brats-preprocess, on `DIR/task2/train` (the Kaggle layout, e.g. the phantom's): one JSON line with
  naive_series_s     a per-file pydicom loop as a notebook would write it: dcmread each `Image-N.dcm` in name order,
                     pixel_array, sort by InstanceNumber, z-score, cv2.resize each slice, np.save (no blank-end drop,
                     no ordering along the normal: fewer guarantees, for scale);
  ours_1proc_series_s / ours_parallel_series_s   `lib.tasks.brats.preprocess.cache_series` in 1 process / on all
                     cores (ordered along the normal, blank ends dropped, normalised, atomic writes, identity keys);
  a fresh output folder per run, best of `--repeat` interleaved rounds (a slow spell hits all alike).
brats-classifier: chunks/s of one training step (forward + backward + Adam) of `cnn_lstm` on synthetic chunks of the
given shape, and of inference; no data loading.
"""
from __future__ import annotations

import argparse
import os
import time
from pathlib import Path
from typing import Callable, Dict

import numpy as np

from lib.bench.timing import best_times


def _naive(split_dir: Path, out: Path, size: int) -> None:
    import cv2
    import pydicom

    for pdir in sorted(p for p in split_dir.iterdir() if p.is_dir()):
        for sdir in sorted(p for p in pdir.iterdir() if p.is_dir()):
            files = sorted(sdir.glob("*.dcm"))
            if not files:
                continue
            dss = [pydicom.dcmread(f) for f in files]
            dss.sort(key=lambda d: int(getattr(d, "InstanceNumber", 0) or 0))
            vol = np.stack([d.pixel_array.astype(np.float32) for d in dss])
            fg = vol[vol != 0]
            vol = (vol - fg.mean()) / max(float(fg.std()), 1e-6) if fg.size else vol
            np.save(out / f"{pdir.name}_{sdir.name}.npy",
                    np.stack([cv2.resize(s, (size, size)) for s in vol]).astype(np.float16))


def bench_preprocess(data: str, size: int = 256, workers: int = 0, repeat: int = 3) -> Dict[str, float]:
    from lib.tasks.brats.preprocess import cache_series

    split = Path(data) / "task2" / "train"
    if not split.is_dir():
        raise FileNotFoundError(f"{split} does not exist: pass --data with the BraTS layout (task2/train/...)")
    n_series = sum(1 for p in split.iterdir() if p.is_dir() for s in p.iterdir() if s.is_dir())
    workers = workers or len(os.sched_getaffinity(0))
    fns: Dict[str, Callable[[Path], object]] = {
        "naive": lambda d: _naive(split, d, size),
        "ours_1proc": lambda d: cache_series(split, d, size=size, workers=1, progress=False),
        "ours_parallel": lambda d: cache_series(split, d, size=size, workers=workers, progress=False),
    }
    best = best_times(fns, repeat, "bench_brats_")
    out = {"series": n_series, "size": size, "workers": workers}
    out.update({f"{k}_series_s": round(n_series / v, 2) for k, v in best.items()})
    out["parallel_vs_naive"] = round(best["naive"] / best["ours_parallel"], 2)
    return out


def bench_classifier(backbone: str, size: int, length: int, bs: int, steps: int, device: str) -> Dict[str, float]:
    import torch

    from lib.models.slice_sequence import create_classifier
    from lib.train.precision import resolve_device

    dev = resolve_device(device)
    torch.manual_seed(0)
    model = create_classifier("cnn_lstm", backbone=backbone, hidden=64).to(dev)
    opt = torch.optim.Adam(model.parameters(), 1e-4)
    x = torch.rand(bs, length, 3, size, size, device=dev)
    mask = torch.ones(bs, length, dtype=torch.bool, device=dev)
    y = torch.randint(0, 2, (bs,), device=dev).float()

    def step() -> None:
        opt.zero_grad()
        torch.nn.functional.binary_cross_entropy_with_logits(model(x, mask), y).backward()
        opt.step()

    def infer() -> None:
        with torch.no_grad():
            model(x, mask)

    out = {"backbone": backbone, "size": size, "length": length, "bs": bs, "device": str(dev)}
    for name, fn in (("train", step), ("infer", infer)):
        fn()  # warm-up
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(steps):
            fn()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        out[f"{name}_chunks_s"] = round(steps * bs / (time.perf_counter() - t0), 2)
    return out


def add_preprocess_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser("brats-preprocess", help="BraTS task-2 series -> normalised cache, vs a naive pydicom loop")
    p.add_argument("--data", required=True, help="BraTS layout folder (task2/train), e.g. the phantom's")
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--workers", type=int, default=0, help="processes for the parallel run (0: all cores)")
    p.add_argument("--repeat", type=int, default=3)
    p.set_defaults(func=lambda a: bench_preprocess(a.data, a.size, a.workers, a.repeat))
    return p


def add_classifier_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser("brats-classifier", help="BraTS CNN + BiLSTM training / inference chunks per second")
    p.add_argument("--backbone", default="resnet10t")
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--length", type=int, default=16)
    p.add_argument("--bs", type=int, default=4)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--device", default="auto")
    p.set_defaults(func=lambda a: bench_classifier(a.backbone, a.size, a.length, a.bs, a.steps, a.device))
    return p
