"""Random 3D training patches of cached cervical-spine volumes and their C1-C7 masks (lib.imaging.volume_cache).

Labels: 0 background, 1-7 = C1-C7; the masks' thoracic labels (8+) become background. Images: the cache's uint8 /
float16 window scaled to float32 [0, 1] (lib.imaging.volume_cache.to_unit).
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, Sequence, Tuple, Union

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset

from lib.imaging.volume_cache import load_segmentation, load_volume, to_unit

PathLike = Union[str, Path]
CERVICAL = tuple(f"C{i}" for i in range(1, 8))
N_CLASSES = 1 + len(CERVICAL)  # background + C1-C7
MAX_FG_POINTS = 20_000  # foreground voxels kept per volume to draw patch centres from


def cervical_labels(seg: np.ndarray) -> np.ndarray:
    """Mask labels (Z, Y, X) uint8 (1-7 C1-C7, 8+ thoracic) -> uint8 with 0 background, 1-7 C1-C7, others 0."""
    seg = np.asarray(seg)
    return np.where(seg <= len(CERVICAL), seg, 0).astype(np.uint8)


def crop_or_pad(array: np.ndarray, origin: Sequence[int], roi: Sequence[int]) -> np.ndarray:
    """array[origin : origin + roi] along (Z, Y, X), zero-padded at the far end where the volume is smaller."""
    src = tuple(slice(o, o + r) for o, r in zip(origin, roi))
    part = np.asarray(array[src])
    if part.shape == tuple(roi):
        return part
    return np.pad(part, [(0, r - s) for r, s in zip(roi, part.shape)])


class PatchDataset(Dataset):
    """`samples_per_volume` patches per table row (rows need a seg_path): item i -> (image float32 (1, *roi) in
    [0, 1], labels int64 (*roi) in 0..7).

    A patch is centred on a random C1-C7 voxel with probability `fg_prob`, else placed uniformly (clipped to the
    volume; volumes smaller than roi are zero-padded). augment=True: the draw comes from torch's RNG (reseeded per
    epoch by lib.train.callbacks.EpochSeed, per worker by the DataLoader) and `flips` adds random left-right (x)
    flips; augment=False: the same patches every epoch, from (seed, i), no flips (validation).
    """

    def __init__(self, cache_dir: PathLike, rows: pd.DataFrame, roi: Sequence[int], samples_per_volume: int,
                 augment: bool, fg_prob: float, flips: bool, seed: int = 0) -> None:
        missing = rows["seg_path"].isna() if "seg_path" in rows else pd.Series([True])
        if len(rows) == 0 or missing.any():
            raise ValueError(f"PatchDataset needs rows that all have a seg_path; got {len(rows)} rows, "
                             f"{int(missing.sum())} without a mask")
        if len(roi) != 3 or min(roi) < 1 or samples_per_volume < 1 or not 0 <= fg_prob <= 1:
            raise ValueError(f"need roi of 3 sizes >= 1, samples_per_volume >= 1, 0 <= fg_prob <= 1; got roi={roi}, "
                             f"samples_per_volume={samples_per_volume}, fg_prob={fg_prob}")
        self.cache_dir, self.rows = Path(cache_dir), rows.reset_index(drop=True)
        self.roi, self.k, self.augment = tuple(int(r) for r in roi), int(samples_per_volume), bool(augment)
        self.fg_prob, self.flips, self.seed = float(fg_prob), bool(flips), int(seed)
        self._fg: Dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return len(self.rows) * self.k

    def _foreground(self, j: int, labels: np.ndarray) -> np.ndarray:
        """(n, 3) int64 coordinates of up to MAX_FG_POINTS C1-C7 voxels of volume j (evenly thinned, cached)."""
        if j not in self._fg:
            idx = np.flatnonzero((labels > 0) & (labels <= len(CERVICAL)))
            idx = idx[np.linspace(0, len(idx) - 1, min(len(idx), MAX_FG_POINTS)).astype(int)] if len(idx) else idx
            self._fg[j] = np.stack(np.unravel_index(idx, labels.shape), 1) if len(idx) else np.zeros((0, 3), int)
        return self._fg[j]

    def _origin(self, rng: np.random.Generator, shape: Tuple[int, ...], fg: np.ndarray) -> Tuple[int, ...]:
        high = [max(s - r, 0) for s, r in zip(shape, self.roi)]
        if len(fg) and rng.random() < self.fg_prob:
            centre = fg[rng.integers(len(fg))]
            return tuple(int(np.clip(c - r // 2, 0, h)) for c, r, h in zip(centre, self.roi, high))
        return tuple(int(rng.integers(h + 1)) for h in high)

    def __getitem__(self, i: int) -> Tuple[torch.Tensor, torch.Tensor]:
        if not 0 <= i < len(self):
            raise IndexError(f"patch index {i} out of range for {len(self)} patches")
        j = i // self.k
        row = self.rows.iloc[j]
        image, seg = load_volume(self.cache_dir, row), load_segmentation(self.cache_dir, row)
        rng = (np.random.default_rng(int(torch.randint(0, 2**62, ()).item())) if self.augment
               else np.random.default_rng([self.seed, i]))
        origin = self._origin(rng, image.shape, self._foreground(j, seg))
        x = to_unit(crop_or_pad(image, origin, self.roi))
        y = cervical_labels(crop_or_pad(seg, origin, self.roi))
        if self.augment and self.flips and rng.random() < 0.5:
            x, y = x[..., ::-1], y[..., ::-1]
        return (torch.from_numpy(np.ascontiguousarray(x, np.float32))[None],
                torch.from_numpy(np.ascontiguousarray(y).astype(np.int64)))
