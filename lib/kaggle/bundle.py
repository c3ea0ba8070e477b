"""A run's inference weights as one bundle: what test-time inference needs, found in a finished run, packaged as a
Kaggle dataset (`python -m lib.kaggle package-weights`) and read back by `lib.tasks.ich.infer`.

`collect_weights(run_dir)` returns the manifest (preprocessing from the cache's meta.json, the fold CNNs' arch / mode,
their size / TTA / checkpoint from the embed stage's own records (lib.train.embed), the sequence strategies the blend
uses and how their test predictions are averaged (lib.sequence.strategies.STRATEGIES), the blend weights,
OOF metrics, stage parameters, git commit) and the checkpoint files under flat names (`cnn_fold0.pth`,
`seq_pooled_fold0_outer0.pth`, ...). `load_bundle` reads a packaged folder, an attached dataset, or the run itself.
The blend comes from the ensemble stage's metrics.json keys (ensemble_weights: {input: float or 6 floats},
ensemble_postprocess, ensemble_method; input "seq" is seq_primary_strategy); a run without them ships its CNN alone.
"""
from __future__ import annotations

import datetime as _dt
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch

from lib.data.folds import read_folds
from lib.paths import PathLike, RunPaths, attached_dataset

FORMAT = 1
Collector = Callable[[PathLike], Tuple[Dict[str, Any], Dict[str, Path]]]


class BundleError(ValueError):
    """A run or weights folder that lacks what test-time inference needs."""


# ---------------------------------------------------------------- collecting a run's weights
def read_json(path: Path) -> Dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


def stage_params(run_manifest: Dict[str, Any]) -> Dict[str, Dict[str, Any]]:
    """Resolved parameters of each stage (first job of a stage; data_dir / run_dir dropped)."""
    out: Dict[str, Dict[str, Any]] = {}
    for job in run_manifest.get("stages", []):
        out.setdefault(job["stage"], {k: v for k, v in job["params"].items() if k not in ("data_dir", "run_dir")})
    return out


def lookup_artefact(rp: RunPaths, name: str, stage: str) -> Path:
    """A recorded run artefact; BundleError naming the stage that makes it when the run has none."""
    try:
        return rp.lookup(name)
    except FileNotFoundError:
        raise BundleError(f"{rp.root}: no {name!r} artefact recorded: run the {stage} stage first") from None


def check_task(bundle: "Bundle", task: str) -> "Bundle":
    """BundleError unless `bundle` holds weights of `task` (ICH manifests carry no `task`)."""
    if bundle.manifest.get("task") != task:
        raise BundleError(f"bundle {bundle.source} holds {bundle.manifest.get('task', 'ich')!r} weights, not {task}")
    return bundle


def _embed_record(rp: RunPaths, k: int) -> Dict[str, Any]:
    """What the embed stage recorded for CNN fold k's OOF export (tta, checkpoint, img_size); BundleError if absent."""
    from lib.train.embed import read_record

    try:
        return read_record(rp.embedding("oof", k))
    except FileNotFoundError as exc:
        raise BundleError(f"CNN fold {k}: {exc}") from None


def _cnn_entry(rp: RunPaths, ks: List[int]) -> Tuple[Dict[str, Any], Dict[str, Path]]:
    files, cfgs, losses, records = {}, [], {}, []
    for k in ks:
        rec = _embed_record(rp, k)
        path = Path(rec["checkpoint"])
        if not path.is_file():
            raise BundleError(f"CNN fold {k}: checkpoint {path} named by {rp.embedding_record('oof', k)} is missing")
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        cfgs.append(ckpt.get("cfg", {}))
        records.append(rec)
        losses[str(k)] = ckpt.get("valid_logloss")
        files[f"cnn_fold{k}.pth"] = path
    arch = {c.get("arch") for c in cfgs}
    mode, size = {c.get("mode", "single") for c in cfgs}, {r["img_size"] for r in records}
    tta = {tuple(r["tta"]) for r in records}
    if len(arch) != 1 or len(mode) != 1 or len(size) != 1 or len(tta) != 1:
        raise BundleError(f"CNN folds differ in arch {arch}, mode {mode}, img_size {size} or TTA views {tta}")
    entry = {"arch": arch.pop(), "mode": mode.pop(), "img_size": size.pop(), "tta": list(tta.pop()), "folds": ks,
             "files": {str(k): f"cnn_fold{k}.pth" for k in ks}, "valid_logloss": losses, "train_cfg": cfgs[0]}
    return entry, files


