"""Stage 2 of the BraTS seed (T4E): tumour masks on task-2 slices, the slice filter, and the 3-channel slice stacks.

A stage-1 segmenter (trained on task 1) predicts whole tumour (WT) and enhancing tumour (ET) probabilities on every
task-2 slice. The seed zooms each slice in by 1.2 and centre-crops it back to its size before predicting (task-2
brains fill less of the frame than task-1 brains), then maps the masks back to the original frame (`zoom_predict`).
A slice is kept when its largest WT contour covers more than 2.5 % of its largest brain contour and the WT mask has
at most 5 contours (`contour_filter`); a kept slice becomes the uint8 stack `[image, WT, ET]` (`stack_slice`).
`select_slices` does both for a whole series.
"""
from __future__ import annotations

from typing import Callable, Optional, Tuple, Union

import cv2
import numpy as np
import torch
import torch.nn.functional as F

ArrayLike = Union[np.ndarray, torch.Tensor]
#: percentile of a volume's non-zero voxels that maps to 255 in `select_slices` (robust to a few bright outliers)
VMAX_PERCENTILE = 99.5


def _resize(x: np.ndarray, size: Tuple[int, int]) -> np.ndarray:
    """float32 (N, C, H, W) -> (N, C, *size), bilinear (half-pixel centres, torch `align_corners=False`)."""
    t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    return F.interpolate(t, size=size, mode="bilinear", align_corners=False).numpy()


