"""Params YAML -> the ordered list of notebook executions, every value checked before anything runs.

A params file holds only overrides of the notebooks' defaults:

    task: ich          # optional, default ich: which task's stages and notebooks (lib.tasks)
    description: ...
    common:            # given to every stage whose parameters cell declares the key
      seed: 0
    stages:            # run in this order (must follow the task's pipeline order)
      train_cnn: {arch: resnet18, fold: [0, 1, 2]}   # a list for `fold` runs the notebook once per fold

Params are data, never code: the YAML is read with a loader that knows only YAML's plain types (str, int, float,
bool, null, lists and maps of them; `!!binary`, `!!python/...`, dates and any other tag are refused); each value is
typed against the type declared in the notebook's parameters cell (`lr: float = 2e-4`) where that is lossless (the
string `"2e-4"` PyYAML reads -> 0.0002, `3` -> 3.0 for a float) and refused otherwise (`epochs: "x"`, a string for a
bool); known ranges are checked (`RANGES`). Every refusal names the file, stage, key, value and what was expected.
"""
from __future__ import annotations

import ast
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import yaml

from lib.tasks import DEFAULT_TASK, TaskSpec, get_task, task_names

RUNNER_KEYS = ("data_dir", "run_dir")  # injected by the runner, never set in YAML
EXPANDABLE = ("fold",)  # a list value runs the stage once per item
TOP_KEYS = ("task", "description", "common", "stages")

#: Ranges of parameters that have one, by name (any task's notebook that declares the name gets the check).
RANGES: Dict[str, Tuple[str, Callable[[float], bool]]] = {
    "epochs": (">= 1", lambda v: v >= 1), "bs": (">= 1", lambda v: v >= 1), "lr": ("> 0", lambda v: v > 0),
    "wd": (">= 0", lambda v: v >= 0), "n_folds": (">= 2", lambda v: v >= 2),
    "inner_folds": (">= 2", lambda v: v >= 2), "nproc": (">= 1", lambda v: v >= 1),
    "num_workers": (">= 0", lambda v: v >= 0), "workers": (">= 0", lambda v: v >= 0),
    "img_size": (">= 8", lambda v: v >= 8), "patience": (">= 0", lambda v: v >= 0),
    "neg_frac": ("in (0, 1]", lambda v: 0 < v <= 1), "drop_rate": ("in [0, 1)", lambda v: 0 <= v < 1),
    "reverse_p": ("in [0, 1]", lambda v: 0 <= v <= 1), "aux_weight": (">= 0", lambda v: v >= 0),
    "clip": ("in [0, 0.5)", lambda v: 0 <= v < 0.5), "snapshot_epochs": (">= 0", lambda v: v >= 0),
    "crop_min": (">= 0", lambda v: v >= 0), "crop_max": (">= 0", lambda v: v >= 0),
    "hu_sample": (">= 1", lambda v: v >= 1), "n_show": (">= 0", lambda v: v >= 0),
    "n_strips": (">= 0", lambda v: v >= 0), "show_worst": (">= 0", lambda v: v >= 0),
    "max_train_items": (">= 0", lambda v: v >= 0), "max_valid_items": (">= 0", lambda v: v >= 0),
}


class ParamsError(ValueError):
    """A params YAML that does not fit the task, its notebooks or their parameters' types."""


# ---------------------------------------------------------------------------------------- reading the YAML
class PlainLoader(yaml.SafeLoader):
    """SafeLoader restricted to str, int, float, bool, null, sequences and mappings: every other tag (explicit
    `!!binary`, `!!set`, `!!timestamp`, implicit dates, custom `!tags`) is an error, so no value is ever bytes."""


_PLAIN = {"tag:yaml.org,2002:" + t for t in ("str", "int", "float", "bool", "null", "seq", "map")}


def _refuse(loader: yaml.SafeLoader, node: yaml.Node) -> Any:
    mark = node.start_mark
    raise yaml.constructor.ConstructorError(None, None, f"tag {node.tag!r} is not allowed: params hold only "
                                            "strings, numbers, booleans, null, lists and maps", mark)


