"""Sequence stage: features, batching, masks, heads, fold logic (OOF-ness) and a learning sanity check."""
from __future__ import annotations

import pickle
from pathlib import Path
from typing import Dict, Tuple

import numpy as np
import pandas as pd
import pytest
import torch

from lib.tasks.ich.labels import SUBTYPES
from lib.evaluate.metrics import weighted_log_loss
from lib.tasks.ich.labels import WEIGHTS
from lib.models.seq_heads import HEADS, create_head
from lib.sequence.strategies import SeqConfig, fit_head, load_models, predict_probs, train_sequence
from lib.sequence.features import (SequenceDataError, SeriesDataset, collate_series, feature_dim, masked_weighted_bce,
                          reverse_features, slice_features, split_output)

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one intra-op thread (conftest)

D = 4



def make_index(lengths, n_patients=None, prefix="tr", seed=0) -> pd.DataFrame:
    """A header index (already ordered) with one series per study; patients cycle over `n_patients`."""
    rng = np.random.default_rng(seed)
    rows = []
    for s, n in enumerate(lengths):
        pos = np.cumsum(rng.uniform(4, 6, size=n))
        for t in range(n):
            rows.append(dict(image_id=f"ID_{prefix}{s:03d}{t:03d}", series_uid=f"{prefix}_se{s}",
                             study_uid=f"{prefix}_st{s}", patient_id=f"{prefix}_pa{s % (n_patients or len(lengths))}",
                             slice_idx=t, n_slices=n, rel_pos=t / max(n - 1, 1), pos_normal=pos[t],
                             spacing_prev=0.0 if t == 0 else pos[t] - pos[t - 1],
                             spacing_next=0.0 if t == n - 1 else pos[t + 1] - pos[t]))
    df = pd.DataFrame(rows)
    return df.sample(frac=1.0, random_state=seed).reset_index(drop=True)  # the dataset must order by itself


def arrays_for(index: pd.DataFrame, dim: int = D, seed: int = 0) -> Tuple[np.ndarray, np.ndarray, pd.Series]:
    rng = np.random.default_rng(seed)
    n = len(index)
    emb = rng.normal(size=(n, dim)).astype(np.float16)
    logits = rng.normal(size=(n, 6)).astype(np.float16)
    rows = pd.Series(rng.permutation(n), index=index["image_id"].to_numpy())
    return emb, logits, rows


# ---------------------------------------------------------------- features and batching
def test_slice_features_deltas_zero_at_ends():
    e = np.arange(12, dtype=np.float16).reshape(4, 3) ** 2
    meta = np.zeros((4, 3), np.float32)
    x = slice_features(e, np.zeros((4, 6)), meta)
    assert x.shape == (4, feature_dim(3, 6))
    d_prev, d_next = x[:, 3:6], x[:, 6:9]
    assert np.all(d_prev[0] == 0) and np.all(d_next[-1] == 0)
    np.testing.assert_allclose(d_prev[2], e[2].astype(np.float32) - e[1])
    np.testing.assert_allclose(d_next[1], e[1].astype(np.float32) - e[2])


def test_reversal_swaps_deltas_and_spacings_consistently():
    rng = np.random.default_rng(1)
    e, lg = rng.normal(size=(5, D)), rng.normal(size=(5, 6))
    meta = np.c_[[0, 1, 2, 3, 4], [1, 2, 3, 4, 0], np.linspace(0, 1, 5)].astype(np.float32)
    rev_meta = meta[::-1][:, [1, 0, 2]]  # read backwards: old next spacing is the new previous one
    direct = slice_features(e[::-1], lg[::-1], rev_meta)
    np.testing.assert_allclose(reverse_features(slice_features(e, lg, meta), D, 6), direct, atol=1e-6)


def test_dataset_orders_slices_and_reverses_items():
    index = make_index([5, 3])
    emb, logits, rows = arrays_for(index)
    ds = SeriesDataset(index, emb, logits, rows, labels=None, label_names=SUBTYPES)
    item = ds[0]
    assert item["image_id"] == [f"ID_tr000{t:03d}" for t in range(5)]
    assert item["x"].shape == (5, feature_dim(D, 6)) and item["y"].shape == (5, 6)
    np.testing.assert_allclose(item["x"][:, :D], emb[rows[item["image_id"]].to_numpy()].astype(np.float32))
    back = ds.reversed()[0]
    assert back["image_id"] == item["image_id"][::-1]
    np.testing.assert_allclose(back["x"], reverse_features(item["x"], D, 6))


