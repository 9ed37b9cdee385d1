"""The record of a deferred construction, and its replay.

A `Record` is the program that construction ran, reduced to what matters for
the final tensors: every operation that created a storage or wrote into one,
in order, with its tensor arguments given as (storage, geometry) references.
Pure views are not kept: a view is just a geometry on a storage, and every
argument is rebuilt from its storage by geometry at replay.

Replaying a set of storages runs only the operations they depend on (their
writers, and recursively the writers of what those read before they ran), in
record order, on real tensors, freeing each temporary at its last use.

Random operations draw from a `Stream`: the generator state before each one is
known (from the state captured when the record began, jumped over the draws
before it by the generator model `_rng`, or advanced by running the few kernels
it does not model on scratch memory), so any subset of the model replays bit for
bit as the whole would, and draws can run in parallel, each on its own generator.
"""

from __future__ import annotations

import bisect
import contextlib
import hashlib
import threading
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Any

import torch

from . import _counter, _rng
from . import _torch_compat as tc
from ._drawkernels import run_draw
from ._errors import DeferredError

Key = tuple[int, ...]

# Exact replay sets the states of shared generators (the global CPU one): one replay at a time.
GENERATOR_LOCK = threading.RLock()


_SHARED: dict[tuple[int, ...], tuple[int, ...]] = {}


def shared(values: tuple[int, ...]) -> tuple[int, ...]:
    """One tuple object for equal tuples of ints (shapes, strides, storage ids): a record holds thousands,
    most alike, and each distinct object is one more for the garbage collector to scan when a block ends."""
    found = _SHARED.get(values)
    if found is None:
        found = values
        if len(_SHARED) < 1 << 16:
            _SHARED[values] = values
    return found


# Slotted: a record holds thousands of these; without a __dict__ each costs one object less to make,
# and one less for the garbage collector to scan when the block ends. Hashable and never changed, but not
# `frozen`: a frozen dataclass sets each field through `object.__setattr__`, 3x the cost of making one.
@dataclass(slots=True, unsafe_hash=True)
class TRef:
    """A tensor argument: a geometry on a recorded storage."""

    sid: int
    size: tuple[int, ...]
    stride: tuple[int, ...]
    offset: int
    dtype: torch.dtype
    bits: int = 0  # a lazily conjugated view (`CONJ`: `t.conj()` of a complex tensor), a negated one (`NEG`)

    @staticmethod
    def of(sid: int, t: torch.Tensor) -> TRef:
        bits = view_bits(t)
        return TRef(sid, shared(tuple(t.shape)), shared(t.stride()), int(t.storage_offset()), t.dtype, bits)

    def on(self, storage: torch.UntypedStorage) -> torch.Tensor:
        out = torch.empty(0, dtype=self.dtype, device=storage.device)
        out = out.set_(storage, self.offset, self.size, self.stride)
        if self.bits & CONJ:
            out = out.conj()
        if self.bits & NEG:
            out = tc.neg_view(out)
        return out


CONJ, NEG = 1, 2


@dataclass(frozen=True, slots=True)
class SRef:
    """A storage argument (`t.set_(storage, ...)`): a recorded storage, handed to the op as a whole."""

    sid: int


def view_bits(t: torch.Tensor) -> int:
    """The view bits of `t` a geometry on its storage does not say: writes and reads through it conjugate
    (`t.conj()` of a complex tensor) or negate (its `.imag`)."""
    return (CONJ if t.is_conj() else 0) | (NEG if t.is_neg() else 0)


@dataclass(frozen=True, slots=True)
class Const:
    """A real tensor that construction used as an input (kept by reference, not copied).

    `version` is the tensor's in-place version counter when it was recorded: a
    source changed in place before replay is refused instead of read as it is now.
    """

    value: torch.Tensor
    version: int | None = None
    memory: tuple[Any, ...] | None = None  # its dtype and layout: `t.data = other` changes them unseen

    @staticmethod
    def of(t: torch.Tensor) -> Const:
        return Const(t, tc.tensor_version(t), memory_of(t))

    def changed(self) -> bool:
        """Whether the tensor was changed in place since it was recorded, or given memory of another layout (`.data =`,
        which no version counter sees: replay would write its new shape into storages sized for the recorded one).
        A move of the same layout (`share_memory_()`) is no change."""
        if self.memory is not None and memory_of(self.value) != self.memory:
            return True
        return self.version is not None and tc.tensor_version(self.value) != self.version


def memory_of(t: Any) -> tuple[Any, ...] | None:
    """A tensor's layout (dtype, device, shape, strides, offset, storage size), or None for one without strides."""
    try:
        return t.dtype, t.device, tuple(t.shape), t.stride(), t.storage_offset(), t.untyped_storage().nbytes()
    except (NotImplementedError, RuntimeError, AttributeError):
        return None


_UNKNOWN: Any = object()


@dataclass(slots=True, weakref_slot=True)
class Node:
    key: Key
    func: Callable[..., Any] | None  # None: the node makes a constant (leaves[0])
    spec: Any  # a pytree spec of (args, kwargs); None for a constant
    leaves: list[Any]
    outputs: Sequence[tuple[int, int]]  # (index among the output's leaves, new storage id)
    reads: tuple[int, ...]
    writes: tuple[int, ...]
    stream: Stream | None = None
    overwrites: int | None = None  # a storage this node rewrites entirely without reading it
    law: tuple[str, dict[str, Any]] | None = None  # for exact=False: the law a whole initializer samples
    law_stream: Stream | None = None  # for a law: the stream its initializer drew from (`counter_key` follows it)
    draw: Any = field(default=_UNKNOWN, repr=False, compare=False)  # `draw_of(node)`, once asked
    # torch's default dtype when it ran, where other than its record's (`set_default_dtype` inside the block):
    # factories without `dtype=` and Python-scalar promotion follow it, so replay runs under it
    default_dtype: torch.dtype | None = None
    # a draw made on the meta device (it drew nothing in eager code): replayed, where a tensor on the CPU needs its
    # shape, from a generator of its own, never the program's
    meta_draw: bool = False
    # `tc.numerics()` when it ran, where other than its record's (the program set its thread count, deterministic
    # mode or matmul precision in the block, or between the block and an op on its tensors): replay runs under it
    numerics: tuple[Any, ...] | None = None

    @property
    def name(self) -> str:
        return "constant" if self.func is None else str(self.func)


