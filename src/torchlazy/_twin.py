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

from . import _deferred, _lazy, _markers, _meta_rules
from . import _torch_compat as tc
from ._modtree import module_tensors
from ._spec import to_meta

__all__ = ["KernelDtypes", "check_kernel_dtypes", "run_twin"]

# Kernels whose real (CPU/CUDA) implementations refuse operands of different dtypes, and whose meta
# and fake kernels do not check: an int64 or float64 input to a float32 Linear "works" on shapes.
_SAME_DTYPE_OPS = frozenset(
    {"mm", "addmm", "bmm", "baddbmm", "addbmm", "mv", "addmv", "dot", "convolution", "_convolution"}
)


def check_kernel_dtypes(func: Any, args: Any, kwargs: Any) -> None:
    """Raise what the real kernel would, where operands' dtypes differ and the real kernel refuses that."""
    if func.__name__.split(".")[0] not in _SAME_DTYPE_OPS:
        return
    dtypes = [t.dtype for t in tc.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
    if len(set(dtypes)) > 1:
        names = " and ".join(str(d).removeprefix("torch.") for d in dict.fromkeys(dtypes))
        raise RuntimeError(f"`{func.__name__.split('.')[0]}` needs operands of one dtype, but got {names}")


class KernelDtypes(tc.DispatchModeBase):  # type: ignore[misc,valid-type]
    """Check operand dtypes as the real kernels do (meta kernels skip that); the common ops get
    their outputs from `_meta_rules` (torch's meta kernels for them are Python, slow, and their
    first call imports torch's dynamo compiler and sympy)."""

    @classmethod
    def _should_skip_dynamo(cls) -> bool:
        return False

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        check_kernel_dtypes(func, args, kwargs)
        out = _meta_rules.outputs(func, args, kwargs)
        return func(*args, **kwargs) if out is _meta_rules.NOT_HANDLED else out


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
        for name, value in sub.__dict__.items():  # tensors kept in dicts (lookup tables): not copied either
            if isinstance(value, dict) and value and name not in ("_parameters", "_buffers", "_modules"):
                tensors += [t for t in tc.tree_leaves(value) if isinstance(t, torch.Tensor)]
    with tc.disable_torch_function_subclass():
        for t in tensors:
            if id(t) not in memo:
                memo[id(t)] = twin(t)
    grouped = {id(m) for m in module.modules() if _markers.SOURCE in m.__dict__}
    twin = copy.deepcopy(module, memo)
    for m in (*twin.modules(), *module.modules()):  # the twin builds on meta: no copy the model's layers take from
        if id(m) not in grouped:
            m.__dict__.pop(_markers.SOURCE, None)
    return twin


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
        with _deferred.quiet(), torch.device("meta"), torch.no_grad(), KernelDtypes():
            twin(*margs, **mkwargs)
    finally:
        for h in handles:
            h.remove()
    return twin
