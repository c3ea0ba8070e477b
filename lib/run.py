"""Papermill runner: `python -m lib.run params/<run>.yaml --data DIR --out DIR`.

Runs the pipeline's notebooks in order. The YAML holds only overrides of the notebooks' defaults:

    common:            # given to every stage whose parameters cell declares the key
      seed: 0
    stages:            # run in this order (must follow the pipeline order)
      eda: {}
      train_cnn: {arch: resnet18, fold: [0, 1, 2]}   # a list for `fold` runs the notebook once per fold

Unknown keys are errors that list the valid keys. The runner owns paths: every stage gets `data_dir` and `run_dir`.
Executed notebooks go to OUT/notebooks/, and OUT/manifest.json records the resolved parameters, git commit,
package versions and timings; it is rewritten after every stage, so an interrupted run keeps its record.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence

import yaml

from .paths import atomic_write_text
from .report_html import write_html_report

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = REPO / "notebooks"

#: The pipeline, in order: stage name -> notebook file.
PIPELINE: Dict[str, str] = {
    "eda": "00_eda.ipynb",
    "windowing": "01_windowing.ipynb",
    "train_cnn": "02_train_cnn.ipynb",
    "embed": "03_embed.ipynb",
    "sequence": "04_sequence.ipynb",
    "ensemble": "05_ensemble.ipynb",
    "report": "06_report.ipynb",
    "inference": "07_inference.ipynb",
}
REPORT_STAGE = "report"  # its executed notebook becomes OUT/report.html
RUNNER_KEYS = ("data_dir", "run_dir")  # injected by the runner, never set in YAML
EXPANDABLE = ("fold",)  # a list value runs the stage once per item
TOP_KEYS = ("common", "stages", "description")
PACKAGES = ("torch", "torchvision", "timm", "fastai", "pydicom", "albumentations", "numpy", "pandas", "scikit-learn",
            "papermill", "opencv-python-headless", "pylibjpeg")


class ParamsError(ValueError):
    """A params YAML that does not fit the pipeline or the notebooks' parameters."""


@dataclass
class Job:
    """One notebook execution: a stage, possibly one fold of it."""

    stage: str
    notebook: Path
    params: Dict[str, Any]
    tag: str  # output notebook stem, e.g. 02_train_cnn_fold1
    status: str = "pending"
    seconds: Optional[float] = None
    error: Optional[str] = None
    extra: Dict[str, Any] = field(default_factory=dict)


def notebook_parameters(path: Path) -> Dict[str, Any]:
    """Parameter names and defaults declared in a notebook's `parameters` cell (via papermill)."""
    import papermill as pm

    if not path.is_file():
        raise ParamsError(f"notebook {path} does not exist")
    return {name: info["default"] for name, info in pm.inspect_notebook(str(path)).items()}


def load_params(path: Path) -> Dict[str, Any]:
    """Read and shape-check a params YAML."""
    if not path.is_file():
        raise ParamsError(f"params file {path} does not exist")
    raw = yaml.safe_load(path.read_text()) or {}
    if not isinstance(raw, dict):
        raise ParamsError(f"{path}: expected a mapping with keys {list(TOP_KEYS)}")
    unknown = sorted(set(raw) - set(TOP_KEYS))
    if unknown:
        raise ParamsError(f"{path}: unknown top-level keys {unknown}; valid keys: {list(TOP_KEYS)}")
    stages = raw.get("stages") or {}
    if not isinstance(stages, dict) or not stages:
        raise ParamsError(f"{path}: `stages` must map stage names to parameter overrides; stages: {list(PIPELINE)}")
    bad = [s for s in stages if s not in PIPELINE]
    if bad:
        raise ParamsError(f"{path}: unknown stages {bad}; valid stages: {list(PIPELINE)}")
    order = [list(PIPELINE).index(s) for s in stages]
    if order != sorted(order):
        raise ParamsError(f"{path}: stages must follow the pipeline order {list(PIPELINE)}")
    for name, over in stages.items():
        if over is not None and not isinstance(over, dict):
            raise ParamsError(f"{path}: stage {name!r} must map parameter names to values, got {over!r}")
    return {"common": raw.get("common") or {}, "stages": {k: v or {} for k, v in stages.items()}}


