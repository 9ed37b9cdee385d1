"""`build()`: infer every lazy size from a description of the input, then allocate once.

The forward runs on fake tensors (shapes, dtypes, devices; no storage, no
arithmetic), which fires every lazy layer's rule; lazy layers constructed under
`tl.deferred()` are shaped into their place in the record, the others into
records of their own. Materialization then allocates each tensor once.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from torch.nn.modules import module as _module_hooks

from . import _deferred, _lazy, _paths
from . import _torch_compat as tc
from ._errors import ArgumentError, DeferredError, LazyError, ShapeError
from ._isolate import attributes_kept, built_by_lazy
from ._materialize import materialize
from ._modtree import Placement
from ._spec import CONSTANT_LIMIT, to_fake
from ._twin import check_kernel_dtypes, run_twin

__all__ = ["build", "fake_forward", "tracking_modules"]


@contextlib.contextmanager
def tracking_modules() -> Iterator[list[nn.Module]]:
    """The stack of modules whose forward is running, to name the one that fails."""
    stack: list[nn.Module] = []

    def push(module: nn.Module, args: Any) -> None:
        stack.append(module)

    def pop(module: nn.Module, args: Any, out: Any) -> None:
        if stack and stack[-1] is module:
            stack.pop()

    handles = [
        _module_hooks.register_module_forward_pre_hook(push),
        _module_hooks.register_module_forward_hook(pop),
    ]
    try:
        yield stack
    finally:
        for h in handles:
            h.remove()


def _grouped_mm_off_cuda(func: Any, args: Any, kwargs: Any) -> Any:
    """`_grouped_mm` (mixture-of-experts layers) of float32 or float16 matrices: its meta kernel demands
    bfloat16 while the CPU kernel takes them, so a float32 MoE model failed on fake tensors. The CPU kernel's
    checks (dtypes, offsets, matching dimensions, 16-byte strides), then its output: the operands' dtype,
    contiguous."""
    mat_a, mat_b = args[0], args[1]
    if mat_a.dtype is torch.bfloat16 or mat_a.device.type == "cuda":
        return func(*args, **kwargs)
    offs = args[2] if len(args) > 2 else kwargs.get("offs")
    for name, mat in (("mat_a", mat_a), ("mat_b", mat_b)):
        if mat.dtype not in (torch.float32, torch.float16) or mat.dtype != mat_a.dtype or mat.dim() not in (2, 3):
            raise RuntimeError(f"grouped_mm: {name} is a {mat.dim()}-D {mat.dtype} matrix; both must be 2-D or 3-D, "
                               "of one dtype: float32, bfloat16 or float16")  # fmt: skip
        if any(step != 1 and step * mat.element_size() % 16 for step in mat.stride()):
            raise RuntimeError(f"grouped_mm: strides of {name} should be multiple of 16 bytes, got {mat.stride()}")
    if (offs is None) != (mat_a.dim() == 3 and mat_b.dim() == 3):
        raise RuntimeError("grouped_mm: offsets are needed with a 2-D matrix, and none with two 3-D matrices")
    a2, b2 = mat_a.dim() == 2, mat_b.dim() == 2
    inner = (mat_a.size(-1), mat_b.size(0) if b2 else mat_b.size(1))
    groups = (
        (offs.size(0), mat_b.size(0)) if a2 and not b2 else (offs.size(0), mat_a.size(0)) if b2 and not a2 else None
    )
    if inner[0] != inner[1]:
        raise RuntimeError(f"grouped_mm: contraction dimension of mat_a and mat_b must match, got {inner}")
    if groups is not None and groups[0] != groups[1]:
        raise RuntimeError(f"grouped_mm: matrix batch sizes have to match, got {groups}")
    if not (a2 or b2) and mat_a.size(0) != mat_b.size(0):
        raise RuntimeError(f"grouped_mm: batched dimension has to match, got {mat_a.size(0)} and {mat_b.size(0)}")
    if a2 and b2:  # both jagged along the inner dimension: one product per group
        shape: tuple[int, ...] = (offs.size(0), mat_a.size(0), mat_b.size(1))
    elif a2:  # rows of `mat_a` in groups, one matrix of `mat_b` each
        shape = (mat_a.size(0), mat_b.size(-1))
    elif b2:
        shape = (mat_a.size(1), mat_b.size(1))
    else:  # a batched product
        shape = (mat_a.size(0), mat_a.size(1), mat_b.size(-1))
    dtype = kwargs.get("out_dtype") or (args[4] if len(args) > 4 else None) or mat_a.dtype
    if dtype != mat_a.dtype:
        raise RuntimeError(f"grouped_mm: the output dtype must match mat_a's ({mat_a.dtype}) on the CPU, got {dtype}")
    return torch.empty(shape, dtype=dtype, device=mat_a.device)


# ops whose meta kernel refuses what the CPU kernel runs: their fake outputs made here
_META_REFUSES = {id(op): made for op, made in ((tc.grouped_mm_op(), _grouped_mm_off_cuda),) if op is not None}


# indexing ops whose second argument is a list of index tensors (boolean masks among them)
_INDEXES = frozenset(
    id(op) for op in (torch.ops.aten.index.Tensor, torch.ops.aten.index_put.default, torch.ops.aten.index_put_.default)
)


class FoldConstants(tc.DispatchModeBase):  # type: ignore[misc,valid-type]
    """Ops whose inputs are all small known constants run for real, so their outputs stay known.

    This lets forwards that compute with index tensors (targets, lengths) run on
    fake activations, including ops whose output shape depends on values.
    """

    @classmethod
    def _should_skip_dynamo(cls) -> bool:
        return False

    def __init__(self, mode: Any) -> None:
        super().__init__()
        self.mode = mode

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        check_kernel_dtypes(func, args, kwargs)
        tensors = [t for t in tc.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        foldable = (
            tensors
            and all(tc.fake_constant(t) is not None for t in tensors)
            and not tc.op_schema(func).is_mutable
            and torch.Tag.nondeterministic_seeded not in func.tags
        )
        if not foldable:
            made = _META_REFUSES.get(id(func))
            if made is not None and any(tc.is_fake(t) for t in tensors):
                return made(func, args, kwargs)
            if id(func) in _INDEXES and len(args) > 1:
                args = (args[0], self._known_masks_as_indices(args[0], args[1]), *args[2:])
            if tc.op_schema(func).is_mutable and any(not tc.is_fake(t) for t in tensors):
                # a write into the model's real tensors (`weight.div_` in an eval-mode forward): the fake mode
                # runs an op on real tensors alone for real. It goes to their fake copies instead, the model's
                # values untouched
                args, kwargs = tc.tree_map(self._fake_of, (args, kwargs))
            return func(*args, **kwargs)

        def real(x: Any) -> Any:
            return tc.fake_constant(x) if isinstance(x, torch.Tensor) else x

        with tc.disable_current_modes():
            out = func(*tc.tree_map(real, args), **tc.tree_map(real, kwargs))
        if any(isinstance(t, torch.Tensor) and t.numel() > CONSTANT_LIMIT for t in tc.tree_leaves(out)):
            return func(*args, **kwargs)
        return tc.tree_map(lambda t: tc.make_constant_fake(self.mode, t) if isinstance(t, torch.Tensor) else t, out)

    def _known_masks_as_indices(self, target: Any, indices: Any) -> Any:
        """`x[mask]` with a known boolean mask (an attention mask unpadding a batch): the long indices of its true
        elements, as torch's indexing computes them (`mask.nonzero()`), made known constants, so that the output's
        shape follows from them instead of from values a fake tensor lacks. A mask must match the dimensions it
        indexes, as torch checks."""
        if not isinstance(indices, (list, tuple)):
            return indices
        out: list[Any] = []
        dim = 0
        for position, index in enumerate(indices):
            known = tc.fake_constant(index) if isinstance(index, torch.Tensor) else None
            if known is None or known.dtype not in (torch.bool, torch.uint8):
                out.append(index)
                dim += 1
                continue
            covered = tuple(target.shape[dim : dim + known.dim()])
            if tuple(known.shape) != covered:
                raise IndexError(
                    f"The shape of the mask {list(known.shape)} at index {position} does not match the shape of the "
                    f"indexed tensor {list(covered)} at index {dim}"
                )
            dim += known.dim()
            with tc.disable_current_modes():
                columns = known.bool().nonzero().unbind(1)
            out.extend(tc.make_constant_fake(self.mode, c.clone()) for c in columns)
        return type(indices)(out)

    def _fake_of(self, x: Any) -> Any:
        if isinstance(x, torch.Tensor) and not tc.is_fake(x):
            return self.mode.from_tensor(x)  # the same copy each time (the converter's memo): reads see the write
        return x


def fake_forward(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """Run `module` on fake copies of the examples; errors name the failing module."""
    mode = mode_of(module)
    paths = {id(m): name for name, m in module.named_modules(remove_duplicate=False)}
    fargs, fkwargs = to_fake((args, kwargs), mode)
    with tracking_modules() as stack, _deferred.quiet(), tc.quiet_fake_kernel_errors(), mode, FoldConstants(mode):
        try:
            return module(*fargs, **fkwargs)
        except LazyError:
            raise
        except tc.data_dependent_errors() as e:
            where = _where(stack, paths, module)
            raise DeferredError(
                f"the forward of {where} depends on tensor values ({e}), so it cannot run on a "
                "shape alone. Call the model once on a real batch instead (lazy layers build "
                "from it), then `tl.materialize(model)` for anything still deferred."
            ) from None
        except Exception as e:
            where = _where(stack, paths, module)
            raise ShapeError(
                f"{where} fails on the example inputs: {str(e).rstrip('.')}. Check the examples' shapes and dtypes "
                "against what the forward expects (`tl.summary(model, ...)` shows each module's shapes)."
            ) from e


def _where(stack: list[nn.Module], paths: dict[int, str], root: nn.Module) -> str:
    culprit = stack[-1] if stack else root
    path = paths.get(id(culprit)) or "the model's root"
    return f"`{path}` ({type(culprit).__name__})"


def mode_of(module: nn.Module) -> Any:
    for t in (*module.parameters(), *module.buffers()):
        if tc.is_fake(t):
            return tc.fake_mode_of(t)
    return _deferred.fake_mode()


def _shape_on_meta_twin(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
    """Infer lazy sizes on a meta twin and shape the real lazy layers from them (no fake forward).

    False when that cannot be done (Keras-style `LazyModule`s need their inputs; forwards that need
    values or fake devices fail on the twin): the caller then runs the fake forward.
    """
    if any(_lazy.is_lazy_module(m) for m in module.modules()):
        return False
    try:
        with _lazy.observing() as observed:
            twin = run_twin(module, args, kwargs)
    except Exception:  # noqa: BLE001  (the fake-tensor path reports real errors precisely)
        return False
    values = {path: observed[id(m)] for path, m in twin.named_modules() if id(m) in observed}
    for path, m in module.named_modules():
        if _lazy.is_lazy_layer(m) and path in values:
            _lazy.build_with(m, values[path])
    # lazy layers that the built ones created (nested) are shaped by a fake forward after all
    shaped_in_twin = {path for path, m in twin.named_modules() if not _lazy.is_lazy_layer(m)}
    return not any(_lazy.is_lazy_layer(m) and path in shaped_in_twin for path, m in module.named_modules())


def build(
    module: nn.Module,
    *example_args: Any,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    **example_kwargs: Any,
) -> nn.Module:
    """Infer every lazy size from example inputs, then materialize; return `module`.

    Examples may be `tl.Spec`s or tensors, nested in tuples, lists and dicts;
    no arithmetic runs on them. Under `tl.deferred()` the result is exactly the
    eager model with explicit sizes under the same seed; lazy layers outside
    it are initialized in construction order. On a built model only the
    shapes are checked. On failure the model is left as it was.

    >>> import torch, torchlazy as tl
    >>> net = torch.nn.Sequential(tl.nn.Conv2d(16, 3), torch.nn.Flatten(), tl.nn.Linear(10))
    >>> _ = tl.build(net, tl.Spec(1, 3, 8, 8))
    >>> net[2]
    Linear(in_features=576, out_features=10, bias=True)
    """
    if not isinstance(module, nn.Module):
        raise ArgumentError(f"`tl.build` takes a torch.nn.Module, not {type(module).__name__}.")
    if not example_args and not example_kwargs and not _lazy.is_built(module):
        raise ShapeError(
            "`tl.build` needs example inputs to shape the lazy layers: pass what the forward takes, "
            "as `tl.Spec(*shape, dtype=...)` or tensors, e.g. `tl.build(model, tl.Spec(8, 3, 224, 224))`."
        )
    placement = Placement.of(device, dtype, "tl.build")  # checked before anything is shaped: errors name `tl.build`
    device, dtype = placement.device, placement.dtype  # names such as "bf16" as the dtypes they name
    refuse_torch_lazy(module, "tl.build")
    _paths.remember_paths(module)
    with _lazy.transaction():
        examples = bool(example_args or example_kwargs)  # none: nothing lazy, nothing to check
        if examples:
            refuse_fsdp_sharded(module, "tl.build")
        if examples and not _shape_on_meta_twin(module, example_args, example_kwargs):
            # what the forward sets on the modules is put back (lazy layers keep what they build); autograd stays
            # as the caller has it: a `LazyModule.build` computing from its parameters makes what eager makes
            changed_by_build = built_by_lazy(module)
            with attributes_kept(module, lambda m: id(m) not in changed_by_build, builds=True):
                fake_forward(module, example_args, example_kwargs)
        _lazy.relink_ties(module)
        if _deferred.is_deferred(module):
            materialize(module, device=device, dtype=dtype)
    if device is not None or dtype is not None:
        module.to(device=device, dtype=dtype)
    return module


def refuse_fsdp_sharded(module: nn.Module, caller: str) -> None:
    """A model FSDP2 sharded: a shape-only forward runs FSDP's forward hooks on fake tensors, on FSDP's shared
    state, which torchlazy cannot put back: before the first forward it started FSDP's lazy initialization and
    failed part-way, after it it left FSDP's parameter groups unsharded (the next forward then failed, or a
    materialize). Refused before anything runs."""
    path = tc.fsdp_sharded(module)
    if path is not None:
        where = f"`{path}`" if path else "the model"
        raise ArgumentError(
            f"`{caller}` with example inputs runs the model's forward on fake tensors, and {where} is sharded by "
            "`fully_shard`: that forward would run FSDP's hooks, whose state fake tensors would leave broken. Call "
            f"`{caller}` before `fully_shard` (on the deferred model it costs nothing), or on an unsharded copy."
        )


def refuse_torch_lazy(module: nn.Module, caller: str) -> None:
    """PyTorch's own unshaped `nn.Lazy*` modules: shaping on fake inputs fails inside them (a device mismatch
    between cpu and meta). Refused up front, pointing to the torchlazy layer of the same name."""
    from torch.nn.modules.lazy import LazyModuleMixin

    for path, m in module.named_modules():
        lazy: Any = m  # PyTorch types the mixin's methods against a protocol
        if isinstance(m, LazyModuleMixin) and not _lazy.is_lazy_layer(lazy) and lazy.has_uninitialized_params():
            name = type(m).__name__
            raise LazyError(
                f"`{caller}`: `{path or name}` is PyTorch's own `{name}`, which `{caller}` cannot shape (it initializes "
                f"on a first real input only). Use `tl.nn.{name.removeprefix('Lazy')}` (the same arguments), or "
                "call the model once on a real input first."
            )
