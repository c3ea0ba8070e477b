"""The OOF table (CNN vs sequence vs ensemble, overall and per class) and per-class curves for the report.

`python -m lib.report RUN_DIR` prints the OOF table of a finished run from its metrics.json;
`python -m lib.report --compare RUN [RUN ...]` (directories or globs) prints the experiment table, one row per run:
task, backbone, image size, windows, sequence head and inputs, the OOF figures per stage, the test figure where the
hidden truth is known, wall time and git commit (`--markdown` for the README).
"""
from __future__ import annotations

import argparse
import importlib
import glob
import json
import sys
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from sklearn.calibration import calibration_curve
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score, roc_curve


STAGES = (("prior", "oof_prior"), ("cnn", "oof_cnn"), ("sequence", "oof_seq"), ("ensemble", "oof_ensemble"))


def oof_table(metrics: Mapping[str, float], labels: Sequence[str]) -> pd.DataFrame:
    """Rows = stages present in metrics.json, columns = weighted loss + the per-label losses of `labels`, plus the
    gain vs CNN."""
    rows: Dict[str, Dict[str, float]] = {}
    for name, prefix in STAGES:
        if f"{prefix}_logloss" in metrics:
            rows[name] = {"weighted": metrics[f"{prefix}_logloss"],
                          **{s: metrics.get(f"{prefix}_logloss_{s}", np.nan) for s in labels}}
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
    labels = list(y.columns)
    fig, axes = plt.subplots(2, len(labels), figsize=(3 * len(labels), 6), squeeze=False)
    for j, s in enumerate(labels):
        yt = y[s].to_numpy()
        for name, p in preds.items():
            ps = p.reindex(y.index)[s].to_numpy()
            if yt.min() == yt.max():
                continue
            fpr, tpr, _ = roc_curve(yt, ps)
            prec, rec, _ = precision_recall_curve(yt, ps)
            axes[0, j].plot(fpr, tpr, label=f"{name} AUC {roc_auc_score(yt, ps):.3f}")
            axes[1, j].plot(rec, prec, label=f"{name} AP {average_precision_score(yt, ps):.3f}")
        axes[0, j].plot([0, 1], [0, 1], "k:", lw=1)
        axes[0, j].set_title(f"{s} ({int(yt.sum())} positive of {len(yt)})", fontsize=9)
        axes[0, j].set_xlabel("false positive rate", fontsize=8)
        axes[1, j].set_xlabel("recall", fontsize=8)
        for ax in axes[:, j]:
            ax.legend(fontsize=6)
    axes[0, 0].set_ylabel("true positive rate")
    axes[1, 0].set_ylabel("precision")
    fig.suptitle("out-of-fold ROC (top) and precision-recall (bottom) per class", fontsize=10)
    fig.tight_layout()
    return fig


def calibration(y: pd.DataFrame, preds: Mapping[str, pd.DataFrame], n_bins: int = 10,
                labels: Optional[Sequence[str]] = None) -> plt.Figure:
    """Reliability diagrams (quantile bins) per label (`labels`, default every column of `y`) and prediction table."""
    labels = list(y.columns) if labels is None else list(labels)
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
    axes[0, 0].set_ylabel("observed positive rate")
    fig.suptitle(f"out-of-fold calibration ({n_bins} quantile bins)", fontsize=10)
    fig.tight_layout()
    return fig


#: Headline figures of a run, in the order `--compare` shows them (a column appears when any run has it).
HEADLINE = (("oof_prior", "oof_prior_logloss"), ("oof_cnn", "oof_cnn_logloss"), ("oof_seq", "oof_seq_logloss"),
            ("oof_ensemble", "oof_ensemble_logloss"), ("test", "test_submission_logloss"))
#: (column, stage, parameter) read from the run's resolved parameters.
SETTINGS = (("backbone", "train_cnn", "arch"), ("img_size", "train_cnn", "img_size"),
            ("windows", "windowing", "policy"), ("seq_head", "sequence", "head"), ("seq_inputs", "sequence", "inputs"))


def _stage_params(manifest: Mapping, stage: str) -> Dict[str, object]:
    """A stage's parameters as run: the notebook's declared defaults overlaid with the manifest's overrides."""
    from lib.run.params import stage_defaults
    from lib.tasks import get_task

    entries = [e for e in manifest.get("stages", []) if e.get("stage") == stage]
    if not entries:
        return {}
    task = get_task(manifest.get("task", "ich"))
    defaults = stage_defaults(task, stage) if stage in task.stages else {}
    return {**defaults, **entries[0].get("params", {})}


