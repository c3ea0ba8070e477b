"""Training and inference of sequence heads with a fastai Learner, and the two fold strategies.

The K CNN fold models embed into K different feature spaces, so embeddings are never averaged across fold models.
`per_fold`: for CNN fold k, sequence models train on fold-k images only (CNN-k space) with an inner split by patient;
test = mean over inner models on test_fold{k}, then over k. `pooled`: outer model k trains on the OOF features of
all folds != k (each image embedded by the CNN that did not see it) and predicts fold k; test = mean over every
(outer model, CNN fold) pair. Both give OOF predictions for every labelled image, keyed by image_id. Each strategy is
registered once in `STRATEGIES` with its test-time rule (`TestRule`), which training, the weights bundle and
test-only inference (lib.kaggle) all use.
Model selection: `select="best"` keeps the epoch with the lowest masked metric on the validation series (the
series it then predicts: slightly optimistic OOF, as in the 1st place); `select="last"` or `snapshot_epochs=n`
(average of the last n epochs) never look at validation labels.
"""
from __future__ import annotations

import hashlib
import json
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import pandas as pd
from scipy.special import expit
import torch
from lib.train import fastai_quiet  # noqa: F401  (before fastai: silences its torch.jit FutureWarning)
from fastai.callback.core import Callback
from fastai.callback.fp16 import MixedPrecision
from fastai.callback.progress import CSVLogger
from fastai.callback.schedule import fit_one_cycle  # noqa: F401  (patches Learner.fit_one_cycle)
from fastai.data.core import DataLoaders
from fastai.learner import Learner, Metric
from sklearn.model_selection import GroupKFold
from torch import nn
from torch.utils.data import ConcatDataset, DataLoader, Dataset

from lib.evaluate.metrics import metric_report, weighted_log_loss
from lib.paths import PathLike, RunPaths, atomic_write, atomic_write_text
from lib.train.precision import resolve_precision
from lib.sequence.config import (INPUTS, TEST_RULES, SeqConfig, TestPreds, TestRule, resolve_device,  # noqa: F401
                                 slice_vectors)
from lib.ensemble import write_predictions
from lib.registry import Registry
from lib.models.seq_heads import create_head
from lib.sequence.features import (EmbeddingSet, SeriesDataset, SeqLoss, SequenceDataError, collate_for_learner,
                                   feature_dim, load_models, open_embedding_set, predict_probs, seed_worker,
                                   split_output)

@dataclass(frozen=True)
class Strategy:
    """A fold strategy: `fit(run)` -> (OOF prediction parts, test predictions), and its test-time rule."""

    fit: Callable[["_Run"], Tuple[List[pd.DataFrame], TestPreds]]
    test: TestRule


STRATEGIES: Registry = Registry("sequence fold strategy")


def register_strategy(name: str) -> Callable:
    """Decorator: register a strategy's fit function under `name` together with its test-time rule (declared,
    fastai-free, in `lib.sequence.config.TEST_RULES`, which the bundle and test-only inference read)."""
    def deco(fit: Callable) -> Callable:
        STRATEGIES.add(name, Strategy(fit, TEST_RULES.get(name)))
        return fit
    return deco


class MaskedWLL(Metric):
    """The task metric (`lib.evaluate.metrics.weighted_log_loss` with the task's `weights`) over the real validation
    slices of an epoch."""

    def __init__(self, weights: Sequence[float]) -> None:
        self.weights = tuple(weights)

    def reset(self) -> None:
        self.preds: List[np.ndarray] = []
        self.targs: List[np.ndarray] = []

    def accumulate(self, learn: Learner) -> None:
        main, _ = split_output(learn.pred)
        y, mask = learn.yb
        self.preds.append(torch.sigmoid(main.float())[mask].detach().cpu().numpy())
        self.targs.append(y[mask].detach().float().cpu().numpy())

    @property
    def value(self) -> Optional[float]:
        if not self.preds or not sum(len(p) for p in self.preds):
            return None
        return weighted_log_loss(np.concatenate(self.targs), np.concatenate(self.preds), self.weights)

    @property
    def name(self) -> str:
        return "wll"


