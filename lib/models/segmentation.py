"""2D segmentation networks: segmentation_models_pytorch (smp) architectures by name, built offline, plus the
Dice + BCE training loss.

`create_seg_model("unetplusplus", "densenet121", in_channels=4, classes=2)` is the BraTS stage-1 network (the T4E
seed's smp Unet++). Encoders are always built with `encoder_weights=None` (smp would download them); pretrained
weights come only from a local file (`encoder_weights_path`): a state_dict of the encoder (smp's own encoder files,
a torchvision / timm model's state_dict, or a checkpoint holding one under "state_dict" / "model"; of a whole smp
model, e.g. a lib.train.seg best.pth, the "encoder." entries are taken). A 3-channel file into a model with other
`in_channels` is adapted the way smp adapts its ImageNet weights (the RGB filters repeated over the channels and
rescaled by 3 / in_channels).

Models map images float32 (B, in_channels, H, W), H and W divisible by 32 (2 ** encoder depth), to logits float32
(B, classes, H, W); probabilities are their sigmoid (one independent output per class, e.g. WT and ET).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Optional, Union

import segmentation_models_pytorch as smp
import torch
import torch.nn.functional as F
from segmentation_models_pytorch.encoders import get_encoder_names
from torch import nn

from lib.registry import Registry

PathLike = Union[str, Path]
SEG_ARCHS: Registry[type] = Registry("segmentation architecture")
for _name, _cls in smp.MODEL_ARCHITECTURES_MAPPING.items():  # unet, unetplusplus, fpn, deeplabv3plus, manet, ...
    SEG_ARCHS.add(_name, _cls)


def check_encoder(name: str) -> None:
    """KeyError naming `name` and the valid encoders unless smp knows it (its own list, or `tu-<timm model>`)."""
    if isinstance(name, str) and name.startswith("tu-"):
        import timm

        if timm.is_model(name[3:]):
            return
        raise KeyError(f"unknown timm encoder {name!r}: {name[3:]!r} is not a timm model (timm.list_models())")
    valid = get_encoder_names()
    if name not in valid:
        raise KeyError(f"unknown segmentation encoder {name!r}; valid names: {', '.join(valid)}, or tu-<timm model>")


def read_state_dict(path: PathLike) -> Dict[str, torch.Tensor]:
    """A local weights file (.pth / .pt / .bin via torch.load(weights_only=True), or .safetensors) -> state_dict,
    unwrapped from a "state_dict" / "model" entry; of an smp model's state, only the "encoder." entries, unprefixed."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"encoder weights file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        sd: Any = load_file(str(path), device="cpu")
    else:
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # pickle / zip errors of many kinds: say which file and why
            raise ValueError(f"{path}: not a torch weights file readable with weights_only=True ({exc})") from exc
    for key in ("state_dict", "model"):
        if isinstance(sd, dict) and isinstance(sd.get(key), dict):
            sd = sd[key]
    if not isinstance(sd, dict) or not sd or not all(torch.is_tensor(v) for v in sd.values()):
        raise ValueError(f"{path}: expected a state_dict (parameter name -> tensor), got {type(sd).__name__}")
    if any(k.startswith("encoder.") for k in sd):  # a whole smp model (e.g. a best.pth): its encoder part
        sd = {k[len("encoder."):]: v for k, v in sd.items() if k.startswith("encoder.")}
    return sd


def _first_conv_in_channels(sd: Dict[str, torch.Tensor]) -> int:
    """Input channels of the first 4-D (conv) weight in state_dict order (the stem of every smp encoder)."""
    return int(next(v for v in sd.values() if v.ndim == 4).shape[1])


def _load_encoder(model: nn.Module, sd: Dict[str, torch.Tensor], path: PathLike) -> None:
    try:
        model.encoder.load_state_dict(sd)  # smp encoders drop the classifier keys (fc., classifier.) themselves
    except RuntimeError as exc:
        raise ValueError(f"{path}: weights do not fit the {type(model.encoder).__name__} encoder ({exc})") from exc


