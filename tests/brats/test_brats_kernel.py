"""BraTS Kaggle kernel: the weights bundle of a run (fake run: tiny files), the kernel spec, the prior for an
unreadable test patient, the blend rule shared with the run, and (slow) the offline kernel on a simulated
/kaggle/input."""
from __future__ import annotations

import json
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
from lib.tasks.brats import infer, pipeline
from lib.tasks.brats.data import COMPETITION, BratsData
from lib.tasks.brats.phantom import generate
from lib.tasks.brats.preprocess import cache_key
from test_kaggle import (assert_kernel_source, kaggle_api, kaggle_env, make_wheel,  # noqa: F401  (a fixture)
                         offline_api)

REPO = Path(__file__).resolve().parents[2]
NOTEBOOK = REPO / "notebooks" / "brats" / "07_inference.ipynb"
MRIS = ("FLAIR", "T2w")


# ---------------------------------------------------------------- a fake BraTS run (what collect_weights reads)
def cls_cfg(**changes: Any) -> Dict[str, Any]:
    cfg = {"model": "cnn_lstm", "backbone": "resnet10t", "hidden": 8, "img_size": 32, "length": 8, "stride": 4,
           "epochs": 1, "lr": 1e-4, "bs": 4, "seed": 0, "pretrained_path": "/local/backbone.pth", "num_workers": 0,
           "device": "auto", "resume": True}
    return {**cfg, **changes}


def fake_run(root: Path, ks=(0, 1), method: str = "rank_mean", prior: Any = 0.375) -> Path:
    """A BraTS run dir with tiny stand-ins for every artefact the bundle reads."""
    rp = RunPaths.at(root)
    series = rp.cache_root / cache_key(32, "zscore_nonzero")
    series.mkdir(parents=True)
    (series / "meta.json").write_text(json.dumps({"size": 32, "normaliser": "zscore_nonzero", "dtype": "float16",
                                                  "version": 1}))
    rp.record("series_cache", series)
    seg = root / "models" / "seg" / "best.pth"
    seg.parent.mkdir(parents=True)
    torch.save({"model": {"w": torch.ones(2, 2)}, "cfg": {"arch": "unet", "encoder": "resnet18", "img_size": 32}},
               seg)
    rp.record("seg_model", seg)
    (root / "stacks" / "train").mkdir(parents=True)
    (root / "stacks" / "train" / "meta.json").write_text(json.dumps(
        {"model": pipeline._model_identity(seg), "zoom": 1.2, "threshold": 0.5, "min_ratio": 0.025,
         "max_contours": 5}))
    pd.DataFrame({"BraTS21ID": [f"{i:05d}" for i in range(4 * len(ks))],
                  "fold": [i % len(ks) for i in range(4 * len(ks))]}).to_csv(rp.folds, index=False)
    for mri in MRIS:
        for k in ks:
            d = root / "models" / "cls" / f"cnn_lstm_{mri}_fold{k}"
            d.mkdir(parents=True)
            torch.save({"model": {"w": torch.full((3,), float(k))}, "epoch": 0, "valid_auc": 0.5 + k / 10,
                        "cfg": cls_cfg(device="cuda" if k else "auto")}, d / "best.pth")
        pipeline.mask_ratio_model_path(rp, mri).parent.mkdir(parents=True, exist_ok=True)
        pipeline.mask_ratio_model_path(rp, mri).write_text(json.dumps(
            {"mri": mri, "folds": {str(k): {"coef": 1.0 + k, "intercept": -0.5} for k in ks}}))
    (root / "manifest.json").write_text(json.dumps({"run": "fake", "task": "brats", "git_commit": "abc123", "stages": [
        {"stage": "predict_masks", "params": {"data_dir": "/d", "run_dir": str(root), "zoom": 1.2, "bs": 64}}]}))
    inputs = [f"cnn_lstm_{m}" for m in MRIS] + [f"mask_ratio_{m}" for m in MRIS]
    rp.update_metrics({"ensemble_inputs": inputs, "ensemble_method": method, "ensemble_best": None,
                       "oof_auc": 0.61, "oof_auc_FLAIR": 0.6, "cls_model": "cnn_lstm", "n_series_test": 8})
    if prior is not None:
        rp.update_metrics({"submission_prior": prior})
    return root


