"""Augmentation recipes (albumentations 2.x) chosen by name: `create_transform("nobrainer", 256)`.

Every recipe runs on the cached uint8 (H, W, 3) image and returns uint8 (img_size, img_size, 3); normalisation is
the dataset's job. Recipes are functions `(img_size, **options) -> list of transforms`; `create_transform` passes
keyword overrides to them, so `create_transform("appian", 256, rotate=20)` changes one option and an unknown option
is a TypeError naming the valid ones. The geometric recipes follow the 2019 solutions' training code (`nobrainer`:
2nd place, `appian`: 11th place, `seutao`: 1st place); where the original used a transform that albumentations 2 no
longer has, the nearest equivalent is noted.
"""
from __future__ import annotations

import inspect
from typing import Any, Callable, List, Optional

import albumentations as A
import cv2
import numpy as np

from lib.registry import Registry

Recipe = Callable[..., List[A.BasicTransform]]
AUGMENTATIONS: Registry = Registry("augmentation recipe")


class ReverseChannels(A.ImageOnlyTransform):
    """Reverse the channel order (s+1, s, s-1 for adjacent-slice input: a flip along z; SeuTao's up/down swap).

    Only meaningful for adjacent-slice input; on 3-window input it would swap the windows.
    """

    def apply(self, img: np.ndarray, **params: Any) -> np.ndarray:
        return np.ascontiguousarray(img[..., ::-1])

    def get_transform_init_args_names(self) -> tuple:
        return ()


def _resize(img_size: int) -> A.Resize:
    """Resize to (img_size, img_size); a no-op when the cache already has that size; INTER_AREA when shrinking."""
    return A.Resize(img_size, img_size, area_for_downscale="image")


@AUGMENTATIONS.register("none")
def none(img_size: int) -> List[A.BasicTransform]:
    """Validation / inference: resize only (nothing happens when the cached size is `img_size`)."""
    return [_resize(img_size)]


@AUGMENTATIONS.register("light")
def light(img_size: int, hflip: float = 0.5) -> List[A.BasicTransform]:
    """Resize + horizontal flip."""
    return [_resize(img_size), A.HorizontalFlip(p=hflip)]


@AUGMENTATIONS.register("nobrainer")
def nobrainer(img_size: int, hflip: float = 0.5, shift: float = 0.05, scale: float = 0.05, rotate: float = 20,
              affine_p: float = 0.3, transpose: float = 0.5) -> List[A.BasicTransform]:
    """2nd place (`trainorig.py`): HFlip 0.5; ShiftScaleRotate(0.05, 0.05, 20, p 0.3, replicate) as Affine;
    Transpose 0.5."""
    return [_resize(img_size), A.HorizontalFlip(p=hflip),
            A.Affine(translate_percent=(-shift, shift), scale=(1 - scale, 1 + scale), rotate=(-rotate, rotate),
                     border_mode=cv2.BORDER_REPLICATE, p=affine_p),
            A.Transpose(p=transpose)]


@AUGMENTATIONS.register("appian")
def appian(img_size: int, crop_scale: tuple = (0.7, 1.0), hflip: float = 0.5, rotate: float = 30,
           rotate_p: float = 0.5, intensity: float = 0.06, intensity_p: float = 0.9) -> List[A.BasicTransform]:
    """11th place (`conf/model100.py`): RandomResizedCrop 0.7-1 (ratio 3/4-4/3), HFlip, Rotate +-30 (p 0.5, the
    effective value). Their RandomDicomNoise (HU x U(0.94, 1.06), p 0.9) becomes a +-6 % contrast/brightness jitter
    of the windowed image."""
    return [A.RandomResizedCrop(size=(img_size, img_size), scale=tuple(crop_scale), ratio=(3 / 4, 4 / 3),
                                area_for_downscale="image", p=1.0),
            A.HorizontalFlip(p=hflip), A.Rotate(limit=(-rotate, rotate), border_mode=cv2.BORDER_CONSTANT, p=rotate_p),
            A.RandomBrightnessContrast(brightness_limit=intensity, contrast_limit=intensity, p=intensity_p)]