@dataclass(frozen=True)
class Reseed:
    """The program set a generator's state inside the record (`manual_seed`, `set_rng_state`).

    Later draws continue from `state`, or, where the program restored a state the
    record itself had left the generator in (`fork_rng`, a saved `get_rng_state`),
    from the state just after the random event `after`.
    """

    key: Key
    state: torch.Tensor | None
    after: Key | None = None


@dataclass(slots=True)
class StorageInfo:
    sid: int
    nbytes: int
    device: torch.device
    meta: weakref.ref[Any]  # the fake storage (weak: the storage's marker holds the record)
    writers: list[Node] = field(default_factory=list)  # sorted by key


def _generator_state(gen: torch.Generator) -> torch.Tensor:
    return gen.get_state()


class Stream:
    """The draws of one generator, in record order, with the state before each.

    `cursor` counts the random nodes already accounted for; the generator
    state before node `cursor` is `cursor_state`. Moving the cursor past nodes
    whose results nobody wants jumps the generator over their draws (their
    word counts are known from the generator model, `_rng`), or, for the few
    kernels it does not model, runs them on scratch memory.
    """

    def __init__(self, record: Record, generator: torch.Generator, entry: torch.Tensor | None):
        # no reference cycle: a record nobody uses any more is freed by reference counting alone (its
        # nodes hold their stream; the stream sees the record and its nodes through weak references)
        self._record = weakref.ref(record)
        self.generator = generator
        self.entry = entry  # None: a live stream, which starts from the generator's state then
        self.keys: list[Key] = []
        # key -> the node, weakly (plain references without callbacks: a `WeakValueDictionary` entry costs
        # a keyed reference with a callback per draw; a node lives as long as its record)
        self.nodes: dict[Key, weakref.ref[Node]] = {}
        self.before: dict[Key, torch.Tensor] = {}
        self.after: dict[Key, torch.Tensor] = {}  # after unmodelled nodes (those the model cannot jump)
        # a state some words into a passed node's draws (where a shard's slice started), so that the next
        # slice jumps from there: the same distance for every layer (a cached jump), not an ever longer one
        self.inside: dict[Key, tuple[int, torch.Tensor]] = {}
        self.committed = 0  # random nodes before this index gave real values: none may come before them
        self.cursor = 0
        self.cursor_state: torch.Tensor | None = entry
        # reseed events (keys in `keys` too), the state after each event passed, and
        # the token states the recorder parked the real generator in (digest -> event key)
        self.reseeds: dict[Key, Reseed] = {}
        self._reseed_keys: list[Key] | None = None  # `reseeds`' keys sorted, for `epoch` (None: to sort again)
        self.tokens: dict[bytes, Key] = {}
        self.parked: torch.Tensor | None = entry
        # the seed of the token the real generator was parked in last (None: parked in `parked`),
        # and the draw after which each seed's token was parked
        self.parked_seed: int | None = None
        self.seeds: dict[int, Key] = {}

    def add(self, node: Node) -> None:
        keys = self.keys
        at = len(keys) if not keys or keys[-1] < node.key else bisect.bisect_left(keys, node.key)
        if at < self.committed:
            raise DeferredError(
                f"`{node.name}` draws random numbers at a place in construction order that "
                "the record has already replayed past: a lazy layer shaped after the tensors drawn after it were "
                "given values (by `tl.materialize` before `tl.build`, by `tl.build` with examples that did not reach "
                "it, or by a value read in the `tl.deferred()` block after it); until it is built, a lazy layer draws "
                "nothing. Build every lazy layer before materializing (`tl.build` with examples that reach them all), "
                "or construct this model outside `tl.deferred()`."
            )
        self.keys.insert(at, node.key)
        self.nodes[node.key] = weakref.ref(node)
        if at < self.cursor:  # only accounted for (jumped over): account again from before it
            self._rewind(at)

    def _rewind(self, first: int) -> None:
        """Forget what is known of the states from random node `first` on; the cursor goes back."""
        for k in self.keys[first:]:
            self.before.pop(k, None)
            self.after.pop(k, None)
            self.inside.pop(k, None)
        if self.cursor > first:  # back to the last place before `first` whose state is known
            restart = next((i for i in range(first - 1, -1, -1) if self.keys[i] in self.before), None)
            self.cursor = 0 if restart is None else restart
            self.cursor_state = self.entry if restart is None else self.before[self.keys[restart]]

    def reseed(self, event: Reseed) -> None:
        """From `event.key` on, draws start from the state the program set."""
        at = bisect.bisect_left(self.keys, event.key)
        self.keys.insert(at, event.key)
        self.reseeds[event.key] = event
        self._reseed_keys = None
        if at < self.cursor:
            self._rewind(at)

    def epoch(self, key: Key, record: Record) -> tuple[int, int] | None:
        """(the seed of the state the program last set before `key`, the draws between), for `counter_key`;
        None where the program set nothing since the record began on the global generator."""
        at = bisect.bisect_left(self.keys, key)
        if self._reseed_keys is None:  # sorted once per change of the reseeds, then bisected per draw
            self._reseed_keys = sorted(self.reseeds)
        before = bisect.bisect_left(self._reseed_keys, key)  # reseeds before `key`
        if not before:
            if self.generator is torch.default_generator or self.entry is None:
                return None
            return _hash(self.entry.numpy().tobytes()), at  # a generator object: where it stood at its first draw
        event = self.reseeds[self._reseed_keys[before - 1]]
        count = at - bisect.bisect_left(self.keys, event.key) - 1  # draws since the event (none is one)
        if event.state is not None:
            return _hash(event.state.numpy().tobytes()), count
        after = event.after  # a state the record itself had left (`fork_rng`): as the place just after that
        assert after is not None  # a reseed has a state or a place
        if after in self.reseeds:
            base = self.epoch((*after[:-1], after[-1] + 1), record)  # right after that event: from its epoch
            seed, offset = base if base is not None else (_hash(f"{record.seed}:{after}".encode()), 0)
        else:
            seed, offset = counter_key(record, self._node(after))
            offset += 1
        return seed, offset + count

    def _node(self, key: Key) -> Node:
        node = self.nodes[key]()
        assert node is not None  # its record holds it, and a stream is reached through its record
        return node

    def drop(self, prefix: Key) -> None:
        kept = [k for k in self.keys if k[: len(prefix)] != prefix]
        if len(kept) == len(self.keys):
            return
        first = min(i for i, k in enumerate(self.keys) if k[: len(prefix)] == prefix)
        self._rewind(first)
        for k in set(self.keys) - set(kept):
            self.nodes.pop(k, None)
            self.reseeds.pop(k, None)
        self._reseed_keys = None
        self.keys = kept

    def state_before(self, node: Node) -> torch.Tensor:
        """The generator state just before `node` draws."""
        known = self.before.get(node.key)
        if known is not None:
            return known
        index = bisect.bisect_left(self.keys, node.key)
        self.committed = max(self.committed, index + 1)  # its values are about to be made for real
        state = self._advance(index) if index >= self.cursor else self._behind(index)
        self.before[node.key] = state
        return state

    def state_into(self, node: Node, words: int) -> torch.Tensor:
        """The state `words` into `node`'s draws (where a piece of its result starts): one jump from the
        nearest known state, not one to the node and another into it."""
        if words and node.key not in self.before:
            index = bisect.bisect_left(self.keys, node.key)
            if index < self.cursor:  # passed: fold the words into the jump from behind
                self.committed = max(self.committed, index + 1)  # as `state_before`: its values are made for real
                state = self._behind(index, words)
                self.inside[node.key] = (words, state)
                return state
        state = self.state_before(node)
        return _rng.jump(state, words) if words else state

    def ran(self, node: Node, after: torch.Tensor | None = None) -> None:
        """`node` just ran from `state_before(node)`, leaving the state `after` (default: the
        generator's): move the cursor past it."""
        if self.cursor < len(self.keys) and self.keys[self.cursor] == node.key:
            self.cursor_state = self.after[node.key] = _generator_state(self.generator) if after is None else after
            self.cursor += 1

    def finish(self) -> torch.Tensor:
        """Account for every recorded draw; the state after them all (eager's after construction)."""
        return self._advance(len(self.keys))

    def _advance(self, target: int) -> torch.Tensor:
        """Move the cursor to random node `target`: jump over modelled draws, run the others on scratch."""
        state = self.cursor_state
        if state is None:  # live: start from wherever the generator is now
            state = self.entry = self.cursor_state = _generator_state(self.generator)
        pending = 0
        for key in self.keys[self.cursor : target]:
            event = self.reseeds.get(key)
            if event is not None:  # the program set the generator here
                pending = 0
                state = self.after[key] = self._reseeded(event)
                continue
            node = self._node(key)
            words = draw_words(node)
            if words is not None:
                pending += words
                continue
            if pending:
                state, pending = _rng.jump(state, pending), 0
            self.before[key] = state
            record = self._record()
            assert record is not None  # a stream is reached through its record
            state = self.after[key] = record.run_on_scratch(node, self.generator, state)
        if pending:
            state = _rng.jump(state, pending)
        if target > self.cursor:
            self.cursor, self.cursor_state = target, state
        return state

    def _reseeded(self, event: Reseed) -> torch.Tensor:
        if event.state is not None:
            return event.state
        assert event.after is not None
        return self.state_after(event.after)

    def state_after(self, key: Key) -> torch.Tensor:
        """The generator state just after the random node (or reseed event) `key`."""
        known = self.after.get(key)
        if known is not None:
            return known
        index = bisect.bisect_left(self.keys, key)
        return self._advance(index + 1) if index >= self.cursor else self._behind(index + 1)

    def _behind(self, index: int, extra: int = 0) -> torch.Tensor:
        """The state before random node `index`, already passed (and `extra` words on): from the nearest
        known state before it."""
        pending = extra
        j = index
        state: torch.Tensor | None
        while True:
            if j < len(self.keys) and self.keys[j] in self.before:
                state = self.before[self.keys[j]]
                break
            if j == 0:
                state = self.entry
                break
            previous = self.keys[j - 1]
            words = None if previous in self.reseeds else draw_words(self._node(previous))
            if words is None:  # a reseed, or an unmodelled node that ran: its state after is known
                state = self.after.get(previous)
                break
            inside = self.inside.get(previous)
            if inside is not None:  # a slice of it started there: jump on from that state
                state = inside[1]
                pending += words - inside[0]
                break
            pending += words
            j -= 1
        if state is None:
            raise DeferredError("internal: a random node behind the replay cursor has no known generator state")
        return _rng.jump(state, pending) if pending else state


