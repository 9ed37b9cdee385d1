"""The type stub of tl.nn matches the table (regenerate with `python scripts/gen_stubs.py`)."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
PINNED = re.search(r"^torch==(\S+)", (ROOT / "requirements-dev.txt").read_text(), re.M)


@pytest.mark.skipif(
    PINNED is None or torch.__version__.split("+")[0] != PINNED.group(1),
    reason="the stub is generated from the torch pinned in requirements-dev.txt (other versions spell signatures differently)",
)
def test_nn_stub_is_up_to_date() -> None:
    spec = importlib.util.spec_from_file_location("gen_stubs", ROOT / "scripts" / "gen_stubs.py")
    assert spec is not None and spec.loader is not None
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    assert gen.STUB.read_text() == gen.render(), "stale stub: run `python scripts/gen_stubs.py`"
