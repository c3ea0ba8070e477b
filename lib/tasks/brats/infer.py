"""Test-only BraTS inference from a weights bundle: the path of the BraTS Kaggle kernel (notebooks/brats/
07_inference.ipynb), and `collect_weights`, the bundle of a finished run (the spec's extra["kernel"] names it).

The bundle holds the stage-1 segmentation model (`seg.pth`), every fold model of each MRI type's classifier
(`cls_<model>_<mri>_fold<k>.pth`, with its ClsConfig), the mask-ratio baseline's fold regressions
(`mask_ratio_<mri>.json`) when the blend uses them, and a manifest: the series cache's size and normaliser, the
mask-prediction parameters (zoom, threshold, min_ratio, max_contours, as the run's stacks were made), the blend
(inputs, method, the chosen input of `best`), the prior, OOF metrics, stage params, git commit.

Test time runs the run's own code on the test split: `preprocess.cache_series` (the run's size / normaliser) ->
`pipeline.predict_masks` (zoom TTA, contour filter, stacks) -> `pipeline.fold_mean_predictions` (every fold model
of each MRI type, averaged over folds) and `pipeline.mask_ratio_predict` -> `pipeline.blend_test` (the run's
blend) -> `data.write_submission` in the sample's ID order. A patient that cannot be read, or has no stack for any
blend input, gets the run's prior and is counted.
"""
from __future__ import annotations

import datetime as _dt
import json
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import pandas as pd
import torch

from lib.kaggle import runtime
from lib.kaggle.bundle import (FORMAT, Bundle, BundleError, check_task, lookup_artefact, read_json,
                              stage_params)
from lib.kaggle.runtime import output_paths, resolve_run_dir, submission_paths  # noqa: F401  (the kernel's names)
from lib.io.mr_series import SEQUENCES
from lib.models.slice_sequence import CLASSIFIERS
from lib.paths import PathLike, RunPaths
from lib.tasks.brats import pipeline
from lib.tasks.brats.classify import ClsConfig
from lib.tasks.brats.data import LABEL, BratsData, read_ids_table, write_submission
from lib.tasks.brats.preprocess import cache_key, cache_series

TASK = "brats"
SEG_FILE = "seg.pth"
MASK_KEYS = ("zoom", "threshold", "min_ratio", "max_contours")
RUNTIME_KEYS = ("num_workers", "device", "resume")  # ClsConfig fields that may differ between folds and at test time
DEFAULT_PRIOR = 0.5  # runs made before the ensemble stage recorded submission_prior
#: Packages the inference path imports (checked against requirements.txt by `requirements_report`).
INFERENCE_PACKAGES = ("torch", "torchvision", "timm", "fastai", "segmentation-models-pytorch", "monai", "pydicom",
                      "pylibjpeg", "pylibjpeg-libjpeg", "pylibjpeg-openjpeg", "opencv-python-headless", "numpy",
                      "pandas", "pyarrow", "scikit-learn")


# ---------------------------------------------------------------- collecting a run's weights
def _folds(rp: RunPaths) -> List[int]:
    if not rp.folds.is_file():
        raise BundleError(f"{rp.folds} is missing: run the train_cls stage first")
    return sorted(int(k) for k in pd.read_csv(rp.folds)["fold"].unique())


def _preprocess_entry(rp: RunPaths) -> Dict[str, Any]:
    series_dir = lookup_artefact(rp, "series_cache", "preprocess")
    meta = read_json(series_dir / "meta.json")
    if not {"size", "normaliser"} <= set(meta):
        raise BundleError(f"{series_dir / 'meta.json'} lacks the series-cache parameters (size, normaliser)")
    if series_dir.name != cache_key(meta["size"], meta["normaliser"]):
        raise BundleError(f"{series_dir} is not the cache folder of its meta.json {meta}")
    return meta


