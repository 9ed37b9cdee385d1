"""A FakeTensorMode that starts in milliseconds instead of a second.

PyTorch's FakeTensorMode pays about a second on first use in a process, all of
it importing `torch._dynamo` (the compiler front end) for two reasons that do
not concern torchlazy: its constructor reads two flags from
`torch._dynamo.config`, and every dispatch mode's `__torch_dispatch__` is
wrapped so that dynamo skips it, which imports dynamo at the first call.

Here the constructor runs while `torch._dynamo` is a stand-in module that holds
only the (real) config module and imports the real package the moment anything
else is asked of it; the stand-in leaves `sys.modules` at once, so any later
`import torch._dynamo` is the real, complete import. Our subclass also takes
the raw `__torch_dispatch__` (torchlazy never runs under `torch.compile`).
"""

from __future__ import annotations

import importlib
import os
import sys
import types
from typing import Any

import torch
from torch._subclasses.fake_tensor import FakeTensorMode


class FastFakeTensorMode(FakeTensorMode):
    @classmethod
    def _should_skip_dynamo(cls) -> bool:
        return False

    __torch_dispatch__ = getattr(
        FakeTensorMode.__torch_dispatch__,
        "__wrapped__",
        FakeTensorMode.__torch_dispatch__,
    )


def _stand_in() -> types.ModuleType:
    stand_in = types.ModuleType("torch._dynamo")
    stand_in.__path__ = [os.path.join(os.path.dirname(torch.__file__), "_dynamo")]

    def __getattr__(name: str) -> Any:
        if sys.modules.get("torch._dynamo") is stand_in:
            del sys.modules["torch._dynamo"]
        return getattr(importlib.import_module("torch._dynamo"), name)

    stand_in.__getattr__ = __getattr__  # type: ignore[method-assign]
    return stand_in


def new_fake_mode() -> FakeTensorMode:
    if "torch._dynamo" in sys.modules:
        return FastFakeTensorMode(allow_non_fake_inputs=True)
    stand_in = _stand_in()
    sys.modules["torch._dynamo"] = stand_in
    torch._dynamo = stand_in  # type: ignore[attr-defined]
    try:
        importlib.import_module("torch._dynamo.config")
        return FastFakeTensorMode(allow_non_fake_inputs=True)
    finally:
        if sys.modules.get("torch._dynamo") is stand_in:
            del sys.modules["torch._dynamo"]
