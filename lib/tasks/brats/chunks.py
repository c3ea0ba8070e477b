"""Slice-stack datasets of the BraTS classifiers: fixed-length chunks of a series (seed CNN-LSTM) and one 3D stack
around the largest brain slice (1st place's 3D ResNet10), plus the patient-level mean over chunks.

Patient IDs are the competition's BraTS21ID as a zero-padded 5-digit string ("00012"); ints and shorter digit
strings are padded (`brats_id`).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from lib.models.slice_sequence import central_stack, central_start

PathLike = Union[str, Path]
Item = Tuple[Any, Union[np.ndarray, PathLike]]  # (patient ID, array or .npy file)
ID_NAME, PRED_NAME = "BraTS21ID", "MGMT_value"


def brats_id(value: Any) -> str:
    """A BraTS21ID as the 5-digit string: 12, "12", "00012" -> "00012"; anything else is a ValueError."""
    text = str(int(value)) if isinstance(value, (int, np.integer)) else str(value)
    if not text.isdigit() or len(text) > 5:
        raise ValueError(f"patient ID {value!r} is not a BraTS21ID (up to 5 digits)")
    return text.zfill(5)


def chunk_starts(n_slices: int, length: int = 35, stride: int = 5, cover_end: bool = False) -> List[int]:
    """First slice of each chunk of `length` consecutive slices of an `n_slices` series.

    Rule: starts 0, stride, 2 * stride, ... while start + length <= n_slices (the seed's sliding window). A series
    of at most `length` slices gives the one chunk [0] (padded at the end by the dataset); an empty series none.
    cover_end: also add n_slices - length when the last window stops short of the series end.
    """
    if length < 1 or stride < 1:
        raise ValueError(f"length and stride must be >= 1, got length={length}, stride={stride}")
    if n_slices < 0:
        raise ValueError(f"n_slices must be >= 0, got {n_slices}")
    if n_slices == 0:
        return []
    if n_slices <= length:
        return [0]
    starts = list(range(0, n_slices - length + 1, stride))
    if cover_end and starts[-1] + length < n_slices:
        starts.append(n_slices - length)
    return starts


def _load(obj: Union[np.ndarray, PathLike], mmap: bool = True) -> np.ndarray:
    if isinstance(obj, np.ndarray):
        return obj
    path = Path(obj)
    if not path.is_file():
        raise FileNotFoundError(f"slice stack file not found: {path}")
    return np.load(path, mmap_mode="r" if mmap else None)


def _labels(labels: Optional[Mapping[Any, Any]]) -> Optional[Dict[str, float]]:
    if labels is None:
        return None
    pairs = labels.items() if not isinstance(labels, pd.Series) else labels.to_dict().items()
    return {brats_id(k): float(v) for k, v in pairs}


def _resize(x: torch.Tensor, size: Optional[int]) -> torch.Tensor:
    """float (N, C, H, W) -> (N, C, size, size) bilinear; None or the same size: unchanged."""
    if not size or tuple(x.shape[-2:]) == (size, size) or x.shape[0] == 0:
        return x
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)


class _PatientItems(Dataset):
    """Shared bookkeeping: items normalised to (5-digit ID, array or path), labels, and the target of a patient."""

    def __init__(self, items: Sequence[Item], labels: Optional[Mapping[Any, Any]]) -> None:
        self.items = [(brats_id(pid), obj) for pid, obj in items]
        self.labels = _labels(labels)
        if self.labels is not None:
            missing = sorted({pid for pid, _ in self.items} - set(self.labels))
            if missing:
                raise KeyError(f"{len(missing)} patients have no label, e.g. {missing[:3]}")

    def target(self, pid: str) -> torch.Tensor:
        return torch.tensor(self.labels[pid] if self.labels is not None else float("nan"), dtype=torch.float32)


class ChunkDataset(_PatientItems):
    """Chunks of `length` slices (starts by `chunk_starts`) of every patient's slice stack, in item order.

    items: (patient ID, uint8 (Z, 3, H, W) stack of `lib.tasks.brats.masks.select_slices`, or its .npy file, read
    memory-mapped); labels: patient -> 0/1 (None at test time: y is NaN). Item i -> {"x": float32 (length, 3, S, S)
    in [0, 1] (the stack / 255, resized to `size` when given, zeros after the series end), "mask": bool (length,)
    True on real slices, "y": float32 (), "patient": str}. A patient with no slices has no chunk.
    """

    def __init__(self, items: Sequence[Item], labels: Optional[Mapping[Any, Any]] = None, length: int = 35,
                 stride: int = 5, size: Optional[int] = None, cover_end: bool = False) -> None:
        super().__init__(items, labels)
        self.length, self.size = int(length), size
        self.index: List[Tuple[int, int]] = []
        for i, (pid, obj) in enumerate(self.items):
            shape = _load(obj).shape
            if len(shape) != 4 or shape[1] != 3:
                raise ValueError(f"patient {pid}: stack must be (Z, 3, H, W), got shape {shape}")
            self.index += [(i, s) for s in chunk_starts(shape[0], self.length, stride, cover_end)]
        self.patients = [self.items[i][0] for i, _ in self.index]

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, k: int) -> Dict[str, Any]:
        i, start = self.index[k]
        pid, obj = self.items[i]
        part = np.asarray(_load(obj)[start:start + self.length], dtype=np.float32) / 255.0
        x = _resize(torch.from_numpy(part), self.size)
        n = x.shape[0]
        out = x.new_zeros((self.length,) + tuple(x.shape[1:]))
        out[:n] = x
        mask = torch.zeros(self.length, dtype=torch.bool)
        mask[:n] = True
        return {"x": out, "mask": mask, "y": self.target(pid), "patient": pid}


class CentralStackDataset(_PatientItems):
    """One 3D input per patient: `central_stack(volume, depth)` around the slice with the largest brain area.

    items: (patient ID, (Z, H, W) volume or its .npy file; uint8 is scaled by 1/255, float used as given, so
    normalise it first, e.g. `lib.io.mr_series.normalise`). Item i -> {"x": float32 (1, depth, S, S), "mask": bool
    (depth,) True on real slices (False on the zero padding), "y": float32 (), "patient": str}.
    """

    def __init__(self, items: Sequence[Item], labels: Optional[Mapping[Any, Any]] = None, depth: int = 64,
                 size: Optional[int] = None) -> None:
        super().__init__(items, labels)
        self.depth, self.size = int(depth), size
        for pid, obj in self.items:
            if len(_load(obj).shape) != 3:
                raise ValueError(f"patient {pid}: volume must be (Z, H, W), got shape {_load(obj).shape}")
        self.patients = [pid for pid, _ in self.items]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, k: int) -> Dict[str, Any]:
        pid, obj = self.items[k]
        vol = np.asarray(_load(obj))
        scale = 1.0 / 255.0 if vol.dtype == np.uint8 else 1.0
        start = central_start(vol, self.depth)
        stack = central_stack(vol, self.depth).astype(np.float32) * scale
        x = _resize(torch.from_numpy(stack)[:, None], self.size)[:, 0]
        z = torch.arange(start, start + self.depth)
        mask = (z >= 0) & (z < vol.shape[0])
        return {"x": x[None], "mask": mask, "y": self.target(pid), "patient": pid}


def patient_mean(patient_ids: Sequence[Any], chunk_probs: Union[Sequence[float], np.ndarray, torch.Tensor]
                 ) -> pd.Series:
    """Mean probability over each patient's chunks: pd.Series (index BraTS21ID 5-digit strings, sorted; name
    MGMT_value). patient_ids and chunk_probs: one per chunk, aligned."""
    probs = chunk_probs.detach().float().cpu().numpy() if isinstance(chunk_probs, torch.Tensor) else chunk_probs
    probs = np.asarray(probs, np.float64).reshape(-1)
    if len(probs) != len(patient_ids):
        raise ValueError(f"{len(patient_ids)} patient IDs for {len(probs)} chunk probabilities; expected one each")
    ids = pd.Index([brats_id(p) for p in patient_ids], name=ID_NAME)
    return pd.Series(probs, index=ids, name=PRED_NAME).groupby(level=0, sort=True).mean().rename(PRED_NAME)
