"""Lazy modules: constructor arguments that come from the first input.

One mechanism serves every lazy class. `lazy(cls, **rules)` makes a subclass
of `cls` that holds its constructor arguments; at the first forward (or when a
state dict arrives) the rules read the missing arguments off the inputs, the
real `cls.__init__` runs on a fresh object, and the lazy object takes over its
state and becomes a plain `cls` in place: same Python object, no torchlazy
left in its class or hooks.

Before that, the lazy object holds placeholder parameters (PyTorch's
`UninitializedParameter`, so tools that know PyTorch's lazy layers know these)
learnt from a skeleton of the real class built on the meta device. An
optimizer created before the first call holds those placeholders, and they
become the real parameters.

Where the build runs depends on the inputs: real inputs build for real on the
input's device; fake inputs (inside `tl.build` or `tl.summary`) build into a
record, at the place in construction order that the layer took when it was
constructed, so deferred models stay exact.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import inspect
import itertools
import math
import numbers
import re
import sys
import threading
import types
import typing
import warnings
import weakref
from collections.abc import Callable, Iterator
from typing import Any, ClassVar, TypeVar

import torch
from torch import nn
from torch.nn.parameter import UninitializedBuffer, UninitializedParameter, is_lazy

from . import _deferred, _markers, _paths
from . import _torch_compat as tc
from ._errors import ArgumentError, DeferredError, DtypeError, LazyError, NotBuiltError, ShapeError, listed
from ._modtree import MODULE_TABLES, TensorState, drop_parameter_caches, refresh_parameter_caches
from ._record import Record
from ._rules import Inputs, Mismatch, Rule, Trailing, as_rule

__all__ = [
    "LazyModule",
    "build_from_state",
    "build_with",
    "first_input",
    "is_built",
    "is_lazy_layer",
    "is_placeholder",
    "lazy",
    "placeholder_like",
    "relink_ties",
]

M = TypeVar("M", bound=nn.Module)
_order = itertools.count()
_HOOK_ATTRS = tuple(k for k in nn.Module().__dict__ if "hook" in k)


# -- placeholders --------------------------------------------------------------


def _not_built(t: Any, what: str) -> NotBuiltError:
    where: tuple[Any, str] | None = getattr(t, _markers.WHERE, None)
    owner = where[0]() if where is not None else None
    if where is not None and owner is not None:
        path = _paths.module_path(owner)
        name = f"`{where[1]}`" if path == type(owner).__name__ else f"`{path}.{where[1]}`"
        subject = f"{name} of {owner!r}"
    else:
        subject = "a lazy buffer" if isinstance(t, UninitializedBuffer) else "a lazy parameter"
    return NotBuiltError(
        f"{subject} is not built yet: {what} needs its shape, which depends on the first input. "
        "Run one forward pass, or `tl.build(model, tl.Spec(*input_shape))`, first."
    )


# Python's operators, as the user wrote them (PyTorch reports `x + 1` as `add`, `x[0]` as `__getitem__`).
_OPERATORS = {
    "__add__": "`+`", "__radd__": "`+`", "__iadd__": "`+=`", "__sub__": "`-`", "__rsub__": "`-`", "__isub__": "`-=`",
    "__mul__": "`*`", "__rmul__": "`*`", "__imul__": "`*=`", "__truediv__": "`/`", "__rtruediv__": "`/`",
    "__itruediv__": "`/=`", "__floordiv__": "`//`", "__rfloordiv__": "`//`", "__mod__": "`%`", "__rmod__": "`%`",
    "__pow__": "`**`", "__rpow__": "`**`", "__matmul__": "`@`", "__rmatmul__": "`@`", "__neg__": "`-x`", "__pos__": "`+x`",
    "__abs__": "`abs()`", "__invert__": "`~`", "__and__": "`&`", "__or__": "`|`", "__xor__": "`^`",
    "__eq__": "`==`", "__ne__": "`!=`", "__lt__": "`<`", "__le__": "`<=`", "__gt__": "`>`", "__ge__": "`>=`",
    "__getitem__": "indexing (`t[...]`)", "__setitem__": "assigning into it (`t[...] = ...`)",
    "__len__": "`len()`", "__iter__": "iterating over it", "__bool__": "`bool()`", "__contains__": "`in`",
    "__int__": "`int()`", "__float__": "`float()`", "__index__": "using it as an index",
    "__array__": "converting it to NumPy", "__format__": "formatting it",
}  # fmt: skip


def _operation(func: Any) -> str:
    """What the user did, for a `__torch_function__` call: `.detach()`, `+`, `len()`, ...

    Private PyTorch names (`_is_view`, read by `torch.compile` and other tools) are not the user's
    call: they mean that something used the tensor.
    """
    name = getattr(func, "__name__", str(func))
    if name in _OPERATORS:
        return _OPERATORS[name]
    if name.startswith("_"):
        return f"using it (PyTorch's internal `{name}`, called by a library or `torch.compile`)"
    if getattr(torch.Tensor, name, None) is func:
        return f"`.{name}()`"
    return f"`{name}()`"


_GRAD_GETTER: Any = inspect.getattr_static(torch.Tensor, "grad").__get__  # what `t.grad` calls


def _left_behind(t: Any) -> bool:
    """Whether `t` is a placeholder whose layer was built with another object in its place."""
    where = t.__dict__.get(_markers.WHERE)
    owner = where[0]() if where is not None else None
    return owner is not None and not isinstance(owner, _LazyLayer)


def _left_behind_error(t: Any) -> LazyError:
    owner, name = t.__dict__[_markers.WHERE][0](), t.__dict__[_markers.WHERE][1]
    held = name in dict(owner.named_parameters())
    there = "another parameter" if held else "no parameter (the sizes it was built with make others)"
    return LazyError(
        f"`{_paths.module_path(owner)}.{name}` was a placeholder before the layer's first input, and the built "
        f"layer holds {there} under that name: whatever still holds the placeholder (an optimizer created "
        "before the first call?) would never update the real parameters. Create it after the first call or "
        "`tl.build`, from `model.parameters()`."
    )


def _copy_needs_shape(args: Any, kwargs: Any) -> bool:
    """Whether a `copy_` between a placeholder and a real tensor needs the placeholder's shape: always into it (torch
    would copy a scalar into its (0,) and drop the value silently), and from it unless torch's own check of its (0,)
    against the target passes. Placeholder to placeholder, and loads of a lazy layer's state (nothing to copy), are
    left to torch."""
    dst = args[0] if args else kwargs.get("self")
    src = args[1] if len(args) > 1 else kwargs.get("src")
    if not isinstance(dst, torch.Tensor) or not isinstance(src, torch.Tensor) or is_lazy(dst) == is_lazy(src):
        return False
    if is_lazy(dst):  # but a load of a lazy state (torch's `LazyBatchNorm` keeps a real `num_batches_tracked`)
        return not _paths.frames_include((nn.Module._load_from_state_dict.__code__,))
    shape = tuple(dst.shape)
    try:
        return torch.broadcast_shapes((0,), shape) != shape
    except RuntimeError:
        return True


def _placeholder_in(args: Any, kwargs: Any) -> Any:
    return next((a for a in tc.tree_leaves((args, kwargs)) if isinstance(a, _Placeholder)), None)


class _Placeholder:
    """Behaviour shared by unbuilt parameters and buffers."""

    @classmethod
    def __torch_function__(cls, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if func == _GRAD_GETTER and args and _left_behind(args[0]):
            raise _left_behind_error(args[0])  # an optimizer made before the build would skip it silently
        allowed = tc.allowed_placeholder_methods()
        if func is torch.Tensor.size:  # PyTorch answers (0,) here: a size that is not the layer's
            raise _not_built(args[0] if args else None, "`.size()`")
        if func is torch.Tensor.copy_ and _copy_needs_shape(args, kwargs):  # else torch's own (a lazy state's load)
            raise _not_built(_placeholder_in(args, kwargs), "`.copy_()`")
        if func in _SETTINGS:  # what a user sets on the tensor object: kept, and carried to the built one
            with tc.disable_torch_function_subclass():
                return func(*args, **(kwargs or {}))
        if func in allowed or func.__class__.__name__ == "method-wrapper":
            return super().__torch_function__(func, types, args, kwargs or {})  # type: ignore[misc]
        raise _not_built(_placeholder_in(args, kwargs), _operation(func))

    @property
    def shape(self) -> torch.Size:
        raise _not_built(self, "`.shape`")

    def share_memory_(self) -> Any:
        raise _not_built(self, "`share_memory_()`")

    def __reduce_ex__(self, proto: Any) -> Any:  # PyTorch's keeps `requires_grad` only
        with tc.disable_torch_function_subclass():
            return type(self), (self.requires_grad, self.device, self.dtype)  # type: ignore[attr-defined]

    def __deepcopy__(self, memo: dict[int, Any]) -> Any:
        if id(self) not in memo:  # (no dispatch mode: inside a block the new placeholder was made a fake tensor)
            with tc.disable_torch_function_subclass(), tc.disable_current_modes():
                memo[id(self)] = type(self)(self.requires_grad, self.device, self.dtype)  # type: ignore[call-arg,attr-defined]
        return memo[id(self)]


# Tensor methods that set state on the tensor object rather than read its values.
_SETTINGS = frozenset(
    {torch.Tensor.requires_grad_, torch.Tensor.register_hook, torch.Tensor.register_post_accumulate_grad_hook}
)


class LazyParameter(_Placeholder, UninitializedParameter):  # type: ignore[misc,override]
    """A parameter whose shape is not known yet (an `UninitializedParameter`)."""


class LazyBuffer(_Placeholder, UninitializedBuffer):  # type: ignore[misc,override]
    """A buffer whose shape is not known yet (an `UninitializedBuffer`)."""


class _Unbuilt(nn.Module):
    """Stands for a sub-module the real class will create, holding its placeholders."""

    def _get_name(self) -> str:
        return "Unbuilt"

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Called before the layer holding it is built (`AdaptiveLogSoftmaxWithLoss.log_prob` first): say so."""
        raise NotBuiltError(
            f"`{_paths.module_path(self)}` is part of a lazy layer that is not built yet: its sizes come from the "
            "layer's first input. Call the layer itself first (or `tl.build(model, example)`), then this."
        )

    def _save_to_state_dict(self, destination: dict[str, Any], prefix: str, keep_vars: bool) -> None:
        _save_unbuilt(self, destination, prefix, keep_vars)


