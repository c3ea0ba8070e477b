"""Series batching for the sequence stage: per-slice features from CNN embeddings, series items, padding masks, loss.

A series is every slice of one `series_uid` (one series per study in RSNA), ordered by `slice_idx` (along the slice
normal, deterministic tie-break; see `lib.io.dicom_index`). Per slice t the input vector is F = 3*D + C + 3
float32 values (C: the CNN's logits, 6 for ICH)

    [e_t (D), e_t - e_{t-1} (D), e_t - e_{t+1} (D), CNN logits (C), spacing_prev/scale, spacing_next/scale, rel_pos]

with the deltas zero at the series ends (where the index also has spacing 0). Embeddings are read from a float16
(N, D) memmap one series at a time, so the full array is never loaded. Heads live in `lib.models.seq_heads`; training
(fastai) and the fold strategies in `lib.sequence.strategies`; inference (`load_models`, `predict_probs`) is here, without fastai.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import pandas as pd
import torch

from torch import nn
from torch.utils.data import DataLoader, Dataset
from lib.progress import progress_bar

from lib.evaluate.metrics import weighted_bce_with_logits
from lib.paths import PathLike, RunPaths, embedding_files
from lib.models.seq_heads import create_head

N_META = 3  # spacing_prev, spacing_next, rel_pos


class SequenceDataError(ValueError):
    """Inputs of the sequence stage (index, embeddings rows, labels) do not fit together."""


def feature_dim(emb_dim: int, n_logits: int) -> int:
    """Per-slice input size F for slice vectors of size D and the CNN's L logits: 3*D + L + 3 meta values."""
    return 3 * int(emb_dim) + int(n_logits) + N_META


def slice_features(emb: np.ndarray, logits: np.ndarray, meta: np.ndarray,
                   has_prev: bool = False, has_next: bool = False) -> np.ndarray:
    """Per-slice inputs of one ordered run of slices -> float32 (L, 3D+C+3).

    emb (L', D) and logits (L', C) may carry one extra neighbour row on each side (`has_prev`/`has_next`), used
    only for the deltas of the first/last returned slice; meta (L, 3) = [spacing_prev, spacing_next, rel_pos],
    already scaled. Without a neighbour the delta is zero.
    """
    e = np.asarray(emb, dtype=np.float32)
    lo, hi = int(has_prev), len(e) - int(has_next)
    idx = np.arange(lo, hi)
    core = e[lo:hi]
    d_prev = core - e[np.where(idx > 0, idx - 1, idx)]
    d_next = core - e[np.where(idx < len(e) - 1, idx + 1, idx)]
    lg = np.asarray(logits[lo:hi], dtype=np.float32)
    return np.concatenate([e[lo:hi], d_prev, d_next, lg, np.asarray(meta, dtype=np.float32)], axis=1)


def reverse_features(x: np.ndarray, emb_dim: int, n_logits: int) -> np.ndarray:
    """Features of the same slices read in the opposite direction: flip order, swap prev/next deltas and spacings."""
    d = int(emb_dim)
    out = np.ascontiguousarray(x[::-1])
    out[:, d:2 * d], out[:, 2 * d:3 * d] = out[:, 2 * d:3 * d].copy(), out[:, d:2 * d].copy()
    sp = 3 * d + int(n_logits)
    out[:, [sp, sp + 1]] = out[:, [sp + 1, sp]]
    return out


def _as_row_series(rows_by_image: Union[Mapping[str, int], pd.Series]) -> pd.Series:
    return rows_by_image if isinstance(rows_by_image, pd.Series) else pd.Series(dict(rows_by_image), dtype=np.int64)


