"""Walking a module tree's tensors, swapping them in place, and where they end up.

The bottom of the stack: every part of torchlazy that finds a model's tensors,
replaces them, or decides their final device and dtype does it here, once.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import chain
from typing import Any

import torch
from torch import nn

from . import _markers
from . import _torch_compat as tc
from ._errors import ArgumentError

__all__ = [
    "Placement",
    "TensorState",
    "drop_parameter_caches",
    "module_tensors",
    "refresh_parameter_caches",
    "release_graphs",
    "swap_all",
    "unswappable",
]

_CPU = torch.device("cpu")
MODULE_TABLES = frozenset(nn.Module().__dict__)  # `_parameters`, `_buffers`, `_modules`, the hook tables


def module_tensors(module: nn.Module) -> Iterator[tuple[str, nn.Module, str, torch.Tensor]]:
    """(path, owner, attribute, tensor) for every tensor the module tree holds.

    Parameters, buffers and plain tensor attributes of every module first, then tensors in list, tuple and dict
    attributes, nested ones too (`self.banks = {"a": [t0, t1]}`: paths `banks.a.0`, `banks.a.1`; `attribute` is
    the outermost one): a parameter a container also holds (an optimizer-style group) is named by its own path
    first.
    """
    modules = list(module.named_modules(remove_duplicate=False))
    for prefix, owner in modules:
        dot = f"{prefix}." if prefix else ""
        for name, p in owner._parameters.items():
            if p is not None:
                yield f"{dot}{name}", owner, name, p
        for name, b in owner._buffers.items():
            if b is not None:
                yield f"{dot}{name}", owner, name, b
        for name, value in owner.__dict__.items():
            if isinstance(value, torch.Tensor) and not isinstance(value, nn.Parameter):
                yield f"{dot}{name}", owner, name, value
    for prefix, owner in modules:
        dot = f"{prefix}." if prefix else ""
        for name, value in owner.__dict__.items():
            if isinstance(value, (list, tuple)) or (
                isinstance(value, dict) and name not in MODULE_TABLES and not name.startswith(_markers.PREFIX)
            ):
                for path, t in _contained(value, f"{dot}{name}", 0, set()):
                    yield path, owner, name, t


_CONTAINERS = (list, tuple, dict)
_MAX_DEPTH = 8  # containers nested deeper are not searched


def _contained(value: Any, path: str, depth: int, seen: set[int]) -> Iterator[tuple[str, torch.Tensor]]:
    """(path, tensor) for the tensors in a list, tuple or dict and in the containers it holds (each container
    once: one held twice, or holding itself, is searched where it is first met)."""
    if id(value) in seen:
        return
    seen.add(id(value))
    if not _holds(list(value.values()) if isinstance(value, dict) else value, depth):
        return
    for key, item in value.items() if isinstance(value, dict) else enumerate(value):
        if isinstance(item, torch.Tensor):
            yield f"{path}.{key}", item
        elif isinstance(item, _CONTAINERS) and depth < _MAX_DEPTH:
            yield from _contained(item, f"{path}.{key}", depth + 1, seen)


def _holds(items: Any, depth: int) -> bool:
    """Whether these items, or the containers among them down to `_MAX_DEPTH`, include a tensor: by their types, a
    level at a time in C-level passes, each container of a level once (modules keep long lists of indices and of
    index pairs, e.g. LeViT's attention offsets: a Python loop over them cost 60 ms a walk; shared sub-lists and
    graphs of dicts would be expanded again at every level)."""
    types = set(map(type, items))
    if any(issubclass(t, torch.Tensor) for t in types):
        return True
    if depth >= _MAX_DEPTH or not any(issubclass(t, _CONTAINERS) for t in types):
        return False
    if all(issubclass(t, (list, tuple)) for t in types):
        containers: Any = items
    else:
        containers = [x.values() if isinstance(x, dict) else x for x in items if isinstance(x, _CONTAINERS)]
    unique = dict(zip(map(id, containers), containers)).values()  # each container once (C-level)
    return _holds(list(chain.from_iterable(unique)), depth + 1)


def drop_parameter_caches(module: nn.Module) -> None:
    """Forget cached references to parameters (RNNs keep weak ones) before swapping them."""
    for sub in module.modules():
        if isinstance(sub, nn.RNNBase):
            tc.drop_rnn_weights(sub)


def refresh_parameter_caches(module: nn.Module) -> None:
    """Modules that cache references to their parameters (RNNs) re-read them."""
    for sub in module.modules():
        if isinstance(sub, nn.RNNBase):
            tc.refresh_rnn_weights(sub)


@dataclass(frozen=True)
class TensorState:
    """What a user set on a tensor object: `requires_grad`, attributes, hooks on the tensor itself.

    Taken from a tensor about to be replaced (a placeholder, a fake tensor) and given to
    its replacement, whether the replacement is the same Python object after
    `torch.utils.swap_tensors` (which moves autograd state, hooks included, to the
    other object, and swaps `__dict__`) or a new object (where swapping is refused).
    """

    requires_grad: bool
    attrs: dict[str, Any]
    hooks: dict[str, Any]
    grad: torch.Tensor | None = None  # a real gradient the user set (`p.grad = g` before materialize)

    @classmethod
    def of(cls, t: torch.Tensor, internal: frozenset[str] | set[str] = frozenset()) -> TensorState:
        attrs = {k: v for k, v in t.__dict__.items() if k not in internal}
        with tc.disable_torch_function_subclass():
            grad = t.grad if t.is_leaf else None  # a computed tensor's `.grad` is never set (torch warns)
        real = isinstance(grad, torch.Tensor) and not tc.is_fake(grad) and not grad.is_meta
        return cls(bool(t.requires_grad), attrs, tc.tensor_hooks(t), grad if real else None)

    def give(self, t: torch.Tensor, requires_grad: bool = True) -> None:
        """Give this state to `t` (its own attributes stay unless these name them too)."""
        if requires_grad and t.requires_grad != self.requires_grad:
            t.requires_grad_(self.requires_grad)
        t.__dict__.update(self.attrs)
        tc.set_tensor_hooks(t, self.hooks)
        if self.grad is not None and t.grad is None and self.grad.shape == t.shape:
            t.grad = self.grad.to(t.device, t.dtype)  # cast and moved with it, as `Module.to` moves gradients


def _replace_references(module: nn.Module, new: dict[int, torch.Tensor]) -> None:
    for _, owner, name, t in list(module_tensors(module)):
        real = new.get(id(t))
        if real is None:
            continue
        if owner._parameters.get(name) is t:
            owner._parameters[name] = real  # type: ignore[assignment]
        elif owner._buffers.get(name) is t:
            owner._buffers[name] = real
        elif owner.__dict__.get(name) is t:
            owner.__dict__[name] = real
        elif isinstance(owner.__dict__.get(name), _CONTAINERS):
            owner.__dict__[name] = _substituted(owner.__dict__[name], new, 0)


def _substituted(value: Any, new: dict[int, torch.Tensor], depth: int) -> Any:
    """`value` with the tensors `new` names replaced at any depth: lists and dicts changed in place (whoever
    else holds them sees the change), a tuple rebuilt (a named tuple as its own type) where an item changed."""

    def one(item: Any) -> Any:
        if isinstance(item, torch.Tensor):
            return new.get(id(item), item)
        if isinstance(item, _CONTAINERS) and depth < _MAX_DEPTH and item is not value:
            return _substituted(item, new, depth + 1)  # a container held twice is visited twice: nothing left then
        return item

    if isinstance(value, dict):
        for key, item in value.items():
            fixed = one(item)
            if fixed is not item:
                value[key] = fixed
        return value
    fixed = [one(item) for item in value]
    if isinstance(value, list):
        value[:] = fixed
        return value
    if all(a is b for a, b in zip(fixed, value)):
        return value
    error: Exception | None = None
    for make in (_as_named_tuple, _as_sequence_of_items, _as_copy):  # each checked: the same items, in order
        try:
            rebuilt = make(value, fixed)
        except Exception as e:
            error = error or e
            continue
        if rebuilt is not None and type(rebuilt) is type(value) and len(rebuilt) == len(fixed):
            if all(a is b for a, b in zip(rebuilt, fixed)):
                return rebuilt
    cause = error or TypeError("no constructor gave back the same items")
    raise ArgumentError(
        f"a `{type(value).__qualname__}` (a tuple type) held by the model holds tensors this call replaced, and it "
        f"cannot be rebuilt with them ({type(cause).__name__}: {cause}). Hold them in a list, a plain tuple or a "
        "named tuple, or drop the weak references that keep the tensors from being swapped in place."
    ) from cause


def _as_named_tuple(value: Any, items: list[Any]) -> Any:
    return type(value)(*items) if hasattr(value, "_fields") else None


def _as_sequence_of_items(value: Any, items: list[Any]) -> Any:
    return type(value)(items)  # `tuple`, `torch.return_types`


def _as_copy(value: Any, items: list[Any]) -> Any:
    """As `copy` makes a tuple subclass: its `__new__` not called, its instance attributes carried."""
    rebuilt = tuple.__new__(type(value), items)
    if getattr(value, "__dict__", None):
        rebuilt.__dict__.update(value.__dict__)
    return rebuilt


def swap_all(module: nn.Module, pairs: list[tuple[torch.Tensor, torch.Tensor]], internal: set[str]) -> None:
    """Make each old tensor of `module` hold its new value, keeping Python identity where possible.

    The old object becomes the new tensor (`torch.utils.swap_tensors`), so ties and
    references held elsewhere (optimizers, other modules) follow; its user attributes
    (all but `internal`) are kept. Where something holds a weak reference to the old
    object (swapping is then refused), the new tensor takes its place in the model.
    """
    drop_parameter_caches(module)
    replacements: dict[int, torch.Tensor] = {}
    for old, new in pairs:
        if isinstance(old, nn.Parameter) and not isinstance(new, nn.Parameter):
            new = nn.Parameter(new, requires_grad=old.requires_grad)
        elif old.requires_grad and new.is_floating_point() and not new.requires_grad:
            new.requires_grad_(True)
        state = TensorState.of(old, internal)
        if weakref.getweakrefcount(old) == 0 and _swapped(old, new):
            old.__dict__.clear()
            state.give(old, requires_grad=False)
        else:
            state.give(new, requires_grad=False)
            replacements[id(old)] = new
    if replacements:
        _replace_references(module, replacements)
    refresh_parameter_caches(module)


def release_graphs(tensors: list[torch.Tensor]) -> None:
    """Tensors computed from parameters with autograd (legacy `weight_norm`'s plain `weight` attribute) keep a
    graph that holds those parameters, and torch refuses to swap a tensor held so: they let go of it (a leaf
    now, still requiring grad: replay computes values, not graphs). Views cannot, and are left as they are."""
    for t in tensors:
        if t.grad_fn is not None and not tc.is_view(t):
            tc.detach_in_place(t)
            t.requires_grad_(True)


def unswappable(tensors: list[torch.Tensor]) -> list[int]:
    """Indices of the parameters `torch.utils.swap_tensors` would refuse: something else holds their tensor (a
    view of it, alive in a variable or as a module attribute), beyond the object itself and its gradient
    accumulator. Asked before any swap, so that a refusal changes nothing."""
    # anything weakly referenced (`swap_all` does not swap those) is put in place by reference instead, and so
    # is a buffer whose views are the model's own (a buffer registered as a view of another): they are replaced
    # too. A buffer viewed from outside the model (`row = bn.running_var[0:2]`) is refused: the view would keep
    # the deferred tensor's stale values
    bases = {id(t._base) for t in tensors if t._base is not None}
    return [
        i
        for i, t in enumerate(tensors)
        if weakref.getweakrefcount(t) == 0
        and (isinstance(t, nn.Parameter) or id(t) not in bases)
        and tc.swap_refused(t)
    ]


def _swapped(old: torch.Tensor, new: torch.Tensor) -> bool:
    """Swap `new` into the object `old`; for a buffer, False, changing nothing, where torch refuses: another
    reference holds the old tensor (a buffer registered as a view of another keeps its base alive). A
    parameter keeps torch's refusal: an optimizer made before materialize would go on holding the old one."""
    if isinstance(old, nn.Parameter):
        torch.utils.swap_tensors(old, new)
        return True
    try:
        torch.utils.swap_tensors(old, new)
    except RuntimeError:
        return False
    return True


# spellings of floating dtypes people write (the CLI's too)
DTYPES: dict[str, torch.dtype] = {
    "fp32": torch.float32, "float32": torch.float32, "float": torch.float32,
    "fp16": torch.float16, "float16": torch.float16, "half": torch.float16,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
    "fp64": torch.float64, "float64": torch.float64, "double": torch.float64,
}  # fmt: skip


def check_dtype(dtype: object, caller: str) -> torch.dtype | None:
    """`dtype=` as a floating torch dtype (names such as "bf16" accepted), or None."""
    if dtype is None:
        return None
    if isinstance(dtype, str) and dtype.removeprefix("torch.") in DTYPES:
        return DTYPES[dtype.removeprefix("torch.")]
    if isinstance(dtype, torch.dtype) and dtype.is_floating_point:
        return dtype
    raise ArgumentError(
        f"`{caller}`: `dtype=` takes a floating dtype (it casts floating tensors; integer buffers keep "
        f"theirs), such as `torch.bfloat16` or one of {sorted(DTYPES)}; got `{dtype!r}`."
    )


def check_device(device: object, caller: str) -> torch.device | None:
    """`device=` as a torch device that this machine has, or None."""
    if device is None:
        return None
    try:
        dev = torch.device(device)  # type: ignore[call-overload]
    except (RuntimeError, TypeError) as e:
        raise ArgumentError(
            f"`{caller}`: `device=` takes a device such as 'cpu' or 'cuda:0'; got `{device!r}` ({e})."
        ) from None
    if dev.type == "meta":  # a meta tensor holds no values: the record would be used up and the values lost
        raise ArgumentError(
            f"`{caller}`: `device='meta'` makes tensors without values. For shapes and sizes only, keep the model "
            "deferred (`tl.summary(model)` reads it as it is); give a device that holds values, such as 'cpu'."
        )
    backend = getattr(torch, dev.type, None) if dev.type != "cpu" else None
    available = getattr(backend, "is_available", None)
    if callable(available) and not available():
        raise ArgumentError(
            f"`{caller}`: `device={device!r}`, but this machine has no {dev.type} device "
            f"(`torch.{dev.type}.is_available()` is False). Use `device='cpu'`, or run where {dev.type} is."
        )
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ArgumentError(
            f"`{caller}`: `device={device!r}`, but this machine has {torch.cuda.device_count()} CUDA devices."
        )
    if dev.type != "cpu":
        try:  # backends with no `is_available` (xla, hpu, privateuseone, ...) or not built into this torch
            torch.empty(0, device=dev)
        except Exception as e:  # torch raises RuntimeError, NotImplementedError or ImportError, by backend
            raise ArgumentError(
                f"`{caller}`: `device={device!r}`, but this torch cannot make tensors there "
                f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}). Use `device='cpu'`, or "
                "install the torch build (or the extension) for that backend."
            ) from None
    return dev