def _seg_entry(rp: RunPaths) -> Tuple[Dict[str, Any], Path]:
    path = lookup_artefact(rp, "seg_model", "train_seg")
    if not path.is_file():
        raise BundleError(f"segmentation model {path} named by {rp.root / 'artefacts.json'} is missing")
    cfg = torch.load(path, map_location="cpu", weights_only=True, mmap=True).get("cfg", {})
    if not {"arch", "encoder"} <= set(cfg):
        raise BundleError(f"{path} is not a lib.train.seg checkpoint (its cfg lacks arch / encoder)")
    stacks = read_json(rp.root / "stacks" / "train" / "meta.json")
    if not set(MASK_KEYS) <= set(stacks):
        raise BundleError(f"{rp.root / 'stacks' / 'train' / 'meta.json'} is missing or lacks {list(MASK_KEYS)}: "
                          "run the predict_masks stage first")
    if stacks.get("model") != pipeline._model_identity(path):
        raise BundleError(f"the training stacks were predicted by {stacks.get('model')!r}, not by the current "
                          f"{path}: rerun predict_masks (and the classifiers) before packaging")
    entry = {"file": SEG_FILE, "arch": cfg["arch"], "encoder": cfg["encoder"], "img_size": cfg.get("img_size"),
             "masks": {k: stacks[k] for k in MASK_KEYS}}
    return entry, path


def _classifier_entry(rp: RunPaths, name: str, model: str, mri: str, ks: List[int]
                      ) -> Tuple[Dict[str, Any], Dict[str, Path]]:
    files, cfgs, aucs = {}, [], {}
    for k in ks:
        path = rp.root / "models" / "cls" / f"{name}_fold{k}" / "best.pth"
        if not path.is_file():
            raise BundleError(f"classifier {name} fold {k}: {path} is missing (every fold model is needed)")
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        cfgs.append(dict(ckpt.get("cfg", {})))
        aucs[str(k)] = ckpt.get("valid_auc")
        files[f"cls_{name}_fold{k}.pth"] = path
    plain = [{k: v for k, v in c.items() if k not in RUNTIME_KEYS} for c in cfgs]
    if any(c != plain[0] for c in plain) or plain[0].get("model") != model:
        raise BundleError(f"classifier {name}: the fold checkpoints' configs differ or are not {model!r} models: "
                          f"{plain}")
    entry = {"model": model, "mri": mri, "cfg": cfgs[0], "folds": ks,
             "files": {str(k): f"cls_{name}_fold{k}.pth" for k in ks}, "valid_auc": aucs}
    return entry, files


def _mask_ratio_entry(rp: RunPaths, name: str, mri: str, ks: List[int]) -> Tuple[Dict[str, Any], Path]:
    path = pipeline.mask_ratio_model_path(rp, mri)
    folds = read_json(path).get("folds")
    if not folds:
        raise BundleError(f"blend input {name!r}: {path} is missing (runs before the regressions were saved: rerun "
                          "train_cls)")
    if sorted(int(k) for k in folds) != ks:
        raise BundleError(f"blend input {name!r}: {path} has folds {sorted(folds)}, the run {ks}")
    return {"mri": mri, "file": f"{name}.json", "folds": ks}, path


def _split_input(name: str) -> Tuple[str, str]:
    """'cnn_lstm_FLAIR' -> ('cnn_lstm', 'FLAIR'); 'mask_ratio_T2w' -> ('mask_ratio', 'T2w'); BundleError else."""
    model, _, mri = name.rpartition("_")
    if mri not in SEQUENCES or (model != "mask_ratio" and model not in CLASSIFIERS.names()):
        raise BundleError(f"blend input {name!r} is neither <classifier>_<MRI type> nor mask_ratio_<MRI type> of "
                          f"this run (classifiers {CLASSIFIERS.names()}, MRI types {list(SEQUENCES)}; blends with "
                          "other runs are not packaged)")
    return model, mri


def _blend_entry(metrics: Dict[str, Any]) -> Dict[str, Any]:
    inputs, method = metrics.get("ensemble_inputs"), metrics.get("ensemble_method")
    if not inputs or not isinstance(inputs, list) or method is None:
        raise BundleError("metrics.json has no ensemble_inputs / ensemble_method: run the ensemble stage first")
    if method not in pipeline.BLEND_METHODS:
        raise BundleError(f"ensemble_method {method!r} has no test-time rule; known: {pipeline.BLEND_METHODS}")
    best = metrics.get("ensemble_best")
    if method == "best" and best not in inputs:
        raise BundleError(f"ensemble_method 'best' but ensemble_best {best!r} is not one of the inputs {inputs}")
    return {"inputs": list(inputs), "method": method, "best": best}