def _seq_entry(rp: RunPaths, strategy: str, ks: List[int]) -> Tuple[Dict[str, Any], Dict[str, Path]]:
    from lib.sequence.strategies import STRATEGIES

    if strategy not in STRATEGIES:
        raise BundleError(f"sequence strategy {strategy!r} has no test-time rule; known: {STRATEGIES.names()}")
    rule = STRATEGIES.get(strategy).test
    root = rp.root / "models" / f"seq_{strategy}"
    log = read_json(root / "train_log.json")
    if not log:
        raise BundleError(f"{root / 'train_log.json'} is missing: run the sequence stage with strategy {strategy!r}")
    if log["config"].get("emb_suffix"):
        raise BundleError(f"seq_{strategy} was trained on per-epoch embeddings ({log['config']['emb_suffix']!r}); "
                          "only the best.pth embeddings are exported at test time")
    models, files = [], {}
    for k in ks:
        for tag in sorted({m["tag"] for m in log["models"]}):
            path = root / f"fold{k}" / f"{tag}.pth"
            if path.is_file():
                name = f"seq_{strategy}_fold{k}_{tag}.pth"
                files[name] = path
                models.append({"tag": tag, "fold": k, "file": name, "cnn_folds": rule.cnn_folds(k, ks)})
    if not models:
        raise BundleError(f"no sequence checkpoints for strategy {strategy!r} under {root}")
    return {"config": log["config"], "aggregate": rule.name, "models": models}, files


def _blend_entry(metrics: Dict[str, Any]) -> Dict[str, Any]:
    """The ensemble stage's blend from metrics.json (ensemble_weights, ensemble_postprocess, ensemble_method), with
    each input mapped to the predictions inference makes: "cnn", or "seq_<strategy>" ("seq" = the primary one)."""
    weights = metrics.get("ensemble_weights")
    if weights is None:
        return {"weights": {"cnn": 1.0}, "inputs": {"cnn": "cnn"}, "postprocess": False, "method": None,
                "source": "no ensemble stage in the run: the CNN alone"}
    if not isinstance(weights, dict) or not weights:
        raise BundleError(f"metrics.json ensemble_weights must map input names to weights, got {weights!r}")
    inputs = {}
    for name in weights:
        if name == "seq" and "seq_primary_strategy" not in metrics:
            raise BundleError("the blend uses 'seq' but metrics.json has no seq_primary_strategy")
        inputs[name] = f"seq_{metrics['seq_primary_strategy']}" if name == "seq" else name
        if inputs[name] != "cnn" and not inputs[name].startswith("seq_"):
            raise BundleError(f"blend input {name!r} is neither this run's 'cnn' nor a 'seq[_<strategy>]' "
                              "(blends with other runs are not packaged)")
    return {"weights": weights, "inputs": inputs, "postprocess": bool(metrics.get("ensemble_postprocess", False)),
            "method": metrics.get("ensemble_method"), "source": "metrics.json"}


