"""Value ranges of recorded tensors, read from the ops that wrote them: a test's `.item()` answered without
generating the values it tests.

A rejection sampler asks whether any draw fell outside its bounds: torch's `trunc_normal_` draws with
`normal_`, then asks `((x < a) | (x > b)).any()`. Under `tl.deferred()` that question would generate the
draws for real during construction, and materialize would generate them again. Often the answer follows
from the law alone: torch's `normal_` takes each radius from one uniform of at most 53 bits, so no value
lies more than sqrt(-2 ln 2^-53) = 8.57 standard deviations from the mean, and `trunc_normal_(std=0.02)`
keeps [-2, 2]: nothing is ever rejected. A table of rules gives each recorded op's output range from its
inputs' (`normal_`, `uniform_`, fills, constants, comparisons, masks, `any`/`all`); an op without a rule
makes its output's range unknown. Only a bool whose range is one value is answered; anything else is left
to the caller, which computes the values as before.

>>> import torch, torchlazy as tl
>>> with tl.deferred():   # no value generated: the test's answer follows from the law
...     w = torch.nn.init.trunc_normal_(torch.empty(256, 256), std=0.02)
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from . import _torch_compat as tc
from ._record import Const, Key, Node, Record, TRef, named_arguments

__all__ = ["known_item"]

Range = tuple[float, float]  # lo <= every value <= hi
_NORMAL_SPAN = 10.0  # standard deviations around the mean that contain every value of torch's normal_ (8.57)
_SMALL_CONSTANT = 1 << 16  # elements of a constant whose min and max are worth reading


def known_item(record: Record, ref: TRef, bound: Key) -> bool | int | float | None:
    """`.item()` of the one-element tensor `ref` just before `bound`, where the record decides it: a bool
    whose recorded ops decide it, or a constant taken as it is (the bounds `trunc_normal_` reads with
    `tensor.new_tensor(a).item()`); else None."""
    if math.prod(ref.size) != 1:
        return None
    nodes = record.closure({ref.sid}, bound)
    if len(nodes) == 1 and (nodes[0].func is None or _name(nodes[0]) in _LIFTS) and nodes[0].leaves:
        value = _unchanged(nodes[0].leaves[0])
        if value is not None and value.numel() == 1 and value.dtype == ref.dtype and ref.offset == 0:
            return value.item()  # type: ignore[no-any-return]
    if ref.dtype != torch.bool:
        return None
    ranges: dict[int, Range | None] = {}
    for node in nodes:
        _apply(node, ranges)
    found = ranges.get(ref.sid)
    if found is None or found[0] != found[1]:
        return None
    return bool(found[0])


def _apply(node: Node, ranges: dict[int, Range | None]) -> None:
    """Set the ranges of the storages `node` makes or writes."""
    got = _range_of(node, ranges)
    for index, sid in node.outputs:
        ranges[sid] = got if index == 0 and len(node.outputs) == 1 else None
    for sid in node.writes:
        before = ranges.get(sid)
        if node.overwrites == sid:
            ranges[sid] = got
        elif got is None or before is None:
            ranges[sid] = None
        else:  # a part rewritten: its values join the rest's
            ranges[sid] = (min(before[0], got[0]), max(before[1], got[1]))


def _range_of(node: Node, ranges: dict[int, Range | None]) -> Range | None:
    if node.func is None:  # a constant
        return _constant(node.leaves[0]) if node.leaves else None
    name = _name(node)
    rule = _RULES.get(name)
    if rule is None:
        return None
    _, named = named_arguments(node)
    try:
        got = rule(named, lambda x: _range_in(x, ranges))
    except (TypeError, ValueError, KeyError):
        return None
    if got is None or not all(math.isfinite(v) for v in got):
        return None
    return got if name in _TRUTHS else _widened(got)


def _range_in(x: Any, ranges: dict[int, Range | None]) -> Range | None:
    """The range of an argument: a recorded tensor's, a constant's, a number's own value."""
    if isinstance(x, TRef):
        return ranges.get(x.sid)
    if isinstance(x, Const):
        return _constant(x)
    if isinstance(x, (bool, int, float)) and math.isfinite(x):
        return (float(x), float(x))
    return None


def _widened(r: Range) -> Range:
    """`r` with room for the rounding of values stored in any floating dtype, and of the numbers they are
    compared with (torch rounds those to the tensor's dtype): 4 units in the last place of bfloat16."""
    slack = 4 * 2.0**-7 * (abs(r[0]) + abs(r[1])) + 1e-30
    return (r[0] - slack, r[1] + slack)


def _name(node: Node) -> str:
    return node.func.overloadpacket.__name__  # type: ignore[no-any-return,union-attr]


def _unchanged(leaf: Any) -> torch.Tensor | None:
    """A recorded constant's tensor, unless it was changed in place since (replay refuses it then)."""
    if not isinstance(leaf, Const) or not isinstance(leaf.value, torch.Tensor):
        return None
    if leaf.version is not None and tc.tensor_version(leaf.value) != leaf.version:
        return None
    return leaf.value


