"""lib.embed: OOF-ness of the fold exports, float16 memmaps, TTA views, logits consistent with embeddings."""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
import torch

from lib.train.embed import TTA_VIEWS, embed_views, export_embeddings, export_fold, load_embeddings, load_model, oof_table
from lib.train.embed import read_record
from lib.models.factory import create_model
from lib.paths import RunPaths

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one intra-op thread (conftest)

ARCH, SIZE = "resnet18", 32



def write_cache(cache: Path, ids, size: int = SIZE, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    cache.mkdir(parents=True, exist_ok=True)
    for i in ids:
        cv2.imwrite(str(cache / f"{i}.png"), rng.integers(0, 256, (size, size, 3), dtype=np.uint8))


def save_model(path: Path, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = create_model(ARCH, 6).eval()
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": model.state_dict(), "epoch": 0, "cfg": {"arch": ARCH, "img_size": SIZE, "mode": "single"}},
               path)
    return model


@pytest.fixture
def fold_run(tmp_path):
    """12 labelled images in 3 folds, 4 test images, a different random model per fold (best.pth and epoch0.pth)."""
    ids = [f"ID_{i:09x}" for i in range(12)]
    test_ids = [f"ID_f{i:08x}" for i in range(4)]
    cache = tmp_path / "cache"
    write_cache(cache, ids + test_ids)
    folds = pd.DataFrame({"image_id": ids, "fold": [2, 0, 1, 1, 0, 2, 0, 1, 2, 2, 0, 1]})
    rp = RunPaths.at(tmp_path / "run")
    models = {}
    for k in range(3):
        models[k] = save_model(rp.model_dir(k) / "best.pth", seed=k)
        save_model(rp.model_dir(k) / "epoch0.pth", seed=10 + k)
    return rp, cache, folds, test_ids, models


def test_export_fold_is_out_of_fold_and_complete(fold_run):
    rp, cache, folds, test_ids, models = fold_run
    for k in range(3):
        out = export_fold(rp.root, cache, folds, k, ARCH, test_ids=test_ids, bs=4, device="cpu", epochs=[0])
        assert [Path(o["embeddings"]).name for o in out["oof"]] == [f"oof_fold{k}.npy", f"oof_fold{k}_ep0.npy"]
        emb, logits, index = load_embeddings(rp.embeddings_dir / f"oof_fold{k}")
        in_fold = set(folds.loc[folds.fold == k, "image_id"])
        assert set(index["image_id"]) == in_fold and len(index) == len(in_fold)  # only images model k never saw
        assert emb.shape == (len(in_fold), 512) and emb.dtype == np.float16 and logits.shape == (len(in_fold), 6)
        assert logits.dtype == np.float16
        _, _, test_index = load_embeddings(rp.embeddings_dir / f"test_fold{k}")
        assert test_index["image_id"].tolist() == test_ids
    ids, oof = oof_table(rp.root, folds)
    assert ids.tolist() == folds["image_id"].tolist() and oof.shape == (12, 6) and oof.dtype == np.float32
    assert np.isfinite(oof).all()
    # each row really comes from its fold's model: recompute one image of fold 1 with models 1 and 0
    image_id = folds.loc[folds.fold == 1, "image_id"].iloc[0]
    row = ids.tolist().index(image_id)
    x = export_inputs(cache, [image_id])
    views = [TTA_VIEWS.get("orig"), TTA_VIEWS.get("hflip")]
    own = embed_views(models[1], x, views)[1].numpy()[0]
    other = embed_views(models[0], x, views)[1].numpy()[0]
    np.testing.assert_allclose(oof[row], own, atol=2e-3, rtol=2e-3)
    assert np.abs(oof[row] - other).max() > 1e-2


def export_inputs(cache: Path, ids) -> torch.Tensor:
    from lib.data.datasets import ImageDataset
    ds = ImageDataset(cache, ids)
    return torch.stack([ds[i]["image"] for i in range(len(ds))])


def test_export_records_its_tta_checkpoint_and_size(fold_run, tmp_path):
    rp, cache, folds, test_ids, _ = fold_run
    export_fold(rp.root, cache, folds, 1, ARCH, test_ids=[], tta=("orig", "vflip"), bs=4, device="cpu", img_size=32)
    rec = read_record(rp.embedding("oof", 1))
    assert (rec["tta"], rec["img_size"], rec["arch"], rec["mode"]) == (["orig", "vflip"], 32, ARCH, "single")
    assert Path(rec["checkpoint"]) == rp.model_dir(1) / "best.pth"
    assert not Path(rp.embedding_record("oof", 1).read_text().split('"checkpoint": "')[1]).is_absolute()
    with pytest.raises(FileNotFoundError, match="has no record"):
        read_record(rp.embedding("oof", 2))


def test_oof_table_rejects_in_sample_rows(fold_run):
    rp, cache, folds, _, _ = fold_run
    for k in range(3):
        export_fold(rp.root, cache, folds, k, ARCH, test_ids=[], bs=8, device="cpu")
    with pytest.raises(FileNotFoundError, match="incomplete"):
        oof_table(rp.root, folds.assign(fold=folds.fold.replace(2, 3)))
    leaked = folds.loc[folds.fold != 0, "image_id"].iloc[:1].tolist() + folds.loc[folds.fold == 0, "image_id"].tolist()
    export_embeddings(rp.model_dir(0) / "best.pth", ARCH, cache, leaked, rp.embeddings_dir / "oof_fold0", device="cpu")
    with pytest.raises(ValueError, match="not in fold 0"):
        oof_table(rp.root, folds)


def test_memmap_and_logits_consistent_with_embeddings(tmp_path):
    ids = [f"ID_{i:09x}" for i in range(5)]
    write_cache(tmp_path / "cache", ids)
    model = save_model(tmp_path / "best.pth", seed=3)
    res = export_embeddings(tmp_path / "best.pth", ARCH, tmp_path / "cache", ids, tmp_path / "e" / "x",
                            tta=("orig", "hflip", "vflip", "transpose"), bs=2, device="cpu")
    emb = np.load(res["embeddings"], mmap_mode="r")
    assert isinstance(emb, np.memmap) and emb.dtype == np.float16 and emb.shape == (5, 512)
    logits = np.load(res["logits"])
    head = model.get_classifier()(torch.tensor(np.asarray(emb, np.float32))).detach().numpy()
    np.testing.assert_allclose(logits.astype(np.float32), head, atol=5e-3)  # mean of view logits = head(mean emb)
    assert not list((tmp_path / "e").glob(".*tmp"))


def test_tta_hflip_on_symmetric_image(tmp_path):
    rng = np.random.default_rng(5)
    half = rng.integers(0, 256, (SIZE, SIZE // 2, 3), dtype=np.uint8)
    sym, asym = np.concatenate([half, half[:, ::-1]], axis=1), rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
    (tmp_path / "cache").mkdir()
    for name, img in (("ID_sym", sym), ("ID_asym", asym)):
        cv2.imwrite(str(tmp_path / "cache" / f"{name}.png"), img)
    save_model(tmp_path / "best.pth", seed=4)
    out = {}
    for view in ("orig", "hflip"):
        res = export_embeddings(tmp_path / "best.pth", ARCH, tmp_path / "cache", ["ID_sym", "ID_asym"],
                                tmp_path / view, tta=(view,), device="cpu")
        out[view] = np.load(res["embeddings"]).astype(np.float32)
    np.testing.assert_allclose(out["orig"][0], out["hflip"][0], atol=1e-3, rtol=1e-3)
    assert np.abs(out["orig"][1] - out["hflip"][1]).max() > 1e-3  # the view does flip


def test_export_checks_mode_and_arch(tmp_path):
    write_cache(tmp_path / "cache", ["ID_a"])
    save_model(tmp_path / "best.pth", seed=0)
    with pytest.raises(ValueError, match="mode"):
        export_embeddings(tmp_path / "best.pth", ARCH, tmp_path / "cache", ["ID_a"], tmp_path / "x",
                          mode="adjacent", device="cpu")
    with pytest.raises(ValueError, match="arch"):
        load_model(tmp_path / "best.pth", "convnext_atto", torch.device("cpu"))
    with pytest.raises(KeyError, match="valid names"):
        export_embeddings(tmp_path / "best.pth", ARCH, tmp_path / "cache", ["ID_a"], tmp_path / "x", tta=("rot90",))


def test_export_normalises_like_training(tmp_path):
    """The checkpoint cfg's `norm` (TrainConfig.norm) is the one the export normalises with."""
    ids = ["ID_a", "ID_b"]
    write_cache(tmp_path / "cache", ids)
    model = save_model(tmp_path / "best.pth", seed=1)
    ckpt = torch.load(tmp_path / "best.pth", weights_only=True)
    ckpt["cfg"]["norm"] = {"mean": [0.5] * 3, "std": [0.25] * 3}
    torch.save(ckpt, tmp_path / "half.pth")
    res = export_embeddings(tmp_path / "half.pth", ARCH, tmp_path / "cache", ids, tmp_path / "e" / "x", tta=("orig",),
                            device="cpu")
    from lib.data.datasets import ImageDataset
    def logits(**norm) -> np.ndarray:
        ds = ImageDataset(tmp_path / "cache", ids, **norm)
        with torch.no_grad():
            return model(torch.stack([ds[i]["image"] for i in range(len(ds))])).numpy()

    got, want, imagenet = np.load(res["logits"]).astype(np.float32), logits(mean=(0.5,) * 3, std=(0.25,) * 3), logits()
    np.testing.assert_allclose(got, want, rtol=1e-2, atol=1e-3)
    assert np.abs(got - imagenet).max() > 10 * np.abs(got - want).max()
