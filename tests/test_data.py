"""Datasets (single / adjacent slices), neighbours, negative subsampling + DDP sharding, augmentation recipes."""
from __future__ import annotations

import subprocess
import sys
import warnings
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
import torch
from torch.utils.data import DataLoader

from lib.data.augment import AUGMENTATIONS, create_transform, recipe_options
from lib.data.datasets import IMAGENET_MEAN, IMAGENET_STD, ImageDataset, ImageLoader, SubsampleSampler, epoch_subsample, \
    neighbours, subsample_size, worker_init_fn
from lib.imaging.windowing import load_cached

S = 16
# series A has 3 slices (given out of order), series B a single slice
INDEX = pd.DataFrame({"image_id": ["ID_a2", "ID_b0", "ID_a0", "ID_a1"], "series_uid": ["A", "B", "A", "A"],
                      "slice_idx": [2, 0, 0, 1]})


def image_of(k: int) -> np.ndarray:
    """uint8 (S, S, 3): channel c is the constant 20 * k + c (+ a gradient in channel 1 to catch flips)."""
    img = np.empty((S, S, 3), np.uint8)
    for c in range(3):
        img[..., c] = 20 * k + c
    img[..., 1] += np.arange(S, dtype=np.uint8)[None, :]
    return img


IMAGES = {"ID_a0": image_of(1), "ID_a1": image_of(2), "ID_a2": image_of(3), "ID_b0": image_of(4)}


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    """A cache folder in the `lib.windowing.build_cache` PNG format: RGB saved as BGR PNG, compression 1."""
    out = tmp_path_factory.mktemp("cache")
    for image_id, img in IMAGES.items():
        bgr = cv2.cvtColor(img, cv2.COLOR_RGB2BGR)
        cv2.imwrite(str(out / f"{image_id}.png"), bgr, [cv2.IMWRITE_PNG_COMPRESSION, 1])
    return out


def test_fixture_cache_matches_load_cached(cache) -> None:
    np.testing.assert_array_equal(load_cached(cache, "ID_a1"), IMAGES["ID_a1"])


def test_neighbours_order_and_edges() -> None:
    nb = neighbours(INDEX)
    assert nb["image_id"].tolist() == INDEX["image_id"].tolist()  # row order of the input
    got = nb.set_index("image_id")
    assert got.loc["ID_a0"].tolist() == ["ID_a0", "ID_a1"]  # first slice: prev repeats itself
    assert got.loc["ID_a1"].tolist() == ["ID_a0", "ID_a2"]
    assert got.loc["ID_a2"].tolist() == ["ID_a1", "ID_a2"]  # last slice: next repeats itself
    assert got.loc["ID_b0"].tolist() == ["ID_b0", "ID_b0"]  # single-slice series


def test_neighbours_needs_columns() -> None:
    with pytest.raises(KeyError, match="slice_idx"):
        neighbours(INDEX.drop(columns="slice_idx"))


def unnormalise(x: torch.Tensor) -> np.ndarray:
    """(3, S, S) normalised tensor -> (S, S, 3) float values in 0..255."""
    mean, std = np.array(IMAGENET_MEAN), np.array(IMAGENET_STD)
    return (x.numpy().transpose(1, 2, 0) * std + mean) * 255


def test_single_mode_item(cache) -> None:
    labels = np.eye(6, dtype=np.uint8)[[0, 5]]
    ds = ImageDataset(cache, ["ID_a1", "ID_b0"], labels=labels)
    item = ds[1]
    assert set(item) == {"image", "target", "image_id", "index"}
    assert item["image"].dtype == torch.float32 and item["image"].shape == (3, S, S)
    assert item["target"].dtype == torch.float32 and item["target"].tolist() == [0, 0, 0, 0, 0, 1]
    assert item["image_id"] == "ID_b0" and item["index"] == 1
    np.testing.assert_allclose(unnormalise(item["image"]), IMAGES["ID_b0"], atol=1e-3)
    # a zero-valued pixel maps to -mean/std per channel
    assert abs(float(ds.normalise(np.zeros((2, 2, 3), np.uint8))[2, 0, 0]) + 0.406 / 0.225) < 1e-5


def test_no_labels_gives_zero_target(cache) -> None:
    item = ImageDataset(cache, ["ID_a0"], num_classes=6)[0]
    assert item["target"].dtype == torch.float32 and item["target"].tolist() == [0.0] * 6


