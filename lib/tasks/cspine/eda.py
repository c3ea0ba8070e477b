"""What the cervical-spine EDA notebook shows: label prevalences against the real train.csv, a per-study header
summary (slices, spacing, slice direction, transfer syntax, intercept, Modality present), and sagittal / coronal
reformats of a study with its segmentation and fracture boxes overlaid."""
from __future__ import annotations

from pathlib import Path
from typing import Dict, Optional, Sequence

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pydicom

from lib.io.ct_volume import read_ct_volume, segmentation_for, slice_files
from lib.progress import progress_bar
from lib.tasks.cspine.data import CspineData
from lib.tasks.cspine.metric import CSPINE_GROUP, CSPINE_LABELS

#: Positives / 2,019 studies in the real train.csv (the competition's data page).
REAL_PREVALENCE = {"patient_overall": 0.476, "C1": 0.072, "C2": 0.141, "C3": 0.036, "C4": 0.053, "C5": 0.080,
                   "C6": 0.137, "C7": 0.195}


def prevalence_table(labels: pd.DataFrame) -> pd.DataFrame:
    """Positives and prevalence per label beside the real train.csv's."""
    return pd.DataFrame({"positives": labels[list(CSPINE_LABELS)].sum(),
                         "prevalence": labels[list(CSPINE_LABELS)].mean(),
                         "real_prevalence": pd.Series(REAL_PREVALENCE)}).loc[list(CSPINE_LABELS)]


def _header(path: Path) -> pydicom.Dataset:
    return pydicom.dcmread(path, stop_before_pixels=True)


def study_summary(folders: Dict[str, Path], progress: bool = True) -> pd.DataFrame:
    """One row per study from the headers of its first and last slice_number: n_slices, rows, cols, pixel spacing,
    slice thickness, direction ('head_first' when slice_number 1 is the top), transfer syntax, intercept, modality
    (empty when the tag is missing); a folder that cannot be listed gets its error in `problem`."""
    rows = []
    for study, folder in progress_bar(folders.items(), desc="headers", unit="study", disable=not progress):
        try:
            files = slice_files(folder)
            first, last = _header(files[min(files)]), _header(files[max(files)])
            z0, z1 = float(first.ImagePositionPatient[2]), float(last.ImagePositionPatient[2])
            rows.append({CSPINE_GROUP: study, "n_slices": len(files), "rows": int(first.Rows),
                         "cols": int(first.Columns), "pixel_spacing": float(first.PixelSpacing[0]),
                         "slice_thickness": float(getattr(first, "SliceThickness", np.nan)),
                         "direction": "head_first" if z0 > z1 else "feet_first",
                         "syntax": first.file_meta.TransferSyntaxUID.name,
                         "intercept": float(getattr(first, "RescaleIntercept", 0.0)),
                         "modality": str(getattr(first, "Modality", "")), "problem": ""})
        except Exception as exc:  # noqa: BLE001 - the EDA lists what it cannot read
            rows.append({CSPINE_GROUP: study, "problem": f"{type(exc).__name__}: {exc}"[:200]})
    return pd.DataFrame(rows)


def reformat_figure(data: CspineData, study: str, boxes: Optional[pd.DataFrame] = None) -> plt.Figure:
    """Mid-sagittal and mid-coronal reformats of a training study (HU, bone window) with its segmentation (C1-C7
    coloured) and, on the sagittal view, the z range of each fracture box."""
    vol = read_ct_volume(data.images("train") / study)
    seg_path = data.segmentations / f"{study}.nii"
    seg = segmentation_for(vol, seg_path) if seg_path.is_file() else None
    hu = np.clip(vol.hu, -400, 1600)
    aspect = vol.spacing[0] / vol.spacing[1]
    fig, axes = plt.subplots(1, 2, figsize=(9, 4.5))
    for ax, axis, title in zip(axes, (2, 1), ("sagittal", "coronal")):
        mid = hu.shape[axis] // 2
        ax.imshow(np.take(hu, mid, axis=axis), cmap="gray", aspect=aspect)
        if seg is not None:
            m = np.take(np.where(seg <= 7, seg, 0), mid, axis=axis)
            ax.imshow(np.ma.masked_equal(m, 0), cmap="tab10", vmin=0, vmax=9, alpha=0.45, aspect=aspect)
        ax.set_title(title + (" + mask" if seg is not None else ""))
        ax.axis("off")
    if boxes is not None and len(boxes):
        rank = {int(n): k for k, n in enumerate(vol.slice_numbers)}
        for _, b in boxes[boxes[CSPINE_GROUP] == study].iterrows():
            z = rank.get(int(b["slice_number"]))
            if z is not None:
                axes[0].plot([b["y"], b["y"] + b["height"]], [z, z], color="red", lw=1)
    fig.suptitle(f"{study}  spacing {tuple(round(s, 2) for s in vol.spacing)} mm", fontsize=8)
    return fig


def pick_studies(labels: pd.DataFrame, data: CspineData, boxes: pd.DataFrame, n: int) -> Sequence[str]:
    """Up to `n` training studies, those with both a mask and boxes first, then masked ones."""
    masked = set(data.segmentation_paths(list(labels[CSPINE_GROUP])))
    boxed = set(boxes[CSPINE_GROUP]) if len(boxes) else set()
    order = sorted(masked & boxed) + sorted(masked - boxed)
    return order[:n]
