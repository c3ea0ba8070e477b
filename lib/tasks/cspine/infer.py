"""Test-only cervical-spine inference from a weights bundle: the path of the cspine Kaggle kernel
(notebooks/cspine/07_inference.ipynb), and `collect_weights`, the bundle of a finished run (the spec's
extra["kernel"] names it).

The bundle holds the 3D C1-C7 segmentation model (`seg3d.pth`), every fold model of each classifier the blend
weighs above 0 (`cls_<model>_fold<k>.pth`, with its CspineConfig), and a manifest: the volume grid the segmentation
model saw (the cache's meta.json: size or spacing, HU window, dtype), the sliding-window overlap the run's masks were
made with, the crop parameters (the training crops' crops_meta.json: slices, size, margin, window, and the median
vertebra volumes of the visibility rule), the ensemble record (blend weights, the fitted patient_overall rule, the
prior), OOF metrics, stage params and the git commit.

Test time runs the run's own code on the studies present in test_images/ (`CspineData.test_studies`: the test.csv
fallback): `pipeline.cache_studies` on the run's grid -> `pipeline.predict_all_masks` -> `pipeline.make_crops` from
the native CT -> `pipeline.fold_mean_test` per classifier -> `pipeline.apply_ensemble` -> `data.write_submission`
(8 rows per study). A study that cannot be read, or has no crop, gets the run's prior and is counted.
"""
from __future__ import annotations

import datetime as _dt
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import pandas as pd
import torch

from lib.kaggle import runtime
from lib.kaggle.bundle import (FORMAT, Bundle, BundleError, check_task, lookup_artefact, read_json,
                              stage_params)
from lib.kaggle.runtime import output_paths, resolve_run_dir, submission_paths  # noqa: F401  (the kernel's names)
from lib.paths import PathLike, RunPaths
from lib.tasks.cspine import pipeline
from lib.tasks.cspine.classify import CSPINE_MODELS, CspineConfig
from lib.tasks.cspine.data import CspineData, write_submission
from lib.tasks.cspine.metric import CSPINE_GROUP, CSPINE_LABELS

TASK = "cspine"
SEG_FILE = "seg3d.pth"
ENSEMBLE_FILE = "ensemble.json"
RUNTIME_KEYS = ("num_workers", "device", "resume")  # CspineConfig fields that may differ between folds and at test
#: Packages the inference path imports (checked against requirements.txt by `requirements_report`).
INFERENCE_PACKAGES = ("torch", "torchvision", "timm", "fastai", "monai", "pydicom", "pylibjpeg", "pylibjpeg-libjpeg",
                      "pylibjpeg-openjpeg", "opencv-python-headless", "numpy", "pandas", "scipy",
                      "scikit-learn")


# ---------------------------------------------------------------- collecting a run's weights
def _volumes_entry(rp: RunPaths) -> Dict[str, Any]:
    folder = lookup_artefact(rp, "volume_cache", "volumes")
    meta = read_json(folder / "meta.json")
    if not {"size", "spacing", "hu_window", "dtype"} <= set(meta):
        raise BundleError(f"{folder / 'meta.json'} lacks the volume grid (size, spacing, hu_window, dtype)")
    return {k: meta[k] for k in ("size", "spacing", "hu_window", "dtype")}


def _seg_entry(rp: RunPaths) -> Tuple[Dict[str, Any], Path]:
    path = lookup_artefact(rp, "seg_model", "train_seg")
    if not path.is_file():
        raise BundleError(f"segmentation model {path} named by {rp.root / 'artefacts.json'} is missing")
    cfg = torch.load(path, map_location="cpu", weights_only=True, mmap=True).get("cfg", {})
    if "arch" not in cfg or "roi" not in cfg:
        raise BundleError(f"{path} is not a lib.tasks.cspine.seg checkpoint (its cfg lacks arch / roi)")
    masks = read_json(rp.root / "masks" / "meta.json")
    if "overlap" not in masks:
        raise BundleError(f"{rp.root / 'masks' / 'meta.json'} is missing: run the crops stage first")
    if masks.get("model") != pipeline._identity(path):
        raise BundleError(f"the run's masks were predicted by {masks.get('model')!r}, not by the current {path}: "
                          "rerun the crops stage (and the classifiers) before packaging")
    return {"file": SEG_FILE, "arch": cfg["arch"], "roi": list(cfg["roi"]), "overlap": float(masks["overlap"])}, path


def _crops_entry(rp: RunPaths) -> Dict[str, Any]:
    path = lookup_artefact(rp, "crops_train", "crops").parent / "crops_meta.json"
    meta = read_json(path)
    keys = ("n_slices", "size", "margin", "window", "threshold", "expected_mm3")
    if not set(keys) <= set(meta):
        raise BundleError(f"{path} is missing or lacks {list(keys)}: rerun the crops stage")
    return {k: meta[k] for k in keys}


