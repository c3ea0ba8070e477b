"""Sequence-stage settings (`SeqConfig`), the per-slice input vector and the device rule: everything inference needs
of the sequence stage, without fastai (training lives in `lib.sequence.strategies`)."""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, Dict, Optional, Tuple

import numpy as np
import torch

from lib.sequence.features import EmbeddingSet

INPUTS = {"embedding": lambda es: es.emb, "logits": lambda es: es.logits}


@dataclass
class SeqConfig:
    """Sequence-stage parameters (YAML overrides through `from_dict`; unknown keys are an error)."""

    head: str = "lstm"                      # registry name in lib.seq_heads.HEADS
    head_kwargs: Dict[str, Any] = field(default_factory=dict)
    epochs: int = 8
    lr: float = 1e-3                        # one-cycle max lr
    bs: int = 16                            # series per batch
    wd: float = 1e-2
    crop: Optional[Tuple[int, int]] = (24, 48)  # random contiguous training window (min, max) slices, or None
    reverse_p: float = 0.5                  # training reversal probability
    aux_weight: float = 0.5                 # weight of the auxiliary per-slice loss (heads that return aux)
    inner_folds: int = 4                    # per_fold strategy: inner split of fold k's patients
    seed: int = 42
    num_workers: int = 0
    device: str = "auto"                    # "auto" | "cpu" | "cuda"
    mixed_precision: str = "no"             # no | auto (bf16/fp16 on CUDA) | bf16 | fp16. Default no: on an H100 the
    #                                         lstm (h1024, 4 series a batch) ran 178 series/s under bf16 autocast vs 226
    #                                         in float32 (python -m lib.bench sequence --precision)
    snapshot_epochs: int = 0                # >0: average predictions of the last n epochs (no selection)
    select: str = "best"                    # "best" (lowest valid metric) | "last"
    tta_flip: bool = True                   # average forward and reversed series at prediction
    spacing_scale: float = 10.0             # mm -> input units
    series_key: str = "series_uid"
    emb_suffix: str = ""                    # e.g. "_ep3" for per-epoch embedding files
    inputs: str = "embedding"               # "embedding": [e, deltas, logits, meta] | "logits": logits as the slice
    #                                         vector (aligned across fold models: the same meaning in every fold)
    progress: bool = True
    resume: bool = True                     # reuse a finished head whose inputs and settings match (interrupted runs)

    @classmethod
    def from_dict(cls, values: Dict[str, Any]) -> "SeqConfig":
        valid = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - valid)
        if unknown:
            raise KeyError(f"unknown SeqConfig keys {unknown}; valid keys: {sorted(valid)}")
        return cls(**values)

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
    """'auto' -> cuda when available, else cpu; 'cpu' / 'cuda' as given; anything else is a ValueError."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda'; got {device!r}")
    return torch.device(device)
