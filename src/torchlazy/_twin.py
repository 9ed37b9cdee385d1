"""A throwaway twin of a model on the meta device, for forwards that only need shapes.

Every tensor of the model is replaced, in a deep copy, by an empty meta tensor
of the same shape (unbuilt placeholders stay placeholders), so a forward on
meta inputs costs no memory and no arithmetic, lazy layers build there for
free, and the model itself is not touched. Model code that needs values or
that mixes devices fails on the twin: callers then take the fake-tensor path.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from . import _deferred, _lazy
from . import _torch_compat as tc
from ._modtree import module_tensors
from ._spec import to_meta

__all__ = ["run_twin"]


def _meta_twin(module: nn.Module) -> nn.Module:
    """A deep copy whose every tensor is an empty meta tensor of the same shape (placeholders stay)."""
    memo: dict[int, Any] = {}

    def twin(t: torch.Tensor) -> torch.Tensor:
        if _lazy.is_placeholder(t):
            return _lazy.placeholder_like(t, "meta")
        empty = torch.empty(t.shape, dtype=t.dtype, device="meta")
        return nn.Parameter(empty, t.requires_grad) if isinstance(t, nn.Parameter) else empty

    tensors = [t for _, _, _, t in module_tensors(module)]
    for sub in module.modules():
        tensors += _deferred.origins(sub)
    with tc.disable_torch_function_subclass():
        for t in tensors:
            if id(t) not in memo:
                memo[id(t)] = twin(t)
    return copy.deepcopy(module, memo)


def _shape_preserving(module: nn.Module) -> Callable[..., Any]:
    """A forward for the twin of a layer whose output has its input's shape (a lazy one still builds)."""

    def forward(x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if _lazy.is_lazy_layer(module):
            _lazy.first_input(module, (x, *args), kwargs)  # its rule and its build, not its arithmetic
            module.forward = forward  # type: ignore[method-assign]  # the build replaced the instance's state
        return x

    return forward


def run_twin(
    module: nn.Module,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    hook: Callable[[nn.Module], Any] | None = None,
) -> nn.Module:
    """Run the forward of a meta twin of `module` on meta copies of the examples; return the twin."""
    twin = _meta_twin(module)
    for m in twin.modules():  # normalization keeps the input's shape: skip its (Python) meta kernels
        if isinstance(m, tc.norm_base_type()):
            m.forward = _shape_preserving(m)  # type: ignore[method-assign]
    handles = [hook(m) for m in twin.modules()] if hook is not None else []

    margs, mkwargs = to_meta((args, kwargs))
    try:
        with _deferred.quiet(), torch.device("meta"), torch.no_grad():
            twin(*margs, **mkwargs)
    finally:
        for h in handles:
            h.remove()
    return twin
