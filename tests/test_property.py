"""Property: any random stack of lazy layers equals the eager model with explicit sizes."""

from __future__ import annotations

import torch
from exact import assert_models_identical, assert_same_tensors
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import torchlazy as tl

# Each choice: (lazy factory, eager factory given input features) for (N, F) inputs.
FLAT = {
    "linear": (lambda k: tl.nn.Linear(k), lambda f, k: nn.Linear(f, k), lambda f, k: k),
    "layernorm": (lambda k: tl.nn.LayerNorm(), lambda f, k: nn.LayerNorm(f), lambda f, k: f),
    "rmsnorm": (lambda k: tl.nn.RMSNorm(), lambda f, k: nn.RMSNorm(f), lambda f, k: f),
    "batchnorm": (lambda k: tl.nn.BatchNorm1d(), lambda f, k: nn.BatchNorm1d(f), lambda f, k: f),
    "prelu": (lambda k: tl.nn.PReLU(), lambda f, k: nn.PReLU(f), lambda f, k: f),
    "relu": (lambda k: nn.ReLU(), lambda f, k: nn.ReLU(), lambda f, k: f),
}

layers = st.lists(st.tuples(st.sampled_from(sorted(FLAT)), st.integers(1, 12)), min_size=1, max_size=6)


def _lazy(spec: list[tuple[str, int]]) -> nn.Module:
    return nn.Sequential(*(FLAT[name][0](k) for name, k in spec))


def _eager(features: int, spec: list[tuple[str, int]]) -> nn.Module:
    layers, f = [], features
    for name, k in spec:
        _, make_eager, out = FLAT[name]
        layers.append(make_eager(f, k))
        f = out(f, k)
    return nn.Sequential(*layers)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(features=st.integers(1, 16), spec=layers, deferred=st.booleans())
def test_random_stacks_equal_eager(features: int, spec: list[tuple[str, int]], deferred: bool) -> None:
    torch.manual_seed(0)
    if deferred:
        with tl.deferred():
            lazy = _lazy(spec)
        tl.build(lazy, tl.Spec(3, features))
    else:
        lazy = _lazy(spec)
        lazy(torch.randn(3, features))
    torch.manual_seed(0)
    eager = _eager(features, spec)
    assert [type(m) for m in lazy] == [type(m) for m in eager]
    if deferred:
        assert_models_identical(lazy, eager)
    lazy.load_state_dict(eager.state_dict())
    x = torch.randn(5, features)
    lazy.eval(), eager.eval()
    assert_same_tensors(lazy(x), eager(x), "output")
