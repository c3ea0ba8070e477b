"""Cervical-spine Kaggle kernel: the weights bundle of a real smoke run (both classifiers, a tuned blend, the
local `inference` stage) and its refusals, the kernel spec, the ensemble record, and (slow) the offline kernel on a
simulated /kaggle/input whose test.csv does not match test_images/ and which holds one unreadable study."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Dict, List

import nbformat
import numpy as np
import pandas as pd
import pytest
import torch

from lib.kaggle import package as kg
from lib.kaggle.bundle import Bundle, BundleError, load_bundle
from lib.paths import RunPaths
from lib.tasks.cspine import infer, pipeline
from lib.tasks.cspine.data import COMPETITION, CspineData, read_train_labels
from lib.tasks.cspine.metric import CSPINE_GROUP, CSPINE_LABELS
from lib.tasks.cspine.phantom import generate
from test_kaggle import (assert_kernel_source, kaggle_api, kaggle_env, make_wheel,  # noqa: F401  (a fixture)
                         offline_api)

REPO = Path(__file__).resolve().parents[2]
NOTEBOOK = REPO / "notebooks" / "cspine" / "07_inference.ipynb"
RUN_NAME = "ckproof"


def proof_params(path: Path) -> Path:
    """params/cspine/smoke.yaml without eda / report, both classifier designs, a tuned blend (coarse grid) and the
    local `inference` stage."""
    import yaml

    cfg = yaml.safe_load((REPO / "params" / "cspine" / "smoke.yaml").read_text())
    for stage in ("eda", "report"):
        cfg["stages"].pop(stage)
    cfg["stages"]["train_cls"].update(models=["twofive_lstm", "csn3d"], csn_backbone="ir_csn_26")
    cfg["stages"]["ensemble"] = {"method": "tuned", "step": 0.5}
    cfg["stages"]["inference"] = {"num_workers": 0, "workers": 1, "device": "cpu"}
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def proof_run(tmp_path_factory) -> Dict[str, Path]:
    """A finished smoke run (data, run dir) made through the runner, inference stage included (about a minute)."""
    from lib.run import runner

    root = tmp_path_factory.mktemp("cspine_kernel")
    data, run = root / "data", root / "outputs" / RUN_NAME
    generate(data, studies=16, seed=4, size=48, slices=(16, 22), test_studies=3, progress=False)
    os.environ.setdefault("MPLBACKEND", "Agg")
    assert runner.main([str(proof_params(root / f"{RUN_NAME}.yaml")), "--data", str(data), "--out", str(run)]) == 0
    return {"data": data, "run": run}


def copy_run(proof_run: Dict[str, Path], dst: Path) -> Path:
    run = shutil.copytree(proof_run["run"], dst, copy_function=shutil.copy2)  # copy2 keeps the seg model's mtime
    artefacts = (run / "artefacts.json").read_text().replace(str(proof_run["run"]), str(run))
    (run / "artefacts.json").write_text(artefacts)
    return run


def blended(run: Path) -> List[str]:
    return [m for m, w in json.loads((run / "models" / "ensemble.json").read_text())["weights"].items() if w > 0]


# ---------------------------------------------------------------- the bundle
@pytest.mark.slow  # the module's smoke run (about a minute, once)
def test_collect_weights_manifest(proof_run):
    run, data = proof_run["run"], proof_run["data"]
    manifest, files = infer.collect_weights(run)
    models = blended(run)
    assert models and set(models) <= {"twofive_lstm", "csn3d"}
    assert sorted(files) == sorted(["seg3d.pth", "ensemble.json"] + [f"cls_{m}_fold{k}.pth" for m in models
                                                                       for k in (0, 1)])
    assert files["seg3d.pth"] == RunPaths.at(run).lookup("seg_model")
    assert files[f"cls_{models[0]}_fold1.pth"] == run / "models" / "cspine" / f"{models[0]}_fold1" / "best.pth"
    assert manifest["task"] == "cspine" and manifest["run"] == RUN_NAME
    assert manifest["volumes"]["size"] == [16, 32, 32] and manifest["volumes"]["dtype"] == "uint8"
    assert manifest["seg"]["arch"] == "unet" and manifest["seg"]["roi"] == [16, 32, 32]
    assert manifest["seg"]["overlap"] == 0.25
    crops = manifest["crops"]
    assert (crops["n_slices"], crops["size"], crops["threshold"]) == (8, 24, 0.3) and crops["expected_mm3"]
    assert sorted(manifest["classifiers"]) == sorted(models)
    assert manifest["classifiers"][models[0]]["folds"] == [0, 1]
    labels = read_train_labels(data / "train.csv")
    assert manifest["prior"] == pytest.approx(labels[list(CSPINE_LABELS)].mean().to_dict())
    metrics = json.loads((run / "metrics.json").read_text())
    assert manifest["metrics"]["oof_logloss"] == metrics["oof_logloss"] and "seg_valid_dice" in manifest["metrics"]
    assert "run_dir" not in manifest["params"]["train_cls"]
    local = json.loads((run / "inference" / "inference.json").read_text())
    assert local["inference_vs_run_max_abs_diff"] < 1e-6  # the inference stage reproduces the run's submission
    assert local["inference_n_studies"] == 3 and local["inference_n_prior"] == 0


def _retrain_seg(run: Path) -> None:
    seg = RunPaths.at(run).lookup("seg_model")
    os.utime(seg, ns=(seg.stat().st_atime_ns, seg.stat().st_mtime_ns + 10**9))


def _other_cfg(run: Path) -> None:
    model = blended(run)[0]
    path = run / "models" / "cspine" / f"{model}_fold1" / "best.pth"
    ckpt = torch.load(path, weights_only=True)
    torch.save({**ckpt, "cfg": {**ckpt["cfg"], "lr": 0.5}}, path)


@pytest.mark.slow
@pytest.mark.parametrize("change, match", [
    (lambda r: (r / "models" / "ensemble.json").unlink(), "ensemble.json is missing: run the ensemble stage"),
    (lambda r: (r / "models" / "ensemble.json").write_text(json.dumps({"weights": {"other": 1.0}})),
     "not an ensemble record"),
    (lambda r: (r / "models" / "ensemble.json").write_text(json.dumps(
        {**json.loads((r / "models" / "ensemble.json").read_text()), "weights": {"resnet_other": 1.0}})),
     "not a classifier of this run"),
    (_retrain_seg, "rerun the crops stage"),
    (lambda r: (r / "models" / "cspine" / f"{blended(r)[0]}_fold1" / "best.pth").unlink(), "fold 1: .*missing"),
    (_other_cfg, "configs differ"),
    (lambda r: (r / "crops" / "train" / "crops_meta.json").unlink(), "crops_meta.json is missing"),
    (lambda r: (r / "manifest.json").write_text(json.dumps({"task": "brats"})), "is a 'brats' run"),
])
def test_collect_weights_rejects(proof_run, tmp_path, change, match):
    run = copy_run(proof_run, tmp_path / "run")
    infer.collect_weights(run)  # the copy is a valid run before the change
    change(run)
    with pytest.raises(BundleError, match=match):
        infer.collect_weights(run)


@pytest.mark.slow  # the module's smoke run (about a minute, once)
def test_package_weights_half_and_the_kernel_spec(proof_run, tmp_path, kaggle_api):  # noqa: F811
    folder = kg.package_weights(proof_run["run"], out=tmp_path / "w", user="tester", half=True)
    assert json.loads((folder / "dataset-metadata.json").read_text())["id"] == f"tester/rsna-cspine-weights-{RUN_NAME}"
    b = infer.check_bundle(load_bundle(weights_dir=str(folder), task="cspine"))
    model = blended(proof_run["run"])[0]
    for name in ("seg3d.pth", f"cls_{model}_fold0.pth"):  # the large checkpoints as float16
        w = torch.load(b.path(name), weights_only=True)["model"]
        assert {v.dtype for v in w.values() if v.is_floating_point()} == {torch.float16}, name
    assert pipeline.read_ensemble(b.path("ensemble.json")) == pipeline.read_ensemble(
        proof_run["run"] / "models" / "ensemble.json")  # plain copies stay plain
    with pytest.raises(BundleError, match="weights of task 'cspine', not 'brats'"):
        load_bundle(weights_dir=str(folder), task="brats")
    captured: List[Any] = []
    offline_api(kaggle_api, captured).dataset_create_new(str(folder))
    assert captured[-1].slug == f"rsna-cspine-weights-{RUN_NAME}"
    ks = kg.kernel_spec("cspine")
    assert ks.notebook == NOTEBOOK and (ks.code_slug, ks.wheels_slug) == ("rsna-cspine-code", "rsna-cspine-wheels")
    assert ks.collector() is infer.collect_weights and "monai>=1.3,<2" in ks.wheels


@pytest.mark.slow  # the module's smoke run (about a minute, once)
def test_ensemble_record_is_what_the_run_applied(proof_run):
    """apply_ensemble on the run's own test predictions gives the run's submission (all 8 labels)."""
    run = proof_run["run"]
    rp = RunPaths.at(run)
    record = pipeline.read_ensemble(pipeline.ensemble_path(rp))
    tests = {m: pipeline.read_prediction(rp, "test", m) for m in record["weights"]}
    wide = pipeline.apply_ensemble(tests, record).set_index(CSPINE_GROUP)
    sub = pd.read_csv(run / "submission.csv").set_index("row_id")["fractured"]
    got = pd.Series({f"{s}_{c}": wide.at[s, c] for s in wide.index for c in CSPINE_LABELS})
    assert len(got) == 24 and np.allclose(got.to_numpy(), sub.reindex(got.index).to_numpy(), atol=1e-12)
    with pytest.raises(KeyError, match="no test predictions"):
        pipeline.apply_ensemble({}, record)


def test_inference_notebook_is_a_kernel_source():
    assert_kernel_source(NOTEBOOK)


# ---------------------------------------------------------------- the proof: an offline kernel on a simulated Kaggle
def _submission(path: Path, studies: List[str]) -> pd.Series:
    sub = pd.read_csv(path)
    assert list(sub.columns) == ["row_id", "fractured"]
    assert sub["row_id"].tolist() == [f"{s}_{c}" for s in studies for c in CSPINE_LABELS]  # 8 rows per study
    assert np.isfinite(sub["fractured"]).all() and sub["fractured"].between(0, 1).all()
    return sub.set_index("row_id")["fractured"]


@pytest.mark.slow
def test_offline_kernel_on_simulated_kaggle_input(proof_run, tmp_path, monkeypatch, kaggle_api):  # noqa: F811
    import time

    import papermill as pm

    data, run = proof_run["data"], proof_run["run"]
    own = pd.read_csv(run / "submission.csv").set_index("row_id")["fractured"]

    # /kaggle/input: the competition's test side (Kaggle's nested <comp>/<comp>/ layout) with the phantom's
    # mismatched test.csv, one test study made unreadable in the copy, and the three datasets
    inp, work, site = tmp_path / "kaggle" / "input", tmp_path / "kaggle" / "working", tmp_path / "site"
    comp = inp / COMPETITION / COMPETITION
    for folder in (comp, work, site):
        folder.mkdir(parents=True)
    shutil.copytree(data / "test_images", comp / "test_images")
    for name in ("test.csv", "sample_submission.csv"):
        shutil.copy(data / name, comp)
    studies = list(CspineData.at(comp).test_studies())
    named = list(dict.fromkeys(pd.read_csv(comp / "test.csv", dtype=str)[CSPINE_GROUP]))
    assert set(named) - set(studies) and set(studies) - set(named)  # test.csv names an absent study, misses one
    broken = studies[0]
    for f in (comp / "test_images" / broken).glob("*.dcm"):
        f.write_bytes(b"not a dicom")
    make_wheel(tmp_path / "wheelhouse")  # stands in for PyPI: nothing is downloaded
    ks = kg.kernel_spec("cspine")
    datasets = {"code": kg.package_code(out=inp / ks.code_slug, slug=ks.code_slug, user="tester", task="cspine"),
                "weights": kg.package_weights(run, out=inp / kg.weights_slug(RUN_NAME, ks.weights_prefix),
                                              user="tester"),
                "wheels": kg.package_wheels(out=inp / ks.wheels_slug, slug=ks.wheels_slug,
                                            packages=["rsna-offline-probe"], find_links=tmp_path / "wheelhouse",
                                            user="tester")}
    kernel = kg.build_kernel(run, f"rsna-cspine-{RUN_NAME}-infer", user="tester", out=tmp_path / "kernel",
                             extra={"num_workers": 0, "workers": 1, "device": "cpu"})
    captured: List[Any] = []
    api = offline_api(kaggle_api, captured)
    api.kernels_push(str(kernel))
    for folder in datasets.values():
        api.dataset_create_new(str(folder))
    push = captured[0]
    assert push.enable_internet is False and push.competition_data_sources == [COMPETITION] and len(captured) == 4
    assert sorted(push.dataset_data_sources) == sorted(f"tester/{s}" for s in (
        ks.code_slug, ks.wheels_slug, f"rsna-cspine-weights-{RUN_NAME}"))

    kaggle_env(monkeypatch, inp, work, site)
    t0 = time.time()
    pm.execute_notebook(str(kernel / f"rsna-cspine-{RUN_NAME}-infer.ipynb"), str(tmp_path / "kernel_executed.ipynb"),
                        cwd=str(work), kernel_name="python3", progress_bar=False)
    wall = time.time() - t0

    executed = nbformat.read(tmp_path / "kernel_executed.ipynb", as_version=4)
    boot = "".join(o.get("text", "") for c in executed.cells if "def attached" in c.source for o in c.outputs)
    assert "Successfully installed rsna-offline-probe" in boot and (site / "rsna_offline_probe").is_dir()
    sub = _submission(work / "submission.csv", studies)  # every study present, test.csv's order first
    info = json.loads((work / "inference" / "inference.json").read_text())
    assert Path(info["inference_code"]) == (datasets["code"] / "lib").resolve()  # lib came from the code dataset
    assert Path(info["inference_bundle"]) == datasets["weights"]
    assert info["inference_unread_studies"] == [broken] and info["inference_n_prior"] == 1
    prior = json.loads((run / "models" / "ensemble.json").read_text())["prior"]
    assert sub[[f"{broken}_{c}" for c in CSPINE_LABELS]].tolist() == pytest.approx([prior[c] for c in CSPINE_LABELS])
    rest = [r for r in sub.index if not r.startswith(broken + "_")]
    assert len(rest) == 8 * (len(studies) - 1) and (sub[rest] - own[rest]).abs().max() < 1e-6  # the run's values
    assert not any((work / "inference" / d).exists() for d in ("cache", "masks", "crops"))  # cleanup
    sizes = {k: kg.folder_size(v) for k, v in datasets.items()}
    print(f"\ncspine kaggle proof: dataset bytes {sizes}; kernel wall {wall:.1f} s (inference "
          f"{info['inference_seconds']} s for {len(studies)} test studies, one unreadable)")


@pytest.mark.slow  # the module's smoke run (about a minute, once)
def test_bundle_from_run_is_the_default(proof_run):
    b = load_bundle(run_dir=str(proof_run["run"]), collect=infer.collect_weights)
    assert isinstance(b, Bundle) and infer.check_bundle(b).manifest["task"] == "cspine"
    ich = Bundle({"format": 1}, {}, "x")
    with pytest.raises(BundleError, match="holds 'ich' weights, not cspine"):
        infer.check_bundle(ich)
