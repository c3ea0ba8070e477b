"""Per-vertebra fracture classifiers on the crops of `lib.tasks.cspine.crops` (one fold per call); resumable.

Models by `CspineConfig.model` (`CSPINE_MODELS`), both (x (B, 3, T, H, W) float32 in [0, 1]) -> logits (B,):
  csn3d         the 4th place: ir-CSN (`lib.models.csn.IrCSN`, depth from `backbone` "ir_csn_<26|50|101|152>") with
                global max pooling on the [image, image, mask] crop;
  twofive_lstm  the 1st place's 2.5D model: slice t becomes the image slices t-context..t+context (clamped at the
                crop's ends) + the mask of slice t, a (2 context + 2)-channel image -> timm `backbone` (no classifier)
                shared over the T slices -> sequence head `head` (`lib.models.seq_heads`, 1 output per slice) -> max
                over slices.
Inputs are normalised inside the models as (x - 0.45) / 0.225 on every channel.

Loss: BCE with logits weighted by the metric's vertebra-row weights (positive 2, negative 1), normalised by the
batch's weight sum. Optimiser Adam with torch's defaults (fastai's implementation), constant lr. Validation each
epoch (`cspine_logloss`, lower is better): the competition's per-study weighted log loss over the 8 labels, where
C1..C7 are the crop predictions (a vertebra without a crop: `ABSENT_PROB`) and patient_overall comes from them by
the fit-free rule `overall_rule` (`lib.tasks.cspine.overall`); the truth is the rows' labels (visibility rule) unless
a train.csv-format `truth` is given.

Outputs in RUN/models/cspine/<name>/: epoch{e}.pth (newest only; model + optimizer + state), best.pth
({"model", "epoch", "arch", "valid_cspine_logloss", "cfg"}), log.csv, oof.csv (StudyInstanceUID, C1..C7 of the best
epoch), train_result.json. Every file is written atomically (`lib.train.callbacks.EpochCheckpoint`). Resume
(cfg.resume): the newest epoch checkpoint restores model + optimizer, fit restarts at the next epoch, every epoch
reseeds the RNGs from (seed, epoch), so on CPU with num_workers=0 a killed-and-resumed run ends with the weights of an
uninterrupted one; a finished run is not trained again.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any, ClassVar, Dict, List, Mapping, Optional, Tuple, Union

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler

from lib.data.datasets import ImageLoader  # forked workers survive cv2's thread pool
from lib.train import fastai_quiet  # noqa: F401  (before fastai: silences its torch.jit FutureWarning)
from fastai.data.core import DataLoaders
from fastai.learner import Learner, Metric
from fastai.optimizer import Adam
from fastcore.foundation import L

from lib import config
from lib.data.folds import make_folds
from lib.evaluate.study_logloss import study_weighted_logloss
from lib.io.ids import id_problem
from lib.models.factory import create_model
from lib.models.seq_heads import HEADS, create_head
from lib.paths import RunPaths, atomic_write, atomic_write_text
from lib.registry import Registry
from lib.tasks.cspine.metric import CSPINE_GROUP, CSPINE_LABELS, CSPINE_NEG_WEIGHTS, CSPINE_POS_WEIGHTS
from lib.tasks.cspine.overall import OVERALL_RULES, create_rule, with_overall
from lib.train.callbacks import EpochCheckpoint, EpochSeed, ResumableCSVLogger, seed_everything
from lib.train.resume import EpochSampler, initial_state
from lib.train.precision import resolve_device

PathLike = Union[str, Path]
VERTEBRAE = CSPINE_LABELS[:7]
METRIC = "cspine_logloss"
ABSENT_PROB = 0.01  # a vertebra without a crop: not 0, so a segmentation miss costs log(100), not log(1e15)
CSN_DEPTHS = {f"ir_csn_{d}": d for d in (26, 50, 101, 152)}
ADAM = partial(Adam, mom=0.9, sqr_mom=0.999, eps=1e-8, wd=0.0)  # torch.optim.Adam's defaults
_RESUME_FREE = {"resume", "num_workers", "device"}  # may change between a killed run and its resume
CSPINE_MODELS: Registry = Registry("cspine vertebra model")


@dataclass(kw_only=True)
class CspineConfig:
    """One vertebra-classifier run. Experiment settings have no defaults (the notebook's parameters cell holds
    them; the seed: csn3d, ir_csn_152, 256 px, 40 slices; the 1st place: twofive_lstm, context 2, 15 slices)."""

    model: str                      # CSPINE_MODELS name: csn3d | twofive_lstm
    backbone: str                   # csn3d: ir_csn_<26|50|101|152>; twofive_lstm: timm / MODEL_ZOO name
    head: str                       # sequence head (lib.models.seq_heads.HEADS; twofive_lstm only)
    context: int                    # neighbouring slices each side in a 2.5D image (twofive_lstm only)
    img_size: int                   # crops resized in-plane to img_size x img_size px (when stored otherwise)
    n_slices: int                   # crops resampled to n_slices slices (when stored otherwise)
    overall_rule: str               # fit-free OVERALL_RULES name for the validation patient_overall: max | noisy_or
    epochs: int
    lr: float
    bs: int
    seed: int
    pretrained_path: Optional[str]  # local weights file of the backbone; None = random init
    num_workers: int = config.runtime(0)
    device: str = config.runtime("auto")
    resume: bool = config.runtime(True)
    # what lib.train.callbacks.EpochCheckpoint reads (fixed here, not settings): no early stop, newest epoch only
    patience: ClassVar[Optional[int]] = None
    save_every_epoch: ClassVar[bool] = False
    keep_optimizer: ClassVar[str] = "last"

    def __post_init__(self) -> None:
        CSPINE_MODELS.get(self.model)
        if self.model == "csn3d" and self.backbone not in CSN_DEPTHS:
            raise KeyError(f"csn3d backbone {self.backbone!r} unknown; valid names: {sorted(CSN_DEPTHS)}")
        if self.model == "twofive_lstm":
            HEADS.get(self.head)
        if OVERALL_RULES.get(self.overall_rule).needs_fit:
            fit_free = [n for n in OVERALL_RULES.names() if not OVERALL_RULES.get(n).needs_fit]
            raise ValueError(f"overall_rule {self.overall_rule!r} needs a fit; validation takes a fit-free rule: "
                             f"{fit_free}")
        for key in ("img_size", "n_slices", "epochs", "bs"):
            if int(getattr(self, key)) < 1:
                raise ValueError(f"CspineConfig.{key} must be >= 1, got {getattr(self, key)!r}")
        if int(self.context) < 0 or not self.lr > 0:
            raise ValueError(f"CspineConfig needs context >= 0 and lr > 0, got {self.context!r}, {self.lr!r}")

    @property
    def arch(self) -> str:
        return f"{self.model}:{self.backbone}"

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "CspineConfig":
        """Build from a dict; unknown or missing keys are a KeyError naming them."""
        config.check_keys(cls, d)
        return cls(**d)


# ---------------------------------------------------------------- models
def _normalise(x: torch.Tensor) -> torch.Tensor:
    return (x - 0.45) / 0.225


class Csn3dClassifier(nn.Module):
    """ir-CSN on (B, 3, T, H, W) in [0, 1] -> (B,) logits (global max pooling inside IrCSN)."""

    def __init__(self, depth: int, pretrained_path: Optional[str] = None) -> None:
        super().__init__()
        try:
            from lib.models.csn import IrCSN
        except ImportError as err:
            raise ImportError("model 'csn3d' needs lib.models.csn.IrCSN (lib/models/csn.py), which could not be "
                              f"imported: {err}; use model 'twofive_lstm' meanwhile") from err
        self.net = IrCSN(depth, in_channels=3, num_classes=1, pretrained_path=pretrained_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(_normalise(x)).reshape(-1)


class TwoFiveSeq(nn.Module):
    """2.5D slices + mask -> shared 2D CNN -> sequence head -> max over slices: (B, 3, T, H, W) -> (B,) logits."""

    def __init__(self, backbone: str, head: str, context: int, pretrained_path: Optional[str] = None) -> None:
        super().__init__()
        self.register_buffer("offsets", torch.arange(-context, context + 1), persistent=False)
        self.cnn = create_model(backbone, num_classes=0, pretrained_weights=pretrained_path, in_chans=2 * context + 2)
        self.head = create_head(head, in_dim=self.cnn.num_features, num_classes=1)

    def slice_images(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, T, H, W) -> (B, T, 2 context + 2, H, W): image slices t-c..t+c (clamped) + the mask of slice t."""
        t = x.shape[2]
        idx = (torch.arange(t, device=x.device)[:, None] + self.offsets[None]).clamp(0, t - 1)  # (T, 2c + 1)
        return torch.cat([x[:, 0][:, idx], x[:, 2][:, :, None]], dim=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t = x.shape[0], x.shape[2]
        imgs = _normalise(self.slice_images(x))
        feats = self.cnn(imgs.flatten(0, 1)).reshape(b, t, -1)
        out = self.head(feats, torch.ones(b, t, dtype=torch.bool, device=x.device))
        out = out[0] if isinstance(out, tuple) else out  # heads with an auxiliary output return (main, aux)
        return out[..., 0].amax(dim=1)


CSPINE_MODELS.add("csn3d", lambda cfg: Csn3dClassifier(CSN_DEPTHS[cfg.backbone], cfg.pretrained_path))
CSPINE_MODELS.add("twofive_lstm", lambda cfg: TwoFiveSeq(cfg.backbone, cfg.head, cfg.context, cfg.pretrained_path))


def build_model(cfg: CspineConfig) -> nn.Module:
    return CSPINE_MODELS.get(cfg.model)(cfg)


# ---------------------------------------------------------------- data
class CropDataset(Dataset):
    """Rows of a crop table (`read_crop_table`: absolute `path`, "" = no crop and skipped) -> {"x": float32
    (3, n_slices, img_size, img_size) in [0, 1], "y": float32 () label (NaN without labels)}."""

    def __init__(self, rows: pd.DataFrame, n_slices: int, img_size: int) -> None:
        missing = [c for c in (CSPINE_GROUP, "vertebra", "path") if c not in rows.columns]
        if missing:
            raise KeyError(f"crop rows lack columns {missing}; have {list(rows.columns)}")
        self.rows = rows[rows["path"].astype(str) != ""].reset_index(drop=True)
        self.n_slices, self.img_size = int(n_slices), int(img_size)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> Dict[str, torch.Tensor]:
        row = self.rows.iloc[i]
        arr = np.load(row["path"])
        if arr.ndim != 4 or arr.shape[0] != 3:
            raise ValueError(f"{row['path']}: expected a (3, T, H, W) crop, got shape {arr.shape}")
        if arr.shape[1] != self.n_slices:
            arr = arr[:, np.round(np.linspace(0, arr.shape[1] - 1, self.n_slices)).astype(np.int64)]
        x = torch.from_numpy(np.ascontiguousarray(arr)).float().div_(255.0)
        if x.shape[-2:] != (self.img_size, self.img_size):
            x = F.interpolate(x, size=(self.img_size, self.img_size), mode="bilinear", align_corners=False)
        y = float(row["label"]) if "label" in row and pd.notna(row["label"]) else float("nan")
        return {"x": x, "y": torch.tensor(y, dtype=torch.float32)}


def collate(batch: List[Dict[str, torch.Tensor]]) -> Tuple[torch.Tensor, torch.Tensor]:
    """Dataset dicts -> (x (B, 3, T, H, W), y (B,)): fastai's (xb, yb)."""
    return torch.stack([b["x"] for b in batch]), torch.stack([b["y"] for b in batch])


def _loader(ds: Dataset, cfg: CspineConfig, device: torch.device, sampler: Optional[Sampler] = None) -> DataLoader:
    return ImageLoader(ds, batch_size=cfg.bs, sampler=sampler, shuffle=False, collate_fn=collate,
                      drop_last=sampler is not None and len(ds) > cfg.bs, num_workers=cfg.num_workers,
                      pin_memory=device.type == "cuda")


# ---------------------------------------------------------------- loss and metric
class WeightedBCE(nn.Module):
    """BCE with logits, row weight `pos` where y = 1 else `neg` (the metric's vertebra weights), sum(w ll)/sum(w)."""

    def __init__(self, pos: float = CSPINE_POS_WEIGHTS["C1"], neg: float = CSPINE_NEG_WEIGHTS["C1"]) -> None:
        super().__init__()
        self.pos, self.neg = float(pos), float(neg)

    def forward(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        y = y.float().reshape(logits.shape)
        w = y * self.pos + (1 - y) * self.neg
        ll = F.binary_cross_entropy_with_logits(logits.float(), y, reduction="none")
        return (w * ll).sum() / w.sum()


def wide_vertebrae(rows: pd.DataFrame, values: np.ndarray, studies: List[str], fill: float) -> pd.DataFrame:
    """Per-crop values (aligned with `rows`) -> StudyInstanceUID + C1..C7 for `studies`; missing -> `fill`."""
    long = pd.DataFrame({CSPINE_GROUP: rows[CSPINE_GROUP].to_numpy(), "vertebra": rows["vertebra"].to_numpy(),
                         "v": np.asarray(values, np.float64)})
    wide = long.pivot_table(index=CSPINE_GROUP, columns="vertebra", values="v", aggfunc="mean")
    wide = wide.reindex(index=studies, columns=list(VERTEBRAE)).fillna(fill)
    return wide.rename_axis(index=CSPINE_GROUP, columns=None).reset_index()


def rows_truth(rows: pd.DataFrame) -> pd.DataFrame:
    """train.csv-format truth of the rows' studies from their (visibility-rule) labels; overall = max."""
    studies = list(dict.fromkeys(rows[CSPINE_GROUP]))
    truth = wide_vertebrae(rows, rows["label"].to_numpy(np.float64), studies, 0.0)
    truth["patient_overall"] = truth[list(VERTEBRAE)].max(axis=1)
    return truth


def study_score(truth: pd.DataFrame, vert: pd.DataFrame, rule: str) -> float:
    """Per-study weighted log loss of the 8 labels: C1..C7 from `vert`, patient_overall by fit-free `rule`."""
    pred = with_overall(vert, create_rule(rule))
    truth = truth[truth[CSPINE_GROUP].isin(pred[CSPINE_GROUP])]
    return study_weighted_logloss(truth, pred, CSPINE_LABELS, CSPINE_POS_WEIGHTS, CSPINE_NEG_WEIGHTS, CSPINE_GROUP)


class StudyLogLoss(Metric):
    """fastai metric: `study_score` of the validation crops' sigmoid predictions (lower = better)."""

    def __init__(self, rows: pd.DataFrame, truth: pd.DataFrame, rule: str) -> None:
        self.rows, self.truth, self.rule = rows, truth, rule
        self.studies = list(truth[CSPINE_GROUP])
        self.probs: List[torch.Tensor] = []

    def reset(self) -> None:
        self.probs = []

    def accumulate(self, learn: Learner) -> None:
        self.probs.append(torch.sigmoid(learn.pred.detach().float()).reshape(-1).cpu())

    @property
    def value(self) -> float:
        probs = torch.cat(self.probs).numpy() if self.probs else np.zeros(0)
        rows = self.rows.iloc[:len(probs)]
        return study_score(self.truth, wide_vertebrae(rows, probs, self.studies, ABSENT_PROB), self.rule)

    @property
    def name(self) -> str:
        return METRIC


# ---------------------------------------------------------------- train / predict
def model_dir(run_dir: PathLike, name: str) -> Path:
    """RUN/models/cspine/<name>/ (created); `name` must be a plain ID such as csn3d_fold0."""
    problem = id_problem(name, what="classifier run name")
    if problem:
        raise ValueError(problem)
    path = RunPaths.at(run_dir).root / "models" / "cspine" / name
    path.mkdir(parents=True, exist_ok=True)
    return path


def _labelled(rows: pd.DataFrame, what: str) -> pd.DataFrame:
    if "label" not in rows.columns or rows.loc[rows["path"].astype(str) != "", "label"].isna().any():
        raise ValueError(f"{what} rows need a 0/1 label for every crop (column 'label')")
    return rows


def train_vertebra_classifier(run_dir: PathLike, name: str, train_rows: pd.DataFrame, valid_rows: pd.DataFrame,
                              cfg: CspineConfig, truth: Optional[pd.DataFrame] = None,
                              cbs: Optional[list] = None) -> Dict[str, Any]:
    """Train on the crops of `train_rows`, validate on `valid_rows` (`cspine_logloss` each epoch), keep the best.

    rows: crop-table rows (`read_crop_table`) with labels; truth: train.csv rows of the validation studies for the
    score (default: the rows' visibility-rule labels, `rows_truth`). Returns {"valid_score", "best_epoch", "oof":
    StudyInstanceUID + C1..C7 of the best model, "history", "epochs_done", "resumed_from", "model_dir", ...}.
    `cbs`: extra fastai callbacks (tests).
    """
    t0 = time.time()
    out_dir, device = model_dir(run_dir, name), resolve_device(cfg.device)
    train_ds = CropDataset(_labelled(train_rows, "train"), cfg.n_slices, cfg.img_size)
    valid_ds = CropDataset(_labelled(valid_rows, "valid"), cfg.n_slices, cfg.img_size)
    if not len(train_ds) or not len(valid_ds):
        raise ValueError(f"{name}: {len(train_ds)} training and {len(valid_ds)} validation crops; need > 0 each")
    truth = rows_truth(valid_rows) if truth is None else truth
    state = initial_state(out_dir, cfg, device, _RESUME_FREE)
    seed_everything(cfg.seed)
    model = build_model(cfg)
    if "model" in state:
        model.load_state_dict(state.pop("model"))
    model.to(device)
    sampler = EpochSampler(len(train_ds), cfg.seed)
    dls = DataLoaders(_loader(train_ds, cfg, device, sampler), _loader(valid_ds, cfg, device), path=".")
    dls._device = device  # plain torch DataLoaders: fastai moves each batch to dls.device
    metric = StudyLogLoss(valid_ds.rows, truth, cfg.overall_rule)
    learn = Learner(dls, model, loss_func=WeightedBCE(), opt_func=ADAM, lr=cfg.lr, wd=0.0, metrics=[metric],
                    path=out_dir)
    learn.create_opt()
    if "opt" in state:
        saved = state.pop("opt")
        learn.opt.load_state_dict({"state": list(saved["state"]), "hypers": L(saved["hypers"])})
    fit_cbs = [EpochSeed(cfg.seed, 0, sampler, None), ResumableCSVLogger("log.csv", state["start_epoch"]),
               EpochCheckpoint(out_dir, cfg, state, is_main=True, has_valid=True, monitor=METRIC, mode="min")]
    if state["start_epoch"] < cfg.epochs:
        learn.fit(cfg.epochs, cfg.lr, wd=0.0, cbs=fit_cbs + list(cbs or []), start_epoch=state["start_epoch"])
    model.load_state_dict(torch.load(out_dir / "best.pth", map_location=device, weights_only=True)["model"])
    oof = predict_vertebrae(model, valid_rows, cfg)
    atomic_write(out_dir / "oof.csv", lambda tmp: oof.to_csv(tmp, index=False))
    result = {"valid_score": study_score(truth, oof, cfg.overall_rule), "best_epoch": state["best_epoch"],
              "best_epoch_score": state["best_value"], "history": state["history"],
              "epochs_done": len(state["history"]), "resumed_from": state.get("resumed_from"),
              "wall_time_s": state["elapsed_s"], "call_wall_time_s": time.time() - t0, "model_dir": str(out_dir),
              "n_train_crops": len(train_ds), "n_valid_crops": len(valid_ds), "device": str(device),
              "cfg": asdict(cfg)}
    atomic_write_text(out_dir / "train_result.json", json.dumps(result, indent=1))
    return {**result, "oof": oof}


@torch.no_grad()
def predict_vertebrae(model: nn.Module, rows: pd.DataFrame, cfg: CspineConfig,
                      fill_value: float = ABSENT_PROB) -> pd.DataFrame:
    """P(fracture) per vertebra: StudyInstanceUID (order of first appearance in `rows`) + C1..C7; a vertebra
    without a crop gets `fill_value`."""
    ds = CropDataset(rows, cfg.n_slices, cfg.img_size)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    probs = [torch.sigmoid(model(x.to(device)).float()).cpu() for x, _ in _loader(ds, cfg, device)]
    model.train(was_training)
    values = torch.cat(probs).numpy() if probs else np.zeros(0)
    return wide_vertebrae(ds.rows, values, list(dict.fromkeys(rows[CSPINE_GROUP])), fill_value)


def load_vertebra_classifier(model_dir: PathLike, cfg: CspineConfig) -> nn.Module:
    """The best epoch's model of a `train_vertebra_classifier` folder (or a checkpoint file: a Kaggle bundle's
    flattened copy), in eval mode on the config's device."""
    device = resolve_device(cfg.device)
    path = Path(model_dir)
    path = path if path.is_file() else path / "best.pth"
    if not path.is_file():
        raise FileNotFoundError(f"vertebra classifier checkpoint not found: {path}")
    model = build_model(cfg)
    model.load_state_dict(torch.load(path, map_location=device, weights_only=True)["model"])
    return model.to(device).eval()


def study_folds(train_csv: pd.DataFrame, n_folds: int, seed: int) -> pd.Series:
    """Study folds by `lib.data.folds.make_folds` (each study its own group; iterative stratification on the 8
    labels): pd.Series StudyInstanceUID (sorted) -> fold int64 in [0, n_folds). Deterministic for `seed`."""
    missing = [c for c in (CSPINE_GROUP, *CSPINE_LABELS) if c not in train_csv.columns]
    if missing:
        raise KeyError(f"train.csv table lacks columns {missing}")
    ids = train_csv[CSPINE_GROUP].astype(str)
    meta = pd.DataFrame({"image_id": ids, "patient_id": ids, "study_uid": ids, "series_uid": ids})
    labels = train_csv.set_index(ids)[list(CSPINE_LABELS)].astype(np.int64)
    folds = make_folds(meta, labels, n_folds=n_folds, seed=seed)
    return folds.set_index("image_id")["fold"].rename_axis(CSPINE_GROUP).rename("fold")