# -- op arguments without a pytree walk ----------------------------------------------------

# The specs of the usual shapes of op arguments (leaves, flat lists or tuples of leaves; see
# `_fastops.flatten`): id(spec) -> (number of positional arguments, keyword names, per
# value None for a leaf or (list or tuple, length), the spec itself, kept alive).
_LAYOUTS: dict[int, tuple[int, tuple[str, ...], tuple[Any, ...], Any]] = {}


def register_layout(spec: Any, nargs: int, names: tuple[str, ...], shape: tuple[Any, ...]) -> None:
    _LAYOUTS[id(spec)] = (nargs, names, shape, spec)


def unflatten(leaves: list[Any], spec: Any) -> Any:
    """`tree_unflatten(leaves, spec)`: for a registered layout, rebuilt directly (per node, at replay)."""
    layout = _LAYOUTS.get(id(spec))
    if layout is None or layout[3] is not spec:
        return tc.tree_unflatten(leaves, spec)
    nargs, names, shape, _ = layout
    values: list[Any] = []
    i = 0
    for kind in shape:
        if kind is None:
            values.append(leaves[i])
            i += 1
        else:
            values.append(kind[0](leaves[i : i + kind[1]]))
            i += kind[1]
    return tuple(values[:nargs]), dict(zip(names, values[nargs:]))


# -- what the generator model knows of a recorded random node ---------------------------


@dataclass(frozen=True, slots=True)
class Draw:
    """A random node that fills one contiguous tensor: what `_rng` needs to place and split it."""

    op: str
    target: TRef
    numel: int
    params: dict[str, Any]
    words: int
    align: int | None  # split generation is exact at multiples of this (None: not splittable)


