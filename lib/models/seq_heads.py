"""Sequence heads by registry name: (x (B, L, F) float32, mask bool (B, L)) -> per-slice logits (B, L, C).

C = `num_classes`, the task's number of labels (6 for ICH), given at construction.

Batches are post-padded (`lib.sequence.features.collate_series`); every head is mask-correct: a real slice's output does not
depend on how much padding follows it (RNNs are packed, convolutions see zeros at padded positions exactly as at a
series end, attention uses a key padding mask). Heads with an auxiliary per-slice output return (main, aux).
"""
from __future__ import annotations

import math
from typing import Any, Sequence, Tuple

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from lib.registry import Registry

HEADS: Registry = Registry("sequence head")


def create_head(name: str, in_dim: int, num_classes: int, **kwargs: Any) -> nn.Module:
    """Build the sequence head registered as `name` for per-slice inputs of size `in_dim` and `num_classes`
    outputs per slice."""
    return HEADS.get(name)(in_dim=in_dim, num_classes=num_classes, **kwargs)


def run_packed(rnn: nn.RNNBase, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Run a batch_first RNN on post-padded x (B, L, C) over the real slices only; padded outputs are 0."""
    lengths = mask.sum(1).clamp_min(1).cpu()
    packed = pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
    out, _ = rnn(packed)
    out, _ = pad_packed_sequence(out, batch_first=True, total_length=x.shape[1])
    return out


def projection(in_dim: int, dim: int, dropout: float) -> nn.Sequential:
    """Per-slice Linear -> LayerNorm -> ReLU -> Dropout (no mixing across slices)."""
    return nn.Sequential(nn.Linear(in_dim, dim), nn.LayerNorm(dim), nn.ReLU(inplace=True), nn.Dropout(dropout))


@HEADS.register("lstm")
class LSTMHead(nn.Module):
    """2nd-place head: projection, two stacked BiLSTMs (hidden H per direction, packed),
    h = l1 + l2 + ReLU(Linear(l1)) + ReLU(Linear(l2)) + projected input (width 2H), Linear(2H -> C)."""

    def __init__(self, in_dim: int, num_classes: int, hidden: int = 256, dropout: float = 0.1) -> None:
        super().__init__()
        width = 2 * hidden
        self.proj = projection(in_dim, width, dropout)
        self.lstm1 = nn.LSTM(width, hidden, batch_first=True, bidirectional=True)
        self.lstm2 = nn.LSTM(width, hidden, batch_first=True, bidirectional=True)
        self.lin1, self.lin2 = nn.Linear(width, width), nn.Linear(width, width)
        self.drop = nn.Dropout(dropout)
        self.out = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        p = self.proj(x)
        l1 = run_packed(self.lstm1, p, mask)
        l2 = run_packed(self.lstm2, l1, mask)
        h = l1 + l2 + torch.relu(self.lin1(l1)) + torch.relu(self.lin2(l2)) + p
        return self.out(self.drop(h))


class MaskedDilatedConv(nn.Module):
    """Residual stack of 1D convolutions along the series; padded positions are zeroed before every conv."""

    def __init__(self, dim: int, dilations: Sequence[int], kernel: int = 3, dropout: float = 0.1) -> None:
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv1d(dim, dim, kernel, padding=d * (kernel // 2), dilation=d)
                                   for d in dilations)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """x (B, L, C), mask (B, L) -> (B, L, C), zero at padded positions."""
        m = mask.unsqueeze(1).to(x.dtype)
        c = x.transpose(1, 2) * m
        for conv in self.convs:
            c = (c + self.drop(torch.relu(conv(c)))) * m
        return c.transpose(1, 2)


@HEADS.register("gru_conv")
class GRUConvHead(nn.Module):
    """1st-place style: per-slice MLP (+ auxiliary per-slice logits), dilated convs along the series, 2-layer BiGRU
    (packed), Linear over [conv, gru] -> C. Returns (main, aux) logits, each (B, L, C)."""

    def __init__(self, in_dim: int, num_classes: int, mlp_dim: int = 256, hidden: int = 96,
                 dilations: Sequence[int] = (1, 2, 4, 2), kernel: int = 3, dropout: float = 0.1) -> None:
        super().__init__()
        self.mlp = nn.Sequential(projection(in_dim, 2 * mlp_dim, dropout), projection(2 * mlp_dim, mlp_dim, dropout))
        self.aux = nn.Linear(mlp_dim, num_classes)
        self.conv = MaskedDilatedConv(mlp_dim, dilations, kernel, dropout)
        self.gru = nn.GRU(mlp_dim, hidden, num_layers=2, batch_first=True, bidirectional=True,
                          dropout=dropout)
        self.out = nn.Linear(mlp_dim + 2 * hidden, num_classes)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        z = self.mlp(x)
        c = self.conv(z, mask)
        g = run_packed(self.gru, c, mask)
        return self.out(torch.cat([c, g], dim=-1)), self.aux(z)


def sinusoid(length: int, dim: int, device: torch.device) -> torch.Tensor:
    """Sinusoidal position table (length, dim) (Vaswani et al.)."""
    pos = torch.arange(length, device=device, dtype=torch.float32)[:, None]
    freq = torch.exp(torch.arange(0, dim, 2, device=device, dtype=torch.float32) * (-math.log(10000.0) / dim))
    table = torch.zeros(length, dim, device=device)
    table[:, 0::2] = torch.sin(pos * freq)
    table[:, 1::2] = torch.cos(pos * freq[: dim // 2])
    return table


@HEADS.register("transformer")
class TransformerHead(nn.Module):
    """Projection + sinusoidal slice position, pre-norm transformer encoder with a key padding mask, Linear -> C."""

    def __init__(self, in_dim: int, num_classes: int, dim: int = 256, heads: int = 4, layers: int = 2, ff_mult: int = 2,
                 dropout: float = 0.1) -> None:
        super().__init__()
        self.proj = projection(in_dim, dim, dropout)
        layer = nn.TransformerEncoderLayer(dim, heads, ff_mult * dim, dropout, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.out = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        p = self.proj(x)
        p = p + sinusoid(x.shape[1], p.shape[-1], x.device).to(p.dtype)
        h = self.encoder(p, src_key_padding_mask=~mask)
        return self.out(self.norm(h))