def collect_weights(run_dir: PathLike) -> Tuple[Dict[str, Any], Dict[str, Path]]:
    """(manifest, {file name in the bundle: source path}) of everything BraTS test-time inference needs."""
    rp = RunPaths.at(run_dir)
    run_manifest = read_json(rp.root / "manifest.json")
    if run_manifest.get("task", TASK) != TASK:
        raise BundleError(f"{rp.root} is a {run_manifest['task']!r} run, not a {TASK} one")
    metrics = rp.metrics()
    blend = _blend_entry(metrics)
    seg, seg_path = _seg_entry(rp)
    files: Dict[str, Path] = {SEG_FILE: seg_path}
    ks = _folds(rp)
    classifiers, mask_ratio = {}, {}
    for name in blend["inputs"]:
        model, mri = _split_input(name)
        if model == "mask_ratio":
            mask_ratio[name], files[f"{name}.json"] = _mask_ratio_entry(rp, name, mri, ks)
        else:
            classifiers[name], more = _classifier_entry(rp, name, model, mri, ks)
            files.update(more)
    prior = metrics.get("submission_prior")
    manifest = {"format": FORMAT, "task": TASK, "run": run_manifest.get("run", rp.root.name), "run_dir": str(rp.root),
                "git_commit": run_manifest.get("git_commit"), "packages": run_manifest.get("packages", {}),
                "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                "preprocess": _preprocess_entry(rp), "seg": seg, "classifiers": classifiers,
                "mask_ratio": mask_ratio, "blend": blend,
                "prior": float(prior) if prior is not None else DEFAULT_PRIOR,
                "prior_source": "metrics.json submission_prior" if prior is not None else "default 0.5",
                "metrics": {k: v for k, v in metrics.items() if k.startswith("oof_")},
                "params": stage_params(run_manifest)}
    return manifest, files


# ---------------------------------------------------------------- the test-time steps
def requirements_report(requirements: Optional[PathLike] = None) -> pd.DataFrame:
    """Installed versions of the BraTS inference packages against requirements.txt's pins."""
    return runtime.requirements_report(INFERENCE_PACKAGES, requirements)


def check_bundle(bundle: Bundle) -> Bundle:
    """BundleError unless `bundle` is a BraTS bundle (ICH manifests carry no `task`)."""
    return check_task(bundle, TASK)


def prepare_test(data: BratsData, rp: RunPaths, bundle: Bundle, workers: Optional[int] = None,
                 progress: bool = True) -> Tuple[pd.DataFrame, pd.DataFrame]:
    """Cache the test series with the run's size and normaliser -> (series table, bad-series table); records the
    cache and the bundle's segmentation model in <run>/inference/artefacts.json for `predict_masks`."""
    pre = bundle.manifest["preprocess"]
    table, bad = cache_series(data.split_dir("test"), rp.cache_root, size=pre["size"], normaliser=pre["normaliser"],
                              workers=workers, progress=progress)
    rp.record("series_cache", rp.cache_root / cache_key(pre["size"], pre["normaliser"]))
    rp.record("seg_model", bundle.path(bundle.manifest["seg"]["file"]))
    return table, bad


def stacks_test(bundle: Bundle, rp: RunPaths, bs: int = 32, device: str = "auto", progress: bool = True
                ) -> pd.DataFrame:
    """WT / ET masks of every cached test series (the run's zoom TTA) and the contour-filtered stacks."""
    m = bundle.manifest["seg"]["masks"]
    table = pipeline.predict_masks(rp, "test", m["zoom"], m["threshold"], m["min_ratio"], m["max_contours"], bs,
                                   device=device, progress=progress)
    rp.record("stacks_test", pipeline.stacks_table_path(rp, "test"))
    return table


