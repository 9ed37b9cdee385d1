"""Compute and memory before allocation: FLOPs per module, and the peak of a training step.

Both run the model on fake tensors (shapes, dtypes, devices; no storage, no
arithmetic) in a throwaway setting that leaves the model exactly as it was:

- lazy layers are shaped inside a transaction that is always rolled back;
- the model's parameters and buffers are swapped, for the time of the run
  (`torch.func.functional_call`), for fresh fake tensors of the same shapes,
  dtypes and devices (tied ones stay tied), so gradients, optimizer state and
  buffer updates land on those, never on the model.

FLOPs are PyTorch's own count (`torch.utils.flop_counter.FlopCounterMode`,
its formulas and its module hierarchy), mapped onto module paths.

Memory is the sum of the bytes of the live (fake) storages, followed op by op:
every storage an op returns is counted once, with its `nbytes`, until a weakref
finalizer sees it die. A training step runs for real on the fake tensors
(optimizer constructed on the fake parameters, a first step to create its
state, then the measured step: forward, loss, backward, `step()`,
`zero_grad(set_to_none=True)`), so the peak is what the same step would reach on
the device, as PyTorch's `MemTracker` (in torch.distributed's tools) measures it
(storage bytes, no allocator rounding or fragmentation).
"""

from __future__ import annotations

import contextlib
import gc
import inspect
import weakref
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
from torch import nn
from torch.nn.modules import module as _module
from torch.utils.weak import WeakIdKeyDictionary

from . import _deferred, _lazy, _paths
from . import _torch_compat as tc
from ._errors import LazyError, ShapeError
from ._infer import (
    FoldConstants,
    fake_forward,
    mode_of,
    refuse_fsdp_sharded,
    refuse_torch_lazy,
    tracking_modules,
)
from ._isolate import attributes_kept, fresh_fakes
from ._spec import Spec, to_fake

__all__ = ["CostError", "FlopCounts", "MemoryEstimate", "count_flops", "estimate_memory"]


class CostError(LazyError, ValueError):
    """A bad argument to a cost estimate (optimizer, loss, mode, autocast dtype)."""


OPTIMIZERS: dict[str, type[torch.optim.Optimizer]] = {
    "adamw": torch.optim.AdamW,
    "adam": torch.optim.Adam,
    "sgd": torch.optim.SGD,
    "adagrad": torch.optim.Adagrad,
    "rmsprop": torch.optim.RMSprop,
    "adamax": torch.optim.Adamax,
    "nadam": torch.optim.NAdam,
    "radam": torch.optim.RAdam,
    "adadelta": torch.optim.Adadelta,
}
CATEGORIES = ("params", "buffers", "inputs", "grads", "optimizer", "activations", "temporary")


# -- the throwaway setting ---------------------------------------------------------------------


@dataclass
class _Session:
    module: nn.Module
    mode: Any
    params: dict[str, torch.Tensor]  # every name (tied ones too) -> its fresh fake tensor
    buffers: dict[str, torch.Tensor]
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    paths: dict[int, str]

    def forward(self) -> Any:
        return self.module(*self.args, **self.kwargs)  # the session's fake tensors are in place

    def trainable(self) -> list[torch.Tensor]:
        return list({id(p): p for p in self.params.values() if p.requires_grad}.values())


def _check_module(module: Any, what: str) -> None:
    if not isinstance(module, nn.Module):
        raise CostError(f"`{what}` takes a torch.nn.Module, not {type(module).__name__}: pass the model first.")