class SeriesDataset(Dataset):
    """One item per series: {"x": float32 (L, F), "y": float32 (L, C), "image_id": list[str] (L)}.

    index_df: header index rows (image_id, series key, slice_idx, spacing_prev, spacing_next, rel_pos [mm, 0..1]).
    emb: float16 (N, D) array or memmap; logits: (N, C), the CNN's; rows_by_image: image_id -> row of emb/logits.
    labels: wide table (index image_id, one column per label of the task) or None (then y is all zeros and
    `label_names` names the C predicted columns). crop=(min_len, max_len) draws a
    random contiguous window per item (deltas still use the true neighbours); reverse_p is the chance of reading
    the series backwards (reverse_p=1.0 always reverses: test-time flip). `rel_pos` stays the anatomical position.
    """

    def __init__(self, index_df: pd.DataFrame, emb: np.ndarray, logits: np.ndarray,
                 rows_by_image: Union[Mapping[str, int], pd.Series], labels: Optional[pd.DataFrame] = None,
                 series_key: str = "series_uid", crop: Optional[Tuple[int, int]] = None, reverse_p: float = 0.0,
                 seed: int = 0, spacing_scale: float = 10.0, label_names: Optional[Sequence[str]] = None) -> None:
        need = {"image_id", series_key, "slice_idx", "spacing_prev", "spacing_next", "rel_pos"}
        missing = sorted(need - set(index_df.columns))
        if missing:
            raise SequenceDataError(f"index_df lacks columns {missing}; expected {sorted(need)}")
        if emb.ndim != 2 or logits.ndim != 2 or len(logits) != len(emb):
            raise SequenceDataError(f"emb must be (N, D) and logits (N, C); got {emb.shape} and {logits.shape}")
        self.label_names = tuple(labels.columns) if labels is not None else tuple(label_names or ())
        if len(self.label_names) != logits.shape[1]:
            raise SequenceDataError(f"{logits.shape[1]} CNN logits per slice but labels {list(self.label_names)}")
        if crop is not None and not (1 <= int(crop[0]) <= int(crop[1])):
            raise ValueError(f"crop must be (min_len, max_len) with 1 <= min_len <= max_len; got {crop}")
        df = index_df.sort_values([series_key, "slice_idx", "image_id"], kind="stable")
        self.image_ids = df["image_id"].astype(str).to_numpy()
        self.rows = self._lookup_rows(_as_row_series(rows_by_image), emb.shape[0])
        self.y = self._lookup_labels(labels)
        self.meta = np.stack([df["spacing_prev"].to_numpy(np.float32) / spacing_scale,
                              df["spacing_next"].to_numpy(np.float32) / spacing_scale,
                              df["rel_pos"].to_numpy(np.float32)], axis=1)
        keys = df[series_key].to_numpy()
        starts = np.flatnonzero(np.r_[True, keys[1:] != keys[:-1]]) if len(keys) else np.zeros(0, np.int64)
        if len(np.unique(keys)) != len(starts):
            raise SequenceDataError(f"series key {series_key!r} values are not contiguous after sorting")
        self.bounds = np.stack([starts, np.r_[starts[1:], len(keys)]], axis=1).astype(np.int64)
        self.series_ids = keys[starts].astype(str) if len(keys) else np.zeros(0, str)
        self.emb, self.logits, self.emb_dim = emb, logits, int(emb.shape[1])
        self.crop, self.reverse_p, self.seed = crop, float(reverse_p), int(seed)
        self.rng = np.random.default_rng(seed)

    def _lookup_rows(self, rows: pd.Series, n_rows: int) -> np.ndarray:
        found = rows.reindex(self.image_ids)
        if found.isna().any():
            bad = self.image_ids[found.isna().to_numpy()]
            raise SequenceDataError(f"{len(bad)} images of index_df have no embedding row, e.g. {bad[:3].tolist()}")
        out = found.to_numpy().astype(np.int64)
        if len(out) and (out.min() < 0 or out.max() >= n_rows):
            raise SequenceDataError(f"embedding rows must lie in [0, {n_rows}); got [{out.min()}, {out.max()}]")
        return out

    def _lookup_labels(self, labels: Optional[pd.DataFrame]) -> Optional[np.ndarray]:
        if labels is None:
            return None
        y = labels.reindex(self.image_ids)
        if y.isna().any().any():
            bad = self.image_ids[y.isna().any(axis=1).to_numpy()]
            raise SequenceDataError(f"{len(bad)} images of index_df have no labels, e.g. {bad[:3].tolist()}")
        return y.to_numpy(np.float32)

    def __len__(self) -> int:
        return len(self.bounds)

    def reseed(self, seed: int) -> None:
        """New augmentation RNG (called per DataLoader worker by `seed_worker`)."""
        self.rng = np.random.default_rng(seed)

    def reversed(self) -> "SeriesDataset":
        """A view of the same data, uncropped and always read backwards (test-time flip)."""
        out = object.__new__(SeriesDataset)
        out.__dict__.update(self.__dict__)
        out.crop, out.reverse_p = None, 1.0
        return out

    def _window(self, n: int) -> Tuple[int, int]:
        if self.crop is None or n <= self.crop[0]:
            return 0, n
        length = int(self.rng.integers(self.crop[0], min(self.crop[1], n) + 1))
        start = int(self.rng.integers(0, n - length + 1))
        return start, start + length

    def __getitem__(self, i: int) -> Dict[str, Any]:
        s0, s1 = self.bounds[i]
        a, b = self._window(int(s1 - s0))
        lo, hi = max(a - 1, 0), min(b + 1, int(s1 - s0))
        rows = self.rows[s0 + lo:s0 + hi]
        x = slice_features(self.emb[rows], self.logits[rows], self.meta[s0 + a:s0 + b],
                           has_prev=a > lo, has_next=hi > b)
        y = self.y[s0 + a:s0 + b] if self.y is not None else np.zeros((b - a, len(self.label_names)), np.float32)
        ids = self.image_ids[s0 + a:s0 + b].tolist()
        if self.reverse_p > 0 and (self.reverse_p >= 1.0 or self.rng.random() < self.reverse_p):
            x, y, ids = reverse_features(x, self.emb_dim, len(self.label_names)), y[::-1], ids[::-1]
        return {"x": np.ascontiguousarray(x, np.float32), "y": np.ascontiguousarray(y, np.float32), "image_id": ids}

    def __getstate__(self) -> Dict[str, Any]:
        """Pickle memmaps by file name (spawn/forkserver workers), never by content."""
        state = dict(self.__dict__)
        for k in ("emb", "logits"):
            arr = state[k]
            if isinstance(arr, np.memmap) and arr.filename is not None:
                state[k] = ("__memmap__", str(arr.filename), arr.dtype.str, arr.shape, int(arr.offset))
        return state

    def __setstate__(self, state: Dict[str, Any]) -> None:
        for k in ("emb", "logits"):
            v = state[k]
            if isinstance(v, tuple) and v and v[0] == "__memmap__":
                state[k] = np.memmap(v[1], dtype=np.dtype(v[2]), mode="r", shape=tuple(v[3]), offset=v[4])
        self.__dict__.update(state)