class KeepStates(Callback):
    """Keep CPU copies of the weights to predict with: best epoch, last epoch, or the last n epochs."""

    order = 60  # after Recorder

    def __init__(self, metric: MaskedWLL, select: str, snapshot_epochs: int) -> None:
        self.metric, self.select, self.snapshots = metric, select, int(snapshot_epochs)
        self.states: List[Dict[str, torch.Tensor]] = []
        self.best, self.best_epoch = float("inf"), -1

    def after_epoch(self) -> None:
        state = {k: v.detach().cpu().clone() for k, v in self.learn.model.state_dict().items()}
        if self.snapshots > 0:
            self.states = (self.states + [state])[-self.snapshots:]
        elif self.select == "last" or (self.metric.value is not None and self.metric.value < self.best):
            self.states, self.best_epoch = [state], self.epoch
            self.best = self.metric.value if self.metric.value is not None else self.best


def fit_head(train_ds: Dataset, valid_ds: Dataset, cfg: SeqConfig, in_dim: int, weights: Sequence[float],
             out_dir: Path, tag: str, fingerprint: str = "") -> Tuple[List[nn.Module], Dict[str, Any]]:
    """Train one head with `fit_one_cycle` (one output per label, loss and metric weighted by the task's `weights`);
    save `{tag}.pth` (+ fastai `log_{tag}.csv`) under out_dir.

    Returns the model(s) to predict with (one, or one per snapshot) and a small log dict.
    """
    torch.manual_seed(cfg.seed)
    device = resolve_device(cfg.device)
    model = create_head(cfg.head, in_dim, len(weights), **cfg.head_kwargs).to(device)
    gen = torch.Generator().manual_seed(cfg.seed)
    kw = dict(batch_size=cfg.bs, collate_fn=collate_for_learner, num_workers=cfg.num_workers,
              worker_init_fn=seed_worker, pin_memory=device.type == "cuda")
    dls = DataLoaders(DataLoader(train_ds, shuffle=True, generator=gen, **kw), DataLoader(valid_ds, **kw))
    dls.n_inp = 2  # batch = (x, mask | y, mask): model(x, mask), loss(pred, y, mask)
    metric = MaskedWLL(weights)
    keep = KeepStates(metric, cfg.select, cfg.snapshot_epochs)
    cbs = [CSVLogger(fname=f"log_{tag}.csv"), keep]
    precision = resolve_precision(cfg.mixed_precision, device)  # the CNN stage's rule
    if precision:
        cbs.append(MixedPrecision(precision))
    learn = Learner(dls, model, loss_func=SeqLoss(weights, cfg.aux_weight), metrics=[metric], wd=cfg.wd, path=out_dir,
                    model_dir=".", cbs=cbs)
    with (nullcontext() if cfg.progress else learn.no_bar()), (nullcontext() if cfg.progress else learn.no_logging()):
        learn.fit_one_cycle(cfg.epochs, lr_max=cfg.lr)
    if not keep.states:
        raise SequenceDataError(f"{tag}: the validation metric was never finite (NaN inputs or a diverged model)")
    ckpt = {"head": cfg.head, "head_kwargs": cfg.head_kwargs, "in_dim": in_dim, "num_classes": len(weights),
            "states": keep.states, "fingerprint": fingerprint}
    atomic_write(out_dir / f"{tag}.pth", lambda tmp: torch.save(ckpt, tmp))  # a killed run leaves no half head
    log = {"tag": tag, "best_epoch": keep.best_epoch, "valid_wll_best": keep.best if keep.best_epoch >= 0 else None,
           "valid_wll_last": metric.value, "n_states": len(keep.states)}
    return load_models(ckpt, device), log


