"""Every network a BraTS params file names builds offline: segmentation arch + encoder, classifier backbone."""
from __future__ import annotations

from pathlib import Path

import pytest
import timm
import yaml

from lib.models.segmentation import SEG_ARCHS, check_encoder

REPO = Path(__file__).resolve().parents[2]
FILES = sorted((REPO / "params" / "brats").glob("*.yaml"))


@pytest.mark.parametrize("path", FILES, ids=[p.stem for p in FILES])
def test_named_networks_exist(path: Path):
    stages = yaml.safe_load(path.read_text())["stages"]
    seg = stages.get("train_seg") or {}
    if "arch" in seg:
        SEG_ARCHS.get(seg["arch"])  # KeyError listing the valid names otherwise
    if "encoder" in seg:
        check_encoder(seg["encoder"])
    cls = stages.get("train_cls") or {}
    if cls.get("model", "cnn_lstm") == "cnn_lstm" and "backbone" in cls:
        assert timm.is_model(cls["backbone"]), cls["backbone"]
