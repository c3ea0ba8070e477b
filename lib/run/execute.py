"""Executing a plan: each job's notebook through papermill, in order, stopping at the first failure.

Every kernel gets KERNEL_ENV (figures inline, text progress bars) whatever the parent's environment, talks over
unix sockets on POSIX, and dies with the runner: a SIGTERM/SIGINT/SIGHUP to the runner stops the stage's kernel
before the runner exits. After the report stage, its executed notebook becomes OUT/report.html.
"""
from __future__ import annotations

import os
import signal
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Dict, Iterator, List, Sequence

from lib.evaluate.html import write_html_report
from lib.run.manifest import notebook_sha1, now, previous_done, write_manifest
from lib.run.params import Job

REPO = Path(__file__).resolve().parents[2]  # kernels start here, so `import lib` finds this checkout
REPORT_STAGE = "report"  # its executed notebook becomes OUT/report.html
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


class RunnerStopped(Exception):
    """The runner process got a termination signal; the stage's kernel was shut down."""


@contextmanager
def stop_on_signals() -> Iterator[None]:
    """Turn SIGTERM and SIGHUP into an exception in the runner's main thread, so papermill's clean-up shuts the
    kernel down (SIGINT already raises KeyboardInterrupt). Without it a killed runner left its kernel running the
    stage to the end."""
    def handler(signum: int, frame: Any) -> None:
        raise RunnerStopped(f"runner got signal {signal.Signals(signum).name}")

    old = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


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


def execute(jobs: List[Job], run_dir: Path, header: Dict[str, Any], order: Sequence[str], kernel: str = "python3",
            verbose: bool = False, resume: bool = False) -> int:
    """Run the jobs in order; stop at the first failure. Returns a process exit code."""
    done = previous_done(run_dir) if resume else {}
    nb_dir = run_dir / "notebooks"
    nb_dir.mkdir(parents=True, exist_ok=True)
    t_all = time.time()
    with kernel_env(), stop_on_signals():
        code = _execute_jobs(jobs, run_dir, header, order, done, kernel, verbose, _kernel_transport())
    if code:
        return code
    for job in jobs:
        report_nb = nb_dir / f"{job.tag}.ipynb"
        html = run_dir / "report.html"
        if job.stage == REPORT_STAGE and report_nb.exists() and (job.status == "ok" or not html.exists()):
            print(f"report: {write_html_report(report_nb, html)}", flush=True)
    header["finished"] = now()
    header["seconds"] = round(time.time() - t_all, 2)
    write_manifest(run_dir, header, jobs, order)
    return 0


def _execute_jobs(jobs: List[Job], run_dir: Path, header: Dict[str, Any], order: Sequence[str],
                  done: Dict[str, Any], kernel: str, verbose: bool, transport: Dict[str, Any]) -> int:
    import papermill as pm

    nb_dir = run_dir / "notebooks"
    ran = False  # once a stage runs, every later one runs too (its inputs may have changed; each resumes inside)
    for i, job in enumerate(jobs, 1):
        out_nb = nb_dir / f"{job.tag}.ipynb"
        before = done.get(f"notebooks/{job.tag}.ipynb")
        if (not ran and before is not None and before["params"] == job.params and out_nb.exists()
                and before["source_sha1"] == notebook_sha1(job.notebook)):
            job.status = "skipped (done)"
            print(f"[{i}/{len(jobs)}] {job.tag}: already done with the same parameters and notebook, skipped",
                  flush=True)
            continue
        ran = True
        print(f"[{i}/{len(jobs)}] {job.tag} ...", flush=True)
        job.status = "running"
        write_manifest(run_dir, header, jobs, order)
        t0 = time.time()
        try:
            pm.execute_notebook(str(job.notebook), str(out_nb), parameters=job.params, kernel_name=kernel,
                                cwd=str(REPO), progress_bar=False,
                                log_output=verbose, request_save_on_cell_execute=True, **transport)
        except (Exception, KeyboardInterrupt, RunnerStopped) as exc:  # papermill wraps the notebook's exception
            job.seconds, job.status = round(time.time() - t0, 2), "failed"
            job.error = f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1] if str(exc).strip() else ''}"
            header["finished"] = now()
            write_manifest(run_dir, header, jobs, order)
            print(f"stage {job.stage!r} failed in notebook {job.notebook.name} (executed copy: {out_nb}):\n"
                  f"  {job.error}", file=sys.stderr, flush=True)
            return 130 if isinstance(exc, (KeyboardInterrupt, RunnerStopped)) else 1
        job.seconds, job.status = round(time.time() - t0, 2), "ok"
        write_manifest(run_dir, header, jobs, order)
        print(f"[{i}/{len(jobs)}] {job.tag} done in {job.seconds:.1f} s", flush=True)
    return 0
