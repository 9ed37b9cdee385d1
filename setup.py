"""Build the optional C extensions; all package metadata lives in pyproject.toml.

Each extension is optional: without a C compiler the install still succeeds and torchlazy
uses its pure-Python/pure-torch paths, which give the same bits more slowly.
- `torchlazy._mtcore`: jump-ahead for torch's CPU MT19937 generator (`torchlazy._rng`).
- `torchlazy._countercore`: the counter-based stream of exact=False (`torchlazy._counter`).
- `torchlazy._drawcore`: torch's CPU float32 uniform_/normal_ kernels, bit for bit (`torchlazy._drawkernels`).
"""

import sys

from setuptools import Extension, setup

# Bit identity with the pure-torch path needs strict IEEE double arithmetic: no FMA contraction,
# no fast-math. -fno-math-errno and -fno-trapping-math only let floor inline and branch-free selects
# vectorize (they change no value; the tests compare both paths bit for bit).
if sys.platform == "win32":
    STRICT_FP = ["/O2", "/fp:precise"]
    FAST = ["/O2"]
else:
    STRICT_FP = ["-O3", "-ffp-contract=off", "-fno-fast-math", "-fno-math-errno", "-fno-trapping-math", "-std=c11"]
    FAST = ["-O3"]


def _core(name: str, source: str, headers: list[str], flags: list[str]) -> Extension:
    """One optional compiled core of torchlazy (built when a C compiler is there; pure paths otherwise)."""
    csrc = "src/torchlazy/_csrc"
    return Extension(
        f"torchlazy.{name}",
        [f"{csrc}/{source}"],
        depends=[f"{csrc}/{h}" for h in headers],
        optional=True,
        extra_compile_args=flags,
    )


setup(
    ext_modules=[
        _core("_mtcore", "mt19937.c", ["isa.h", "mt19937.h"], FAST),
        _core("_countercore", "counter.c", ["isa.h", "prefault.h"], STRICT_FP),
        # torch's kernels fuse some multiply-adds: draw.c writes each one out, so it needs contraction off too
        _core("_drawcore", "draw.c", ["mt19937.h", "prefault.h"], STRICT_FP),
    ]
)
