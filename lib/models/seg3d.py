"""3D segmentation networks by name (`SEG3D`, `create_seg3d`), the focal + Jaccard multiclass loss, and sliding-window
inference over a whole volume.

Networks map (B, in_channels, Z, Y, X) float32 to (B, classes, Z, Y, X) logits:
  csn_unet   the RSNA 2022 cervical-spine 4th place's segmentor: ir-CSN encoder (lib.models.csn) + a U-Net decoder
             whose up blocks are nearest upsampling to the skip's size, concatenation, conv (1, 3, 3) and conv
             (3, 1, 1) (each + BN + ReLU: "(2+1)D"; the seed found pure 3D decoder convs gave NaNs under AMP);
             any Z, Y, X work (upsampling goes to the skip's exact size);
  unet       monai.networks.nets.UNet (strides 2: Z, Y, X divisible by 2^len(strides) avoids size mismatches);
  segresnet  monai.networks.nets.SegResNet (Z, Y, X divisible by 8 with the default 4 levels).
"""
from __future__ import annotations

from typing import Any, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lib.models.csn import ConvBN, csn_encoder
from lib.registry import Registry

SEG3D: Registry = Registry("3D segmentation architecture")


# ---------------------------------------------------------------- csn_unet
class UpBlock2p1D(nn.Module):
    """Upsample (nearest) to the skip's size, concatenate it, conv (1, 3, 3) + BN + ReLU, conv (3, 1, 1) + BN + ReLU."""

    def __init__(self, cin: int, skip: int, cout: int) -> None:
        super().__init__()
        self.spatial = ConvBN(cin + skip, cout, (1, 3, 3))
        self.temporal = ConvBN(cout, cout, (3, 1, 1))

    def forward(self, x: torch.Tensor, skip: Optional[torch.Tensor] = None,
                size: Optional[Sequence[int]] = None) -> torch.Tensor:
        target = tuple(skip.shape[2:]) if skip is not None else tuple(size)  # type: ignore[arg-type]
        x = F.interpolate(x, size=target, mode="nearest")
        if skip is not None:
            x = torch.cat([x, skip], dim=1)
        return self.temporal(self.spatial(x))


