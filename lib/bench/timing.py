"""Timing helper shared by the task benchmarks: the best wall time of each function over interleaved rounds."""
from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict


def best_times(fns: Dict[str, Callable[[Path], object]], repeat: int, prefix: str = "bench_") -> Dict[str, float]:
    """{name: best seconds} of each `fn(out_dir)` over `repeat` interleaved rounds (a slow spell hits all alike), each
    call writing into a fresh temporary folder that is removed afterwards."""
    best = {k: float("inf") for k in fns}
    for _ in range(repeat):
        for k, fn in fns.items():
            tmp = Path(tempfile.mkdtemp(prefix=prefix))
            try:
                t0 = time.perf_counter()
                fn(tmp)
                best[k] = min(best[k], time.perf_counter() - t0)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
    return best
