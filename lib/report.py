"""The OOF table (CNN vs sequence vs ensemble, overall and per class) and per-class curves for the report.

`python -m lib.report RUN_DIR` prints the OOF table of a finished run from its metrics.json.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Dict, Mapping, Optional, Sequence

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from sklearn.calibration import calibration_curve
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score, roc_curve

from .labels import SUBTYPES

STAGES = (("prior", "oof_prior"), ("cnn", "oof_cnn"), ("sequence", "oof_seq"), ("ensemble", "oof_ensemble"))


def oof_table(metrics: Mapping[str, float]) -> pd.DataFrame:
    """Rows = stages present in metrics.json, columns = weighted loss + per-class losses, plus the gain vs CNN."""
    rows: Dict[str, Dict[str, float]] = {}
    for name, prefix in STAGES:
        if f"{prefix}_logloss" in metrics:
            rows[name] = {"weighted": metrics[f"{prefix}_logloss"],
                          **{s: metrics.get(f"{prefix}_logloss_{s}", np.nan) for s in SUBTYPES}}
    table = pd.DataFrame(rows).T
    if "cnn" in table.index:
        table["vs_cnn"] = table["weighted"] / table.loc["cnn", "weighted"] - 1
    return table


def format_table(table: pd.DataFrame) -> str:
    out = table.copy()
    text = out.drop(columns=[c for c in ("vs_cnn",) if c in out]).round(4).astype(str)
    if "vs_cnn" in out:
        text["vs_cnn"] = [f"{v:+.1%}" for v in out["vs_cnn"]]
    return text.to_string()


def curves(y: pd.DataFrame, preds: Mapping[str, pd.DataFrame]) -> plt.Figure:
    """Per-class ROC (top row) and precision-recall (bottom row) curves of each prediction table."""
    fig, axes = plt.subplots(2, len(SUBTYPES), figsize=(3 * len(SUBTYPES), 6), squeeze=False)
    for j, s in enumerate(SUBTYPES):
        yt = y[s].to_numpy()
        for name, p in preds.items():
            ps = p.reindex(y.index)[s].to_numpy()
            if yt.min() == yt.max():
                continue
            fpr, tpr, _ = roc_curve(yt, ps)
            prec, rec, _ = precision_recall_curve(yt, ps)
            axes[0, j].plot(fpr, tpr, label=f"{name} AUC {roc_auc_score(yt, ps):.3f}")
            axes[1, j].plot(rec, prec, label=f"{name} AP {average_precision_score(yt, ps):.3f}")
        axes[0, j].set_title(s, fontsize=9)
        axes[0, j].set_xlabel("FPR", fontsize=8)
        axes[1, j].set_xlabel("recall", fontsize=8)
        for ax in axes[:, j]:
            ax.legend(fontsize=6)
    axes[0, 0].set_ylabel("TPR")
    axes[1, 0].set_ylabel("precision")
    fig.tight_layout()
    return fig


def calibration(y: pd.DataFrame, preds: Mapping[str, pd.DataFrame], n_bins: int = 10,
                labels: Sequence[str] = ("any",) + SUBTYPES[:-1]) -> plt.Figure:
    """Reliability diagrams (quantile bins) per label and prediction table."""
    fig, axes = plt.subplots(1, len(labels), figsize=(3 * len(labels), 3), squeeze=False)
    for ax, s in zip(axes[0], labels):
        yt = y[s].to_numpy()
        ax.plot([0, 1], [0, 1], "k:", lw=1)
        for name, p in preds.items():
            if yt.min() == yt.max():
                continue
            frac, mean = calibration_curve(yt, p.reindex(y.index)[s].to_numpy(), n_bins=n_bins, strategy="quantile")
            ax.plot(mean, frac, marker=".", label=name)
        ax.set_title(s, fontsize=9)
        ax.set_xlabel("predicted", fontsize=8)
        ax.legend(fontsize=6)
    axes[0, 0].set_ylabel("observed")
    fig.tight_layout()
    return fig


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m lib.report", description="Print the OOF table of a run.")
    ap.add_argument("run_dir", type=Path)
    args = ap.parse_args(argv)
    path = args.run_dir / "metrics.json"
    if not path.exists():
        print(f"error: {path} does not exist (has the run finished?)", file=sys.stderr)
        return 2
    table = oof_table(json.loads(path.read_text()))
    print(f"OOF weighted log loss ({args.run_dir}):")
    print(format_table(table))
    return 0


if __name__ == "__main__":
    sys.exit(main())