PlainLoader.yaml_constructors = {k: v for k, v in yaml.SafeLoader.yaml_constructors.items() if k in _PLAIN}
PlainLoader.add_constructor(None, _refuse)  # type: ignore[arg-type]
PlainLoader.yaml_implicit_resolvers = {
    ch: [(tag, rx) for tag, rx in rs if tag != "tag:yaml.org,2002:timestamp"]
    for ch, rs in yaml.SafeLoader.yaml_implicit_resolvers.items()}


def read_yaml(path: Path) -> Any:
    """Parse a params file with PlainLoader; any YAML error becomes one line with file, line and column."""
    if not path.is_file():
        raise ParamsError(f"params file {path} does not exist")
    try:
        return yaml.load(path.read_text(), Loader=PlainLoader)  # noqa: S506 (PlainLoader is a SafeLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        what = " ".join(p for p in (exc.context, exc.problem) if p)
        raise ParamsError(f"{where}: YAML error: {what}") from None
    except yaml.YAMLError as exc:
        raise ParamsError(f"{path}: YAML error: {exc}") from None


@dataclass
class RunConfig:
    """A params file after its shape is checked: the task and the overrides."""

    path: Path
    task: TaskSpec
    common: Dict[str, Any]
    stages: Dict[str, Dict[str, Any]]
    description: str = ""


def load_params(path: Path) -> RunConfig:
    """Read and shape-check a params YAML (task, stage names and order, mapping shapes)."""
    raw = read_yaml(path) or {}
    if not isinstance(raw, dict):
        raise ParamsError(f"{path}: expected a mapping with keys {list(TOP_KEYS)}")
    unknown = sorted(set(raw) - set(TOP_KEYS), key=str)
    if unknown:
        raise ParamsError(f"{path}: unknown top-level keys {unknown}; valid keys: {list(TOP_KEYS)}")
    name = raw.get("task", DEFAULT_TASK)
    try:
        task = get_task(name)
    except KeyError:
        raise ParamsError(f"{path}: unknown task {name!r}; valid tasks: {task_names()}") from None
    pipeline = list(task.stages)
    if not pipeline:
        raise ParamsError(f"{path}: task {task.name!r} has no pipeline stages yet (built so far: its data generator "
                          f"`python -m lib.phantom {task.name}` and readers); tasks with stages: "
                          f"{[t for t in task_names() if get_task(t).stages]}")
    stages = raw.get("stages") or {}
    if not isinstance(stages, dict) or not stages:
        raise ParamsError(f"{path}: `stages` must map stage names to parameter overrides; "
                          f"stages of task {task.name}: {pipeline}")
    bad = [s for s in stages if s not in task.stages]
    if bad:
        raise ParamsError(f"{path}: task {task.name!r} has no stages {bad}; valid stages: {pipeline}")
    order = [pipeline.index(s) for s in stages]
    if order != sorted(order):
        raise ParamsError(f"{path}: stages must follow the pipeline order {pipeline}")
    for sname, over in stages.items():
        if over is not None and not isinstance(over, dict):
            raise ParamsError(f"{path}: stage {sname!r} must map parameter names to values, got {over!r}")
    common = raw.get("common") or {}
    if not isinstance(common, dict):
        raise ParamsError(f"{path}: `common` must map parameter names to values, got {common!r}")
    return RunConfig(path, task, common, {k: v or {} for k, v in stages.items()}, str(raw.get("description") or ""))


# ---------------------------------------------------------------------------------------- notebook parameters
@dataclass(frozen=True)
class Declared:
    """One parameter of a notebook's `parameters` cell: its declared type name and default value."""

    name: str
    type_name: str
    default: Any
    help: str = ""