def to_markdown(table: pd.DataFrame) -> str:
    """A DataFrame as a GitHub Markdown table, index first (no tabulate dependency)."""
    cols = [table.index.name or ""] + [str(c) for c in table.columns]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for idx, row in table.iterrows():
        lines.append("| " + " | ".join([str(idx)] + [str(v) for v in row.tolist()]) + " |")
    return "\n".join(lines)


def run_summary(run_dir: Path) -> Dict[str, object]:
    """One row of the comparison table: run name, task, settings, headline figures, wall time, git commit."""
    run_dir = Path(run_dir)
    mpath, spath = run_dir / "manifest.json", run_dir / "metrics.json"
    if not mpath.exists():
        raise FileNotFoundError(f"{run_dir}: no manifest.json (not a run directory written by lib.run)")
    manifest = json.loads(mpath.read_text())
    metrics = json.loads(spath.read_text()) if spath.exists() else {}
    row: Dict[str, object] = {"run": manifest.get("run", run_dir.name), "dir": str(run_dir),
                              "task": manifest.get("task", "ich")}
    for col, stage, key in SETTINGS:
        row[col] = _stage_params(manifest, stage).get(key)
    for col, key in HEADLINE:
        row[col] = metrics.get(key)
    seconds = sum(float(e.get("seconds") or 0) for e in manifest.get("stages", []))
    row["wall_min"] = round(seconds / 60, 1) if seconds else None
    row["status"] = "ok" if manifest.get("stages") and all(
        str(e.get("status", "")).startswith(("ok", "skipped")) for e in manifest["stages"]) else "incomplete"
    commit = manifest.get("git_commit") or ""
    row["commit"] = commit[:9] + ("-dirty" if commit.endswith("-dirty") else "")
    return row


def compare_runs(run_dirs: Sequence[Path]) -> pd.DataFrame:
    """The experiment table: one row per run, columns that no run fills dropped."""
    rows = [run_summary(Path(d)) for d in run_dirs]
    table = pd.DataFrame(rows).set_index("run")
    return table.dropna(axis=1, how="all").drop(columns=["dir"])


def _expand_runs(patterns: Sequence[str]) -> List[Path]:
    out: List[Path] = []
    for pat in patterns:
        hits = sorted(Path(p) for p in glob.glob(pat)) if glob.has_magic(pat) else [Path(pat)]
        out.extend(h for h in hits if not glob.has_magic(pat) or (h / "manifest.json").exists())
    if not out:
        raise FileNotFoundError(f"no run directories match {list(patterns)}")
    return out


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m lib.report",
                                 description="Print the OOF table of a run, or compare runs (--compare).")
    ap.add_argument("run_dir", type=Path, nargs="?", help="a finished run directory")
    ap.add_argument("--compare", nargs="+", metavar="RUN", help="run directories or globs: one row per run")
    ap.add_argument("--markdown", action="store_true", help="--compare as a Markdown table (for the README)")
    args = ap.parse_args(argv)
    if args.compare:
        try:
            table = compare_runs(_expand_runs(args.compare))
        except FileNotFoundError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        shown = table.copy()
        for col in [c for c, _ in HEADLINE if c in shown]:
            shown[col] = shown[col].map(lambda v: "" if v is None or pd.isna(v) else f"{v:.4f}")
        shown = shown.fillna("")
        print(to_markdown(shown) if args.markdown else shown.to_string())
        return 0
    if args.run_dir is None:
        ap.error("give a run directory, or --compare RUN [RUN ...]")
    path = args.run_dir / "metrics.json"
    if not path.exists():
        print(f"error: {path} does not exist (has the run finished?)", file=sys.stderr)
        return 2
    from lib.tasks import get_task

    manifest = args.run_dir / "manifest.json"
    task = get_task(json.loads(manifest.read_text()).get("task", "ich") if manifest.exists() else "ich")
    if "summary" in task.extra:  # a task with its own table (module:function of the metrics dict)
        module, func = str(task.extra["summary"]).split(":")
        print(getattr(importlib.import_module(module), func)(json.loads(path.read_text())))
        return 0
    table = oof_table(json.loads(path.read_text()), task.labels)
    print(f"OOF weighted log loss ({args.run_dir}):")
    print(format_table(table))
    return 0


if __name__ == "__main__":
    sys.exit(main())