@dataclass
class _Run:
    """State shared by the strategies: config, the labelled train table, embedding sets, outputs."""

    cfg: SeqConfig
    paths: RunPaths
    strategy: str
    train: pd.DataFrame
    labels: pd.DataFrame
    oof_sets: Dict[int, EmbeddingSet]
    test_sets: Dict[int, EmbeddingSet]
    test: Optional[pd.DataFrame]
    in_dim: int
    weights: Tuple[float, ...]
    provenance: List[Dict[str, Any]] = field(default_factory=list)
    logs: List[Dict[str, Any]] = field(default_factory=list)

    def dataset(self, df: pd.DataFrame, es: EmbeddingSet, train: bool, labelled: bool = True) -> SeriesDataset:
        c = self.cfg
        return SeriesDataset(df, slice_vectors(es, c), es.logits, es.rows, self.labels if labelled else None,
                             c.series_key, crop=c.crop if train else None, reverse_p=c.reverse_p if train else 0.0,
                             seed=c.seed + len(self.provenance), spacing_scale=c.spacing_scale,
                             label_names=list(self.labels.columns))

    def note(self, model: str, role: str, es: EmbeddingSet, df: pd.DataFrame) -> None:
        self.provenance.append({"model": model, "role": role, "source": es.name,
                                "image_ids": df["image_id"].astype(str).to_numpy()})

    def fit(self, model: str, fold: int, parts: List[Tuple[pd.DataFrame, EmbeddingSet]],
            valid: Tuple[pd.DataFrame, EmbeddingSet]) -> Tuple[List[nn.Module], SeriesDataset]:
        for df, es in parts:
            self.note(model, "train", es, df)
        self.note(model, "valid", valid[1], valid[0])
        valid_ds = self.dataset(valid[0], valid[1], train=False)
        out_dir = self.paths.model_dir(fold, name=f"seq_{self.strategy}")
        fp = self.fingerprint(parts, valid)
        done = out_dir / f"{model}.pth"
        if self.cfg.resume and done.is_file():
            ckpt = torch.load(done, map_location="cpu", weights_only=True)
            if ckpt.get("fingerprint") == fp:
                self.logs.append({"tag": model, "reused": str(done)})
                return load_models(ckpt, resolve_device(self.cfg.device)), valid_ds
        train_ds = ConcatDataset([self.dataset(df, es, train=True) for df, es in parts])
        models, log = fit_head(train_ds, valid_ds, self.cfg, self.in_dim, self.weights, out_dir, tag=model,
                               fingerprint=fp)
        self.logs.append(log)
        return models, valid_ds

    def fingerprint(self, parts: List[Tuple[pd.DataFrame, EmbeddingSet]],
                    valid: Tuple[pd.DataFrame, EmbeddingSet]) -> str:
        """What a trained head depends on: the training settings, the input size, and per input set its name, its
        images and its CNN logits (new CNN weights give new logits). Run-only settings are left out."""
        h = hashlib.sha256()
        run_only = {"progress", "num_workers", "device", "resume"}
        h.update(json.dumps({k: v for k, v in asdict(self.cfg).items() if k not in run_only}, sort_keys=True,
                            default=str).encode())
        h.update(str(self.in_dim).encode())
        for df, es in [*parts, valid]:
            ids = df["image_id"].astype(str).to_numpy()
            h.update(es.name.encode())
            h.update("\n".join(ids).encode())
            h.update(np.ascontiguousarray(es.logits[es.rows.loc[ids].to_numpy()]).tobytes())
        return h.hexdigest()

    def predict(self, model: str, models: List[nn.Module], ds: SeriesDataset, es: EmbeddingSet,
                df: pd.DataFrame) -> pd.DataFrame:
        self.note(model, "predict", es, df)
        return predict_probs(models, ds, bs=max(self.cfg.bs, 32), flip=self.cfg.tta_flip,
                             num_workers=self.cfg.num_workers, progress=self.cfg.progress)

    def predict_test(self, model: str, models: List[nn.Module], folds: List[int]) -> TestPreds:
        if self.test is None:
            return []
        return [(k, self.predict(model, models, self.dataset(self.test, self.test_sets[k], False, labelled=False),
                                 self.test_sets[k], self.test)) for k in folds]


