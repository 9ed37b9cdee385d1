"""Throughput of the counter-based stream (exact=False) against torch's own generators.

    python benchmarks/bench_counter.py [--n 162000000] [--pure-n 4000000]

Rows fill fresh memory (``torch.empty`` then the fill), as materialization does, so the first-touch
floor (``torch.empty(n).fill_(1)``) measured in the same run bounds them; rows marked ``warm`` fill
memory already touched, to show the generators alone.
Columns: elements/s of wall time, elements/s per CPU-second (robust when other processes share
the cores), and ratios of wall rates against torch's ``normal_``/``uniform_`` (serial, as torch's
CPU generator is) and against the first-touch floor. Best of three runs per row.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from collections.abc import Callable

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))

import torch

from torchlazy import _counter

KEY = (1234, 5)


def measure(n: int, make: Callable[[], object], repeat: int = 3) -> tuple[float, float]:
    """(elements per wall second, elements per CPU second), best of `repeat`."""
    best_wall, best_cpu = 0.0, 0.0
    for _ in range(repeat):
        w, c = time.perf_counter(), time.process_time()
        make()
        w, c = time.perf_counter() - w, time.process_time() - c
        best_wall, best_cpu = max(best_wall, n / w), max(best_cpu, n / max(c, 1e-9))
    return best_wall, best_cpu


def counter_fill(
    n: int, dtype: torch.dtype, law: str, threads: int, pure: bool = False, warm: torch.Tensor | None = None
) -> Callable[[], object]:
    def run() -> object:
        out = torch.empty(n, dtype=dtype) if warm is None else warm
        plan = _counter._Plan(out, law, {})
        if pure:
            _counter._fill_pure(out, plan, KEY, 0)
        else:
            _counter._fill_c(out, plan, KEY, 0, threads)
        return out

    return run


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=162_000_000, help="elements per fill (162M: a Llama-160M)")
    parser.add_argument("--pure-n", type=int, default=4_000_000, help="elements for the (slow) pure-torch rows")
    args = parser.parse_args()
    n, pn = args.n, args.pure_n
    torch.set_num_threads(1)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"counter stream vs torch, n={n:,}  ({platform.machine()}, {os.cpu_count()} cores, load {load:.1f})")

    floor = measure(n, lambda: torch.empty(n).fill_(1))
    base = {  # torch's rows, the baselines of the ratios (fresh memory; "warm ..." added below)
        "normal": measure(n, lambda: torch.empty(n).normal_()),
        "uniform": measure(n, lambda: torch.empty(n).uniform_()),
    }
    rows: list[tuple[str, str, tuple[float, float]]] = [
        ("first-touch floor: empty(n).fill_(1)", "", floor),
        ("torch normal_ float32", "normal", base["normal"]),
        ("torch uniform_ float32", "uniform", base["uniform"]),
    ]
    if _counter._core is not None:
        for law in ("normal", "uniform"):
            for dtype in (torch.float32, torch.bfloat16):
                for threads in (1, 2):
                    name = f"C {law} {str(dtype)[6:]} {threads} thread{'s' if threads > 1 else ''}"
                    rows.append((name, law, measure(n, counter_fill(n, dtype, law, threads))))
    else:
        print("(torchlazy._countercore is not built: C rows skipped)")
    # the generators alone: memory already touched
    warm = {dtype: torch.zeros(n, dtype=dtype) for dtype in (torch.float32, torch.bfloat16)}
    w32 = warm[torch.float32]
    base["warm normal"] = measure(n, lambda: w32.normal_())
    base["warm uniform"] = measure(n, lambda: w32.uniform_())
    rows.append(("warm: torch normal_ float32", "warm normal", base["warm normal"]))
    rows.append(("warm: torch uniform_ float32", "warm uniform", base["warm uniform"]))
    if _counter._core is not None:
        for law in ("normal", "uniform"):
            for dtype, buf in warm.items():
                fill = counter_fill(n, dtype, law, 1, warm=buf)
                rows.append((f"warm: C {law} {str(dtype)[6:]} 1 thread", f"warm {law}", measure(n, fill)))
    for law in ("normal", "uniform"):
        rows.append(
            (f"pure torch {law} float32 (n={pn:,})", law, measure(pn, counter_fill(pn, torch.float32, law, 1, True)))
        )

    head = f"{'variant':<44} {'M el/s':>8} {'M el/CPU-s':>11} {'vs torch same law':>18} {'vs first touch':>15}"
    print(head)
    print("-" * len(head))
    for name, law, (wall, cpu) in rows:
        vs_torch = f"{wall / base[law][0]:.2f}x" if law else ""  # warm rows: against torch on warm memory
        print(f"{name:<44} {wall / 1e6:>8.0f} {cpu / 1e6:>11.0f} {vs_torch:>18} {wall / floor[0]:>14.2f}x")


if __name__ == "__main__":
    main()
