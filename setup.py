"""Build the optional C extensions; all package metadata lives in pyproject.toml.

Each extension is optional: without a C compiler the install still succeeds and torchlazy
uses its pure-torch paths, which give the same bits more slowly.
"""

import sys

from setuptools import Extension, setup

# Bit identity with the pure-torch path needs strict IEEE double arithmetic: no FMA contraction,
# no fast-math. -fno-math-errno and -fno-trapping-math only let floor inline and branch-free selects
# vectorize (they change no value; the tests compare both paths bit for bit).
if sys.platform == "win32":
    STRICT_FP = ["/O2", "/fp:precise"]
else:
    STRICT_FP = ["-O3", "-ffp-contract=off", "-fno-fast-math", "-fno-math-errno", "-fno-trapping-math", "-std=c11"]

setup(
    ext_modules=[
        Extension(
            "torchlazy._countercore", ["src/torchlazy/_csrc/counter.c"], optional=True, extra_compile_args=STRICT_FP
        ),
    ]
)
