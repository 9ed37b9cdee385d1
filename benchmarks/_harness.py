"""Run each variant in a fresh process; report wall time and peak RSS growth; print ratio tables."""

from __future__ import annotations

import json
import os
import platform
import resource
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


def run(script: str, name: str, repeat: int = 1) -> dict[str, Any]:
    """Best of `repeat` fresh-process runs of one variant."""
    best: dict[str, Any] | None = None
    for _ in range(repeat):
        out = subprocess.run([sys.executable, script, "--variant", name], capture_output=True, text=True, check=False)
        lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
        if out.returncode != 0 or not lines:
            raise RuntimeError(f"{name} failed:\n{out.stdout}\n{out.stderr}")
        result = json.loads(lines[-1][len("RESULT ") :])
        if best is None or result["seconds"] < best["seconds"]:
            best = result
    assert best is not None
    return best


def machine() -> str:
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"


def table(title: str, rows: list[tuple[str, dict[str, Any]]], baseline: str, reference_bytes: int | None = None) -> str:
    base = dict(rows)[baseline]["seconds"]
    lines = [f"{title}  ({machine()})", ""]
    head = f"{'variant':<44} {'time (s)':>9} {'vs ' + baseline:>22} {'peak RSS growth':>16}"
    if reference_bytes:
        head += f" {'/ params bytes':>15}"
    lines += [head, "-" * len(head)]
    for name, r in rows:
        ratio = r["seconds"] / base
        shown = f"{ratio:.2f}x" if ratio >= 0.1 else f"{ratio:.3f}x (1/{1 / ratio:.0f})"
        line = f"{name:<44} {r['seconds']:>9.3f} {shown:>22} {r['peak_growth'] / 2**20:>12.0f} MiB"
        if reference_bytes:
            line += f" {r['peak_growth'] / reference_bytes:>14.2f}x"
        lines.append(line)
    return "\n".join(lines)