def plan(params_path: Path, data_dir: Path, run_dir: Path, only: Optional[Sequence[str]] = None) -> List[Job]:
    """Resolve a params file into the ordered list of notebook executions, validating every key."""
    cfg = load_params(params_path)
    declared: Dict[str, Dict[str, Any]] = {s: notebook_parameters(NOTEBOOKS / PIPELINE[s]) for s in cfg["stages"]}
    common = cfg["common"]
    unused = [k for k in common if not any(k in d for d in declared.values())]
    if unused:
        valid = sorted({k for d in declared.values() for k in d} - set(RUNNER_KEYS))
        raise ParamsError(f"{params_path}: `common` keys {unused} are parameters of no listed stage; "
                          f"valid keys: {valid}")
    jobs: List[Job] = []
    for stage, over in cfg["stages"].items():
        if only and stage not in only:
            continue
        valid = declared[stage]
        bad = [k for k in over if k not in valid or k in RUNNER_KEYS]
        if bad:
            raise ParamsError(f"{params_path}: stage {stage!r} has unknown keys {bad}; valid keys: "
                              f"{sorted(k for k in valid if k not in RUNNER_KEYS)}")
        base = {k: v for k, v in common.items() if k in valid}
        base.update(over)
        base.update(data_dir=str(data_dir), run_dir=str(run_dir))
        jobs.extend(_expand(stage, base))
    return jobs


def _expand(stage: str, params: Dict[str, Any]) -> List[Job]:
    nb = NOTEBOOKS / PIPELINE[stage]
    for key in EXPANDABLE:
        if isinstance(params.get(key), list):
            return [Job(stage, nb, {**params, key: v}, f"{nb.stem}_{key}{v}") for v in params[key]]
    return [Job(stage, nb, params, nb.stem)]


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


def _write_manifest(run_dir: Path, header: Dict[str, Any], jobs: List[Job]) -> None:
    """Rewrite manifest.json: this invocation's jobs, plus the entries of earlier invocations for other notebooks
    (so `--stages` runs add to the record instead of replacing it), in pipeline order."""
    current = [{"stage": j.stage, "notebook": f"notebooks/{j.tag}.ipynb", "params": j.params, "status": j.status,
                "seconds": j.seconds, "error": j.error, "git_commit": header.get("git_commit")} for j in jobs]
    names = {e["notebook"] for e in current}
    path = run_dir / "manifest.json"
    earlier = json.loads(path.read_text()).get("stages", []) if path.exists() else []
    order = list(PIPELINE)
    stages = sorted([e for e in earlier if e["notebook"] not in names] + current,
                    key=lambda e: (order.index(e["stage"]) if e["stage"] in order else len(order), e["notebook"]))
    atomic_write_text(path, json.dumps(dict(header, stages=stages), indent=2, default=str))


def _previous_ok(run_dir: Path) -> Dict[str, Dict[str, Any]]:
    path = run_dir / "manifest.json"
    if not path.exists():
        return {}
    return {s["notebook"]: s["params"] for s in json.loads(path.read_text()).get("stages", []) if s["status"] == "ok"}


def _kernel_transport() -> Dict[str, Any]:
    """On POSIX, talk to each stage's kernel over unix sockets in the temp dir instead of localhost TCP: nothing
    listens on a port, and ipykernel stops printing its "running over TCP without encryption" warning per stage."""
    if os.name != "posix":
        return {}
    import tempfile
    import uuid

    from jupyter_client.manager import AsyncKernelManager
    from traitlets import CaselessStrEnum, default

    class IPCKernelManager(AsyncKernelManager):
        transport = CaselessStrEnum(["tcp", "ipc"], default_value="ipc", config=True)

        @default("ip")
        def _ip_default(self) -> str:  # socket files <ip>-<port>, removed again at kernel shutdown
            return os.path.join(tempfile.gettempdir(), f"rsna-kernel-{uuid.uuid4().hex[:12]}")

    return {"kernel_manager_class": IPCKernelManager}


#: What every notebook kernel the runner starts gets in its environment, whatever the parent process has: figures
#: drawn inline into the executed notebook (the Makefile exports MPLBACKEND=Agg for plain processes, which a kernel
#: would otherwise inherit and then keep no image) and text progress bars (widgets are lost in executed notebooks).
KERNEL_ENV = {"MPLBACKEND": "module://matplotlib_inline.backend_inline", "LIB_PROGRESS": "text"}