# ---------------------------------------------------------------- the bundle
def test_collect_weights_manifest(tmp_path):
    run = fake_run(tmp_path / "run")
    manifest, files = infer.collect_weights(run)
    assert sorted(files) == sorted(["seg.pth", "mask_ratio_FLAIR.json", "mask_ratio_T2w.json"]
                                   + [f"cls_cnn_lstm_{m}_fold{k}.pth" for m in MRIS for k in (0, 1)])
    assert files["cls_cnn_lstm_T2w_fold1.pth"] == run / "models" / "cls" / "cnn_lstm_T2w_fold1" / "best.pth"
    assert files["seg.pth"] == run / "models" / "seg" / "best.pth"
    assert manifest["task"] == "brats" and manifest["git_commit"] == "abc123" and manifest["run"] == "fake"
    assert manifest["preprocess"]["size"] == 32 and manifest["preprocess"]["normaliser"] == "zscore_nonzero"
    assert manifest["seg"]["masks"] == {"zoom": 1.2, "threshold": 0.5, "min_ratio": 0.025, "max_contours": 5}
    assert (manifest["seg"]["arch"], manifest["seg"]["encoder"]) == ("unet", "resnet18")
    cls = manifest["classifiers"]["cnn_lstm_FLAIR"]
    assert (cls["model"], cls["mri"], cls["folds"]) == ("cnn_lstm", "FLAIR", [0, 1])
    assert cls["cfg"]["backbone"] == "resnet10t" and cls["valid_auc"] == {"0": 0.5, "1": 0.6}
    assert sorted(manifest["mask_ratio"]) == ["mask_ratio_FLAIR", "mask_ratio_T2w"]
    assert manifest["blend"] == {"inputs": ["cnn_lstm_FLAIR", "cnn_lstm_T2w", "mask_ratio_FLAIR", "mask_ratio_T2w"],
                                 "method": "rank_mean", "best": None}
    assert manifest["prior"] == 0.375 and "submission_prior" in manifest["prior_source"]
    assert manifest["metrics"] == {"oof_auc": 0.61, "oof_auc_FLAIR": 0.6}
    assert "run_dir" not in manifest["params"]["predict_masks"]
    manifest, _ = infer.collect_weights(fake_run(tmp_path / "old", prior=None))
    assert manifest["prior"] == 0.5 and manifest["prior_source"] == "default 0.5"


def test_collect_weights_needs_every_fold_model(tmp_path):
    run = fake_run(tmp_path / "run")
    (run / "models" / "cls" / "cnn_lstm_T2w_fold1" / "best.pth").unlink()
    with pytest.raises(BundleError, match=r"classifier cnn_lstm_T2w fold 1: .*cnn_lstm_T2w_fold1/best.pth is missing"):
        infer.collect_weights(run)
    with pytest.raises(BundleError, match="fold 1"):
        kg.build_kernel(run, "rsna-brats-fake-infer", out=tmp_path / "k")  # no kernel for a run that cannot ship


@pytest.mark.parametrize("change, match", [
    (lambda r: RunPaths.at(r).update_metrics({"ensemble_inputs": None}), "run the ensemble stage"),
    (lambda r: RunPaths.at(r).update_metrics({"ensemble_inputs": ["other:cnn_lstm_FLAIR"]}), "other runs"),
    (lambda r: RunPaths.at(r).update_metrics({"ensemble_method": "best"}), "ensemble_best None"),
    (lambda r: RunPaths.at(r).update_metrics({"ensemble_method": "median"}), "no test-time rule"),
    (lambda r: (r / "models" / "mask_ratio" / "T2w.json").unlink(), "mask_ratio_T2w.*T2w.json is missing"),
    (lambda r: torch.save({"model": {}, "cfg": {"arch": "unet", "encoder": "resnet34"}},
                          r / "models" / "seg" / "best.pth"), "rerun predict_masks"),
    (lambda r: (r / "artefacts.json").write_text("{}"), "no .seg_model. artefact recorded: run the train_seg"),
    (lambda r: torch.save({"model": {}, "valid_auc": 0.5, "cfg": cls_cfg(backbone="resnet18")},
                          r / "models" / "cls" / "cnn_lstm_FLAIR_fold1" / "best.pth"), "configs differ"),
    (lambda r: (r / "manifest.json").write_text(json.dumps({"task": "ich"})), "is a 'ich' run"),
])
def test_collect_weights_rejects(tmp_path, change, match):
    run = fake_run(tmp_path / "run")
    change(run)
    with pytest.raises(BundleError, match=match):
        infer.collect_weights(run)


