"""EDA helpers of the BraTS task: per-series header summary, slice counts, intensity histograms, series strips."""
from __future__ import annotations

from pathlib import Path
from typing import Dict, Optional, Sequence

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pydicom

from lib.io.mr_series import SEQUENCES, BadSeriesError, image_number, read_mr_series, series_files
from lib.progress import progress_bar


def series_summary(split_dir: Path, sequences: Sequence[str] = SEQUENCES, progress: bool = True) -> pd.DataFrame:
    """One row per series folder, from headers only: BraTS21ID, sequence, n_files, rows, cols, numbering
    ('numeric' when Image-N numeric order differs from alphabetical order), problem ('' when readable)."""
    rows = []
    patients = sorted(p for p in Path(split_dir).iterdir() if p.is_dir())
    for pdir in progress_bar(patients, desc="series headers", unit="patient", disable=not progress):
        for seq in sequences:
            row = {"BraTS21ID": pdir.name, "sequence": seq, "n_files": 0, "rows": np.nan, "cols": np.nan,
                   "numbering": "", "problem": ""}
            try:
                files = series_files(pdir / seq)
            except BadSeriesError as exc:
                rows.append({**row, "problem": exc.reason})
                continue
            ds = pydicom.dcmread(files[0], stop_before_pixels=True)
            alpha = sorted(f.name for f in files)
            row.update(n_files=len(files), rows=int(ds.Rows), cols=int(ds.Columns),
                       numbering="numeric != alphabetical" if alpha != [f.name for f in files] else "same",
                       max_number=max(image_number(f) for f in files))
            rows.append(row)
    return pd.DataFrame(rows)


def slice_count_figure(summary: pd.DataFrame) -> plt.Figure:
    """Histogram of slices per series, one colour per MRI type."""
    fig, ax = plt.subplots(figsize=(7, 3))
    for seq, g in summary[summary["n_files"] > 0].groupby("sequence"):
        ax.hist(g["n_files"], bins=20, alpha=0.5, label=seq)
    ax.set_xlabel("slices per series")
    ax.set_ylabel("series")
    ax.legend()
    fig.tight_layout()
    return fig


def read_patient_series(patient_dir: Path, sequences: Sequence[str] = SEQUENCES) -> Dict[str, np.ndarray]:
    """{sequence: (Z, H, W) float32 raw volume ordered along the normal} of the readable series of one patient."""
    out = {}
    for seq in sequences:
        try:
            out[seq] = read_mr_series(Path(patient_dir) / seq).volume
        except BadSeriesError:
            continue
    return out


def intensity_figure(volumes: Dict[str, np.ndarray]) -> plt.Figure:
    """Histograms of the non-zero (brain) raw intensities per MRI type: the scales differ per series."""
    fig, axes = plt.subplots(1, len(volumes), figsize=(3 * len(volumes), 2.6), squeeze=False)
    for ax, (seq, vol) in zip(axes[0], volumes.items()):
        fg = vol[vol != 0]
        ax.hist(fg, bins=60, color="tab:blue")
        ax.set_title(f"{seq} (n={fg.size})", fontsize=8)
        ax.set_yticks([])
    fig.tight_layout()
    return fig


def strip_figure(volume: np.ndarray, n: int = 10, masks: Optional[np.ndarray] = None,
                 title: str = "") -> plt.Figure:
    """`n` evenly spaced slices of a (Z, H, W) volume; masks (Z, K, H, W) bool/float overlaid as contours."""
    idx = np.linspace(0, len(volume) - 1, min(n, len(volume))).round().astype(int)
    fig, axes = plt.subplots(1, len(idx), figsize=(1.4 * len(idx), 1.6), squeeze=False)
    colours = ("yellow", "red", "cyan")
    for ax, i in zip(axes[0], idx):
        ax.imshow(volume[i], cmap="gray")
        if masks is not None:
            for k in range(masks.shape[1]):
                if masks[i, k].any():
                    ax.contour(masks[i, k] > 0.5, levels=[0.5], colors=colours[k % 3], linewidths=0.6)
        ax.set_title(str(i), fontsize=6)
        ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    return fig