@register_strategy("pooled")
def _pooled(run: _Run) -> Tuple[List[pd.DataFrame], TestPreds]:
    folds = sorted(run.oof_sets)
    rule = STRATEGIES.get("pooled").test
    oof: List[pd.DataFrame] = []
    test: TestPreds = []
    for k in folds:
        parts = [(run.train[run.train["fold"] == k2], run.oof_sets[k2]) for k2 in folds if k2 != k]
        valid = (run.train[run.train["fold"] == k], run.oof_sets[k])
        models, valid_ds = run.fit(f"outer{k}", k, parts, valid)
        oof.append(run.predict(f"outer{k}", models, valid_ds, valid[1], valid[0]))
        test += run.predict_test(f"outer{k}", models, rule.cnn_folds(k, folds))
    return oof, test


@register_strategy("per_fold")
def _per_fold(run: _Run) -> Tuple[List[pd.DataFrame], TestPreds]:
    folds = sorted(run.oof_sets)
    rule = STRATEGIES.get("per_fold").test
    oof: List[pd.DataFrame] = []
    test: TestPreds = []
    for k in folds:
        fk = run.train[run.train["fold"] == k]
        series = fk.groupby(run.cfg.series_key, sort=True)["patient_id"].first()
        n_splits = min(run.cfg.inner_folds, series.nunique())
        if n_splits < 2:
            raise SequenceDataError(f"fold {k} has {series.nunique()} patient(s); per_fold needs >= 2")
        for j, (tr, va) in enumerate(GroupKFold(n_splits).split(series.index, groups=series.to_numpy())):
            tr_df, va_df = (fk[fk[run.cfg.series_key].isin(series.index[idx])] for idx in (tr, va))
            name, es = f"cnn{k}_inner{j}", run.oof_sets[k]
            models, valid_ds = run.fit(name, k, [(tr_df, es)], (va_df, es))
            oof.append(run.predict(name, models, valid_ds, es, va_df))
            test += run.predict_test(name, models, rule.cnn_folds(k, folds))
    return oof, test


def _train_table(index_df: pd.DataFrame, folds: pd.DataFrame, labels: pd.DataFrame, key: str) -> pd.DataFrame:
    """Index rows of labelled images with their fold; a series must lie in one fold."""
    df = index_df.merge(folds[["image_id", "fold"]], on="image_id", how="inner", validate="one_to_one")
    split = df.groupby(key)["fold"].nunique()
    if (split > 1).any():
        raise SequenceDataError(f"{int((split > 1).sum())} series span several folds, e.g. "
                                f"{split.index[split > 1][:3].tolist()}; folds must be grouped by patient")
    unlabelled = ~df["image_id"].isin(labels.index)
    if unlabelled.any():
        raise SequenceDataError(f"{int(unlabelled.sum())} fold images have no labels, e.g. "
                                f"{df.loc[unlabelled, 'image_id'].head(3).tolist()}")
    return df