def test_package_weights_takes_the_task_from_the_run(tmp_path, kaggle_api):  # noqa: F811
    run = fake_run(tmp_path / "outputs" / "fake")
    folder = kg.package_weights(run, out=tmp_path / "w", user="tester")
    names = sorted(p.name for p in folder.iterdir())
    assert "seg.pth" in names and "mask_ratio_T2w.json" in names and "cls_cnn_lstm_FLAIR_fold0.pth" in names
    assert json.loads((folder / "dataset-metadata.json").read_text())["id"] == "tester/rsna-brats-weights-fake"
    b = load_bundle(weights_dir=str(folder), task="brats")
    assert infer.check_bundle(b) is b and b.manifest["kind"] == "weights" and b.manifest["prior"] == 0.375
    assert torch.equal(torch.load(b.path("cls_cnn_lstm_T2w_fold1.pth"), weights_only=True)["model"]["w"],
                       torch.ones(3))
    with pytest.raises(BundleError, match="weights of task 'brats', not 'ich'"):
        load_bundle(weights_dir=str(folder), task="ich")
    with pytest.raises(ValueError, match="records task 'brats'"):
        kg.package_weights(run, out=tmp_path / "w2", task="ich")
    half = kg.package_weights(run, out=tmp_path / "h", half=True)
    assert torch.load(half / "cls_cnn_lstm_T2w_fold1.pth", weights_only=True)["model"]["w"].dtype == torch.float16
    assert json.loads((half / "mask_ratio_T2w.json").read_text())["mri"] == "T2w"  # plain copies stay plain
    captured: List[Any] = []
    offline_api(kaggle_api, captured).dataset_create_new(str(folder))
    assert captured[-1].slug == "rsna-brats-weights-fake"


def test_kernel_spec_per_task(monkeypatch):
    ks = kg.kernel_spec("brats")
    assert ks.notebook == NOTEBOOK and (ks.code_slug, ks.wheels_slug) == ("rsna-brats-code", "rsna-brats-wheels")
    assert ks.collector() is infer.collect_weights
    assert {"segmentation-models-pytorch>=0.5,<0.6", "monai>=1.3,<2"} <= set(ks.wheels)
    ich = kg.kernel_spec()
    assert (ich.notebook, ich.code_slug, ich.wheels_slug, ich.wheels) == (kg.NOTEBOOK, kg.CODE_SLUG, kg.WHEELS_SLUG,
                                                                          kg.KAGGLE_MISSING)
    from dataclasses import replace

    from lib.tasks import get_task

    bare = replace(get_task("brats"), extra={})
    with monkeypatch.context() as m:
        m.setattr(kg, "get_task", lambda name=None: bare)
        with pytest.raises(ValueError, match="'brats' declares no Kaggle kernel"):
            kg.kernel_spec("brats")
    with pytest.raises(KeyError, match="unknown task"):
        kg.kernel_spec("nope")


def test_cli_package_wheels_dry_run_uses_the_task_list(capsys):
    assert kg.main(["package-wheels", "--task", "brats", "--dry-run"]) == 0
    cmd = capsys.readouterr().out
    assert "segmentation-models-pytorch>=0.5,<0.6" in cmd and "monai>=1.3,<2" in cmd and "pylibjpeg>=2.0,<3" in cmd


# ---------------------------------------------------------------- test-time pieces
def test_blend_is_the_runs_rule(tmp_path):
    b = Bundle.from_run(fake_run(tmp_path / "run", method="rank_mean"), infer.collect_weights)
    preds = {"cnn_lstm_FLAIR": pd.Series({"00001": 0.2, "00002": 0.9, "00003": 0.4}),
             "cnn_lstm_T2w": pd.Series({"00002": 0.1, "00003": 0.3}),
             "mask_ratio_FLAIR": pd.Series(dtype=float), "mask_ratio_T2w": pd.Series({"00001": 0.7})}
    out = infer.blend_test(b, preds)
    # percentile ranks within each input over the patients it predicts, averaged over the inputs that have them
    assert out.to_dict() == pytest.approx({"00001": (1 / 3 + 1) / 2, "00002": (1 + 0.5) / 2, "00003": (2 / 3 + 1) / 2})
    with pytest.raises(BundleError, match=r"\['mask_ratio_T2w'\] were not predicted"):
        infer.blend_test(b, {k: v for k, v in preds.items() if k != "mask_ratio_T2w"})
    mean = Bundle.from_run(fake_run(tmp_path / "run2", method="mean"), infer.collect_weights)
    assert infer.blend_test(mean, preds)["00001"] == pytest.approx((0.2 + 0.7) / 2)


