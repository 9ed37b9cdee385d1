"""Value ranges of recorded tensors, read from the ops that wrote them: a test's `.item()` answered without
generating the values it tests.

A rejection sampler asks whether any draw fell outside its bounds: torch's `trunc_normal_` draws with
`normal_`, then asks `((x < a) | (x > b)).any()`. Under `tl.deferred()` that question would generate the
draws for real during construction, and materialize would generate them again. Often the answer follows
from the law alone: torch's `normal_` takes each radius from one uniform of at most 53 bits, so no value
lies more than sqrt(-2 ln 2^-53) = 8.57 standard deviations from the mean, and `trunc_normal_(std=0.02)`
keeps [-2, 2]: nothing is ever rejected. A table of rules gives each recorded op's output range from its
inputs' (`normal_`, `uniform_`, fills, constants, comparisons, masks, `any`/`all`); an op without a rule
makes its output's range unknown, and so does anything whose rounding, casting or overflow is not
modelled: ranges are kept for float32, float64 and bool storages written and read in one dtype, float
ones widened for rounding. Only a bool whose range is one value is answered; anything else is left to
the caller, which computes the values as before (`tests/test_ranges.py` holds the traps: casts, dtype
views, overflow, rounding near zero).

>>> import torch, torchlazy as tl
>>> with tl.deferred():   # no value generated: the test's answer follows from the law
...     w = torch.nn.init.trunc_normal_(torch.empty(256, 256), std=0.02)
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import torch

from ._record import Const, Key, Node, Record, TRef, named_arguments

__all__ = ["known_item", "normal_stays_within"]

_NORMAL_SPAN = 10.0  # standard deviations around the mean that contain every value of torch's normal_ (8.57)
_SMALL_CONSTANT = 1 << 16  # elements of a constant whose min and max are worth reading
# Ranges are kept for float32, float64 and bool storages only (other dtypes round, wrap or saturate in ways
# not modelled: their tests are computed). Float ranges are widened by float32's rounding, the coarser of
# the two, for the values and for the numbers they are compared with (torch rounds those to the tensor's
# dtype): 4 units in the last place, and 4 of float32's smallest normal number near zero (with
# `torch.set_flush_denormal(True)` the CPU reads every subnormal as 0).
_FLOATS = (torch.float32, torch.float64)
_ULP, _NEAR_ZERO, _LARGEST = 2.0**-23, 2.0**-126, float(torch.finfo(torch.float32).max) / 2


class Range(NamedTuple):
    """Every value of a storage, read as `dtype`, lies in [lo, hi] (a bool's are 0 and 1)."""

    lo: float
    hi: float
    dtype: torch.dtype


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
    found = _read(ref, ranges)
    if found is None or found.lo != found.hi:
        return None
    return bool(found.lo)


def normal_stays_within(dtype: torch.dtype, mean: Any, std: Any, a: Any, b: Any) -> bool:
    """Whether no value of `normal_(mean, std)` on a `dtype` tensor is below `a` or above `b` (both rounded
    to `dtype`, as torch's `trunc_normal_` compares them): its rejection test `(x < a) | (x > b)` is then
    false for every draw, decided as `known_item` decides it.

    >>> normal_stays_within(torch.float32, 0.0, 0.02, -2.0, 2.0), normal_stays_within(torch.float32, 0.0, 1.0, -2.0, 2.0)
    (True, False)
    """
    if dtype not in _FLOATS or type(mean) not in (int, float) or type(std) not in (int, float) or not std > 0:
        return False  # std 0: torch's trunc_normal_ divides by it and raises
    draws = _checked(Range(mean - _NORMAL_SPAN * std, mean + _NORMAL_SPAN * std, dtype))
    low, high = _read(a, {}), _read(b, {})
    if draws is None or low is None or high is None:
        return False
    return draws.lo >= low.hi and draws.hi <= high.lo  # `lt` and `gt` decided false, as in `_RULES`


def _apply(node: Node, ranges: dict[int, Range | None]) -> None:
    """Set the ranges of the storages `node` makes or writes."""
    got = _range_of(node, ranges)
    for index, sid in node.outputs:
        ranges[sid] = got if index == 0 and len(node.outputs) == 1 else None
    for sid in node.writes:
        before = ranges.get(sid)
        if node.overwrites == sid:
            ranges[sid] = got
        elif got is None or before is None or got.dtype != before.dtype:
            ranges[sid] = None
        else:  # a part rewritten: its values join the rest's
            ranges[sid] = Range(min(before.lo, got.lo), max(before.hi, got.hi), got.dtype)


def _range_of(node: Node, ranges: dict[int, Range | None]) -> Range | None:
    if node.func is None:  # a constant
        return _constant(node.leaves[0]) if node.leaves else None
    rule = _RULES.get(_name(node))
    if rule is None:
        return None
    args, named = named_arguments(node)
    try:
        got = rule(named, lambda x: _read(x, ranges), args[0] if args else None)
    except (TypeError, ValueError, KeyError):
        return None
    return _checked(got)


def _checked(r: Range | None) -> Range | None:
    """`r` as stored: bools exact, floats widened for rounding; None for anything that might overflow."""
    if r is None or not (math.isfinite(r.lo) and math.isfinite(r.hi)):
        return None
    if r.dtype == torch.bool:
        return r if 0.0 <= r.lo <= r.hi <= 1.0 else None
    if r.dtype not in _FLOATS or max(abs(r.lo), abs(r.hi)) > _LARGEST:
        return None
    return _widened(r)


def _widened(r: Range) -> Range:
    slack = 4 * _ULP * max(abs(r.lo), abs(r.hi)) + 4 * _NEAR_ZERO
    return Range(r.lo - slack, r.hi + slack, r.dtype)


def _read(x: Any, ranges: dict[int, Range | None]) -> Range | None:
    """The range of an argument: a recorded tensor's (read in the dtype it was written in), a constant's,
    a plain number's (as a float64 range: widened like a float32 one, for the rounding to the tensor's dtype)."""
    if isinstance(x, TRef):
        got = ranges.get(x.sid)
        return got if got is not None and got.dtype == x.dtype else None
    if isinstance(x, Const):
        return _constant(x)
    if type(x) in (int, float) and math.isfinite(x) and abs(x) <= _LARGEST:
        return _widened(Range(float(x), float(x), torch.float64))
    return None


def _name(node: Node) -> str:
    """The op's name (`uniform_`); "" for a node whose function is not an op (`law_marker`: a law noted after
    an initializer's ops, which no rule reads)."""
    packet = getattr(node.func, "overloadpacket", None)
    return packet.__name__ if packet is not None else ""  # type: ignore[no-any-return]


def _unchanged(leaf: Any) -> torch.Tensor | None:
    """A recorded constant's tensor, unless it was changed in place since (replay refuses it then)."""
    if not isinstance(leaf, Const) or not isinstance(leaf.value, torch.Tensor) or leaf.changed():
        return None
    return leaf.value


def _constant(leaf: Any) -> Range | None:
    """A recorded constant's smallest and largest values (a small float or bool one's: they are read)."""
    value = _unchanged(leaf)
    if value is None or value.numel() == 0 or value.numel() > _SMALL_CONSTANT or value.device.type != "cpu":
        return None
    if value.dtype not in (*_FLOATS, torch.bool):
        return None
    return _checked(Range(float(value.min()), float(value.max()), value.dtype))


# -- the rules: op name -> (arguments by schema name, the range of an argument, the target) -> output range ---

Of = Callable[[Any], "Range | None"]
Rule = Callable[[dict[str, Any], Of, Any], "Range | None"]
_FALSE, _TRUE, _EITHER = Range(0.0, 0.0, torch.bool), Range(1.0, 1.0, torch.bool), Range(0.0, 1.0, torch.bool)


def _dtype_of(target: Any) -> torch.dtype | None:
    return target.dtype if isinstance(target, TRef) else None


def _normal(named: dict[str, Any], of: Of, target: Any) -> Range | None:
    mean, std, dtype = named.get("mean", 0.0), named.get("std", 1.0), _dtype_of(target)
    if type(mean) not in (int, float) or type(std) not in (int, float) or std < 0 or dtype is None:
        return None
    return Range(mean - _NORMAL_SPAN * std, mean + _NORMAL_SPAN * std, dtype)


def _uniform(named: dict[str, Any], of: Of, target: Any) -> Range | None:
    low, high, dtype = named.get("from", 0.0), named.get("to", 1.0), _dtype_of(target)
    if type(low) not in (int, float) or type(high) not in (int, float) or dtype is None or low > high:
        return None  # from > to: torch refuses it, and so does the computed test
    return Range(float(low), float(high), dtype)


def _fill(named: dict[str, Any], of: Of, target: Any) -> Range | None:
    value, dtype = named["value"], _dtype_of(target)
    if type(value) not in (int, float) or dtype not in _FLOATS:
        return None  # a bool or integer target casts the value: not modelled
    return Range(float(value), float(value), dtype)


def _zero(named: dict[str, Any], of: Of, target: Any) -> Range | None:
    dtype = _dtype_of(target)
    return None if dtype is None else Range(0.0, 0.0, dtype)


def _same(named: dict[str, Any], of: Of, target: Any) -> Range | None:
    """A copy in the same dtype (`lift_fresh`, `clone`)."""
    return of(named["self"])


def _copied(named: dict[str, Any], of: Of, target: Any) -> Range | None:
    got = of(named["src"])
    return got if got is not None and got.dtype == _dtype_of(target) else None  # a cast is not modelled


def _compare(holds: Callable[[Range, Range], bool | None]) -> Rule:
    """A comparison's rule from `holds(a, b)`: True/False where every pair of values decides it alike."""

    def rule(named: dict[str, Any], of: Of, target: Any) -> Range | None:
        a, b = of(named["self"]), of(named["other"])
        if a is None or b is None or torch.bool in (a.dtype, b.dtype):
            return _EITHER
        decided = holds(a, b)
        return _EITHER if decided is None else (_TRUE if decided else _FALSE)

    return rule


def _decide(always: bool, never: bool) -> bool | None:
    return True if always else False if never else None


def _truths(*xs: Any, of: Of) -> list[Range] | None:
    """The ranges of bool tensors `xs`, or None if one is not a bool tensor with a known range."""
    got = [of(x) if isinstance(x, TRef) and x.dtype == torch.bool else None for x in xs]
    return None if any(r is None for r in got) else got  # type: ignore[return-value]


def _or(named: dict[str, Any], of: Of, target: Any) -> Range | None:
    got = _truths(named["self"], named["other"], of=of)
    return None if got is None else Range(max(got[0].lo, got[1].lo), max(got[0].hi, got[1].hi), torch.bool)


def _and(named: dict[str, Any], of: Of, target: Any) -> Range | None:
    got = _truths(named["self"], named["other"], of=of)
    return None if got is None else Range(min(got[0].lo, got[1].lo), min(got[0].hi, got[1].hi), torch.bool)


def _not(named: dict[str, Any], of: Of, target: Any) -> Range | None:
    got = _truths(named["self"], of=of)
    return None if got is None else Range(1.0 - got[0].hi, 1.0 - got[0].lo, torch.bool)


def _reduction(empty: Range) -> Rule:
    """`any` / `all` of a whole bool tensor: its range, or `empty`'s answer for no element."""

    def rule(named: dict[str, Any], of: Of, target: Any) -> Range | None:
        x = named["self"]
        if not isinstance(x, TRef) or x.dtype != torch.bool or len(named) != 1:
            return None
        if math.prod(x.size) == 0:
            return empty
        got = _truths(x, of=of)
        return None if got is None else got[0]

    return rule


_LIFTS = frozenset({"lift_fresh", "lift_fresh_copy"})  # a real tensor taken into the record as it is
_RULES: dict[str, Rule] = {
    "normal_": _normal,
    "uniform_": _uniform,
    "fill_": _fill,
    "zero_": _zero,
    "lift_fresh": _same,
    "lift_fresh_copy": _same,
    "clone": _same,
    "copy_": _copied,
    "lt": _compare(lambda a, b: _decide(a.hi < b.lo, a.lo >= b.hi)),
    "le": _compare(lambda a, b: _decide(a.hi <= b.lo, a.lo > b.hi)),
    "gt": _compare(lambda a, b: _decide(a.lo > b.hi, a.hi <= b.lo)),
    "ge": _compare(lambda a, b: _decide(a.lo >= b.hi, a.hi < b.lo)),
    "bitwise_or": _or,
    "logical_or": _or,
    "bitwise_and": _and,
    "logical_and": _and,
    "logical_not": _not,
    "any": _reduction(_FALSE),
    "all": _reduction(_TRUE),
}