@dataclass(frozen=True)
class Placement:
    """Where materialized tensors go: the one cast/move policy (records, checkpoints, shards).

    `device=None` keeps each tensor's recorded device; `dtype` applies to floating
    tensors only (integer buffers such as counters and indices keep theirs).
    """

    device: torch.device | None = None
    dtype: torch.dtype | None = None

    @staticmethod
    def of(device: object, dtype: object, caller: str) -> Placement:
        """A checked placement from a user's `device=` and `dtype=` (ArgumentError otherwise)."""
        return Placement(check_device(device, caller), check_dtype(dtype, caller))

    def final_dtype(self, like: torch.Tensor) -> torch.dtype:
        return self.dtype if self.dtype is not None and like.dtype.is_floating_point else like.dtype

    def final_device(self, like: torch.Tensor) -> torch.device:
        """`device=`, else the tensor's own device (the CPU for a meta tensor, which a checkpoint fills)."""
        if self.device is not None:
            return self.device
        return _CPU if like.device.type == "meta" else like.device

    def place(self, value: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """`value` (computed for `like`) on its final device and dtype; no copy when already there."""
        return value.to(self.final_device(like), self.final_dtype(like), copy=False)

    def keeps(self, like: torch.Tensor) -> bool:
        """Whether a CPU value computed for `like` is already final (no cast, no move)."""
        return self.final_dtype(like) == like.dtype and (self.device is None or self.device.type == "cpu")

    def replay_device(self, exact: bool, sample: torch.device) -> torch.device:
        """Where to compute: the CPU when exact (its generator is the one eager used), else the target."""
        if exact:
            return torch.device("cpu")
        return self.device if self.device is not None else sample