def test_crop_keeps_true_neighbour_deltas():
    index = make_index([9])
    emb, logits, rows = arrays_for(index)
    full = SeriesDataset(index, emb, logits, rows, label_names=SUBTYPES)[0]
    ds = SeriesDataset(index, emb, logits, rows, crop=(3, 4), seed=3, label_names=SUBTYPES)
    for _ in range(10):
        it = ds[0]
        start = full["image_id"].index(it["image_id"][0])
        assert 3 <= len(it["image_id"]) <= 4
        assert it["image_id"] == full["image_id"][start:start + len(it["image_id"])]
        np.testing.assert_allclose(it["x"], full["x"][start:start + len(it["image_id"])])


def test_collate_pads_at_the_end_with_mask():
    index = make_index([5, 2, 3])
    emb, logits, rows = arrays_for(index)
    ds = SeriesDataset(index, emb, logits, rows, label_names=SUBTYPES)
    b = collate_series([ds[0], ds[1], ds[2]])
    assert b["x"].shape == (3, 5, feature_dim(D, 6)) and b["y"].shape == (3, 5, 6) and b["mask"].dtype == torch.bool
    assert b["lengths"].tolist() == [5, 2, 3] and b["mask"].sum(1).tolist() == [5, 2, 3]
    assert [len(i) for i in b["image_id"]] == [5, 2, 3]
    assert torch.all(b["x"][1, 2:] == 0) and torch.all(b["mask"][1, :2])


def test_dataset_errors_name_the_missing_inputs():
    index = make_index([3])
    emb, logits, rows = arrays_for(index)
    with pytest.raises(SequenceDataError, match="no embedding row"):
        SeriesDataset(index, emb, logits, rows.iloc[1:], label_names=SUBTYPES)
    labels = pd.DataFrame(0, index=index["image_id"].iloc[1:], columns=list(SUBTYPES))
    with pytest.raises(SequenceDataError, match="no labels"):
        SeriesDataset(index, emb, logits, rows, labels=labels)


def test_memmap_is_pickled_by_name_not_content(tmp_path: Path):
    index = make_index([4, 4])
    emb, logits, rows = arrays_for(index, dim=256)
    np.save(tmp_path / "e.npy", emb)
    mm = np.load(tmp_path / "e.npy", mmap_mode="r")
    ds = SeriesDataset(index, mm, logits, rows, label_names=SUBTYPES)
    blob = pickle.dumps(ds)
    assert len(blob) < emb.nbytes
    np.testing.assert_array_equal(pickle.loads(blob)[1]["x"], ds[1]["x"])


# ---------------------------------------------------------------- heads and loss
@pytest.mark.parametrize("name", HEADS.names())
def test_padding_never_changes_real_outputs(name: str):
    torch.manual_seed(0)
    nf = feature_dim(D, 6)
    head = create_head(name, nf, 6).eval()
    short, long = torch.randn(1, 4, nf), torch.randn(1, 9, nf)
    batch = torch.zeros(2, 9, nf)
    batch[0], batch[1, :4] = long[0], short[0]
    mask = torch.zeros(2, 9, dtype=torch.bool)
    mask[0], mask[1, :4] = True, True
    batch[1, 4:] = 100.0  # garbage in the padding must not leak either
    with torch.no_grad():
        alone = split_output(head(short, torch.ones(1, 4, dtype=torch.bool)))
        padded = split_output(head(batch, mask))
    for a, p in zip(alone, padded):
        if a is not None:
            assert a.shape == (1, 4, 6)
            torch.testing.assert_close(p[1, :4], a[0], atol=1e-5, rtol=0)


