"""Test-only inference from a weights bundle (`lib.kaggle.bundle`): the path of the Kaggle kernel (07_inference.ipynb).

The bundle comes from a packaged weights folder, an attached Kaggle dataset, or straight from a finished run
(`lib.kaggle.bundle.load_bundle`). Every model goes through the same `lib` code as the training run:
`lib.imaging.windowing.build_cache`, `lib.train.embed.export_embeddings` (per CNN fold, the run's TTA), `lib.sequence.features.predict_probs`
(per strategy, averaged by its test rule in `lib.sequence.config.TEST_RULES`, as in training), `lib.ensemble.blend`,
`lib.tasks.ich.submission.write_submission`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import pandas as pd
from scipy.special import expit
from lib.train import embed
from lib import ensemble
from lib.tasks.ich import pipeline
from lib.sequence.config import TEST_RULES, SeqConfig, TestPreds, resolve_device, slice_vectors
from lib.imaging import windowing
from lib.kaggle.bundle import Bundle, BundleError
from lib.data.datasets import neighbours
from lib.tasks.ich.labels import SUBTYPES
from lib.tasks.ich import submission
from lib.tasks.ich.postprocess import any_ge_max
from lib.kaggle import runtime
from lib.kaggle.runtime import output_paths, resolve_run_dir, submission_paths  # noqa: F401  (the kernel's names)
from lib.paths import PathLike, RunPaths
from lib.tasks.ich.data import CompetitionData
from lib.sequence.features import SeriesDataset, load_models, open_embedding_set, predict_probs

#: Packages the inference path imports (checked against requirements.txt by `requirements_report`).
INFERENCE_PACKAGES = ("torch", "torchvision", "timm", "fastai", "pydicom", "pylibjpeg", "pylibjpeg-libjpeg",
                      "pylibjpeg-openjpeg", "albumentations", "numpy", "pandas", "pyarrow", "scikit-learn", "tqdm")


# ---------------------------------------------------------------- where (shared with every task's kernel)
def requirements_report(requirements: Optional[PathLike] = None) -> pd.DataFrame:
    """Installed versions of the inference packages against requirements.txt's pins (beside lib/, so also inside
    the code dataset): a package the Kaggle image lacks, or has in another range, belongs in the wheels dataset."""
    return runtime.requirements_report(INFERENCE_PACKAGES, requirements)


# ---------------------------------------------------------------- the test-time steps
def prepare_test(data: CompetitionData, rp: RunPaths, bundle: Bundle, workers: Optional[int] = None
                 ) -> Tuple[pd.DataFrame, Path]:
    """Header index of the test DICOMs and their windowed cache with the run's preprocessing -> (index, cache dir).

    The index keeps only images that made it into the cache (unreadable files are listed in the cache's bad.csv).
    """
    index = pipeline.ensure_index(data, rp, "test", workers)
    res = windowing.build_cache(index[["image_id", "path"]], rp.cache_root, workers=workers,
                                **bundle.manifest["preprocess"])
    rp.record("cache", res.dir)
    bad = set(pd.read_csv(res.dir / "bad.csv")["image_id"]) if (res.dir / "bad.csv").is_file() else set()
    return index[~index["image_id"].isin(bad)].reset_index(drop=True), res.dir


def cnn_test(bundle: Bundle, rp: RunPaths, index: pd.DataFrame, cache_dir: Path, bs: int = 64,
             num_workers: int = 0, device: str = "auto") -> pd.DataFrame:
    """Per CNN fold k: embeddings/test_fold{k}.* (lib.train.embed, the run's TTA) -> fold-mean probabilities (wide)."""
    cnn = bundle.manifest["cnn"]
    nbrs = neighbours(index) if cnn["mode"] == "adjacent" else None
    ids, probs = index["image_id"].astype(str).tolist(), []
    for k in cnn["folds"]:
        embed.export_embeddings(bundle.path(cnn["files"][str(k)]), cnn["arch"], cache_dir, ids,
                                rp.embedding("test", k), mode=cnn["mode"], neighbours=nbrs,
                                tta=tuple(cnn["tta"]), bs=bs, num_workers=num_workers, device=device,
                                img_size=cnn["img_size"])
        es = open_embedding_set(rp.root, "test", k)
        logits = np.asarray(es.logits[es.rows.reindex(ids).to_numpy()], np.float64)
        probs.append(expit(logits))
    return pd.DataFrame(np.mean(probs, axis=0), index=pd.Index(ids, name="image_id"), columns=list(SUBTYPES))


def seq_test(bundle: Bundle, rp: RunPaths, index: pd.DataFrame, strategy: str, device: str = "auto",
             progress: bool = True) -> pd.DataFrame:
    """A sequence strategy's test probabilities (wide), averaged like `train_sequence` averages them."""
    entry = bundle.manifest["sequence"][strategy]
    rule = TEST_RULES.get(strategy)
    if entry["aggregate"] != rule.name:
        raise BundleError(f"bundle {bundle.source}: strategy {strategy!r} averages its test predictions by "
                          f"{entry['aggregate']!r}, but lib.sequence.config.TEST_RULES declares {rule.name!r}")
    cfg = SeqConfig.from_dict({**entry["config"], "device": device, "progress": progress})
    dev = resolve_device(cfg.device)
    sets = {k: open_embedding_set(rp.root, "test", k) for k in bundle.manifest["cnn"]["folds"]}
    preds: TestPreds = []
    for m in entry["models"]:
        models = load_models(bundle.path(m["file"]), dev)
        for k in m["cnn_folds"]:
            ds = SeriesDataset(index, slice_vectors(sets[k], cfg), sets[k].logits, sets[k].rows, None,
                               cfg.series_key, spacing_scale=cfg.spacing_scale, label_names=SUBTYPES)
            preds.append((k, predict_probs(models, ds, bs=max(cfg.bs, 32), flip=cfg.tta_flip, progress=progress)))
    return rule.average(preds)


def blend_test(bundle: Bundle, preds: Dict[str, pd.DataFrame]) -> pd.DataFrame:
    """The run's OOF-tuned blend of the test predictions ("cnn", "seq_<strategy>") + its any >= max step if kept."""
    spec = bundle.manifest["blend"]
    weights = {n: (np.asarray(w, np.float64) if isinstance(w, list) else float(w)) for n, w in spec["weights"].items()}
    missing = sorted({spec["inputs"][n] for n in weights} - set(preds))
    if missing:
        raise BundleError(f"blend inputs {missing} were not predicted; have {sorted(preds)}")
    out = ensemble.blend({n: preds[spec["inputs"][n]] for n in weights}, weights)
    return any_ge_max(out) if spec.get("postprocess") else out


def fill_missing(pred: pd.DataFrame, sample_submission: PathLike) -> Tuple[pd.DataFrame, int]:
    """Images of the sample submission without a prediction (unreadable DICOMs) get the mean prediction of the
    readable ones (the bundle carries no training labels; on the training path the prior is the prevalence)."""
    return submission.fill_missing(pred, sample_submission, pred.mean())


def compare_with_run(sub: PathLike, run_dir: PathLike, written: List[Path]) -> Optional[float]:
    """Max |difference| between this submission and the run's own submission.csv (None when it has none, or when
    that file is one this inference just wrote: a kernel's run_dir is its working directory)."""
    own = Path(run_dir) / "submission.csv"
    if not own.is_file() or any(own.resolve() == Path(p).resolve() for p in written):
        return None
    a, b = pd.read_csv(sub).set_index("ID")["Label"], pd.read_csv(own).set_index("ID")["Label"]
    if set(a.index) != set(b.index):
        return float("inf")
    return float((a - b.reindex(a.index)).abs().max())


def cleanup(rp: RunPaths) -> None:
    """Delete the test cache and embeddings (a kernel's working directory is its saved output)."""
    runtime.cleanup(rp, ("cache", "embeddings"))


def write_summary(rp: RunPaths, bundle: Bundle, values: Dict[str, Any]) -> Dict[str, Any]:
    """inference/metrics.json: timings, counts, the bundle's run and commit (`runtime.write_summary`)."""
    return runtime.write_summary(rp, bundle, values)