def _save_unbuilt(module: nn.Module, destination: dict[str, Any], prefix: str, keep_vars: bool) -> None:
    """Save an unbuilt module's state: a new placeholder for each (PyTorch's lazy layers save theirs).

    They are PyTorch's `UninitializedParameter`/`UninitializedBuffer` (subclasses of them), detached
    from the layer as `detach()` would be: `torch.save`, `copy.deepcopy` (which PyTorch's own
    `UninitializedBuffer` refuses) and PyTorch's `nn.Lazy*` layers accept them, and `load_state_dict`
    of an unbuilt torchlazy layer leaves it unbuilt. With `keep_vars`, the placeholders themselves.
    """
    for name, t in itertools.chain(module._parameters.items(), module._buffers.items()):
        if t is None or name in module._non_persistent_buffers_set:
            continue
        if keep_vars:
            destination[prefix + name] = t
        else:
            destination[prefix + name] = placeholder_like(t, t.device) if isinstance(t, _Placeholder) else t.detach()


# -- building in place, atomically -----------------------------------------------


class _Observed(threading.local):
    def __init__(self) -> None:
        self.values: dict[int, dict[str, Any]] | None = None


_observed = _Observed()


@contextlib.contextmanager
def observing() -> Iterator[dict[int, dict[str, Any]]]:
    """Collect the constructor values lazy layers infer at their first call: id(layer) -> values."""
    outer = _observed.values
    _observed.values = {}
    try:
        yield _observed.values
    finally:
        _observed.values = outer


class _Journal(threading.local):
    def __init__(self) -> None:
        self.undo: list[Callable[[], None]] | None = None


_journal = _Journal()


@contextlib.contextmanager
def transaction(rollback: bool = False) -> Iterator[None]:
    """Lazy builds inside are undone if the block fails (or always, with `rollback`)."""
    outer = _journal.undo
    _journal.undo = []
    try:
        yield
    except BaseException:
        for undo in reversed(_journal.undo):
            undo()
        raise
    else:
        if rollback:
            for undo in reversed(_journal.undo):
                undo()
        elif outer is not None:
            outer.extend(_journal.undo)
    finally:
        _journal.undo = outer


def _snapshot(module: nn.Module) -> Callable[[], None]:
    state = dict(module.__dict__)
    inner = {k: (v, v.copy()) for k, v in state.items() if k in MODULE_TABLES and hasattr(v, "copy")}
    cls = type(module)

    def undo() -> None:
        module.__dict__.clear()
        module.__dict__.update(state)
        for table, saved in inner.values():  # into the very tables: a hook's handle removes from the one it knew
            table.clear()
            table.update(saved)
        module.__class__ = cls

    return undo


def _slot_for_new_module() -> tuple[Record, tuple[int, ...]] | None:
    recorder = _deferred.current_recorder()
    return (recorder.record, recorder.reserve_slot()) if recorder is not None else None


def _undo_now(undo: Callable[[], None]) -> None:
    undo()
    if _journal.undo is not None and undo in _journal.undo:
        _journal.undo.remove(undo)


def _run_build(module: nn.Module, build: Callable[[bool], None], fake_inputs: bool) -> Callable[[], None]:
    """Run `build(deferred)` for `module` where it belongs; undo everything if it fails."""
    slot = module.__dict__.get(_markers.SLOT)
    undo = _snapshot(module)
    if slot is not None and not fake_inputs:
        raise DeferredError(
            f"`{_paths.module_path(module)}` was constructed under `tl.deferred()` and got a real "
            "input: its parameters would have no values. Use `tl.build(model, example)` to infer "
            "sizes and materialize, then call the model."
        )
    if fake_inputs:
        if slot is None:
            with tc.disable_current_modes():  # the record reads the real generator's state, not a fake one
                slot = (Record(live=True), ())
            slot[0].order = module.__dict__.get(_markers.ORDER, 0)
        record, prefix = slot
        try:
            with _deferred.recording(record, prefix):
                build(True)
        except BaseException:
            record.drop(prefix)
            undo()
            raise

        def full_undo() -> None:
            record.drop(prefix)
            undo()

    else:
        try:
            # parameters made under `torch.inference_mode()` would be inference tensors, which no
            # optimizer can update: build outside it (the forward itself still runs inside)
            with torch.inference_mode(False):
                build(False)
        except BaseException:
            undo()
            raise
        full_undo = undo
    if _journal.undo is not None:
        _journal.undo.append(full_undo)
    return full_undo


def _input_shapes(args: Any, kwargs: Any) -> str:
    """The inputs as the user would describe them: `(Tensor[2, 3], 5)`."""

    def show(x: Any) -> str:
        if isinstance(x, torch.Tensor):
            return f"Tensor[{', '.join(map(str, x.shape))}]"
        return type(x).__name__ if not isinstance(x, (int, float, bool, str, type(None))) else repr(x)

    parts = [show(a) for a in args] + [f"{k}={show(v)}" for k, v in kwargs.items()]
    return f"({', '.join(parts)})"


