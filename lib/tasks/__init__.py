"""Task packages: one per competition, each declaring its spec, stages and phantom.

A task is declared once, in `lib/tasks/<name>/spec.py` as `SPEC = TaskSpec(...)`: its Kaggle slug, data layout,
label names and metric weights, metric, stage list (stage -> notebook under `notebooks/<name>/`), submission format,
ID pattern and phantom generator. Shared code never imports a task package: it gets what it needs from the spec
(label names, weights, number of outputs, metric name) as arguments. `get_task(name)` imports the spec by name.
"""
from __future__ import annotations

import importlib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

REPO = Path(__file__).resolve().parents[2]
#: The tasks this repo ships (a package lib/tasks/<name>/ with a spec.py each); `ich` is the default.
TASKS: Tuple[str, ...] = ("ich", "brats", "cspine")
DEFAULT_TASK = "ich"


@dataclass(frozen=True)
class TaskSpec:
    """Everything shared code needs to know about one competition."""

    name: str
    competition: str                       # Kaggle slug (mount folder under /kaggle/input)
    labels: Tuple[str, ...]                # prediction columns, in the order of every (N, L) array
    weights: Tuple[float, ...]             # metric weight per label (same order)
    metric: str                            # lib.evaluate.metrics registry name: the validation score
    stages: Mapping[str, str]              # stage -> notebook file name under notebooks/<name>/, pipeline order
    layout: Mapping[str, str]              # named paths of the Kaggle download, relative to the data folder
    submission_columns: Tuple[str, ...]    # sample_submission.csv header
    id_pattern: str                        # an image / case ID read from a header or CSV must match this
    phantom: str                           # module with `main(argv)`: the built-in data generator
    description: str = ""
    extra: Mapping[str, object] = field(default_factory=dict)
    notebook_root: Optional[Path] = None   # default notebooks/<name>/ in this repo (tests point it elsewhere)

    def __post_init__(self) -> None:
        if len(self.labels) != len(self.weights):
            raise ValueError(f"task {self.name}: {len(self.labels)} labels but {len(self.weights)} weights")

    @property
    def num_classes(self) -> int:
        return len(self.labels)

    @property
    def weight_array(self) -> np.ndarray:
        """(L,) float64 metric weights."""
        return np.asarray(self.weights, dtype=np.float64)

    @property
    def notebooks_dir(self) -> Path:
        return self.notebook_root or REPO / "notebooks" / self.name

    @property
    def params_dir(self) -> Path:
        return REPO / "params" / self.name

    def notebook(self, stage: str) -> Path:
        """The notebook of `stage`; a KeyError listing the task's stages otherwise."""
        if stage not in self.stages:
            raise KeyError(f"task {self.name!r} has no stage {stage!r}; its stages: {list(self.stages)}")
        return self.notebooks_dir / self.stages[stage]

    def valid_id(self, value: str) -> bool:
        return isinstance(value, str) and re.fullmatch(self.id_pattern, value) is not None

    def phantom_main(self, argv: Sequence[str]) -> int:
        """Run the task's generator CLI with `argv`; returns a process exit code."""
        main: Callable = getattr(importlib.import_module(self.phantom), "main")
        main(list(argv))
        return 0


def task_names() -> List[str]:
    return list(TASKS)


_CACHE: Dict[str, TaskSpec] = {}


def get_task(name: Optional[str] = None) -> TaskSpec:
    """The spec of task `name` (default `ich`); a KeyError listing the valid tasks otherwise."""
    name = DEFAULT_TASK if name is None else name
    if not isinstance(name, str) or name not in TASKS:
        raise KeyError(f"unknown task {name!r}; valid tasks: {', '.join(TASKS)}")
    if name not in _CACHE:
        spec = getattr(importlib.import_module(f"lib.tasks.{name}.spec"), "SPEC")
        if not isinstance(spec, TaskSpec) or spec.name != name:
            raise TypeError(f"lib.tasks.{name}.spec.SPEC must be the TaskSpec of task {name!r}")
        _CACHE[name] = spec
    return _CACHE[name]
