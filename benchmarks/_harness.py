"""Run each variant in fresh processes; report the median wall time and peak RSS growth; print ratio tables.

Every script takes `--runs N` (default 5, or the `BENCH_RUNS` environment variable): each variant runs
in N fresh processes and the tables show the median, with the fastest and slowest run beside it.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import psutil


def _rss() -> int:
    return int(psutil.Process().memory_info().rss)


def _peak() -> int:
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def runs() -> int:
    """N, from `--runs N` on the command line or `BENCH_RUNS` (default 5)."""
    if "--runs" in sys.argv:
        return int(sys.argv[sys.argv.index("--runs") + 1])
    return int(os.environ.get("BENCH_RUNS", "5"))


_KEPT: list[Any] = []


def keep(built: Any) -> Any:
    """Hold what a variant built until its process ends: a user keeps the model, so freeing it (0.05 s
    for 650 MB of pages) is not construction time, for eager and torchlazy alike."""
    _KEPT.append(built)
    return built


def child(variants: dict[str, Callable[[], Any]]) -> None:
    """In the child: run `--variant NAME` once (after a warm-up of imports), print JSON."""
    name = sys.argv[sys.argv.index("--variant") + 1]
    setup = getattr(variants[name], "setup", None)
    if setup is not None:
        setup()
    before = _rss()
    start = time.perf_counter()
    extra = variants[name]() or {}
    seconds = time.perf_counter() - start
    print("RESULT " + json.dumps({"seconds": seconds, "peak_growth": max(_peak() - before, 0), **extra}))


def warm_host(nbytes: int) -> float:
    """Touch `nbytes` of fresh memory once in this process, then free it; returns the seconds it took.

    On a virtual machine whose host backs guest memory lazily (and takes freed memory back), the first
    touch of memory the guest has not used recently costs several times a plain page fault: 16 GiB took
    7.1 s on the 2-core VM of the README against 2.3 s right after. Without this, whichever variant runs
    first in a bench pays it, and two ranks faulting at once contend (a 1-thread baseline read 1.01 s in
    one run and 0.71 s in the next). Called once before the rounds (in a child process), it puts every variant
    of the run on memory the host already backs. It changes nothing on a machine without that behaviour.
    """
    # in a process of its own: Linux keeps a process's peak RSS across fork and exec, so touching the memory here
    # would be every later child's "peak RSS" too
    start = time.perf_counter()
    n = max(nbytes // 4, 1)
    code = f"import torch; torch.empty({n}, dtype=torch.float32).fill_(0.0)"
    subprocess.run([sys.executable, "-c", code], check=True)
    return time.perf_counter() - start


def median_of(results: list[dict[str, Any]]) -> dict[str, Any]:
    """The median of every numeric field over runs, plus `min`/`max` of the times and `n`."""
    out: dict[str, Any] = dict(results[0])
    for key, value in results[0].items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            out[key] = statistics.median(r[key] for r in results)
    times = [r["seconds"] for r in results]
    out.update(min=min(times), max=max(times), n=len(results))
    return out


def once(script: str, name: str) -> dict[str, Any]:
    """One fresh-process run of one variant."""
    out = subprocess.run([sys.executable, script, "--variant", name], capture_output=True, text=True, check=False)
    lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
    if out.returncode != 0 or not lines:
        raise RuntimeError(f"{name} failed:\n{out.stdout}\n{out.stderr}")
    return dict(json.loads(lines[-1][len("RESULT ") :]))


def run(script: str, name: str, repeat: int | None = None) -> dict[str, Any]:
    """Median of `repeat` (default: `runs()`) fresh-process runs of one variant."""
    return median_of([once(script, name) for _ in range(repeat or runs())])


def run_all(script: str, names: list[str]) -> list[tuple[str, dict[str, Any]]]:
    """Medians of `runs()` fresh-process runs of every variant, interleaved (round after round of all variants),
    so that a slow spell of a shared machine hits every variant alike instead of one."""
    results: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
    for _ in range(runs()):
        for name in names:
            results[name].append(once(script, name))
    return [(name, median_of(results[name])) for name in names]


def machine() -> str:
    import torch

    return (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
        f"torch {torch.__version__}"
    )


def ratio(seconds: float, base: float) -> str:
    r = seconds / base
    return f"{r:.2f}x" if r >= 0.1 else f"{r:.3f}x (1/{1 / r:.0f})"


def table(title: str, rows: list[tuple[str, dict[str, Any]]], baseline: str, reference_bytes: int | None = None) -> str:
    base = dict(rows)[baseline]["seconds"]
    n = rows[0][1].get("n", 1)
    lines = [
        f"{title}  ({machine()})",
        f"median of {n} fresh-process runs each, variants interleaved (min-max in brackets)",
        "",
    ]
    head = f"{'variant':<52} {'median (s)':>10} {'(min-max)':>15} {'vs ' + baseline[:20]:>24} {'peak RSS growth':>16}"
    if reference_bytes:
        head += f" {'/ params bytes':>15}"
    lines += [head, "-" * len(head)]
    for name, r in rows:
        spread = f"({r.get('min', r['seconds']):.3f}-{r.get('max', r['seconds']):.3f})"
        line = f"{name:<52} {r['seconds']:>10.3f} {spread:>15} {ratio(r['seconds'], base):>24} {r['peak_growth'] / 2**20:>12.0f} MiB"
        if reference_bytes:
            line += f" {r['peak_growth'] / reference_bytes:>14.2f}x"
        lines.append(line)
    return "\n".join(lines)
