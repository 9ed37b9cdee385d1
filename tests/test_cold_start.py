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


def test_torch_trunc_normal_imports_no_dynamo() -> None:
    """torch's `trunc_normal_` rejection-samples: it compares its draws with its bounds and asks `.any()`.
    Those ops' meta kernels are Python references that import dynamo; the recorder makes their outputs
    itself. Values stay eager's, in the usual case and where draws are rejected and redrawn."""
    got = fresh(
        "import json, sys, torch, torchlazy as tl\n"
        "def make():\n"
        "    m = torch.nn.Sequential(torch.nn.Linear(300, 200), torch.nn.Linear(30, 20), torch.nn.Linear(30, 20))\n"
        "    torch.nn.init.trunc_normal_(m[0].weight, std=1.0, a=-0.5, b=0.5)\n"
        "    torch.nn.init.trunc_normal_(m[1].weight, std=1.0)\n"
        "    torch.nn.init.trunc_normal_(m[2].weight, std=0.02)\n"
        "    return m\n"
        "torch.manual_seed(0)\n"
        "with tl.deferred():\n"
        "    m = make()\n"
        "dynamo, sympy = 'torch._dynamo' in sys.modules, 'sympy' in sys.modules\n"
        "after_block = torch.get_rng_state()\n"
        "tl.materialize(m)\n"
        "torch.manual_seed(0)\n"
        "e = make()\n"
        "same = all(torch.equal(a, b) for a, b in zip(m.state_dict().values(), e.state_dict().values()))\n"
        "print(json.dumps({'dynamo': dynamo, 'sympy': sympy, 'same': same,\n"
        "                  'rng': torch.equal(after_block, torch.get_rng_state())}))\n"
    )
    assert got == {"dynamo": False, "sympy": False, "same": True, "rng": True}


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


def test_first_build_and_summary_import_no_dynamo() -> None:
    """Shape inference of the usual layers runs on `_meta_rules`, not on torch's Python meta kernels."""
    got = fresh(
        "import json, sys, torch, torchlazy as tl\n"
        "nn = torch.nn\n"
        "cnn = nn.Sequential(tl.nn.Conv2d(8, 3, padding=1), tl.nn.BatchNorm2d(), nn.ReLU(), nn.MaxPool2d(2),\n"
        "                    nn.AvgPool2d(2), nn.AdaptiveAvgPool2d(1), nn.Flatten(), tl.nn.Linear(4))\n"
        "tl.build(cnn, torch.randn(2, 3, 16, 16))\n"
        "mlp = nn.Sequential(tl.nn.Linear(64), nn.LayerNorm(64), nn.GELU(), nn.Dropout(0.1), tl.nn.Linear(10),\n"
        "                    nn.Softmax(-1))\n"
        "rows = [tl.summary(mlp, torch.randn(2, 7, 16)).rows[0].outputs]\n"
        "enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(32, 4, 64, batch_first=True), 2)\n"
        "rows.append(tl.summary(enc, torch.randn(2, 5, 32)).rows[0].outputs)\n"
        "rows.append(tl.summary(nn.LSTM(8, 16), torch.randn(3, 2, 8)).rows[0].outputs)\n"
        "up = nn.Sequential(nn.Conv2d(3, 16, 3), nn.GroupNorm(4, 16), nn.Upsample(scale_factor=2), nn.PixelShuffle(2))\n"
        "rows.append(tl.summary(up, torch.randn(1, 3, 8, 8)).rows[0].outputs)\n"
        "print(json.dumps({'dynamo': 'torch._dynamo' in sys.modules, 'sympy': 'sympy' in sys.modules,\n"
        "                  'cnn': list(cnn[-1].weight.shape), 'rows': rows}))\n"
    )
    assert got["dynamo"] is False and got["sympy"] is False
    assert got["cnn"] == [4, 8]
    assert got["rows"] == [[[2, 7, 10]], [[2, 5, 32]], [[3, 2, 16], [1, 2, 16], [1, 2, 16]], [[1, 4, 24, 24]]]


class _Table(torch.nn.Module):
    """A relative-position index table, built as Swin builds it: grids, broadcast differences, a sum."""

    def __init__(self, w: int = 7) -> None:
        super().__init__()
        coords = torch.stack(torch.meshgrid([torch.arange(w), torch.arange(w)], indexing="ij"))
        flat = torch.flatten(coords, 1)
        relative = (flat[:, :, None] - flat[:, None, :]).permute(1, 2, 0).contiguous()
        relative[:, :, 0] += w - 1
        relative[:, :, 1] += w - 1
        relative[:, :, 0] *= 2 * w - 1
        self.register_buffer("index", relative.sum(-1))
        self.bias = torch.nn.Parameter(torch.zeros((2 * w - 1) ** 2, 3))


def test_index_tables_import_no_dynamo() -> None:
    """Integer index maths in a constructor (stack, broadcast sub, sum): outputs from the recorder's rules."""
    got = fresh(
        "import json, sys, torch, torchlazy as tl\n"
        "sys.path.insert(0, " + repr(str(Path(__file__).parent)) + ")\n"
        "from test_cold_start import _Table\n"
        "with tl.deferred():\n"
        "    m = _Table()\n"
        "dynamo, sympy = 'torch._dynamo' in sys.modules, 'sympy' in sys.modules\n"
        "tl.materialize(m)\n"
        "print(json.dumps({'dynamo': dynamo, 'sympy': sympy, 'same': torch.equal(m.index, _Table().index)}))\n"
    )
    assert got == {"dynamo": False, "sympy": False, "same": True}


def test_first_block_under_another_default_device() -> None:
    """The first block's one-off checks make their tensors on the CPU, whatever the default device."""
    got = fresh(
        "import json, torch, torchlazy as tl\n"
        "torch.set_default_device('meta')\n"
        "with tl.deferred():\n"
        "    m = torch.nn.Linear(4, 4)\n"
        "print(json.dumps({'device': str(m.weight.device)}))\n"
    )
    assert got == {"device": "meta"}


class _OddGrids(torch.nn.Module):
    """Broadcasts of views whose size-1 dims have odd strides, then a permuted copy: torch lays such outputs
    out column-major, and a recorded view replays with the recorded strides (review found wrong values)."""

    def __init__(self) -> None:
        super().__init__()
        x = torch.arange(6).view(2, 3)
        ints = x.t()[:, :1].unsqueeze(1) + torch.arange(4).view(1, 4, 1) * 10
        floats = torch.full((1,), 100.0) + torch.arange(2.0)[:, None, None].expand(2, 3, 1).transpose(0, 2)
        self.register_buffer("ints", ints.permute(1, 0, 2).contiguous())
        self.register_buffer("floats", floats.permute(2, 1, 0).contiguous())


def test_broadcasts_of_odd_views_give_eager_values() -> None:
    with tl.deferred():
        m = _OddGrids()
    tl.materialize(m)
    e = _OddGrids()
    assert torch.equal(m.ints, e.ints) and torch.equal(m.floats, e.floats)
