"""Benchmark of the sequence stage at full competition scale on synthetic embeddings.

`python -m lib.bench sequence` (or `python -m lib.bench_sequence`): writes a float16 (N, D) embedding memmap for
21,744 series x ~34 slices x 2048 (~3 GB) in chunks (never held in RAM), then trains the `lstm` head for a fixed
number of steps through the real SeriesDataset -> DataLoader -> collate path, reading one batch of series at a time
from the memmap. The result is one JSON line (stdout); progress goes to stderr.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader
from lib.progress import progress_bar

from lib.tasks import get_task
from lib.models.seq_heads import create_head
from lib.sequence.features import SeriesDataset, collate_series, feature_dim, masked_weighted_bce, seed_worker

CHUNK_ROWS = 8192


def _labels() -> tuple:
    """The benchmark reproduces the ICH sequence stage at full scale: its label names."""
    return get_task("ich").labels


def add_sequence_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the `sequence` sub-command (defaults: full RSNA stage-2 train scale) to an argparse subparsers object."""
    p = subparsers.add_parser("sequence", help="sequence-stage throughput and memory at full scale (synthetic)")
    p.add_argument("--series", type=int, default=21744, help="number of series (stage-2 train: 21,744)")
    p.add_argument("--slices-mean", type=float, default=34.0, help="mean slices per series (clipped to 20..60)")
    p.add_argument("--dim", type=int, default=2048, help="embedding size D (float16)")
    p.add_argument("--steps", type=int, default=50, help="training steps (batches)")
    p.add_argument("--epochs", type=float, default=0.0, help="train this many passes over all series instead of "
                   "--steps (a full fold trains on (K-1)/K of them, so this over-counts one fold's work)")
    p.add_argument("--bs", type=int, default=8, help="series per batch")
    p.add_argument("--hidden", type=int, default=256, help="LSTM hidden size per direction")
    p.add_argument("--num-workers", type=int, default=0, help="DataLoader workers")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (0: torch default; 1 is the default "
                   "because 2 threads on a busy 2-core box ran ~7x slower)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--precision", default="no", choices=["bf16", "no"],
                   help="bf16 autocast on CUDA (SeqConfig.mixed_precision; default no, as the stage); CPU: float32")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", default=None, help="folder for the synthetic files; reused when it matches "
                                                   "(default: a temp dir, removed afterwards)")
    p.set_defaults(func=run_sequence_bench)
    return p


def series_lengths(n_series: int, mean: float, rng: np.random.Generator, lo: int = 20, hi: int = 60) -> np.ndarray:
    """Slices per series: lo + Poisson(mean - lo), clipped to [lo, hi] (RSNA: min 20, median 34, max 60)."""
    return np.clip(lo + rng.poisson(max(mean - lo, 0.0), size=n_series), lo, hi).astype(np.int64)


def synthetic_index(lengths: np.ndarray) -> pd.DataFrame:
    """An ordered header index (image_id, series_uid, slice_idx, rel_pos, spacings in mm) for the given lengths."""
    n = int(lengths.sum())
    series = np.repeat(np.arange(len(lengths)), lengths)
    starts = np.repeat(np.cumsum(lengths) - lengths, lengths)
    t = np.arange(n) - starts
    n_slices = np.repeat(lengths, lengths)
    return pd.DataFrame({
        "image_id": pd.Series(np.char.mod("ID_%09x", np.arange(n))),
        "series_uid": pd.Series(np.char.mod("SE_%06d", series)),
        "slice_idx": t, "n_slices": n_slices, "rel_pos": (t / np.maximum(n_slices - 1, 1)).astype(np.float32),
        "spacing_prev": np.where(t == 0, 0.0, 5.0).astype(np.float32),
        "spacing_next": np.where(t == n_slices - 1, 0.0, 5.0).astype(np.float32),
    })


def write_embeddings(path: Path, n_rows: int, dim: int, rng: np.random.Generator) -> None:
    """Write a float16 (n_rows, dim) .npy chunk by chunk with plain file writes (no mapping, bounded RAM)."""
    pool = rng.standard_normal((CHUNK_ROWS, dim), dtype=np.float32).astype(np.float16)
    mm = np.lib.format.open_memmap(path, mode="w+", dtype=np.float16, shape=(n_rows, dim))  # header + sparse file
    header = mm.offset
    del mm
    with open(path, "r+b") as fh:
        fh.seek(header)
        for start in progress_bar(range(0, n_rows, CHUNK_ROWS), desc="write embeddings", file=sys.stderr):
            rows = min(CHUNK_ROWS, n_rows - start)
            fh.write(pool[rng.integers(0, CHUNK_ROWS, size=rows)].tobytes())


def prepare(workdir: Path, args: argparse.Namespace) -> Dict[str, Any]:
    """Create (or reuse when the parameters match) emb.npy, logits.npy and index.parquet in workdir."""
    meta = {"series": args.series, "slices_mean": args.slices_mean, "dim": args.dim, "seed": args.seed}
    meta_path = workdir / "bench_meta.json"
    if meta_path.is_file() and json.loads(meta_path.read_text()) == meta:
        return {"reused": True, "write_s": 0.0}
    t0, rng = time.perf_counter(), np.random.default_rng(args.seed)
    lengths = series_lengths(args.series, args.slices_mean, rng)
    index = synthetic_index(lengths)
    n = len(index)
    write_embeddings(workdir / "emb.npy", n, args.dim, rng)
    np.save(workdir / "logits.npy", rng.normal(-3, 2, size=(n, len(_labels()))).astype(np.float16))
    block = rng.permutation(len(lengths))  # export order: whole series in a shuffled order
    rows = np.empty(n, np.int64)
    rows[np.concatenate([np.arange(s, s + m) for s, m in zip((np.cumsum(lengths) - lengths)[block],
                                                             lengths[block])])] = np.arange(n)
    index.assign(row=rows).to_parquet(workdir / "index.parquet")
    meta_path.write_text(json.dumps(meta))
    return {"reused": False, "write_s": round(time.perf_counter() - t0, 1)}