def _first_argument(node: Node) -> Any:
    """The first positional argument of a recorded op (None if it has none), without rebuilding the rest."""
    layout = _LAYOUTS.get(id(node.spec))
    if layout is not None and layout[3] is node.spec and layout[0] and layout[2][0] is None:
        return node.leaves[0]  # a registered layout whose first value is a leaf
    args = unflatten(node.leaves, node.spec)[0]
    return args[0] if args else None


def named_arguments(node: Node) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """A recorded op's positional arguments, and every argument by its schema name."""
    assert node.spec is not None and node.func is not None
    args, kwargs = unflatten(node.leaves, node.spec)
    return args, tc.arguments_by_name(node.func, args, kwargs)


_WITH_PARAMS = frozenset({"random_", "bernoulli_"})  # their draw counts depend on more than the target


# (op, dtype, elements) -> (words drawn, split alignment) of a draw with no parameters: a model draws into
# the same few shapes over and over, and the block's exit asks for every draw's count (its jump)
_COUNTS: dict[tuple[str, torch.dtype, int], tuple[int | None, int | None]] = {}


def draw_of(node: Node) -> Draw | None:
    """The modelled draw of `node`, or None (not random, not contiguous, or a kernel `_rng` does not model)."""
    if node.draw is not _UNKNOWN:
        return node.draw  # type: ignore[no-any-return]
    draw = None
    if node.func is not None and node.stream is not None and node.spec is not None:
        op = node.func.overloadpacket.__name__  # type: ignore[attr-defined]
        if op in _WITH_PARAMS:
            args, named = named_arguments(node)
        else:  # only the target is needed
            args, named = (_first_argument(node),), {}
        target = args[0] if args else None
        if isinstance(target, TRef) and target.stride == contiguous_strides(target.size):
            params: dict[str, Any] = {}
            if op == "random_" and ("from" in named or "to" in named):
                params = {"low": named.get("from", 0), "high": named.get("to")}
            elif op == "bernoulli_":
                params = {"p": named.get("p", 0.5)}
            numel = 1
            for n in target.size:
                numel *= n
            counts = _COUNTS.get((op, target.dtype, numel)) if not params else None
            if counts is None:
                words = _rng.words(op, target.dtype, numel, **params)
                counts = (words, None if words is None else _rng.chunk(op, target.dtype, numel, **params))
                if not params and len(_COUNTS) < 1 << 14:
                    _COUNTS[(op, target.dtype, numel)] = counts
            if counts[0] is not None:
                draw = Draw(op, target, numel, params, counts[0], counts[1])
    node.draw = draw
    return draw


def draw_words(node: Node) -> int | None:
    draw = draw_of(node)
    return None if draw is None else draw.words


_CONTIGUOUS: dict[tuple[int, ...], tuple[int, ...]] = {}


def contiguous_strides(size: tuple[int, ...]) -> tuple[int, ...]:
    """Row-major strides of `size` (kept: construction asks for the same few shapes over and over)."""
    strides = _CONTIGUOUS.get(size)
    if strides is None:
        found, step = [], 1
        for n in reversed(size):
            found.append(step)
            step *= max(n, 1)
        strides = tuple(reversed(found))
        if len(_CONTIGUOUS) < 4096:
            _CONTIGUOUS[tuple(size)] = strides
    return strides