@contextmanager
def kernel_env() -> Iterator[None]:
    """Set KERNEL_ENV in os.environ (which kernels inherit) for the duration, then restore it."""
    before = {k: os.environ.get(k) for k in KERNEL_ENV}
    os.environ.update(KERNEL_ENV)
    try:
        yield
    finally:
        for k, v in before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def execute(jobs: List[Job], run_dir: Path, header: Dict[str, Any], kernel: str = "python3",
            verbose: bool = False, resume: bool = False) -> int:
    """Run the jobs in order; stop at the first failure. Returns a process exit code."""
    done = _previous_ok(run_dir) if resume else {}
    nb_dir = run_dir / "notebooks"
    nb_dir.mkdir(parents=True, exist_ok=True)
    t_all = time.time()
    transport = _kernel_transport()
    with kernel_env():
        code = _execute_jobs(jobs, run_dir, header, done, kernel, verbose, transport)
    if code:
        return code
    for job in jobs:
        report_nb = nb_dir / f"{job.tag}.ipynb"
        if job.stage == REPORT_STAGE and report_nb.exists():
            print(f"report: {write_html_report(report_nb, run_dir / 'report.html')}", flush=True)
    header["finished"] = _now()
    header["seconds"] = round(time.time() - t_all, 2)
    _write_manifest(run_dir, header, jobs)
    return 0


def _execute_jobs(jobs: List[Job], run_dir: Path, header: Dict[str, Any], done: Dict[str, Any], kernel: str,
                  verbose: bool, transport: Dict[str, Any]) -> int:
    import papermill as pm

    nb_dir = run_dir / "notebooks"
    for i, job in enumerate(jobs, 1):
        out_nb = nb_dir / f"{job.tag}.ipynb"
        if done.get(f"notebooks/{job.tag}.ipynb") == job.params:
            job.status = "skipped (done)"
            print(f"[{i}/{len(jobs)}] {job.tag}: already done with the same parameters, skipped", flush=True)
            continue
        print(f"[{i}/{len(jobs)}] {job.tag} ...", flush=True)
        job.status = "running"
        _write_manifest(run_dir, header, jobs)
        t0 = time.time()
        try:
            pm.execute_notebook(str(job.notebook), str(out_nb), parameters=job.params, kernel_name=kernel,
                                cwd=str(REPO), progress_bar=False, log_output=verbose,
                                request_save_on_cell_execute=True, **transport)
        except Exception as exc:  # papermill wraps the notebook's own exception
            job.seconds, job.status = round(time.time() - t0, 2), "failed"
            job.error = f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1] if str(exc).strip() else ''}"
            header["finished"] = _now()
            _write_manifest(run_dir, header, jobs)
            print(f"stage {job.stage!r} failed in notebook {job.notebook.name} (executed copy: {out_nb}):\n"
                  f"  {job.error}", file=sys.stderr, flush=True)
            return 1
        job.seconds, job.status = round(time.time() - t0, 2), "ok"
        _write_manifest(run_dir, header, jobs)
        print(f"[{i}/{len(jobs)}] {job.tag} done in {job.seconds:.1f} s", flush=True)
    return 0


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m lib.run", description=__doc__.split("\n\n")[0])
    ap.add_argument("params", type=Path, help="params YAML; its file name is the run name")
    ap.add_argument("--data", required=True, type=Path, help="competition data folder in the Kaggle layout")
    ap.add_argument("--out", type=Path, default=None, help="run directory (default: outputs/<run name>)")
    ap.add_argument("--stages", default=None, help="comma-separated subset of stages to run")
    ap.add_argument("--kernel", default="python3", help="Jupyter kernel name")
    ap.add_argument("--resume", action="store_true", help="skip stages that already finished with the same params")
    ap.add_argument("--verbose", action="store_true", help="stream the notebooks' output")
    args = ap.parse_args(argv)
    run_dir = (args.out or REPO / "outputs" / args.params.stem).expanduser().resolve()
    data_dir = args.data.expanduser().resolve()
    if not data_dir.is_dir():
        print(f"error: data folder {data_dir} does not exist", file=sys.stderr)
        return 2
    only = [s.strip() for s in args.stages.split(",")] if args.stages else None
    try:
        jobs = plan(args.params, data_dir, run_dir, only)
    except ParamsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    run_dir.mkdir(parents=True, exist_ok=True)
    header = {"run": args.params.stem, "params_file": str(args.params.resolve()),
              "params_yaml": args.params.read_text(), "data_dir": str(data_dir), "run_dir": str(run_dir),
              "git_commit": git_commit(), "python": sys.version.split()[0], "platform": platform.platform(),
              "packages": package_versions(), "started": _now()}
    print(f"run {args.params.stem!r}: {len(jobs)} notebook(s) -> {run_dir}", flush=True)
    return execute(jobs, run_dir, header, kernel=args.kernel, verbose=args.verbose, resume=args.resume)


if __name__ == "__main__":
    sys.exit(main())
