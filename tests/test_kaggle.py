"""Kaggle packaging: metadata the kaggle CLI accepts (checked with kaggle's own code, no credentials, nothing pushed),
code / wheels / weights datasets, the generated kernel, and (slow) the offline kernel run on a simulated
/kaggle/input."""
from __future__ import annotations

import base64
import contextlib
import csv
import hashlib
import importlib.util
import io
import json
import os
import subprocess
import sys
import types
import zipfile
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Dict, List

import nbformat
import pytest

from lib.kaggle import package as kg
from lib.kaggle import meta as km
from lib.tasks.ich.data import COMPETITION

REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------- helpers
def make_wheel(folder: Path, dist: str = "rsna_offline_probe", version: str = "0.1.0") -> Path:
    """A minimal valid pure-Python wheel (`import <dist>` gives VALUE = 42)."""
    files = {f"{dist}/__init__.py": b"VALUE = 42\n",
             f"{dist}-{version}.dist-info/METADATA":
                 f"Metadata-Version: 2.1\nName: {dist.replace('_', '-')}\nVersion: {version}\n".encode(),
             f"{dist}-{version}.dist-info/WHEEL":
                 b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    record = io.StringIO()
    writer = csv.writer(record, lineterminator="\n")
    for name, data in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        writer.writerow([name, f"sha256={digest}", len(data)])
    writer.writerow([f"{dist}-{version}.dist-info/RECORD", "", ""])
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{dist}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in files.items():
            zf.writestr(name, data)
        zf.writestr(f"{dist}-{version}.dist-info/RECORD", record.getvalue())
    return path


@pytest.fixture(scope="module")
def kaggle_api():
    """kaggle's KaggleApi class, imported without running `kaggle/__init__.py` (which authenticates at import and
    exits without credentials). Only its metadata handling is used; its HTTP client is always replaced."""
    spec = importlib.util.find_spec("kaggle")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("the kaggle package is not installed")
    saved = {k: v for k, v in sys.modules.items() if k == "kaggle" or k.startswith("kaggle.")}
    stub = types.ModuleType("kaggle")
    stub.__path__ = list(spec.submodule_search_locations)
    sys.modules["kaggle"] = stub
    try:
        from kaggle.api.kaggle_api_extended import KaggleApi
        yield KaggleApi
    finally:
        for k in [k for k in sys.modules if k == "kaggle" or k.startswith("kaggle.")]:
            del sys.modules[k]
        sys.modules.update(saved)


def offline_api(api_cls: Any, captured: List[Any]) -> Any:
    """A KaggleApi whose client records requests instead of sending them (no credentials, no network)."""
    from requests.exceptions import HTTPError

    api = api_cls()
    api.config_values = {api.CONFIG_NAME_USER: "tester"}
    record = lambda req: captured.append(req) or SimpleNamespace(error="", ref="", url="", status="ok")  # noqa: E731
    client = SimpleNamespace(kernels=SimpleNamespace(kernels_api_client=SimpleNamespace(save_kernel=record)),
                             datasets=SimpleNamespace(dataset_api_client=SimpleNamespace(create_dataset=record)))
    api.build_kaggle_client = lambda: contextlib.nullcontext(client)

    def not_found(ref: str) -> None:
        raise HTTPError(f"{ref} does not exist (offline test)")

    api.dataset_status = not_found
    api.upload_files = lambda *a, **k: None
    return api


def toy_notebook(path: Path) -> Path:
    """A notebook declaring the kernel parameters (stands in for 07_inference in fast tests)."""
    nb = nbformat.v4.new_notebook()
    nb.metadata = {"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}}
    params = nbformat.v4.new_code_cell("\n".join(f"{k} = {v!r}" for k, v in kg.kernel_parameters("", "", "").items())
                                       + "\nbatch_size = 8")
    params.metadata["tags"] = ["parameters"]
    nb.cells = [params, nbformat.v4.new_code_cell("print(weights_dataset)")]
    nbformat.write(nb, path)
    return path


# ---------------------------------------------------------------- names and metadata
def test_user_and_slugs(monkeypatch):
    monkeypatch.delenv("KAGGLE_USERNAME", raising=False)
    assert km.kaggle_user() == km.USER_PLACEHOLDER
    monkeypatch.setenv("KAGGLE_USERNAME", "envuser")
    assert km.kaggle_user() == "envuser" and km.kaggle_user("cli") == "cli"
    assert km.slugify("RSNA ICH: demo_run 2") == "rsna-ich-demo-run-2"
    assert km.slugify(km.title_of("rsna-ich-weights-demo")) == "rsna-ich-weights-demo"
    assert kg.weights_slug("My Run") == "rsna-ich-weights-my-run" and len(kg.weights_slug("x" * 80)) == 50


def test_kernel_metadata_fields():
    meta = km.kernel_metadata("rsna-ich-infer", "rsna-ich-infer.ipynb", ["rsna-ich-code", "other/w"], COMPETITION,
                              user="u", gpu=False, private=False)
    assert meta["id"] == "u/rsna-ich-infer" and meta["code_file"] == "rsna-ich-infer.ipynb"
    assert (meta["language"], meta["kernel_type"]) == ("python", "notebook")
    assert meta["enable_internet"] is False and meta["enable_gpu"] is False and meta["is_private"] is False
    assert meta["competition_sources"] == [COMPETITION]
    assert meta["dataset_sources"] == ["u/rsna-ich-code", "other/w"]


def _kernel_folder(tmp_path: Path, **changes: Any) -> Path:
    folder = tmp_path / "kern"
    folder.mkdir(exist_ok=True)
    toy_notebook(folder / "rsna-ich-infer.ipynb")
    meta = km.kernel_metadata("rsna-ich-infer", "rsna-ich-infer.ipynb", ["rsna-ich-code"], COMPETITION, user="u")
    meta.update(changes)
    meta = {k: v for k, v in meta.items() if v is not None}
    (folder / "kernel-metadata.json").write_text(json.dumps(meta))
    return folder


@pytest.mark.parametrize("changes, match", [
    ({"enable_internet": None}, "enable_internet must be set explicitly"),
    ({"enable_internet": True}, "enable_internet must be set explicitly"),
    ({"enable_gpu": "yes"}, "enable_gpu must be a JSON boolean"),
    ({"id": "no-owner"}, "id must be '<user>/<slug>'"),
    ({"id": "u/abc"}, "at least 5 characters"),
    ({"language": "r"}, "language must be 'python'"),
    ({"kernel_type": "script"}, "kernel_type must be 'notebook'"),
    ({"code_file": "missing.ipynb"}, "code_file 'missing.ipynb' is not a file"),
    ({"competition_sources": []}, "competition_sources must name"),
    ({"dataset_sources": ["nouser"]}, "dataset_sources entry"),
])
def test_kernel_validation_rejects(tmp_path, changes, match):
    with pytest.raises(km.KaggleMetadataError, match=match):
        km.validate_kernel_folder(_kernel_folder(tmp_path, **changes))


def test_kernel_validation_warnings(tmp_path):
    assert km.validate_kernel_folder(_kernel_folder(tmp_path)) == []
    warns = km.validate_kernel_folder(_kernel_folder(tmp_path, title="Something Else", id=f"{km.USER_PLACEHOLDER}/"
                                                                                         "rsna-ich-infer"))
    assert len(warns) == 2 and "does not resolve" in warns[0] and "placeholder" in warns[1]


@pytest.mark.parametrize("changes, match", [
    ({"licenses": []}, "exactly one"),
    ({"licenses": [{"name": "CC0-1.0"}, {"name": "MIT"}]}, "exactly one"),
    ({"title": "abc"}, "title 'abc' must have 6 to 50"),
    ({"id": "u/abc"}, "slug 'abc' must have 6 to 50"),
    ({"subtitle": "short"}, "subtitle must have 20 to 80"),
    ({"id": "u/INSERT_SLUG_HERE"}, "kaggle datasets init"),
])
def test_dataset_validation_rejects(tmp_path, changes, match):
    meta = {**km.dataset_metadata("rsna-ich-code", user="u"), **changes}
    (tmp_path / "dataset-metadata.json").write_text(json.dumps(meta))
    with pytest.raises(km.KaggleMetadataError, match=match):
        km.validate_dataset_folder(tmp_path)


def test_fresh_dir_never_deletes_foreign_folders(tmp_path):
    (tmp_path / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="holds no package"):
        kg.package_code(out=tmp_path)
    assert (tmp_path / "keep.txt").exists()


# ---------------------------------------------------------------- datasets
def test_package_code_is_importable_and_accepted_by_kaggle(tmp_path, kaggle_api):
    folder = kg.package_code(out=tmp_path / "code", user="tester")
    assert (folder / "lib" / "__init__.py").is_file() and (folder / "lib" / "kaggle" / "package.py").is_file()
    assert not list(folder.rglob("__pycache__")) and not (folder / "tests").exists()
    manifest = json.loads((folder / "manifest.json").read_text())
    # every module of every sub-package travels (a flat lib/*.py glob dropped the sub-packages silently)
    in_repo = {p.relative_to(REPO).as_posix() for p in (REPO / "lib").rglob("*.py") if "__pycache__" not in p.parts}
    assert in_repo <= set(manifest["files"]), sorted(in_repo - set(manifest["files"]))
    assert {p for p in manifest["files"] if p.startswith("params/")} >= {"params/ich/demo.yaml"}
    assert manifest["kind"] == "code"
    assert manifest["files"]["lib/paths.py"]["sha256"] == kg.sha256(REPO / "lib" / "paths.py")
    out = subprocess.run([sys.executable, "-c", "import lib.paths; print(lib.paths.__file__)"], cwd=tmp_path,
                         env={"PYTHONPATH": str(folder), "PATH": ""}, capture_output=True, text=True, check=True)
    assert Path(out.stdout.strip()).resolve() == (folder / "lib" / "paths.py").resolve()
    captured: List[Any] = []
    offline_api(kaggle_api, captured).dataset_create_new(str(folder))
    req = captured[-1]
    assert (req.owner_slug, req.slug, req.license_name) == ("tester", kg.CODE_SLUG, km.LICENSE)


def test_package_wheels_from_local_wheels(tmp_path, kaggle_api, monkeypatch):
    monkeypatch.delenv("PIP_FIND_LINKS", raising=False)  # only the local folder may serve pip
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    local = tmp_path / "local"
    make_wheel(local)
    make_wheel(local, "unrelated_pkg")
    folder = kg.package_wheels(out=tmp_path / "wheels", packages=["rsna-offline-probe==0.1.0"], find_links=local,
                               user="tester")
    assert sorted(p.name for p in folder.glob("*.whl")) == ["rsna_offline_probe-0.1.0-py3-none-any.whl"]
    assert (folder / "requirements.txt").read_text() == "rsna-offline-probe==0.1.0\n"
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["python"] == kg.KAGGLE_PYTHON and manifest["platforms"] == list(kg.KAGGLE_PLATFORMS)
    assert km.validate_dataset_folder(folder) == []
    captured: List[Any] = []
    offline_api(kaggle_api, captured).dataset_create_new(str(folder))
    assert captured[-1].slug == kg.WHEELS_SLUG
    with pytest.raises(RuntimeError, match="pip download failed"):
        kg.package_wheels(out=tmp_path / "wheels", packages=["not-there-pkg"], find_links=local)


def test_package_wheels_dry_run_names_the_kaggle_platform(tmp_path, capsys):
    kg.package_wheels(out=tmp_path / "w", dry_run=True)
    cmd = capsys.readouterr().out
    assert not (tmp_path / "w").exists()
    for part in ["pip download", "--only-binary=:all:", f"--python-version {kg.KAGGLE_PYTHON}",
                 "--platform manylinux2014_x86_64", "--no-deps", *kg.KAGGLE_MISSING]:
        assert part in cmd


# ---------------------------------------------------------------- kernel
def test_build_kernel_bakes_parameters_and_kaggle_accepts_it(tmp_path, kaggle_api):
    from lib.kaggle.bundle import BundleError

    run = fake_run(tmp_path / "outputs" / "demo")
    folder = kg.build_kernel(run, "rsna-ich-demo-infer", user="tester", gpu=False, out=tmp_path / "k",
                             extra={"batch_size": 4}, notebook=toy_notebook(tmp_path / "toy.ipynb"))
    meta = json.loads((folder / "kernel-metadata.json").read_text())
    assert meta["code_file"] == "rsna-ich-demo-infer.ipynb" and meta["enable_internet"] is False
    assert meta["dataset_sources"] == ["tester/rsna-ich-code", "tester/rsna-ich-weights-demo",
                                       "tester/rsna-ich-wheels"]
    nb = nbformat.read(folder / meta["code_file"], as_version=4)
    injected = [c for c in nb.cells if "injected-parameters" in c.metadata.get("tags", [])]
    assert len(injected) == 1 and all(not c.get("outputs") for c in nb.cells if c.cell_type == "code")
    ns: Dict[str, Any] = {}
    exec(injected[0].source, ns)
    assert ns["weights_dataset"] == "tester/rsna-ich-weights-demo" and ns["batch_size"] == 4 and ns["data_dir"] == ""
    assert ns["code_dataset"] == "tester/rsna-ich-code" and ns["cleanup"] is True
    captured: List[Any] = []
    offline_api(kaggle_api, captured).kernels_push(str(folder))
    req = captured[-1]
    assert req.slug == "tester/rsna-ich-demo-infer" and req.kernel_type == "notebook" and req.language == "python"
    assert req.enable_internet is False and req.enable_gpu is False and req.is_private is True
    assert req.competition_data_sources == [COMPETITION] and len(req.dataset_data_sources) == 3
    assert json.loads(req.text)["cells"][0]["cell_type"] == "code"
    with pytest.raises(ValueError, match="not declared"):
        kg.build_kernel(run, "rsna-ich-demo-infer", out=tmp_path / "k2", extra={"nope": 1},
                        notebook=toy_notebook(tmp_path / "toy.ipynb"))
    (run / "models" / "cnn" / "fold0" / "best.pth").unlink()
    with pytest.raises(BundleError, match="CNN fold 0: checkpoint .*best.pth named by .* is missing"):
        kg.build_kernel(run, "rsna-ich-demo-infer", out=tmp_path / "k3", notebook=toy_notebook(tmp_path / "t.ipynb"))


def test_cli_validate(tmp_path, capsys):
    good = _kernel_folder(tmp_path)
    assert kg.main(["validate", str(good)]) == 0
    assert "kernel metadata ok" in capsys.readouterr().out
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "dataset-metadata.json").write_text(json.dumps({"id": "u/x", "title": "t", "licenses": []}))
    assert kg.main(["validate", str(bad)]) == 2
    assert "must have 6 to 50" in capsys.readouterr().err


# ---------------------------------------------------------------- weights bundle (fake run: tiny tensors)
def fake_run(root: Path, blend: Any = "seq", ks=(0, 1)) -> Path:
    """A run dir with what lib.bundle reads: folds, cache meta, CNN best.pth per fold, pooled sequence heads, blend."""
    import pandas as pd
    import torch

    from lib.data.folds import write_folds
    from lib.paths import RunPaths

    rp = RunPaths.at(root)
    ids = [f"ID_{i:04d}" for i in range(4 * len(ks))]
    write_folds(pd.DataFrame({"image_id": ids, "patient_id": [f"P{i // 2}" for i in range(len(ids))], "study_uid": "s",
                              "series_uid": "s", "fold": [i // 4 for i in range(len(ids))]}), rp.folds)
    rp.record("folds", rp.folds)
    cache = rp.cache_root / "brain_subdural_soft-s64-crop-png"
    cache.mkdir()
    (cache / "meta.json").write_text(json.dumps({"policy": "brain_subdural_soft", "img_size": 64, "crop": True,
                                                 "fmt": "png", "version": 1}))
    rp.record("cache", cache)
    for k in ks:
        cfg = {"arch": "resnet18", "mode": "single", "img_size": 64}
        torch.save({"model": {"w": torch.full((64, 64), float(k))}, "cfg": cfg, "valid_logloss": 0.5 + k},
                   rp.model_dir(k) / "best.pth")
        rp.embedding_record("oof", k).write_text(json.dumps(  # lib.train.embed's record (the manifest's tta differs)
            {"tta": ["orig", "hflip"], "checkpoint": f"../models/cnn/fold{k}/best.pth", "img_size": 64}))
        torch.save({"head": "lstm", "head_kwargs": {}, "in_dim": 9, "states": []},
                   rp.model_dir(k, "seq_pooled") / f"outer{k}.pth")
    (root / "models" / "seq_pooled" / "train_log.json").write_text(json.dumps(
        {"config": {"head": "lstm", "emb_suffix": ""}, "models": [{"tag": f"outer{k}"} for k in ks]}))
    (root / "manifest.json").write_text(json.dumps({"run": "fake", "git_commit": "abc123", "stages": [
        {"stage": "embed", "params": {"data_dir": "/d", "run_dir": str(root), "fold": 0, "tta": ["orig"]}}]}))
    rp.update_metrics({"oof_cnn_logloss": 0.2, "oof_seq_pooled_logloss": 0.15, "cache_written": 3})
    if blend == "seq":  # what notebooks/04_sequence + 05_ensemble write
        blend = {"ensemble_weights": {"cnn": 0.25, "seq": [0.75] * 6}, "ensemble_postprocess": True,
                 "ensemble_method": "weighted_per_class", "seq_primary_strategy": "pooled"}
    rp.update_metrics(blend or {})
    return root


def test_collect_weights_manifest(tmp_path):
    from lib.kaggle import bundle

    manifest, files = bundle.collect_weights(fake_run(tmp_path / "run"))
    assert sorted(files) == ["cnn_fold0.pth", "cnn_fold1.pth", "seq_pooled_fold0_outer0.pth",
                             "seq_pooled_fold1_outer1.pth"]
    assert files["cnn_fold1.pth"] == tmp_path / "run" / "models" / "cnn" / "fold1" / "best.pth"
    cnn = manifest["cnn"]
    assert (cnn["arch"], cnn["mode"], cnn["img_size"], cnn["tta"], cnn["folds"]) == ("resnet18", "single", 64,
                                                                                    ["orig", "hflip"], [0, 1])
    assert cnn["valid_logloss"] == {"0": 0.5, "1": 1.5}
    assert manifest["preprocess"] == {"policy": "brain_subdural_soft", "img_size": 64, "crop": True, "fmt": "png"}
    seq = manifest["sequence"]["pooled"]
    assert seq["aggregate"] == "pairs" and [m["cnn_folds"] for m in seq["models"]] == [[0, 1], [0, 1]]
    assert manifest["blend"]["weights"]["seq"] == [0.75] * 6 and manifest["blend"]["postprocess"] is True
    assert manifest["blend"]["inputs"] == {"cnn": "cnn", "seq": "seq_pooled"}
    assert manifest["metrics"] == {"oof_cnn_logloss": 0.2, "oof_seq_pooled_logloss": 0.15}
    assert manifest["git_commit"] == "abc123" and "run_dir" not in manifest["params"]["embed"]


def test_collect_weights_without_blend_ships_the_cnn(tmp_path):
    from lib.kaggle import bundle

    manifest, files = bundle.collect_weights(fake_run(tmp_path / "run", blend=None))
    assert manifest["blend"]["weights"] == {"cnn": 1.0} and manifest["sequence"] == {}
    assert sorted(files) == ["cnn_fold0.pth", "cnn_fold1.pth"]


@pytest.mark.parametrize("blend, match", [
    ({"ensemble_weights": {"cnn": 0.5, "other_run:cnn": 0.5}}, "other runs are not packaged"),
    ({"ensemble_weights": {"cnn": 0.5, "seq": 0.5}}, "no seq_primary_strategy"),
    ({"ensemble_weights": {"cnn": 0.5, "seq_magic": 0.5}}, "no test-time rule"),
    ({"ensemble_weights": {"cnn": 0.5, "seq": 0.5}, "seq_primary_strategy": "per_fold"}, "train_log.json is missing"),
    ({"ensemble_weights": []}, "must map input names"),
])
def test_collect_weights_rejects(tmp_path, blend, match):
    from lib.kaggle import bundle

    with pytest.raises(bundle.BundleError, match=match):
        bundle.collect_weights(fake_run(tmp_path / "run", blend=blend))


def test_collect_weights_needs_every_fold(tmp_path):
    from lib.kaggle import bundle

    run = fake_run(tmp_path / "run")
    (run / "models" / "cnn" / "fold1" / "best.pth").unlink()
    with pytest.raises(bundle.BundleError, match="CNN fold 1: checkpoint .*best.pth named by .*oof_fold1.json"):
        bundle.collect_weights(run)


def test_collect_weights_reads_the_embed_record_and_fails_clearly_without_it(tmp_path):
    from lib.kaggle import bundle
    from lib.paths import RunPaths

    run = fake_run(tmp_path / "run")
    rp = RunPaths.at(run)
    rec = json.loads(rp.embedding_record("oof", 1).read_text())
    rp.embedding_record("oof", 1).write_text(json.dumps({**rec, "tta": ["orig"]}))
    with pytest.raises(bundle.BundleError, match="TTA views"):
        bundle.collect_weights(run)  # the folds' records disagree
    rp.embedding_record("oof", 1).unlink()
    with pytest.raises(bundle.BundleError, match="CNN fold 1: embedding export .*oof_fold1 has no record"):
        bundle.collect_weights(run)


def test_package_weights_round_trip(tmp_path, kaggle_api):
    import torch

    from lib.kaggle import bundle

    run = fake_run(tmp_path / "outputs" / "fake")
    folder = kg.package_weights(run, out=tmp_path / "w", user="tester")
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        ["cnn_fold0.pth", "cnn_fold1.pth", "seq_pooled_fold0_outer0.pth", "seq_pooled_fold1_outer1.pth",
         "manifest.json", "dataset-metadata.json"])
    meta = json.loads((folder / "dataset-metadata.json").read_text())
    assert meta["id"] == "tester/rsna-ich-weights-fake"
    b = bundle.load_bundle(weights_dir=str(folder))
    assert b.manifest["kind"] == "weights" and b.manifest["half"] is False
    assert torch.equal(torch.load(b.path("cnn_fold1.pth"), weights_only=True)["model"]["w"], torch.ones(64, 64))
    assert b.manifest["files"]["cnn_fold0.pth"]["sha256"] == kg.sha256(folder / "cnn_fold0.pth")
    with pytest.raises(bundle.BundleError, match="lacks file 'nope.pth'"):
        b.path("nope.pth")
    captured: List[Any] = []
    offline_api(kaggle_api, captured).dataset_create_new(str(folder))
    assert captured[-1].slug == "rsna-ich-weights-fake"
    half = kg.package_weights(run, out=tmp_path / "h", half=True)
    ck = torch.load(half / "cnn_fold1.pth", weights_only=True)
    assert ck["model"]["w"].dtype == torch.float16 and ck["cfg"]["arch"] == "resnet18"
    assert (half / "cnn_fold1.pth").stat().st_size < (folder / "cnn_fold1.pth").stat().st_size


def test_load_bundle_from_attached_dataset(tmp_path, monkeypatch):
    from lib.kaggle import bundle

    folder = kg.package_weights(fake_run(tmp_path / "run"), out=tmp_path / "input" / "rsna-ich-weights-run")
    monkeypatch.setenv("KAGGLE_INPUT_ROOT", str(tmp_path / "input"))
    assert bundle.load_bundle(weights_dataset="someone/rsna-ich-weights-run").source == str(folder)
    with pytest.raises(FileNotFoundError, match="is not attached"):
        bundle.load_bundle(weights_dataset="missing-dataset")
    with pytest.raises(bundle.BundleError, match="not a weights package"):
        bundle.load_bundle(weights_dir=str(tmp_path))
    with pytest.raises(bundle.BundleError, match="no weights"):
        bundle.load_bundle()


# ---------------------------------------------------------------- inference helpers
def test_blend_fill_and_paths(tmp_path, monkeypatch):
    import numpy as np
    import pandas as pd

    from lib.kaggle import bundle
    from lib.tasks.ich import infer
    from lib.tasks.ich.labels import SUBTYPES

    b = bundle.Bundle.from_run(fake_run(tmp_path / "run"))
    ids = pd.Index(["ID_a", "ID_b"], name="image_id")
    cnn = pd.DataFrame(0.2, index=ids, columns=list(SUBTYPES))
    seq = pd.DataFrame(0.6, index=ids[::-1], columns=list(SUBTYPES))
    seq.loc["ID_a", "epidural"] = 1.0
    out = infer.blend_test(b, {"cnn": cnn, "seq_pooled": seq, "seq_per_fold": seq * 0})
    assert out.loc["ID_a", "epidural"] == pytest.approx(0.25 * 0.2 + 0.75 * 1.0)
    assert out.loc["ID_a", "any"] == pytest.approx(0.8)  # any >= max(subtypes): the run kept the post-processing
    assert out.loc["ID_b", "any"] == pytest.approx(0.5)
    with pytest.raises(bundle.BundleError, match="were not predicted"):
        infer.blend_test(b, {"cnn": cnn})
    sample = tmp_path / "sample.csv"
    pd.DataFrame({"ID": [f"{i}_{s}" for i in ("ID_a", "ID_b", "ID_c") for s in SUBTYPES], "Label": 0.5}).to_csv(
        sample, index=False)
    filled, n = infer.fill_missing(out, sample)
    assert n == 1 and np.allclose(filled.loc["ID_c"].to_numpy(), out.mean().to_numpy())
    monkeypatch.delenv("KAGGLE_KERNEL_RUN_TYPE", raising=False)
    rp = infer.output_paths(tmp_path / "run")
    assert infer.submission_paths(rp) == [tmp_path / "run" / "inference" / "submission.csv"]
    with pytest.raises(ValueError, match="run_dir is empty"):
        infer.resolve_run_dir("")
    monkeypatch.setenv("KAGGLE_KERNEL_RUN_TYPE", "Batch")
    monkeypatch.setenv("KAGGLE_WORKING_DIR", str(tmp_path / "working"))
    assert infer.resolve_run_dir("") == tmp_path / "working"
    assert infer.submission_paths(rp)[-1] == tmp_path / "working" / "submission.csv"


def test_compare_with_run(tmp_path):
    import pandas as pd

    from lib.tasks.ich import infer

    own, new = tmp_path / "submission.csv", tmp_path / "new.csv"
    pd.DataFrame({"ID": ["ID_a_any", "ID_a_epidural"], "Label": [0.5, 0.1]}).to_csv(own, index=False)
    pd.DataFrame({"ID": ["ID_a_epidural", "ID_a_any"], "Label": [0.1, 0.75]}).to_csv(new, index=False)
    assert infer.compare_with_run(new, tmp_path, [new]) == pytest.approx(0.25)
    assert infer.compare_with_run(own, tmp_path, [own]) is None
    assert infer.compare_with_run(new, tmp_path / "elsewhere", [new]) is None


def test_requirements_report(tmp_path):
    from lib.tasks.ich import infer

    req = tmp_path / "requirements.txt"
    req.write_text("# pins\ntorch>=1.0  # any modern torch\ntimm<0.1\npylibjpeg-openjpeg>=99\njupyterlab>=1\n")
    rep = infer.requirements_report(req)
    assert list(rep.index) == ["torch", "timm", "pylibjpeg-openjpeg"]  # only what inference imports
    assert rep.loc["torch", "ok"] and not rep.loc["timm", "ok"] and not rep.loc["pylibjpeg-openjpeg", "ok"]
    assert rep.loc["timm", "installed"] is not None


def assert_kernel_source(notebook: Path) -> None:
    """A task's inference notebook can be a kernel: it declares the kernel parameters, has no outputs, one
    parameters cell, and ICH's bootstrap cell (the one sys.path edit) word for word."""
    from lib.run.runner import notebook_parameters

    declared = notebook_parameters(notebook)
    assert set(kg.kernel_parameters("c", "w", "h")) <= set(declared)
    nb = nbformat.read(notebook, as_version=4)
    assert all(not c.get("outputs") and c.get("id") for c in nb.cells if c.cell_type == "code")
    assert sum("parameters" in c.metadata.get("tags", []) for c in nb.cells) == 1
    edits = [line for c in nb.cells if c.cell_type == "code" for line in c.source.splitlines()
             if "sys.path." in line or "sys.path =" in line or "sys.path[" in line]
    assert edits == ["    sys.path.insert(0, str(attached(code_dataset)))"]  # the kernel bootstrap
    ich = nbformat.read(kg.NOTEBOOK, as_version=4)
    boot = [c.source for c in ich.cells if "def attached" in c.source]
    assert boot and boot == [c.source for c in nb.cells if "def attached" in c.source]  # the same bootstrap


def test_inference_notebook_declares_the_kernel_parameters():
    from lib.run.runner import notebook_parameters

    declared = notebook_parameters(kg.NOTEBOOK)
    assert set(kg.kernel_parameters("c", "w", "h")) <= set(declared)
    assert {"data_dir", "run_dir", "weights_dir"} <= set(declared)
    nb = nbformat.read(kg.NOTEBOOK, as_version=4)
    assert all(not c.get("outputs") and c.get("id") for c in nb.cells if c.cell_type == "code")
    edits = [line for c in nb.cells if c.cell_type == "code" for line in c.source.splitlines()
             if "sys.path." in line or "sys.path =" in line or "sys.path[" in line]
    assert edits == ["    sys.path.insert(0, str(attached(code_dataset)))"]  # the kernel bootstrap


# ---------------------------------------------------------------- the proof: an offline kernel on a simulated Kaggle
def proof_params(path: Path) -> Path:
    """params/smoke.yaml (the fastest full chain) plus the local `inference` stage, with an equal-weight blend of the
    CNN and both sequence strategies, so that both test-time averaging rules count in the submission."""
    import yaml

    cfg = yaml.safe_load((REPO / "params" / "ich" / "smoke.yaml").read_text())
    cfg["stages"]["sequence"]["strategies"] = ["pooled", "per_fold"]
    cfg["stages"]["ensemble"] = {"inputs": ["cnn", "seq_pooled", "seq_per_fold"], "method": "mean"}
    cfg["stages"].setdefault("inference", {"num_workers": 0})
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def _check_submission(path: Path, sample: Path) -> "Any":
    import numpy as np
    import pandas as pd

    sub, ref = pd.read_csv(path), pd.read_csv(sample)
    assert list(sub.columns) == ["ID", "Label"]
    assert sorted(sub["ID"]) == sorted(ref["ID"]) and not sub["ID"].duplicated().any()
    per_image = sub["ID"].str.rsplit("_", n=1).str[0].value_counts()
    assert (per_image == 6).all()
    assert np.isfinite(sub["Label"]).all() and sub["Label"].between(0, 1).all()
    return sub.set_index("ID")["Label"]


def kaggle_env(monkeypatch: "Any", inp: Path, work: Path, site: Path) -> None:
    """The environment of an offline Kaggle kernel run: the simulated /kaggle/input and /kaggle/working, no pip
    index (only the wheels dataset may serve pip), wheels installed into `site`."""
    for key in ("PIP_FIND_LINKS", "PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL"):  # only the wheels dataset may serve pip
        monkeypatch.delenv(key, raising=False)
    for key, value in {"KAGGLE_KERNEL_RUN_TYPE": "Batch", "KAGGLE_INPUT_ROOT": str(inp), "KAGGLE_WORKING_DIR":
                       str(work), "HF_HUB_OFFLINE": "1", "PIP_NO_INDEX": "1", "PIP_TARGET": str(site),
                       "PYTHONPATH": str(site), "PIP_CONFIG_FILE": os.devnull}.items():
        monkeypatch.setenv(key, value)


@pytest.mark.slow
def test_offline_kernel_on_simulated_kaggle_input(tmp_path, monkeypatch, kaggle_api):
    import time

    import papermill as pm

    from lib.run import runner as runner

    from lib.tasks.ich.phantom import generate

    data, run = tmp_path / "data", tmp_path / "outputs" / "kproof"
    generate(data, studies=8, seed=5, size=64, test_frac=0.25, slices=(8, 12), workers=1, progress=False)
    assert runner.main([str(proof_params(tmp_path / "kproof.yaml")), "--data", str(data), "--out", str(run)]) == 0
    assert set(json.loads((run / "metrics.json").read_text())["ensemble_weights"]) == {"cnn", "seq_pooled",
                                                                                      "seq_per_fold"}
    local = json.loads((run / "inference" / "inference.json").read_text())
    assert local["inference_vs_run_max_abs_diff"] < 1e-6  # the inference path reproduces the run's own blend
    own = _check_submission(run / "submission.csv", data / "stage_2_sample_submission.csv")

    # /kaggle/input: the competition (test DICOMs + sample submission only, in Kaggle's nested
    # <competition>/<competition>/ layout) and the three datasets
    inp, work, site = tmp_path / "kaggle" / "input", tmp_path / "kaggle" / "working", tmp_path / "site"
    comp = inp / COMPETITION / COMPETITION
    for folder in (comp, work, site):
        folder.mkdir(parents=True)
    (comp / "stage_2_test").symlink_to(data / "stage_2_test", target_is_directory=True)
    (comp / "stage_2_sample_submission.csv").symlink_to(data / "stage_2_sample_submission.csv")
    make_wheel(tmp_path / "wheelhouse")  # stands in for PyPI: nothing is downloaded
    datasets = {"code": kg.package_code(out=inp / kg.CODE_SLUG, user="tester"),
                "weights": kg.package_weights(run, out=inp / kg.weights_slug("kproof"), user="tester"),
                "wheels": kg.package_wheels(out=inp / kg.WHEELS_SLUG, packages=["rsna-offline-probe"],
                                            find_links=tmp_path / "wheelhouse", user="tester")}
    kernel = kg.build_kernel(run, "rsna-ich-kproof-infer", user="tester", out=tmp_path / "kernel",
                             extra={"num_workers": 0})
    captured: List[Any] = []
    api = offline_api(kaggle_api, captured)
    api.kernels_push(str(kernel))
    for folder in datasets.values():
        api.dataset_create_new(str(folder))
    assert captured[0].enable_internet is False and len(captured) == 4

    kaggle_env(monkeypatch, inp, work, site)
    t0 = time.time()
    pm.execute_notebook(str(kernel / "rsna-ich-kproof-infer.ipynb"), str(tmp_path / "kernel_executed.ipynb"),
                        cwd=str(work), kernel_name="python3", progress_bar=False)
    wall = time.time() - t0

    executed = nbformat.read(tmp_path / "kernel_executed.ipynb", as_version=4)
    boot = "".join(o.get("text", "") for c in executed.cells if "def attached" in c.source for o in c.outputs)
    assert f"Looking in links: {datasets['wheels']}\n" in boot and "Successfully installed rsna-offline-probe" in boot
    sub = _check_submission(work / "submission.csv", comp / "stage_2_sample_submission.csv")
    assert (sub - own.reindex(sub.index)).abs().max() < 1e-6  # same predictions as the training run
    info = json.loads((work / "inference" / "inference.json").read_text())
    assert Path(info["inference_code"]) == (datasets["code"] / "lib").resolve()  # lib came from the code dataset
    assert Path(info["inference_bundle"]) == datasets["weights"]
    assert (site / "rsna_offline_probe" / "__init__.py").is_file()  # the wheel was installed offline
    assert not (work / "inference" / "cache").exists()  # cleanup: the kernel's output holds no image cache
    sizes = {k: kg.folder_size(v) for k, v in datasets.items()}
    print(f"\nkaggle proof: dataset bytes {sizes}; kernel wall {wall:.1f} s (inference {info['inference_seconds']} s"
          f" for {info['inference_n_images']} test images)")


def test_inference_finds_the_repo_requirements_by_default():
    """The default requirements file is the repo's (the module moved into lib/tasks/ich once and lost it)."""
    from lib.tasks.ich import infer

    rep = infer.requirements_report()
    assert "torch" in rep.index and rep.loc["torch", "ok"]
