"""Only the optional compiled core; all metadata lives in pyproject.toml.

``torchlazy._mtcore`` speeds up the generator model (``torchlazy._rng``). Where no C compiler is found the build
skips it (``optional=True``) and the package uses its pure-Python path, which gives the same bits.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "torchlazy._mtcore",
            ["src/torchlazy/_csrc/mt19937.c"],
            optional=True,
            extra_compile_args=["-O3"],
        )
    ]
)