class CSNUNet(nn.Module):
    """ir-CSN encoder + (2+1)D U-Net decoder (module docstring). decoder_channels: 5 widths, deepest first (4 up
    blocks over the skips layer3, layer2, layer1, stem, then one to the input size)."""

    def __init__(self, in_channels: int, classes: int, depth: int = 50,
                 decoder_channels: Sequence[int] = (256, 128, 64, 32, 16),
                 pretrained_path: Optional[str] = None) -> None:
        super().__init__()
        if len(decoder_channels) != 5:
            raise ValueError(f"csn_unet decoder_channels needs 5 widths (deepest first), got {list(decoder_channels)}")
        self.encoder = csn_encoder(depth, in_channels, pretrained_path)
        enc = self.encoder.out_channels  # stem, layer1..4
        skips = [enc[3], enc[2], enc[1], enc[0], 0]
        cins = [enc[4], *decoder_channels[:-1]]
        self.decoder = nn.ModuleList(UpBlock2p1D(c, s, o) for c, s, o in zip(cins, skips, decoder_channels))
        self.head = nn.Conv3d(decoder_channels[-1], classes, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = self.encoder(x)
        y = feats[-1]
        for block, skip in zip(self.decoder[:-1], feats[-2::-1]):
            y = block(y, skip)
        return self.head(self.decoder[-1](y, size=x.shape[2:]))


@SEG3D.register("csn_unet")
def _csn_unet(in_channels: int, classes: int, **kwargs: Any) -> nn.Module:
    return CSNUNet(in_channels, classes, **kwargs)


@SEG3D.register("unet")
def _monai_unet(in_channels: int, classes: int, channels: Sequence[int] = (16, 32, 64, 128, 256),
                strides: Optional[Sequence[int]] = None, num_res_units: int = 2, **kwargs: Any) -> nn.Module:
    from monai.networks.nets import UNet

    strides = tuple(strides) if strides is not None else (2,) * (len(channels) - 1)
    return UNet(spatial_dims=3, in_channels=in_channels, out_channels=classes, channels=tuple(channels),
                strides=strides, num_res_units=num_res_units, **kwargs)


@SEG3D.register("segresnet")
def _monai_segresnet(in_channels: int, classes: int, init_filters: int = 16, **kwargs: Any) -> nn.Module:
    from monai.networks.nets import SegResNet

    return SegResNet(spatial_dims=3, in_channels=in_channels, out_channels=classes, init_filters=init_filters,
                     **kwargs)


def create_seg3d(name: str, in_channels: int, classes: int, **kwargs: Any) -> nn.Module:
    """A 3D segmentation network by SEG3D name (KeyError lists the names); kwargs go to its builder (csn_unet: depth,
    decoder_channels, pretrained_path; unet: channels, strides, num_res_units, ...; segresnet: init_filters, ...)."""
    if in_channels < 1 or classes < 1:
        raise ValueError(f"in_channels and classes must be >= 1, got {in_channels}, {classes}")
    return SEG3D.get(name)(in_channels, classes, **kwargs)


# ---------------------------------------------------------------- loss
class FocalJaccardLoss(nn.Module):
    """focal_weight * focal + jaccard_weight * soft Jaccard, multiclass (softmax) on logits (B, C, Z, Y, X) against
    int labels (B, Z, Y, X) in [0, C).

    focal = mean over voxels of w[t] (1 - p_t)^gamma (-log p_t) (t the true class, w the class weights, default 1);
    jaccard = sum_c w_c (1 - (I_c + eps) / (U_c + eps)) / sum_c w_c with I_c = sum p_c y_c and
    U_c = sum p_c + sum y_c - I_c summed over the batch and voxels (every class, background included).
    """

    def __init__(self, classes: int, focal_weight: float = 1.0, jaccard_weight: float = 1.0, gamma: float = 2.0,
                 class_weights: Optional[Sequence[float]] = None, eps: float = 1e-6) -> None:
        super().__init__()
        if focal_weight < 0 or jaccard_weight < 0 or focal_weight + jaccard_weight <= 0 or gamma < 0:
            raise ValueError(f"FocalJaccardLoss needs weights >= 0 (not both 0) and gamma >= 0; got focal_weight="
                             f"{focal_weight}, jaccard_weight={jaccard_weight}, gamma={gamma}")
        w = torch.ones(classes) if class_weights is None else torch.as_tensor(class_weights, dtype=torch.float32)
        if w.shape != (classes,) or (w < 0).any() or w.sum() <= 0:
            raise ValueError(f"class_weights must be {classes} non-negative numbers, got {class_weights!r}")
        self.register_buffer("weights", w.float(), persistent=False)
        self.classes, self.focal_weight, self.jaccard_weight = classes, float(focal_weight), float(jaccard_weight)
        self.gamma, self.eps = float(gamma), float(eps)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if logits.ndim < 3 or logits.shape[1] != self.classes or target.shape != logits.shape[:1] + logits.shape[2:]:
            raise ValueError(f"FocalJaccardLoss expects logits (B, {self.classes}, ...) and labels (B, ...); got "
                             f"{tuple(logits.shape)} and {tuple(target.shape)}")
        logp = F.log_softmax(logits.float(), dim=1)
        target = target.long()
        logp_t = logp.gather(1, target.unsqueeze(1)).squeeze(1)
        w = self.weights.to(logits.device)
        focal = (w[target] * (1 - logp_t.exp()).pow(self.gamma) * -logp_t).mean()
        p = logp.exp()
        onehot = F.one_hot(target, self.classes).movedim(-1, 1).to(p.dtype)
        axes = (0,) + tuple(range(2, p.ndim))
        inter = (p * onehot).sum(axes)
        union = p.sum(axes) + onehot.sum(axes) - inter
        jaccard = ((1 - (inter + self.eps) / (union + self.eps)) * w).sum() / w.sum()
        return self.focal_weight * focal + self.jaccard_weight * jaccard


# ---------------------------------------------------------------- inference
def sliding_window_predict(model: nn.Module, volume: np.ndarray, roi: Sequence[int], overlap: float = 0.25,
                           bs: int = 1, device: Union[str, torch.device, None] = "auto",
                           mode: str = "gaussian") -> np.ndarray:
    """volume float (Z, Y, X) or (C_in, Z, Y, X) as trained -> float32 (C, Z, Y, X) softmax probabilities, windows
    of `roi` (Z, Y, X) with `overlap` (fraction), `bs` windows per forward pass, blended by monai's
    sliding_window_inference (`mode` 'gaussian' or 'constant'; a volume smaller than roi is padded). Windows run on
    `device` (lib.train.precision rule, bf16 / fp16 autocast on CUDA); the stitched output stays on the CPU."""
    from monai.inferers import sliding_window_inference

    from lib.train.precision import autocast_dtype, resolve_device

    volume = np.asarray(volume)
    if volume.ndim not in (3, 4) or len(roi) != 3:
        raise ValueError(f"volume must be (Z, Y, X) or (C, Z, Y, X) and roi 3 sizes; got {volume.shape}, {roi}")
    dev = resolve_device(device or "auto")
    dtype = autocast_dtype("auto", dev)
    x = torch.from_numpy(np.ascontiguousarray(volume, dtype=np.float32))
    x = x[None, None] if volume.ndim == 3 else x[None]
    model.to(dev).eval()

    def predictor(window: torch.Tensor) -> torch.Tensor:
        with torch.autocast(dev.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            return torch.softmax(model(window).float(), dim=1)

    with torch.inference_mode():
        out = sliding_window_inference(x, tuple(int(r) for r in roi), int(bs), predictor, overlap=float(overlap),
                                       mode=mode, sw_device=dev, device=torch.device("cpu"))
    return out[0].float().numpy()
