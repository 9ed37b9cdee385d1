"""Factories for the command-line tests (importable as `zoo:NAME`)."""

from __future__ import annotations

from torch import nn

import torchlazy as tl


def cnn(classes: int = 10) -> nn.Module:
    return nn.Sequential(
        tl.nn.Conv2d(16, 3, padding=1), tl.nn.BatchNorm2d(), nn.ReLU(), nn.MaxPool2d(2),
        tl.nn.Conv2d(32, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        tl.nn.Linear(classes),
    )  # fmt: skip


def cnn_eager(classes: int = 10) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(32, classes),
    )  # fmt: skip


def tied() -> nn.Module:
    model = nn.ModuleDict({"emb": nn.Embedding(100, 16), "head": nn.Linear(16, 100, bias=False)})
    model["head"].weight = model["emb"].weight
    return model


def broken() -> nn.Module:
    raise RuntimeError("this factory always fails")


CNN_INSTANCE = cnn_eager()  # a module made at import, named as `zoo:CNN_INSTANCE`


def refuses(width: int = 4) -> nn.Module:
    raise ValueError(f"no model of width {width}")