def classifier_test(bundle: Bundle, rp: RunPaths, name: str, device: str = "auto", num_workers: int = 0
                    ) -> pd.Series:
    """Every fold model of blend input `name` predicts each test patient with a stack; mean over folds."""
    e = bundle.manifest["classifiers"][name]
    cfg = ClsConfig.from_dict({**e["cfg"], "pretrained_path": None, "device": device, "num_workers": num_workers,
                               "resume": False})
    items = pipeline.model_items(rp, "test", e["mri"], e["model"])
    return pipeline.fold_mean_predictions([bundle.path(e["files"][str(k)]) for k in e["folds"]], items, cfg)


def mask_ratio_test(bundle: Bundle, rp: RunPaths, name: str) -> pd.Series:
    """The ET / WT ratio baseline of blend input `name` on the test stacks (mean of the fold regressions)."""
    e = bundle.manifest["mask_ratio"][name]
    folds = json.loads(bundle.path(e["file"]).read_text())["folds"]
    return pipeline.mask_ratio_predict(folds, pipeline.mask_ratio_features(rp, "test", e["mri"]))


def predict_inputs(bundle: Bundle, rp: RunPaths, device: str = "auto", num_workers: int = 0) -> Dict[str, pd.Series]:
    """{blend input: test predictions (BraTS21ID -> probability)} for every input of the run's blend."""
    out = {}
    for name in bundle.manifest["blend"]["inputs"]:
        if name in bundle.manifest["mask_ratio"]:
            out[name] = mask_ratio_test(bundle, rp, name)
        elif name in bundle.manifest["classifiers"]:
            out[name] = classifier_test(bundle, rp, name, device, num_workers)
        else:
            raise BundleError(f"bundle {bundle.source}: blend input {name!r} has no model in the manifest")
    return out


def blend_test(bundle: Bundle, preds: Dict[str, pd.Series]) -> pd.Series:
    """The run's blend (`pipeline.blend_test`, the inputs in the run's order) of the test predictions."""
    spec = bundle.manifest["blend"]
    missing = [n for n in spec["inputs"] if n not in preds]
    if missing:
        raise BundleError(f"blend inputs {missing} were not predicted; have {sorted(preds)}")
    frame = pd.DataFrame({n: preds[n].astype(float) for n in spec["inputs"]})
    return pipeline.blend_test(frame, spec["method"], spec.get("best"))


def write_submissions(bundle: Bundle, pred: pd.Series, data: BratsData, rp: RunPaths) -> Tuple[List[Path], int]:
    """The submission in the sample's ID order at every `submission_paths` place; patients without a prediction
    (unreadable, no stack) get the run's prior. Returns (paths, number of patients at the prior)."""
    written, n_prior = [], 0
    for path in submission_paths(rp):
        path, n_prior = write_submission(pred, data.sample_submission, path, bundle.manifest["prior"])
        written.append(path)
    return written, n_prior


def unread_patients(data: BratsData, series: pd.DataFrame) -> List[str]:
    """Sample-submission patients with no readable series at all."""
    ids = read_ids_table(data.sample_submission, LABEL, "sample submission")["BraTS21ID"]
    return sorted(set(ids) - set(series["BraTS21ID"].astype(str)))


def compare_with_run(sub: PathLike, run_dir: PathLike, written: List[Path]) -> Optional[float]:
    """Max |difference| between this submission and the run's own submission.csv over the same patients (inf when
    the patients differ; None when the run has none, or it is a file this inference wrote: a kernel's run_dir is
    its working directory)."""
    own = Path(run_dir) / "submission.csv"
    if not own.is_file() or any(own.resolve() == Path(p).resolve() for p in written):
        return None
    a = read_ids_table(sub, LABEL).set_index("BraTS21ID")[LABEL]
    b = read_ids_table(own, LABEL).set_index("BraTS21ID")[LABEL]
    if set(a.index) != set(b.index):
        return float("inf")
    return float((a - b.reindex(a.index)).abs().max())


def cleanup(rp: RunPaths) -> None:
    """Delete the test series cache and stacks (a kernel's working directory is its saved output)."""
    runtime.cleanup(rp, ("cache", "stacks"))


def write_summary(rp: RunPaths, bundle: Bundle, values: Dict[str, Any]) -> Dict[str, Any]:
    """inference/inference.json (+ its numbers in inference/metrics.json): timings, counts, the bundle's run."""
    return runtime.write_summary(rp, bundle, {"inference_prior": bundle.manifest["prior"], **values})