def collect_weights(run_dir: PathLike) -> Tuple[Dict[str, Any], Dict[str, Path]]:
    """(manifest, {file name in the bundle: source path}) of everything test-time inference needs from a run."""
    rp = RunPaths.at(run_dir)
    run_manifest = read_json(rp.root / "manifest.json")
    params = stage_params(run_manifest)
    ks = sorted(int(k) for k in read_folds(rp.lookup("folds"))["fold"].unique())
    pre = {k: v for k, v in read_json(rp.lookup("cache") / "meta.json").items() if k in ("policy", "img_size", "crop",
                                                                                      "fmt")}
    if len(pre) != 4:
        raise BundleError(f"{rp.lookup('cache') / 'meta.json'} lacks the cache parameters (policy, img_size, ...)")
    cnn, files = _cnn_entry(rp, ks)
    blend = _blend_entry(rp.metrics())
    seq = {}
    for source in sorted(set(blend["inputs"].values()) - {"cnn"}):
        seq[source[4:]], more = _seq_entry(rp, source[4:], ks)
        files.update(more)
    metrics = {k: v for k, v in rp.metrics().items() if k.startswith("oof_")}
    manifest = {"format": FORMAT, "run": run_manifest.get("run", rp.root.name), "run_dir": str(rp.root),
                "git_commit": run_manifest.get("git_commit"), "packages": run_manifest.get("packages", {}),
                "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                "preprocess": pre, "cnn": cnn, "sequence": seq, "blend": blend, "metrics": metrics, "params": params}
    return manifest, files


def copy_checkpoint(src: PathLike, dst: PathLike, half: bool = False) -> None:
    """Copy a checkpoint; `half` stores its floating tensors as float16 (load_state_dict casts them back)."""
    if not half:
        shutil.copy2(src, dst)
        return
    ckpt = torch.load(src, map_location="cpu", weights_only=True)
    ckpt["model"] = {k: v.half() if v.is_floating_point() else v for k, v in ckpt["model"].items()}
    torch.save(ckpt, dst)


# ---------------------------------------------------------------- bundles
@dataclass(frozen=True)
class Bundle:
    """A manifest and where its files are (a packaged folder, or the run's own files)."""

    manifest: Dict[str, Any]
    files: Dict[str, Path]
    source: str

    @classmethod
    def from_folder(cls, folder: PathLike, task: Optional[str] = None) -> "Bundle":
        """A packaged weights folder; `task` given: it must be that task's (manifests without `task` are ich's)."""
        folder = Path(folder)
        manifest = read_json(folder / "manifest.json")
        if manifest.get("kind") != "weights" or manifest.get("format") != FORMAT:
            raise BundleError(f"{folder} is not a weights package of format {FORMAT} (lib.kaggle package-weights)")
        if task and manifest.get("task", "ich") != task:
            raise BundleError(f"{folder} holds weights of task {manifest.get('task', 'ich')!r}, not {task!r}")
        return cls(manifest, {n: folder / n for n in manifest["files"]}, str(folder))

    @classmethod
    def from_run(cls, run_dir: PathLike, collect: Optional[Collector] = None) -> "Bundle":
        """The run's own files, found by `collect` (a task's collect_weights; default the ICH one)."""
        manifest, files = (collect or collect_weights)(run_dir)
        return cls(manifest, files, str(run_dir))

    def path(self, name: str) -> Path:
        if name not in self.files or not self.files[name].is_file():
            raise BundleError(f"bundle {self.source} lacks file {name!r}")
        return self.files[name]


def load_bundle(weights_dir: str = "", weights_dataset: str = "", run_dir: str = "",
                collect: Optional[Collector] = None, task: Optional[str] = None) -> Bundle:
    """weights_dir (a packaged folder) > weights_dataset (attached Kaggle dataset slug) > the run's own models
    (found by `collect`, default the ICH collect_weights). `task`: a packaged folder must hold that task's weights."""
    if weights_dir:
        return Bundle.from_folder(weights_dir, task)
    if weights_dataset:
        return Bundle.from_folder(attached_dataset(weights_dataset), task)
    if run_dir:
        return Bundle.from_run(run_dir, collect)
    raise BundleError("no weights: pass weights_dir, weights_dataset (on Kaggle) or a run_dir with trained models")
