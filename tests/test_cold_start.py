"""The first deferred block of a process: no `torch._dynamo`, no sympy, unless an op needs them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

import torchlazy as tl

SRC = str(Path(tl.__file__).parent.parent)


def fresh(code: str) -> dict[str, object]:
    """Run `code` in a fresh process (after `import torch`); it prints one JSON line."""
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def test_first_deferred_block_imports_no_dynamo() -> None:
    got = fresh(
        "import json, sys, torch, torchlazy as tl\n"
        "torch.manual_seed(0)\n"
        "with tl.deferred():\n"
        "    m = torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.LayerNorm(4), torch.nn.Conv2d(3, 4, 3),\n"
        "                            torch.nn.Embedding(10, 4, padding_idx=0), torch.nn.BatchNorm2d(4))\n"
        "dynamo, sympy = 'torch._dynamo' in sys.modules, 'sympy' in sys.modules\n"
        "tl.materialize(m)\n"
        "torch.manual_seed(0)\n"
        "e = torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.LayerNorm(4), torch.nn.Conv2d(3, 4, 3),\n"
        "                        torch.nn.Embedding(10, 4, padding_idx=0), torch.nn.BatchNorm2d(4))\n"
        "same = all(torch.equal(a, b) for a, b in zip(m.state_dict().values(), e.state_dict().values()))\n"
        "print(json.dumps({'dynamo': dynamo, 'sympy': sympy, 'after': 'torch._dynamo' in sys.modules,\n"
        "                  'same': same}))\n"
    )
    assert got == {"dynamo": False, "sympy": False, "after": False, "same": True}


def test_light_fake_mode_sets_what_torch_sets() -> None:
    """The fake mode made without dynamo has every attribute torch's own `__init__` gives it."""
    from torchlazy import _deferred
    from torchlazy import _torch_compat as tc

    cls = _deferred._open_record_mode()
    real = cls(allow_non_fake_inputs=True)  # imports dynamo here, in the test process only
    saved = sys.modules.pop("torch._dynamo")
    try:
        light = tc.new_fake_mode(cls)
    finally:
        sys.modules["torch._dynamo"] = saved
    assert set(vars(light)) == set(vars(real))
    for name in ("allow_non_fake_inputs", "cache_enabled", "static_shapes", "shape_env", "allow_meta"):
        assert getattr(light, name) == getattr(real, name), name
    with light:
        t = torch.zeros(2, 3)
    assert tuple(t.shape) == (2, 3)
