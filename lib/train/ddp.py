"""Plain torch DDP under a fastai Learner: process group, samplers, gathers, the DDP callback, all-rank metrics.

One code path for CPU (gloo) and CUDA (nccl). fastai's own `distrib_ctx` / `DistributedTrainer` calls `.cuda()` and
wraps fastai DataLoaders only, so it is not used. Layout under `torchrun --nproc_per_node N`:
* training: the model is wrapped in `DistributedDataParallel` (gradients averaged, rank 0's buffers broadcast before
  each forward); each rank reads its shard of the epoch (`lib.data.datasets.SubsampleSampler` with rank / num_replicas);
* validation: every rank runs the *unwrapped* module on a disjoint strided shard (`ShardSampler`, no padding), and
  the loss and metrics are all-gathered so every rank sees the value over the full validation set (same best epoch,
  same early stopping decision on every rank). Rank 0 alone writes checkpoints and logs.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator, List, Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist
from lib.train import fastai_quiet  # noqa: F401  (before fastai: silences its torch.jit FutureWarning)
from fastai.callback.core import Callback
from fastai.learner import AvgLoss, Metric
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import Sampler

from lib.evaluate.metrics import per_class_log_loss, weighted_mean
from lib.train.precision import PRECISIONS, resolve_device, resolve_precision  # noqa: F401 (re-exported)


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits: rank / world size / local rank, and its torch device."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def current(device: str = "auto") -> DistEnv:
    """The current process's DistEnv (rank 0 of 1 outside torchrun)."""
    local = int(os.environ.get("LOCAL_RANK", 0))
    if is_initialized():
        return DistEnv(dist.get_rank(), dist.get_world_size(), local, resolve_device(device, local))
    return DistEnv(0, 1, 0, resolve_device(device, 0))


@contextmanager
def process_group(device: str = "auto") -> Iterator[DistEnv]:
    """Initialise the default process group when launched by torchrun with WORLD_SIZE > 1 (gloo on CPU, nccl on
    CUDA), yield the DistEnv and tear the group down afterwards. Without torchrun it just yields rank 0 of 1."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    if world <= 1 or is_initialized():
        yield current(device)
        return
    env = current(device)
    if env.device.type == "cuda":  # naming the device avoids nccl guessing it from the global rank
        torch.cuda.set_device(env.device)
        dist.init_process_group(backend="nccl", device_id=env.device)
    else:
        dist.init_process_group(backend="gloo")
    try:
        yield current(device)
    finally:
        dist.destroy_process_group()


def barrier() -> None:
    if is_initialized():
        dist.barrier()


def _comm_device() -> torch.device:
    """Tensors passed to collectives must live on CUDA for nccl and on CPU for gloo."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum(values: List[float]) -> List[float]:
    """Sum a few floats over ranks (identity outside DDP)."""
    if not is_initialized():
        return [float(v) for v in values]
    t = torch.tensor(values, dtype=torch.float64, device=_comm_device())
    dist.all_reduce(t)
    return t.cpu().tolist()


def gather_rows(t: torch.Tensor) -> torch.Tensor:
    """Concatenate a (n_r, ...) tensor over ranks along dim 0 (ranks may hold different n_r); CPU result.

    The row order is rank 0's rows, then rank 1's, ...; callers must not rely on dataset order.
    """
    if not is_initialized():
        return t.detach().cpu()
    dev = _comm_device()
    t = t.detach().to(dev).contiguous()
    n = torch.tensor([t.shape[0]], dtype=torch.int64, device=dev)
    sizes = [torch.zeros_like(n) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, n)
    n_max = int(max(int(s) for s in sizes))
    padded = torch.zeros((n_max, *t.shape[1:]), dtype=t.dtype, device=dev)
    padded[: t.shape[0]] = t
    out = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(out, padded)
    return torch.cat([o[: int(s)] for o, s in zip(out, sizes)]).cpu()


class ShardSampler(Sampler[int]):
    """Indices rank, rank + world, rank + 2 world, ... of range(n): disjoint shards covering every item exactly
    once (no padding, so shards may differ in length by one; fine for validation, which has no collectives)."""

    def __init__(self, n: int, rank: int = 0, num_replicas: int = 1) -> None:
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank must be in [0, {num_replicas}), got {rank}")
        self.n, self.rank, self.num_replicas = int(n), int(rank), int(num_replicas)

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.n, self.num_replicas))

    def __len__(self) -> int:
        return len(range(self.rank, self.n, self.num_replicas))


