"""Model factory: every arch named in params/*.yaml (plus the six core ones) builds, embeds and loads weights."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator, List

import pytest
import torch
import yaml

from lib.models.factory import MODEL_ZOO, create_model, embedding_dim, forward_embed, input_norm, resolve_arch

REPO = Path(__file__).resolve().parents[1]
CORE_ARCHS = ["resnet18", "convnext_atto", "seresnext50_32x4d", "resnext101_32x8d.fb_wsl_ig1b_ft_in1k",
              "efficientnet_b3", "densenet121"]


def _find_arch(node: Any) -> Iterator[str]:
    """Every value of a key named `arch`, at any depth of a parsed YAML document."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "arch" and isinstance(value, str):
                yield value
            else:
                yield from _find_arch(value)
    elif isinstance(node, list):
        for item in node:
            yield from _find_arch(item)


def params_archs() -> List[str]:
    """The timm classifier `arch` of every ICH params file (other tasks name segmentation architectures `arch`:
    tests/brats/test_brats_params.py checks those)."""
    archs: List[str] = []
    for path in sorted((REPO / "params" / "ich").rglob("*.yaml")):
        archs += list(_find_arch(yaml.safe_load(path.read_text())))
    return archs


ARCHS = list(dict.fromkeys(CORE_ARCHS + params_archs()))


@pytest.mark.parametrize("arch", ARCHS)
def test_factory_shapes_and_embedding(arch: str) -> None:
    torch.manual_seed(0)
    model = create_model(arch, num_classes=6, pretrained=False).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        emb, logits = forward_embed(model, x)
        direct = model(x)
    assert logits.shape == (2, 6)
    assert emb.shape == (2, embedding_dim(model))
    torch.testing.assert_close(logits, direct, atol=1e-4, rtol=1e-4)


def test_pretrained_weights_from_local_file(tmp_path: Path) -> None:
    torch.manual_seed(1)
    source = create_model("resnet18", num_classes=1000)  # an "ImageNet" checkpoint: 1000-class fc
    path = tmp_path / "resnet18_imagenet.pth"
    torch.save(source.state_dict(), path)
    torch.manual_seed(2)
    model = create_model("resnet18", num_classes=6, pretrained_weights=str(path))
    got, want = model.state_dict(), source.state_dict()
    body = [k for k in want if not k.startswith("fc.")]
    assert body and all(torch.equal(got[k], want[k]) for k in body)
    assert model.fc.weight.shape == (6, 512)
    # a fresh random init differs, so the equality above really came from the file
    fresh = create_model("resnet18", num_classes=6)
    assert not torch.equal(fresh.state_dict()["conv1.weight"], want["conv1.weight"])


def test_missing_weights_file_names_path(tmp_path: Path) -> None:
    missing = tmp_path / "nope.pth"
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        create_model("resnet18", 6, pretrained_weights=str(missing))


def test_pretrained_without_file_refuses_download() -> None:
    with pytest.raises(ValueError, match="local file"):
        create_model("resnet18", 6, pretrained=True)


def test_unknown_arch_lists_close_matches() -> None:
    with pytest.raises(ValueError, match="resnet18"):
        create_model("resnet_18", 6)
    with pytest.raises(ValueError, match="unknown architecture"):
        create_model("resnet18.no_such_tag", 6)


def test_model_zoo_names_resolve() -> None:
    for nice, entry in MODEL_ZOO.items():
        assert resolve_arch(nice) == entry["timm"]
        assert resolve_arch(entry["timm"]) == entry["timm"]


def test_drop_rate_reaches_the_head() -> None:
    model = create_model("resnet18", 6, drop_rate=0.5)
    assert model.drop_rate == 0.5


def test_input_norm_follows_the_weights() -> None:
    imagenet = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    assert input_norm("resnext101_wsl") == input_norm("resnext101_32x8d.fb_wsl_ig1b_ft_in1k") == imagenet
    assert input_norm("vit_tiny_patch16_224") == ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))


IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
HALF = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))


def test_norm_stats_come_from_the_models_timm_config() -> None:
    """0.5/0.5 models get 0.5/0.5 (the zoo lookup gave every backbone ImageNet's); the ResNets keep ImageNet's."""
    from lib.data.datasets import IMAGENET_MEAN, IMAGENET_STD
    from lib.models.factory import norm_stats

    vit = create_model("vit_tiny_patch16_224", 6, img_size=32, patch_size=16)
    assert norm_stats(vit) == norm_stats("vit_tiny_patch16_224") == HALF
    assert norm_stats(create_model("inception_v3", 6)) == HALF
    for arch in ("resnet18", "resnet10t"):  # the demo's stats, unchanged
        assert norm_stats(create_model(arch, 6)) == norm_stats(arch) == (IMAGENET_MEAN, IMAGENET_STD) == IMAGENET


def test_norm_override_wins() -> None:
    from lib.models.factory import norm_stats

    vit = create_model("vit_tiny_patch16_224", 6, img_size=32, patch_size=16)
    assert norm_stats(vit, "imagenet") == IMAGENET
    assert norm_stats("resnet18", {"mean": [0.1, 0.2, 0.3], "std": [1, 2, 3]}) == ((0.1, 0.2, 0.3), (1.0, 2.0, 3.0))
    with pytest.raises(ValueError, match="norm must be one of"):
        norm_stats("resnet18", "dataset")
    with pytest.raises(ValueError, match="std > 0"):
        norm_stats("resnet18", {"mean": [0.5] * 3, "std": [0.0] * 3})
    with pytest.raises(ValueError, match="'mean' and 'std'"):
        norm_stats("resnet18", {"mean": [0.5] * 3})


def test_train_config_carries_the_norm() -> None:
    from lib.train.fit import TrainConfig
    from test_train import TINY

    assert TrainConfig(**TINY).norm == "timm"
    assert TrainConfig(**{**TINY, "norm": {"mean": [0.5] * 3, "std": [0.5] * 3}}).norm["std"] == [0.5] * 3
    with pytest.raises(ValueError, match="norm must be one of"):
        TrainConfig(**{**TINY, "norm": "dataset"})