def _eagerly(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """`fn(*args, **kwargs)`, run eagerly even under `torch.compile` (a graph break there).

    A first call builds: it swaps classes and tensors, which dynamo cannot trace. As with PyTorch's
    own lazy layers, it runs eagerly; dynamo compiles the plain built module from the next call.
    """
    if torch.compiler.is_compiling():
        return torch.compiler.disable(fn)(*args, **kwargs)
    return fn(*args, **kwargs)


def _fake(args: Any, kwargs: Any) -> bool:
    return any(tc.is_fake(t) for t in tc.tree_leaves((args, kwargs)))


def _first_device(args: Any, kwargs: Any) -> torch.device:
    for t in tc.tree_leaves((args, kwargs)):
        if isinstance(t, torch.Tensor):
            return t.device
        if hasattr(t, "data") and isinstance(t.data, torch.Tensor):  # PackedSequence
            return t.data.device
    return torch.get_default_device()


def is_built(module: nn.Module) -> bool:
    """Whether every lazy module under `module` has its sizes: its shapes are all known.

    It says nothing of values: a model made under `tl.deferred()` is built (all its shapes are
    known) but not materialized until `tl.materialize` (see `tl.is_deferred`). A model without lazy
    modules is built. Ready to run means `is_built(m) and not is_deferred(m)`.

    >>> import torch, torchlazy as tl
    >>> net = torch.nn.Sequential(tl.nn.Linear(3))
    >>> tl.is_built(net)
    False
    >>> _ = net(torch.ones(2, 5))
    >>> tl.is_built(net), net[0]
    (True, Linear(in_features=5, out_features=3, bias=True))
    >>> with tl.deferred():
    ...     plain = torch.nn.Linear(5, 3)
    >>> tl.is_built(plain), tl.is_deferred(plain)
    (True, True)
    """
    if not isinstance(module, nn.Module):
        raise ArgumentError(f"`tl.is_built` takes a torch.nn.Module, not {type(module).__name__}.")
    return not any(isinstance(m, _LazyLayer) or _markers.BUILD_HOOK in m.__dict__ for m in module.modules())


def is_lazy_layer(module: nn.Module) -> bool:
    """Whether `module` is a lazy layer made by `lazy()` that has not been built yet."""
    return isinstance(module, _LazyLayer)


def is_lazy_module(module: nn.Module) -> bool:
    """Whether `module` is a Keras-style `LazyModule` whose `build` has not run yet."""
    return _markers.BUILD_HOOK in module.__dict__


def is_placeholder(t: Any) -> bool:
    """Whether `t` is an unbuilt lazy parameter or buffer."""
    return isinstance(t, _Placeholder)


def placeholder_like(t: Any, device: torch.device | str) -> torch.Tensor:
    """A new placeholder of the same kind as `t` (an unbuilt parameter or buffer), on `device`."""
    if isinstance(t, LazyBuffer):
        return LazyBuffer(False, device, t.dtype)  # type: ignore[arg-type]
    return LazyParameter(t.requires_grad, device, t.dtype)  # type: ignore[call-arg,arg-type]


def first_input(module: nn.Module, args: Any, kwargs: Any) -> dict[str, Any]:
    """Apply a lazy layer's rules to a first input and build it there (no forward); the values taken."""
    return module._tl_first_input(args, kwargs)[0]  # type: ignore[operator]


def build_with(module: nn.Module, values: dict[str, Any]) -> None:
    """Shape a lazy layer from constructor values inferred elsewhere (a meta twin), deferred."""
    module._tl_build_with(values)  # type: ignore[operator]


def build_from_state(module: nn.Module, tensors: dict[str, torch.Tensor], prefix: str, deferred: bool) -> None:
    """Shape a lazy layer from state tensors (a checkpoint's shapes): values come later."""
    module._tl_build_from_state(tensors, prefix)  # type: ignore[operator]


# -- lazy layers made from a class and rules --------------------------------------


def _call_text(name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> str:
    return f"{name}({', '.join([*map(repr, args), *(f'{k}={v!r}' for k, v in kwargs.items())])})"


def _bad_construction(cls: type, args: tuple[Any, ...], kwargs: dict[str, Any], error: TypeError) -> ArgumentError:
    """Why the lazy class `cls` refused these constructor arguments, with the call that was meant.

    The usual cause is eager's argument order: `tl.nn.Linear(3, 4)` for `nn.Linear(3, 4)` passes
    the inferred size too, one positional argument more than the lazy class takes.
    """
    real: type = cls._tl_cls  # type: ignore[attr-defined]
    name = f"tl.nn.{cls.__qualname__}" if cls.__module__ == "torchlazy.nn" else cls.__qualname__
    eager = f"nn.{real.__qualname__}" if real.__module__.startswith("torch.nn") else real.__qualname__
    inferred = ", ".join(f"`{n}`" for n in cls._tl_rules)  # type: ignore[attr-defined]
    signature: inspect.Signature = cls._tl_signature  # type: ignore[attr-defined]
    positional = [p for p in signature.parameters.values() if p.kind is p.POSITIONAL_OR_KEYWORD]
    if len(args) > len(positional):
        meant = f"`{_call_text(name, args[1:], kwargs)}` or `{_call_text(eager, args, kwargs)}`"
        return ArgumentError(
            f"`{_call_text(name, args, kwargs)}`: lazy layers infer {inferred} from the first input, and take "
            f"{len(positional)} positional argument{'s' if len(positional) != 1 else ''} "
            f"({', '.join(f'`{p.name}`' for p in positional) or 'none'}; the others by keyword). "
            f"Did you mean {meant}?"
        )
    return ArgumentError(
        f"`{_call_text(name, args, kwargs)}`: {error}. It takes `{name}{signature}` "
        f"({inferred} come{'s' if len(cls._tl_rules) == 1 else ''} from the first input)."  # type: ignore[attr-defined]
    )


class _LazyLayer:
    """Mixin of every class that `lazy()` makes."""

    _tl_cls: ClassVar[type[nn.Module]]
    _tl_rules: ClassVar[dict[str, Rule]]
    _tl_signature: ClassVar[inspect.Signature]
    _tl_defaults: ClassVar[dict[str, Any]]  # the lazy class's own options

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        nn.Module.__init__(self)  # type: ignore[arg-type]
        try:
            bound = self._tl_signature.bind(*args, **kwargs)
        except TypeError as e:
            raise _bad_construction(type(self), args, kwargs, e) from None
        given = dict(bound.arguments)
        for p in self._tl_signature.parameters.values():
            if p.kind is p.VAR_KEYWORD:  # `**kwargs`: its names are the class's arguments (they came as one dict)
                extra = given.pop(p.name, {})
                inferred = [k for k in extra if k in self._tl_rules]
                if inferred:
                    raise ArgumentError(
                        f"`{type(self).__qualname__}`: {', '.join(f'`{k}`' for k in inferred)} is inferred from the "
                        "first input; do not pass it."
                    )
                given.update(extra)
        self._tl_options = {k: given.pop(k, v) for k, v in self._tl_defaults.items()}
        for rule in self._tl_rules.values():
            if not isinstance(rule, Trailing):
                continue
            rank = self._tl_options.get(rule.option)
            if not isinstance(rank, numbers.Integral) or isinstance(rank, bool) or rank < 1:
                raise ArgumentError(
                    f"`{type(self).__qualname__}`: `{rule.option}` (how many trailing dims of the input the layer "
                    f"takes) must be an int >= 1, got {rank!r}."
                )
        self._tl_args = given
        self.__dict__[_markers.ORDER] = next(_order)
        self.__dict__[_markers.SLOT] = _slot_for_new_module()
        self._tl_placeholders()

    # construction-time skeleton
    def _tl_construct(self, values: dict[str, Any], *, meta: bool) -> nn.Module:
        kwargs = {**self._tl_args, **values}
        if meta:
            if "device" in _parameters_of(self._tl_cls):
                kwargs["device"] = "meta"
            with (
                tc.disable_current_modes(),
                torch.device("meta"),
                warnings.catch_warnings(),
            ):
                warnings.simplefilter("ignore")
                return self._tl_cls(**kwargs)
        return self._tl_cls(**kwargs)

    def _tl_skeleton(self, values: dict[str, Any] | None = None) -> nn.Module | None:
        """The real class built on the meta device from `values`, or from the first probe sizes it accepts (kept on
        it as `_tl_values`)."""
        if values is not None:
            try:
                return self._tl_construct(values, meta=True)
            except Exception:
                return None
        choices = {name: rule.probes() for name, rule in self._tl_rules.items()}
        attempts = [
            {name: c[min(i, len(c) - 1)] for name, c in choices.items()} for i in range(max(map(len, choices.values())))
        ]
        defaults = {p.name: p.default for p in self._tl_signature.parameters.values() if p.default is not p.empty}
        common = _common_multiple({**defaults, **self._tl_args})  # sizes no probe fits: 11 heads, 13 groups
        if common is not None:
            attempts.append(
                {
                    n: None if c == (None,) else (common,) if isinstance(c[0], tuple) else common
                    for n, c in choices.items()
                }
            )
        for attempt in attempts:
            skeleton = self._tl_skeleton(attempt)
            if skeleton is not None:
                skeleton.__dict__["_tl_values"] = attempt
                return skeleton
        return None

    def _tl_layout(self) -> list[tuple[str, str, str, bool, torch.dtype, bool]]:
        """(kind, sub-module path, name, requires_grad, dtype, persistent) of what the real class holds.

        Learnt from a skeleton on the meta device, cached by everything the skeleton depends on.
        """
        return self._tl_learn()[0]

    def _tl_learn(self) -> _Learnt:
        """The layout; top-level tensor names that exist for some first inputs and not for others
        (MultiheadAttention's `in_proj_weight` or `q/k/v_proj_weight`, by the key/value sizes); the
        plain attributes the real class sets (`in_features`, ...); and, per sub-module path, those whose
        values do not depend on the input (`eps`, `padding_mode`, `norm_first`, `self_attn.batch_first`):
        known before the first call, as PyTorch's own lazy layers know them."""
        key = _layout_key(type(self), self._tl_args)
        learnt = _LAYOUTS.get(key) if key is not None else None
        if learnt is None:
            skeleton = self._tl_skeleton()
            layout = []
            for prefix, sub in skeleton.named_modules() if skeleton is not None else ():
                for name, p in sub._parameters.items():  # one registered as None (`bias=False`) reads None
                    if p is not None:
                        layout.append(("param", prefix, name, p.requires_grad, p.dtype, True))
                    else:
                        layout.append(("none", prefix, name, False, torch.float32, True))
                for name, b in sub._buffers.items():
                    if b is not None:
                        persistent = name not in sub._non_persistent_buffers_set
                        layout.append(("buffer", prefix, name, False, b.dtype, persistent))
            plain = (
                frozenset(k for k in vars(skeleton) if not k.startswith("_")) if skeleton is not None else frozenset()
            )
            learnt = (layout, self._tl_variable_names(skeleton), plain, self._tl_fixed(skeleton))
            if key is not None and len(_LAYOUTS) < 4096:
                _LAYOUTS[key] = learnt
        return learnt

    def _tl_fixed(self, skeleton: nn.Module | None) -> dict[str, dict[str, Any]]:
        """Per sub-module path, the attributes the real class sets whose values are the same in a skeleton of other
        sizes: the largest probe sizes doubled where they build (thresholds, `in // div_value`), else the first
        skeleton's doubled (what divided heads or groups still does); optional sizes given (`kdim`:
        MultiheadAttention's `_qkv_same_embed_dim`). Nothing where no such skeleton builds; never a device (both
        skeletons are on meta)."""
        values = skeleton.__dict__.get("_tl_values") if skeleton is not None else None
        if skeleton is None or values is None:
            return {}
        largest = {name: rule.probes()[-1] for name, rule in self._tl_rules.items()}
        other = self._tl_skeleton(_unlike(largest))
        if other is None:
            other = self._tl_skeleton(_unlike(values))
        if other is None:
            return {}
        others = dict(other.named_modules())
        fixed: dict[str, dict[str, Any]] = {}
        for prefix, sub in skeleton.named_modules():
            twin = others.get(prefix)
            if twin is None:
                continue
            known = {
                name: value
                for name, value in vars(sub).items()
                if name not in _MODULE_ATTRIBUTES
                and name not in self._tl_rules
                and _plain_value(value)
                and _same_value(value, vars(twin).get(name, _MISSING))
            }
            if known:
                fixed[prefix] = known
        return fixed

    def _tl_variable_names(self, skeleton: nn.Module | None) -> frozenset[str]:
        """Names held by the skeleton but not by a variant where optional rules give a size, or back."""
        optional = [name for name, rule in self._tl_rules.items() if rule.probes() == (None,)]
        if skeleton is None or not optional:
            return frozenset()

        def held(module: nn.Module) -> set[str]:
            return {n for n, t in (*module._parameters.items(), *module._buffers.items()) if t is not None}

        base = held(skeleton)
        choices = {name: rule.probes() for name, rule in self._tl_rules.items() if name not in optional}
        varied: set[str] = set()
        for size in (3, 7):
            for i in range(max((len(c) for c in choices.values()), default=1)):
                attempt = {name: c[min(i, len(c) - 1)] for name, c in choices.items()}
                variant = self._tl_skeleton({**attempt, **dict.fromkeys(optional, size)})
                if variant is not None:
                    varied |= base ^ held(variant)
                    break
        return frozenset(varied)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_tl_") or name in _MODULE_ATTRIBUTES:
            return nn.Module.__getattr__(self, name)  # type: ignore[arg-type]
        _, variable, plain, fixed = self._tl_learn()
        if name in fixed.get("", {}):  # known before the first call (`eps`, `norm_first`): as PyTorch's lazy layers
            return fixed[""][name]
        if name.startswith("_"):
            return nn.Module.__getattr__(self, name)  # type: ignore[arg-type]
        if name not in variable:
            try:
                return nn.Module.__getattr__(self, name)  # type: ignore[arg-type]
            except AttributeError:
                if name not in plain and name not in self._tl_rules:
                    raise
                if name in self._tl_args:  # given to the constructor: known already
                    return self._tl_args[name]
        if name in variable:
            optional = ", ".join(f"`{n}`" for n, r in self._tl_rules.items() if r.probes() == (None,))
            what = f"whether it exists at all depends on the first input (here: the sizes of {optional})"
        elif name in self._tl_rules:
            what = "its value comes from the first input"
        else:
            what = "the real constructor sets it when the first input gives the missing sizes"
        raise NotBuiltError(
            f"`{name}` of `{_paths.module_path(self)}` ({type(self).__qualname__}) is not built yet: "  # type: ignore[arg-type]
            f"{what}. Run one forward pass, or `tl.build(model, tl.Spec(*input_shape))`, first."
        )

    def _tl_placeholders(self) -> None:
        device = self._tl_args.get("device") or torch.get_default_device()
        me: nn.Module = self  # type: ignore[assignment]
        with tc.disable_current_modes():
            for kind, prefix, name, requires_grad, dtype, persistent in self._tl_layout():
                owner = me if not prefix else _unbuilt_at(me, prefix)
                where = (weakref.ref(me), f"{prefix}.{name}" if prefix else name)
                if kind == "none":
                    owner._parameters[name] = None
                elif kind == "param":
                    ph = LazyParameter(requires_grad, device, dtype)  # type: ignore[call-arg,arg-type]
                    setattr(ph, _markers.WHERE, where)
                    owner._parameters[name] = ph  # type: ignore[assignment]
                else:
                    bh = LazyBuffer(False, device, dtype)  # type: ignore[arg-type]
                    setattr(bh, _markers.WHERE, where)
                    owner.register_buffer(name, bh, persistent=persistent)
            stand_ins = dict(me.named_modules())
            for prefix, values in self._tl_learn()[3].items():  # what a stand-in sub-module knows already
                if prefix in stand_ins and prefix:  # (`self_attn.batch_first`, read by `nn.TransformerEncoder`)
                    stand_ins[prefix].__dict__.update(values)

    def _tl_dtype(self) -> torch.dtype | None:
        for t in itertools.chain(nn.Module.parameters(self), nn.Module.buffers(self)):  # type: ignore[arg-type]
            if t.dtype.is_floating_point:
                return t.dtype
        return None

    # the first input
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return _eagerly(_LazyLayer._tl_first_forward, self, *args, **kwargs)

    def _tl_first_forward(self, *args: Any, **kwargs: Any) -> Any:
        values, undo = self._tl_first_input(args, kwargs)
        fake = _fake(args, kwargs)
        try:
            return self.forward(*args, **kwargs)  # type: ignore[misc]  # now the real class's
        except Exception as e:
            _undo_now(undo)  # a failed first call leaves the layer as it was
            if isinstance(e, LazyError):
                raise
            mismatch = self._tl_dtype_mismatch(args, kwargs, e)
            if mismatch is not None:  # the same error on fake inputs (`tl.build`) as on real ones
                raise mismatch from e
            if fake:
                raise
            raise self._tl_unbuilt_error(
                values, f"its forward then failed on that input: {e}", "an input of the form the layer expects"
            ) from e

    def _tl_first_input(self, args: Any, kwargs: Any) -> tuple[dict[str, Any], Callable[[], None]]:
        """Apply the rules to the first input and build; returns the values and how to undo."""
        values = self._tl_infer(args, kwargs)
        if _observed.values is not None:
            _observed.values[id(self)] = values
        device = _first_device(args, kwargs)
        try:
            undo = _run_build(self, lambda deferred: self._tl_become(values, device, deferred), _fake(args, kwargs))  # type: ignore[arg-type]
        except Exception as e:  # what the real class's constructor raises (GroupNorm(0): a ZeroDivisionError)
            if isinstance(e, LazyError):
                raise
            if self._tl_skeleton() is None:  # no size at all builds it: the constructor's own arguments are wrong
                given = ", ".join(f"{k}={v!r}" for k, v in self._tl_args.items())
                raise ArgumentError(
                    f"`{_paths.module_path(self)}` ({type(self).__name__}): no input can build it with the "  # type: ignore[arg-type]
                    f"arguments it was constructed with ({given}); with {values} from this input, "
                    f"`{self._tl_cls.__name__}` raised {type(e).__name__}: {e}. Fix those arguments; the layer "
                    "is still unbuilt."
                ) from e
            reason = f"`{self._tl_cls.__name__}` cannot be built with it: {e}"
            raise self._tl_unbuilt_error(values, reason, "an input whose sizes suit the other arguments") from e
        return values, undo

    def _tl_unbuilt_error(self, values: dict[str, Any], reason: str, fix: str) -> ShapeError:
        """The first input gave `values`, which did not work out: the layer stays unbuilt."""
        sizes = ", ".join(f"{k}={v!r}" for k, v in values.items())
        return ShapeError(
            f"`{_paths.module_path(self)}` ({type(self).__name__}) took {sizes} from its first input, "  # type: ignore[arg-type]
            f"but {reason}. The layer is still unbuilt; pass {fix}."
        )

    def _tl_dtype_mismatch(self, args: Any, kwargs: Any, error: Exception) -> DtypeError | None:
        """Why a first forward failed, when its floating inputs are not in the layer's dtype.

        PyTorch's lazy layers build in their own dtype, then fail in the forward with the kernel's
        message (and stay built); here the layer stays unbuilt and the error says what to cast.
        """
        mine = self._tl_dtype()
        tensors = [t for t in tc.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        seen = sorted({str(t.dtype) for t in tensors if t.is_floating_point()})
        if not seen and re.search(r"dtype|scalar type|[Ii]nput type", str(error)):
            # integer inputs where the kernel wanted floats (`mat1 and mat2 must have the same dtype`);
            # only when the kernel said so: an Embedding's integer input is right
            seen = sorted({str(t.dtype) for t in tensors})
        if mine is None or not seen or seen == [str(mine)]:
            return None
        name = str(mine).removeprefix("torch.")
        return DtypeError(
            f"`{_paths.module_path(self)}` ({type(self).__qualname__}) holds {mine} parameters but its "  # type: ignore[arg-type]
            f"first input is {', '.join(seen)}. Cast the input (`x.to(torch.{name})`) or the layer "
            "(`layer.to(dtype)`, or `dtype=` at construction) first; the layer is still unbuilt."
        )

    def _tl_infer(self, args: Any, kwargs: Any) -> dict[str, Any]:
        try:
            named = inspect.signature(self._tl_cls.forward).bind(self, *args, **kwargs)
        except TypeError as e:
            raise ArgumentError(f"`{_paths.module_path(self)}` ({type(self).__qualname__}): {e}") from None  # type: ignore[arg-type]
        named.apply_defaults()
        arguments = dict(named.arguments)
        arguments.pop(next(iter(arguments)))  # self
        inputs = Inputs(tuple(args), kwargs, arguments)
        values: dict[str, Any] = {}
        for name, rule in self._tl_rules.items():
            try:
                values[name] = rule(inputs, self._tl_options)
            except Mismatch as m:
                raise ShapeError(
                    f"`{_paths.module_path(self)}` ({type(self).__qualname__}) takes `{name}` from "  # type: ignore[arg-type]
                    f"{rule.describe()}: expected {m.expected}, got {m.seen}. Pass an input of that "
                    "form; the layer is still unbuilt and usable."
                ) from None
            except LazyError:
                raise
            except Exception as e:  # a user's rule that does not fit this input (`x.shape[5]` of a 2-d x)
                raise ShapeError(
                    f"`{_paths.module_path(self)}` ({type(self).__qualname__}): the rule for `{name}` "  # type: ignore[arg-type]
                    f"({rule.describe()}) failed on the first input {_input_shapes(args, kwargs)}: "
                    f"{type(e).__name__}: {e}. Fix the rule or pass an input it fits; the layer is still unbuilt."
                ) from e
        return values

    def _tl_become(self, values: dict[str, Any], device: torch.device, deferred: bool) -> None:
        copies = self.__dict__.pop(_markers.SOURCE, None)
        key = _layout_key(type(self), values) if copies is not None and not deferred else None
        if copies is None or key is None:
            self._tl_cast_and_take(self._tl_new(values, device, deferred), deferred)
            return
        with copies.lock:  # one first member per size, even when copies get their first calls on two threads
            first = copies.first.get(key)
            if first is None:
                real = self._tl_new(values, device, deferred)
                if not any(t.is_meta for t in itertools.chain(real.parameters(), real.buffers())):
                    copies.first[key] = copy.deepcopy(real)  # what its copies take: its values as built, uncast
            else:  # a copy of a layer another copy was built from: its values, on this input's device
                real = copy.deepcopy(first)
                held = next(itertools.chain(real.parameters(), real.buffers()), None)
                if held is not None and held.device != torch.device(device) and self._tl_args.get("device") is None:
                    real.to(device)
        self._tl_cast_and_take(real, deferred)

    def _tl_new(self, values: dict[str, Any], device: torch.device, deferred: bool) -> nn.Module:
        """The real class constructed with the inferred `values` (drawing as eager construction draws)."""
        kwargs = dict(values)
        accepts = _parameters_of(self._tl_cls)
        if not deferred:
            if "device" in accepts and self._tl_args.get("device") is None:
                kwargs["device"] = device
            with torch.device(device):
                return self._tl_construct(kwargs, meta=False)
        return self._tl_construct(kwargs, meta=False)

    def _tl_cast_and_take(self, real: nn.Module, deferred: bool) -> None:
        me: nn.Module = self  # type: ignore[assignment]
        wanted = self._tl_dtype()  # the placeholders': `.double()` / `.to(dtype)` before the build counts
        # built in the dtype given at construction (or the default), then cast, as the eager program with
        # explicit sizes does (`nn.Linear(3, 4).double()` draws in float32: drawn in float64, it took other
        # words from the generator, and every layer after it differed)
        built = next(
            (t.dtype for t in itertools.chain(real.parameters(), real.buffers()) if t.is_floating_point()), None
        )
        if wanted is not None and built is not None and built != wanted:
            real.to(wanted)
        real.train(me.training)
        self._tl_carry_settings(real)
        _take_over(me, real, reuse_placeholders=not deferred)

    def _tl_carry_settings(self, real: nn.Module) -> None:
        """What the user set before the first call on what the layer knew already (`ln.eps = 0.5`,
        `mha.batch_first = True`) holds on the built layer, as on eager's (it came back to the default)."""
        me: nn.Module = self  # type: ignore[assignment]
        stand_ins = dict(me.named_modules())
        built = dict(real.named_modules())
        for prefix, values in self._tl_learn()[3].items():
            stand_in, target = stand_ins.get(prefix), built.get(prefix)
            if stand_in is None or target is None or (prefix and not isinstance(stand_in, _Unbuilt)):
                continue  # (a module the user put in a stand-in's place is not a stand-in's settings)
            for name, value in values.items():
                mine = stand_in.__dict__.get(name, _MISSING)
                if mine is not _MISSING and not _same_value(mine, value):
                    setattr(target, name, mine)

    def _save_to_state_dict(self, destination: dict[str, Any], prefix: str, keep_vars: bool) -> None:
        _save_unbuilt(self, destination, prefix, keep_vars)  # type: ignore[arg-type]

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        mine = {
            k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix) and isinstance(v, torch.Tensor)
        }
        if not mine or any(is_lazy(v) for v in mine.values()):
            # nothing to take sizes from (no state, or an unbuilt layer's placeholders): the layer
            # stays unbuilt and torch matches the keys, as it does for its own lazy layers
            return nn.Module._load_from_state_dict(self, state_dict, prefix, *args)  # type: ignore[arg-type]
        if self.__dict__.get(_markers.SLOT) is not None:  # made under `tl.deferred()`: shaped there, then the
            self._tl_build_from_state(mine, prefix)  # load is recorded onto its deferred tensors (was refused)
            return self._load_from_state_dict(state_dict, prefix, *args)
        values = self._tl_solve(mine, prefix)
        device = next((p.device for p in nn.Module.parameters(self)), torch.get_default_device())  # type: ignore[arg-type]
        _run_build(self, lambda deferred: self._tl_become(values, device, deferred), False)  # type: ignore[arg-type]
        return self._load_from_state_dict(state_dict, prefix, *args)

    def _tl_build_with(self, values: dict[str, Any]) -> None:
        """Shape this layer from constructor values inferred elsewhere (a meta twin), deferred."""
        _run_build(self, lambda deferred: self._tl_become(values, torch.get_default_device(), deferred), True)  # type: ignore[arg-type]

    def _tl_build_from_state(self, mine: dict[str, torch.Tensor], prefix: str) -> None:
        """Shape this layer from state tensors (a checkpoint's), deferred: values come later."""
        values = self._tl_solve(mine, prefix)
        device = torch.get_default_device()
        _run_build(self, lambda deferred: self._tl_become(values, device, deferred), True)  # type: ignore[arg-type]

    def _tl_solve(self, mine: dict[str, torch.Tensor], prefix: str) -> dict[str, Any]:
        """The constructor arguments under which the real class has these tensor shapes."""
        sizes_seen = {int(s) for t in mine.values() for s in t.shape}
        factors = {v for v in self._tl_args.values() if isinstance(v, int) and not isinstance(v, bool) and v > 1}
        sizes = sorted(sizes_seen | {s * f for s in sizes_seen for f in factors})
        shapes = sorted({tuple(int(s) for s in t.shape[i:]) for t in mine.values() for i in range(t.dim())})
        choices: list[list[Any]] = []
        for rule in self._tl_rules.values():
            if isinstance(rule, Trailing):  # of the rank the layer was given (`normalized_ndim`), as a first input
                rank = self._tl_options.get(rule.option, 1)
                choices.append([shape for shape in shapes if len(shape) == rank])
            else:
                optional = rule.probes() == (None,)
                choices.append([None, *sizes] if optional else list(sizes))
        partial: list[dict[str, Any]] = []  # fitting the keys both have (a state dict missing some, or with more)
        fitted: list[int] = []  # how many of the given tensors each of those has a place for
        layouts: set[tuple[tuple[str, tuple[int, ...]], ...]] = set()  # what they build (`kdim=None` == `kdim=E`)
        for combo in itertools.product(*choices):
            values = dict(zip(self._tl_rules, combo))
            skeleton = self._tl_skeleton(values)
            if skeleton is None:
                continue
            expected = {k: tuple(v.shape) for k, v in skeleton.state_dict().items()}
            if expected.keys() == mine.keys() and all(expected[k] == tuple(mine[k].shape) for k in mine):
                return values
            common = expected.keys() & mine.keys()
            layout = tuple(sorted(expected.items()))
            if common and all(expected[k] == tuple(mine[k].shape) for k in common) and layout not in layouts:
                layouts.add(layout)  # values that build the same tensors are one answer, not two
                partial.append(values)
                fitted.append(len(common))
        seen = {k: tuple(v.shape) for k, v in mine.items()}
        if len(partial) == 1:  # the keys it has decide the sizes; `load_state_dict` reports the rest
            return partial[0]
        if partial and fitted.count(max(fitted)) == 1:  # one layout places more of the given tensors than any other
            return partial[fitted.index(max(fitted))]  # (MultiheadAttention's q/k/v_proj_weight decide kdim/vdim)
        if partial:
            raise ShapeError(
                f"`{prefix.rstrip('.') or type(self).__qualname__}` ({type(self).__qualname__}): the state dict's "
                f"tensors {seen} fit more than one value of {', '.join(f'`{n}`' for n in self._tl_rules)} (it lacks "
                "tensors that would decide them). Load a state dict with all of the layer's tensors, or build the "
                "layer first (`tl.build(model, example)`)."
            )
        ranks = "".join(
            f" (of {rank} dims: `{r.option}={rank}`)"
            for r in self._tl_rules.values()
            if isinstance(r, Trailing)
            for rank in [self._tl_options.get(r.option, 1)]
        )
        raise ShapeError(
            f"`{prefix.rstrip('.') or type(self).__qualname__}` ({type(self).__qualname__}): no "
            f"value of {', '.join(f'`{n}`' for n in self._tl_rules)}{ranks} gives the tensors {seen} of "
            "the state dict. Check that the state dict comes from the same kind of layer"
            f"{', with as many normalized dims' if ranks else ''}."
        )

    def extra_repr(self) -> str:
        parts = []
        for name in _parameters_of(self._tl_cls):
            if name in self._tl_rules:
                parts.append(f"{name}=?")
            elif name in self._tl_args and name not in ("device", "dtype"):
                parts.append(f"{name}={self._tl_args[name]!r}")
        parts += [f"{k}={v!r}" for k, v in self._tl_options.items() if v != self._tl_defaults[k]]
        return ", ".join(parts)

    def _apply(self, fn: Callable[..., Any], recurse: bool = True) -> Any:
        """`.to()`, `.half()`, `.cpu()` on the unbuilt layer: the placeholders, as `nn.Module` casts them (the real
        class's own `_apply`, RNNs' among them, reads state its constructor sets, which has not run). Inside a
        `tl.deferred()` block too they stay placeholders, cast outside its modes (the fake mode refused unbuilt
        buffers, and made plain fake tensors of the parameters, which lost what the user had set on them)."""
        with tc.disable_current_modes():
            return nn.Module._apply(self, fn, recurse)  # type: ignore[arg-type]

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state[_markers.SLOT] = None
        state.pop(_markers.SOURCE, None)
        return state

    def __deepcopy__(self, memo: dict[int, Any]) -> Any:
        """A copy that builds to the values this layer builds to (eager's copy of a built layer carries its values:
        `nn.TransformerEncoder` clones its layer N times): the first of them a real input builds draws, the
        others copy what it drew."""
        reduced = self.__reduce_ex__(4)
        copied = copy._reconstruct(self, memo, *reduced)  # type: ignore[attr-defined]  # `copy.deepcopy`'s own step
        copied.__dict__[_markers.SOURCE] = self.__dict__.setdefault(_markers.SOURCE, _Copies())
        return copied

    def __setstate__(self, state: dict[str, Any]) -> None:
        nn.Module.__setstate__(self, state)  # type: ignore[arg-type]
        self.__dict__[_markers.SLOT] = _slot_for_new_module()


def relink_ties(root: nn.Module) -> None:
    """Tensors tied to another lazy layer's placeholder before either was built (`b.weight = a.weight`) take what
    that layer built in its place. A first call swaps the placeholder object itself into the tensor, so ties
    follow; a deferred build makes a new tensor, which left the tie holding the stale placeholder."""
    for owner in root.modules():
        for slots in (owner._parameters, owner._buffers):
            for name, t in list(slots.items()):
                if not (isinstance(t, _Placeholder) and _left_behind(t)):
                    continue
                layer, path = t.__dict__[_markers.WHERE][0](), t.__dict__[_markers.WHERE][1]
                built = _state_tensors(layer).get(path)
                if built is not None and not isinstance(built, _Placeholder):
                    slots[name] = built  # type: ignore[assignment]


def _state_tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    """Path -> tensor of every parameter and buffer of `module`, tied ones under each of their paths."""
    return dict(
        itertools.chain(module.named_parameters(remove_duplicate=False), module.named_buffers(remove_duplicate=False))
    )


class _Copies:
    """An unbuilt lazy layer and its deep copies: by the sizes a real input gave, the first of them built (as built,
    before any cast), whose values the others take. Deep copies share it; a pickled layer gets none."""

    def __init__(self) -> None:
        self.first: dict[tuple[Any, ...], nn.Module] = {}
        self.lock = threading.Lock()

    def __deepcopy__(self, memo: dict[int, Any]) -> _Copies:
        return self


_Learnt = tuple[
    list[tuple[str, str, str, bool, torch.dtype, bool]], frozenset[str], frozenset[str], dict[str, dict[str, Any]]
]
_MODULE_ATTRIBUTES = frozenset(vars(nn.Module()))  # what every module holds: not the class's own attributes
_MISSING = object()
_SIMPLE = (int, float, bool, str, type(None), torch.dtype, torch.device)


def _plain_value(value: Any) -> bool:
    """A value safe to hand out before the layer is built: immutable, or a function (an activation); not a device
    (the skeletons are all on meta: `self.device` would read "meta")."""
    if isinstance(value, tuple):
        return all(_plain_value(v) for v in value)
    if isinstance(value, torch.device) or (isinstance(value, str) and value == "meta"):
        return False
    return isinstance(value, _SIMPLE) or isinstance(value, (types.FunctionType, types.BuiltinFunctionType))


def _common_multiple(args: dict[str, Any]) -> int | None:
    """The least common multiple of the constructor's integer arguments above 1 (heads, groups), within reason."""
    ints = [v for v in args.values() if isinstance(v, int) and not isinstance(v, bool) and v > 1]
    common = math.lcm(*ints) if ints else None
    return common if common is not None and common <= 1 << 20 else None


def _unlike(values: dict[str, Any]) -> dict[str, Any]:
    """Other sizes for a second skeleton: each size doubled (what divided heads or groups still does), each optional
    size (None) given."""
    sizes = [v for v in values.values() if isinstance(v, int)] + [
        s for v in values.values() if isinstance(v, tuple) for s in v
    ]
    given = 2 * max(sizes, default=1) + 1

    def other(v: Any) -> Any:
        if v is None:
            return given
        if isinstance(v, tuple):
            return tuple(2 * s for s in v)
        return 2 * v

    return {name: other(v) for name, v in values.items()}


def _same_value(a: Any, b: Any) -> bool:
    return a is b or (type(a) is type(b) and not callable(a) and bool(a == b))


def _unbuilt_at(root: nn.Module, path: str) -> nn.Module:
    node = root
    for part in path.split("."):
        child = node._modules.get(part)
        if child is None:
            child = _Unbuilt()
            node._modules[part] = child
        node = child
    return node


def _take_over(me: nn.Module, real: nn.Module, reuse_placeholders: bool) -> None:
    """`me` becomes `real`: its state, its class; placeholders become the real parameters and buffers.

    What the user set on a placeholder (`requires_grad`, attributes, hooks on the tensor) goes to
    the tensor that takes its place: the placeholder object itself where it can be reused (so
    optimizers and other holders of it follow), else the new tensor.
    """
    held = _state_tensors(me)
    theirs = _state_tensors(real).keys()

    def stands_in(path: str, t: torch.Tensor) -> bool:
        # this layer's placeholder (another layer's is a tie: `b.weight = a.weight` before either is built), or
        # one cast inside a block (a plain fake tensor of shape (0,)) where the real class has a tensor
        if isinstance(t, _Placeholder):
            where = t.__dict__.get(_markers.WHERE)
            return where is None or where[0]() is me
        return path in theirs and tc.is_fake(t) and tuple(t.shape) == (0,)

    placeholders = {path: t for path, t in held.items() if stands_in(path, t)}
    # parameters the real class makes where the layer held others (MultiheadAttention's q/k/v_proj_weight for its
    # in_proj_weight, by the key/value sizes) follow a freeze of all of them (`layer.requires_grad_(False)`)
    held_params = {path: t for path, t in placeholders.items() if isinstance(t, nn.Parameter)}
    vanished = [t for path, t in held_params.items() if path not in theirs] or list(held_params.values())
    frozen = bool(vanished) and not any(t.requires_grad for t in vanished)
    # tensors the user put in a placeholder's place before the build (`head.weight = wte.weight`: a tie), or
    # registered on the unbuilt layer (`layer.scale = nn.Parameter(...)`), stay: in eager they came after
    # construction
    assigned = {path: t for path, t in held.items() if not stands_in(path, t)}
    if reuse_placeholders:
        drop_parameter_caches(real)
    for prefix, owner in real.named_modules():
        for slots in (owner._parameters, owner._buffers):
            for name, t in list(slots.items()):
                path = f"{prefix}.{name}" if prefix else name
                if path in assigned:
                    slots[name] = assigned[path]  # type: ignore[assignment]
                    continue
                ph = placeholders.get(path)
                if t is not None and ph is None and frozen and slots is owner._parameters:
                    t.requires_grad_(False)
                if t is None or ph is None:
                    continue
                # (a cast placeholder is a fake tensor: its own attributes, `constant` among them, stay its own)
                fake_own = _deferred.fake_attrs() if not isinstance(ph, _Placeholder) else ()
                carried = TensorState.of(ph, internal={_markers.WHERE, *fake_own})
                if reuse_placeholders and isinstance(ph, _Placeholder):
                    if not (weakref.getweakrefcount(t) or weakref.getweakrefcount(ph)):
                        with tc.disable_torch_function_subclass():
                            torch.utils.swap_tensors(ph, t)  # the placeholder object becomes the tensor
                        ph.__dict__.pop(_markers.WHERE, None)
                        slots[name] = t = ph  # type: ignore[assignment]
                carried.give(t)
    for path, t in assigned.items():  # the ones the real class does not have: registered where they were
        if path in theirs:
            continue
        owner_path, _, name = path.rpartition(".")
        try:
            owner = real.get_submodule(owner_path)
            source = me.get_submodule(owner_path)
        except AttributeError:
            continue
        if isinstance(t, nn.Parameter):
            owner.register_parameter(name, t)
        else:
            owner.register_buffer(name, t, persistent=name not in source._non_persistent_buffers_set)
    guarded = _deferred.has_guard(real)
    _deferred.drop_guard(real)
    state = dict(real.__dict__)
    for key in _HOOK_ATTRS:
        mine = me.__dict__.get(key)
        if isinstance(mine, dict):
            for handle_id, hook in state[key].items():
                mine[handle_id] = hook
            state[key] = mine
    me.__dict__.clear()
    me.__dict__.update(state)
    me.__class__ = type(real)
    refresh_parameter_caches(me)
    if guarded:
        _deferred.add_guard(me)


_SIGNATURES: dict[type, dict[str, inspect.Parameter]] = {}
_LAYOUTS: dict[tuple[Any, ...], _Learnt] = {}


def _layout_key(cls: type, args: dict[str, Any]) -> tuple[Any, ...] | None:
    """What a skeleton of `cls` built from `args` depends on; None where that cannot be told.

    The arguments by value and type (`1` and `True` differ; a repr can hide a difference, or an
    address reused after garbage collection), and the defaults that reach the constructor: the
    default dtype and device (the skeleton is built on the meta device, but a class may read them).
    The key holds the arguments themselves, so an object keyed by identity cannot be freed and its
    id reused while the entry lives.
    """

    def freeze(value: Any) -> Any:
        if isinstance(value, (list, tuple)):
            return type(value), tuple(freeze(v) for v in value)
        if isinstance(value, dict):
            return type(value), tuple((k, freeze(v)) for k, v in sorted(value.items(), key=repr))
        hash(value)  # unhashable: TypeError, and the layout is not cached
        return type(value), value

    try:
        frozen = freeze(args)
    except TypeError:
        return None
    return cls, frozen, torch.get_default_dtype(), torch.get_default_device()


def _parameters_of(cls: type) -> dict[str, inspect.Parameter]:
    if cls not in _SIGNATURES:
        candidates = [cls.__init__, *typing.get_overloads(cls.__init__)]  # type: ignore[misc]
        for init in candidates:  # the first signature that names its arguments
            params = dict(inspect.signature(init).parameters)
            params.pop(next(iter(params)))  # self
            if not any(p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in params.values()):
                break
        _SIGNATURES[cls] = params
    return _SIGNATURES[cls]


def lazy(cls: type[M], /, **rules: Any) -> type[M]:
    """A lazy version of any module class: named constructor arguments come from the first input.

    Each rule is a callable taking the forward's arguments, like
    `lambda x, *rest: x.shape[-1]`. The new class takes the other constructor
    arguments, with their names and defaults; after its first call (or a
    `load_state_dict`) the object is a plain `cls`.

    >>> import torch, torchlazy as tl
    >>> LazyGRU = tl.lazy(torch.nn.GRU, input_size=lambda x, *rest: x.shape[-1])
    >>> gru = LazyGRU(hidden_size=8, batch_first=True)
    >>> gru
    LazyGRU(input_size=?, hidden_size=8, batch_first=True)
    >>> _ = gru(torch.zeros(2, 5, 3))
    >>> type(gru).__name__, gru.input_size
    ('GRU', 3)
    """
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise ArgumentError(
            f"`tl.lazy(cls, ...)` takes a torch.nn.Module subclass (the class, not an instance), "
            f"not {type(cls).__name__} `{cls!r}`."
        )
    if not rules:
        raise ArgumentError(
            f"`tl.lazy({getattr(cls, '__name__', cls)})` needs at least one rule saying which constructor "
            "argument comes from the input, e.g. `tl.lazy(nn.LSTM, input_size=lambda x, *rest: x.shape[-1])`."
        )
    module = sys._getframe(1).f_globals.get("__name__", __name__)
    return make_lazy(
        cls,
        {name: as_rule(r) for name, r in rules.items()},
        f"Lazy{cls.__name__}",
        module,
    )


def make_lazy(cls: type[M], rules: dict[str, Rule], name: str, module: str) -> type[M]:
    params = _parameters_of(cls)
    unknown = [r for r in rules if r not in params]
    if unknown:
        raise ArgumentError(
            f"`tl.lazy({cls.__name__}, ...)`: {', '.join(map(repr, unknown))} is not an argument of "
            f"`{cls.__name__}.__init__` (it takes {', '.join(params)})."
        )
    passed_apart = [
        n for n, p in params.items()
        if p.kind is p.POSITIONAL_ONLY or (n not in rules and p.kind is p.VAR_POSITIONAL)
    ]  # fmt: skip
    if passed_apart:  # the lazy class passes every argument by name when it builds
        raise ArgumentError(
            f"`tl.lazy({cls.__name__}, ...)`: `{cls.__name__}.__init__` takes {', '.join(map(repr, passed_apart))} "
            "positionally only (`*args` or before `/`), and the lazy class passes every argument by name when it "
            f"builds. Wrap `{cls.__name__}` in a module whose constructor takes named arguments, or use "
            "`tl.LazyModule` and build it in `build()`."
        )
    # Arguments with a default are keyword-only: the inferred ones are gone, so eager's positional
    # order (`nn.Linear(3, 4)`) would shift every value into the wrong argument (`bias=4`).
    kept = [
        p.replace(kind=p.KEYWORD_ONLY) if p.default is not p.empty and p.kind is p.POSITIONAL_OR_KEYWORD else p
        for n, p in params.items()
        if n not in rules
    ]
    defaults: dict[str, Any] = {}
    for rule in rules.values():
        options = getattr(rule, "options", None)
        if options is not None:
            defaults.update(options())
    kept += [inspect.Parameter(k, inspect.Parameter.KEYWORD_ONLY, default=v) for k, v in defaults.items()]
    kept.sort(key=lambda p: p.kind)
    signature = inspect.Signature(kept)
    doc = (
        f"Lazy `{cls.__module__}.{cls.__qualname__}`: {', '.join(f'`{n}` from {r.describe()}' for n, r in rules.items())}.\n\n"
        f"Takes the other arguments of `{cls.__qualname__}`; becomes a plain `{cls.__qualname__}` at its first input."
    )
    namespace = {
        "_tl_cls": cls,
        "_tl_rules": rules,
        "_tl_signature": signature,
        "_tl_defaults": defaults,
        "__module__": module,
        "__qualname__": name,
        "__doc__": doc,
        "__signature__": signature,
    }
    if issubclass(cls, nn.RNNBase):  # `self.rnn.flatten_parameters()` at the top of a forward
        namespace["flatten_parameters"] = _nothing_to_flatten
    return type(name, (_LazyLayer, cls), namespace)  # type: ignore[return-value]


def _nothing_to_flatten(self: nn.Module) -> None:
    """Before its first call an RNN holds no weights to compact (the real class's method read state its constructor
    had not set: a raw AttributeError); once built, the real `flatten_parameters` runs."""


# -- Keras-style lazy modules -----------------------------------------------------


class _NoBuild(LazyError, NotImplementedError):
    """A `tl.LazyModule` subclass without `build`."""


_INIT_DEPTH = "_tl_init_depth"  # how deep a `LazyModule` subclass's constructors run (the slot waits for 0)


class LazyModule(nn.Module):
    """A module that creates its state from its first inputs: implement `build`.

    `build(*inputs, **kwargs)` receives the first forward's arguments (real,
    or fake inside `tl.build`/`tl.summary`) and creates sub-modules and
    parameters; `forward` is written as usual. After the first call no
    torchlazy code runs.

    >>> import torch, torchlazy as tl
    >>> class Block(tl.LazyModule):
    ...     def __init__(self, hidden):
    ...         super().__init__()
    ...         self.hidden = hidden
    ...     def build(self, x):
    ...         self.proj = torch.nn.Linear(x.shape[-1], self.hidden)
    ...     def forward(self, x):
    ...         return self.proj(x).relu()
    >>> block = Block(16)
    >>> block(torch.ones(4, 7)).shape
    torch.Size([4, 16])
    >>> block.proj.in_features
    7
    """

    def __init__(self) -> None:
        super().__init__()
        self.__dict__[_markers.ORDER] = next(_order)
        if not self.__dict__.get(_INIT_DEPTH):  # constructed directly: its place in construction order is now
            self.__dict__[_markers.SLOT] = _slot_for_new_module()
        self.__dict__[_markers.BUILD_HOOK] = self.register_forward_pre_hook(
            _build_lazy_module, with_kwargs=True, prepend=True
        )

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """A subclass's `__init__` takes its place in construction order when it returns (its own layers first,
        then `build`'s, as a real first call orders them): under `tl.deferred()`, `build`'s draws came before the
        layers the constructor made after `super().__init__()`."""
        super().__init_subclass__(**kwargs)
        init = cls.__dict__.get("__init__")
        if init is None and cls.__init__ is not LazyModule.__init__ and not hasattr(cls.__init__, "__wrapped__"):
            init = cls.__init__  # a plain mixin's constructor first in the MRO (`class B(Mixin, tl.LazyModule)`)
        if init is None:
            return

        @functools.wraps(init)
        def __init__(self: LazyModule, *args: Any, **kw: Any) -> None:
            depth = self.__dict__.get(_INIT_DEPTH, 0)
            self.__dict__[_INIT_DEPTH] = depth + 1
            try:
                init(self, *args, **kw)
            finally:
                self.__dict__[_INIT_DEPTH] = depth
            if depth == 0:  # the outermost constructor returned
                del self.__dict__[_INIT_DEPTH]
                self.__dict__[_markers.SLOT] = _slot_for_new_module()

        cls.__init__ = __init__  # type: ignore[method-assign]

    def build(self, *args: Any, **kwargs: Any) -> None:
        raise _NoBuild(
            f"`{type(self).__qualname__}` subclasses `tl.LazyModule` but does not define "
            "`build(self, *inputs)`: create its layers there from the first inputs."
        )

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        if _markers.BUILD_HOOK in self.__dict__:  # not built: keys for what `build` creates have no place yet
            held = {*self._parameters, *self._buffers, *self._modules}
            theirs = sorted(
                k for k in state_dict if k.startswith(prefix) and k[len(prefix) :].split(".")[0] not in held
            )
            if theirs:
                shown = listed(theirs, 4)
                raise NotBuiltError(
                    f"`{_paths.module_path(self)}` ({type(self).__qualname__}) is a `tl.LazyModule` whose "
                    f"`build` has not run, so the state dict's {shown} have no place yet: `build` creates them "
                    "from the first input, which a state dict does not give. Call the model once, or "
                    "`tl.build(model, tl.Spec(*input_shape))`, then `load_state_dict`."
                )
        super()._load_from_state_dict(state_dict, prefix, *args)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        if _markers.SLOT in state:
            state[_markers.SLOT] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        if _markers.SLOT in state:
            self.__dict__[_markers.SLOT] = _slot_for_new_module()


def _build_lazy_module(module: LazyModule, args: Any, kwargs: Any) -> None:
    _eagerly(_build_lazy_module_now, module, args, kwargs)


def _build_lazy_module_now(module: LazyModule, args: Any, kwargs: Any) -> None:
    def build(deferred: bool) -> None:
        module.build(*args, **kwargs)
        module.__dict__.pop(_markers.BUILD_HOOK).remove()
        for key in (_markers.SLOT, _markers.ORDER):
            module.__dict__.pop(key, None)

    _run_build(module, build, _fake(args, kwargs))