@contextlib.contextmanager
def _session(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Iterator[_Session]:
    """The model, shaped if lazy, with fresh fake tensors in place of its own; undone on exit."""
    if not args and not kwargs:
        raise ShapeError(
            "a cost estimate (`tl.summary(..., flops=True)`, `tl.estimate_memory`) needs example inputs: pass what "
            "the forward takes, as `tl.Spec(*shape, dtype=...)` or tensors, e.g. `tl.summary(model, "
            "tl.Spec(8, 3, 224, 224), flops=True)` or `tl.estimate_memory(model, tl.Spec(8, 3, 224, 224))`."
        )
    _paths.remember_paths(module)
    # nothing the run does stays on the model: what its forwards set (`self.last = y`, a buffer registered on a
    # first call), lazy layers shaped, gradients
    with attributes_kept(module), _lazy.transaction(rollback=True), _deferred.quiet():
        if not _lazy.is_built(module):
            with torch.no_grad():
                fake_forward(module, args, kwargs)  # shapes the lazy layers (fake), for this block only
        mode = mode_of(module)
        params, buffers = fresh_fakes(module, mode)
        fargs, fkwargs = to_fake((args, kwargs), mode)
        paths = {id(m): name for name, m in module.named_modules(remove_duplicate=False)}
        grads = {id(p): (p, p.grad) for p in module.parameters()}
        try:
            # the fake tensors stay in place for the whole step: a reentrant checkpoint's backward runs the
            # module again, and with the model's own parameters back it put fake gradients on them
            with tc.tensors_in_place(module, {**params, **buffers}), mode:
                with FoldConstants(mode), tc.quiet_fake_kernel_errors():
                    yield _Session(module, mode, params, buffers, fargs, fkwargs, paths)
        finally:
            for p, grad in grads.values():
                if p.grad is not grad:
                    p.grad = grad


@contextlib.contextmanager
def _naming_failures(module: nn.Module) -> Iterator[None]:
    """Errors of the model's own code on the examples become a `ShapeError` naming the module."""
    with tracking_modules() as stack:
        try:
            yield
        except LazyError:
            raise
        except tc.data_dependent_errors() as e:
            culprit = stack[-1] if stack else module
            path = _paths.known_path(culprit) or "the model's root"
            raise CostError(
                f"`{path}` ({type(culprit).__name__}) reads a tensor's value in its forward ({e}; `BatchNorm` with "
                "`momentum=None` reads `num_batches_tracked`, say): estimates run on fake tensors, which have shapes "
                "but no values. Estimate a variant that does not read values (a fixed `momentum`), or measure it."
            ) from e
        except Exception as e:
            culprit = stack[-1] if stack else module
            path = _paths.known_path(culprit) or "the model's root"
            raise ShapeError(
                f"`{path}` ({type(culprit).__name__}) fails on the example inputs: {str(e).rstrip('.')}. Check the examples' shapes "
                "and dtypes against what the forward expects (`tl.summary(model, ...)` shows each module's shapes)."
            ) from e


def _default_loss(out: Any) -> torch.Tensor:
    loss = getattr(out, "loss", None) if not isinstance(out, dict) else out.get("loss")
    if isinstance(loss, torch.Tensor) and loss.requires_grad:
        return loss
    for t in tc.tree_leaves(out):
        if isinstance(t, torch.Tensor) and t.is_floating_point() and t.requires_grad:
            return t.sum()
    raise CostError(
        "the forward returned no floating tensor that requires grad, so there is nothing to backpropagate: "
        "pass `loss=lambda out: ...` returning a scalar, or `mode='inference'`."
    )


def _loss_of(loss: Callable[[Any], torch.Tensor] | None, out: Any) -> torch.Tensor:
    value = _default_loss(out) if loss is None else loss(out)
    if not isinstance(value, torch.Tensor) or value.numel() != 1:
        seen = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
        raise CostError(f"`loss` must return a scalar tensor, returned {seen}: reduce it, e.g. `.mean()`.")
    return value


# -- FLOPs -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FlopCounts:
    """FLOPs of one forward (per module path, inclusive of submodules) and of forward + backward."""

    forward: int
    train: int
    by_module: dict[str, int]  # path ("" is the root) -> forward FLOPs, submodules included


def count_flops(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> FlopCounts:
    """Count FLOPs as `FlopCounterMode` does, on fake tensors (forward, then forward + backward)."""
    from torch.utils.flop_counter import FlopCounterMode

    _check_module(module, "count_flops")  # (called by `tl.summary`, which unwrapped and checked the module)
    with _session(module, args, kwargs) as s, _naming_failures(module):
        counter = FlopCounterMode(display=False)
        with counter:
            out = s.forward()
            forward = counter.get_total_flops()
            by_name = {name: sum(ops.values()) for name, ops in counter.get_flop_counts().items()}
            # a backward runs wherever the output needs one: trainable parameters, or an input that asks for its
            # gradient (saliency, adversarial examples) through a frozen model
            if any(isinstance(t, torch.Tensor) and t.requires_grad for t in tc.tree_leaves(out)):
                _loss_of(None, out).backward()
            train = counter.get_total_flops()
        del out
    root = type(module).__name__
    by_module = {}
    for name, flops in by_name.items():
        if name == root:
            by_module[""] = flops
        elif name.startswith(root + "."):
            by_module[name[len(root) + 1 :]] = flops
    return FlopCounts(forward, train, by_module)


# -- memory ------------------------------------------------------------------------------------


class _LiveBytes(tc.DispatchModeBase):  # type: ignore[misc,valid-type]
    """Bytes of the live storages created under it, by category; the peak and what made it up."""

    @classmethod
    def _should_skip_dynamo(cls) -> bool:
        return False

    def __init__(self) -> None:
        super().__init__()
        self.seen: WeakIdKeyDictionary = WeakIdKeyDictionary()  # storage -> [nbytes, category, owner, weakref]
        self.now = dict.fromkeys(CATEGORIES, 0)
        self.total = 0
        self.peak = 0
        self.at_peak = dict(self.now)
        self.phase = "params"
        self.peak_phase = ""
        self.peak_module = ""
        self.category = "params"
        self.modules: list[str] = []  # paths of the modules whose forward runs

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for t in tc.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.track(t, self.category)
        return out

    def track(self, t: torch.Tensor, category: str) -> None:
        try:
            st = t.untyped_storage()
        except (NotImplementedError, RuntimeError):  # sparse and other layouts without one storage
            return
        info = self.seen.get(st)
        if info is not None:
            return
        nbytes = int(st.nbytes())
        info = [nbytes, category, self.modules[-1] if self.modules else "", None]
        info[3] = weakref.ref(st, partial(self._free, info))
        self.seen[st] = info
        self._add(category, nbytes)

    def _free(self, info: list[Any], _ref: Any) -> None:
        self.now[info[1]] -= info[0]
        self.total -= info[0]

    def _add(self, category: str, nbytes: int) -> None:
        self.now[category] += nbytes
        self.total += nbytes
        if self.total > self.peak:
            self.peak = self.total
            self.at_peak = dict(self.now)
            self.peak_phase = self.phase
            self.peak_module = self.modules[-1] if self.modules else ""

    def recategorize(self, t: torch.Tensor, category: str) -> None:
        try:
            st = t.untyped_storage()
        except (NotImplementedError, RuntimeError):  # a sparse gradient (`Embedding(sparse=True)`): as `track`
            return
        info = self.seen.get(st)
        if info is None:
            self.track(t, category)
        elif info[1] != category:
            self.now[info[1]] -= info[0]
            self.now[category] += info[0]
            info[1] = category

    def reset_peak(self) -> None:
        self.peak = self.total
        self.at_peak = dict(self.now)
        self.peak_phase = self.phase
        self.peak_module = ""

    def live_by_owner(self, category: str) -> dict[str, int]:
        out: dict[str, int] = {}
        for info in list(self.seen.values()):
            if info[1] == category and info[3]() is not None:
                out[info[2]] = out.get(info[2], 0) + info[0]
        return out


@contextlib.contextmanager
def _module_stack(tracker: _LiveBytes, paths: dict[int, str]) -> Iterator[None]:
    def push(m: nn.Module, args: Any) -> None:
        tracker.modules.append(paths.get(id(m), tracker.modules[-1] if tracker.modules else ""))

    def pop(m: nn.Module, args: Any, out: Any) -> None:
        if tracker.modules:
            tracker.modules.pop()

    handles = [_module.register_module_forward_pre_hook(push), _module.register_module_forward_hook(pop)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes at the peak of one steady-state training step (or of a forward, for inference).

    The breakdown is what is live at that moment and sums to `peak`: parameters,
    buffers, the example inputs, gradients, optimizer state, activations (made
    by the forward and the loss) and temporaries (made by backward and by the
    optimizer step).
    """

    mode: str
    peak: int
    params: int
    buffers: int
    inputs: int
    grads: int
    optimizer: int
    activations: int
    temporary: int
    phase: str  # where the peak is reached: "forward", "backward", "optimizer step"
    module: str  # the innermost module whose forward runs at the peak ("" outside forwards)
    optimizer_name: str | None
    autocast: torch.dtype | None
    activations_by_module: dict[str, int] = field(default_factory=dict)  # live at the end of the forward

    def breakdown(self) -> dict[str, int]:
        return {c: getattr(self, c) for c in CATEGORIES}

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able dict (bytes as ints; each `breakdown()` key means what it means there)."""
        return {
            "mode": self.mode,
            "peak": self.peak,
            **self.breakdown(),
            "phase": self.phase,
            "module": self.module,
            "optimizer_name": self.optimizer_name,
            "autocast": None if self.autocast is None else str(self.autocast).removeprefix("torch."),
            "activations_by_module": dict(self.activations_by_module),
        }

    def _title(self) -> str:
        if self.mode == "inference":
            what = "Inference (forward under no_grad)"
        else:
            what = f"Training step ({self.optimizer_name})"
        if self.autocast is not None:
            what += f", autocast {str(self.autocast).removeprefix('torch.')}"
        where = f" in `{self.module}`" if self.module else ""
        return f"{what}: peak {_bytes(self.peak)} during {self.phase}{where}"

    def _lines(self) -> list[tuple[str, str, str]]:
        rows = []
        for c in CATEGORIES:
            value = getattr(self, c)
            if value or c in ("params", "activations"):
                share = f"{100 * value / self.peak:.1f}%" if self.peak else "-"
                rows.append((c.capitalize(), _bytes(value), share))
        return rows

    def __str__(self) -> str:
        rows = [("Memory at peak", "Bytes", "Share"), *self._lines()]
        widths = [max(len(r[i]) for r in rows) for i in range(3)]
        fmt = [f"{r[0].ljust(widths[0])}  {r[1].rjust(widths[1])}  {r[2].rjust(widths[2])}".rstrip() for r in rows]
        line = "-" * len(fmt[0])
        return "\n".join([self._title(), fmt[0], line, *fmt[1:], line])

    def __repr__(self) -> str:
        return str(self)

    def to_markdown(self) -> str:
        out = [f"**{self._title()}**", "", "| Memory at peak | Bytes | Share |", "|---|---:|---:|"]
        out += [f"| {a} | {b} | {c} |" for a, b, c in self._lines()]
        return "\n".join(out)


def _bytes(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.2f} {unit}"
        value /= 1024
    raise AssertionError


def optimizer_class(optimizer: Any) -> type[torch.optim.Optimizer]:
    if isinstance(optimizer, str):
        cls = OPTIMIZERS.get(optimizer.lower())
        if cls is None:
            raise CostError(
                f"unknown optimizer `{optimizer}`: expected one of {', '.join(sorted(OPTIMIZERS))}, "
                "or an optimizer class such as `torch.optim.AdamW`."
            )
        return cls
    if isinstance(optimizer, type) and issubclass(optimizer, torch.optim.Optimizer):
        return optimizer
    raise CostError(
        f"`optimizer` must be an optimizer class (e.g. `torch.optim.AdamW`) or a name, not {optimizer!r}: "
        "pass the class itself, not an instance (its parameters would be the model's real ones)."
    )


def _autocast(autocast: Any, device: torch.device) -> contextlib.AbstractContextManager[Any]:
    if autocast is None:
        return contextlib.nullcontext()
    if not isinstance(autocast, torch.dtype) or not autocast.is_floating_point:
        raise CostError(f"`autocast` must be a floating dtype such as `torch.bfloat16`, or None, not {autocast!r}.")
    if autocast not in _AUTOCAST_DTYPES.get(device.type, (autocast,)):
        # torch would warn, switch autocast off and run in full precision: the estimate would be labelled with a
        # dtype it never used
        allowed = " or ".join(f"`{d}`" for d in _AUTOCAST_DTYPES[device.type])
        raise CostError(
            f"`autocast={autocast}` on {device.type}: torch's autocast there takes {allowed} (it would switch "
            f"itself off for {autocast} and run in full precision). Pass one of those, or `autocast=None`."
        )
    return torch.autocast(device.type, dtype=autocast)


# the lower-precision dtypes torch's autocast takes, by device type (others: whatever torch says)
_AUTOCAST_DTYPES = {"cpu": (torch.bfloat16, torch.float16), "cuda": (torch.float16, torch.bfloat16)}


def estimate_memory(
    module: nn.Module,
    *examples: Any,
    optimizer: type[torch.optim.Optimizer] | str = torch.optim.AdamW,
    loss: Callable[[Any], torch.Tensor] | None = None,
    mode: str = "train",
    autocast: torch.dtype | None = None,
    example_kwargs: dict[str, Any] | None = None,
    **optimizer_kwargs: Any,
) -> MemoryEstimate:
    """Peak bytes of one steady-state training step (or of a forward), computed on fake tensors.

    `examples` are the forward's positional inputs (`tl.Spec`s or tensors, nested
    in containers), `example_kwargs` its keyword ones. The step is: forward (under
    `torch.autocast` when `autocast` is a dtype), `loss(output)` (default: the
    output's `loss` if it has one, else the sum of its first floating tensor),
    `backward()`, `optimizer.step()`, `zero_grad(set_to_none=True)`, with the
    optimizer's state already created by a first step. `mode="inference"`
    measures a forward under `no_grad`. The model (lazy, deferred or eager) is
    left unchanged and nothing proportional to its size is allocated.

    >>> import torch, torchlazy as tl
    >>> net = torch.nn.Sequential(tl.nn.Linear(256), torch.nn.ReLU(), tl.nn.Linear(10))
    >>> m = tl.estimate_memory(net, tl.Spec(32, 512))
    >>> m.params == (512 * 256 + 256 + 256 * 10 + 10) * 4  # fp32
    True
    >>> m.optimizer - 2 * m.params  # AdamW: two moments, and a 4-byte step counter per parameter
    16
    >>> m.peak == sum(m.breakdown().values()), tl.is_built(net)
    (True, False)
    """
    _check_module(module, "tl.estimate_memory")
    module = tc.uncompiled(module)
    refuse_torch_lazy(module, "tl.estimate_memory")
    refuse_fsdp_sharded(module, "tl.estimate_memory")
    if mode not in ("train", "inference"):
        raise CostError(f"`mode` must be 'train' or 'inference', not {mode!r}.")
    train = mode == "train"
    opt_cls = optimizer_class(optimizer) if train else None
    if loss is not None and not callable(loss):
        raise CostError(f"`loss` must be a callable taking the forward's output, not {type(loss).__name__}.")
    takes = inspect.signature(opt_cls.__init__).parameters if opt_cls is not None else {}
    inputs = [  # a tensor under a name the optimizer takes (`lr=torch.tensor(1e-3)`) is the optimizer's
        k
        for k, v in optimizer_kwargs.items()
        if isinstance(v, Spec) or (isinstance(v, torch.Tensor) and k not in takes)
    ]
    if inputs:  # `summary(model, input_ids=...)` takes keyword inputs so; here they would reach the optimizer
        raise CostError(
            f"`tl.estimate_memory`: {', '.join(f'`{k}=`' for k in inputs)} look like inputs of the forward, but "
            "keyword arguments here go to the optimizer. Pass the forward's keyword inputs as "
            f"`example_kwargs={{{', '.join(repr(k) + ': ...' for k in inputs)}}}`."
        )
    if example_kwargs is not None and not isinstance(example_kwargs, Mapping):  # a tokenizer's BatchEncoding too
        raise CostError(
            f"`example_kwargs` takes a mapping of keyword arguments for the model's forward (or None), not "
            f"{type(example_kwargs).__name__} `{example_kwargs!r}`."
        )
    kwargs = dict(example_kwargs or {})
    # one-element tensors (`lr=torch.tensor(1e-3)`, `betas=(tensor, tensor)`) as numbers, read here: the step runs
    # on fake tensors, where reading their value fails; the bytes of the step are the same
    optimizer_kwargs = tc.tree_map(
        lambda v: v.item() if isinstance(v, torch.Tensor) and v.numel() == 1 else v, optimizer_kwargs
    )
    tracker = _LiveBytes()
    gc.collect()
    with _session(module, examples, kwargs) as s, _naming_failures(module):
        tracker.category = "params"
        with tracker:
            for name, t in {**s.params, **s.buffers}.items():
                tracker.track(t, "buffers" if name in s.buffers and name not in s.params else "params")
            for t in tc.tree_leaves((s.args, s.kwargs)):
                if isinstance(t, torch.Tensor):
                    tracker.track(t, "inputs")
            device = next((t.device for t in s.params.values()), torch.device("cpu"))
            with _module_stack(tracker, s.paths):
                if train:
                    assert opt_cls is not None
                    by_module = _train_steps(s, tracker, opt_cls, optimizer_kwargs, loss, autocast, device)
                else:
                    tracker.reset_peak()
                    tracker.phase, tracker.category = "forward", "activations"
                    with torch.no_grad(), _autocast(autocast, device):
                        out = s.forward()
                    by_module = tracker.live_by_owner("activations")
                    del out
    p = tracker.at_peak
    return MemoryEstimate(
        mode,
        tracker.peak,
        p["params"],
        p["buffers"],
        p["inputs"],
        p["grads"],
        p["optimizer"],
        p["activations"],
        p["temporary"],
        tracker.peak_phase,
        tracker.peak_module,
        opt_cls.__name__ if opt_cls is not None else None,
        autocast,
        {k: v for k, v in sorted(by_module.items()) if v},
    )


@contextlib.contextmanager
def _failing_step(what: str) -> Iterator[None]:
    """An error of a training step past the forward is the step's, not the examples' shapes: a CostError."""
    try:
        yield
    except LazyError:
        raise
    except tc.data_dependent_errors() as e:
        raise CostError(
            f"{what} reads a tensor's value ({e}; `Adafactor` and `ASGD` read their step counts, say): estimates run "
            "on fake tensors, which have shapes but no values. Estimate with an optimizer that keeps the same state "
            "without reading values (`optimizer=torch.optim.AdamW` bounds Adafactor's from above), measure a real "
            "step, or estimate `mode='inference'`."
        ) from e
    except Exception as e:
        raise CostError(
            f"{what} failed during the estimated training step: {type(e).__name__}: {e}. The forward ran; check the "
            "loss and the optimizer (`optimizer=`, `optimizer_kwargs=`; one that needs a closure, or takes no sparse "
            "gradients?), or estimate `mode='inference'`."
        ) from e


def _train_steps(
    s: _Session,
    tracker: _LiveBytes,
    opt_cls: type[torch.optim.Optimizer],
    optimizer_kwargs: dict[str, Any],
    loss: Callable[[Any], torch.Tensor] | None,
    autocast: torch.dtype | None,
    device: torch.device,
) -> dict[str, int]:
    trainable = s.trainable()
    if not trainable:
        raise CostError(
            "no parameter requires grad, so a training step changes nothing: use `mode='inference'`, "
            "or unfreeze parameters."
        )
    try:
        kwargs = dict(optimizer_kwargs)
        takes = inspect.signature(opt_cls.__init__).parameters
        if device.type == "cuda" and "foreach" in takes and kwargs.get("foreach") is None and not kwargs.get("fused"):
            # torch picks the foreach step for real CUDA parameters by default; its check refuses the fake tensor
            # type, which would estimate the per-tensor step instead (6% apart on an optimizer-bound model)
            kwargs["foreach"] = not kwargs.get("differentiable", False)
        opt = opt_cls(trainable, **kwargs)
    except (TypeError, ValueError) as e:
        raise CostError(f"`{opt_cls.__name__}` rejects the optimizer arguments {optimizer_kwargs}: {e}") from None
    hooks = [p.register_post_accumulate_grad_hook(lambda p: tracker.recategorize(p.grad, "grads")) for p in trainable]
    by_module: dict[str, int] = {}
    try:
        for measured in (False, True):
            if measured:
                gc.collect()
                tracker.phase = "forward"
                tracker.reset_peak()
            tracker.phase, tracker.category = "forward", "activations"
            with _autocast(autocast, device):
                out = s.forward()
                with _failing_step("the loss (`loss=`, or the output's own `.loss`)"):
                    value = _loss_of(loss, out)
            if measured:
                by_module = tracker.live_by_owner("activations")
            del out
            tracker.phase, tracker.category = "backward", "temporary"
            with _failing_step("the backward of the loss"):
                value.backward()
            del value
            tracker.phase = "optimizer step"
            with _failing_step(f"`{opt_cls.__name__}.step()`"):
                opt.step()
            for state in opt.state.values():
                for t in state.values():
                    if isinstance(t, torch.Tensor):
                        tracker.recategorize(t, "optimizer")
            opt.zero_grad(set_to_none=True)
    finally:
        for h in hooks:
            h.remove()
    return by_module
