"""`Spec`: an input described by its shape and dtype, and fake or meta copies of examples."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from . import _torch_compat as tc
from ._errors import ArgumentError, ShapeError

__all__ = ["CONSTANT_LIMIT", "Spec", "to_fake", "to_meta"]


@dataclass(frozen=True, init=False)
class Spec:
    """An input described by its shape and dtype, without data.

    >>> import torch, torchlazy as tl
    >>> tl.Spec(8, 3, 32, 32)
    Spec(8, 3, 32, 32)
    >>> tl.Spec(4, 16, dtype=torch.long)
    Spec(4, 16, dtype=torch.int64)
    """

    shape: tuple[int, ...]
    dtype: torch.dtype
    device: torch.device | None

    def __init__(
        self,
        *shape: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        if len(shape) == 1 and isinstance(shape[0], (tuple, list, torch.Size)):
            shape = tuple(shape[0])
        if not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape):
            raise ShapeError(f"`tl.Spec{shape}`: every size must be a non-negative int, got {shape}.")
        if not isinstance(dtype, torch.dtype):
            raise ArgumentError(f"`tl.Spec(..., dtype={dtype!r})`: expected a torch.dtype such as `torch.int64`.")
        try:
            place = torch.device(device) if device is not None else None
        except (RuntimeError, TypeError) as e:
            raise ArgumentError(
                f"`tl.Spec(..., device={device!r})`: not a device ({e}); use 'cpu', 'cuda:0', ..."
            ) from None
        object.__setattr__(self, "shape", tuple(shape))
        object.__setattr__(self, "dtype", dtype)
        object.__setattr__(self, "device", place)

    def __repr__(self) -> str:
        extra = "" if self.dtype == torch.float32 else f", dtype={self.dtype}"
        extra += "" if self.device is None else f", device='{self.device}'"
        return f"Spec({', '.join(map(str, self.shape))}{extra})"


CONSTANT_LIMIT = 4096


def to_fake(example: Any, mode: Any) -> Any:
    """Fake copies of the examples: Specs and tensors alike, in nested containers."""

    def convert(x: Any) -> Any:
        if isinstance(x, Spec):
            with mode:
                return torch.empty(x.shape, dtype=x.dtype, device=x.device)
        if tc.is_fake(x):
            return x
        if isinstance(x, torch.Tensor):
            if not x.is_floating_point() and x.numel() <= CONSTANT_LIMIT and x.device.type == "cpu":
                # small integer tensors (lengths, indices) keep their values, so forwards that
                # read them (packed sequences, gathers) still run; each its own copy: torch's converter
                # refuses a constant over memory another example shares (`decoder_input_ids=ids[:, :5]`)
                return tc.make_constant_fake(mode, x.clone())
            return mode.from_tensor(x)
        return x

    return tc.tree_map(convert, example, is_leaf=lambda x: isinstance(x, Spec))


def to_meta(example: Any) -> Any:
    """Meta copies of the examples (Specs and tensors alike); small integer tensors are refused,
    since only the fake-tensor path keeps their values."""

    def convert(x: Any) -> Any:
        if isinstance(x, Spec):
            return torch.empty(x.shape, dtype=x.dtype, device="meta")
        if isinstance(x, torch.Tensor):
            if not x.is_floating_point() and x.numel() <= CONSTANT_LIMIT:
                raise ValueError("small integer inputs keep their values only on the fake-tensor path")
            return torch.empty(x.shape, dtype=x.dtype, device="meta")
        return x

    return tc.tree_map(convert, example, is_leaf=lambda x: isinstance(x, Spec))
