"""Stage configs built from a notebook's parameters cell: the one place where the cell's "unset" literals are read.

A parameters cell holds literals only (papermill injects overrides after it), so an optional value that is absent is
spelt there as `""` (a string) or `0` (a count). A config dataclass names those fields in its `UNSET` class variable
({field: the literal meaning None}); `from_params` maps them to None and nothing else does. Experiment settings have
no defaults in the dataclasses (the notebook's cell is their one source); purely run-time knobs (progress, workers,
device, resume) keep neutral defaults and say so with `runtime()`.
"""
from __future__ import annotations

from dataclasses import MISSING, Field, field, fields
from typing import Any, Dict, List, Mapping

RUNTIME = "runtime"


def runtime(default: Any) -> Any:
    """A dataclass field for a run-time knob (how, not what, is computed): it may keep a neutral default."""
    return field(default=default, metadata={RUNTIME: True})


def is_runtime(f: Field) -> bool:
    return bool(f.metadata.get(RUNTIME))


def experiment_fields(cls: type) -> List[str]:
    """Names of the fields of config dataclass `cls` that are experiment settings (not run-time knobs)."""
    return [f.name for f in fields(cls) if not is_runtime(f)]


def has_default(f: Field) -> bool:
    return f.default is not MISSING or f.default_factory is not MISSING


def check_keys(cls: type, values: Mapping[str, Any]) -> None:
    """KeyError naming unknown keys (with the valid ones) or missing required keys of config dataclass `cls`."""
    valid = [f.name for f in fields(cls)]
    unknown = sorted(set(values) - set(valid))
    if unknown:
        raise KeyError(f"unknown {cls.__name__} keys {unknown}; valid keys: {valid}")
    missing = [f.name for f in fields(cls) if not has_default(f) and f.name not in values]
    if missing:
        raise KeyError(f"{cls.__name__} needs values for {missing} (experiment settings have no defaults: the "
                       f"notebook's parameters cell holds them)")


def none_if_unset(values: Mapping[str, Any], unset: Mapping[str, Any]) -> Dict[str, Any]:
    """`values` with each key of `unset` whose value equals its "unset" literal ("" or 0) replaced by None."""
    out = dict(values)
    for key, literal in unset.items():
        value = out.get(key)
        if key in out and type(value) is type(literal) and value == literal:
            out[key] = None
    return out
