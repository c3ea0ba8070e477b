"""Datasets and samplers for the 2D stage: cached uint8 images -> normalised tensors, slice neighbours, subsampling.

Batches are dicts: {"image": float32 (B, 3, S, S), "target": float32 (B, L) in the task's label order,
"image_id": list of str, "index": int64 (B,)}. Images come from the windowed cache
(`lib.imaging.windowing.load_cached`, uint8 (S, S, 3) RGB).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Dict, Iterator, Optional, Sequence, Union

import albumentations as A
import cv2
import numpy as np
import pandas as pd
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, Sampler, get_worker_info

from lib.imaging.windowing import cv2_single_thread, load_cached

PathLike = Union[str, Path]
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
MODES = ("single", "adjacent")


# ---------------------------------------------------------------- slice neighbours
def neighbours(index: pd.DataFrame) -> pd.DataFrame:
    """Previous / next slice of every image within its series, from the ordered header index.

    index: image_id, series_uid, slice_idx (order along the slice normal, see `lib.io.dicom_index.order_slices`).
    Returns image_id, prev_id, next_id in the row order of `index`; at the ends of a series the missing
    neighbour is the slice itself (as the 1st and 3rd places did). Gaps in slice_idx (dropped files) are skipped.
    """
    missing = [c for c in ("image_id", "series_uid", "slice_idx") if c not in index.columns]
    if missing:
        raise KeyError(f"index lacks columns {missing}; need image_id, series_uid, slice_idx")
    df = index[["image_id", "series_uid", "slice_idx"]].reset_index(drop=True)
    order = df.sort_values(["series_uid", "slice_idx", "image_id"], kind="stable")
    by_series = order.groupby("series_uid", sort=False)["image_id"]
    out = pd.DataFrame({"image_id": order["image_id"],
                        "prev_id": by_series.shift(1).fillna(order["image_id"]),
                        "next_id": by_series.shift(-1).fillna(order["image_id"])})
    return out.sort_index().reset_index(drop=True)


# ---------------------------------------------------------------- dataset
class ImageDataset(Dataset):
    """Cached windowed slices as normalised tensors, with their labels.

    cache_dir: a cache folder of `lib.imaging.windowing.build_cache` (`<image_id>.png` / `.npy`, uint8 (S, S, 3) RGB).
    image_ids: the N images of this dataset; labels: (N, L) 0/1 in the task's label order, or None (target = zeros
    of `num_classes`).
    mode: "single" = the cached 3-window image; "adjacent" = channel `adjacent_channel` (the policy's first window,
    e.g. brain) of slices s-1, s, s+1 as the 3 channels (needs `neighbours`, a table from `neighbours()`).
    transform: albumentations pipeline on the uint8 (S, S, 3) image, before normalisation with mean/std (fractions
    of 255). Item: {"image": float32 (3, S', S'), "target": float32 (L,), "image_id": str, "index": int}.
    """

    def __init__(self, cache_dir: PathLike, image_ids: Sequence[str], labels: Optional[np.ndarray] = None,
                 mode: str = "single", neighbours: Optional[pd.DataFrame] = None,
                 transform: Optional[A.Compose] = None, mean: Sequence[float] = IMAGENET_MEAN,
                 std: Sequence[float] = IMAGENET_STD, adjacent_channel: int = 0, num_classes: int = 0) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        self.cache_dir = Path(cache_dir)
        # fixed-width numpy strings, not a list of str: no refcount copy-on-read in forked DataLoader workers
        self.image_ids = np.asarray([str(i) for i in image_ids], dtype=str)
        n = len(self.image_ids)
        self.labels = None if labels is None else np.ascontiguousarray(labels, dtype=np.float32)
        if self.labels is not None and (self.labels.ndim != 2 or len(self.labels) != n):
            raise ValueError(f"labels must have shape ({n}, L), one row per image; got {self.labels.shape}")
        self.num_classes = self.labels.shape[1] if self.labels is not None else int(num_classes)
        self.mode, self.transform, self.adjacent_channel = mode, transform, int(adjacent_channel)
        self.prev_ids = self.next_ids = None
        if mode == "adjacent":
            self.prev_ids, self.next_ids = self._align_neighbours(neighbours)
        self.mean255 = np.asarray(mean, np.float32).reshape(-1, 1, 1) * np.float32(255.0)  # (3, 1, 1)
        self.inv_std255 = np.float32(1.0) / (np.asarray(std, np.float32).reshape(-1, 1, 1) * np.float32(255.0))

    def _align_neighbours(self, table: Optional[pd.DataFrame]) -> tuple:
        if table is None:
            raise ValueError("mode='adjacent' needs the `neighbours` table (lib.data.datasets.neighbours(index))")
        lut = table.drop_duplicates("image_id").set_index("image_id")
        pos = lut.index.get_indexer(self.image_ids)
        if (pos < 0).any():
            raise KeyError(f"{int((pos < 0).sum())} images are not in the neighbours table, "
                           f"e.g. {self.image_ids[pos < 0][:3].tolist()}")
        return (np.asarray(lut["prev_id"].to_numpy()[pos], dtype=str),
                np.asarray(lut["next_id"].to_numpy()[pos], dtype=str))

    def __len__(self) -> int:
        return len(self.image_ids)

    def load(self, i: int) -> np.ndarray:
        """uint8 (S, S, 3) image of item i before augmentation (RGB windows, or s-1, s, s+1 in adjacent mode)."""
        image_id = str(self.image_ids[i])
        if self.mode == "single":
            return load_cached(self.cache_dir, image_id)
        c = self.adjacent_channel
        centre = load_cached(self.cache_dir, image_id)[..., c]
        ids = (str(self.prev_ids[i]), str(self.next_ids[i]))
        prev, nxt = (centre if j == image_id else load_cached(self.cache_dir, j)[..., c] for j in ids)
        return np.stack([prev, centre, nxt], axis=-1)

    def normalise(self, img: np.ndarray) -> torch.Tensor:
        """uint8 (S, S, 3) -> float32 tensor (3, S, S): (img / 255 - mean) / std."""
        x = np.ascontiguousarray(img.transpose(2, 0, 1)).astype(np.float32)  # CHW first: ~8x faster than HWC math
        x -= self.mean255
        x *= self.inv_std255
        return torch.from_numpy(x)

    def __getitem__(self, i: int) -> Dict[str, object]:
        i = int(i)
        img = self.load(i)
        if self.transform is not None:
            img = self.transform(image=img)["image"]
        target = np.zeros(self.num_classes, np.float32) if self.labels is None else self.labels[i]
        return {"image": self.normalise(img), "target": torch.from_numpy(np.array(target, np.float32)),
                "image_id": str(self.image_ids[i]), "index": i}


class ImageLoader(DataLoader):
    """A torch DataLoader whose worker processes start with cv2's thread pool shut down in the parent.

    Linux DataLoader workers are forked. When the parent had run cv2 with its thread pool (a notebook that showed
    images, the main-process validation path), a forked worker inherits that pool's lock state and hangs for ever
    in its first cv2 call (seen on a 16-core GPU box; tests/test_data.py reproduces it on 2 cores). The pool is set
    to one thread (which stops its threads) only while the workers start (`lib.imaging.windowing.cv2_single_thread`).
    """

    def _get_iterator(self):  # the one place torch starts worker processes (once with persistent_workers)
        if self.num_workers == 0:
            return super()._get_iterator()
        with cv2_single_thread():
            return super()._get_iterator()


def worker_init_fn(worker_id: int) -> None:
    """DataLoader worker setup: one cv2 thread per worker, and a distinct albumentations seed per worker and epoch.

    albumentations 2 keeps its own RNG in `Compose`; forked workers would otherwise all copy the same state.
    The seed is torch's per-worker seed, so runs are reproducible after `torch.manual_seed`.
    """
    cv2.setNumThreads(1)
    info = get_worker_info()
    if info is None:
        return
    seed = info.seed % 2**32
    np.random.seed(seed)
    transform = getattr(info.dataset, "transform", None)
    if hasattr(transform, "set_random_seed"):
        transform.set_random_seed(seed)


# ---------------------------------------------------------------- negative subsampling
def subsample_size(labels_any: np.ndarray, neg_frac: float) -> int:
    """Number of indices `epoch_subsample` returns: all positives + round(neg_frac * n_negatives)."""
    y = np.asarray(labels_any).ravel().astype(bool)
    return int(y.sum()) + int(round(neg_frac * int((~y).sum())))


def epoch_subsample(labels_any: np.ndarray, neg_frac: float, epoch: int, seed: int) -> np.ndarray:
    """Sorted int64 indices: every positive of `labels_any` (N,) 0/1 + a random `neg_frac` of the negatives.

    The negatives change with `epoch` and are deterministic for (seed, epoch); the count is always
    `subsample_size(labels_any, neg_frac)`.
    """
    if not 0.0 < neg_frac <= 1.0:
        raise ValueError(f"neg_frac must be in (0, 1], got {neg_frac}")
    y = np.asarray(labels_any).ravel().astype(bool)
    neg = np.flatnonzero(~y)
    n_keep = int(round(neg_frac * len(neg)))
    rng = np.random.default_rng([int(seed), int(epoch)])
    keep = neg if n_keep == len(neg) else rng.choice(neg, size=n_keep, replace=False)
    return np.sort(np.concatenate([np.flatnonzero(y), keep])).astype(np.int64)


class SubsampleSampler(Sampler[int]):
    """Per-epoch negative subsampling (`epoch_subsample`), shuffled, optionally sharded for DDP.

    len(sampler) is the same every epoch: ceil(subsample_size / num_replicas). Like DistributedSampler, the
    epoch's (shuffled) index list is padded by repeating its head to num_replicas * len, and rank r takes
    positions r, r + num_replicas, ...; ranks are disjoint up to the padding and together cover the list.
    rank / num_replicas default to torch.distributed's when a process group is initialised, else 0 / 1.
    Call `set_epoch(e)` before each epoch (fresh negatives and order; same on every rank).
    """

    def __init__(self, labels_any: np.ndarray, neg_frac: float, seed: int, shuffle: bool = True,
                 rank: Optional[int] = None, num_replicas: Optional[int] = None) -> None:
        self.labels_any = np.asarray(labels_any).ravel().astype(bool)
        self.neg_frac, self.seed, self.shuffle, self.epoch = float(neg_frac), int(seed), bool(shuffle), 0
        if not 0.0 < self.neg_frac <= 1.0:
            raise ValueError(f"neg_frac must be in (0, 1], got {neg_frac}")
        ddp = dist.is_available() and dist.is_initialized()
        self.num_replicas = int(num_replicas if num_replicas is not None else (dist.get_world_size() if ddp else 1))
        self.rank = int(rank if rank is not None else (dist.get_rank() if ddp else 0))
        if not 0 <= self.rank < self.num_replicas:
            raise ValueError(f"rank must be in [0, {self.num_replicas}), got {self.rank}")
        self.total = subsample_size(self.labels_any, self.neg_frac)
        self.num_samples = math.ceil(self.total / self.num_replicas)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def epoch_indices(self) -> np.ndarray:
        """This rank's int64 indices for the current epoch, length `len(self)`."""
        idx = epoch_subsample(self.labels_any, self.neg_frac, self.epoch, self.seed)
        if self.shuffle:
            idx = np.random.default_rng([self.seed, self.epoch, 1]).permutation(idx)
        padded = self.num_samples * self.num_replicas
        if padded > len(idx) and len(idx):
            idx = np.concatenate([idx, np.resize(idx, padded - len(idx))])
        return idx[self.rank:padded:self.num_replicas]

    def __iter__(self) -> Iterator[int]:
        return iter(self.epoch_indices().tolist())

    def __len__(self) -> int:
        return self.num_samples
