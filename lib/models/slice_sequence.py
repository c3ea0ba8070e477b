"""Patient-level classifiers over a stack of slices, by registry name (`CLASSIFIERS`, `create_classifier`).

- "cnn_lstm" (`CnnLstm`): a timm CNN shared across time steps embeds each slice of a chunk (B, T, C, H, W), a
  bidirectional LSTM runs over the real slices, its outputs are averaged over them, and a linear layer gives one
  logit per chunk (the BraTS seed, T4E: eca_nfnet_l0, 2304-d features, hidden 64).
- "resnet10_3d" (`ResNet3d`): MONAI's 3D ResNet10 on one (B, 1, D, H, W) volume, one logit (BraTS 1st place).

Both take `(x, mask)` and return float logits (B,), so one training loop serves both. `central_stack` builds the
1st place's 3D input around the slice with the largest brain area ("central image trick").
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import torch
from torch import nn

from lib.models.factory import create_model, embedding_dim, norm_stats
from lib.models.seq_heads import run_packed
from lib.registry import Registry

PathLike = Union[str, Path]
CLASSIFIERS: Registry = Registry("slice-sequence classifier")


def create_classifier(name: str, **kwargs: Any) -> nn.Module:
    """Build the classifier registered as `name` (KeyError listing the valid names for an unknown one)."""
    return CLASSIFIERS.get(name)(**kwargs)


@CLASSIFIERS.register("cnn_lstm")
class CnnLstm(nn.Module):
    """x float32 (B, T, C, H, W) in [0, 1], mask bool (B, T) (True on real slices, post-padded) -> logits (B,).

    The CNN (`lib.models.factory.create_model(backbone, num_classes=0)`, pooled features (D,)) sees only the real
    slices, normalised inside with the backbone's timm mean/std; padded steps get zero features and are left out
    of the packed BiLSTM (hidden `hidden` per direction) and of the mean over time. pretrained_path: local timm
    weights file (never downloaded).
    """

    def __init__(self, backbone: str, hidden: int = 64, in_chans: int = 3, pretrained_path: Optional[PathLike] = None,
                 dropout: float = 0.0) -> None:
        super().__init__()
        self.cnn = create_model(backbone, num_classes=0, pretrained_weights=str(pretrained_path)
                                if pretrained_path else None, in_chans=in_chans)
        self.num_features = embedding_dim(self.cnn)
        mean, std = norm_stats(self.cnn)
        reps = int(np.ceil(in_chans / len(mean)))
        self.register_buffer("mean", torch.tensor((list(mean) * reps)[:in_chans]).view(1, in_chans, 1, 1))
        self.register_buffer("std", torch.tensor((list(std) * reps)[:in_chans]).view(1, in_chans, 1, 1))
        self.lstm = nn.LSTM(self.num_features, hidden, batch_first=True, bidirectional=True)
        self.drop = nn.Dropout(dropout)
        self.fc = nn.Linear(2 * hidden, 1)

    def features(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(B, T, C, H, W), (B, T) -> per-slice CNN features (B, T, D), zero at padded steps."""
        b, t = x.shape[:2]
        feats = self.cnn((x[mask] - self.mean) / self.std)
        return feats.new_zeros(b, t, feats.shape[-1]).masked_scatter(mask.unsqueeze(-1), feats)

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        if x.ndim != 5:
            raise ValueError(f"CnnLstm expects x of shape (B, T, C, H, W), got {tuple(x.shape)}")
        mask = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device) if mask is None else mask.bool()
        out = run_packed(self.lstm, self.features(x, mask), mask)  # (B, T, 2 * hidden), 0 at padded steps
        m = mask.unsqueeze(-1).to(out.dtype)
        pooled = (out * m).sum(1) / m.sum(1).clamp_min(1.0)
        return self.fc(self.drop(pooled)).squeeze(-1)


@CLASSIFIERS.register("resnet10_3d")
class ResNet3d(nn.Module):
    """x float32 (B, 1, D, H, W) -> logits (B,): `monai.networks.nets.resnet10(spatial_dims=3,
    n_input_channels=1, num_classes=1)`. `mask` is accepted and ignored (the padding is zeros, as in the 1st place).

    pretrained_path: local state_dict (e.g. MedicalNet's resnet_10.pth; a `module.` prefix is stripped, the
    classifier `fc.*` is not loaded); ValueError when none of its tensors fits.
    """

    def __init__(self, in_chans: int = 1, pretrained_path: Optional[PathLike] = None) -> None:
        super().__init__()
        from monai.networks.nets import resnet10  # monai's import is slow: only when this model is built

        self.net = resnet10(spatial_dims=3, n_input_channels=in_chans, num_classes=1)
        if pretrained_path:
            self.load_backbone(pretrained_path)

    def load_backbone(self, path: PathLike) -> None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"pretrained_path file not found: {path}")
        state = torch.load(path, map_location="cpu", weights_only=True)
        state = state.get("state_dict", state)
        own = self.net.state_dict()
        fits = {k.removeprefix("module."): v for k, v in state.items()}
        fits = {k: v for k, v in fits.items() if k in own and not k.startswith("fc.") and v.shape == own[k].shape}
        if not fits:
            raise ValueError(f"{path}: no tensor matches monai resnet10's parameters (keys e.g. {list(state)[:3]})")
        self.net.load_state_dict(fits, strict=False)

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        if x.ndim != 5:
            raise ValueError(f"ResNet3d expects x of shape (B, 1, D, H, W), got {tuple(x.shape)}")
        return self.net(x).squeeze(-1)


def central_start(volume: np.ndarray, depth: int) -> int:
    """First slice of the `depth`-slice window centred on the slice with the most non-zero pixels (the largest
    brain area; ties: the first such slice): centre - depth // 2. May be < 0 or end past the volume."""
    volume = np.asarray(volume)
    if volume.ndim != 3 or volume.shape[0] == 0:
        raise ValueError(f"volume must be (Z, H, W) with Z >= 1, got shape {volume.shape}")
    if depth < 1:
        raise ValueError(f"depth must be >= 1, got {depth}")
    areas = np.count_nonzero(volume.reshape(volume.shape[0], -1), axis=1)
    return int(np.argmax(areas)) - depth // 2


def central_stack(volume: np.ndarray, depth: int) -> np.ndarray:
    """(Z, H, W) -> (depth, H, W), same dtype: slices central_start .. central_start + depth - 1 of `volume`
    (the largest-brain slice at index depth // 2), zeros where the window leaves the volume."""
    volume = np.asarray(volume)
    start = central_start(volume, depth)
    out = np.zeros((depth,) + volume.shape[1:], volume.dtype)
    lo, hi = max(start, 0), min(start + depth, volume.shape[0])
    out[lo - start:hi - start] = volume[lo:hi]
    return out