@AUGMENTATIONS.register("seutao")
def seutao(img_size: int, hflip: float = 0.5, rotate: float = 30, shift: float = 0.1, scale: float = 0.1,
           affine_p: float = 0.5, erase_p: float = 0.5, crop_side: tuple = (0.6, 0.99),
           reverse_p: float = 0.0) -> List[A.BasicTransform]:
    """1st place (`2DNet/src/dataset`): HFlip 0.5; shift/scale/aspect +-0.1 with rotate +-30 (p 0.5, as Affine
    with independent x/y scale); random erasing p 0.5 (CoarseDropout, one hole of 10-40 % of each side); random
    crop of 0.6-0.99 of the side resized back (RandomResizedCrop, area = side^2, square). `reverse_p` = 0.5
    reproduces their up/down channel swap; use it with adjacent-slice input only."""
    lo, hi = crop_side
    out = [A.HorizontalFlip(p=hflip),
           A.Affine(translate_percent=(-shift, shift), scale={"x": (1 - scale, 1 + scale), "y": (1 - scale, 1 + scale)},
                    rotate=(-rotate, rotate), border_mode=cv2.BORDER_CONSTANT, p=affine_p),
           A.CoarseDropout(num_holes_range=(1, 1), hole_height_range=(0.1, 0.4), hole_width_range=(0.1, 0.4),
                           fill=0, p=erase_p),
           A.RandomResizedCrop(size=(img_size, img_size), scale=(lo * lo, hi * hi), ratio=(1.0, 1.0),
                               area_for_downscale="image", p=1.0)]
    return out + ([ReverseChannels(p=reverse_p)] if reverse_p > 0 else [])


@AUGMENTATIONS.register("demo")
def demo(img_size: int, hflip: float = 0.5, shift: float = 0.04, scale: float = 0.05, rotate: float = 10,
         affine_p: float = 0.3, intensity: float = 0.1, intensity_p: float = 0.3,
         dropout_p: float = 0.2) -> List[A.BasicTransform]:
    """Mild mix for short demo runs: HFlip, small Affine, brightness/contrast jitter, small CoarseDropout holes."""
    return [_resize(img_size), A.HorizontalFlip(p=hflip),
            A.Affine(translate_percent=(-shift, shift), scale=(1 - scale, 1 + scale), rotate=(-rotate, rotate),
                     border_mode=cv2.BORDER_CONSTANT, p=affine_p),
            A.RandomBrightnessContrast(brightness_limit=intensity, contrast_limit=intensity, p=intensity_p),
            A.CoarseDropout(num_holes_range=(1, 2), hole_height_range=(0.05, 0.1), hole_width_range=(0.05, 0.1),
                            fill=0, p=dropout_p)]


def recipe_options(recipe: str) -> List[str]:
    """The keyword options a recipe accepts (besides img_size)."""
    return [n for n in inspect.signature(AUGMENTATIONS.get(recipe)).parameters if n != "img_size"]


def create_transform(recipe: str, img_size: int, seed: Optional[int] = None, **overrides: Any) -> A.Compose:
    """albumentations Compose of `recipe` (a name in AUGMENTATIONS) at output size `img_size`.

    uint8 (H, W, 3) in -> uint8 (img_size, img_size, 3) out. `overrides` change the recipe's options
    (see `recipe_options`); `seed` fixes the Compose RNG (else each DataLoader worker is reseeded by
    `lib.data.datasets.worker_init_fn`). Unknown recipe -> KeyError listing the names; unknown option -> TypeError.
    """
    factory = AUGMENTATIONS.get(recipe)
    valid = recipe_options(recipe)
    unknown = sorted(set(overrides) - set(valid))
    if unknown:
        raise TypeError(f"augmentation recipe {recipe!r} has no options {unknown}; valid options: {valid}")
    if int(img_size) <= 0:
        raise ValueError(f"img_size must be a positive number of pixels, got {img_size!r}")
    return A.Compose(factory(int(img_size), **overrides), seed=seed)
