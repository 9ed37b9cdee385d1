"""`summary()`: shapes, parameters and bytes of a model before anything is allocated.

With examples, the forward runs on fake tensors inside a transaction that is
always rolled back: lazy layers are shaped only for the time of the count, and
the model is left exactly as it was. Rows are data (`Summary.rows`); `str()`
renders the text table, notebooks get an HTML one, `to_markdown()` and
`to_dict()` the rest. With `flops=True`, FLOPs per module come from `_costs`.
"""

from __future__ import annotations

import html
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch
from torch import nn
from torch.nn.parameter import is_lazy

from . import _lazy
from . import _torch_compat as tc
from ._costs import FlopCounts, count_flops
from ._errors import ArgumentError
from ._infer import fake_forward, mode_of, refuse_fsdp_sharded, refuse_torch_lazy
from ._isolate import attributes_kept, fresh_fakes
from ._twin import run_twin

__all__ = ["Row", "Summary", "summary"]

Shape = tuple[int, ...]


@dataclass(frozen=True)
class Row:
    """One module: where it is, what it is, what flows through it, what it holds."""

    path: str
    type: str
    depth: int
    inputs: tuple[Shape, ...] | None  # None: not called (or no example)
    outputs: tuple[Shape, ...] | None
    params: dict[str, Shape | None]  # its own parameters; None: size unknown yet
    num_params: int | None  # own parameters, tied ones counted where first seen
    total_params: int | None  # the whole sub-tree, tied ones once
    trainable: bool
    tied_to: dict[str, str] = field(default_factory=dict)  # own name -> path it is tied to
    flops: int | None = None  # forward FLOPs of its own ops (submodules' not included); None: not counted
    total_flops: int | None = None  # forward FLOPs of the whole sub-tree


