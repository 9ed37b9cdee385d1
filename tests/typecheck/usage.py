"""Type-checked by `mypy` (see pyproject.toml): what users write must pass a type checker."""

from __future__ import annotations

import torch
from torch import nn

import torchlazy as tl


def model() -> nn.Module:
    linear: nn.Linear = tl.nn.Linear(128, bias=False)
    conv: nn.Conv2d = tl.nn.Conv2d(16, 3, padding=1)
    norm = tl.nn.LayerNorm(normalized_ndim=2)
    attention = tl.nn.MultiheadAttention(4, batch_first=True)
    lstm = tl.nn.LSTM(32, num_layers=2)
    return nn.Sequential(conv, nn.Flatten(), linear, norm, nn.ModuleList([attention, lstm]))


def flow() -> None:
    with tl.deferred():
        net = model()
    summary: tl.Summary = tl.summary(net, tl.Spec(8, 3, 32, 32), depth=2)
    rows: list[tl.Row] = summary.rows
    built: nn.Module = tl.build(net, tl.Spec(8, 3, 32, 32), dtype=torch.bfloat16)
    tl.materialize(built, device="cpu", exact=False, progress=True)
    tl.save(built, "/tmp/m.safetensors", max_shard_size="2GB")
    del rows
