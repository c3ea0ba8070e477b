"""The papermill runner: params validation, fold expansion, manifest, failing stages."""
from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import pytest
import yaml


from lib.run import params as params_mod
from lib.run import runner as runner
from lib.tasks import get_task

import nbformat
from nbformat.v4 import new_code_cell, new_notebook


def _nb(path: Path, params_src: str, body: str) -> None:
    nb = new_notebook()
    nb.metadata = {"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}}
    p = new_code_cell(params_src)
    p.metadata["tags"] = ["parameters"]
    nb.cells = [p, new_code_cell(body)]
    nbformat.write(nb, path)


@pytest.fixture()
def toy_pipeline(tmp_path, monkeypatch):
    nbs = tmp_path / "nbs"
    nbs.mkdir()
    _nb(nbs / "a.ipynb", 'data_dir: str = ""\nrun_dir: str = ""\nseed: int = 0\nsize: int = 8',
        "from pathlib import Path\nPath(run_dir, f'a_{size}_{seed}.txt').write_text('ok')")
    _nb(nbs / "b.ipynb", 'data_dir: str = ""\nrun_dir: str = ""\nseed: int = 0\nfold: int = 0\nfail: bool = False',
        "from pathlib import Path\nassert not fail, 'asked to fail'\nPath(run_dir, f'b_{fold}.txt').write_text('ok')")
    toy = dataclasses.replace(get_task("ich"), name="toy", stages={"a": "a.ipynb", "b": "b.ipynb"}, notebook_root=nbs)
    monkeypatch.setattr(params_mod, "get_task", lambda name="ich": toy if name in ("ich", "toy") else get_task(name))
    data = tmp_path / "data"
    data.mkdir()
    return tmp_path, data


def _params(tmp_path: Path, cfg: dict) -> Path:
    path = tmp_path / "toy.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def test_plan_merges_common_and_expands_folds(toy_pipeline):
    tmp, data = toy_pipeline
    p = _params(tmp, {"common": {"seed": 3}, "stages": {"a": {"size": 16}, "b": {"fold": [0, 2]}}})
    jobs = runner.plan(p, data, tmp / "out")
    assert [j.tag for j in jobs] == ["a", "b_fold0", "b_fold2"]
    assert jobs[0].params["seed"] == 3 and jobs[0].params["size"] == 16
    assert [j.params["fold"] for j in jobs[1:]] == [0, 2]
    assert all(j.params["run_dir"] == str(tmp / "out") for j in jobs)


@pytest.mark.parametrize("cfg, match", [
    ({"stages": {"a": {"sise": 1}}}, r"unknown keys \['sise'\].*valid keys: \['seed', 'size'\]"),
    ({"stages": {"zzz": {}}}, r"has no stages \['zzz'\]"),
    ({"stages": {"b": {}, "a": {}}}, r"pipeline order"),
    ({"common": {"nope": 1}, "stages": {"a": {}}}, r"`common` keys \['nope'\]"),
    ({"stages": {"a": {"run_dir": "/x"}}}, r"unknown keys \['run_dir'\]"),
    ({"stagez": {}}, r"unknown top-level keys"),
])
def test_plan_rejects_bad_params(toy_pipeline, cfg, match):
    tmp, data = toy_pipeline
    with pytest.raises(runner.ParamsError, match=match):
        runner.plan(_params(tmp, cfg), data, tmp / "out")


def test_main_runs_and_writes_manifest(toy_pipeline):
    tmp, data = toy_pipeline
    out = tmp / "out"
    p = _params(tmp, {"common": {"seed": 1}, "stages": {"a": {}, "b": {"fold": [0, 1]}}})
    assert runner.main([str(p), "--data", str(data), "--out", str(out)]) == 0
    assert (out / "a_8_1.txt").exists() and (out / "b_1.txt").exists()
    man = json.loads((out / "manifest.json").read_text())
    assert [s["status"] for s in man["stages"]] == ["ok"] * 3
    assert man["packages"]["papermill"] and "params_yaml" in man and man["stages"][1]["params"]["fold"] == 0
    assert (out / "notebooks" / "b_fold1.ipynb").exists()
    # --resume skips what is done with the same params
    (out / "a_8_1.txt").unlink()
    assert runner.main([str(p), "--data", str(data), "--out", str(out), "--resume"]) == 0
    assert not (out / "a_8_1.txt").exists()


def test_failing_stage_exits_nonzero_naming_notebook(toy_pipeline, capsys):
    tmp, data = toy_pipeline
    out = tmp / "out"
    p = _params(tmp, {"stages": {"a": {}, "b": {"fail": True}}})
    assert runner.main([str(p), "--data", str(data), "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert "b.ipynb" in err and "asked to fail" in err
    man = json.loads((out / "manifest.json").read_text())
    assert [s["status"] for s in man["stages"]] == ["ok", "failed"]


def test_real_params_files_are_valid(tmp_path):
    """Every YAML in params/ resolves against the real notebooks (unknown keys would raise)."""
    files = sorted((runner.REPO / "params").rglob("*.yaml"))
    assert files, "no params files"
    for path in files:
        jobs = runner.plan(path, tmp_path, tmp_path / "out")
        assert jobs, path


def test_stage_subset_adds_to_the_manifest(toy_pipeline):
    tmp, data = toy_pipeline
    out = tmp / "out"
    p = _params(tmp, {"stages": {"a": {}, "b": {"fold": [0]}}})
    assert runner.main([str(p), "--data", str(data), "--out", str(out)]) == 0
    assert runner.main([str(p), "--data", str(data), "--out", str(out), "--stages", "b"]) == 0
    man = json.loads((out / "manifest.json").read_text())
    assert [s["notebook"] for s in man["stages"]] == ["notebooks/a.ipynb", "notebooks/b_fold0.ipynb"]
    assert all(s["status"] == "ok" for s in man["stages"])


# ---------------------------------------------------------------- params are data, typed before anything runs
def _raw(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "raw.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("text, match", [
    ("task: brain\nstages: {a: {}}\n", r"unknown task 'brain'; valid tasks: \['ich'"),
    ("stages: {a: {size: 'x'}}\n", r"stage 'a'.*size='x' \(str\) is not an integer; declared `size: int`"),
    ("stages: {b: {fail: 'yes'}}\n", r"fail='yes' \(str\) is not a boolean"),
    ("stages: {b: {fail: 1}}\n", r"fail=1 \(int\) is not a boolean"),
    ("stages: {a: {size: 2.5}}\n", r"size=2.5 \(float\) is not an integer"),
    ("stages: {a: {seed: [1, 2]}}\n", r"seed=\[1, 2\] \(list\) is not an integer"),
    ("stages: {b: {fold: []}}\n", r"fold=\[\] names no fold"),
    ("stages: {a: {size: !!binary aGVsbG8=}}\n", r"raw.yaml:1:\d+: YAML error.*tag 'tag:yaml.org,2002:binary' is not "
                                                  r"allowed"),
    ("stages: {a: {size: !!python/name:os.system }}\n", r"YAML error.*is not allowed"),
    ("stages: {a: {size: 2020-01-01}}\n", r"size='2020-01-01' \(str\) is not an integer"),
    ("stages:\n  a: {size: 3\n  b: {}\n", r"raw.yaml:\d+:\d+: YAML error"),
])
def test_bad_values_are_refused_naming_stage_key_value_and_type(toy_pipeline, text, match):
    tmp, data = toy_pipeline
    with pytest.raises(runner.ParamsError, match=match):
        runner.plan(_raw(tmp, text), data, tmp / "out")


def test_values_are_coerced_losslessly_and_ranges_checked(toy_pipeline, tmp_path, monkeypatch):
    from lib.run.params import Declared, check_value

    lr = Declared("lr", "float", 1e-3)
    assert check_value("f", "lr", "2e-4", lr) == pytest.approx(2e-4)  # PyYAML reads 2e-4 as a string
    assert check_value("f", "lr", 3, lr) == 3.0 and isinstance(check_value("f", "lr", 3, lr), float)
    for bad, match in (("fast", "is not a number"), (0, r"must be > 0"), (-1e-3, r"must be > 0"),
                       ("inf", "not a finite number")):
        with pytest.raises(runner.ParamsError, match=match):
            check_value("params.yaml: stage 'train_cnn'", "lr", bad, lr)
    epochs = Declared("epochs", "int", 4)
    for bad in (0, -1):
        with pytest.raises(runner.ParamsError, match=r"stage 'train_cnn': epochs=-?\d is out of range: must be >= 1"):
            check_value("params.yaml: stage 'train_cnn'", "epochs", bad, epochs)
    with pytest.raises(runner.ParamsError, match=r"epochs='four' \(str\) is not an integer"):
        check_value("x", "epochs", "four", epochs)
    with pytest.raises(runner.ParamsError, match=r"bs=-4 is out of range"):
        check_value("x", "bs", -4, Declared("bs", "int", 32))
    with pytest.raises(runner.ParamsError, match=r"crop='no' \(str\) is not a boolean"):
        check_value("x", "crop", "no", Declared("crop", "bool", True))
    assert check_value("x", "neg_frac", 1, Declared("neg_frac", "float", 1.0)) == 1.0


def test_a_refused_value_runs_nothing(toy_pipeline):
    tmp, data = toy_pipeline
    out = tmp / "out"
    p = _raw(tmp, "stages: {a: {}, b: {fold: [0, 'one']}}\n")
    assert runner.main([str(p), "--data", str(data), "--out", str(out)]) == 2
    assert not out.exists()  # refused before the first stage


def test_unknown_stage_for_the_task_lists_its_stages(tmp_path):
    p = _raw(tmp_path, "task: ich\nstages: {segment: {}}\n")
    with pytest.raises(runner.ParamsError, match=r"task 'ich' has no stages \['segment'\]; valid stages: \['eda'"):
        runner.plan(p, tmp_path, tmp_path / "out")


def test_resume_after_a_finished_run_does_nothing_however_often(toy_pipeline, capsys):
    tmp, data = toy_pipeline
    out = tmp / "out"
    p = _params(tmp, {"stages": {"a": {}, "b": {"fold": [0]}}})
    assert runner.main([str(p), "--data", str(data), "--out", str(out)]) == 0
    for _ in range(2):  # the second --resume used to redo everything: "skipped (done)" did not count as done
        (out / "a_8_0.txt").unlink(missing_ok=True)
        assert runner.main([str(p), "--data", str(data), "--out", str(out), "--resume"]) == 0
        assert not (out / "a_8_0.txt").exists()
    assert capsys.readouterr().out.count("already done") == 4


def test_resume_reruns_an_edited_notebook_and_what_follows(toy_pipeline, capsys):
    """--resume used to skip a stage whose notebook changed (only the parameters were compared), and the stages
    after a rerun one, whose inputs may have changed."""
    tmp, data = toy_pipeline
    out = tmp / "out"
    p = _params(tmp, {"stages": {"a": {}, "b": {"fold": [0]}}})
    assert runner.main([str(p), "--data", str(data), "--out", str(out)]) == 0
    nb = tmp / "nbs" / "a.ipynb"
    nb.write_text(nb.read_text().replace("write_text('ok')", "write_text('edited')"))
    capsys.readouterr()
    assert runner.main([str(p), "--data", str(data), "--out", str(out), "--resume"]) == 0
    printed = capsys.readouterr().out
    assert "already done" not in printed  # a: edited; b: after a rerun stage
    assert (out / "a_8_0.txt").read_text() == "edited"
    assert runner.main([str(p), "--data", str(data), "--out", str(out), "--resume"]) == 0
    assert capsys.readouterr().out.count("already done") == 2


def test_killing_the_runner_stops_its_stage_kernel(toy_pipeline, tmp_path):
    """SIGTERM to the runner used to leave the stage's kernel running the notebook to the end."""
    import os
    import signal
    import subprocess
    import time

    tmp, data = toy_pipeline
    nbs = tmp / "nbs"
    _nb(nbs / "a.ipynb", 'data_dir: str = ""\nrun_dir: str = ""\nseed: int = 0\nsize: int = 8',
        "import os, time\nfrom pathlib import Path\nPath(run_dir, 'kernel.pid').write_text(str(os.getpid()))\n"
        "time.sleep(120)\nPath(run_dir, 'finished').write_text('x')")
    p = _params(tmp, {"stages": {"a": {}}})
    out = tmp / "out"
    code = (f"import dataclasses, sys; from pathlib import Path; from lib.run import params, runner; "
            f"from lib.tasks import get_task; "
            f"toy = dataclasses.replace(get_task('ich'), name='toy', stages={{'a': 'a.ipynb'}}, "
            f"notebook_root=Path({str(nbs)!r})); params.get_task = lambda name='ich': toy; "
            f"sys.exit(runner.main([{str(p)!r}, '--data', {str(data)!r}, '--out', {str(out)!r}]))")
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=runner.REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    pid_file = out / "kernel.pid"
    deadline = time.time() + 120
    while not pid_file.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    assert pid_file.exists(), proc.communicate(timeout=30)
    kernel = int(pid_file.read_text())
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "SIGTERM" in err
    for _ in range(100):
        try:
            os.kill(kernel, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        pytest.fail(f"kernel {kernel} still running after the runner was stopped")
    man = json.loads((out / "manifest.json").read_text())
    assert man["stages"][0]["status"] == "failed" and not (out / "finished").exists()
