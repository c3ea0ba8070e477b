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
    monkeypatch.setattr(params_mod, "get_task", lambda name="toy": toy)
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
