"""Lazy counterparts of the torch.nn layers whose sizes depend on their input.

Each class takes torch.nn's constructor minus the inferred arguments, with the
same names and defaults (those with a default by keyword only, so eager's
argument order is an error rather than a shifted meaning), and becomes the
plain torch.nn class at its first input. All of them come from one table: adding a layer is adding a row.

>>> import torch, torchlazy as tl
>>> net = torch.nn.Sequential(tl.nn.Conv2d(8, 3), tl.nn.BatchNorm2d(), torch.nn.Flatten(), tl.nn.Linear(10))
>>> net(torch.zeros(2, 3, 6, 6)).shape
torch.Size([2, 10])
>>> [type(m).__name__ for m in net], net[3].in_features
(['Conv2d', 'BatchNorm2d', 'Flatten', 'Linear'], 128)
"""

from __future__ import annotations

from typing import TypeVar as _TypeVar

from torch import nn as _nn

from .._lazy import make_lazy as _make_lazy
from .._rules import Channels as _Channels
from .._rules import Dim as _Dim
from .._rules import PerChannel as _PerChannel
from .._rules import Rule as _Rule
from .._rules import Trailing as _Trailing

_LAST = _Dim(-1)
_CELL = _Dim(-1, ranks=(1, 2))

_M = _TypeVar("_M", bound=_nn.Module)


def _row(cls: type[_M], **rules: _Rule) -> type[_M]:
    return _make_lazy(cls, rules, cls.__name__, __name__)


# The table: one row per layer, the constructor arguments each takes from its input.
Linear = _row(_nn.Linear, in_features=_LAST)
Bilinear = _row(_nn.Bilinear, in1_features=_Dim(-1, 0), in2_features=_Dim(-1, 1))
Conv1d = _row(_nn.Conv1d, in_channels=_Channels(1))
Conv2d = _row(_nn.Conv2d, in_channels=_Channels(2))
Conv3d = _row(_nn.Conv3d, in_channels=_Channels(3))
ConvTranspose1d = _row(_nn.ConvTranspose1d, in_channels=_Channels(1))
ConvTranspose2d = _row(_nn.ConvTranspose2d, in_channels=_Channels(2))
ConvTranspose3d = _row(_nn.ConvTranspose3d, in_channels=_Channels(3))
BatchNorm1d = _row(_nn.BatchNorm1d, num_features=_Dim(1, ranks=(2, 3)))
BatchNorm2d = _row(_nn.BatchNorm2d, num_features=_Dim(1, ranks=(4,)))
BatchNorm3d = _row(_nn.BatchNorm3d, num_features=_Dim(1, ranks=(5,)))
SyncBatchNorm = _row(_nn.SyncBatchNorm, num_features=_Dim(1))
InstanceNorm1d = _row(_nn.InstanceNorm1d, num_features=_Channels(1))
InstanceNorm2d = _row(_nn.InstanceNorm2d, num_features=_Channels(2))
InstanceNorm3d = _row(_nn.InstanceNorm3d, num_features=_Channels(3))
LayerNorm = _row(_nn.LayerNorm, normalized_shape=_Trailing())
RMSNorm = _row(_nn.RMSNorm, normalized_shape=_Trailing())
GroupNorm = _row(_nn.GroupNorm, num_channels=_Dim(1))
RNN = _row(_nn.RNN, input_size=_LAST)
LSTM = _row(_nn.LSTM, input_size=_LAST)
GRU = _row(_nn.GRU, input_size=_LAST)
RNNCell = _row(_nn.RNNCell, input_size=_CELL)
LSTMCell = _row(_nn.LSTMCell, input_size=_CELL)
GRUCell = _row(_nn.GRUCell, input_size=_CELL)
MultiheadAttention = _row(
    _nn.MultiheadAttention,
    embed_dim=_Dim(-1, "query"),
    kdim=_Dim(-1, "key", unless_same_as="query"),
    vdim=_Dim(-1, "value", unless_same_as="query"),
)
TransformerEncoderLayer = _row(_nn.TransformerEncoderLayer, d_model=_Dim(-1, "src"))
TransformerDecoderLayer = _row(_nn.TransformerDecoderLayer, d_model=_Dim(-1, "tgt"))
Transformer = _row(_nn.Transformer, d_model=_Dim(-1, "src"))
AdaptiveLogSoftmaxWithLoss = _row(_nn.AdaptiveLogSoftmaxWithLoss, in_features=_Dim(-1, 0))
PReLU = _row(_nn.PReLU, num_parameters=_PerChannel())

__all__ = [
    "GRU",
    "LSTM",
    "RNN",
    "AdaptiveLogSoftmaxWithLoss",
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "Bilinear",
    "Conv1d",
    "Conv2d",
    "Conv3d",
    "ConvTranspose1d",
    "ConvTranspose2d",
    "ConvTranspose3d",
    "GRUCell",
    "GroupNorm",
    "InstanceNorm1d",
    "InstanceNorm2d",
    "InstanceNorm3d",
    "LSTMCell",
    "LayerNorm",
    "Linear",
    "MultiheadAttention",
    "PReLU",
    "RMSNorm",
    "RNNCell",
    "SyncBatchNorm",
    "Transformer",
    "TransformerDecoderLayer",
    "TransformerEncoderLayer",
]  # fmt: skip