def test_adjacent_mode_stacks_channel0_of_neighbours(cache) -> None:
    nb = neighbours(INDEX)
    ds = ImageDataset(cache, ["ID_a1", "ID_a0", "ID_b0"], mode="adjacent", neighbours=nb)
    middle = unnormalise(ds[0]["image"])
    np.testing.assert_allclose(middle[..., 0], IMAGES["ID_a0"][..., 0], atol=1e-3)
    np.testing.assert_allclose(middle[..., 1], IMAGES["ID_a1"][..., 0], atol=1e-3)
    np.testing.assert_allclose(middle[..., 2], IMAGES["ID_a2"][..., 0], atol=1e-3)
    edge = ds.load(1)  # first slice of A: s-1 repeats the centre
    np.testing.assert_array_equal(edge[..., 0], IMAGES["ID_a0"][..., 0])
    np.testing.assert_array_equal(edge[..., 1], IMAGES["ID_a0"][..., 0])
    np.testing.assert_array_equal(edge[..., 2], IMAGES["ID_a1"][..., 0])
    single = ds.load(2)
    assert (single == IMAGES["ID_b0"][..., :1]).all()


def test_adjacent_mode_errors(cache) -> None:
    with pytest.raises(ValueError, match="neighbours"):
        ImageDataset(cache, ["ID_a1"], mode="adjacent")
    with pytest.raises(KeyError, match="ID_zz"):
        ImageDataset(cache, ["ID_zz"], mode="adjacent", neighbours=neighbours(INDEX))
    with pytest.raises(ValueError, match="mode"):
        ImageDataset(cache, ["ID_a1"], mode="3d")
    with pytest.raises(ValueError, match="shape"):
        ImageDataset(cache, ["ID_a1"], labels=np.zeros((2, 6)))


def test_transform_runs_before_normalisation_and_sets_size(cache) -> None:
    ds = ImageDataset(cache, ["ID_a1"], transform=create_transform("none", 24))
    assert ds[0]["image"].shape == (3, 24, 24)
    flip = ImageDataset(cache, ["ID_a1"], transform=create_transform("light", S, hflip=1.0))
    np.testing.assert_allclose(unnormalise(flip[0]["image"]), IMAGES["ID_a1"][:, ::-1], atol=1e-3)


def test_dataloader_collates_dict_batches(cache) -> None:
    ds = ImageDataset(cache, list(IMAGES), labels=np.zeros((4, 6)), transform=create_transform("demo", S))
    # ImageLoader: a plain DataLoader's forked worker hangs once cv2's thread pool has run in this process
    batch = next(iter(ImageLoader(ds, batch_size=4, num_workers=1, worker_init_fn=worker_init_fn)))
    assert batch["image"].shape == (4, 3, S, S) and batch["target"].shape == (4, 6)
    assert batch["image_id"] == list(IMAGES) and batch["index"].tolist() == [0, 1, 2, 3]


# ---------------------------------------------------------------- subsampling
Y = (np.arange(1000) % 10 == 0).astype(np.uint8)  # 100 positives, 900 negatives


def test_epoch_subsample_keeps_positives_and_is_deterministic() -> None:
    a = epoch_subsample(Y, 0.2, epoch=0, seed=1)
    assert set(np.flatnonzero(Y)) <= set(a.tolist())
    assert len(a) == subsample_size(Y, 0.2) == 100 + 180 and len(np.unique(a)) == len(a)
    np.testing.assert_array_equal(a, epoch_subsample(Y, 0.2, epoch=0, seed=1))
    assert not np.array_equal(a, epoch_subsample(Y, 0.2, epoch=1, seed=1))
    assert not np.array_equal(a, epoch_subsample(Y, 0.2, epoch=0, seed=2))
    assert len(epoch_subsample(Y, 1.0, 0, 0)) == 1000
    with pytest.raises(ValueError, match="neg_frac"):
        epoch_subsample(Y, 0.0, 0, 0)


def test_sampler_length_stable_and_epochs_differ() -> None:
    s = SubsampleSampler(Y, 0.2, seed=3)
    e0 = list(s)
    s.set_epoch(1)
    e1 = list(s)
    assert len(s) == len(e0) == len(e1) == 280
    assert e0 != e1 and sorted(e0) != sorted(e1)
    s.set_epoch(0)
    assert list(s) == e0
    assert list(SubsampleSampler(Y, 0.2, seed=3, shuffle=False)) == epoch_subsample(Y, 0.2, 0, 3).tolist()


