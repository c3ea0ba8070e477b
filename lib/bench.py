"""Benchmarks, one subcommand each, each printing ONE JSON line: `python -m lib.bench <subcommand> ...`.

    python -m lib.bench preprocess --data DIR [--n 200] [--size 256] [--workers W] [--repeat 3]
    python -m lib.bench loader [--arch resnet18] [--size 128] [--bs 32]        (lib/bench_loader.py)
    python -m lib.bench sequence [--series 21744] [--dim 2048] [--steps 50]    (lib/bench_sequence.py)

To add a subcommand: write `_add_<name>(sub)` that adds its parser and sets `func=<function(args) -> dict>`, and
list it in `SUBCOMMANDS`.

`preprocess` times, on the same N 512x512 files of DIR/stage_2_train (OS file cache warmed first, best of
`--repeat` passes, throughput in images/s):
  ceiling_ips        pydicom dcmread + pixel_array only, one process (decode cannot get faster than this);
  naive_ips          the anchors' way (NoBrainer/Appian): dcmread -> float64 HU -> 3 windows at full 512 px,
                     each scaled by its own window, minus its min, x255 -> cv2.resize -> cv2.imwrite PNG, one process;
  ours_1proc_ips     `lib.windowing.build_cache` with workers=1 into a fresh folder;
  ours_parallel_ips  the same with `--workers` processes (default all cores), fresh folder, worker start-up
                     included (the forkserver's one-time start, ~1 s per Python process, falls out as the best
                     of `--repeat` is kept).
Ratios: ours_vs_naive = ours_1proc / naive (same resources), ours_parallel_vs_naive, ours_vs_ceiling =
ours_1proc / ceiling, parallel_speedup = ours_parallel / ours_1proc. One-process timings run with
cv2.setNumThreads(1) so "one process" means one core. build_cache tunes glibc malloc
(`lib.windowing.keep_freed_memory`); every timing above runs with the same setting, and
naive_default_malloc_ips is the naive conversion as shipped (default malloc, measured first).
Also reported: CPU ms per image of the one-process runs (time.process_time; robust when other jobs share the
cores), ours_vs_naive_cpu, and the 1-minute load average at the end (ratios are only meaningful when it is
below the core count).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import cv2
import numpy as np
import pydicom

from lib.bench_loader import add_loader_parser
from lib.bench_sequence import add_sequence_parser
from lib.dicom import DicomError, read_hu
from lib.paths import CompetitionData

NAIVE_WINDOWS = ((40, 80), (80, 200), (40, 380))  # (center, width) HU, as in the anchors' scripts


def pick_files(train_dir: Path, n: int, shape: tuple = (512, 512)) -> List[Path]:
    """The first `n` DICOMs (sorted by name) in `train_dir` of `shape` (rows, cols) that `read_hu` accepts."""
    files = sorted(Path(train_dir).glob("*.dcm"))
    if not files:
        raise FileNotFoundError(f"no *.dcm files in {train_dir} (expected a Kaggle-layout stage_2_train folder)")
    out: List[Path] = []
    for f in files:
        try:
            if read_hu(f).shape == shape:
                out.append(f)
        except DicomError:
            continue  # the phantom / real data hold corrupt files on purpose; they are not timed
        if len(out) == n:
            break
    return out


def _decode_only(files: Sequence[Path]) -> None:
    for f in files:
        pydicom.dcmread(f).pixel_array


def _naive_one(path: Path, out_dir: Path, size: int) -> None:
    """The anchors' per-file conversion (2nd place `convert_dicom_to_jpg` style), written as PNG."""
    ds = pydicom.dcmread(path)
    img = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    chans = []
    for center, width in NAIVE_WINDOWS:
        lo, hi = center - width // 2, center + width // 2
        x = img.copy()
        x[x < lo] = lo
        x[x > hi] = hi
        chans.append((x - lo) / (hi - lo))
    im = np.dstack(chans)
    im = (im - im.min(axis=(0, 1))) * 255
    im = cv2.resize(im, (size, size)).astype(np.uint8)
    cv2.imwrite(str(out_dir / f"{path.stem}.png"), im)


def _naive(files: Sequence[Path], out_dir: Path, size: int) -> None:
    for f in files:
        _naive_one(f, out_dir, size)