class DistAvgLoss(AvgLoss):
    """fastai's AvgLoss (the recorder's valid_loss), summed over ranks before dividing: the full-set mean."""

    @property
    def value(self):
        total, count = all_reduce_sum([float(self.total), float(self.count)])
        return total / count if count else None


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module inside a DistributedDataParallel wrapper (or the model itself)."""
    return model.module if isinstance(model, DistributedDataParallel) else model


def wrap(model: nn.Module, env: DistEnv) -> nn.Module:
    """Wrap `model` (already on env.device) in DistributedDataParallel when running distributed."""
    if not env.distributed:
        return model
    ids = [env.device.index] if env.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids)


class DDPCallback(Callback):
    """Train through the DDP wrapper, validate with the plain module, and keep BatchNorm buffers equal on all ranks.

    After each training phase rank 0's buffers (BN running stats) are broadcast, so validation on every rank and the
    checkpoint rank 0 writes use the same weights; ranks end a fit with identical state_dicts.
    The DDP recorder loss is replaced by `DistAvgLoss` so valid_loss is the mean over the full validation set.
    """

    order = -20  # before TrainEvalCallback (-10), which calls model.train() / model.eval()

    def __init__(self, ddp_model: nn.Module) -> None:
        self.ddp_model = ddp_model

    def before_fit(self) -> None:
        if hasattr(self.learn, "recorder") and is_initialized():
            self.learn.recorder.loss = DistAvgLoss()

    def before_train(self) -> None:
        self.learn.model = self.ddp_model

    def after_train(self) -> None:
        if is_initialized():
            for buf in unwrap(self.ddp_model).buffers():
                dist.broadcast(buf, src=0)

    def before_validate(self) -> None:
        self.learn.model = unwrap(self.ddp_model)

    def after_fit(self) -> None:
        self.learn.model = unwrap(self.ddp_model)


# ---------------------------------------------------------------- validation metrics over all ranks
class CompetitionLogLoss(Metric):
    """Validation weighted log loss (sigmoid + lib.evaluate.metrics) over the full validation set, gathered across
    ranks; `labels` / `weights`: the task's label names and metric weights."""

    def __init__(self, labels: Sequence[str], weights: Sequence[float]) -> None:
        self.labels, self.weights = tuple(labels), tuple(weights)
        self.per_class: Optional[np.ndarray] = None

    def reset(self) -> None:
        self.preds: List[torch.Tensor] = []
        self.targs: List[torch.Tensor] = []

    def accumulate(self, learn: Any) -> None:
        self.preds.append(torch.sigmoid(learn.pred.detach().float()).cpu())
        self.targs.append(learn.y.detach().float().cpu())

    @property
    def value(self) -> Optional[float]:
        empty = torch.zeros((0, len(self.labels)))
        p = gather_rows(torch.cat(self.preds) if self.preds else empty).numpy()
        y = gather_rows(torch.cat(self.targs) if self.targs else empty).numpy()
        if not len(p):
            return None
        self.per_class = per_class_log_loss(y, p)
        return weighted_mean(self.per_class, self.weights)

    @property
    def name(self) -> str:
        return "logloss"


class ClassLogLoss(Metric):
    """One label's log loss, read from the CompetitionLogLoss computed just before it (no second gather)."""

    def __init__(self, parent: CompetitionLogLoss, j: int) -> None:
        self.parent, self.j = parent, j

    @property
    def value(self) -> Optional[float]:
        return None if self.parent.per_class is None else float(self.parent.per_class[self.j])

    @property
    def name(self) -> str:
        return f"logloss_{self.parent.labels[self.j]}"


def make_metrics(labels: Sequence[str], weights: Sequence[float], per_class: bool = True) -> List[Metric]:
    """The validation metric (weighted log loss) and, with `per_class`, one log loss per label."""
    main = CompetitionLogLoss(labels, weights)
    return [main] + ([ClassLogLoss(main, j) for j in range(len(main.labels))] if per_class else [])
