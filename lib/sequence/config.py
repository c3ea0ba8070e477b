"""Sequence-stage settings (`SeqConfig`), the per-slice input vector and the device rule: everything inference needs
of the sequence stage, without fastai (training lives in `lib.sequence.strategies`)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Dict, List, Optional, Tuple

import numpy as np
import pandas as pd
import torch

from lib import config
from lib.ensemble import mean_frames
from lib.registry import Registry
from lib.sequence.features import EmbeddingSet

INPUTS = {"embedding": lambda es: es.emb, "logits": lambda es: es.logits}


@dataclass(kw_only=True)
class SeqConfig:
    """Sequence-stage parameters (`from_dict`: unknown keys or missing settings are an error).

    Experiment settings have no defaults: notebooks/ich/04_sequence.ipynb's parameters cell is their one source
    (`from_params` maps its unset literals and its crop_min / crop_max pair, lib.config); run-time knobs keep
    neutral defaults.
    """

    UNSET: ClassVar[Dict[str, Any]] = {"crop_min": 0}
    #: notebook parameters a field is built from, where they differ from the field's own name
    PARAMS: ClassVar[Dict[str, Tuple[str, ...]]] = {"crop": ("crop_min", "crop_max")}

    head: str                               # registry name in lib.models.seq_heads.HEADS
    head_kwargs: Dict[str, Any]
    epochs: int
    lr: float                               # one-cycle max lr
    bs: int                                 # series per batch
    wd: float
    crop: Optional[Tuple[int, int]]         # random contiguous training window (min, max) slices, or None
    reverse_p: float                        # training reversal probability
    aux_weight: float                       # weight of the auxiliary per-slice loss (heads that return aux)
    inner_folds: int                        # per_fold strategy: inner split of fold k's patients
    seed: int
    mixed_precision: str                    # no | auto (bf16/fp16 on CUDA) | bf16 | fp16. The stage uses no: on an
    #                                         H100 the lstm (h1024, 4 series a batch) ran 178 series/s under bf16
    #                                         autocast vs 226 in float32 (python -m lib.bench sequence --precision)
    snapshot_epochs: int                    # >0: average predictions of the last n epochs (no selection)
    select: str                             # "best" (lowest valid metric) | "last"
    tta_flip: bool                          # average forward and reversed series at prediction
    spacing_scale: float                    # mm -> input units
    series_key: str
    emb_suffix: str                         # e.g. "_ep3" for per-epoch embedding files ("" = best.pth's)
    inputs: str                             # "embedding": [e, deltas, logits, meta] | "logits": logits as the slice
    #                                         vector (aligned across fold models: the same meaning in every fold)
    num_workers: int = config.runtime(0)
    device: str = config.runtime("auto")    # "auto" | "cpu" | "cuda"
    progress: bool = config.runtime(True)
    resume: bool = config.runtime(True)     # reuse a finished head whose inputs and settings match (interrupted runs)

    @classmethod
    def from_dict(cls, values: Dict[str, Any]) -> "SeqConfig":
        """Build from a dict of fields; unknown keys or missing experiment settings are a KeyError naming them."""
        config.check_keys(cls, values)
        return cls(**values)

    @classmethod
    def from_params(cls, **params: Any) -> "SeqConfig":
        """Build from notebook parameters: crop_min 0 means no crop, else crop = (crop_min, crop_max)."""
        values = config.none_if_unset(params, cls.UNSET)
        low, high = values.pop("crop_min"), values.pop("crop_max")
        return cls.from_dict({**values, "head_kwargs": dict(values["head_kwargs"]),
                              "crop": None if low is None else (low, high)})

    def __post_init__(self) -> None:
        if self.crop is not None:
            self.crop = (int(self.crop[0]), int(self.crop[1]))
        if self.inputs not in INPUTS:
            raise ValueError(f"inputs must be one of {sorted(INPUTS)}, got {self.inputs!r}")
        if self.select not in ("best", "last"):
            raise ValueError(f"SeqConfig.select must be 'best' or 'last'; got {self.select!r}")


def slice_vectors(es: EmbeddingSet, cfg: SeqConfig) -> np.ndarray:
    """The per-slice vector the sequence model differences along the series: the CNN embedding (float16 memmap,
    (N, D)) or, with `inputs="logits"`, the CNN's 6 logits, whose meaning is shared by every fold model."""
    return INPUTS[cfg.inputs](es)


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda'; got {device!r}")
    return torch.device(device)


TestPreds = List[Tuple[int, pd.DataFrame]]  # (CNN fold whose test inputs a head saw, its wide predictions), in order


@dataclass(frozen=True)
class TestRule:
    """How a strategy's heads meet the test set: which CNN folds' test inputs each head predicts, and how those
    predictions are averaged. `name` is what a weights bundle records (manifest "aggregate")."""

    name: str
    every_cnn_fold: bool  # True: a head predicts every CNN fold's test inputs; False: only its own fold's
    per_cnn_fold: bool    # True: mean over a CNN fold's predictions, then over folds; False: mean over all pairs

    def cnn_folds(self, fold: int, folds: List[int]) -> List[int]:
        """The CNN folds whose test inputs a head of CNN fold `fold` predicts."""
        return list(folds) if self.every_cnn_fold else [fold]

    def average(self, preds: TestPreds) -> pd.DataFrame:
        """The strategy's test prediction (wide) from its heads' (CNN fold, prediction) pairs."""
        if not self.per_cnn_fold:
            return mean_frames([p for _, p in preds])
        groups: Dict[int, List[pd.DataFrame]] = {}
        for k, p in preds:
            groups.setdefault(k, []).append(p)
        return mean_frames([mean_frames(groups[k]) for k in sorted(groups)])


#: Each fold strategy's test-time rule, by strategy name (the fits are registered in lib.sequence.strategies).
TEST_RULES: Registry = Registry("sequence fold strategy")
TEST_RULES.add("pooled", TestRule("pairs", every_cnn_fold=True, per_cnn_fold=False))
TEST_RULES.add("per_fold", TestRule("per_cnn_fold", every_cnn_fold=False, per_cnn_fold=True))
