"""A native ir-CSN (interaction-reduced channel-separated network; Tran et al., "Video Classification with
Channel-Separated Convolutional Networks", ICCV 2019), the 3D backbone of the RSNA 2022 cervical-spine 4th place.

Stem: conv 3x7x7 stride (1, 2, 2) -> BN -> ReLU -> max pool 1x3x3 stride (1, 2, 2). Four stages of bottleneck
blocks (planes 64, 128, 256, 512; expansion 4 -> 256, 512, 1024, 2048 channels): conv 1x1x1 -> depthwise conv
3x3x3 (groups = planes: the "ir" block has no 1x1x1 before it) -> conv 1x1x1, each with BN, ReLU after the first
two and after the residual sum; the first block of stages 2-4 strides 2 in z, y and x (on the depthwise conv and on
a 1x1x1 conv + BN shortcut). Module names follow mmaction2's `ResNet3dCSN` (`conv1.conv`, `layer1.0.conv2.0.bn`,
`layer2.0.downsample.conv`, ...), so its backbone state_dicts load after stripping the `backbone.` prefix.

Shapes for input (B, C_in, Z, Y, X): features (stem before the pool, layer1..layer4) have channels
(64, 256, 512, 1024, 2048) and strides (1, 2, 2), (1, 4, 4), (2, 8, 8), (4, 16, 16), (8, 32, 32) (ceil division).
"""
from __future__ import annotations

from pathlib import Path
from collections import OrderedDict
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

PathLike = Union[str, Path]
LAYERS: Dict[int, Tuple[int, int, int, int]] = {26: (2, 2, 2, 2), 50: (3, 4, 6, 3), 101: (3, 4, 23, 3),
                                                152: (3, 8, 36, 3)}
STEM_CHANNELS = 64
PLANES = (64, 128, 256, 512)
EXPANSION = 4
Int3 = Tuple[int, int, int]