def notebook_parameters(path: Path) -> Dict[str, Declared]:
    """The parameters a notebook declares (papermill's inspection of its `parameters` cell)."""
    import papermill as pm

    if not path.is_file():
        raise ParamsError(f"notebook {path} does not exist")
    out: Dict[str, Declared] = {}
    for name, info in pm.inspect_notebook(str(path)).items():
        try:
            default = ast.literal_eval(info["default"])
        except (ValueError, SyntaxError):
            default = info["default"]
        out[name] = Declared(name, str(info.get("inferred_type_name") or "None"), default, info.get("help") or "")
    return out


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def coerce(value: Any, type_name: str) -> Any:
    """`value` as the declared type, where that is lossless; raise TypeError (message: what was expected) else."""
    t = type_name.lower().removeprefix("typing.")
    if t in ("none", "any", ""):
        return value
    if t == "bool":
        if isinstance(value, bool):
            return value
        raise TypeError("a boolean (true/false, unquoted)")
    if t == "int":
        if _is_int(value):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise TypeError("an integer")
    if t == "float":
        if _is_int(value) or isinstance(value, float):
            out = float(value)
        elif isinstance(value, str):
            try:
                out = float(value.strip())  # PyYAML reads 2e-4 (no dot) as a string
            except ValueError:
                raise TypeError("a number") from None
        else:
            raise TypeError("a number")
        if not math.isfinite(out):
            raise TypeError("a finite number")
        return out
    if t == "str":
        if isinstance(value, str):
            return value
        raise TypeError("a string")
    if t == "list":
        if isinstance(value, list):
            return value
        raise TypeError("a list")
    if t == "dict":
        if isinstance(value, dict) and all(isinstance(k, str) for k in value):
            return value
        raise TypeError("a mapping with string keys")
    return value


def check_value(where: str, key: str, value: Any, decl: Declared) -> Any:
    """Coerce and range-check one value; a ParamsError naming `where` (file and stage), key, value and type."""
    try:
        out = coerce(value, decl.type_name)
    except TypeError as exc:
        raise ParamsError(f"{where}: {key}={value!r} ({type(value).__name__}) is not {exc}; "
                          f"declared `{key}: {decl.type_name}` (default {decl.default!r})") from None
    rng = RANGES.get(key)
    if rng and (_is_int(out) or isinstance(out, float)) and not rng[1](out):
        raise ParamsError(f"{where}: {key}={value!r} is out of range: must be {rng[0]}")
    return out


# ---------------------------------------------------------------------------------------- planning
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


def plan(params_path: Path, data_dir: Path, run_dir: Path, only: Optional[Sequence[str]] = None) -> List[Job]:
    """Resolve a params file into the ordered list of notebook executions, validating every key and value."""
    cfg = load_params(params_path)
    task = cfg.task
    if only:
        bad = [s for s in only if s not in task.stages]
        if bad:
            raise ParamsError(f"--stages {bad}: task {task.name!r} has no such stages; valid: {list(task.stages)}")
    declared = {s: notebook_parameters(task.notebook(s)) for s in cfg.stages}
    unused = [k for k in cfg.common if not any(k in d for d in declared.values())]
    if unused:
        valid = sorted({k for d in declared.values() for k in d} - set(RUNNER_KEYS))
        raise ParamsError(f"{params_path}: `common` keys {unused} are parameters of no listed stage; "
                          f"valid keys: {valid}")
    jobs: List[Job] = []
    for stage, over in cfg.stages.items():
        valid = declared[stage]
        bad = [k for k in over if k not in valid or k in RUNNER_KEYS]
        if bad:
            raise ParamsError(f"{params_path}: stage {stage!r} has unknown keys {bad}; valid keys: "
                              f"{sorted(k for k in valid if k not in RUNNER_KEYS)}")
        merged = {k: v for k, v in cfg.common.items() if k in valid}
        merged.update(over)
        typed = {k: _typed(f"{params_path}: stage {stage!r}", k, v, valid[k]) for k, v in merged.items()}
        typed.update(data_dir=str(data_dir), run_dir=str(run_dir))
        if not only or stage in only:
            jobs.extend(_expand(stage, task.notebook(stage), typed))
    return jobs


def _typed(where: str, key: str, value: Any, decl: Declared) -> Any:
    if key in EXPANDABLE and isinstance(value, list):
        if not value:
            raise ParamsError(f"{where}: {key}=[] names no {key} to run")
        return [check_value(where, key, v, decl) for v in value]
    return check_value(where, key, value, decl)


def _expand(stage: str, nb: Path, params: Dict[str, Any]) -> List[Job]:
    for key in EXPANDABLE:
        if isinstance(params.get(key), list):
            return [Job(stage, nb, {**params, key: v}, f"{nb.stem}_{key}{v}") for v in params[key]]
    return [Job(stage, nb, params, nb.stem)]


def stage_defaults(task: TaskSpec, stage: str) -> Mapping[str, Any]:
    """A stage's declared defaults, {name: value}."""
    return {k: d.default for k, d in notebook_parameters(task.notebook(stage)).items()}