def test_masked_loss_matches_metric_and_ignores_padding():
    torch.manual_seed(0)
    logits, y = torch.randn(2, 5, 6), (torch.rand(2, 5, 6) > 0.7).float()
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]], dtype=torch.bool)
    loss = masked_weighted_bce(logits, y, mask, WEIGHTS)
    expect = weighted_log_loss(y[mask].numpy(), torch.sigmoid(logits[mask]).numpy(), WEIGHTS)
    assert loss.item() == pytest.approx(expect, rel=1e-5)
    y2, logits2 = y.clone(), logits.clone()
    y2[1, 2:], logits2[1, 2:] = 1 - y2[1, 2:], 50.0
    assert masked_weighted_bce(logits2, y2, mask, WEIGHTS).item() == pytest.approx(loss.item(), rel=1e-6)
    y2[1, 0] = 1 - y2[1, 0]  # a real target does count
    assert masked_weighted_bce(logits, y2, mask, WEIGHTS).item() != pytest.approx(loss.item(), rel=1e-6)


def test_unknown_names_and_config_keys_are_listed():
    with pytest.raises(KeyError, match="gru_conv, lstm"):
        create_head("gru", 10, 6)
    with pytest.raises(KeyError, match="valid keys"):
        SeqConfig.from_dict({"hedd": "lstm"})
    assert SeqConfig.from_dict({**SEQ, "crop": [8, 16]}).crop == (8, 16)
    with pytest.raises(KeyError, match="needs values for"):
        SeqConfig.from_dict({"head": "lstm"})


def test_seq_from_params_builds_the_crop():
    params = {k: v for k, v in SEQ.items() if k != "crop"}
    assert SeqConfig.from_params(**params, crop_min=0, crop_max=32).crop is None
    assert SeqConfig.from_params(**params, crop_min=6, crop_max=12).crop == (6, 12)


# ---------------------------------------------------------------- fold logic on a tiny fake run
#: every experiment setting (SeqConfig has no defaults for them; notebooks/ich/04_sequence.ipynb holds them)
SEQ = dict(head="lstm", head_kwargs={}, epochs=8, lr=1e-3, bs=16, wd=1e-2, crop=(24, 48), reverse_p=0.5,
           aux_weight=0.5, inner_folds=4, seed=42, mixed_precision="no", snapshot_epochs=0, select="best",
           tta_flip=True, spacing_scale=10.0, series_key="series_uid", emb_suffix="", inputs="embedding")


def seq_cfg(**over: object) -> SeqConfig:
    return SeqConfig(**{**SEQ, **over})


def write_set(root: Path, stem: str, ids: np.ndarray, emb: np.ndarray, logits: np.ndarray, seed: int) -> None:
    perm = np.random.default_rng(seed).permutation(len(ids))
    np.save(root / f"{stem}.npy", emb[perm].astype(np.float16))
    np.save(root / f"{stem}_logits.npy", logits[perm].astype(np.float16))
    pd.DataFrame({"image_id": ids[perm], "row": np.arange(len(ids))}).to_parquet(root / f"{stem}.parquet")


def fake_run(run_dir: Path, dim: int = 16, n_folds: int = 3):
    """12 train series of 9 patients in 3 folds + 4 test series. Each oof_fold{k} file holds rows for ALL train
    images, but those of images outside fold k (in-sample for CNN k) are NaN: consuming one poisons the run."""
    rng = np.random.default_rng(0)
    index = make_index(rng.integers(4, 9, size=12), n_patients=9)
    test = make_index(rng.integers(4, 9, size=4), prefix="te", seed=1)
    pat_fold = {p: i % n_folds for i, p in enumerate(sorted(index["patient_id"].unique()))}
    folds = index[["image_id", "patient_id", "study_uid", "series_uid"]].assign(fold=index["patient_id"].map(pat_fold))
    labels = pd.DataFrame((rng.random((len(index), 6)) < 0.3).astype(np.uint8), index=index["image_id"].to_numpy(),
                          columns=list(SUBTYPES))
    root = run_dir / "embeddings"
    root.mkdir(parents=True)
    ids = index["image_id"].to_numpy()
    for k in range(n_folds):
        emb, lg = rng.normal(size=(len(ids), dim)), rng.normal(size=(len(ids), 6))
        in_sample = (folds["fold"] != k).to_numpy()
        emb[in_sample], lg[in_sample] = np.nan, np.nan
        write_set(root, f"oof_fold{k}", ids, emb, lg, seed=k)
        write_set(root, f"test_fold{k}", test["image_id"].to_numpy(), rng.normal(size=(len(test), dim)),
                  rng.normal(size=(len(test), 6)), seed=10 + k)
    return index, folds, labels, test