@dataclass(repr=False)
class Summary:
    """The rows, the totals, and their renderings (the text table is also its repr)."""

    rows: list[Row]
    total_params: int | None
    trainable_params: int | None
    param_bytes: int | None  # at the model's dtypes
    buffer_bytes: int | None
    bytes_fp32: int | None
    bytes_bf16: int | None
    depth: int | None = None
    unknown: list[str] = field(default_factory=list)
    total_flops: int | None = None  # one forward; None: not counted (`summary(..., flops=True)`)
    total_flops_train: int | None = None  # forward + backward (a loss on the output, gradients of the parameters)

    def _header(self) -> tuple[str, ...]:
        flops = ("FLOPs",) if self.total_flops is not None else ()
        return ("Module", "Type", "Input shape", "Output shape", "Params", *flops)

    def _cells(self) -> list[tuple[str, ...]]:
        """One tuple of strings per shown row; `--` where a row's children are listed and it has nothing of its own."""
        shown = [r for r in self.rows if self.depth is None or r.depth <= self.depth]
        parents = {r.path.rpartition(".")[0] for r in self.rows if r.depth > 0}
        body = []
        for r in shown:
            folded = self.depth is not None and r.depth == self.depth
            listed = not folded and r.path in parents and r.depth > 0  # its children are rows of their own
            whole = folded or r.depth == 0
            count = r.total_params if whole else r.num_params
            name = "  " * max(r.depth - 1, 0) + (r.path.rsplit(".", 1)[-1] if r.depth else "(root)")
            tied = f" (tied to {', '.join(sorted(set(r.tied_to.values())))})" if r.tied_to else ""
            params = "--" if listed and count == 0 and not tied else _count(count) + tied
            cells = [name, r.type, _shapes(r.inputs), _shapes(r.outputs), params]
            if self.total_flops is not None:
                flops = r.total_flops if whole else r.flops
                cells.append("--" if listed and not flops else _flops(flops))
            body.append(tuple(cells))
        return body

    def __str__(self) -> str:
        header = self._header()
        body = self._cells()
        widths = [max(len(x) for x in col) for col in zip(header, *body)]
        line = "-" * (sum(widths) + 2 * (len(widths) - 1))
        out = [_join(header, widths), line, *(_join(row, widths) for row in body), line]
        out += self._totals()
        return "\n".join(out)

    def __repr__(self) -> str:
        return str(self)

    def _totals(self) -> list[str]:
        out = [
            f"Total params: {_count(self.total_params)}",
            f"Trainable params: {_count(self.trainable_params)}",
        ]
        if self.total_params is not None and self.trainable_params is not None:
            out.append(f"Non-trainable params: {self.total_params - self.trainable_params:,}")
        out.append(
            f"Params size: {_bytes(self.param_bytes)} (fp32: {_bytes(self.bytes_fp32)}, bf16: {_bytes(self.bytes_bf16)})"
        )
        out.append(f"Buffers size: {_bytes(self.buffer_bytes)}")
        if self.total_flops is not None:
            out.append(f"Forward FLOPs: {_flops(self.total_flops)} ({self.total_flops:,})")
        if self.total_flops_train is not None:
            out.append(f"Forward + backward FLOPs: {_flops(self.total_flops_train)} ({self.total_flops_train:,})")
        if self.unknown:
            out.append(
                f"Unknown until built ({len(self.unknown)}): pass an example input, e.g. `tl.summary(model, tl.Spec(...))`"
            )
        return out

    def to_markdown(self) -> str:
        """The table as Markdown (module names are full paths), then the totals."""
        shown = [r for r in self.rows if self.depth is None or r.depth <= self.depth]
        header = self._header()
        lines = [
            "| " + " | ".join(header) + " |",
            "|" + "|".join("---" if i < 4 else "---:" for i in range(len(header))) + "|",
        ]
        for r, cells in zip(shown, self._cells()):
            row = (f"`{r.path}`" if r.path else "(root)", *cells[1:])
            lines.append("| " + " | ".join(c.replace("|", "\\|") for c in row) + " |")
        return "\n".join([*lines, "", *(f"- {t}" for t in self._totals())])

    def to_dict(self) -> dict[str, Any]:
        """Everything as JSON-able data: the rows (every module, whatever `depth`) and the totals."""
        out = {k: v for k, v in asdict(self).items() if k != "rows"}
        out["rows"] = [
            {**asdict(r), "inputs": _listed(r.inputs), "outputs": _listed(r.outputs), "params": {
                k: None if v is None else list(v) for k, v in r.params.items()
            }}
            for r in self.rows
        ]  # fmt: skip
        return out

    def _repr_html_(self) -> str:
        cells = "".join("<tr>" + "".join(f"<td>{html.escape(x)}</td>" for x in row) + "</tr>" for row in self._cells())
        head = "".join(f"<th>{h}</th>" for h in self._header())
        totals = html.escape("\n".join(self._totals()))
        return f"<table><thead><tr>{head}</tr></thead><tbody>{cells}</tbody></table><pre>{totals}</pre>"


def _join(cells: tuple[str, ...], widths: list[int]) -> str:
    return "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()


def _shapes(shapes: tuple[Shape, ...] | None) -> str:
    if shapes is None:
        return "?"
    if not shapes:
        return "-"
    return ", ".join("[" + ", ".join(map(str, s)) + "]" for s in shapes)


def _count(n: int | None) -> str:
    return "?" if n is None else f"{n:,}"