def pieces(draw: Draw, parts: int) -> list[tuple[int, int]]:
    """Element ranges [a, b) that generate `draw` exactly in `parts` independent pieces (fewer if small)."""
    align = draw.align
    if align is None or parts <= 1:
        return [(0, draw.numel)]
    step = max(align, (draw.numel // parts) // align * align)
    starts = list(range(0, draw.numel, step))
    if len(starts) > 1 and draw.numel - starts[-1] < align:
        starts.pop()  # the last piece holds at least `align` elements (and the ragged end)
    return [(a, starts[i + 1] if i + 1 < len(starts) else draw.numel) for i, a in enumerate(starts)]


class Record:
    """What one deferred construction did, replayable per storage."""

    def __init__(self, *, live: bool = False) -> None:
        self.live = live
        self.default_dtype = torch.get_default_dtype()  # what replay runs under, whatever it is then
        # and the settings compute depends on (thread count: reductions and `orthogonal_`'s QR give other bits on
        # other counts; deterministic mode; matmul precision): recorded compute replays under the block's, or
        # under an op's own where the program changed them (`Node.numerics`); draws do not depend on them
        self.numerics = tc.numerics()
        self.order = 0  # where live records (lazy layers built outside deferred) come in the RNG stream
        self.storages: dict[int, StorageInfo] = {}
        self.names: dict[int, str] = {}  # storage id -> `Class.attribute` that registered it, for messages
        self.streams: dict[int, Stream] = {}
        self.nodes: list[Node] = []
        # checks of computed values eager makes at construction (`torch.linalg`'s errors, `_assert_async`), not yet
        # run: materialize runs them first (`run_checks`); they write nothing
        self.checks: list[tuple[Node, str]] = []  # (node, where the model's code made it)
        self._sorted = True
        self._next_sid = 0
        with tc.disable_current_modes():  # a record may begin inside a fake forward: states are real
            self._default_entry = None if live else _generator_state(torch.default_generator)
            seed_state = _generator_state(torch.default_generator).numpy().tobytes()
        # exact=False streams are keyed by this (the generator when the record began)
        self.seed = int.from_bytes(hashlib.blake2b(seed_state, digest_size=8).digest(), "little")
        self.exit_states: dict[int, torch.Tensor] = {}  # id(generator) -> its state set when the block ended
        # construction read values that may come from draws (`concretize=True`): exact=False would replay the
        # program those values steered against other values
        self.read_values = False
        self._scratch: torch.UntypedStorage | None = None
        self._adopt: tuple[dict[int, torch.UntypedStorage], set[int]] | None = None
        # what records ops on its tensors after its block (`_deferred`'s recorder of the block, which then
        # sees the record through a weak reference: no cycle)
        self.tail: Any = None
        # storages that stand for a view of a real tensor made before the block (`r[0]`): a write there would
        # not reach the real tensor, as eager's does
        self.real_views: set[int] = set()
        self.read_memory: set[tuple[int, int]] = set()  # real memory its constants read at materialize (address spans)

    def __deepcopy__(self, memo: dict[int, Any]) -> Record:
        return self  # one program, shared by every tensor (and copy) that came from it

    # -- recording -------------------------------------------------------
    def new_storage(self, meta: Any, nbytes: int, device: torch.device) -> int:
        sid = self._next_sid
        self._next_sid += 1
        self.storages[sid] = StorageInfo(sid, nbytes, device, weakref.ref(meta))
        return sid

    def stream_for(self, generator: torch.Generator | None) -> Stream:
        gen = torch.default_generator if generator is None or _is_global_cpu(generator) else generator
        stream = self.streams.get(id(gen))
        if stream is None:
            entry = self._default_entry if gen is torch.default_generator else None
            if gen is not torch.default_generator and not self.live:
                entry = _generator_state(gen)
            stream = self.streams[id(gen)] = Stream(self, gen, entry)
        return stream

    def add(self, node: Node) -> None:
        if self.nodes and node.key < self.nodes[-1].key:
            self._sorted = False
        self.nodes.append(node)
        outputs, writes = node.outputs, node.writes
        if not outputs:  # a fill, a draw, a copy: the usual case, then a factory's one new storage
            touched = writes if len(writes) < 2 else set(writes)
        elif not writes and len(outputs) == 1:
            touched = (outputs[0][1],)
        else:
            touched = {*writes, *(s for _, s in outputs)}
        for sid in touched:
            writers = self.storages[sid].writers
            if not writers or writers[-1].key < node.key:
                writers.append(node)  # construction order: the usual case
            else:
                bisect.insort(writers, node, key=lambda n: n.key)
        if node.stream is not None:
            node.stream.add(node)

    def drop(self, prefix: Key) -> None:
        """Forget every node recorded under `prefix` (a lazy layer's build that failed)."""

        def inside(n: Node) -> bool:
            return n.key[: len(prefix)] == prefix

        gone = [n for n in self.nodes if inside(n)]
        if not gone:
            return
        self.nodes = [n for n in self.nodes if not inside(n)]
        self.checks = [(n, where) for n, where in self.checks if not inside(n)]
        for n in gone:
            for _, sid in n.outputs:
                self.storages.pop(sid, None)
        for info in self.storages.values():
            info.writers = [n for n in info.writers if not inside(n)]
        for stream in self.streams.values():
            stream.drop(prefix)

    def ordered(self) -> list[Node]:
        if not self._sorted:
            self.nodes.sort(key=lambda n: n.key)
            self._sorted = True
        return self.nodes

    # -- replay ------------------------------------------------------------
    def closure(self, sids: Iterable[int], bound: Key | None) -> list[Node]:
        """The nodes that the values of `sids` (just before `bound`) depend on.

        Writes that a later full overwrite makes dead are left out: the values of
        a parameter that `reset_parameters` initialized and `_init_weights` then
        re-drew come from the last draw only. (Their random draws still happen, on
        scratch memory, when the generator must move past them.)
        """
        chosen: dict[int, Node] = {}
        seen: set[tuple[int, Key | None]] = set()
        todo: list[tuple[int, Key | None]] = [(sid, bound) for sid in sids]
        while todo:
            sid, limit = todo.pop()
            if (sid, limit) in seen:
                continue
            seen.add((sid, limit))
            writers = self.storages[sid].writers
            stop = len(writers) if limit is None else bisect.bisect_left(writers, limit, key=lambda n: n.key)
            start = next((i for i in range(stop - 1, -1, -1) if writers[i].overwrites == sid), 0)
            for node in writers[start:stop]:
                if id(node) in chosen:
                    continue
                chosen[id(node)] = node
                todo.extend((r, node.key) for r in node.reads)
        return sorted(chosen.values(), key=lambda n: n.key)

    def evaluate(
        self,
        sids: Iterable[int],
        *,
        bound: Key | None = None,
        device: torch.device | str = "cpu",
        exact: bool = True,
        on_ready: Callable[[int, torch.UntypedStorage], None] | None = None,
        adopt: Iterable[int] = (),
    ) -> dict[int, torch.UntypedStorage]:
        """Replay what `sids` need; hand each wanted storage over once it is final.

        `adopt`: wanted storages that are kept as they are (no cast, no move);
        dead draws into them, which the generator must still make, go straight
        into their memory instead of a scratch buffer. Returns the wanted
        storages not consumed by `on_ready`.
        """
        wanted = set(sids)
        missing = wanted - self.storages.keys()
        if missing:
            raise DeferredError(f"internal: storages {sorted(missing)} are not in this record")
        nodes = self.closure(wanted, bound)
        last: dict[int, int] = {}
        for i, node in enumerate(nodes):
            for sid in (*node.reads, *node.writes, *(s for _, s in node.outputs)):
                last[sid] = i
        release: dict[int, list[int]] = {}
        for sid, i in last.items():
            release.setdefault(i, []).append(sid)
        env: dict[int, torch.UntypedStorage] = {}
        result: dict[int, torch.UntypedStorage] = {}
        device = torch.device(device)
        outer = self._adopt
        if adopt:
            self._adopt = (env, {sid for sid in adopt if sid in wanted and device.type == "cpu"})
        try:
            self._replay(nodes, env, device, exact, release, wanted, on_ready, result)
        finally:
            self._adopt = outer
        return result

    def _replay(
        self,
        nodes: list[Node],
        env: dict[int, torch.UntypedStorage],
        device: torch.device,
        exact: bool,
        release: dict[int, list[int]],
        wanted: set[int],
        on_ready: Callable[[int, torch.UntypedStorage], None] | None,
        result: dict[int, torch.UntypedStorage],
    ) -> None:
        pending: dict[int, list[Future[None]]] = {}  # storages that workers are still filling
        waiting: list[tuple[int, torch.UntypedStorage]] = []  # final, once their workers are done

        def hand_over(sid: int, storage: torch.UntypedStorage) -> None:
            if on_ready is not None:
                on_ready(sid, storage)
            else:
                result[sid] = storage

        def hand_over_done(block: bool) -> None:
            while waiting and (block or all(f.done() for f in pending.get(waiting[0][0], ()))):
                sid, storage = waiting.pop(0)
                _wait(pending, (sid,))
                hand_over(sid, storage)

        with torch.no_grad():
            try:
                for i, node in enumerate(nodes):
                    self._run(node, env, device, exact, pending)
                    for sid in release.get(i, ()):
                        storage = env.pop(sid)
                        if sid in wanted:
                            waiting.append((sid, storage))
                    hand_over_done(block=False)
                hand_over_done(block=True)
            finally:
                for futures in pending.values():  # on failure: let workers finish before memory goes
                    wait(futures)

    def run_checks(self) -> None:
        """Run the value checks construction made (`torch.linalg.cholesky` of a matrix that is not positive definite
        raises at once in eager code; in the block its values were unknown): each on the values its inputs had then.
        A failing check raises a DeferredError; checks that passed are not run again."""
        while self.checks:
            node, where = self.checks[0]
            with GENERATOR_LOCK, explicit_generators_kept([self]), torch.no_grad():  # replay sets generators
                saved = torch.default_generator.get_state()
                try:
                    self._call(node, self.evaluate(node.reads, bound=node.key), torch.device("cpu"), where=where)
                finally:
                    torch.default_generator.set_state(saved)
                    self.release_scratch()
            self.checks.pop(0)

    def run_on_scratch(self, node: Node, generator: torch.Generator, state: torch.Tensor) -> torch.Tensor:
        """Run a random node only for its draws, from `state` on `generator`: inputs it overwrites are scratch.
        Its other inputs are made first (a random input draws from the generator itself: `bernoulli(p)` of a
        `p = rand(n)`), then the generator is set. Returns the state after it."""
        # a storage it writes that is also another argument (`t.bernoulli_(t)`: its probabilities) is an input too
        named = [leaf.sid for leaf in node.leaves if isinstance(leaf, TRef)]
        read_back = {sid for sid in node.writes if named.count(sid) > 1}
        inputs = [s for s in node.reads if s not in node.writes or s in read_back]
        env = self.evaluate(inputs, bound=node.key) if inputs else {}
        adopted, adoptable = self._adopt if self._adopt is not None else ({}, set())
        for i, sid in enumerate(dict.fromkeys(node.writes)):
            nbytes = self.storages[sid].nbytes
            if sid in read_back:
                env[sid] = env[sid].clone()  # its values before the draw, in memory of its own
            elif sid in adoptable:  # its final memory: allocated now instead of at the overwrite
                env[sid] = adopted.setdefault(sid, torch.empty(nbytes, dtype=torch.uint8).untyped_storage())
            elif i == 0:
                env[sid] = self._scratch_storage(nbytes)
            else:
                env[sid] = torch.empty(nbytes, dtype=torch.uint8).untyped_storage()
        with torch.no_grad():
            return self._draw_unmodelled(node, env, torch.device("cpu"), generator, state=state)

    def _scratch_storage(self, nbytes: int) -> torch.UntypedStorage:
        """One reusable buffer for draws nobody keeps (no fresh pages, no growth per draw)."""
        if self._scratch is None or self._scratch.nbytes() < nbytes:
            self._scratch = None
            self._scratch = torch.empty(nbytes, dtype=torch.uint8).untyped_storage()
        return self._scratch

    def release_scratch(self) -> None:
        self._scratch = None

    def _run(
        self,
        node: Node,
        env: dict[int, torch.UntypedStorage],
        device: torch.device,
        exact: bool,
        pending: dict[int, list[Future[None]]] | None = None,
    ) -> None:
        stream = node.stream
        if node.law is not None and node.func is law_marker:  # a law noted after an initializer's ops
            if not exact:
                try:
                    self._fill_by_counter(node, node.law, env, device, pending)
                except ValueError:  # a law too narrow to sample by counter: the recorded program stands
                    pass
            return
        if stream is None:
            # exact=False: one thread for every computed value (a QR, a reduction may round otherwise on
            # another thread count), so that its values do not depend on the constructing process's count
            if node.meta_draw:
                func = tc.with_generator(node.func) or node.func
                generator = torch.Generator(device="cpu")
                self._call(node, env, device, pending, threads=1, generator=generator, func=func)
                return
            self._call(node, env, device, pending, threads=None if exact else 1)
            return
        if exact:
            draw = draw_of(node)
            workers = _workers()
            if draw is not None and pending is not None and workers > 1 and draw.numel >= PARALLEL_MIN:
                self._draw_in_pieces(node, draw, stream.state_before(node), env, workers, pending)
                return  # the stream's cursor stays before it: moving past it adds its word count
            if draw is not None and device.type == "cpu":
                args, kwargs = self._real_arguments(node, env, device, pending)
                stream.ran(node, run_draw(node.func, args, kwargs, stream.state_before(node)))
                return
            after = self._draw_unmodelled(node, env, device, stream.generator, pending, state=stream.state_before(node))
            stream.ran(node, after)
        else:
            law = counter_law(node)
            if law is not None:
                self._fill_by_counter(node, law, env, device, pending)
                return
            gen = default_generator(device) if stream.generator is torch.default_generator else stream.generator
            self._draw_unmodelled(node, env, device, gen, pending, seed=self.seed_for(node), threads=1)

    def _draw_unmodelled(
        self,
        node: Node,
        env: dict[int, torch.UntypedStorage],
        device: torch.device,
        generator: torch.Generator,
        pending: dict[int, list[Future[None]]] | None = None,
        *,
        state: torch.Tensor | None = None,
        seed: int | None = None,
        threads: int | None = None,
    ) -> torch.Tensor:
        """Run a random node the generator model does not cover, from `state` (or seeded by `seed`) on `generator`;
        returns the state after it. A process-wide default generator is not touched where the op takes a
        `generator=` argument: a generator of its own at that state runs it instead (another thread drawing from
        the global generator meanwhile neither changes these values nor sees its stream set back)."""
        func = None
        if _is_default(generator):
            func = tc.with_generator(node.func)
            if func is not None:
                generator = torch.Generator(device=generator.device)
            else:
                _GLOBAL_SETS[0] += 1  # the shared generator set: `materialize` puts it back
        if state is not None:
            generator.set_state(state)
        else:
            assert seed is not None  # one of the two
            generator.manual_seed(seed)
        self._call(node, env, device, pending, threads=threads, generator=generator, func=func)
        return generator.get_state()

    def _draw_in_pieces(
        self,
        node: Node,
        draw: Draw,
        state: torch.Tensor,
        env: dict[int, torch.UntypedStorage],
        workers: int,
        pending: dict[int, list[Future[None]]],
    ) -> None:
        """Run a modelled draw on worker threads, each piece on its own generator placed by a jump:
        the bits eager's single serial kernel gives, whatever the number of pieces."""
        args, kwargs = self._real_arguments(node, env, torch.device("cpu"), pending)
        flat = args[0].view(-1)
        parts = workers if draw.numel >= SPLIT_MIN else 1  # smaller draws: parallel across nodes, no extra jump
        futures = [
            _pool().submit(_draw_piece, node.func, (flat[a:b], *args[1:]), kwargs, state, offset)
            for a, b in pieces(draw, parts)
            for offset in [_rng.word_offset(draw.op, draw.target.dtype, draw.numel, a, **draw.params) or 0]
        ]
        _in_flight(node, futures, pending, workers)

    def seed_for(self, node: Node) -> int:
        """A seed for `node` in non-exact replay (kernels with no counter-based law): from the
        state captured when the record began and the node's place, not from any layout."""
        seed, place = counter_key(self, node)  # both: the place alone gave every seed the same values
        return _hash(f"{seed}:{place}".encode()) & ((1 << 63) - 1)

    def _fill_by_counter(
        self,
        node: Node,
        law: tuple[str, dict[str, Any]],
        env: dict[int, torch.UntypedStorage],
        device: torch.device,
        pending: dict[int, list[Future[None]]] | None = None,
    ) -> None:
        """Non-exact values of a random node: element i of its result is a function of the record's
        seed, the node's place and i alone (a counter-based stream), whatever the layout. Large CPU
        fills run on the worker threads (`pending` holds them until a later node needs the storage)."""
        args, _ = self._real_arguments(node, env, device, pending)
        target: torch.Tensor = args[0]
        key = counter_key(self, node)
        if device.type == "cpu" and target.is_contiguous() and pending is not None and target.numel() >= PARALLEL_MIN:
            workers = _workers()
            parts = workers if target.numel() >= SPLIT_MIN else 1  # smaller fills: parallel across nodes
            jobs = _counter.fill_jobs(target, law[0], law[1], key, parts)  # checks the law here, not in a worker
            _in_flight(node, [_pool().submit(job) for job in jobs], pending, workers)
            return
        values = (
            torch.empty(target.shape, dtype=target.dtype)
            if device.type != "cpu" or not target.is_contiguous()
            else target
        )
        _counter.fill(values.view(-1) if values.dim() else values.view(1), law[0], law[1], key)
        if values is not target:
            target.copy_(values)

    def _real_arguments(
        self,
        node: Node,
        env: dict[int, torch.UntypedStorage],
        device: torch.device,
        pending: dict[int, list[Future[None]]] | None,
    ) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """`node`'s arguments on real storages, once the workers writing them are done."""
        _wait(pending or {}, (*node.reads, *node.writes))
        self._ensure_target(node, env, device)
        assert node.spec is not None
        return unflatten([_real(leaf, env, device) for leaf in node.leaves], node.spec)  # type: ignore[no-any-return]

    def _ensure_target(self, node: Node, env: dict[int, torch.UntypedStorage], device: torch.device) -> None:
        if node.overwrites is not None and node.overwrites not in env:  # its earlier writes were dead
            nbytes = self.storages[node.overwrites].nbytes
            env[node.overwrites] = torch.empty(nbytes, dtype=torch.uint8, device=device).untyped_storage()

    def _call(
        self,
        node: Node,
        env: dict[int, torch.UntypedStorage],
        device: torch.device,
        pending: dict[int, list[Future[None]]] | None = None,
        threads: int | None = None,
        generator: torch.Generator | None = None,
        func: Any = None,
        where: str = "",
    ) -> None:
        """Run `node` on real tensors, under its default dtype, numerics and `threads` (its own count by default);
        `generator`: the one it draws from, where it differs from the process-wide default it was recorded with,
        through `func` (the op, or its overload that takes `generator=`); `where`: where the model's code made it,
        for a failure's message."""
        if pending:
            _wait(pending, (*node.reads, *node.writes))
        self._ensure_target(node, env, device)
        leaves = [_real(leaf, env, device) for leaf in node.leaves]
        if node.func is None:
            out: Any = leaves[0]
        else:
            assert node.spec is not None
            args, kwargs = unflatten(leaves, node.spec)
            if generator is not None and not _is_default(generator):
                args, kwargs = tc.pass_generator(func or node.func, args, kwargs, generator)
            dtype = node.default_dtype or self.default_dtype
            previous = torch.get_default_dtype()
            wanted = node.numerics or self.numerics
            if threads is not None and wanted[0] != threads:
                wanted = (threads, *wanted[1:])
            try:
                if dtype is not previous:
                    torch.set_default_dtype(dtype)
                with tc.replay_settings(wanted):
                    out = (func or node.func)(*args, **kwargs)
            except Exception as e:
                if device.type == "cpu":  # as eager ran it: the values it got fail it, as they failed eager's
                    raise DeferredError(
                        f"replaying `{node.name}`{f' (made {where})' if where else ''} failed on the values "
                        f"construction computed: {type(e).__name__.lstrip('_')}: {str(e).rstrip('.')}. Eager "
                        "construction raises this error there (a `torch.linalg` function on a singular or not "
                        "positive-definite matrix, an assert on values), so there is no model to materialize. Fix "
                        "the construction code; to handle the error in the model's code as eager code does, "
                        "construct under `tl.deferred(concretize=True)`, where such checks run at once."
                    ) from e
                raise DeferredError(
                    f"replaying `{node.name}` on {device} failed: {e}. The operation ran during "
                    "deferred construction; if it cannot run on this device, materialize on "
                    "`device='cpu'` and move the model afterwards."
                ) from e
            finally:
                if dtype is not previous:
                    torch.set_default_dtype(previous)
        flat = tc.tree_leaves(out)
        constants = {
            leaf.value.untyped_storage().data_ptr()
            for leaf in node.leaves
            if isinstance(leaf, Const) and isinstance(leaf.value, torch.Tensor)
        }
        for index, sid in node.outputs:
            storage = flat[index].untyped_storage()
            if constants and storage.data_ptr() in constants:
                storage = storage.clone()  # a constant's own memory (`lift_fresh`): later writes go to a copy
            env[sid] = storage


def law_marker(t: torch.Tensor) -> torch.Tensor:
    """The function of a law node: exact replay leaves the tensor as the recorded ops made it."""
    return t


# -- exact=False: counter-based values -------------------------------------------------------

# aten random op -> (law of `_counter`, {law parameter: schema argument name})
_LAWS: dict[str, tuple[str, dict[str, str]]] = {
    "uniform_": ("uniform", {"from": "from", "to": "to"}),
    "normal_": ("normal", {"mean": "mean", "std": "std"}),
    "log_normal_": ("log_normal", {"mean": "mean", "std": "std"}),
    "exponential_": ("exponential", {"lambd": "lambd"}),
    "cauchy_": ("cauchy", {"median": "median", "sigma": "sigma"}),
    "geometric_": ("geometric", {"p": "p"}),
    "bernoulli_": ("bernoulli", {"p": "p"}),
}


def counter_law(node: Node) -> tuple[str, dict[str, Any]] | None:
    """The law (and its parameters) a random node samples, for counter-based values; None where
    the node is not an in-place draw of a known law with plain-number parameters."""
    if node.func is None or node.stream is None or node.spec is None:
        return None
    if node.law is not None:
        return node.law
    found = _LAWS.get(node.func.overloadpacket.__name__)  # type: ignore[attr-defined]
    if found is None:
        return None
    args, named = named_arguments(node)
    if not args or not isinstance(args[0], TRef) or not args[0].dtype.is_floating_point:
        return None
    params = {law_name: named[arg] for law_name, arg in found[1].items() if arg in named}
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in params.values()):
        return None  # a tensor of probabilities, say
    return found[0], params


def counter_key(record: Record, node: Node) -> tuple[int, int]:
    """(a seed, a place): names the node's counter-based stream. The record's seed and the node's place in it;
    where the program set its generator inside the record (`torch.manual_seed(s)` in the block, a generator
    object seeded there), the state it set and the number of draws since, so that another seed gives other
    values and the same seed set twice gives the same ones, as in eager."""
    stream = node.stream if node.stream is not None else node.law_stream
    epoch = stream.epoch(node.key, record) if stream is not None else None
    if epoch is not None:
        return epoch
    return record.seed, _hash(repr(node.key).encode())


def _hash(data: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little")


# -- worker threads for exact draws ------------------------------------------------------

PARALLEL_MIN = 1 << 16  # elements: smaller draws run inline (a thread hop costs more than they do)
SPLIT_MIN = 1 << 23  # elements: larger draws are also split over the workers (a jump per piece)
_POOLS: dict[int, ThreadPoolExecutor] = {}


def _workers() -> int:
    return max(1, torch.get_num_threads())


def _pool() -> ThreadPoolExecutor:
    n = _workers()
    if n not in _POOLS:
        _POOLS[n] = ThreadPoolExecutor(max_workers=n, thread_name_prefix="torchlazy-draw")
    return _POOLS[n]


def _draw_piece(func: Any, args: tuple[Any, ...], kwargs: dict[str, Any], state: torch.Tensor, offset: int) -> None:
    run_draw(func, args, kwargs, _rng.jump(state, offset) if offset else state)


def _in_flight(node: Node, futures: list[Future[None]], pending: dict[int, list[Future[None]]], workers: int) -> None:
    """`node`'s storages are being written by `futures`; keep memory bounded by letting finished
    storages be handed over before more work is queued."""
    for sid in dict.fromkeys(node.writes):
        pending.setdefault(sid, []).extend(futures)
    in_flight = [f for fs in pending.values() for f in fs if not f.done()]
    if len(in_flight) > 2 * workers:
        wait(in_flight, return_when=FIRST_COMPLETED)


def _wait(pending: dict[int, list[Future[None]]], sids: Iterable[int]) -> None:
    for sid in sids:
        for future in pending.pop(sid, ()):
            future.result()


def _real(leaf: Any, env: dict[int, torch.UntypedStorage], device: torch.device) -> Any:
    if isinstance(leaf, TRef):
        return leaf.on(env[leaf.sid])
    if isinstance(leaf, SRef):
        return env[leaf.sid]
    if isinstance(leaf, Const):
        if leaf.changed():
            raise DeferredError(
                f"a real tensor of shape {tuple(leaf.value.shape)} that was given to the deferred model "
                "(`load_state_dict`, `copy_`, ...) was changed in place before `tl.materialize`, which "
                "reads it only now. Materialize before changing it, or pass a copy (`t.clone()`)."
            )
        return leaf.value.to(device) if leaf.value.device != device else leaf.value
    if isinstance(leaf, torch.device):
        return device
    return leaf


@contextlib.contextmanager
def explicit_generators_kept(records: Iterable[Record]) -> Iterator[None]:
    """Replay sets the states of the `torch.Generator` objects construction drew from; they are put back where
    they were (where the block left them: eager's after construction), so materialize never moves them. Live
    records (lazy layers built eagerly) draw as eager code would: theirs move."""
    gens = {
        id(s.generator): s.generator
        for r in records
        if not r.live
        for s in r.streams.values()
        if s.generator is not torch.default_generator
    }
    states = {k: g.get_state() for k, g in gens.items()}
    try:
        yield
    finally:
        for k, g in gens.items():
            g.set_state(states[k])


# how many times replay set a process-wide default generator (an op with no `generator=` argument): `materialize`
# puts the global generator back only then (or where it moves it on purpose)
_GLOBAL_SETS = [0]


def global_sets() -> int:
    return _GLOBAL_SETS[0]


def _is_global_cpu(generator: torch.Generator) -> bool:
    """Whether `generator` is torch's global CPU generator under another Python object (an op's `generator=`
    argument reaches dispatch as a new wrapper of it): set the global one's seed and see whether it follows."""
    if generator is torch.default_generator:
        return True
    if generator.device.type != "cpu":
        return False
    glob = torch.default_generator
    if generator.initial_seed() != glob.initial_seed():
        return False
    saved = glob.get_state()
    probe = glob.initial_seed() ^ 0x5DEECE66D
    glob.manual_seed(probe)
    same = generator.initial_seed() == probe
    glob.set_state(saved)
    return same


def _is_default(generator: torch.Generator) -> bool:
    if generator is torch.default_generator:
        return True
    return generator.device.type == "cuda" and generator in torch.cuda.default_generators


def default_generator(device: torch.device) -> torch.Generator:
    if device.type == "cpu":
        return torch.default_generator
    if device.type == "cuda":
        return torch.cuda.default_generators[device.index or 0]
    return torch.Generator(device)
