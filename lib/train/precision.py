"""Device and mixed-precision rule shared by training, embedding export and inference (torch only, no fastai).

bf16 only where the GPU computes it natively (compute capability >= 8, Ampere and later); GPUs that merely emulate it
(Kaggle's T4 and P100: `torch.cuda.is_bf16_supported()` is True there through emulation) get fp16, which training
pairs with a gradient scaler (fastai's `MixedPrecision("fp16")`); CPU runs in float32.
"""
from __future__ import annotations

from typing import Optional

import torch

PRECISIONS = ("auto", "bf16", "fp16", "no")
AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(device: str = "auto", local_rank: int = 0) -> torch.device:
    """'auto' -> cuda:<local_rank> when CUDA is available, else cpu; any other string is passed to torch.device."""
    if device == "auto":
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    return torch.device(device)


def native_bf16() -> bool:
    """True when the current CUDA device computes bf16 natively (not through emulation)."""
    return torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)


def resolve_precision(setting: str, device: torch.device) -> Optional[str]:
    """'auto' -> 'bf16' on CUDA with native bf16, 'fp16' on other CUDA GPUs, None on CPU; 'no' -> None.

    An explicit 'bf16' / 'fp16' is kept as given (it needs a CUDA device).
    """
    if setting not in PRECISIONS:
        raise ValueError(f"mixed_precision must be one of {PRECISIONS}, got {setting!r}")
    if setting == "no" or (setting == "auto" and device.type != "cuda"):
        return None
    if device.type != "cuda":
        raise ValueError(f"mixed_precision={setting!r} needs CUDA (device is {device}); use 'auto' or 'no'")
    if setting == "auto":
        return "bf16" if native_bf16() else "fp16"
    return setting


def autocast_dtype(setting: str, device: torch.device) -> Optional[torch.dtype]:
    """The dtype for `torch.autocast` under `resolve_precision(setting, device)`; None = no autocast."""
    precision = resolve_precision(setting, device)
    return AUTOCAST_DTYPES[precision] if precision else None