def _flops(n: int | None) -> str:
    if n is None:
        return "?"
    for unit, scale in (("P", 10**15), ("T", 10**12), ("G", 10**9), ("M", 10**6), ("K", 10**3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(n)


def _listed(shapes: tuple[Shape, ...] | None) -> list[list[int]] | None:
    return None if shapes is None else [list(s) for s in shapes]


def _bytes(n: int | None) -> str:
    if n is None:
        return "?"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024  # type: ignore[assignment]
    raise AssertionError


def _shape_of(t: torch.Tensor) -> Shape | None:
    if _lazy.is_placeholder(t) or is_lazy(t):  # torchlazy's placeholders, PyTorch's own uninitialized tensors
        return None
    return tuple(int(s) for s in t.shape)


def _tensor_shapes(value: Any) -> tuple[Shape, ...]:
    return tuple(tuple(int(s) for s in t.shape) for t in tc.tree_leaves(value) if isinstance(t, torch.Tensor))


def summary(
    module: nn.Module,
    *example_args: Any,
    depth: int | None = None,
    flops: bool = False,
    **example_kwargs: Any,
) -> Summary:
    """Shapes, parameter counts and bytes per module, allocating nothing.

    Works on unbuilt lazy and deferred models and leaves them unchanged. With
    example inputs (`tl.Spec`s or tensors) lazy sizes are inferred for the
    count and input/output shapes are shown; without, unknown sizes show `?`.
    With `flops=True` (examples needed) each row gets its forward FLOPs, as
    `torch.utils.flop_counter.FlopCounterMode` counts them, and the totals
    `total_flops` (forward) and `total_flops_train` (forward + backward).

    >>> import torch, torchlazy as tl
    >>> net = torch.nn.Sequential(tl.nn.Linear(32), torch.nn.ReLU(), tl.nn.Linear(10))
    >>> s = tl.summary(net, tl.Spec(4, 64))
    >>> s.total_params, [r.outputs for r in s.rows[1:]]
    (2410, [((4, 32),), ((4, 32),), ((4, 10),)])
    >>> tl.summary(net).total_params is None   # unbuilt and no example: unknown
    True
    """
    module = tc.uncompiled(module)
    if not isinstance(module, nn.Module):
        raise ArgumentError(
            f"`tl.summary` takes a torch.nn.Module (then example inputs), not {type(module).__name__}; "
            "for a tensor, use `t.shape` and `t.numel()`."
        )
    if depth is not None and (not isinstance(depth, int) or isinstance(depth, bool) or depth < 0):
        raise ArgumentError(f"`tl.summary`: `depth=` takes a whole number >= 0 (or None for all), not `{depth!r}`.")
    if example_args or example_kwargs:
        refuse_torch_lazy(module, "tl.summary")
        refuse_fsdp_sharded(module, "tl.summary")
    if flops:
        return _with_flops(summary(module, *example_args, depth=depth, **example_kwargs),
                           count_flops(module, example_args, example_kwargs))  # fmt: skip
    if example_args or example_kwargs:
        try:  # fast path: a twin of the model on the meta device, where lazy layers build for free
            return _summary_of_meta_twin(module, example_args, example_kwargs, depth)
        except Exception:  # noqa: BLE001  (model code that needs fake tensors: the exact path below)
            pass
    # the lazy builds are undone first (their undo puts back the tables they saw, fakes in them), then the model
    with attributes_kept(module), _lazy.transaction(rollback=True):
        calls: dict[int, tuple[tuple[Shape, ...], tuple[Shape, ...]]] = {}
        if example_args or example_kwargs:
            hooks = [m.register_forward_hook(_recorder(calls), with_kwargs=True) for m in module.modules()]
            try:
                # on fresh fake tensors in place of the model's own: a graph the forward keeps alive (a custom
                # Function's cycle) holds those, not the model's (which materialize could then not swap)
                params, buffers = fresh_fakes(module, mode_of(module))
                with tc.tensors_in_place(module, {**params, **buffers}):
                    fake_forward(module, example_args, example_kwargs)
            finally:
                for h in hooks:
                    h.remove()
        return _tabulate(module, calls, depth)


def _with_flops(s: Summary, counts: FlopCounts) -> Summary:
    """Rows get FlopCounterMode's (inclusive) count; own = that minus the nearest called submodules' counts."""
    called = counts.by_module
    called_paths = [p for p in called if p]

    def nearest_called_below(path: str) -> list[str]:
        inside = f"{path}." if path else ""
        below = [d for d in called_paths if d.startswith(inside) and d != path]
        return [d for d in below if not any(d.startswith(f"{m}.") for m in below if m != d)]

    rows = []
    for r in s.rows:
        top = sum(called[d] for d in nearest_called_below(r.path))
        total = called.get(r.path, top)
        rows.append(replace(r, flops=max(total - top, 0) if r.path in called else 0, total_flops=total))
    return replace(s, rows=rows, total_flops=counts.forward, total_flops_train=counts.train)


def _summary_of_meta_twin(
    module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], depth: int | None
) -> Summary:
    calls: dict[int, tuple[tuple[Shape, ...], tuple[Shape, ...]]] = {}
    twin = run_twin(module, args, kwargs, lambda m: m.register_forward_hook(_recorder(calls), with_kwargs=True))
    return _tabulate(twin, calls, depth)


def _recorder(calls: dict[int, Any]) -> Any:
    def hook(module: nn.Module, args: Any, kwargs: Any, out: Any) -> None:
        calls.setdefault(id(module), (_tensor_shapes((args, kwargs)), _tensor_shapes(out)))

    return hook


def _tabulate(module: nn.Module, calls: dict[int, Any], depth: int | None) -> Summary:
    first_seen: dict[int, str] = {}
    rows: list[Row] = []
    unknown: list[str] = []
    subtree_ids: dict[str, set[int]] = {}
    sizes: dict[int, int | None] = {}
    for path, sub in module.named_modules(remove_duplicate=False):
        params: dict[str, Shape | None] = {}
        tied: dict[str, str] = {}
        own: int | None = 0
        trainable = False
        for name, p in sub._parameters.items():
            if p is None:
                continue
            full = f"{path}.{name}" if path else name
            shape = _shape_of(p)
            params[name] = shape
            numel = None if shape is None else _numel(shape)
            sizes[id(p)] = numel
            trainable |= p.requires_grad
            if id(p) in first_seen:
                tied[name] = first_seen[id(p)]
                continue
            first_seen[id(p)] = full
            if numel is None:
                unknown.append(full)
                own = None
            elif own is not None:
                own += numel
        inputs, outputs = calls.get(id(sub), (None, None))
        depth_of = 0 if not path else path.count(".") + 1
        rows.append(
            Row(
                path,
                type(sub).__name__,
                depth_of,
                inputs,
                outputs,
                params,
                own,
                None,
                trainable,
                tied,
            )
        )
        subtree_ids[path] = {id(p) for p in sub.parameters()}
    final = []
    for r in rows:
        inside = f"{r.path}." if r.path else ""
        ids = [
            i for i in subtree_ids[r.path] if first_seen.get(i, "").startswith(inside)
        ]  # ties: counted where first seen
        values = [sizes.get(i) for i in ids]
        subtotal = None if any(v is None for v in values) else sum(v for v in values if v is not None)
        final.append(Row(**{**r.__dict__, "total_params": subtotal}))
    all_params = list({id(p): p for p in module.parameters()}.values())
    all_buffers = list({id(b): b for b in module.buffers()}.values())
    known = [p for p in all_params if _shape_of(p) is not None]
    complete = len(known) == len(all_params)

    def tally(size: Any) -> int | None:
        return sum(size(p) for p in known) if complete else None

    total = tally(lambda p: p.numel())
    n_trainable = tally(lambda p: p.numel() if p.requires_grad else 0)
    param_bytes = tally(lambda p: p.numel() * p.element_size())
    fp32 = tally(lambda p: p.numel() * (4 if p.is_floating_point() else p.element_size()))
    bf16 = tally(lambda p: p.numel() * (2 if p.is_floating_point() else p.element_size()))
    buffers_known = all(_shape_of(b) is not None for b in all_buffers)
    buffer_bytes = sum(b.numel() * b.element_size() for b in all_buffers) if buffers_known else None
    return Summary(final, total, n_trainable, param_bytes, buffer_bytes, fp32, bf16, depth, unknown)


def _numel(shape: Shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n