@pytest.mark.parametrize("strategy", ["pooled", "per_fold"])
def test_train_sequence_is_out_of_fold(tmp_path: Path, strategy: str):
    index, folds, labels, test = fake_run(tmp_path)
    cfg = seq_cfg(head_kwargs={"hidden": 8}, epochs=1, bs=4, crop=(3, 6), inner_folds=2, progress=False)
    res = train_sequence(tmp_path, index, folds, labels, cfg, WEIGHTS, strategy=strategy, test_index_df=test)
    oof, pred_test = res["oof"], res["test"]
    assert sorted(oof.index) == sorted(index["image_id"]) and not oof.index.duplicated().any()
    assert oof.index.name == "image_id" and list(oof.columns) == list(SUBTYPES)
    assert sorted(pred_test.index) == sorted(test["image_id"])
    assert np.isfinite(oof.to_numpy()).all() and np.isfinite(pred_test.to_numpy()).all()  # no poisoned row read
    fold_of = folds.set_index("image_id")["fold"]
    patient_of = index.set_index("image_id")["patient_id"]
    by_model: Dict[str, Dict[str, set]] = {}
    for rec in res["provenance"]:
        if rec["source"].startswith("oof_fold"):  # features of an image only from the CNN that did not see it
            assert set(fold_of[rec["image_ids"]]) == {int(rec["source"][len("oof_fold"):])}
        by_model.setdefault(rec["model"], {}).setdefault(rec["role"], set()).update(rec["image_ids"])
    for name, roles in by_model.items():
        assert roles["train"] and roles["valid"] and not roles["train"] & roles["valid"]
        assert not set(patient_of[list(roles["train"])]) & set(patient_of[list(roles["valid"])])
        if strategy == "pooled":  # outer model k never trains on a fold-k image and predicts exactly fold k
            k = int(name[len("outer"):])
            assert set(fold_of[list(roles["train"])]) == set(range(3)) - {k}
            assert roles["valid"] == set(fold_of.index[fold_of == k])
    assert len(by_model) == (3 if strategy == "pooled" else 6)
    assert (tmp_path / f"predictions/oof_seq_{strategy}.csv").is_file()
    assert f"oof_seq_{strategy}_logloss" in res["metrics"]
    ckpt = next((tmp_path / f"models/seq_{strategy}/fold0").glob("*.pth"))
    assert load_models(ckpt)[0].out.out_features == 6


# ---------------------------------------------------------------- learning sanity
def neighbour_task(n_series: int, seed: int):
    """Positive runs (>= 3 slices) whose two end slices have a negative-looking CNN logit: only the neighbours
    reveal them. Embeddings are pure noise. Returns index, emb, logits, rows, labels."""
    rng = np.random.default_rng(seed)
    index = make_index(rng.integers(12, 20, size=n_series), prefix=f"s{seed}_", seed=seed)
    index = index.sort_values(["series_uid", "slice_idx"]).reset_index(drop=True)
    y = np.zeros((len(index), 6), np.float32)
    lg = np.full((len(index), 6), -3.0, np.float32)
    for _, grp in index.groupby("series_uid"):
        if rng.random() < 0.6:
            n, run = len(grp), int(rng.integers(3, 7))
            a = int(rng.integers(1, n - run))
            rows = grp.index.to_numpy()[a:a + run]
            y[np.ix_(rows, [3, 5])] = 1
            lg[np.ix_(rows[1:-1], [3, 5])] = 3.0
    lg += rng.normal(scale=0.3, size=lg.shape).astype(np.float32)
    emb = rng.normal(size=(len(index), 8)).astype(np.float16)
    rows = pd.Series(np.arange(len(index)), index=index["image_id"].to_numpy())
    labels = pd.DataFrame(y.astype(np.uint8), index=index["image_id"].to_numpy(), columns=list(SUBTYPES))
    return index, emb, lg.astype(np.float16), rows, labels


