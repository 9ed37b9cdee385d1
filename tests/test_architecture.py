"""The shape of the code base: a one-way module stack, torch internals in one file, one error root."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from layer_cases import CASES, Case
from torch import nn

import torchlazy as tl
from torchlazy import _markers
from torchlazy import _torch_compat as tc

PACKAGE = Path(tl.__file__).parent
PRIVATE_TORCH = re.compile(r"\btorch(?:\.[A-Za-z0-9_]+)*\._[a-z][A-Za-z0-9_]*")


def _modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        name = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__")
        found[name] = path
    return found


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """torchlazy modules `name` imports, at the top or inside functions."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            for alias in node.names:
                candidate = f"{base}.{alias.name}"
                out.add(candidate if candidate in known else base)
        elif isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
    return {m for m in out if m in known and m != name and not name.startswith(m + ".")}


def test_modules_form_a_one_way_stack() -> None:
    known = _modules()
    graph = {name: _imports(name, path, set(known)) for name, path in known.items()}
    graph["torchlazy"] = set()  # the package face lists every name: it sits on top by definition

    def reaches(start: str, goal: str) -> bool:
        seen, todo = set(), [start]
        while todo:
            node = todo.pop()
            for nxt in graph[node]:
                if nxt == goal:
                    return True
                if nxt not in seen:
                    seen.add(nxt)
                    todo.append(nxt)
        return False

    cycles = sorted(f"{a} -> {b}" for a in graph for b in graph[a] if reaches(b, a))
    assert not cycles, f"import cycles among torchlazy modules: {cycles}"


def test_private_torch_names_live_in_the_compat_module_only() -> None:
    offenders = {
        str(path.relative_to(PACKAGE)): sorted(set(PRIVATE_TORCH.findall(path.read_text())))
        for path in PACKAGE.rglob("*.py")
        if path.name != "_torch_compat.py" and PRIVATE_TORCH.search(path.read_text())
    }
    assert not offenders, f"private torch names outside _torch_compat.py: {offenders}"


def test_a_missing_private_name_is_a_lazy_error_naming_the_torch_version() -> None:
    with pytest.raises(tl.LazyError, match=re.escape(torch.__version__)) as info:
        tc._lookup("torch._no_such_module", "Anything")
    assert "torch._no_such_module.Anything" in str(info.value)


def test_import_survives_a_moved_private_name_and_the_feature_says_what_is_missing() -> None:
    script = (
        "import torch._subclasses.fake_tensor as f\n"
        "del f.FakeTensorMode\n"
        "import torch, torchlazy as tl\n"
        "net = torch.nn.Sequential(tl.nn.Linear(3))\n"
        "net(torch.ones(2, 4))\n"  # lazy layers on real inputs need no fake tensors
        "try:\n"
        "    with tl.deferred():\n"
        "        torch.nn.Linear(2, 2)\n"
        "except tl.LazyError as e:\n"
        "    print('LazyError:', e)\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "LazyError:" in out.stdout and "FakeTensorMode" in out.stdout and torch.__version__ in out.stdout


def test_markers_share_one_prefix_and_none_is_left_after_materialize() -> None:
    names = [v for k, v in vars(_markers).items() if k.isupper() and k != "PREFIX"]
    assert names and all(n.startswith(_markers.PREFIX) for n in names)
    with tl.deferred():
        net = nn.Sequential(nn.Linear(3, 4), tl.nn.Linear(2), nn.LSTM(2, 3))
    tl.build(net, tl.Spec(5, 3))
    leftovers = [
        (path, key)
        for path, m in net.named_modules()
        for obj in (m, *m._parameters.values(), *m._buffers.values())
        for key in vars(obj)
        if key.startswith(_markers.PREFIX)
    ]
    assert not leftovers


@pytest.mark.parametrize(
    "call",
    [
        lambda: tl.materialize(3),  # type: ignore[arg-type]
        lambda: tl.build("model"),  # type: ignore[arg-type]
        lambda: tl.lazy(nn.Linear, size=lambda x: 1),
        lambda: tl.lazy(nn.Linear, in_features=3),
        lambda: tl.nn.Linear(3, nonsense=1),  # type: ignore[call-arg]
    ],
)
def test_bad_arguments_are_lazy_errors_that_are_also_type_errors(call: object) -> None:
    with pytest.raises(tl.LazyError) as info:
        call()  # type: ignore[operator]
    assert isinstance(info.value, TypeError)


_EARLY_USES = {
    "shape": lambda t: t.shape,
    "size()": lambda t: t.size(),
    "numel()": lambda t: t.numel(),
    "dim()": lambda t: t.dim(),
    "t + 1": lambda t: t + 1,
    "sum()": lambda t: t.sum(),
    "detach()": lambda t: t.detach(),
    "clone()": lambda t: t.clone(),
    "view(-1)": lambda t: t.view(-1),
}


@pytest.mark.parametrize("case", CASES, ids=repr)
def test_every_lazy_layer_refuses_early_access_with_not_built(case: Case) -> None:
    layer = case.lazy()
    tensors = [*layer.named_parameters(), *layer.named_buffers()]
    for name, t in tensors:
        for use, fn in _EARLY_USES.items():
            with pytest.raises(tl.NotBuiltError):
                fn(t)
                pytest.fail(f"`{name}.{use}` on an unbuilt {case.name} did not raise")
    for rule in type(layer)._tl_rules:  # type: ignore[attr-defined]
        with pytest.raises(tl.NotBuiltError, match=f"`{rule}`"):
            getattr(layer, rule)
    _ = layer(*case.inputs())  # and it still builds
    assert tl.is_built(layer)


def test_unbuilt_multihead_attention_projections_are_not_built_errors() -> None:
    mha = tl.nn.MultiheadAttention(2, batch_first=True)
    for name in ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight"):
        with pytest.raises(tl.NotBuiltError, match="key/value|kdim"):
            getattr(mha, name)
    assert mha.num_heads == 2 and mha.batch_first  # given to the constructor: known
    with pytest.raises(AttributeError):
        _ = mha.no_such_thing
    q, kv = torch.randn(2, 3, 8), torch.randn(2, 3, 5)
    mha(q, kv, kv)
    assert mha.in_proj_weight is None and mha.q_proj_weight.shape == (8, 8) and mha.k_proj_weight.shape == (8, 5)