def _constant(leaf: Any) -> Range | None:
    """A recorded constant's smallest and largest values (a small one's: they are read)."""
    value = _unchanged(leaf)
    if value is None or value.numel() == 0 or value.numel() > _SMALL_CONSTANT:
        return None
    if value.is_complex() or value.device.type != "cpu":
        return None
    lo, hi = float(value.min()), float(value.max())
    return (lo, hi) if math.isfinite(lo) and math.isfinite(hi) else None


# -- the rules: op name -> (its arguments by schema name, the range of an argument) -> output range -------

Of = Callable[[Any], "Range | None"]
_BOOL_FALSE, _BOOL_TRUE, _BOOL_ANY = (0.0, 0.0), (1.0, 1.0), (0.0, 1.0)


def _normal(named: dict[str, Any], of: Of) -> Range | None:
    mean, std = named.get("mean", 0.0), named.get("std", 1.0)
    if not isinstance(mean, (int, float)) or not isinstance(std, (int, float)) or std < 0:
        return None
    return (mean - _NORMAL_SPAN * std, mean + _NORMAL_SPAN * std)


def _uniform(named: dict[str, Any], of: Of) -> Range | None:
    low, high = of(named.get("from", 0.0)), of(named.get("to", 1.0))
    return None if low is None or high is None else (low[0], high[1])


def _fill(named: dict[str, Any], of: Of) -> Range | None:
    return of(named["value"])


def _compare(holds: Callable[[Range, Range], bool | None]) -> Callable[[dict[str, Any], Of], Range | None]:
    """A comparison's rule from `holds(a, b)`: True/False where every pair of values decides it alike."""

    def rule(named: dict[str, Any], of: Of) -> Range | None:
        a, b = of(named["self"]), of(named["other"])
        if a is None or b is None:
            return _BOOL_ANY
        decided = holds(a, b)
        return _BOOL_ANY if decided is None else (_BOOL_TRUE if decided else _BOOL_FALSE)

    return rule


def _decide(always: bool, never: bool) -> bool | None:
    return True if always else False if never else None


def _bools(*ranges: Range | None) -> bool:
    return all(r is not None and 0.0 <= r[0] and r[1] <= 1.0 for r in ranges)


def _or(named: dict[str, Any], of: Of) -> Range | None:
    a, b = of(named["self"]), of(named["other"])
    return (max(a[0], b[0]), max(a[1], b[1])) if a is not None and b is not None and _bools(a, b) else None


def _and(named: dict[str, Any], of: Of) -> Range | None:
    a, b = of(named["self"]), of(named["other"])
    return (min(a[0], b[0]), min(a[1], b[1])) if a is not None and b is not None and _bools(a, b) else None


def _not(named: dict[str, Any], of: Of) -> Range | None:
    a = of(named["self"])
    return (1.0 - a[1], 1.0 - a[0]) if a is not None and _bools(a) else None


def _reduction(empty: Range) -> Callable[[dict[str, Any], Of], Range | None]:
    """`any` / `all` of a whole bool tensor: its range, or `empty`'s answer for no element."""

    def rule(named: dict[str, Any], of: Of) -> Range | None:
        target = named["self"]
        if not isinstance(target, TRef) or target.dtype != torch.bool:
            return None
        if math.prod(target.size) == 0:
            return empty
        a = of(target)
        return a if a is not None and _bools(a) else None

    return rule


def _same(named: dict[str, Any], of: Of) -> Range | None:
    return of(named["self"])


def _copied(named: dict[str, Any], of: Of) -> Range | None:
    return of(named["src"])


# rules whose answers are truths (0 or 1, exact); every other rule's range is widened for rounding
_TRUTHS = frozenset(
    {"lt", "le", "gt", "ge", "bitwise_or", "logical_or", "bitwise_and", "logical_and", "logical_not", "any", "all"}
)
_LIFTS = frozenset({"lift_fresh", "lift_fresh_copy"})  # a real tensor taken into the record as it is
_RULES: dict[str, Callable[[dict[str, Any], Of], Range | None]] = {
    "normal_": _normal,
    "uniform_": _uniform,
    "fill_": _fill,
    "zero_": lambda named, of: (0.0, 0.0),
    "zeros": lambda named, of: (0.0, 0.0),
    "ones": lambda named, of: (1.0, 1.0),
    "full": lambda named, of: of(named["fill_value"]),
    "lift_fresh": _same,
    "lift_fresh_copy": _same,
    "clone": _same,
    "copy_": _copied,
    "lt": _compare(lambda a, b: _decide(a[1] < b[0], a[0] >= b[1])),
    "le": _compare(lambda a, b: _decide(a[1] <= b[0], a[0] > b[1])),
    "gt": _compare(lambda a, b: _decide(a[0] > b[1], a[1] <= b[0])),
    "ge": _compare(lambda a, b: _decide(a[0] >= b[1], a[1] < b[0])),
    "bitwise_or": _or,
    "logical_or": _or,
    "bitwise_and": _and,
    "logical_and": _and,
    "logical_not": _not,
    "any": _reduction(_BOOL_FALSE),
    "all": _reduction(_BOOL_TRUE),
}