def create_seg_model(arch: str, encoder: str, in_channels: int, classes: int,
                     encoder_weights_path: Optional[PathLike] = None) -> nn.Module:
    """smp network `arch` (SEG_ARCHS) with encoder `encoder`, randomly initialised (never downloaded) unless
    `encoder_weights_path` names a local encoder state_dict; images (B, in_channels, H, W) -> logits
    (B, classes, H, W). ValueError naming the file when its weights do not fit the encoder."""
    cls = SEG_ARCHS.get(arch)
    check_encoder(encoder)
    if in_channels < 1 or classes < 1:
        raise ValueError(f"in_channels and classes must be >= 1, got {in_channels} and {classes}")
    if encoder_weights_path is None:
        return cls(encoder_name=encoder, encoder_weights=None, in_channels=in_channels, classes=classes)
    sd = read_state_dict(encoder_weights_path)
    file_channels = _first_conv_in_channels(sd) if any(v.ndim == 4 for v in sd.values()) else in_channels
    if file_channels not in (in_channels, 3):
        raise ValueError(f"{encoder_weights_path}: the first conv takes {file_channels} channels; the model needs "
                         f"{in_channels} (files with 3 or {in_channels} input channels can be loaded)")
    model = cls(encoder_name=encoder, encoder_weights=None, in_channels=file_channels, classes=classes)
    _load_encoder(model, sd, encoder_weights_path)
    if file_channels != in_channels:
        if not hasattr(model.encoder, "set_in_channels"):
            raise ValueError(f"{encoder!r} cannot adapt 3-channel weights to {in_channels} channels; give a file "
                             f"with {in_channels}-channel input weights")
        model.encoder.set_in_channels(in_channels, pretrained=True)
    return model


def freeze_encoder(model: nn.Module, frozen: bool) -> nn.Module:
    """Stop (`frozen=True`) or restart gradients of the encoder's parameters (its BatchNorm statistics still update
    in train mode); the decoder and head always train. Returns `model`."""
    if not hasattr(model, "encoder"):
        raise AttributeError(f"{type(model).__name__} has no .encoder (expected an smp segmentation model)")
    for p in model.encoder.parameters():
        p.requires_grad_(not frozen)
    return model


class DiceBCELoss(nn.Module):
    """dice_weight * (1 - mean soft Dice over channels) + bce_weight * mean BCE, on logits.

    logits, target: (B, C, *spatial), target float in [0, 1]. Soft Dice of channel c over the whole batch:
    (2 sum(p t) + 1) / (sum(p) + sum(t) + 1) with p = sigmoid(logits) (smooth = 1, so an empty channel predicted
    empty scores ~1). Computed in float32 under mixed precision.
    """

    def __init__(self, dice_weight: float = 1.0, bce_weight: float = 1.0, smooth: float = 1.0) -> None:
        super().__init__()
        if dice_weight < 0 or bce_weight < 0 or dice_weight + bce_weight <= 0:
            raise ValueError(f"dice_weight and bce_weight must be >= 0 with a positive sum, got {dice_weight}, "
                             f"{bce_weight}")
        self.dice_weight, self.bce_weight, self.smooth = float(dice_weight), float(bce_weight), float(smooth)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if logits.shape != target.shape or logits.ndim < 3:
            raise ValueError(f"logits and target must share a shape (B, C, ...); got {tuple(logits.shape)} and "
                             f"{tuple(target.shape)}")
        logits, target = logits.float(), target.float()
        bce = F.binary_cross_entropy_with_logits(logits, target)
        p = torch.sigmoid(logits)
        axes = (0,) + tuple(range(2, logits.ndim))
        dice = (2 * (p * target).sum(axes) + self.smooth) / (p.sum(axes) + target.sum(axes) + self.smooth)
        return self.dice_weight * (1 - dice.mean()) + self.bce_weight * bce
