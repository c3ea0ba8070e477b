"""`python -m lib.bench cspine-volumes | cspine-seg`: the cervical-spine volume cache and 3D segmentation inference
speed (declared in the task spec's `extra["bench"]`, so `lib.bench` lists them without importing this package).

    python -m lib.bench cspine-volumes --data DIR [--size 64 96 96] [--workers N] [--repeat 3]
    python -m lib.bench cspine-seg [--arch unet|csn_unet|segresnet] [--shape 32 48 48] [--roi 32 48 48] [--steps 3]

cspine-volumes, on `DIR/train_images` (the Kaggle layout, e.g. the phantom's): one JSON line with
  naive_slices_s      a per-slice loop as a notebook would write it: dcmread each `<n>.dcm` in slice_number order,
                      pixel_array * slope + intercept, cv2.resize each slice in-plane, np.stack, np.save (no order
                      along the normal, no z resampling, no bad-study table, no atomic writes: fewer guarantees);
  ours_1proc_slices_s / ours_parallel_slices_s   `lib.imaging.volume_cache.cache_volumes` in 1 process / on all
                      cores (ordered along the normal, HU, windowed, trilinear 3D resampling, atomic, resumable);
  a fresh output folder per run, best of `--repeat` interleaved rounds.
cspine-seg: volumes/s of sliding-window inference (`lib.models.seg3d.sliding_window_predict`, overlap 0.25) of a
randomly initialised network on a random volume of `--shape` with patches of `--roi`.
"""
from __future__ import annotations

import argparse
import os
import time
from pathlib import Path
from typing import Callable, Dict, Sequence

import numpy as np

from lib.bench.timing import best_times


def _naive(images: Path, out: Path, size: Sequence[int]) -> None:
    import cv2
    import pydicom

    for study in sorted(p for p in images.iterdir() if p.is_dir()):
        files = sorted(study.glob("*.dcm"), key=lambda f: int(f.stem))
        slices = []
        for f in files:
            ds = pydicom.dcmread(f)
            hu = ds.pixel_array.astype(np.float32) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
            slices.append(cv2.resize(hu, (size[2], size[1])))
        np.save(out / f"{study.name}.npy", np.stack(slices))


def bench_volumes(data: str, size: Sequence[int] = (64, 96, 96), workers: int = 0, repeat: int = 3) -> Dict:
    from lib.imaging.volume_cache import cache_volumes

    images = Path(data) / "train_images"
    if not images.is_dir():
        raise FileNotFoundError(f"{images} does not exist: pass --data with the RSNA 2022 layout (train_images/...)")
    studies = {p.name: p for p in sorted(images.iterdir()) if p.is_dir()}
    n_slices = sum(len(list(p.glob("*.dcm"))) for p in studies.values())
    workers = workers or len(os.sched_getaffinity(0))
    fns: Dict[str, Callable[[Path], object]] = {
        "naive": lambda d: _naive(images, d, size),
        "ours_1proc": lambda d: cache_volumes(studies, d, size=size, workers=1, progress=False),
        "ours_parallel": lambda d: cache_volumes(studies, d, size=size, workers=workers, progress=False),
    }
    best = best_times(fns, repeat, "bench_cspine_")
    out = {"studies": len(studies), "slices": n_slices, "size": list(size), "workers": workers}
    out.update({f"{k}_slices_s": round(n_slices / v, 1) for k, v in best.items()})
    out["parallel_vs_naive"] = round(best["naive"] / best["ours_parallel"], 2)
    return out


def bench_seg(arch: str, shape: Sequence[int], roi: Sequence[int], steps: int, device: str, bs: int = 1) -> Dict:
    import torch

    from lib.models.seg3d import create_seg3d, sliding_window_predict
    from lib.train.precision import resolve_device

    dev = resolve_device(device)
    torch.manual_seed(0)
    kwargs = {"unet": {"channels": (8, 16, 32, 64), "num_res_units": 1}}.get(arch, {})
    model = create_seg3d(arch, 1, 8, **kwargs).to(dev).eval()
    vol = np.random.default_rng(0).random(tuple(shape), dtype=np.float32)
    sliding_window_predict(model, vol, roi, overlap=0.25, bs=bs, device=str(dev))  # warm-up
    t0 = time.perf_counter()
    for _ in range(steps):
        sliding_window_predict(model, vol, roi, overlap=0.25, bs=bs, device=str(dev))
    wall = time.perf_counter() - t0
    return {"arch": arch, "shape": list(shape), "roi": list(roi), "device": str(dev),
            "params_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 2),
            "volumes_s": round(steps / wall, 3), "s_per_volume": round(wall / steps, 3)}


def add_volumes_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser("cspine-volumes", help="RSNA 2022 studies -> volume cache, vs a naive per-slice pydicom loop")
    p.add_argument("--data", required=True, help="RSNA 2022 layout folder (train_images/), e.g. the phantom's")
    p.add_argument("--size", type=int, nargs=3, default=(64, 96, 96), metavar=("Z", "Y", "X"))
    p.add_argument("--workers", type=int, default=0, help="processes for the parallel run (0: all cores)")
    p.add_argument("--repeat", type=int, default=3)
    p.set_defaults(func=lambda a: bench_volumes(a.data, a.size, a.workers, a.repeat))
    return p


def add_seg_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser("cspine-seg", help="3D segmentation sliding-window inference volumes per second")
    p.add_argument("--arch", default="unet", help="lib.models.seg3d.SEG3D name")
    p.add_argument("--shape", type=int, nargs=3, default=(32, 48, 48), metavar=("Z", "Y", "X"))
    p.add_argument("--roi", type=int, nargs=3, default=(32, 48, 48), metavar=("Z", "Y", "X"))
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--bs", type=int, default=1)
    p.add_argument("--device", default="auto")
    p.set_defaults(func=lambda a: bench_seg(a.arch, a.shape, a.roi, a.steps, a.device, a.bs))
    return p
