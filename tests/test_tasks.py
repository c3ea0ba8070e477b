"""Task specs: every task is declared once, its metric is registered, its phantom runs through `lib.phantom`, and
the runner refuses a task whose pipeline is not built."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from lib import phantom
from lib.evaluate.metrics import METRICS
from lib.run import runner
from lib.tasks import TaskSpec, get_task, task_names

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", task_names())
def test_every_task_spec_is_complete(name):
    spec = get_task(name)
    assert isinstance(spec, TaskSpec) and spec.name == name
    assert len(spec.labels) == len(spec.weights) == spec.num_classes > 0
    assert spec.metric in METRICS, f"{name}: metric {spec.metric!r} is not in lib.evaluate.metrics.METRICS"
    for stage in spec.stages:
        assert spec.notebook(stage).is_file(), f"{name}: stage {stage} has no notebook {spec.notebook(stage)}"
    assert spec.params_dir.name == name and spec.competition


def test_unknown_task_lists_the_valid_ones():
    with pytest.raises(KeyError, match=r"unknown task 'nope'; valid tasks: ich, brats, cspine"):
        get_task("nope")
    assert phantom.main(["nope", "--out", "x"]) == 2


def test_ich_ids_follow_the_declared_pattern():
    spec = get_task("ich")
    assert spec.valid_id("ID_0123abcdef") and not spec.valid_id("../../pwned") and not spec.valid_id("ID_a/b")


@pytest.mark.parametrize("name", ["cspine"])
def test_a_task_without_stages_is_refused_by_the_runner(tmp_path, monkeypatch, name):
    import dataclasses

    import lib.tasks as tasks

    # every shipped task has stages now; a task declared before its notebooks exist must still be refused clearly
    monkeypatch.setitem(tasks._CACHE, name, dataclasses.replace(get_task(name), stages={}))
    p = tmp_path / "x.yaml"
    p.write_text(f"task: {name}\nstages: {{eda: {{}}}}\n")
    with pytest.raises(runner.ParamsError, match=rf"task '{name}' has no pipeline stages yet.*lib.phantom {name}"):
        runner.plan(p, tmp_path, tmp_path / "out")


def test_phantom_cli_dispatches_on_the_task(tmp_path):
    out = subprocess.run([sys.executable, "-m", "lib.phantom", "cspine", "--out", str(tmp_path / "c"),
                          "--studies", "2", "--size", "48", "--slices", "16", "20"], cwd=REPO, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert (tmp_path / "c" / "train.csv").is_file() and (tmp_path / "c" / "test.csv").is_file()
    ich = subprocess.run([sys.executable, "-m", "lib.phantom", "--out", str(tmp_path / "i"), "--studies", "2",
                          "--size", "32", "--slices", "8", "9"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert ich.returncode == 0 and (tmp_path / "i" / "stage_2_train.csv").is_file(), ich.stderr[-2000:]


def test_phantom_cli_bad_options_are_one_line(tmp_path, capsys):
    assert phantom.main(["--out", str(tmp_path / "i"), "--slices", "4", "5"]) == 2
    assert capsys.readouterr().err.startswith("error: need studies >= 1")