def zoom_geometry(height: int, width: int, zoom: float) -> Tuple[Tuple[int, int], Tuple[int, int]]:
    """((Hz, Wz) zoomed size, (top, left) crop offset in the zoomed frame) for zooming an H x W image by `zoom`
    (to round(H * zoom) x round(W * zoom)) and centre-cropping it back to H x W."""
    hz, wz = int(round(height * zoom)), int(round(width * zoom))
    return (hz, wz), ((hz - height) // 2, (wz - width) // 2)


def zoom_in(images: np.ndarray, zoom: float) -> np.ndarray:
    """float32 (N, C, H, W) -> (N, C, H, W): each image magnified by `zoom` about its centre, centre-cropped."""
    h, w = images.shape[2:]
    (hz, wz), (top, left) = zoom_geometry(h, w, zoom)
    return _resize(images, (hz, wz))[:, :, top:top + h, left:left + w]


def _crop_coords(n: int, n_zoomed: int, offset: int) -> torch.Tensor:
    """Continuous crop-frame coordinate (0 .. n = the crop's edges) of the centre of each original pixel 0 .. n-1."""
    return (torch.arange(n, dtype=torch.float32) + 0.5) * n_zoomed / n - offset


def zoom_out(masks: np.ndarray, zoom: float) -> np.ndarray:
    """Inverse of `zoom_in` for predictions: float32 (N, K, H, W) in the zoomed crop -> (N, K, H, W) in the
    original frame. Each original pixel samples the crop bilinearly at its exact preimage (the crop shrunk by
    `zoom` and put back where it came from); pixels outside the crop, which the predictor never saw, are 0."""
    n, k, h, w = masks.shape
    (hz, wz), (top, left) = zoom_geometry(h, w, zoom)
    cy, cx = _crop_coords(h, hz, top), _crop_coords(w, wz, left)
    gy, gx = torch.meshgrid(2 * cy / h - 1, 2 * cx / w - 1, indexing="ij")  # grid_sample's [-1, 1] = crop edges
    grid = torch.stack([gx, gy], dim=-1).expand(n, h, w, 2)
    src = torch.from_numpy(np.ascontiguousarray(masks, dtype=np.float32))
    out = F.grid_sample(src, grid, mode="bilinear", padding_mode="border", align_corners=False)
    inside = ((cy >= 0) & (cy <= h))[:, None] & ((cx >= 0) & (cx <= w))[None, :]
    return (out * inside.to(out.dtype)).numpy()


def zoom_predict(predict_fn: Callable[[np.ndarray], ArrayLike], images: np.ndarray, zoom: float = 1.2,
                 batch_size: Optional[int] = None) -> np.ndarray:
    """Predict masks on zoomed-in images and map them back: float32 (N, C, H, W) -> probabilities float32 (N, K, H, W).

    predict_fn: float32 (n, C, H, W) -> probabilities (n, K, H, W) (numpy or torch), called on `batch_size` images
    at a time (None: all at once). zoom >= 1; zoom == 1 predicts on the images as they are.
    """
    images = np.asarray(images, dtype=np.float32)
    if images.ndim != 4:
        raise ValueError(f"images must be (N, C, H, W), got shape {images.shape}")
    if not zoom >= 1.0:
        raise ValueError(f"zoom must be >= 1 (zoom in, then centre-crop), got {zoom}")
    step = int(batch_size) if batch_size else max(len(images), 1)
    outs = []
    for i in range(0, len(images), step):
        batch = zoom_in(images[i:i + step], zoom) if zoom != 1.0 else images[i:i + step]
        pred = predict_fn(batch)
        pred = pred.detach().float().cpu().numpy() if isinstance(pred, torch.Tensor) else np.asarray(pred, np.float32)
        if pred.ndim != 4 or pred.shape[0] != len(batch) or pred.shape[2:] != batch.shape[2:]:
            raise ValueError(f"predict_fn returned shape {pred.shape} for input {batch.shape}; expected (n, K, H, W)")
        outs.append(zoom_out(pred, zoom) if zoom != 1.0 else pred.astype(np.float32))
    return np.concatenate(outs) if outs else np.zeros((0, 0) + images.shape[2:], np.float32)


def _contours(mask: np.ndarray) -> list:
    found = cv2.findContours(np.ascontiguousarray(mask, dtype=np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    return list(found[-2])


def contour_stats(mask: np.ndarray) -> Tuple[int, float]:
    """(number of outer contours, area of the largest, px^2) of a (H, W) bool mask, by `cv2.findContours`.

    `cv2.contourArea` measures the polygon through the boundary pixel centres: an n x n square has area (n - 1)^2.
    """
    contours = _contours(np.asarray(mask, bool))
    return len(contours), max((float(cv2.contourArea(c)) for c in contours), default=0.0)


def contour_filter(brain: np.ndarray, wt: np.ndarray, min_ratio: float = 0.025, max_contours: int = 5) -> bool:
    """Keep a slice: (largest WT contour area) / (largest brain contour area) > min_ratio and <= max_contours WT
    contours. brain, wt: (H, W) bool. A slice without brain or WT contour area is dropped."""
    brain, wt = np.asarray(brain, bool), np.asarray(wt, bool)
    if brain.shape != wt.shape or brain.ndim != 2:
        raise ValueError(f"brain and wt must be (H, W) masks of one shape, got {brain.shape} and {wt.shape}")
    n_wt, wt_area = contour_stats(wt)
    _, brain_area = contour_stats(brain)
    if brain_area <= 0 or n_wt == 0 or n_wt > max_contours:
        return False
    return wt_area / brain_area > min_ratio


def stack_slice(image: np.ndarray, wt: np.ndarray, et: np.ndarray, vmax: Optional[float] = None) -> np.ndarray:
    """The seed's 3-channel slice: uint8 (3, H, W) = [image, WT, ET].

    image: (H, W) MR intensities >= 0 (any unit); channel 0 = round(255 * clip(image / vmax, 0, 1)), vmax default
    the slice's maximum (an all-zero or negative slice gives 0). wt, et: (H, W) bool or 0/1; non-zero -> 255.
    """
    image = np.asarray(image, np.float32)
    if image.ndim != 2 or np.shape(wt) != image.shape or np.shape(et) != image.shape:
        raise ValueError(f"image, wt and et must be (H, W) of one shape, got {image.shape}, {np.shape(wt)}, "
                         f"{np.shape(et)}")
    top = float(image.max()) if vmax is None else float(vmax)
    chan0 = np.zeros(image.shape, np.uint8) if top <= 0 else \
        np.round(255.0 * np.clip(image / top, 0.0, 1.0)).astype(np.uint8)
    masks = [np.where(np.asarray(m) != 0, 255, 0).astype(np.uint8) for m in (wt, et)]
    return np.stack([chan0, *masks])


def volume_vmax(volume: np.ndarray, percentile: float = VMAX_PERCENTILE) -> float:
    """`percentile` of the non-zero voxels of `volume` (0.0 for an all-zero volume): the value that maps to 255."""
    volume = np.asarray(volume)
    nz = volume[volume > 0]
    return float(np.percentile(nz, percentile)) if nz.size else 0.0


def select_slices(volume: np.ndarray, wt_prob: np.ndarray, et_prob: np.ndarray, threshold: float = 0.5,
                  min_ratio: float = 0.025, max_contours: int = 5, vmax: Optional[float] = None
                  ) -> Tuple[np.ndarray, np.ndarray]:
    """Filter a series by `contour_filter` and stack the kept slices.

    volume: (Z, H, W) MR intensities, background 0 (skull-stripped; brain = volume > 0); wt_prob, et_prob:
    (Z, H, W) probabilities in [0, 1], binarised at `> threshold`. vmax: intensity mapped to 255 (default
    `volume_vmax(volume)`, one scale for the whole series). Returns (kept slice indices int64 (Z',), stacks
    uint8 (Z', 3, H, W)); Z' may be 0.
    """
    volume = np.asarray(volume)
    if volume.ndim != 3 or np.shape(wt_prob) != volume.shape or np.shape(et_prob) != volume.shape:
        raise ValueError(f"volume, wt_prob and et_prob must be (Z, H, W) of one shape, got {volume.shape}, "
                         f"{np.shape(wt_prob)}, {np.shape(et_prob)}")
    wt, et = np.asarray(wt_prob) > threshold, np.asarray(et_prob) > threshold
    keep = [z for z in range(len(volume)) if contour_filter(volume[z] > 0, wt[z], min_ratio, max_contours)]
    top = volume_vmax(volume) if vmax is None else float(vmax)
    stacks = [stack_slice(volume[z], wt[z], et[z], vmax=top) for z in keep]
    out = np.stack(stacks) if stacks else np.zeros((0, 3) + volume.shape[1:], np.uint8)
    return np.asarray(keep, np.int64), out
