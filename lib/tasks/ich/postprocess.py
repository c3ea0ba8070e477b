"""ICH post-processing: `any` is at least the most likely subtype (a bleed of any subtype is a bleed)."""
from __future__ import annotations

from typing import Tuple

import numpy as np
import pandas as pd

from lib.ensemble import gated
from lib.tasks.ich.labels import SUBTYPES, WEIGHTS


def any_ge_max(df: pd.DataFrame) -> pd.DataFrame:
    """Consistency step: any = max(any, max over the 5 subtypes)."""
    out = df.copy()
    out["any"] = np.maximum(df["any"].to_numpy(), df[list(SUBTYPES[:-1])].to_numpy().max(axis=1))
    return out


def maybe_postprocess(oof_pred: pd.DataFrame, y: pd.DataFrame) -> Tuple[bool, float, float]:
    """Whether `any_ge_max` lowers the OOF loss -> (keep, loss_before, loss_after)."""
    return gated(any_ge_max, oof_pred, y[list(SUBTYPES)], WEIGHTS)
