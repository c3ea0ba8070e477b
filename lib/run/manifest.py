"""OUT/manifest.json: resolved parameters, git commit, package versions and timings of every stage of a run.

Rewritten atomically after every stage, so an interrupted run keeps its record; a `--stages` run adds to it.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import json
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from lib.paths import atomic_write_text
from lib.run.params import Job

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("torch", "torchvision", "timm", "fastai", "pydicom", "albumentations", "numpy", "pandas", "scikit-learn",
            "papermill", "opencv-python-headless", "pylibjpeg")
#: statuses that count as finished: a later --resume skips the job
DONE = ("ok", "skipped (done)")


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def git_commit() -> Optional[str]:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=REPO, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def package_versions() -> Dict[str, Optional[str]]:
    versions: Dict[str, Optional[str]] = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def write_manifest(run_dir: Path, header: Dict[str, Any], jobs: List[Job], order: Sequence[str]) -> None:
    """Rewrite manifest.json: this invocation's jobs, plus the entries of earlier invocations for other notebooks
    (so `--stages` runs add to the record instead of replacing it), in pipeline `order`."""
    current = [{"stage": j.stage, "notebook": f"notebooks/{j.tag}.ipynb", "params": j.params, "status": j.status,
                "seconds": j.seconds, "error": j.error, "git_commit": header.get("git_commit"),
                "source_sha1": notebook_sha1(j.notebook)} for j in jobs]
    names = {e["notebook"] for e in current}
    path = run_dir / "manifest.json"
    earlier = json.loads(path.read_text()).get("stages", []) if path.exists() else []
    order = list(order)
    stages = sorted([e for e in earlier if e["notebook"] not in names] + current,
                    key=lambda e: (order.index(e["stage"]) if e["stage"] in order else len(order), e["notebook"]))
    atomic_write_text(path, json.dumps(dict(header, stages=stages), indent=2, default=str))


def notebook_sha1(path: Path) -> Optional[str]:
    """sha1 of a source notebook's cells (sources only: outputs and metadata do not count); None if unreadable."""
    try:
        cells = json.loads(Path(path).read_text()).get("cells", [])
    except (OSError, ValueError):
        return None
    text = "\x00".join("".join(c.get("source", "")) for c in cells)
    return hashlib.sha1(text.encode()).hexdigest()


def previous_done(run_dir: Path) -> Dict[str, Dict[str, Any]]:
    """{executed notebook: {"params", "source_sha1"}} of the jobs a previous invocation finished (ran, or found
    already done)."""
    path = run_dir / "manifest.json"
    if not path.exists():
        return {}
    return {s["notebook"]: {"params": s["params"], "source_sha1": s.get("source_sha1")}
            for s in json.loads(path.read_text()).get("stages", []) if s["status"] in DONE}