def train_sequence(run_dir: PathLike, index_df: pd.DataFrame, folds: pd.DataFrame, labels: pd.DataFrame,
                   cfg: SeqConfig, weights: Sequence[float], strategy: str = "pooled",
                   test_index_df: Optional[pd.DataFrame] = None, write: bool = True,
                   test_writer: Optional[Callable[[pd.DataFrame, Path], None]] = None) -> Dict[str, Any]:
    """Train sequence heads over the CNN folds; returns {oof, test (wide, index image_id), metrics, provenance}.

    labels: wide table (index image_id, one column per label of the task, in its order); weights: the task's metric
    weight per label. With `write`: predictions/oof_seq_{strategy}.csv (wide), predictions/test_seq_{strategy}.csv
    (written by `test_writer(wide, path)`, e.g. the task's submission format; default wide),
    models/seq_{strategy}/fold{k}/*.pth + log_*.csv + train_log.json, and metrics.json keys oof_seq_{strategy}_*.
    """
    t0, strat = time.time(), STRATEGIES.get(strategy)
    paths = RunPaths.at(run_dir)
    train = _train_table(index_df, folds, labels, cfg.series_key)
    ks = sorted(int(k) for k in train["fold"].unique())
    oof_sets = {k: open_embedding_set(run_dir, "oof", k, cfg.emb_suffix) for k in ks}
    test_sets = ({k: open_embedding_set(run_dir, "test", k, cfg.emb_suffix) for k in ks}
                 if test_index_df is not None else {})
    if len(weights) != labels.shape[1]:
        raise SequenceDataError(f"{len(weights)} metric weights for {labels.shape[1]} labels {list(labels.columns)}")
    first = oof_sets[ks[0]]
    run = _Run(cfg, paths, strategy, train, labels, oof_sets, test_sets, test_index_df,
               feature_dim(slice_vectors(first, cfg).shape[1], first.logits.shape[1]), tuple(float(w) for w in weights))
    oof_parts, test_parts = strat.fit(run)
    test = strat.test.average(test_parts) if test_parts else None
    oof, expected = pd.concat(oof_parts), train["image_id"].astype(str).to_numpy()
    if oof.index.duplicated().any() or len(oof) != len(expected) or not oof.index.isin(expected).all():
        raise SequenceDataError(f"{strategy}: OOF predictions do not cover every labelled image exactly once")
    oof = oof.reindex(pd.Index(expected, name="image_id"))
    if not np.isfinite(oof.to_numpy()).all() or (test is not None and not np.isfinite(test.to_numpy()).all()):
        raise SequenceDataError(f"{strategy}: non-finite predictions (NaN inputs or a diverged model)")
    names = list(labels.columns)
    y = labels.reindex(oof.index).to_numpy(np.float64)
    cnn = _cnn_oof_probs(train, oof_sets, names).reindex(oof.index).to_numpy()
    metrics = {**metric_report(y, oof.to_numpy(), f"oof_seq_{strategy}", names, run.weights),
               f"oof_seq_{strategy}_input_cnn_logloss": weighted_log_loss(y, cnn, run.weights),
               f"seq_{strategy}_train_s": round(time.time() - t0, 1)}
    if write:
        _write(run, oof, test, metrics, test_writer)
    return {"oof": oof, "test": test, "metrics": metrics, "provenance": run.provenance, "logs": run.logs}


def _cnn_oof_probs(train: pd.DataFrame, sets: Dict[int, EmbeddingSet], names: Sequence[str]) -> pd.DataFrame:
    """The CNN's own OOF probabilities (sigmoid of the exported logits) for the labelled images."""
    frames = []
    for k, es in sets.items():
        ids = train.loc[train["fold"] == k, "image_id"].astype(str).to_numpy()
        logits = np.asarray(es.logits[es.rows.reindex(ids).to_numpy()], dtype=np.float64)
        frames.append(pd.DataFrame(expit(logits), index=ids, columns=list(names)))
    return pd.concat(frames)


def _write(run: _Run, oof: pd.DataFrame, test: Optional[pd.DataFrame], metrics: Dict[str, Any],
           test_writer: Optional[Callable[[pd.DataFrame, Path], None]]) -> None:
    s = run.strategy
    run.paths.record(f"oof_seq_{s}", write_predictions(oof, run.paths.oof_predictions(f"seq_{s}")))
    if test is not None:
        (test_writer or write_predictions)(test, run.paths.test_predictions(f"seq_{s}"))
        run.paths.record(f"test_seq_{s}", run.paths.test_predictions(f"seq_{s}"))
    counts = [{**{k: v for k, v in p.items() if k != "image_ids"}, "n_images": len(p["image_ids"])}
              for p in run.provenance]
    log = {"config": asdict(run.cfg), "strategy": s, "metrics": metrics, "models": run.logs, "inputs": counts}
    log_path = run.paths.model_dir(0, name=f"seq_{s}").parent / "train_log.json"
    atomic_write_text(log_path, json.dumps(log, indent=2, default=str))
    run.paths.update_metrics(metrics)