def _best(fn: Callable[[Path], None], n: int, repeat: int) -> Tuple[float, float]:
    """(images/s wall clock, CPU ms/image of this process) of the fastest of `repeat` runs of fn(fresh temp dir)."""
    wall, cpu = float("inf"), float("inf")
    for _ in range(repeat):
        tmp = Path(tempfile.mkdtemp(prefix="rsna_bench_"))
        try:
            t0, c0 = time.perf_counter(), time.process_time()
            fn(tmp)
            wall, cpu = min(wall, time.perf_counter() - t0), min(cpu, time.process_time() - c0)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return n / wall, 1e3 * cpu / n


def bench_preprocess(data: str, n: int = 200, size: int = 256, workers: Optional[int] = None,
                     repeat: int = 3, policy: str = "brain_subdural_soft") -> Dict[str, float]:
    """Throughput of decode-only, the naive conversion and `build_cache` (1 process, all cores); see module doc."""
    from lib.windowing import build_cache, keep_freed_memory

    files = pick_files(CompetitionData.at(data).train_dir, n)
    if not files:
        raise ValueError(f"no 512x512 DICOMs in {CompetitionData.at(data).train_dir}")
    n, workers = len(files), workers or len(os.sched_getaffinity(0))
    for f in files:  # warm the OS file cache so the disk does not dominate
        f.read_bytes()
    items = [(f.stem, f) for f in files]
    threads = cv2.getNumThreads()
    cv2.setNumThreads(1)
    try:
        naive_default, _ = _best(lambda d: _naive(files, d, size), n, repeat)
        keep_freed_memory()  # what build_cache does; applied to every measurement below for a fair comparison
        ceiling, ceiling_cpu = _best(lambda _: _decode_only(files), n, repeat)
        naive, naive_cpu = _best(lambda d: _naive(files, d, size), n, repeat)
        one, one_cpu = _best(lambda d: build_cache(items, d, policy, size, workers=1, progress=False), n, repeat)
    finally:
        cv2.setNumThreads(threads)
    par, _ = _best(lambda d: build_cache(items, d, policy, size, workers=workers, progress=False), n, repeat)
    return {"n": n, "size": size, "policy": policy, "ceiling_ips": round(ceiling, 1), "naive_ips": round(naive, 1),
            "ours_1proc_ips": round(one, 1), "ours_parallel_ips": round(par, 1), "workers": workers,
            "ours_vs_naive": round(one / naive, 2), "ours_parallel_vs_naive": round(par / naive, 2),
            "ours_vs_ceiling": round(one / ceiling, 2), "parallel_speedup": round(par / one, 2),
            "naive_default_malloc_ips": round(naive_default, 1), "ceiling_cpu_ms": round(ceiling_cpu, 2),
            "naive_cpu_ms": round(naive_cpu, 2), "ours_1proc_cpu_ms": round(one_cpu, 2),
            "ours_vs_naive_cpu": round(naive_cpu / one_cpu, 2), "load_avg_1min": round(os.getloadavg()[0], 2)}


def _add_preprocess(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("preprocess", help="DICOM -> windowed cache throughput vs decode ceiling and naive baseline")
    p.add_argument("--data", required=True, help="Kaggle-layout folder holding stage_2_train/")
    p.add_argument("--n", type=int, default=200, help="number of 512x512 files to time")
    p.add_argument("--size", type=int, default=256, help="output image side in pixels")
    p.add_argument("--workers", type=int, default=None, help="processes for the parallel run (default: all cores)")
    p.add_argument("--repeat", type=int, default=3, help="passes per measurement; the fastest is reported")
    p.add_argument("--policy", default="brain_subdural_soft", help="window policy name (lib.windowing.POLICIES)")
    p.set_defaults(func=lambda a: bench_preprocess(a.data, a.n, a.size, a.workers, a.repeat, a.policy))


SUBCOMMANDS: List[Callable[[argparse._SubParsersAction], object]] = [_add_preprocess, add_loader_parser,
                                                                     add_sequence_parser]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m lib.bench", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for add in SUBCOMMANDS:
        add(sub)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, float]:
    """Parse `argv`, run the subcommand, print its result as one JSON line and return it."""
    args = build_parser().parse_args(argv)
    result = args.func(args)
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main()
