"""Plots for the notebooks: each function takes data and returns a matplotlib Figure (no file I/O here)."""
from __future__ import annotations

from typing import Dict, Optional, Sequence

import matplotlib

matplotlib.use(matplotlib.get_backend())  # honour MPLBACKEND (Agg headless)
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from .labels import SUBTYPES  # noqa: E402


def prevalence(labels: pd.DataFrame) -> plt.Figure:
    """Bar chart of the per-image positive rate of each label (wide uint8 table)."""
    rate = labels[list(SUBTYPES)].mean()
    fig, ax = plt.subplots(figsize=(7, 3))
    ax.bar(rate.index, rate.values, color="tab:red")
    for i, v in enumerate(rate.values):
        ax.text(i, v, f"{v:.1%}", ha="center", va="bottom", fontsize=8)
    ax.set_ylabel("share of images")
    ax.set_title(f"label prevalence ({len(labels):,} images)")
    ax.tick_params(axis="x", rotation=30)
    fig.tight_layout()
    return fig


def cooccurrence(labels: pd.DataFrame) -> plt.Figure:
    """Heatmap of P(column | row) between the 5 subtypes."""
    sub = [s for s in SUBTYPES if s != "any"]
    x = labels[sub].to_numpy(dtype=np.float64)
    counts = x.T @ x
    cond = counts / np.maximum(np.diag(counts)[:, None], 1)
    fig, ax = plt.subplots(figsize=(5, 4.5))
    im = ax.imshow(cond, cmap="viridis", vmin=0, vmax=1)
    ax.set_xticks(range(len(sub)), sub, rotation=45, ha="right")
    ax.set_yticks(range(len(sub)), sub)
    for i in range(len(sub)):
        for j in range(len(sub)):
            ax.text(j, i, f"{cond[i, j]:.2f}", ha="center", va="center", color="w", fontsize=7)
    ax.set_title("P(column | row)")
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    return fig


def histograms(data: Dict[str, np.ndarray], bins: int = 40, title: str = "", xlabel: str = "",
               log: bool = False) -> plt.Figure:
    """One row of histograms, one panel per named array."""
    fig, axes = plt.subplots(1, len(data), figsize=(3.2 * len(data), 2.8), squeeze=False)
    for ax, (name, values) in zip(axes[0], data.items()):
        values = np.asarray(values, dtype=np.float64)
        values = values[np.isfinite(values)]
        ax.hist(values, bins=bins, color="tab:blue", log=log)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel(xlabel)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def image_grid(images: Sequence[np.ndarray], titles: Optional[Sequence[str]] = None, ncols: int = 8,
               size: float = 1.8, cmap: str = "gray", vmin: Optional[float] = None,
               vmax: Optional[float] = None) -> plt.Figure:
    """Grid of images (uint8 RGB, or 2-D arrays shown with `cmap` in [vmin, vmax])."""
    n = max(len(images), 1)
    ncols = min(ncols, n)
    nrows = int(np.ceil(n / ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(size * ncols, size * nrows + 0.3), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for i, img in enumerate(images):
        ax = axes.ravel()[i]
        ax.imshow(img, cmap=cmap if np.ndim(img) == 2 else None, vmin=vmin, vmax=vmax)
        if titles is not None:
            ax.set_title(titles[i], fontsize=7)
    fig.tight_layout()
    return fig


def learning_curves(log: pd.DataFrame, title: str = "") -> plt.Figure:
    """fastai CSVLogger table -> train/valid loss (and metric columns) per epoch."""
    fig, ax = plt.subplots(figsize=(6, 3))
    for col in log.columns:
        if col in ("epoch", "time"):
            continue
        vals = pd.to_numeric(log[col], errors="coerce")
        if vals.notna().any():
            ax.plot(log["epoch"] if "epoch" in log else np.arange(len(log)), vals, marker="o", label=col)
    ax.set_xlabel("epoch")
    ax.set_title(title)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def series_strip(images: Sequence[np.ndarray], probs: Optional[np.ndarray] = None,
                 truth: Optional[np.ndarray] = None, label: str = "any", size: float = 1.3) -> plt.Figure:
    """One series as a strip of slices, with the predicted probability and the label of `label` per slice."""
    n = len(images)
    rows = 2 if probs is not None or truth is not None else 1
    fig = plt.figure(figsize=(max(size * n, 4), size + (1.6 if rows == 2 else 0)))
    gs = fig.add_gridspec(rows, n, height_ratios=[size, 1.6][:rows])
    for i, img in enumerate(images):
        ax = fig.add_subplot(gs[0, i])
        ax.imshow(img, cmap="gray" if np.ndim(img) == 2 else None)
        ax.axis("off")
        ax.set_title(str(i), fontsize=6)
    if rows == 2:
        ax = fig.add_subplot(gs[1, :])
        x = np.arange(n)
        if truth is not None:
            ax.bar(x, truth, color="tab:red", alpha=0.3, label=f"label {label}")
        if probs is not None:
            ax.plot(x, probs, "k.-", label=f"predicted {label}")
        ax.set_xlim(-0.5, n - 0.5)
        ax.set_ylim(0, 1.05)
        ax.legend(fontsize=7, loc="upper right")
        ax.set_xlabel("slice (ordered along the slice normal)")
    fig.tight_layout()
    return fig
