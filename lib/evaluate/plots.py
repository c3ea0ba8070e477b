"""Plots for the notebooks: each function takes data and returns a matplotlib Figure; `save` writes one as PNG.

No backend is chosen here: a notebook kernel draws inline (the runner pins matplotlib_inline for its kernels, see
`lib.run.kernel_env`), a plain process uses MPLBACKEND or matplotlib's headless default.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Dict, Mapping, Optional, Sequence, Union

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from lib.paths import atomic_write

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def save(fig: plt.Figure, folder: Union[str, Path], name: str, dpi: int = 110) -> Path:
    """Write `fig` as `folder/<name>.png` (atomic) and return the path; the figure stays open for display.

    `name` says what the figure shows (e.g. `learning_curves_fold0`): letters, digits, `_`, `-` and `.` only.
    """
    if not _NAME.match(name) or ".." in name:
        raise ValueError(f"figure name {name!r}: use letters, digits, '_', '-' and '.' (it becomes a file name)")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.png"
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=dpi, bbox_inches="tight"))
    return path


def prevalence(labels: pd.DataFrame) -> plt.Figure:
    """Bar chart of the per-image positive rate of each label (wide 0/1 table, one column per label)."""
    rate = labels.mean()
    fig, ax = plt.subplots(figsize=(7, 3))
    ax.bar(rate.index, rate.values, color="tab:red")
    for i, v in enumerate(rate.values):
        ax.text(i, v, f"{v:.1%}", ha="center", va="bottom", fontsize=8)
    ax.set_ylabel("share of images")
    ax.set_title(f"label prevalence ({len(labels):,} images)")
    ax.tick_params(axis="x", rotation=30)
    fig.tight_layout()
    return fig


def cooccurrence(labels: pd.DataFrame, exclude: Sequence[str] = ()) -> plt.Figure:
    """Heatmap of P(column | row) between the label columns (less `exclude`, e.g. a summary label)."""
    sub = [s for s in labels.columns if s not in exclude]
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


def learning_curves(log: pd.DataFrame, title: str = "", best_epoch: Optional[int] = None,
                    per_class_prefix: str = "logloss_") -> plt.Figure:
    """fastai CSVLogger table -> losses and metric per epoch (left) and the per-class validation losses (right,
    columns starting with `per_class_prefix`, when there are any); `best_epoch` is marked."""
    epochs = pd.to_numeric(log["epoch"], errors="coerce") if "epoch" in log else pd.Series(np.arange(len(log)))
    per_class = [c for c in log.columns if c.startswith(per_class_prefix)]
    main = [c for c in log.columns if c not in ("epoch", "time") and c not in per_class]
    fig, axes = plt.subplots(1, 2 if per_class else 1, figsize=(11 if per_class else 6, 3.2), squeeze=False)
    for ax, cols in zip(axes[0], (main, per_class)):
        for col in cols:
            vals = pd.to_numeric(log[col], errors="coerce")
            if vals.notna().any():
                ax.plot(epochs, vals, marker="o", label=col.removeprefix(per_class_prefix) if ax is not axes[0, 0]
                        else col)
        if best_epoch is not None:
            ax.axvline(best_epoch, color="grey", ls=":", lw=1, label=f"best epoch {best_epoch}")
        ax.set_xlabel("epoch")
        ax.legend(fontsize=7)
        if len(epochs):
            ax.set_xticks(sorted(set(int(e) for e in epochs.dropna())))
    axes[0, 0].set_ylabel("loss (weighted log loss)")
    axes[0, 0].set_title(title or "learning curves", fontsize=9)
    if per_class:
        axes[0, 1].set_ylabel("validation log loss")
        axes[0, 1].set_title("per class (validation)", fontsize=9)
    fig.tight_layout()
    return fig


def series_strip(images: Sequence[np.ndarray], probs: Union[None, np.ndarray, Mapping[str, np.ndarray]] = None,
                 truth: Optional[np.ndarray] = None, label: str = "any", size: float = 1.3,
                 title: str = "") -> plt.Figure:
    """One series as a strip of slices in order (index along the slice normal above each), with the label of
    `label` per slice as bars and each model's predicted probability per slice as a line (`probs`: one array,
    or {model name: array})."""
    n = len(images)
    if probs is not None and not isinstance(probs, Mapping):
        probs = {"predicted": probs}
    rows = 2 if probs or truth is not None else 1
    fig = plt.figure(figsize=(max(size * n, 4), size + (1.8 if rows == 2 else 0) + (0.3 if title else 0)))
    gs = fig.add_gridspec(rows, n, height_ratios=[size, 1.8][:rows])
    for i, img in enumerate(images):
        ax = fig.add_subplot(gs[0, i])
        ax.imshow(img, cmap="gray" if np.ndim(img) == 2 else None)
        ax.axis("off")
        ax.set_title(str(i), fontsize=6)
    if rows == 2:
        ax = fig.add_subplot(gs[1, :])
        x = np.arange(n)
        if truth is not None:
            ax.bar(x, np.asarray(truth, dtype=float), color="tab:red", alpha=0.3, width=0.9, label=f"label {label}")
        for (name, p), style in zip((probs or {}).items(), ("k.-", "b.--", "g.:", "m.-.")):
            ax.plot(x, np.asarray(p, dtype=float), style, label=f"{name} P({label})")
        ax.set_xlim(-0.5, n - 0.5)
        ax.set_ylim(0, 1.05)
        ax.set_ylabel("probability", fontsize=8)
        ax.legend(fontsize=7, loc="upper right")
        ax.set_xlabel("slice (ordered along the slice normal)", fontsize=8)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig
