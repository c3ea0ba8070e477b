"""Metrics, each implemented once, chosen by name (`METRICS`), with the label names and weights given by the task.

- `weighted_log_loss(y, p, weights)`: the label-weighted mean binary log loss over all rows (the ICH metric with
  weights any = 2, subtypes = 1; equal to `sklearn.metrics.log_loss` on the flattened (row, label) pairs with sample
  weights, see tests). Probabilities are clipped to [EPS, 1 - EPS].
- `weighted_bce_with_logits(logits, y, weights, mask)`: the same quantity on logits in torch, the training loss of
  every stage (no clipping: log-sigmoid is exact), optionally over the unmasked rows only.
- `mean_auc(y, p)`: mean ROC AUC over the labels that have both classes.
- `study_weighted_log_loss`: the weighted log loss normalised within each study, then averaged over studies
  (`lib.evaluate.study_logloss`; RSNA 2022 cervical spine), on wide truth / prediction tables.
- `dice_per_channel(pred_mask, true_mask)` ("dice") and `iou_per_channel` ("iou"): overlap of binary masks
  (N, C, *spatial) per channel over the whole set (sums of intersections over sums of sizes; a channel empty in
  both is 1.0), from `overlap_counts`, which batched callers (the segmentation trainer's metric) accumulate.

The OOF report, blend fitting, the ensemble, the fastai validation metrics and the training losses all call these.
"""
from __future__ import annotations

from typing import Callable, Dict, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F

from lib.evaluate.study_logloss import study_weighted_logloss
from lib.registry import Registry

EPS = 1e-6
METRICS: Registry[Callable[..., Union[float, np.ndarray]]] = Registry("metric")


def _check(y_true: np.ndarray, y_pred: np.ndarray, n_labels: Optional[int] = None) -> tuple:
    y_true = np.asarray(y_true, dtype=np.float64)
    y_pred = np.asarray(y_pred, dtype=np.float64)
    if y_true.shape != y_pred.shape or y_true.ndim != 2 or (n_labels is not None and y_true.shape[1] != n_labels):
        want = f"(N, {n_labels})" if n_labels is not None else "(N, L), the same for both"
        raise ValueError(f"expected y_true and y_pred of shape {want}; got {y_true.shape} and {y_pred.shape}")
    if not np.isfinite(y_pred).all():
        raise ValueError("y_pred contains NaN or inf")
    return y_true, y_pred


def _weights(weights: Sequence[float], n: int) -> np.ndarray:
    w = np.asarray(weights, dtype=np.float64).reshape(-1)
    if w.shape != (n,) or (w < 0).any() or w.sum() <= 0:
        raise ValueError(f"weights must be {n} non-negative numbers with a positive sum; got {list(w)}")
    return w


def per_class_log_loss(y_true: np.ndarray, y_pred: np.ndarray, eps: float = EPS) -> np.ndarray:
    """(N, L) 0/1 labels and probabilities -> (L,) mean binary log loss per label (probabilities clipped)."""
    y_true, y_pred = _check(y_true, y_pred)
    p = np.clip(y_pred, eps, 1 - eps)
    return -(y_true * np.log(p) + (1 - y_true) * np.log(1 - p)).mean(axis=0)


def weighted_mean(per_class: np.ndarray, weights: Sequence[float]) -> float:
    """sum(w * x) / sum(w) over the labels."""
    per_class = np.asarray(per_class, dtype=np.float64)
    w = _weights(weights, len(per_class))
    return float((per_class * w).sum() / w.sum())


@METRICS.register("weighted_log_loss")
def weighted_log_loss(y_true: np.ndarray, y_pred: np.ndarray, weights: Sequence[float], eps: float = EPS) -> float:
    """(N, L) labels and probabilities, (L,) weights -> sum_l(w_l * ll_l) / sum(w), ll_l the mean over rows."""
    return weighted_mean(per_class_log_loss(y_true, y_pred, eps), weights)


METRICS.add("study_weighted_log_loss", study_weighted_logloss)


@METRICS.register("mean_auc")
def mean_auc(y_true: np.ndarray, y_pred: np.ndarray, weights: Optional[Sequence[float]] = None) -> float:
    """Mean ROC AUC over the labels that have both classes (NaN if none has); `weights` is ignored."""
    from sklearn.metrics import roc_auc_score

    y_true, y_pred = _check(y_true, y_pred)
    aucs = [roc_auc_score(y_true[:, j], y_pred[:, j]) for j in range(y_true.shape[1])
            if 0 < y_true[:, j].sum() < len(y_true)]
    return float(np.mean(aucs)) if aucs else float("nan")


def metric_report(y_true: np.ndarray, y_pred: np.ndarray, prefix: str, labels: Sequence[str],
                  weights: Sequence[float], eps: float = EPS) -> Dict[str, float]:
    """`{prefix}_logloss` plus `{prefix}_logloss_<label>` for each label, as plain floats for metrics.json."""
    y_true, y_pred = _check(y_true, y_pred, len(labels))
    per = per_class_log_loss(y_true, y_pred, eps)
    out = {f"{prefix}_logloss": weighted_mean(per, weights)}
    out.update({f"{prefix}_logloss_{s}": float(v) for s, v in zip(labels, per)})
    return out


def prior_predictions(y_train: np.ndarray, n: int) -> np.ndarray:
    """The prior-only baseline: every row gets each label's prevalence in `y_train`; shape (n, L)."""
    prev = np.asarray(y_train, dtype=np.float64).mean(axis=0)
    return np.tile(prev, (n, 1))


def weighted_bce_with_logits(logits: torch.Tensor, target: torch.Tensor, weights: Union[Sequence[float], torch.Tensor],
                             mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The training loss: `weighted_log_loss` of sigmoid(logits), in torch, summed in float32.

    logits, target: (..., L); weights: (L,); mask: bool (...) selecting the rows that count (None: all). Returns
    the mean over counted rows of sum_l(w_l * bce_l) / sum(w).
    """
    logits = logits.float()  # bf16/fp16 logits under mixed precision: the loss is summed in float32
    w = weights if torch.is_tensor(weights) else torch.as_tensor(np.asarray(weights, np.float32))
    w = w.to(dtype=logits.dtype, device=logits.device)
    bce = F.binary_cross_entropy_with_logits(logits, target.to(logits.dtype), reduction="none")
    per_row = (bce * w).sum(-1) / w.sum()
    if mask is None:
        return per_row.mean()
    m = mask.to(per_row.dtype)
    return (per_row * m).sum() / m.sum().clamp_min(1.0)


# ---------------------------------------------------------------- segmentation overlap
def _binary(mask: np.ndarray, name: str) -> np.ndarray:
    arr = np.asarray(mask)
    if arr.dtype != bool and ((arr != 0) & (arr != 1)).any():
        raise ValueError(f"{name} must be a binary mask (bool or 0/1 values); got values {np.unique(arr)[:5]}")
    return arr.astype(bool, copy=False)


def overlap_counts(pred_mask: np.ndarray, true_mask: np.ndarray) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Binary masks (N, C, *spatial), bool or 0/1 -> (intersection, predicted size, true size), each (C,) int64
    voxel counts summed over N and the spatial axes; sum these over batches for a set-level Dice / IoU."""
    if np.shape(pred_mask) != np.shape(true_mask) or np.ndim(pred_mask) < 2:
        raise ValueError(f"expected pred_mask and true_mask of one shape (N, C, ...); got {np.shape(pred_mask)} "
                         f"and {np.shape(true_mask)}")
    pred, true = _binary(pred_mask, "pred_mask"), _binary(true_mask, "true_mask")
    axes = (0,) + tuple(range(2, pred.ndim))
    inter = np.logical_and(pred, true).sum(axis=axes, dtype=np.int64)
    return inter, pred.sum(axis=axes, dtype=np.int64), true.sum(axis=axes, dtype=np.int64)


def dice_from_counts(inter: np.ndarray, pred_sum: np.ndarray, true_sum: np.ndarray) -> np.ndarray:
    """(C,) float64 Dice 2 I / (P + T); 1.0 where both masks are empty (P + T = 0)."""
    inter, total = np.asarray(inter, np.float64), np.asarray(pred_sum, np.float64) + np.asarray(true_sum, np.float64)
    return np.where(total > 0, 2 * inter / np.maximum(total, 1), 1.0)


def iou_from_counts(inter: np.ndarray, pred_sum: np.ndarray, true_sum: np.ndarray) -> np.ndarray:
    """(C,) float64 IoU I / (P + T - I); 1.0 where both masks are empty (union 0)."""
    inter = np.asarray(inter, np.float64)
    union = np.asarray(pred_sum, np.float64) + np.asarray(true_sum, np.float64) - inter
    return np.where(union > 0, inter / np.maximum(union, 1), 1.0)


@METRICS.register("dice")
def dice_per_channel(pred_mask: np.ndarray, true_mask: np.ndarray) -> np.ndarray:
    """Binary masks (N, C, *spatial) -> (C,) float64 Dice per channel over the whole set (both empty -> 1.0)."""
    return dice_from_counts(*overlap_counts(pred_mask, true_mask))


@METRICS.register("iou")
def iou_per_channel(pred_mask: np.ndarray, true_mask: np.ndarray) -> np.ndarray:
    """Binary masks (N, C, *spatial) -> (C,) float64 IoU (Jaccard) per channel over the whole set (both empty ->
    1.0)."""
    return iou_from_counts(*overlap_counts(pred_mask, true_mask))
