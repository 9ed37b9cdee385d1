"""The model of torch's CPU generator: where it is, and where an op leaves it.

torch's CPU generator is a plain MT19937 (Matsumoto & Nishimura, 1998). ``Generator.get_state()`` is 5,056 bytes::

    u64 seed; i32 left; i32 seeded; u64 next; u64 state[624];         # the MT block and the read position
    f64 normal_x, normal_y, normal_rho; i32 normal_is_valid (+pad)    # the cached Box-Muller sample (double)
    f32 next_float_normal_sample; bool valid (+pad)                    # the cached float sample

A draw does ``if (--left == 0) refill(); return temper(state[next++])``: ``state`` holds the current block of the
untempered stream ``x[624 m .. 624 m + 623]``, ``next`` the index of the next word in it and ``left == 625 - next``
(after seeding: ``next == 0, left == 1``, the block is the seed array and the first draw refills).

MT19937 is linear over GF(2): with ``phi`` the characteristic polynomial of its 19,937-bit state (a constant,
found once by Berlekamp-Massey, see ``_PHI_TERMS``), advancing a generated block by ``D`` words is
``g(T)`` with ``g = x^D mod phi``: each word of the target block is the XOR of the words ``x[k + i + j]``, ``i``
over the terms of ``g`` (Haramoto et al., "Efficient jump ahead for F2-linear random number generators", 2008).
The cost does not depend on ``D``. ``g`` is cached by distance, so repeated jumps cost only the last step.

``words`` says how many 32-bit words a kernel of torch 2.13 consumes (``None`` where it is not modelled),
``chunk``/``word_offset`` how one result can be generated in exact pieces. The heavy loops run in the optional
compiled core ``torchlazy._mtcore`` when it was built (``TORCHLAZY_NO_EXT=1`` forces the pure-Python path, which
gives the same bits more slowly).

>>> g = torch.Generator().manual_seed(0)
>>> before = g.get_state()
>>> x = torch.empty(1000).uniform_(generator=g)
>>> torch.equal(jump(before, words("uniform_", torch.float32, 1000)), g.get_state())
True
"""

from __future__ import annotations

import ctypes
import functools
import os
import struct
import threading
from types import ModuleType

import torch

from . import _torch_compat as tc

__all__ = ["after", "backend", "chunk", "distance", "generator_at", "jump", "state_bytes", "word_offset", "words"]

# MT19937 parameters.
_N = 624
_M = 397
_MATRIX_A = 0x9908B0DF
_UPPER = 0x80000000
_LOWER = 0x7FFFFFFF

# torch's CPU generator state (CPUGeneratorImpl.cpp, the legacy THGeneratorState layout).
STATE_BYTES = 5056
_HEAD = struct.Struct("<QiiQ")  # seed, left, seeded, next
_BLOCK_AT = _HEAD.size
_BLOCK_BYTES = 8 * _N
_BLOCK = struct.Struct(f"<{_N}Q")

