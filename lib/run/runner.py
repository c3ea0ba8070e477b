"""Papermill runner: `python -m lib.run params/<task>/<run>.yaml --data DIR --out DIR`.

Runs the task's notebooks in order (`lib.run.params` reads and checks the YAML: task, stages, every value typed
against the notebooks' declarations, all before anything runs). The runner owns paths: every stage gets `data_dir`
and `run_dir`. Executed notebooks go to OUT/notebooks/, OUT/manifest.json records the resolved parameters, git
commit, package versions and timings (rewritten after every stage), and the report stage becomes OUT/report.html.
"""
from __future__ import annotations

import argparse
import platform
import sys
from pathlib import Path
from typing import Optional, Sequence

from lib.run.execute import KERNEL_ENV, REPORT_STAGE, execute, kernel_env  # noqa: F401  (re-exported)
from lib.run.manifest import git_commit, now, package_versions
from lib.run.params import Job, ParamsError, load_params, notebook_parameters, plan  # noqa: F401  (re-exported)

REPO = Path(__file__).resolve().parents[2]


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
        cfg = load_params(args.params)
        jobs = plan(args.params, data_dir, run_dir, only)
    except ParamsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    run_dir.mkdir(parents=True, exist_ok=True)
    header = {"run": args.params.stem, "task": cfg.task.name, "params_file": str(args.params.resolve()),
              "params_yaml": args.params.read_text(), "data_dir": str(data_dir), "run_dir": str(run_dir),
              "git_commit": git_commit(), "python": sys.version.split()[0], "platform": platform.platform(),
              "packages": package_versions(), "started": now()}
    print(f"run {args.params.stem!r} (task {cfg.task.name}): {len(jobs)} notebook(s) -> {run_dir}", flush=True)
    return execute(jobs, run_dir, header, list(cfg.task.stages), kernel=args.kernel, verbose=args.verbose,
                   resume=args.resume)


if __name__ == "__main__":
    sys.exit(main())
