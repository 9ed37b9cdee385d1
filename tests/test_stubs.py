"""The type stub of tl.nn matches the table (regenerate with `python scripts/gen_stubs.py`)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_nn_stub_is_up_to_date() -> None:
    spec = importlib.util.spec_from_file_location("gen_stubs", ROOT / "scripts" / "gen_stubs.py")
    assert spec is not None and spec.loader is not None
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    assert gen.STUB.read_text() == gen.render(), "stale stub: run `python scripts/gen_stubs.py`"