@pytest.mark.parametrize("head,kwargs,device", [
    ("lstm", {"hidden": 32, "dropout": 0.0}, "cpu"),
    pytest.param("lstm", {"hidden": 32, "dropout": 0.0}, "cuda", marks=pytest.mark.gpu),
    pytest.param("gru_conv", {"mlp_dim": 32, "hidden": 32}, "cuda", marks=pytest.mark.gpu),
])
def test_head_beats_per_slice_logits_when_context_matters(tmp_path: Path, head: str, kwargs: dict, device: str):
    tr, va = neighbour_task(120, seed=1), neighbour_task(40, seed=2)
    cfg = seq_cfg(head=head, head_kwargs=kwargs, epochs=8, lr=1e-2, bs=16, crop=None, device=device,
                  mixed_precision="bf16" if device == "cuda" else "no", reverse_p=0.5, progress=False,
                    select="last")
    train_ds = SeriesDataset(*tr[:4], labels=tr[4], reverse_p=0.5)
    valid_ds = SeriesDataset(*va[:4], labels=va[4])
    models, _ = fit_head(train_ds, valid_ds, cfg, feature_dim(8, 6), WEIGHTS, tmp_path, tag="sanity")
    pred = predict_probs(models, valid_ds, progress=False)
    y = va[4].reindex(pred.index).to_numpy(np.float64)
    per_slice = 1 / (1 + np.exp(-va[2].astype(np.float64)[va[3][pred.index].to_numpy()]))
    seq_loss, cnn_loss = weighted_log_loss(y, pred.to_numpy(), WEIGHTS), weighted_log_loss(y, per_slice, WEIGHTS)
    assert seq_loss < 0.5 * cnn_loss, (seq_loss, cnn_loss)


def test_strategy_registry_round_trip():
    from lib.sequence.strategies import STRATEGIES, TestRule

    assert STRATEGIES.names() == ["per_fold", "pooled"]
    pooled, per_fold = STRATEGIES.get("pooled").test, STRATEGIES.get("per_fold").test
    assert (pooled.name, pooled.cnn_folds(1, [0, 1, 2])) == ("pairs", [0, 1, 2])
    assert (per_fold.name, per_fold.cnn_folds(1, [0, 1, 2])) == ("per_cnn_fold", [1])
    frame = lambda v: pd.DataFrame({"any": [v]}, index=["ID_a"])  # noqa: E731
    preds = [(0, frame(0.1)), (0, frame(0.3)), (1, frame(0.8))]
    assert pooled.average(preds).loc["ID_a", "any"] == pytest.approx(0.4)  # mean over the 3 pairs
    assert per_fold.average(preds).loc["ID_a", "any"] == pytest.approx(0.5)  # mean of fold 0's 0.2 and fold 1's 0.8
    with pytest.raises(KeyError, match="per_fold, pooled"):
        STRATEGIES.get("stacked")
    assert isinstance(pooled, TestRule)


def test_rerun_reuses_finished_heads_and_retrains_what_changed(tmp_path: Path):
    index, folds, labels, _ = fake_run(tmp_path)
    cfg = seq_cfg(head_kwargs={"hidden": 8}, epochs=1, bs=4, crop=(3, 6), progress=False)
    first = train_sequence(tmp_path, index, folds, labels, cfg, WEIGHTS, strategy="pooled")
    assert not any("reused" in log for log in first["logs"])
    again = train_sequence(tmp_path, index, folds, labels, cfg, WEIGHTS, strategy="pooled")  # e.g. after a kill
    assert all("reused" in log for log in again["logs"]) and len(again["logs"]) == 3
    pd.testing.assert_frame_equal(first["oof"], again["oof"])
    (tmp_path / "models/seq_pooled/fold1/outer1.pth").unlink()  # killed while training outer1
    partial = train_sequence(tmp_path, index, folds, labels, cfg, WEIGHTS, strategy="pooled")
    assert ["reused" in log for log in partial["logs"]] == [True, False, True]
    pd.testing.assert_frame_equal(first["oof"], partial["oof"])  # the retrained head is the same head
    changed = train_sequence(tmp_path, index, folds, labels, SeqConfig(**{**cfg.__dict__, "epochs": 2}), WEIGHTS,
                             strategy="pooled")
    assert not any("reused" in log for log in changed["logs"])
    fresh = train_sequence(tmp_path, index, folds, labels, SeqConfig(**{**cfg.__dict__, "resume": False}), WEIGHTS,
                           strategy="pooled")
    assert not any("reused" in log for log in fresh["logs"])