def train_steps(ds: SeriesDataset, args: argparse.Namespace, device: torch.device) -> Dict[str, float]:
    """Train the lstm head for `args.steps` batches; returns timings (data wait vs compute)."""
    torch.manual_seed(args.seed)
    amp = device.type == "cuda" and args.precision == "bf16"
    n = len(_labels())
    model = create_head("lstm", feature_dim(args.dim, n), n, hidden=args.hidden).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    dl = DataLoader(ds, batch_size=args.bs, shuffle=True, collate_fn=collate_series, num_workers=args.num_workers,
                    worker_init_fn=seed_worker, generator=torch.Generator().manual_seed(args.seed))
    t_data = t_comp = 0.0
    done, slices, first = 0, 0, 0.0
    t_prev = time.perf_counter()
    steps = int(np.ceil(args.epochs * len(ds) / args.bs)) if args.epochs else args.steps
    bar = progress_bar(total=steps, desc="train lstm", file=sys.stderr)
    for batch in _cycle(dl):
        t1 = time.perf_counter()
        t_data += t1 - t_prev
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
            out = model(batch["x"].to(device, non_blocking=True), batch["mask"].to(device, non_blocking=True))
        loss = masked_weighted_bce(out, batch["y"].to(device), batch["mask"].to(device), get_task("ich").weights)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        t_prev = time.perf_counter()
        t_comp += t_prev - t1
        first = first or t_data + t_comp
        done, slices = done + 1, slices + int(batch["lengths"].sum())
        bar.update(1)
        if done >= steps:
            break
    bar.close()
    total = t_data + t_comp
    return {"train_s": round(total, 2), "first_step_s": round(first, 2), "data_s": round(t_data, 2),
            "compute_s": round(t_comp, 2), "series_per_s": round(done * args.bs / total, 2),
            "slices_per_s": round(slices / total, 1), "steps": done}


def _cycle(dl: DataLoader):
    """Batches of `dl`, epoch after epoch (a new shuffle each pass)."""
    while True:
        yield from dl


def run_sequence_bench(args: argparse.Namespace) -> Dict[str, Any]:
    """Run the benchmark described in the module docstring; returns the JSON-able result (the caller prints it)."""
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    temp = args.workdir is None
    workdir = Path(tempfile.mkdtemp(prefix="bench_seq_")) if temp else Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        t0 = time.perf_counter()
        prep = prepare(workdir, args)
        t1 = time.perf_counter()
        emb = np.load(workdir / "emb.npy", mmap_mode="r")
        logits = np.load(workdir / "logits.npy", mmap_mode="r")
        index = pd.read_parquet(workdir / "index.parquet")
        rng = np.random.default_rng(args.seed + 1)
        labels = pd.DataFrame((rng.random((len(index), 6)) < 0.05).astype(np.uint8), index=index["image_id"],
                              columns=list(_labels()))
        rows = pd.Series(index["row"].to_numpy(), index=index["image_id"].to_numpy())
        ds = SeriesDataset(index, emb, logits, rows, labels, crop=(24, 48), reverse_p=0.5, seed=args.seed)
        t2 = time.perf_counter()
        timing = train_steps(ds, args, device)
        result = {"series": len(ds), "slices": int(len(index)), "dim": int(emb.shape[1]),
                  "bytes_on_disk": int((workdir / "emb.npy").stat().st_size), "steps": timing["steps"],
                  "epochs": round(timing.pop("steps") * args.bs / len(ds), 2),
                  "bs": args.bs, "hidden": args.hidden, "series_per_s": timing.pop("series_per_s"),
                  "peak_rss_gb": round(peak_rss_gb(), 3),
                  "peak_rss_workers_gb": round(peak_rss_gb(True), 3) if args.num_workers else 0.0,
                  "device": str(device),
                  "precision": "bf16" if device.type == "cuda" and args.precision == "bf16" else "fp32",
                  "threads": torch.get_num_threads(), "num_workers": args.num_workers, **prep,
                  "setup_s": round(t2 - t1, 1), **timing, "wall_s": round(time.perf_counter() - t0, 1),
                  "load_avg_1m": round(os.getloadavg()[0], 2), "cpus": os.cpu_count()}
        del ds, emb, logits
        return result
    finally:
        if temp:
            shutil.rmtree(workdir, ignore_errors=True)


def peak_rss_gb(children: bool = False) -> float:
    """Peak resident set size (GB) of this process, incl. touched memmap pages; or of its largest finished child
    (DataLoader workers)."""
    who = resource.RUSAGE_CHILDREN if children else resource.RUSAGE_SELF
    return resource.getrusage(who).ru_maxrss / 1024 ** 2


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m lib.bench_sequence")
    sub = parser.add_subparsers(dest="command", required=True)
    add_sequence_parser(sub)
    args = parser.parse_args(["sequence", *(argv if argv is not None else sys.argv[1:])])
    print(json.dumps(run_sequence_bench(args)), flush=True)


if __name__ == "__main__":
    main()
