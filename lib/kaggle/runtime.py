"""What every task's test-only inference (the Kaggle kernels) shares: where it writes, where the submission goes,
and whether the installed packages meet requirements.txt. Task-agnostic: packages and paths come as arguments."""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional, Sequence

import pandas as pd

from lib.paths import PathLike, RunPaths, kaggle_working_dir, on_kaggle

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