def seed_worker(worker_id: int) -> None:
    """DataLoader `worker_init_fn`: give every worker's dataset(s) its own augmentation RNG."""
    info = torch.utils.data.get_worker_info()
    datasets = getattr(info.dataset, "datasets", [info.dataset])
    for j, ds in enumerate(datasets):
        if hasattr(ds, "reseed"):
            ds.reseed(torch.initial_seed() % 2**32 + j)


def collate_series(items: Sequence[Dict[str, Any]]) -> Dict[str, Any]:
    """Post-pad a list of series items: x (B, Lmax, F) float32, y (B, Lmax, C), mask bool (B, Lmax) True on real
    slices, lengths int64 (B,), image_id list of B lists."""
    lengths = torch.tensor([len(it["image_id"]) for it in items], dtype=torch.int64)
    bsz, lmax, nf = len(items), int(lengths.max()), items[0]["x"].shape[1]
    x = torch.zeros(bsz, lmax, nf, dtype=torch.float32)
    y = torch.zeros(bsz, lmax, items[0]["y"].shape[1], dtype=torch.float32)
    for b, it in enumerate(items):
        x[b, :lengths[b]] = torch.from_numpy(np.require(it["x"], requirements="W"))  # memmap views are read-only
        y[b, :lengths[b]] = torch.from_numpy(np.require(it["y"], requirements="W"))
    mask = torch.arange(lmax)[None, :] < lengths[:, None]
    return {"x": x, "y": y, "mask": mask, "lengths": lengths, "image_id": [list(it["image_id"]) for it in items]}


def collate_for_learner(items: Sequence[Dict[str, Any]]) -> Tuple[torch.Tensor, ...]:
    """fastai batch: (x, mask, y, mask) with `n_inp=2`, so the model gets (x, mask) and the loss (pred, y, mask)."""
    b = collate_series(items)
    return b["x"], b["mask"], b["y"], b["mask"]