def test_mask_ratio_predict_matches_sklearn():
    from sklearn.linear_model import LogisticRegression

    x = np.array([0.1, 0.3, 0.2, 0.6, 0.5, 0.9])
    clfs = [LogisticRegression().fit(x[:, None], [0, 0, 1, 1, 0, 1]), LogisticRegression(C=0.1).fit(
        x[:, None], [0, 1, 0, 1, 1, 1])]
    folds = {str(k): {"coef": float(c.coef_[0, 0]), "intercept": float(c.intercept_[0])} for k, c in enumerate(clfs)}
    feats = pd.Series([0.05, 0.4, 1.2], index=["00001", "00002", "00003"])
    want = np.mean([c.predict_proba(feats.to_numpy()[:, None])[:, 1] for c in clfs], axis=0)
    assert np.allclose(pipeline.mask_ratio_predict(folds, feats).to_numpy(), want, atol=1e-12)
    assert pipeline.mask_ratio_predict(folds, pd.Series(dtype=float)).empty


def break_patient(test_dir: Path, pid: str) -> None:
    """Truncate every DICOM of one test patient to 64 bytes: unreadable."""
    for f in (test_dir / pid).rglob("*.dcm"):
        f.write_bytes(f.read_bytes()[:64])


def test_unreadable_test_patient_gets_the_prior(tmp_path, monkeypatch):
    monkeypatch.delenv("KAGGLE_KERNEL_RUN_TYPE", raising=False)
    generate(tmp_path / "data", patients=14, seed=3, size=32, slices=(12, 12), progress=False)
    comp = tmp_path / "comp"  # the bare Kaggle download: test/ and sample_submission.csv only
    shutil.copytree(tmp_path / "data" / "task2" / "test", comp / "test")
    shutil.copy(tmp_path / "data" / "task2" / "sample_submission.csv", comp)
    data = BratsData.at(comp).check(need_task1=False, need_train=False)
    with pytest.raises(FileNotFoundError, match="train_labels"):
        BratsData.at(comp).check(need_task1=False)
    ids = pd.read_csv(comp / "sample_submission.csv", dtype={"BraTS21ID": str})["BraTS21ID"].tolist()
    assert len(ids) >= 2
    break_patient(comp / "test", ids[0])
    b = Bundle.from_run(fake_run(tmp_path / "run", prior=0.375), infer.collect_weights)
    rp = infer.output_paths(tmp_path / "run")
    series, bad = infer.prepare_test(data, rp, b, workers=1, progress=False)
    assert set(bad["BraTS21ID"]) == {ids[0]} and len(bad) == 4
    assert infer.unread_patients(data, series) == [ids[0]] and set(series["BraTS21ID"]) == set(ids[1:])
    assert rp.lookup("seg_model") == b.path("seg.pth")
    pred = pd.Series({i: 0.9 for i in ids[1:]})  # what the blend gives the readable patients
    written, n_prior = infer.write_submissions(b, pred, data, rp)
    sub = pd.read_csv(written[0], dtype={"BraTS21ID": str})
    assert written == [rp.submission] and n_prior == 1 and sub["BraTS21ID"].tolist() == ids
    assert sub.set_index("BraTS21ID")["MGMT_value"].to_dict() == {ids[0]: 0.375, **{i: 0.9 for i in ids[1:]}}


def test_inference_notebook_is_a_kernel_source():
    assert_kernel_source(NOTEBOOK)


# ---------------------------------------------------------------- the proof: an offline kernel on a simulated Kaggle
def proof_params(path: Path) -> Path:
    """params/brats/smoke.yaml without eda / report, a `mean` blend (a patient's value does not depend on which
    other patients are in the test set, so the run's submission can be compared patient by patient after one test
    patient is broken in the kernel's copy) and the local `inference` stage."""
    import yaml

    cfg = yaml.safe_load((REPO / "params" / "brats" / "smoke.yaml").read_text())
    for stage in ("eda", "report"):
        cfg["stages"].pop(stage, None)
    cfg["stages"]["ensemble"] = {"method": "mean"}
    cfg["stages"]["inference"] = {"num_workers": 0, "workers": 1, "device": "cpu"}
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def _submission(path: Path, sample: Path) -> pd.Series:
    sub, ref = pd.read_csv(path, dtype={"BraTS21ID": str}), pd.read_csv(sample, dtype={"BraTS21ID": str})
    assert list(sub.columns) == ["BraTS21ID", "MGMT_value"]
    assert sub["BraTS21ID"].tolist() == ref["BraTS21ID"].tolist()  # the sample's IDs, in its order
    assert sub["BraTS21ID"].str.fullmatch(r"[0-9]{5}").all()  # zero-padded strings, never ints
    assert np.isfinite(sub["MGMT_value"]).all() and sub["MGMT_value"].between(0, 1).all()
    return sub.set_index("BraTS21ID")["MGMT_value"]