@pytest.mark.parametrize("world", [2, 3])
def test_sampler_ddp_shards_disjoint_and_covering(world: int) -> None:
    shards = [SubsampleSampler(Y, 0.2, seed=5, rank=r, num_replicas=world) for r in range(world)]
    for s in shards:
        s.set_epoch(4)
    lists = [list(s) for s in shards]
    assert all(len(lst) == len(shards[0]) == -(-280 // world) for lst in lists)
    everything = [i for lst in lists for i in lst]
    assert set(everything) == set(epoch_subsample(Y, 0.2, 4, 5).tolist())
    assert len(everything) - len(set(everything)) == len(shards[0]) * world - 280  # only the padding repeats
    with pytest.raises(ValueError, match="rank"):
        SubsampleSampler(Y, 0.2, seed=5, rank=world, num_replicas=world)


# ---------------------------------------------------------------- augmentation recipes
@pytest.mark.parametrize("recipe", AUGMENTATIONS.names())
def test_every_recipe_builds_and_runs_without_warnings(recipe: str) -> None:
    img = np.random.default_rng(0).integers(0, 256, (40, 40, 3), dtype=np.uint8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # albumentations 2 only warns on invalid arguments
        tf = create_transform(recipe, 32, seed=0)
        for _ in range(5):
            out = tf(image=img)["image"]
            assert out.shape == (32, 32, 3) and out.dtype == np.uint8


def test_recipe_overrides_and_errors() -> None:
    assert "rotate" in recipe_options("appian")
    create_transform("appian", 32, rotate=10)
    with pytest.raises(TypeError, match="valid options"):
        create_transform("appian", 32, rotation=10)
    with pytest.raises(KeyError, match="nobrainer"):
        create_transform("no_such_recipe", 32)


def test_seutao_reverse_channels() -> None:
    tf = create_transform("seutao", 16, seed=0, reverse_p=1.0, hflip=0.0, affine_p=0.0, erase_p=0.0,
                          crop_side=(1.0, 1.0))
    img = np.stack([np.full((16, 16), v, np.uint8) for v in (10, 20, 30)], axis=-1)
    assert tf(image=img)["image"][0, 0].tolist() == [30, 20, 10]


class _FlipProbe(torch.utils.data.Dataset):
    """Item i = 1 if the horizontal flip fired on a left/right-asymmetric image, else 0."""

    def __init__(self) -> None:
        self.transform = create_transform("light", 4)

    def __len__(self) -> int:
        return 32

    def __getitem__(self, i: int) -> int:
        img = np.arange(48, dtype=np.uint8).reshape(4, 4, 3)
        return int(self.transform(image=img)["image"][0, 0, 0] != 0)


def test_worker_init_fn_gives_workers_distinct_augmentation_streams() -> None:
    torch.manual_seed(0)
    batches = [b.tolist() for b in ImageLoader(_FlipProbe(), batch_size=16, num_workers=2,
                                              worker_init_fn=worker_init_fn)]
    assert batches[0] != batches[1]  # without worker_init_fn both forked workers replay the same albumentations RNG


def test_loader_workers_survive_busy_cv2_threads_in_parent(tmp_path: Path) -> None:
    """Regression (seen on a 16-core GPU box): after cv2's thread pool had run in the parent, forked DataLoader
    workers hung for ever in their first cv2 call. lib.data.ImageLoader shuts the pool down around the fork."""
    code = ("import cv2, numpy as np; from lib.data.datasets import ImageLoader, worker_init_fn; "
            "from tests.test_data import _FlipProbe; cv2.setNumThreads(4); "
            "[cv2.resize(np.ones((2048, 2048), np.float32), (999, 999)) for _ in range(5)]; "
            "b = [x.tolist() for x in ImageLoader(_FlipProbe(), batch_size=16, num_workers=2, "
            "worker_init_fn=worker_init_fn)]; print(len(b), cv2.getNumThreads())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         cwd=Path(__file__).resolve().parents[1])
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["2", "4"]  # every batch arrived; the parent's cv2 threads are restored