def split_output(out: Union[torch.Tensor, Tuple[torch.Tensor, ...], Dict[str, torch.Tensor]]
                 ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """A head's output -> (main logits (B, L, C), aux logits or None)."""
    if isinstance(out, dict):
        return out["logits"], out.get("aux")
    if isinstance(out, (tuple, list)):
        return out[0], (out[1] if len(out) > 1 else None)
    return out, None


def masked_weighted_bce(logits: torch.Tensor, y: torch.Tensor, mask: torch.Tensor,
                        weights: Sequence[float]) -> torch.Tensor:
    """The metric-weighted BCE (`lib.evaluate.metrics.weighted_bce_with_logits`) over real slices only.

    logits, y: (B, L, C); mask: bool (B, L).
    """
    return weighted_bce_with_logits(logits, y, weights, mask)


class SeqLoss:
    """fastai loss_func(pred, y, mask): masked weighted BCE of the main logits + aux_weight * the same on aux;
    `weights`: the task's metric weight per label."""

    def __init__(self, weights: Sequence[float], aux_weight: float = 0.0) -> None:
        self.weights, self.aux_weight = tuple(float(w) for w in weights), float(aux_weight)

    def __call__(self, pred: Any, y: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        main, aux = split_output(pred)
        loss = masked_weighted_bce(main, y, mask, self.weights)
        if aux is not None and self.aux_weight > 0:
            loss = loss + self.aux_weight * masked_weighted_bce(aux, y, mask, self.weights)
        return loss


def items_to_frame(ids: List[List[str]], probs: List[np.ndarray], label_names: Sequence[str]) -> pd.DataFrame:
    """Per-series image ids and (L, C) probabilities -> wide table indexed by image_id (`label_names` columns)."""
    flat_ids = [i for seq in ids for i in seq]
    vals = np.concatenate(probs, axis=0) if probs else np.zeros((0, len(label_names)))
    df = pd.DataFrame(vals, index=pd.Index(flat_ids, name="image_id"), columns=list(label_names))
    if df.index.duplicated().any():
        raise SequenceDataError(f"image ids predicted twice, e.g. {df.index[df.index.duplicated()][:3].tolist()}")
    return df


@dataclass(frozen=True)
class EmbeddingSet:
    """One CNN fold model's exported inputs: emb float16 (N, D) memmap, logits (N, C), rows image_id -> row."""

    name: str
    emb: np.ndarray
    logits: np.ndarray
    rows: pd.Series


def open_embedding_set(run_dir: PathLike, split: str, fold: int, suffix: str = "") -> EmbeddingSet:
    """Open `embeddings/{split}_fold{fold}{suffix}.npy` (+ `_logits.npy`, `.parquet`) memory-mapped."""
    prefix = RunPaths.at(run_dir).embedding(split, fold, suffix)
    stem = prefix.name
    files = [embedding_files(prefix)[k] for k in ("embeddings", "logits", "index")]
    missing = [str(p) for p in files if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"embeddings of CNN fold {fold} ({split}) missing: {missing}; run the export stage")
    emb, logits = np.load(files[0], mmap_mode="r"), np.load(files[1], mmap_mode="r")
    table = pd.read_parquet(files[2], columns=["image_id", "row"])
    rows = pd.Series(table["row"].to_numpy(np.int64), index=table["image_id"].astype(str).to_numpy())
    if len(emb) != len(logits) or rows.index.duplicated().any():
        raise SequenceDataError(f"{stem}: {len(emb)} embeddings, {len(logits)} logits rows, "
                                f"{int(rows.index.duplicated().sum())} duplicated image ids in the parquet")
    return EmbeddingSet(stem, emb, logits, rows)


def load_models(ckpt: Any, device: Optional[torch.device] = None) -> List[nn.Module]:
    """A checkpoint written by `fit_head` (dict or path) -> eval-mode heads, one per kept state."""
    if not isinstance(ckpt, dict):
        ckpt = torch.load(ckpt, map_location="cpu", weights_only=True)
    models = []
    for state in ckpt["states"]:
        m = create_head(ckpt["head"], ckpt["in_dim"], ckpt["num_classes"], **ckpt["head_kwargs"])
        m.load_state_dict(state)
        models.append(m.to(device or torch.device("cpu")).eval())
    return models


@torch.no_grad()
def predict_probs(models: List[nn.Module], ds: SeriesDataset, bs: int = 32, flip: bool = True,
                  num_workers: int = 0, progress: bool = True) -> pd.DataFrame:
    """Mean sigmoid probabilities over models (and forward + reversed series) -> wide df indexed by image_id."""
    device = next(models[0].parameters()).device
    views = [ds, ds.reversed()] if flip else [ds]
    total: Optional[pd.DataFrame] = None
    for view in views:
        ids, probs = [], []
        dl = DataLoader(view, batch_size=bs, shuffle=False, collate_fn=collate_series, num_workers=num_workers)
        for batch in progress_bar(dl, desc="predict series", disable=not progress, leave=False):
            x, mask = batch["x"].to(device), batch["mask"].to(device)
            p = torch.stack([torch.sigmoid(split_output(m.eval()(x, mask))[0].float()) for m in models]).mean(0)
            p = p.cpu().numpy()
            for b, n in enumerate(batch["lengths"].tolist()):
                ids.append(batch["image_id"][b])
                probs.append(p[b, :n])
        frame = items_to_frame(ids, probs, ds.label_names)
        total = frame if total is None else total + frame.reindex(total.index)
    return total / len(views)
