"""Rules: where a constructor argument comes from in the first forward's inputs.

A rule looks at the forward's bound arguments (`inputs`, by parameter name)
and the lazy layer's own options, and returns the argument's value or raises
`Mismatch` (turned into a `tl.ShapeError` that names the module). Rules are
small frozen dataclasses, so they pickle and compare, and each one knows the
values it may take for the skeleton built at construction (`probes`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch.nn.utils.rnn import PackedSequence

from ._errors import ArgumentError

Options = Mapping[str, Any]


@dataclass(frozen=True)
class Inputs:
    """The first forward's arguments: as passed, and bound to `forward`'s names."""

    args: tuple[Any, ...]
    kwargs: Mapping[str, Any]
    named: Mapping[str, Any]


class Mismatch(Exception):
    """An input that cannot satisfy a rule: (expected, seen)."""

    def __init__(self, expected: str, seen: str) -> None:
        super().__init__(expected, seen)
        self.expected, self.seen = expected, seen


_PROBES = (1, 2, 4, 8, 16, 64, 5040)  # 5040 is divisible by 1..10: heads, groups


def _pick(inputs: Inputs, arg: int | str) -> tuple[str, Any]:
    names = list(inputs.named)
    name = names[arg] if isinstance(arg, int) else arg
    return name, inputs.named.get(name)


def _tensor(inputs: Inputs, arg: int | str) -> tuple[str, torch.Tensor]:
    name, value = _pick(inputs, arg)
    if isinstance(value, PackedSequence):
        value = value.data
    if not isinstance(value, torch.Tensor):
        raise Mismatch(f"a tensor as `{name}`", f"{type(value).__name__}")
    return name, value


def _ranks(ranks: tuple[int, ...] | None, minimum: int) -> str:
    if ranks is None:
        return f"at least {minimum} dimensions"
    return " or ".join(map(str, ranks)) + " dimensions"


@dataclass(frozen=True)
class Dim:
    """The size of one dimension of one input (`arg`: position or name).

    `ranks` lists the accepted numbers of dimensions (None: any with the dim).
    `unless_same_as` makes the rule give None when the size equals that
    input's (MultiheadAttention's `kdim`/`vdim`).
    """

    dim: int
    arg: int | str = 0
    ranks: tuple[int, ...] | None = None
    unless_same_as: int | str | None = None

    def __call__(self, inputs: Inputs, options: Options) -> int | None:
        name, x = _tensor(inputs, self.arg)
        minimum = self.dim + 1 if self.dim >= 0 else -self.dim
        if (self.ranks is not None and x.dim() not in self.ranks) or x.dim() < minimum:
            raise Mismatch(
                f"`{name}` with {_ranks(self.ranks, minimum)}",
                f"shape {tuple(x.shape)}",
            )
        size = int(x.shape[self.dim])
        if self.unless_same_as is not None:
            _, other = _tensor(inputs, self.unless_same_as)
            if other.dim() and int(other.shape[-1]) == size:
                return None
        return size

    def probes(self) -> tuple[Any, ...]:
        return (None,) if self.unless_same_as is not None else _PROBES

    def describe(self) -> str:
        return f"dim {self.dim} of `{self.arg}`" if isinstance(self.arg, str) else f"dim {self.dim} of input {self.arg}"


class _SizeRule:
    """Defaults: an integer size, probed with `_PROBES` for the construction-time skeleton."""

    description = "the input"

    def probes(self) -> tuple[Any, ...]:
        return _PROBES

    def describe(self) -> str:
        return self.description


@dataclass(frozen=True)
class Channels(_SizeRule):
    """The channel count: dim 1 of a batched input, dim 0 of an unbatched one."""

    spatial: int  # number of spatial dims after the channel dim
    batched_only: bool = False
    description = "the channel dim of the input"

    def __call__(self, inputs: Inputs, options: Options) -> int:
        name, x = _tensor(inputs, 0)
        ranks = (self.spatial + 2,) if self.batched_only else (self.spatial + 1, self.spatial + 2)
        if x.dim() not in ranks:
            raise Mismatch(f"`{name}` with {_ranks(ranks, 0)}", f"shape {tuple(x.shape)}")
        return int(x.shape[-(self.spatial + 1)])


@dataclass(frozen=True)
class PerChannel(_SizeRule):
    """PReLU: one parameter per channel (dim 1), or 1 for inputs of rank < 2."""

    description = "the channel dim of the input"

    def __call__(self, inputs: Inputs, options: Options) -> int:
        _, x = _tensor(inputs, 0)
        return int(x.shape[1]) if x.dim() >= 2 else 1


@dataclass(frozen=True)
class Trailing:
    """The last `k` dims of the input as a shape; `k` is the option `option`."""

    option: str = "normalized_ndim"

    def __call__(self, inputs: Inputs, options: Options) -> tuple[int, ...]:
        name, x = _tensor(inputs, 0)
        k = int(options.get(self.option, 1))
        if k < 1 or x.dim() < k:
            raise Mismatch(
                f"`{name}` with at least {k} dimensions ({self.option}={k})",
                f"shape {tuple(x.shape)}",
            )
        return tuple(int(s) for s in x.shape[x.dim() - k :])

    def probes(self) -> tuple[Any, ...]:
        return ((1,),)

    def options(self) -> dict[str, Any]:
        return {self.option: 1}

    def describe(self) -> str:
        return "the trailing dims of the input"


@dataclass(frozen=True)
class Custom:
    """A user rule: any callable taking the forward's arguments."""

    fn: Callable[..., Any]

    def __call__(self, inputs: Inputs, options: Options) -> Any:
        return self.fn(*inputs.args, **inputs.kwargs)

    def probes(self) -> tuple[Any, ...]:
        return _PROBES

    def describe(self) -> str:
        return getattr(self.fn, "__name__", "a rule")


Rule = Dim | Channels | PerChannel | Trailing | Custom


def as_rule(value: Any) -> Rule:
    if isinstance(value, (Dim, Channels, PerChannel, Trailing, Custom)):
        return value
    if callable(value):
        return Custom(value)
    raise ArgumentError(f"a lazy rule must be a callable taking the forward's inputs, not {type(value).__name__}")
