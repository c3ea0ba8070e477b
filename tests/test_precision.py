"""One mixed-precision rule for training, embedding and inference: bf16 only where native, else fp16, none on CPU."""
from __future__ import annotations

from typing import Optional

import pytest
import torch

from lib.train import precision
from lib.train.precision import autocast_dtype, resolve_precision

CUDA = torch.device("cuda:0")
CPU = torch.device("cpu")


def fake_gpu(monkeypatch: pytest.MonkeyPatch, major: Optional[int]) -> None:
    """Pretend a CUDA GPU of compute capability `major` (None: no GPU) where bf16 is always 'supported' by emulation."""

    def is_bf16_supported(including_emulation: bool = True) -> bool:
        return major is not None and (major >= 8 or including_emulation)

    monkeypatch.setattr(torch.cuda, "is_available", lambda: major is not None)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", is_bf16_supported)


def test_ampere_gets_bf16(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_gpu(monkeypatch, 8)
    assert resolve_precision("auto", CUDA) == "bf16"
    assert autocast_dtype("auto", CUDA) is torch.bfloat16


@pytest.mark.parametrize("major", [6, 7], ids=["P100", "T4"])
def test_emulated_bf16_gets_fp16(monkeypatch: pytest.MonkeyPatch, major: int) -> None:
    fake_gpu(monkeypatch, major)
    assert torch.cuda.is_bf16_supported()  # what the old rule trusted
    assert resolve_precision("auto", CUDA) == "fp16"
    assert autocast_dtype("auto", CUDA) is torch.float16


def test_cpu_gets_none(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_gpu(monkeypatch, None)
    assert resolve_precision("auto", CPU) is None and autocast_dtype("auto", CPU) is None
    assert precision.resolve_device("auto") == CPU


def test_explicit_settings_are_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_gpu(monkeypatch, 7)
    assert resolve_precision("bf16", CUDA) == "bf16"
    assert resolve_precision("no", CUDA) is None and autocast_dtype("no", CUDA) is None
    fake_gpu(monkeypatch, 9)
    assert resolve_precision("fp16", CUDA) == "fp16"
    assert resolve_precision("no", CPU) is None
    with pytest.raises(ValueError, match="needs CUDA"):
        resolve_precision("bf16", CPU)
    with pytest.raises(ValueError, match="mixed_precision must be one of"):
        resolve_precision("fp8", CUDA)


def test_training_and_embedding_share_the_rule() -> None:
    from lib.train import ddp, embed, fit

    assert fit.resolve_precision is ddp.resolve_precision is resolve_precision
    assert embed.autocast_dtype is autocast_dtype