class ConvBN(nn.Sequential):
    """Conv3d (no bias) -> BatchNorm3d [-> ReLU], as mmcv's ConvModule (`.conv`, `.bn` keys)."""

    def __init__(self, cin: int, cout: int, kernel: Int3, stride: Int3 = (1, 1, 1), groups: int = 1,
                 act: bool = True) -> None:
        pad = tuple(k // 2 for k in kernel)
        layers: List[Tuple[str, nn.Module]] = [("conv", nn.Conv3d(cin, cout, kernel, stride, pad, groups=groups,
                                                                  bias=False)), ("bn", nn.BatchNorm3d(cout))]
        if act:
            layers.append(("relu", nn.ReLU(inplace=True)))
        super().__init__(OrderedDict(layers))


class IrCSNBlock(nn.Module):
    """ir-CSN bottleneck: 1x1x1 (cin -> planes), depthwise 3x3x3 (stride), 1x1x1 (planes -> 4 planes), residual."""

    def __init__(self, cin: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        cout = planes * EXPANSION
        self.conv1 = ConvBN(cin, planes, (1, 1, 1))
        self.conv2 = nn.Sequential(ConvBN(planes, planes, (3, 3, 3), (stride,) * 3, groups=planes))
        self.conv3 = ConvBN(planes, cout, (1, 1, 1), act=False)
        self.downsample = ConvBN(cin, cout, (1, 1, 1), (stride,) * 3, act=False) if stride > 1 or cin != cout \
            else None
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(self.conv3(self.conv2(self.conv1(x))) + identity)


def _check_depth(depth: int) -> None:
    if depth not in LAYERS:
        raise ValueError(f"ir-CSN depth must be one of {sorted(LAYERS)}, got {depth!r}")


def load_backbone_state(model: nn.Module, path: PathLike) -> None:
    """Load a local state_dict file into `model` (plain, under 'state_dict' / 'model', keys optionally prefixed
    'backbone.' as in mmaction2 checkpoints; classifier keys are ignored). Never downloads. KeyError lists missing
    backbone keys."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"ir-CSN weights not found: {path} (weights are never downloaded)")
    sd = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model"):
        if isinstance(sd, dict) and isinstance(sd.get(key), dict):
            sd = sd[key]
    sd = {k[len("backbone."):] if k.startswith("backbone.") else k: v for k, v in sd.items()}
    own = model.state_dict()
    missing = sorted(k for k in own if not k.startswith("fc.") and k not in sd)
    if missing:
        raise KeyError(f"{path} lacks {len(missing)} ir-CSN keys, e.g. {missing[:5]}")
    if "conv1.conv.weight" in sd and sd["conv1.conv.weight"].shape != own["conv1.conv.weight"].shape:
        w = sd["conv1.conv.weight"]  # RGB weights for another input channel count: the mean, repeated
        cin = own["conv1.conv.weight"].shape[1]
        sd["conv1.conv.weight"] = w.mean(1, keepdim=True).repeat(1, cin, 1, 1, 1) * (w.shape[1] / cin)
    model.load_state_dict({k: v for k, v in sd.items() if k in own and not k.startswith("fc.")}, strict=False)


class IrCSN(nn.Module):
    """ir-CSN-`depth` (26 / 50 / 101 / 152). forward_features(x (B, C_in, Z, Y, X) float32) -> [stem, layer1..4]
    feature maps (module docstring); forward(x) -> (B, num_classes) logits from global max pooling of layer4 (the
    seed's classifier pooling) and a linear layer; num_classes=0: no head, forward returns the (B, 2048) pooled
    features. pretrained_path: a local state_dict (`load_backbone_state`)."""

    def __init__(self, depth: int = 50, in_channels: int = 3, num_classes: int = 0,
                 pretrained_path: Optional[PathLike] = None) -> None:
        super().__init__()
        _check_depth(depth)
        self.depth, self.in_channels = depth, in_channels
        self.conv1 = ConvBN(in_channels, STEM_CHANNELS, (3, 7, 7), (1, 2, 2))
        self.maxpool = nn.MaxPool3d((1, 3, 3), (1, 2, 2), (0, 1, 1))
        cin = STEM_CHANNELS
        for i, (n, planes) in enumerate(zip(LAYERS[depth], PLANES)):
            blocks = [IrCSNBlock(cin if j == 0 else planes * EXPANSION, planes, 2 if (i > 0 and j == 0) else 1)
                      for j in range(n)]
            self.add_module(f"layer{i + 1}", nn.Sequential(*blocks))
            cin = planes * EXPANSION
        self.out_channels: List[int] = [STEM_CHANNELS] + [p * EXPANSION for p in PLANES]
        self.num_features = self.out_channels[-1]
        self.fc = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        self._init_weights()
        if pretrained_path:
            load_backbone_state(self, pretrained_path)

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv3d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        for m in self.modules():  # zero-init the last BN of each block: every block starts as the identity
            if isinstance(m, IrCSNBlock):
                nn.init.zeros_(m.conv3.bn.weight)

    def forward_features(self, x: torch.Tensor) -> List[torch.Tensor]:
        if x.ndim != 5 or x.shape[1] != self.in_channels:
            raise ValueError(f"ir-CSN expects (B, {self.in_channels}, Z, Y, X) input, got {tuple(x.shape)}")
        feats = [self.conv1(x)]
        x = self.maxpool(feats[0])
        for i in range(1, 5):
            x = getattr(self, f"layer{i}")(x)
            feats.append(x)
        return feats

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = self.forward_features(x)[-1].amax(dim=(2, 3, 4))
        return self.fc(pooled)


class CSNEncoder(nn.Module):
    """ir-CSN without its head as a U-Net encoder: forward(x) -> [stem, layer1..4]; `.out_channels` their channels,
    `.strides` their (z, y, x) strides."""

    strides: Sequence[Int3] = ((1, 2, 2), (1, 4, 4), (2, 8, 8), (4, 16, 16), (8, 32, 32))

    def __init__(self, depth: int = 50, in_channels: int = 1, pretrained_path: Optional[PathLike] = None) -> None:
        super().__init__()
        self.net = IrCSN(depth, in_channels, 0, pretrained_path)
        del self.net.fc
        self.out_channels = list(self.net.out_channels)

    def forward(self, x: torch.Tensor) -> List[torch.Tensor]:
        return self.net.forward_features(x)


def csn_encoder(depth: int = 50, in_channels: int = 1, pretrained_path: Optional[PathLike] = None) -> CSNEncoder:
    """The ir-CSN-`depth` feature extractor (see CSNEncoder)."""
    return CSNEncoder(depth, in_channels, pretrained_path)
