"""The zoo: every lazy layer, its eager twin with explicit sizes, example inputs, and a bad input."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

import torchlazy as tl


def t(*shape: int) -> torch.Tensor:
    return torch.randn(*shape)


def call(module: nn.Module, inputs: tuple) -> torch.Tensor:
    """The main output of a zoo layer as one tensor."""
    out = module(*inputs)
    first = out[0] if isinstance(out, tuple) else out
    if hasattr(first, "data") and not isinstance(first, torch.Tensor):  # PackedSequence
        first = first.data
    if hasattr(out, "output"):  # AdaptiveLogSoftmaxWithLoss
        first = out.output
    return first


@dataclass
class Case:
    name: str
    lazy: Callable[[], nn.Module]
    eager: Callable[[], nn.Module]
    inputs: Callable[[], tuple[Any, ...]]
    bad: Callable[[], tuple[Any, ...]] | None = None

    def __repr__(self) -> str:
        return self.name


def _packed() -> tuple[Any, ...]:
    return (pack_padded_sequence(t(5, 3, 6), torch.tensor([5, 4, 2]), enforce_sorted=True),)


CASES = [
    Case("Linear", lambda: tl.nn.Linear(7), lambda: nn.Linear(5, 7), lambda: (t(3, 5),), lambda: (torch.tensor(1.0),)),
    Case(
        "Linear-nobias-3d",
        lambda: tl.nn.Linear(4, bias=False),
        lambda: nn.Linear(6, 4, bias=False),
        lambda: (t(2, 3, 6),),
    ),
    Case(
        "Bilinear",
        lambda: tl.nn.Bilinear(4),
        lambda: nn.Bilinear(3, 5, 4),
        lambda: (t(2, 3), t(2, 5)),
        lambda: (t(2, 3), "x"),
    ),
    Case("Conv1d", lambda: tl.nn.Conv1d(4, 3), lambda: nn.Conv1d(2, 4, 3), lambda: (t(2, 2, 9),), lambda: (t(9),)),
    Case("Conv1d-unbatched", lambda: tl.nn.Conv1d(4, 3), lambda: nn.Conv1d(2, 4, 3), lambda: (t(2, 9),)),
    Case(
        "Conv2d",
        lambda: tl.nn.Conv2d(6, 3, stride=2, padding=1),
        lambda: nn.Conv2d(3, 6, 3, stride=2, padding=1),
        lambda: (t(2, 3, 8, 8),),
        lambda: (t(8, 8),),
    ),
    Case(
        "Conv2d-groups",
        lambda: tl.nn.Conv2d(8, 1, groups=4),
        lambda: nn.Conv2d(4, 8, 1, groups=4),
        lambda: (t(3, 4, 5, 5),),
    ),
    Case(
        "Conv3d",
        lambda: tl.nn.Conv3d(2, 2),
        lambda: nn.Conv3d(3, 2, 2),
        lambda: (t(1, 3, 4, 4, 4),),
        lambda: (t(1, 3, 4),),
    ),
    Case(
        "ConvTranspose1d",
        lambda: tl.nn.ConvTranspose1d(4, 3),
        lambda: nn.ConvTranspose1d(2, 4, 3),
        lambda: (t(2, 2, 5),),
    ),
    Case(
        "ConvTranspose2d",
        lambda: tl.nn.ConvTranspose2d(4, 3, stride=2),
        lambda: nn.ConvTranspose2d(5, 4, 3, stride=2),
        lambda: (t(2, 5, 4, 4),),
        lambda: (t(4),),
    ),
    Case(
        "ConvTranspose3d",
        lambda: tl.nn.ConvTranspose3d(2, 2),
        lambda: nn.ConvTranspose3d(3, 2, 2),
        lambda: (t(3, 3, 3, 3),),
    ),
    Case(
        "BatchNorm1d-2d",
        lambda: tl.nn.BatchNorm1d(),
        lambda: nn.BatchNorm1d(6),
        lambda: (t(4, 6),),
        lambda: (t(4, 6, 2, 2),),
    ),
    Case(
        "BatchNorm1d-3d",
        lambda: tl.nn.BatchNorm1d(affine=False),
        lambda: nn.BatchNorm1d(6, affine=False),
        lambda: (t(4, 6, 3),),
    ),
    Case(
        "BatchNorm2d",
        lambda: tl.nn.BatchNorm2d(momentum=0.2),
        lambda: nn.BatchNorm2d(3, momentum=0.2),
        lambda: (t(2, 3, 4, 4),),
        lambda: (t(3, 4, 4),),
    ),
    Case(
        "BatchNorm3d",
        lambda: tl.nn.BatchNorm3d(track_running_stats=False),
        lambda: nn.BatchNorm3d(2, track_running_stats=False),
        lambda: (t(2, 2, 3, 3, 3),),
    ),
    Case("SyncBatchNorm", lambda: tl.nn.SyncBatchNorm(), lambda: nn.SyncBatchNorm(3), lambda: (t(2, 3, 4),)),
    Case(
        "InstanceNorm1d",
        lambda: tl.nn.InstanceNorm1d(),
        lambda: nn.InstanceNorm1d(3),
        lambda: (t(2, 3, 6),),
        lambda: (t(2, 3, 6, 6),),
    ),
    Case(
        "InstanceNorm2d-affine",
        lambda: tl.nn.InstanceNorm2d(affine=True),
        lambda: nn.InstanceNorm2d(3, affine=True),
        lambda: (t(2, 3, 5, 5),),
    ),
    Case(
        "InstanceNorm2d-unbatched-stats",
        lambda: tl.nn.InstanceNorm2d(affine=True, track_running_stats=True),
        lambda: nn.InstanceNorm2d(3, affine=True, track_running_stats=True),
        lambda: (t(3, 5, 5),),
    ),
    Case(
        "InstanceNorm3d",
        lambda: tl.nn.InstanceNorm3d(affine=True),
        lambda: nn.InstanceNorm3d(2, affine=True),
        lambda: (t(1, 2, 3, 3, 3),),
    ),
    Case(
        "LayerNorm",
        lambda: tl.nn.LayerNorm(),
        lambda: nn.LayerNorm(8),
        lambda: (t(2, 3, 8),),
        lambda: (torch.tensor(2.0),),
    ),
    Case(
        "LayerNorm-last2",
        lambda: tl.nn.LayerNorm(normalized_ndim=2, bias=False),
        lambda: nn.LayerNorm((3, 8), bias=False),
        lambda: (t(2, 3, 8),),
        lambda: (t(8),),
    ),
    Case("RMSNorm", lambda: tl.nn.RMSNorm(eps=1e-6), lambda: nn.RMSNorm(8, eps=1e-6), lambda: (t(2, 8),)),
    Case("GroupNorm", lambda: tl.nn.GroupNorm(2), lambda: nn.GroupNorm(2, 6), lambda: (t(2, 6, 4),), lambda: (t(6),)),
    Case(
        "RNN",
        lambda: tl.nn.RNN(5, num_layers=2, nonlinearity="relu"),
        lambda: nn.RNN(3, 5, num_layers=2, nonlinearity="relu"),
        lambda: (t(4, 2, 3),),
    ),
    Case(
        "LSTM-bidir-proj",
        lambda: tl.nn.LSTM(6, batch_first=True, bidirectional=True, proj_size=2),
        lambda: nn.LSTM(3, 6, batch_first=True, bidirectional=True, proj_size=2),
        lambda: (t(2, 4, 3),),
    ),
    Case("LSTM-packed", lambda: tl.nn.LSTM(4), lambda: nn.LSTM(6, 4), _packed, lambda: ("not a tensor",)),
    Case("GRU-unbatched", lambda: tl.nn.GRU(4, num_layers=2), lambda: nn.GRU(3, 4, num_layers=2), lambda: (t(5, 3),)),
    Case("RNNCell", lambda: tl.nn.RNNCell(4), lambda: nn.RNNCell(3, 4), lambda: (t(2, 3),), lambda: (t(2, 2, 3),)),
    Case("LSTMCell", lambda: tl.nn.LSTMCell(4), lambda: nn.LSTMCell(3, 4), lambda: (t(3),)),
    Case("GRUCell", lambda: tl.nn.GRUCell(4, bias=False), lambda: nn.GRUCell(3, 4, bias=False), lambda: (t(2, 3),)),
    Case(
        "MultiheadAttention",
        lambda: tl.nn.MultiheadAttention(2),
        lambda: nn.MultiheadAttention(8, 2),
        lambda: (t(3, 2, 8), t(4, 2, 8), t(4, 2, 8)),
    ),
    Case(
        "MultiheadAttention-kvdim",
        lambda: tl.nn.MultiheadAttention(2, batch_first=True),
        lambda: nn.MultiheadAttention(8, 2, kdim=5, vdim=3, batch_first=True),
        lambda: (t(2, 3, 8), t(2, 4, 5), t(2, 4, 3)),
        lambda: (t(2, 3, 8), "k", "v"),
    ),
    Case(
        "TransformerEncoderLayer",
        lambda: tl.nn.TransformerEncoderLayer(2, dim_feedforward=16),
        lambda: nn.TransformerEncoderLayer(8, 2, dim_feedforward=16),
        lambda: (t(3, 2, 8),),
    ),
    Case(
        "TransformerDecoderLayer",
        lambda: tl.nn.TransformerDecoderLayer(2, dim_feedforward=16, norm_first=True),
        lambda: nn.TransformerDecoderLayer(8, 2, dim_feedforward=16, norm_first=True),
        lambda: (t(3, 2, 8), t(4, 2, 8)),
    ),
    Case(
        "Transformer",
        lambda: tl.nn.Transformer(nhead=2, num_encoder_layers=2, num_decoder_layers=1, dim_feedforward=16),
        lambda: nn.Transformer(8, 2, num_encoder_layers=2, num_decoder_layers=1, dim_feedforward=16),
        lambda: (t(5, 2, 8), t(3, 2, 8)),
    ),
    Case(
        "AdaptiveLogSoftmaxWithLoss",
        lambda: tl.nn.AdaptiveLogSoftmaxWithLoss(10, [4, 8]),
        lambda: nn.AdaptiveLogSoftmaxWithLoss(16, 10, [4, 8]),
        lambda: (t(5, 16), torch.tensor([0, 3, 5, 9, 1])),
    ),
    Case("PReLU", lambda: tl.nn.PReLU(), lambda: nn.PReLU(4), lambda: (t(2, 4, 3),)),
    Case("PReLU-1d", lambda: tl.nn.PReLU(), lambda: nn.PReLU(1), lambda: (t(5),)),
]
