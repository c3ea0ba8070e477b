"""What every task's test-only inference (the Kaggle kernels) shares: where it writes, where the submission goes,
and whether the installed packages meet requirements.txt. Task-agnostic: packages and paths come as arguments."""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import pandas as pd

from lib.paths import PathLike, RunPaths, atomic_write_text, kaggle_working_dir, on_kaggle

REQUIREMENTS = Path(__file__).resolve().parents[2] / "requirements.txt"  # beside lib/: also in the code dataset


def resolve_run_dir(run_dir: str) -> Path:
    """The given run directory, else Kaggle's working directory inside a kernel."""
    if run_dir:
        return Path(run_dir).expanduser().resolve()
    if on_kaggle():
        return kaggle_working_dir()
    raise ValueError("run_dir is empty: the runner passes it; only a Kaggle kernel may leave it empty")


def output_paths(run_dir: PathLike) -> RunPaths:
    """Inference artefacts live in <run_dir>/inference/ (never over a training run's own files)."""
    return RunPaths.at(Path(run_dir) / "inference")


def submission_paths(rp: RunPaths) -> List[Path]:
    """Where the submission goes: <run_dir>/inference/submission.csv, plus /kaggle/working/ inside a kernel."""
    return [rp.submission] + ([kaggle_working_dir() / "submission.csv"] if on_kaggle() else [])


def requirements_report(packages: Sequence[str], requirements: Optional[PathLike] = None) -> pd.DataFrame:
    """Installed versions of `packages` against requirements.txt's pins: a package the Kaggle image lacks, or has
    in another range, belongs in the wheels dataset. Rows in requirements.txt order, index `package`."""
    from importlib import metadata

    from packaging.requirements import Requirement

    rows = []
    for line in Path(requirements or REQUIREMENTS).read_text().splitlines():
        text = line.split("#")[0].strip()
        req = Requirement(text) if text else None
        if req is None or req.name not in packages:
            continue
        try:
            have: Optional[str] = metadata.version(req.name)
        except metadata.PackageNotFoundError:
            have = None
        rows.append({"package": req.name, "required": str(req.specifier) or "any", "installed": have,
                     "ok": have is not None and req.specifier.contains(have, prereleases=True)})
    return pd.DataFrame(rows, columns=["package", "required", "installed", "ok"]).set_index("package")


def cleanup(rp: RunPaths, folders: Sequence[str]) -> None:
    """Delete the named folders of the inference directory (test caches: a kernel's working directory is its saved
    output)."""
    for folder in folders:
        shutil.rmtree(rp.root / folder, ignore_errors=True)


def write_summary(rp: RunPaths, bundle: Any, values: Dict[str, Any]) -> Dict[str, Any]:
    """inference/inference.json (+ its numbers in inference/metrics.json): `values` (timings, counts) and where the
    code and the weights (a `lib.kaggle.bundle.Bundle`: its source, run and commit) came from."""
    info = {"inference_bundle": bundle.source, "inference_code": str(Path(__file__).resolve().parents[1]),
            "inference_run": bundle.manifest.get("run"), "inference_weights_commit": bundle.manifest.get("git_commit"),
            **values}
    atomic_write_text(rp.root / "inference.json", json.dumps(info, indent=2, default=str))
    return rp.update_metrics({k: v for k, v in info.items() if isinstance(v, (int, float))})