# Exponents of the characteristic polynomial phi of MT19937 (degree 19937, 135 terms), from Berlekamp-Massey on
# bit 0 of 2 x 19937 generated words; tests check that it annihilates every bit of the stream.
_PHI_DEGREE = 19937
_PHI_TERMS = tuple(
    int(t)
    for t in (
        "0 1189 1416 1585 1643 1870 2493 2773 3000 3227 3454 3681 3908 4135 4362 4753 5661 6337 6569 7129 "
        "7477 7525 7583 7752 7979 8206 9505 9901 9969 10128 10693 10761 10920 11089 11147 11157 11215 11321 "
        "11374 11384 11485 11611 11712 11717 11838 11881 11944 11997 12277 12335 12393 12504 12509 12620 "
        "12673 12731 12736 12789 12905 12958 12963 13137 13185 13190 13243 13301 13412 13528 13533 13639 "
        "13697 13760 13813 13866 14093 14151 14209 14320 14325 14436 14547 14552 14605 14721 14774 14779 "
        "14953 15001 15006 15059 15117 15228 15344 15349 15455 15513 15576 15629 15682 15909 15967 16025 "
        "16136 16141 16252 16363 16368 16421 16537 16590 16595 16817 16822 16875 16933 17044 17160 17271 "
        "17329 17445 17498 17725 17783 17841 17952 18068 18179 18237 18406 18633 18691 18860 19087 19314 "
        "19937 "
    ).split()
)
_PHI_LOW = _PHI_TERMS[:-1]
_PHI_TERMS_BYTES = struct.pack(
    f"<{len(_PHI_TERMS)}I", *_PHI_TERMS
)  # what the compiled core takes  # phi = x^19937 + sum(x^t for t in _PHI_LOW)
_WINDOW = _PHI_DEGREE + _N - 1  # words x[k .. k + _WINDOW) feed one combination step
_WINDOW_BLOCKS = -(-_WINDOW // _N)

# Below these many blocks, refilling block after block is cheaper than a polynomial jump (measured by
# benchmarks/bench_rng.py on the machine of the README).
_DIRECT_BLOCKS = {"c": 4096, "python": 256}
# ... and below these many once the distance's polynomial is known (asked before: a sharded replay jumps the
# same few distances layer after layer; a cached polynomial jump costs ~0.23 ms, 1,650 refills, in the core).
_DIRECT_BLOCKS_KNOWN = {"c": 1536, "python": 256}
_ASKED: dict[int, None] = {}  # distances (in blocks) asked once, oldest first; bounded
_ASKED_LOCK = threading.Lock()  # split draws jump from the worker threads


def backend() -> str:
    """``"c"`` where the compiled core ``torchlazy._mtcore`` is importable and not disabled by
    ``TORCHLAZY_NO_EXT=1``, else ``"python"``."""
    return "python" if _core() is None else "c"


def _core() -> ModuleType | None:
    if os.environ.get("TORCHLAZY_NO_EXT", "") not in ("", "0"):
        return None
    return _ext


try:
    from torchlazy import _mtcore as _ext  # type: ignore[attr-defined]
except ImportError:  # built without a compiler, or a source checkout that never ran build_ext
    _ext = None


# ---------------------------------------------------------------------------------------------------------------
# The pure-Python path. Blocks travel as bytes in torch's own layout (624 little-endian u64), polynomials as ints
# (bit i = coefficient of x^i).


def _refill(s: list[int]) -> None:
    """One MT19937 refill in place: ``s`` becomes the next block of the stream."""
    for j in range(_N - _M):
        y = (s[j] & _UPPER) | (s[j + 1] & _LOWER)
        s[j] = s[j + _M] ^ (y >> 1) ^ (_MATRIX_A if y & 1 else 0)
    for j in range(_N - _M, _N - 1):
        y = (s[j] & _UPPER) | (s[j + 1] & _LOWER)
        s[j] = s[j + _M - _N] ^ (y >> 1) ^ (_MATRIX_A if y & 1 else 0)
    y = (s[_N - 1] & _UPPER) | (s[0] & _LOWER)
    s[_N - 1] = s[_M - 1] ^ (y >> 1) ^ (_MATRIX_A if y & 1 else 0)


def _py_advance(block: bytes, n_blocks: int) -> bytes:
    if n_blocks < 0:
        raise ValueError(f"n_blocks must be >= 0, got {n_blocks}")
    s = list(_BLOCK.unpack(block))
    for _ in range(n_blocks):
        _refill(s)
    return _BLOCK.pack(*s)


def _spread_masks(bits: int) -> list[tuple[int, int]]:
    # For x < 2^bits (bits a power of two): x -> the same bits at even positions, by halving steps.
    out = []
    step = bits // 2
    while step:
        period = 2 * step
        pattern = (1 << step) - 1
        mask = 0
        for k in range(0, 2 * bits, period):
            mask |= pattern << k
        out.append((step, mask))
        step //= 2
    return out


_SQUARE_BITS = 1 << (_PHI_DEGREE - 1).bit_length()  # 32768
_SQUARE_MASKS = _spread_masks(_SQUARE_BITS)
_LOW_MASK = (1 << _PHI_DEGREE) - 1


def _py_square_mod(p: int) -> int:
    for step, mask in _SQUARE_MASKS:  # carry-less square = bit i moves to 2i
        p = (p | (p << step)) & mask
    return _py_reduce(p)


def _py_reduce(p: int) -> int:
    while p >> _PHI_DEGREE:
        hi = p >> _PHI_DEGREE
        p &= _LOW_MASK
        for t in _PHI_LOW:  # x^19937 == sum(x^t)
            p ^= hi << t
    return p


def _py_powmod(d: int) -> int:
    """``x^d mod phi``."""
    p = 1
    for bit in bin(d)[2:]:
        p = _py_square_mod(p)
        if bit == "1":
            p <<= 1
            if p >> _PHI_DEGREE:
                p ^= (1 << _PHI_DEGREE) | sum(1 << t for t in _PHI_LOW)
    return p


def _py_combine(g: int, block: bytes) -> bytes:
    """``g(T)`` applied to a generated block: word j of the result is the XOR of ``x[i + j]`` over the terms
    ``x^i`` of ``g``, ``x`` the stream that starts with ``block``."""
    s = list(_BLOCK.unpack(block))
    stream = list(s)
    for _ in range(_WINDOW_BLOCKS - 1):
        _refill(s)
        stream += s
    window = struct.pack(f"<{len(stream)}I", *stream)
    acc = 0
    width = 4 * _N
    i = 0
    while g:
        if g & 1:
            acc ^= int.from_bytes(window[4 * i : 4 * i + width], "little")
        g >>= 1
        i += 1
    return _BLOCK.pack(*struct.unpack(f"<{_N}I", acc.to_bytes(width, "little")))


# ---------------------------------------------------------------------------------------------------------------
# Jumps.


@functools.lru_cache(maxsize=512)
def _jump_poly(n_words: int, which: str) -> int:
    core = _core() if which == "c" else None
    if core is not None and n_words < 1 << 64:  # the core takes a u64 distance
        return int.from_bytes(core.powmod(n_words, _PHI_TERMS_BYTES), "little")
    return _py_powmod(n_words)


def _advance_blocks(block: bytes, n_blocks: int) -> bytes:
    """The block ``n_blocks`` refills after ``block``, which must come from a refill (not straight from seeding)."""
    core = _core()
    which = "python" if core is None else "c"
    direct = n_blocks <= _DIRECT_BLOCKS[which]
    if direct and n_blocks > _DIRECT_BLOCKS_KNOWN[which]:
        with _ASKED_LOCK:
            direct = n_blocks not in _ASKED  # asked again: worth a cached polynomial
            _ASKED[n_blocks] = None
            if len(_ASKED) > 512:
                del _ASKED[next(iter(_ASKED))]
    if direct:
        return _py_advance(block, n_blocks) if core is None else core.advance(block, n_blocks)
    g = _jump_poly(n_blocks * _N, which)
    if core is None:
        return _py_combine(g, block)
    return core.combine(g.to_bytes(_BLOCK_BYTES // 2, "little"), block)


def state_bytes(state: torch.Tensor) -> bytes:
    """The 5,056 bytes of a CPU generator state tensor (what the compiled cores take)."""
    if not isinstance(state, torch.Tensor) or state.dtype != torch.uint8 or state.numel() != STATE_BYTES:
        seen = f"{type(state).__name__}" if not isinstance(state, torch.Tensor) else f"{state.dtype} x {state.numel()}"
        raise ValueError(
            f"expected a CPU generator state (`torch.Generator().get_state()`: uint8 x {STATE_BYTES}), got {seen}"
        )
    flat = state.detach().cpu().contiguous()
    return ctypes.string_at(flat.data_ptr(), STATE_BYTES)  # numpy is not a dependency: no `.numpy()`


def jump(state: torch.Tensor, n_words: int) -> torch.Tensor:
    """The CPU generator state ``state`` advanced by exactly ``n_words`` 32-bit outputs, as if torch had drawn
    them (same block, ``next`` and ``left`` as torch would hold, including a refill left pending at a block end).

    Any ``n_words >= 0``; the cost does not grow with it (about 0.3 ms in the compiled core once the jump
    polynomial of that distance is cached, ~1 ms for a new distance). The seed and the cached normal samples are copied unchanged: torch
    only touches those in the scalar ``normal_`` path, which ``words`` does not model.
    """
    raw = state_bytes(state)
    if n_words < 0:
        raise ValueError(f"a generator only moves forward: `n_words` must be >= 0, got {n_words}")
    seed, left, seeded, nxt = _HEAD.unpack_from(raw)
    ready = left - 1  # words torch serves from the current block before it refills
    if ready < 0 or nxt + ready > _N:
        raise ValueError(f"not a consistent MT19937 state: next={nxt}, left={left}")
    if n_words <= ready:
        nxt, left = nxt + n_words, left - n_words
        block = raw[_BLOCK_AT : _BLOCK_AT + _BLOCK_BYTES]
    else:
        rest = n_words - ready  # >= 1 words drawn after the next refill
        blocks, nxt = divmod(rest - 1, _N)
        nxt += 1
        left = _N + 1 - nxt
        block = _advance_blocks(raw[_BLOCK_AT : _BLOCK_AT + _BLOCK_BYTES], 1)  # now a generated block
        if blocks:
            block = _advance_blocks(block, blocks)
    out = bytearray(raw)
    _HEAD.pack_into(out, 0, seed, left, seeded, nxt)
    out[_BLOCK_AT : _BLOCK_AT + _BLOCK_BYTES] = block
    return torch.frombuffer(out, dtype=torch.uint8)


def generator_at(state: torch.Tensor) -> torch.Generator:
    """A new CPU generator set to ``state``."""
    g = torch.Generator(device="cpu")
    g.set_state(state)
    return g


def distance(before: torch.Tensor, after: torch.Tensor, limit: int = 1 << 24) -> int | None:
    """How many words lead from ``before`` to ``after`` (``jump(before, n)`` equals ``after`` up to the cached
    normal samples), or ``None`` if no ``n <= limit`` does. Costs about ``n`` refills: for calibration, not jumps."""
    a, b = state_bytes(before), state_bytes(after)
    _, left_a, _, next_a = _HEAD.unpack_from(a)
    _, left_b, _, next_b = _HEAD.unpack_from(b)
    if a[:8] != b[:8] or a[12:16] != b[12:16]:
        return None  # another seed
    block_a, block_b = a[_BLOCK_AT : _BLOCK_AT + _BLOCK_BYTES], b[_BLOCK_AT : _BLOCK_AT + _BLOCK_BYTES]
    ready = left_a - 1
    if block_a == block_b and 0 <= next_b - next_a <= ready and left_a - left_b == next_b - next_a:
        return next_b - next_a
    if not (1 <= next_b <= _N and left_b == _N + 1 - next_b):
        return None
    core = _core()
    step = _py_advance if core is None else core.advance
    block = step(block_a, 1)
    crossed = 0
    while ready + crossed * _N + next_b <= limit:
        if block == block_b:
            return ready + crossed * _N + next_b
        block = step(block, 1)
        crossed += 1
    return None


# ---------------------------------------------------------------------------------------------------------------
# Draw counts of torch 2.13's CPU kernels, each entry proved by tests/test_rng.py's calibration. Counts are for a
# contiguous tensor of ``numel`` elements; anything not listed returns None and must be run for real.

_F16, _BF16, _F32, _F64 = torch.float16, torch.bfloat16, torch.float32, torch.float64
_FLOATS = (_F16, _BF16, _F32, _F64)
_INTS = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64, torch.bool)

# Words per element of the serial kernels (one ``random()`` or ``random64()`` per element).
_PER_ELEMENT: dict[str, dict[torch.dtype, int]] = {
    "uniform_": {_F16: 1, _BF16: 1, _F32: 1, _F64: 2},
    "random_": {**{d: 1 for d in _FLOATS + _INTS}, _F64: 2, torch.int64: 2},  # no from/to
    "bernoulli_": dict.fromkeys(_FLOATS, 2),  # a float p: one double uniform per element
    "exponential_": dict.fromkeys(_FLOATS, 2),
    "cauchy_": dict.fromkeys(_FLOATS, 2),
    "geometric_": dict.fromkeys(_FLOATS + (torch.int32, torch.int64), 2),
}
_ALIASES = {"rand": "uniform_", "randn": "normal_", "randint": "random_"}
_RANGE_64 = 1 << 28  # random_(from, to): ranges of at least this many values draw random64 (measured)
_RANDPERM_SMALL = (1 << 32) // 20  # randperm below this draws one random() per swap (above: not calibrated)
_NORMAL_VECTOR = 16  # normal_ on >= 16 contiguous elements: Box-Muller over blocks of 16 uniforms


def _range_words(dtype: torch.dtype, low: int, high: int | None) -> int | None:
    """Words per element of ``random_(low, high)`` (``high=None``: up to the dtype's largest value)."""
    if dtype not in _FLOATS + _INTS:
        return None
    if high is None:
        if low == -(1 << 63):
            return 2 if dtype == torch.int64 else None  # the full 64-bit range
        if dtype == _F16:
            return 1  # `from` within float16's range: far below 2**32 values
        if dtype in (_BF16, _F32):
            # torch's 64-bit switch for these comes far below a span of 2**32 (measured: from <= -(2**28 - 2**24)
            # for float32, -2**28 for bfloat16), through its rounding of `from`; only the spans certainly below it
            # are modelled, the rest run (still exact)
            return 1 if low > -(1 << 24) else None
        high = (1 << 53 if dtype == _F64 else 1 if dtype == torch.bool else torch.iinfo(dtype).max) + 1
    span = high - low
    if span <= 0:
        return None  # torch raises
    if dtype in (_F32, _BF16):
        return 1 if span < (1 << 24) else None  # beyond float precision torch rounds from/to first: not modelled
    if dtype in (_F16, torch.int16, torch.int8, torch.uint8, torch.bool):
        return 1
    if dtype in (torch.int32, torch.int64, _F64):
        return 2 if span >= _RANGE_64 else 1
    return None


@functools.cache
def bernoulli_as_modelled() -> bool:
    """Whether this torch draws `bernoulli_(p)` of a float `p` as modelled here (two words per element, so that a
    draw can be jumped over and split at any element). Builds with MKL take another path on Intel CPUs: one word
    seeds MKL's own generator for the whole tensor. Probed once per process; where it differs, the kernel runs
    (still exact)."""
    g = torch.Generator().manual_seed(1)
    before = g.get_state()
    with tc.no_dispatch():  # a real draw, even inside a block
        torch.empty(37).bernoulli_(0.5, generator=g)
    return bool(torch.equal(jump(before, 2 * 37), g.get_state()))


def _per_element(op: str, dtype: torch.dtype, params: dict[str, object]) -> int | None:
    if op == "random_" and ({"low", "high"} & params.keys()):
        low, high = params.get("low", 0), params.get("high")
        if not isinstance(low, int) or not (high is None or isinstance(high, int)):
            return None
        return _range_words(dtype, low, high)
    if op == "bernoulli_" and not (isinstance(params.get("p", 0.5), (float, int)) and bernoulli_as_modelled()):
        return None  # a tensor of probabilities takes another kernel; MKL's takes one seed word (Intel CPUs)
    return _PER_ELEMENT.get(op, {}).get(dtype)


def words(op: str, dtype: torch.dtype, numel: int, **params: object) -> int | None:
    """How many 32-bit words torch's CPU kernel ``op`` draws to fill a contiguous tensor of ``numel`` elements of
    ``dtype``, or ``None`` where that is not modelled (run the kernel for real).

    ``op`` is a tensor method (``uniform_``, ``normal_``, ``random_``, ``bernoulli_``, ``exponential_``,
    ``cauchy_``, ``geometric_``, ``log_normal_``) or ``rand``/``randn``/``randint``/``randperm``. ``random_``
    takes ``low``/``high`` (torch's ``from``/``to``; ``randint`` always does); ``bernoulli_`` a float ``p``.
    ``normal_`` below 16 elements and ``log_normal_`` use the cached normal sample, so their count depends on
    the generator's past: ``None``.

    >>> words("normal_", torch.float32, 100), words("uniform_", torch.float64, 100), words("randperm", torch.int64, 5)
    (116, 200, 4)
    >>> words("random_", torch.int64, 10, low=0, high=2**40), words("normal_", torch.float32, 8)
    (20, None)
    """
    op = _ALIASES.get(op, op)
    if numel < 0:
        raise ValueError(f"`numel` must be >= 0, got {numel}")
    if op == "randperm":
        return max(numel - 1, 0) if numel < _RANDPERM_SMALL else None
    if numel == 0:
        return 0 if op in _PER_ELEMENT or op == "normal_" else None
    if op == "normal_":
        if numel < _NORMAL_VECTOR:
            return None
        tail = -numel % _NORMAL_VECTOR
        if dtype in (_F16, _BF16):
            return numel + tail  # the reduced types draw whole blocks of 16
        if dtype in (_F32, _F64):
            width = 1 if dtype == _F32 else 2
            return width * (numel + (_NORMAL_VECTOR if tail else 0))  # the ragged end redraws its last 16
        return None
    per = _per_element(op, dtype, params)
    return None if per is None else per * numel


def after(state: torch.Tensor, op: str, dtype: torch.dtype, numel: int, **params: object) -> torch.Tensor | None:
    """The generator state after ``op`` ran from ``state`` (``jump`` by ``words``), or ``None`` if not modelled."""
    n = words(op, dtype, numel, **params)
    return None if n is None else jump(state, n)


def chunk(op: str, dtype: torch.dtype, numel: int, **params: object) -> int | None:
    """The alignment ``A`` of exact split generation, or ``None`` where no split is exact.

    Elements ``[a, b)`` of the full result are generated exactly by running ``op`` on a fresh tensor of ``b - a``
    elements with ``generator_at(jump(before, word_offset(op, dtype, numel, a)))`` when ``a`` is a multiple of
    ``A`` and every piece holds at least ``A`` elements (``b`` a multiple of ``A`` or the end; so the last piece,
    which may be ragged, is never shorter than ``A``). For ``normal_`` ``A = 16`` (the kernel's Box-Muller
    blocks; the last piece must hold the ragged end and redraws it as the full kernel does).

    >>> chunk("uniform_", torch.float32, 10), chunk("normal_", torch.float32, 100), chunk("randperm", torch.int64, 9)
    (1, 16, None)
    """
    op = _ALIASES.get(op, op)
    if op == "randperm" or words(op, dtype, numel, **params) is None:
        return None
    return _NORMAL_VECTOR if op == "normal_" else 1


def word_offset(op: str, dtype: torch.dtype, numel: int, start: int, **params: object) -> int | None:
    """Words the full kernel draws before element ``start`` of a split piece (see ``chunk``), or ``None``."""
    a = chunk(op, dtype, numel, **params)
    if a is None:
        return None
    if not 0 <= start <= numel or start % a or (start < numel and numel - start < a):
        raise ValueError(
            f"`{op}` on {numel} elements splits at multiples of {a} leaving at least {a} elements, got start={start}"
        )
    op = _ALIASES.get(op, op)
    if op == "normal_":
        return start * (2 if dtype == _F64 else 1)
    per = _per_element(op, dtype, params)
    assert per is not None
    return per * start
