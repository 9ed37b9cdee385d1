"""Jumping torch's CPU generator ahead vs drawing the same number of words; torch's draw kernels vs
torchlazy's compiled copies of them.

    python benchmarks/bench_rng.py

For D = 10^3 .. 10^10 words: torch drawing them (float32 ``uniform_``, one word per element; above 10^7 the
time is extrapolated from the 10^7 rate, marked ~), ``torchlazy._rng.jump`` in the compiled core and in pure
Python, first call (the jump polynomial x^D mod phi computed) and cached (only the Horner step), and the ratio
torch / cached C jump.

Then exact draws as materialization makes them (float32, 2^25 elements into fresh memory, as a materialized
tensor is, 1 thread): torch's ``normal_``/``uniform_`` against ``torchlazy._drawkernels.run_draw`` (the compiled
kernel where this process's calibration proved it gives torch's bits; torch's kernel otherwise), with the bits
compared.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))

from torchlazy import _drawkernels, _rng  # noqa: E402

MEASURED_MAX = 10**7


def best(fn: Callable[[], object], repeat: int = 3) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def torch_seconds(d: int, state: torch.Tensor) -> tuple[float, bool]:
    n = min(d, MEASURED_MAX)
    buf = torch.empty(n)
    g = _rng.generator_at(state)
    seconds = best(lambda: buf.uniform_(generator=g))
    return seconds * d / n, d > n


def jump_ms(path: str, d: int, state: torch.Tensor) -> tuple[float, float]:
    if path == "python":
        os.environ["TORCHLAZY_NO_EXT"] = "1"
    else:
        os.environ.pop("TORCHLAZY_NO_EXT", None)
    _rng._jump_poly.cache_clear()
    start = time.perf_counter()
    _rng.jump(state, d)
    first = time.perf_counter() - start
    cached = best(lambda: _rng.jump(state, d))
    return 1e3 * first, 1e3 * cached


def main() -> None:
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    torch.empty(100).uniform_(generator=g)
    state = g.get_state()
    paths = ["c", "python"] if _rng._ext is not None else ["python"]
    print(f"torch {torch.__version__}, {os.cpu_count()} cores; compiled core: {'yes' if _rng._ext else 'no'}")
    head = f"{'D':>7} {'torch':>10}" + "".join(f" {p + ' 1st':>11} {p + ' cached':>11}" for p in paths)
    print(head + f" {'torch/jump':>11}")
    for k in range(3, 11):
        d = 10**k
        seconds, estimated = torch_seconds(d, state)
        row = f"{'1e' + str(k):>7} {('~' if estimated else '') + f'{seconds * 1e3:.2f} ms':>10}"
        cached = {}
        for path in paths:
            first, cached[path] = jump_ms(path, d, state)
            row += f" {first:>8.2f} ms {cached[path]:>8.2f} ms"
        print(row + f" {seconds * 1e3 / cached[paths[0]]:>10.0f}x")
    os.environ.pop("TORCHLAZY_NO_EXT", None)
    draws(state)


def draws(state: torch.Tensor) -> None:
    n = 1 << 25
    print(
        f"\nexact float32 draws, {n} elements into fresh memory, 1 thread (compiled: {_drawkernels.compiled('normal_')})"
    )
    print(f"{'op':>9} {'torch':>12} {'torchlazy':>12} {'speed-up':>9}  same bits")
    for op, law in (("normal_", (0.0, 0.02)), ("uniform_", (-0.05, 0.05))):
        t_torch, t_mine, same = draw_seconds(op, law, state, n)
        print(f"{op:>9} {n / t_torch / 1e6:>7.0f} M/s {n / t_mine / 1e6:>7.0f} M/s {t_torch / t_mine:>8.1f}x  {same}")


def draw_seconds(op: str, law: tuple[float, float], state: torch.Tensor, n: int) -> tuple[float, float, bool]:
    func = getattr(torch.ops.aten, op).default
    made: dict[str, torch.Tensor] = {}

    def eager() -> None:
        made["eager"] = getattr(torch.empty(n), op)(*law, generator=_rng.generator_at(state))

    def mine() -> None:
        made["mine"] = torch.empty(n)
        _drawkernels.run_draw(func, (made["mine"], *law), {}, state)

    t_torch, t_mine = best(eager), best(mine)
    return t_torch, t_mine, torch.equal(made["eager"], made["mine"])


if __name__ == "__main__":
    main()
