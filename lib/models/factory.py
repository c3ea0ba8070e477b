"""A thin layer over `timm.create_model`: 6-output classifiers, local-file pretrained weights, embedding + logits.

Weights are never downloaded: ImageNet/WSL weights come from a local file (a timm/torchvision-style state_dict,
`.pth` / `.bin` / `.safetensors`) passed as `pretrained_weights`, loaded by timm with the classifier re-initialised
at `num_classes` outputs.
"""
from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import timm
import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, resolve_data_config, resolve_model_data_config
from timm.models import get_pretrained_cfg
from torch import nn

PathLike = Union[str, Path]

#: Readable names -> timm names (and notes). `create_model` accepts either. `solution_mean` / `solution_std` (RGB
#: fractions of 255) record the *data-set* statistics the original solution normalised with, for reference only:
#: the input normalisation that matches the pretrained weights is `norm_stats(arch)`.
MODEL_ZOO: Dict[str, Dict[str, Any]] = {
    "resnext101_wsl": {"timm": "resnext101_32x8d.fb_wsl_ig1b_ft_in1k",
                       "note": "2nd place (NoBrainer) backbone at 480 px; Instagram WSL weights",
                       "solution_mean": (0.2236, 0.1819, 0.2523), "solution_std": (0.3245, 0.2956, 0.3134)},
    "seresnext50": {"timm": "seresnext50_32x4d", "note": "11th place (Appian) model100 at 512 px"},
    "seresnext101": {"timm": "seresnext101_32x4d", "note": "11th place model110, 1st place (SeuTao)"},
    "densenet121": {"timm": "densenet121", "note": "1st place (SeuTao) 2D model",
                    "solution_mean": (0.456, 0.456, 0.456), "solution_std": (0.224, 0.224, 0.224)},
    "densenet169": {"timm": "densenet169", "note": "1st place (SeuTao) 2D model"},
    "efficientnet_b3": {"timm": "efficientnet_b3", "note": "modern mid-size baseline"},
    "resnet18": {"timm": "resnet18", "note": "tiny: tests"},
    "resnet10t": {"timm": "resnet10t", "note": "CPU demo (`make demo`) at 64 px: from scratch it learned the phantom "
                                          "far better than convnext_atto (OOF 0.18 vs 0.25)"},
    "convnext_atto": {"timm": "convnext_atto", "note": "tiny ConvNeXt: tests and demo runs"},
}


def resolve_arch(arch: str) -> str:
    """A MODEL_ZOO name -> its timm name; a timm name is returned as is. Unknown -> ValueError with close matches."""
    if arch in MODEL_ZOO:
        return MODEL_ZOO[arch]["timm"]
    known = isinstance(arch, str) and timm.is_model(arch)
    if known and "." in arch:  # a pretrained tag must exist too (e.g. resnext101_32x8d.fb_wsl_ig1b_ft_in1k)
        known = arch in timm.list_pretrained(arch)
    if not known:
        raise ValueError(f"unknown architecture {arch!r}; close matches: {close_matches(str(arch))}")
    return arch


def close_matches(arch: str, n: int = 8) -> List[str]:
    """A few timm / MODEL_ZOO names that resemble `arch` (wildcard match first, then edit distance)."""
    base = arch.split(".")[0]
    wild = timm.list_models(f"*{base}*")[:n] if base else []
    fuzzy = difflib.get_close_matches(base, timm.list_models() + list(MODEL_ZOO), n=n, cutoff=0.6)
    return list(dict.fromkeys(wild + fuzzy))[:n]


def create_model(arch: str, num_classes: int, pretrained: bool = False, pretrained_weights: Optional[str] = None,
                 drop_rate: float = 0.0, **kwargs: Any) -> nn.Module:
    """timm model `arch` (timm or MODEL_ZOO name) with a `num_classes`-output classifier.

    pretrained_weights: local weights file; timm loads it (`pretrained_cfg_overlay=dict(file=...)`), drops the
    source classifier and initialises a new one with `num_classes` outputs. `pretrained=True` without a file is a
    ValueError (nothing is ever downloaded). Extra kwargs go to `timm.create_model` (drop_path_rate, in_chans, ...).
    """
    name = resolve_arch(arch)
    if pretrained_weights is not None:
        path = Path(pretrained_weights)
        if not path.is_file():
            raise FileNotFoundError(f"pretrained_weights file not found: {path}")
        return timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)),
                                 num_classes=num_classes, drop_rate=drop_rate, **kwargs)
    if pretrained:
        raise ValueError(f"pretrained=True for {arch!r} needs pretrained_weights=<local file>: weights are never "
                         "downloaded (put the timm/torchvision state_dict in a Kaggle dataset or data/weights/)")
    return timm.create_model(name, pretrained=False, num_classes=num_classes, drop_rate=drop_rate, **kwargs)