def _classifier_entry(rp: RunPaths, model: str) -> Tuple[Dict[str, Any], Dict[str, Path]]:
    if model not in CSPINE_MODELS.names():
        raise BundleError(f"blend input {model!r} is not a classifier of this run ({CSPINE_MODELS.names()}; blends "
                          "with other runs are not packaged)")
    root = rp.root / "models" / "cspine"
    dirs = sorted(root.glob(f"{model}_fold*"), key=lambda d: int(d.name.rpartition("_fold")[2]))
    ks = [int(d.name.rpartition("_fold")[2]) for d in dirs]
    if not ks or ks != list(range(len(ks))):
        raise BundleError(f"classifier {model}: fold models {ks} under {root}; need folds 0..n-1")
    files, cfgs, scores = {}, [], {}
    for k, d in zip(ks, dirs):
        path = d / "best.pth"
        if not path.is_file() or not (d / "train_result.json").is_file():
            raise BundleError(f"classifier {model} fold {k}: {path} (or its train_result.json) is missing: every "
                              "fold model is needed, trained to the end")
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        cfgs.append(dict(ckpt.get("cfg", {})))
        scores[str(k)] = read_json(d / "train_result.json").get("valid_score")
        files[f"cls_{model}_fold{k}.pth"] = path
    plain = [{k: v for k, v in c.items() if k not in RUNTIME_KEYS} for c in cfgs]
    if any(c != plain[0] for c in plain) or plain[0].get("model") != model:
        raise BundleError(f"classifier {model}: the fold checkpoints' configs differ or are not {model!r} models: "
                          f"{plain}")
    entry = {"model": model, "cfg": cfgs[0], "folds": ks,
             "files": {str(k): f"cls_{model}_fold{k}.pth" for k in ks}, "valid_score": scores}
    return entry, files


def _ensemble_entry(rp: RunPaths) -> Tuple[Dict[str, Any], Path]:
    path = pipeline.ensemble_path(rp)
    if not path.is_file():
        raise BundleError(f"{path} is missing: run the ensemble stage (runs made before it recorded its blend need "
                          "it rerun)")
    try:
        return pipeline.read_ensemble(path), path
    except ValueError as e:
        raise BundleError(str(e)) from None


def collect_weights(run_dir: PathLike) -> Tuple[Dict[str, Any], Dict[str, Path]]:
    """(manifest, {file name in the bundle: source path}) of everything cspine test-time inference needs."""
    rp = RunPaths.at(run_dir)
    run_manifest = read_json(rp.root / "manifest.json")
    if run_manifest.get("task", TASK) != TASK:
        raise BundleError(f"{rp.root} is a {run_manifest['task']!r} run, not a {TASK} one")
    ensemble, ens_path = _ensemble_entry(rp)
    seg, seg_path = _seg_entry(rp)
    files: Dict[str, Path] = {SEG_FILE: seg_path, ENSEMBLE_FILE: ens_path}
    classifiers = {}
    for model, w in ensemble["weights"].items():
        if w > 0:
            classifiers[model], more = _classifier_entry(rp, model)
            files.update(more)
    metrics = rp.metrics()
    manifest = {"format": FORMAT, "task": TASK, "run": run_manifest.get("run", rp.root.name), "run_dir": str(rp.root),
                "git_commit": run_manifest.get("git_commit"), "packages": run_manifest.get("packages", {}),
                "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                "volumes": _volumes_entry(rp), "seg": seg, "crops": _crops_entry(rp), "classifiers": classifiers,
                "ensemble": ENSEMBLE_FILE, "prior": ensemble["prior"],
                "metrics": {k: v for k, v in metrics.items() if k.startswith(("oof_", "seg_valid_dice"))},
                "params": stage_params(run_manifest)}
    return manifest, files


# ---------------------------------------------------------------- the test-time steps
def requirements_report(requirements: Optional[PathLike] = None) -> pd.DataFrame:
    """Installed versions of the cspine inference packages against requirements.txt's pins."""
    return runtime.requirements_report(INFERENCE_PACKAGES, requirements)


def check_bundle(bundle: Bundle) -> Bundle:
    """BundleError unless `bundle` is a cspine bundle (ICH manifests carry no `task`)."""
    return check_task(bundle, TASK)


