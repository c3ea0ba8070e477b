"""Out-of-fold embedding export: a trained 2D model's pooled embedding + 6 logits per image, with fixed TTA.

Files per export, `<prefix>` e.g. RUN/embeddings/oof_fold0:
  <prefix>.npy          float16 (N, D) pre-logits embedding (np.load(..., mmap_mode="r") works);
  <prefix>_logits.npy   float16 (N, L) logits, the task's label order;
  <prefix>.parquet      image_id, row (row = position in the two arrays);
  <prefix>.json         the export's record: tta views, checkpoint (relative to the embeddings folder when inside the
                        run), arch, mode, img_size (the size used), n, dim; written last (lib.kaggle.bundle reads it).
TTA: every view ("orig", "hflip", "vflip", "transpose") of a batch goes through the model; the embedding is the mean
of the views' embeddings and the logits are the mean of the views' logits. The head is linear on the embedding, so
the stored logits equal the head applied to the stored (averaged) embedding: the two arrays are consistent.
OOF: `export_fold(k)` embeds the images of fold k with model k (trained on the other folds) and every test image with
model k; `oof_table` checks that every labelled image got exactly one embedding, from the model that did not see it.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import pandas as pd
import torch
from torch import nn
from lib.progress import progress_bar

from lib.data.augment import create_transform
from lib.data.datasets import ImageDataset, ImageLoader, worker_init_fn
from lib.train.precision import autocast_dtype, resolve_device
from lib.models.factory import classifier_outputs, create_model, embedding_dim, forward_embed, norm_stats
from lib.paths import RunPaths, atomic_write_text, embedding_files
from lib.registry import Registry

PathLike = Union[str, Path]
TTA_VIEWS: Registry = Registry("TTA view")
TTA_VIEWS.add("orig", lambda x: x)
TTA_VIEWS.add("hflip", lambda x: x.flip(-1))
TTA_VIEWS.add("vflip", lambda x: x.flip(-2))
TTA_VIEWS.add("transpose", lambda x: x.transpose(-1, -2))


def load_model(checkpoint: PathLike, arch: str, device: torch.device) -> Tuple[nn.Module, Dict[str, Any]]:
    """(eval-mode model on `device`, checkpoint cfg dict or {}) from best.pth / epoch{e}.pth / a bare state_dict."""
    path = Path(checkpoint)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    state = ckpt["model"] if "model" in ckpt else ckpt
    cfg = ckpt.get("cfg", {}) if "model" in ckpt else {}
    if cfg.get("arch", arch) != arch:
        raise ValueError(f"{path} was trained with arch {cfg['arch']!r}, not {arch!r}")
    model = create_model(arch, num_classes=classifier_outputs(arch, state))
    model.load_state_dict(state)
    return model.to(device).eval(), cfg


@torch.no_grad()
def embed_views(model: nn.Module, x: torch.Tensor, views: Sequence[Callable]) -> Tuple[torch.Tensor, torch.Tensor]:
    """x float (B, 3, S, S) -> (mean embedding (B, D), mean logits (B, 6)) over the TTA views, float32."""
    emb_sum = logit_sum = None
    for view in views:
        emb, logits = forward_embed(model, view(x))
        emb_sum = emb.float() if emb_sum is None else emb_sum + emb.float()
        logit_sum = logits.float() if logit_sum is None else logit_sum + logits.float()
    return emb_sum / len(views), logit_sum / len(views)


def export_embeddings(checkpoint: PathLike, arch: str, cache_dir: PathLike, image_ids: Sequence[str],
                      out_prefix: PathLike, mode: str = "single", neighbours: Optional[pd.DataFrame] = None,
                      tta: Sequence[str] = ("orig", "hflip"), bs: int = 64, num_workers: int = 0,
                      device: str = "auto", img_size: Optional[int] = None, precision: str = "auto"
                      ) -> Dict[str, Any]:
    """Embed `image_ids` with the model in `checkpoint`; write <prefix>.npy, <prefix>_logits.npy, <prefix>.parquet.

    img_size None: the training size stored in the checkpoint's cfg (else the cached size). Inputs are normalised as
    in training (the checkpoint cfg's `norm`). On CUDA the forward runs with channels_last under the autocast of
    `lib.train.precision.resolve_precision(precision)` ("auto": bf16 where native, else fp16; "no": float32).
    Files are written under temporary names and renamed at the end.
    Returns {"n", "dim", "tta", "embeddings", "logits", "index", "record", "checkpoint", "seconds"}; the record
    file holds the same minus the paths of the arrays and the timing.
    """
    t0, views = time.time(), [TTA_VIEWS.get(v) for v in tta]
    if not views:
        raise ValueError("tta must name at least one view, e.g. ('orig',)")
    if not len(image_ids):
        raise ValueError(f"image_ids is empty: nothing to embed for {out_prefix}")
    dev = resolve_device(device)
    model, cfg = load_model(checkpoint, arch, dev)
    if cfg.get("mode", mode) != mode:
        raise ValueError(f"{checkpoint} was trained with mode {cfg['mode']!r}, not {mode!r}")
    size = img_size or cfg.get("img_size")
    mean, std = norm_stats(model, cfg.get("norm", "timm"))
    ids = [str(i) for i in image_ids]
    ds = ImageDataset(cache_dir, ids, mode=mode, neighbours=neighbours, mean=mean, std=std,
                      transform=create_transform("none", size) if size else None)
    dl = ImageLoader(ds, batch_size=bs, shuffle=False, num_workers=num_workers, worker_init_fn=worker_init_fn,
                    pin_memory=dev.type == "cuda")
    cuda, amp = dev.type == "cuda", autocast_dtype(precision, dev)
    if cuda:
        model.to(memory_format=torch.channels_last)
    prefix = Path(out_prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    paths = embedding_files(prefix)
    tmp = {k: p.with_name(f".{p.name}.{os.getpid()}.tmp") for k, p in paths.items() if k != "record"}
    dim = embedding_dim(model)
    emb_out = np.lib.format.open_memmap(tmp["embeddings"], mode="w+", dtype=np.float16, shape=(len(ids), dim))
    logits_out = np.zeros((len(ids), model.get_classifier().out_features), np.float16)
    for batch in progress_bar(dl, desc=f"embed {prefix.name}", unit="batch", leave=False):
        x = batch["image"].to(dev, non_blocking=True)
        if cuda:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast("cuda", dtype=amp or torch.float16, enabled=amp is not None):
            emb, logits = embed_views(model, x, views)
        rows = batch["index"].numpy()
        emb_out[rows] = emb.cpu().numpy().astype(np.float16)
        logits_out[rows] = logits.cpu().numpy().astype(np.float16)
    emb_out.flush()
    del emb_out
    with open(tmp["logits"], "wb") as fh:
        np.save(fh, logits_out)
    pd.DataFrame({"image_id": ids, "row": np.arange(len(ids), dtype=np.int64)}).to_parquet(tmp["index"], index=False)
    for k in ("embeddings", "logits", "index"):
        os.replace(tmp[k], paths[k])
    record = {"tta": list(tta), "checkpoint": _relative(Path(checkpoint), prefix.parent), "arch": arch, "mode": mode,
              "img_size": size, "n": len(ids), "dim": dim}
    atomic_write_text(paths["record"], json.dumps(record, indent=1))
    return {"n": len(ids), "dim": dim, "tta": list(tta), **{k: str(p) for k, p in paths.items()},
            "checkpoint": str(checkpoint), "seconds": round(time.time() - t0, 2)}


def _relative(path: Path, folder: Path) -> str:
    """`path` relative to `folder` when both lie in one run dir (a copied run keeps working), else absolute."""
    path, folder = path.resolve(), folder.resolve()
    return os.path.relpath(path, folder) if path.is_relative_to(folder.parent) else str(path)


def read_record(prefix: PathLike) -> Dict[str, Any]:
    """The record of the export at `prefix`, its checkpoint as an absolute path; FileNotFoundError if it has none."""
    path = embedding_files(prefix)["record"]
    if not path.is_file():
        raise FileNotFoundError(f"embedding export {prefix} has no record {path.name} (exports by lib.train.embed "
                                f"write it; re-run the embed stage)")
    record = json.loads(path.read_text())
    record["checkpoint"] = str((path.parent / record["checkpoint"]).resolve())
    return record


def _test_ids(rp: RunPaths) -> List[str]:
    path = rp.index("test")
    return pd.read_parquet(path, columns=["image_id"])["image_id"].astype(str).tolist() if path.exists() else []


def export_fold(run_dir: PathLike, cache_dir: PathLike, folds: pd.DataFrame, fold: int, arch: str,
                test_ids: Optional[Sequence[str]] = None, mode: str = "single",
                neighbours: Optional[pd.DataFrame] = None, tta: Sequence[str] = ("orig", "hflip"), bs: int = 64,
                num_workers: int = 0, device: str = "auto", img_size: Optional[int] = None,
                epochs: Optional[Sequence[int]] = None) -> Dict[str, List[Dict[str, Any]]]:
    """Fold k's model (models/cnn/fold{k}/best.pth) -> embeddings/oof_fold{k}.* for the images with fold == k and
    embeddings/test_fold{k}.* for `test_ids` (default: image_id of RUN/index/test.parquet; none -> no test export).
    `epochs`: also export from each epoch{e}.pth with suffix `_ep{e}`. fold -1 (the all-data model): test only,
    as test_all.*. Returns {"oof": [export_embeddings results], "test": [...]}.
    """
    rp = RunPaths.at(run_dir)
    mdir, fold = rp.model_dir(fold), int(fold)
    oof_ids = folds.loc[folds["fold"].astype(int) == fold, "image_id"].astype(str).tolist() if fold >= 0 else []
    if fold >= 0 and not oof_ids:
        raise ValueError(f"fold {fold} has no images in the folds table")
    test_ids = _test_ids(rp) if test_ids is None else [str(i) for i in test_ids]
    jobs = [("best.pth", "")] + [(f"epoch{int(e)}.pth", f"_ep{int(e)}") for e in (epochs or [])]
    out: Dict[str, List[Dict[str, Any]]] = {"oof": [], "test": []}
    kw = dict(mode=mode, neighbours=neighbours, tta=tta, bs=bs, num_workers=num_workers, device=device,
              img_size=img_size)
    for ckpt, suffix in jobs:
        for split, ids in (("oof", oof_ids), ("test", test_ids)):
            if ids:
                prefix = rp.embedding(split, fold, suffix)
                out[split].append(export_embeddings(mdir / ckpt, arch, cache_dir, ids, prefix, **kw))
    return out


def load_embeddings(prefix: PathLike) -> Tuple[np.ndarray, np.ndarray, pd.DataFrame]:
    """(embeddings float16 (N, D) memory-mapped read-only, logits float16 (N, 6), index df image_id/row)."""
    prefix = Path(prefix)
    paths = [embedding_files(prefix)[k] for k in ("embeddings", "logits", "index")]
    missing = [str(p) for p in paths if not p.exists()]
    if missing:
        raise FileNotFoundError(f"embedding export {prefix} is incomplete; missing {missing}")
    emb, logits, index = np.load(paths[0], mmap_mode="r"), np.load(paths[1]), pd.read_parquet(paths[2])
    if not len(emb) == len(logits) == len(index):
        raise ValueError(f"{prefix}: {len(emb)} embeddings, {len(logits)} logits, {len(index)} index rows differ")
    return emb, logits, index


def oof_table(run_dir: PathLike, folds: pd.DataFrame, suffix: str = "") -> Tuple[np.ndarray, np.ndarray]:
    """(image_ids (N,) str in folds order, OOF logits float32 (N, 6)) assembled from embeddings/oof_fold{k}{suffix}.

    Raises ValueError if an image's logits come from a model whose fold is not the image's fold, or if an image of
    `folds` has no OOF row or more than one.
    """
    rp = RunPaths.at(run_dir)
    fold_of = dict(zip(folds["image_id"].astype(str), folds["fold"].astype(int)))
    ids_parts, logit_parts = [], []
    for k in sorted(set(fold_of.values())):
        _, logits, index = load_embeddings(rp.embedding("oof", k, suffix))
        wrong = [i for i in index["image_id"] if fold_of.get(i) != k]
        if wrong:
            raise ValueError(f"oof_fold{k}{suffix} holds {len(wrong)} images not in fold {k}, e.g. {wrong[:3]}")
        ids_parts.append(index["image_id"].astype(str).to_numpy())
        logit_parts.append(np.asarray(logits, np.float32)[index["row"].to_numpy()])
    ids, logits = np.concatenate(ids_parts), np.concatenate(logit_parts)
    table = pd.DataFrame(logits, index=pd.Index(ids, name="image_id"))
    dup = table.index[table.index.duplicated()]
    if len(dup):
        raise ValueError(f"images with more than one OOF row, e.g. {dup[:3].tolist()}")
    want = folds["image_id"].astype(str).to_numpy()
    missing = np.setdiff1d(want, ids)
    if len(missing):
        raise ValueError(f"{len(missing)} images have no OOF embedding, e.g. {missing[:3].tolist()}")
    return want, table.loc[want].to_numpy(np.float32)