Norm = Union[str, Mapping[str, Sequence[float]]]
NORMS = ("timm", "imagenet")


def norm_stats(model: Union[nn.Module, str], norm: Norm = "timm") -> Tuple[Tuple[float, ...], Tuple[float, ...]]:
    """(mean, std) RGB fractions of 255 the model's input is normalised with.

    norm "timm": timm's data config of the model (`timm.data.resolve_model_data_config`: ImageNet's for the ResNets,
    0.5/0.5 for ViT / Inception); for an arch name, timm's pretrained config of that arch (the same values, no model
    built). "imagenet": ImageNet's. {"mean": [3 floats], "std": [3 floats > 0]}: those.
    """
    check_norm(norm)
    if isinstance(norm, Mapping):
        return _explicit_norm(norm)
    if norm == "imagenet":
        return tuple(IMAGENET_DEFAULT_MEAN), tuple(IMAGENET_DEFAULT_STD)
    if isinstance(model, str):
        cfg = get_pretrained_cfg(resolve_arch(model))
        data = resolve_data_config(pretrained_cfg=cfg.to_dict() if cfg is not None else {})
    else:
        data = resolve_model_data_config(model)
    return tuple(float(v) for v in data["mean"]), tuple(float(v) for v in data["std"])


def check_norm(norm: Norm) -> None:
    """ValueError unless `norm` is "timm", "imagenet" or {"mean": [3 floats], "std": [3 floats > 0]}."""
    if isinstance(norm, Mapping):
        _explicit_norm(norm)
    elif norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS} or {{'mean': [..], 'std': [..]}}, got {norm!r}")


def _explicit_norm(norm: Mapping[str, Sequence[float]]) -> Tuple[Tuple[float, ...], Tuple[float, ...]]:
    """{"mean": [3 floats], "std": [3 floats > 0]} -> (mean, std); ValueError naming what is wrong."""
    if set(norm) != {"mean", "std"}:
        raise ValueError(f"an explicit norm needs exactly the keys 'mean' and 'std', got {sorted(norm)}")
    mean, std = (tuple(float(v) for v in norm[k]) for k in ("mean", "std"))
    if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
        raise ValueError(f"norm mean and std must be 3 RGB fractions of 255 each, std > 0; got mean={mean} std={std}")
    return mean, std


def input_norm(arch: str) -> Tuple[Tuple[float, ...], Tuple[float, ...]]:
    """(mean, std) the pretrained weights of `arch` expect: `norm_stats(arch, "timm")`."""
    return norm_stats(arch)


def embedding_dim(model: nn.Module) -> int:
    """Width D of the pre-logits embedding `forward_embed` returns (timm `head_hidden_size`, else `num_features`)."""
    return int(getattr(model, "head_hidden_size", None) or model.num_features)


def forward_embed(model: nn.Module, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """x float (B, 3, H, W) -> (embedding (B, D) after pooling and any head norm, logits (B, num_classes)).

    logits == model(x): the classifier is applied to the pre-logits embedding (checked for every arch in tests).
    """
    feats = model.forward_features(x)
    emb = model.forward_head(feats, pre_logits=True)
    logits = model.get_classifier()(emb)
    return emb, logits


def classifier_outputs(arch: str, state: Dict[str, Any]) -> int:
    """The number of outputs of `arch`'s classifier in a saved `state` dict (the task's number of labels)."""
    probe = create_model(arch, num_classes=1)
    head = probe.get_classifier()
    names = [n for n, p in probe.named_parameters() if p is getattr(head, "weight", None)]
    if not names or names[0] not in state:
        raise ValueError(f"cannot find {arch}'s classifier weight in the checkpoint (looked for {names})")
    return int(state[names[0]].shape[0])
