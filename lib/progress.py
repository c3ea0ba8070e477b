"""Progress bars that work in notebooks and in plain logs alike, with no warning.

`progress_bar(...)` takes tqdm's arguments. In an interactive notebook it is `tqdm.auto` (an ipywidgets bar; ipywidgets
is in requirements.txt, so tqdm never falls back with "IProgress not found"). Where widgets would be lost, the
runner's papermill kernels and every plain process, it is the text bar on stderr, refreshed at most every
`LIB_PROGRESS_INTERVAL` seconds (default 1 s in text mode) so executed notebooks and logs stay small.
`LIB_PROGRESS=text|auto` forces one or the other; the runner sets `text` for its kernels.
"""
from __future__ import annotations

import os
import sys
from typing import Any

ENV = "LIB_PROGRESS"
ENV_INTERVAL = "LIB_PROGRESS_INTERVAL"


def _in_notebook_kernel() -> bool:
    shell = sys.modules.get("IPython")
    if shell is None:
        return False
    ip = shell.get_ipython()  # type: ignore[attr-defined]
    return ip is not None and type(ip).__name__ == "ZMQInteractiveShell"


def mode() -> str:
    """'widget' (interactive notebook) or 'text' (runner kernels, scripts, tests)."""
    forced = os.environ.get(ENV, "").strip().lower()
    if forced in ("text", "auto", ""):
        if forced == "text":
            return "text"
        return "widget" if _in_notebook_kernel() else "text"
    raise ValueError(f"{ENV}={forced!r}: expected 'text' or 'auto'")


def progress_bar(*args: Any, **kwargs: Any):
    """A tqdm bar (same arguments as `tqdm.tqdm`) of the kind that fits where the code runs."""
    if mode() == "widget":
        from tqdm.notebook import tqdm as bar_cls
    else:
        from tqdm.std import tqdm as bar_cls

        kwargs.setdefault("file", sys.stderr)
        kwargs.setdefault("mininterval", float(os.environ.get(ENV_INTERVAL, "1")))
        kwargs.setdefault("dynamic_ncols", False)
    return bar_cls(*args, **kwargs)