def prepare_test(data: CspineData, rp: RunPaths, bundle: Bundle, workers: Optional[int] = None,
                 progress: bool = True) -> Tuple[pd.DataFrame, pd.DataFrame]:
    """Cache the test studies present in test_images/ on the run's grid -> (study table, bad-study table)."""
    v = bundle.manifest["volumes"]
    return pipeline.cache_studies(rp, data, size=v["size"], spacing=v["spacing"], hu_window=v["hu_window"],
                                  dtype=v["dtype"], workers=workers, progress=progress, splits=("test",))


def masks_test(bundle: Bundle, rp: RunPaths, bs: int = 1, device: str = "auto", progress: bool = True
               ) -> pd.DataFrame:
    """C1-C7 masks of every cached test study (sliding window with the run's overlap)."""
    seg = bundle.manifest["seg"]
    return pipeline.predict_all_masks(rp, bundle.path(seg["file"]), overlap=seg["overlap"], bs=bs, device=device,
                                      progress=progress)


def crops_test(bundle: Bundle, rp: RunPaths, data: CspineData, progress: bool = True) -> pd.DataFrame:
    """Per-vertebra crops of the test studies from their native CT, with the run's crop parameters."""
    from lib.imaging.windowing import Window

    c = bundle.manifest["crops"]
    center, width = c["window"]
    return pipeline.make_crops(rp, data, "test", n_slices=c["n_slices"], size=c["size"], margin=c["margin"],
                               window=Window(center=center, width=width), threshold=c["threshold"],
                               expected=c["expected_mm3"], progress=progress)


def predict_models(bundle: Bundle, crops: pd.DataFrame, device: str = "auto", num_workers: int = 0
                   ) -> Dict[str, pd.DataFrame]:
    """{classifier: StudyInstanceUID + C1..C7, the mean of its fold models} for every classifier of the blend."""
    out = {}
    for name, e in bundle.manifest["classifiers"].items():
        cfg = CspineConfig.from_dict({**e["cfg"], "pretrained_path": None, "device": device,
                                      "num_workers": num_workers, "resume": False})
        out[name] = pipeline.fold_mean_test([bundle.path(e["files"][str(k)]) for k in e["folds"]], crops, cfg)
    return out


def ensemble_record(bundle: Bundle) -> Dict[str, Any]:
    return pipeline.read_ensemble(bundle.path(bundle.manifest["ensemble"]))


def blend_test(bundle: Bundle, preds: Dict[str, pd.DataFrame]) -> pd.DataFrame:
    """The run's blend and patient_overall rule (`pipeline.apply_ensemble`) of the test predictions (empty: no
    study had a crop)."""
    if not any(len(p) for p in preds.values()):
        return pd.DataFrame(columns=[CSPINE_GROUP, *CSPINE_LABELS])
    return pipeline.apply_ensemble(preds, ensemble_record(bundle))


def write_submissions(bundle: Bundle, pred: pd.DataFrame, data: CspineData, rp: RunPaths
                      ) -> Tuple[List[Path], int]:
    """8 rows per study present in test_images/ at every `submission_paths` place; studies without a prediction
    get the run's prior. Returns (paths, number of studies at the prior)."""
    written, n_prior = [], 0
    for path in submission_paths(rp):
        path, n_prior = write_submission(pred, list(data.test_studies()), bundle.manifest["prior"], path)
        written.append(path)
    return written, n_prior


def unread_studies(data: CspineData, studies: pd.DataFrame) -> List[str]:
    """Test studies present in test_images/ that could not be cached."""
    return sorted(set(data.test_studies()) - set(studies["study_id"].astype(str)))


def compare_with_run(sub: PathLike, run_dir: PathLike, written: List[Path]) -> Optional[float]:
    """Max |difference| between this submission and the run's own submission.csv over the same rows (inf when the
    rows differ; None when the run has none, or it is a file this inference wrote: a kernel's run_dir is its
    working directory)."""
    own = Path(run_dir) / "submission.csv"
    if not own.is_file() or any(own.resolve() == Path(p).resolve() for p in written):
        return None
    a = pd.read_csv(sub).set_index("row_id")["fractured"]
    b = pd.read_csv(own).set_index("row_id")["fractured"]
    if set(a.index) != set(b.index):
        return float("inf")
    return float((a - b.reindex(a.index)).abs().max())


def cleanup(rp: RunPaths) -> None:
    """Delete the test volume cache, masks and crops (a kernel's working directory is its saved output)."""
    runtime.cleanup(rp, ("cache", "masks", "crops"))


def write_summary(rp: RunPaths, bundle: Bundle, values: Dict[str, Any]) -> Dict[str, Any]:
    """inference/inference.json (+ its numbers in inference/metrics.json): timings, counts, the bundle's run."""
    return runtime.write_summary(rp, bundle, values)