@pytest.mark.slow
def test_offline_kernel_on_simulated_kaggle_input(tmp_path, monkeypatch, kaggle_api):  # noqa: F811
    import time

    import papermill as pm

    from lib.run import runner

    data, run = tmp_path / "data", tmp_path / "outputs" / "bkproof"
    generate(data, patients=14, seed=3, size=32, slices=(12, 12), progress=False)
    assert runner.main([str(proof_params(tmp_path / "bkproof.yaml")), "--data", str(data), "--out", str(run)]) == 0
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["ensemble_method"] == "mean" and len(metrics["ensemble_inputs"]) == 4
    local = json.loads((run / "inference" / "inference.json").read_text())
    assert local["inference_vs_run_max_abs_diff"] < 1e-6  # the inference stage reproduces the run's own blend
    own = _submission(run / "submission.csv", data / "task2" / "sample_submission.csv")

    # /kaggle/input: the competition (test/ + sample_submission.csv only, Kaggle's nested <comp>/<comp>/ layout),
    # one test patient broken in the copy, and the three datasets
    inp, work, site = tmp_path / "kaggle" / "input", tmp_path / "kaggle" / "working", tmp_path / "site"
    comp = inp / COMPETITION / COMPETITION
    for folder in (comp, work, site):
        folder.mkdir(parents=True)
    shutil.copytree(data / "task2" / "test", comp / "test")
    shutil.copy(data / "task2" / "sample_submission.csv", comp)
    broken = own.index[0]
    break_patient(comp / "test", broken)
    make_wheel(tmp_path / "wheelhouse")  # stands in for PyPI: nothing is downloaded
    ks = kg.kernel_spec("brats")
    datasets = {"code": kg.package_code(out=inp / ks.code_slug, slug=ks.code_slug, user="tester", task="brats"),
                "weights": kg.package_weights(run, out=inp / kg.weights_slug("bkproof", ks.weights_prefix),
                                              user="tester"),
                "wheels": kg.package_wheels(out=inp / ks.wheels_slug, slug=ks.wheels_slug,
                                            packages=["rsna-offline-probe"], find_links=tmp_path / "wheelhouse",
                                            user="tester")}
    kernel = kg.build_kernel(run, "rsna-brats-bkproof-infer", user="tester", out=tmp_path / "kernel",
                             extra={"num_workers": 0, "workers": 1, "device": "cpu"})
    captured: List[Any] = []
    api = offline_api(kaggle_api, captured)
    api.kernels_push(str(kernel))
    for folder in datasets.values():
        api.dataset_create_new(str(folder))
    push = captured[0]
    assert push.enable_internet is False and push.competition_data_sources == [COMPETITION] and len(captured) == 4
    assert sorted(push.dataset_data_sources) == sorted(f"tester/{s}" for s in (
        ks.code_slug, ks.wheels_slug, "rsna-brats-weights-bkproof"))

    kaggle_env(monkeypatch, inp, work, site)
    t0 = time.time()
    pm.execute_notebook(str(kernel / "rsna-brats-bkproof-infer.ipynb"), str(tmp_path / "kernel_executed.ipynb"),
                        cwd=str(work), kernel_name="python3", progress_bar=False)
    wall = time.time() - t0

    executed = nbformat.read(tmp_path / "kernel_executed.ipynb", as_version=4)
    boot = "".join(o.get("text", "") for c in executed.cells if "def attached" in c.source for o in c.outputs)
    assert "Successfully installed rsna-offline-probe" in boot and (site / "rsna_offline_probe").is_dir()
    sub = _submission(work / "submission.csv", comp / "sample_submission.csv")
    info = json.loads((work / "inference" / "inference.json").read_text())
    assert Path(info["inference_code"]) == (datasets["code"] / "lib").resolve()  # lib came from the code dataset
    assert Path(info["inference_bundle"]) == datasets["weights"]
    assert info["inference_unread_patients"] == [broken] and info["inference_n_prior"] == 1
    assert sub[broken] == pytest.approx(metrics["submission_prior"])  # the unreadable patient gets the prior
    rest = sub.index.drop(broken)
    assert len(rest) >= 1 and (sub[rest] - own[rest]).abs().max() < 1e-6  # same predictions as the training run
    assert not (work / "inference" / "cache").exists() and not (work / "inference" / "stacks").exists()  # cleanup
    sizes = {k: kg.folder_size(v) for k, v in datasets.items()}
    print(f"\nbrats kaggle proof: dataset bytes {sizes}; kernel wall {wall:.1f} s (inference "
          f"{info['inference_seconds']} s for {info['inference_n_patients']} readable test patients)")
