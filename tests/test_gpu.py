"""GPU checks (skipped without CUDA): exact and fast materialization on the device, lazy layers on CUDA."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from exact import assert_models_identical, assert_same_tensors
from torch import nn

import torchlazy as tl

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def make() -> nn.Module:
    return nn.Sequential(nn.Linear(64, 128), nn.LayerNorm(128), nn.Embedding(10, 4, padding_idx=1), nn.Conv2d(3, 8, 3))


def test_exact_on_cuda_equals_cpu_eager_moved() -> None:
    torch.manual_seed(0)
    with tl.deferred():
        model = make()
    tl.materialize(model, device="cuda")
    assert all(p.device.type == "cuda" for p in model.parameters())
    torch.manual_seed(0)
    assert_models_identical(model.cpu(), make())


def test_exact_on_cuda_in_bf16_equals_cpu_eager_cast() -> None:
    """Replayed on the CPU, cast and moved: the same bits as eager construction on the CPU cast and moved,
    ready to use on the current stream right away."""
    big = lambda: nn.Sequential(make(), nn.Linear(1024, 1024), nn.Linear(1024, 512))  # noqa: E731
    torch.manual_seed(0)
    with tl.deferred():
        model = big()
    tl.materialize(model, device="cuda", dtype=torch.bfloat16)
    total = sum(float(p.detach().float().sum()) for p in model.parameters())  # read on the current stream at once
    torch.manual_seed(0)
    eager = big().to(torch.bfloat16)
    assert total == sum(float(p.detach().float().sum()) for p in eager.to("cuda").parameters())
    assert_models_identical(model.cpu(), eager.cpu())


def test_fast_on_cuda_is_reproducible() -> None:
    out = []
    for _ in range(2):
        torch.manual_seed(0)
        with tl.deferred():
            model = make()
        tl.materialize(model, device="cuda", exact=False, dtype=torch.bfloat16)
        assert model[0].weight.device.type == "cuda" and model[0].weight.dtype == torch.bfloat16
        out.append(model[0].weight.float().cpu())
    assert_same_tensors(out[0], out[1], "0.weight")


def test_lazy_layer_on_cuda_input_keeps_placeholder_identity() -> None:
    net = nn.Sequential(tl.nn.Linear(16), nn.ReLU(), tl.nn.Linear(2))
    held = list(net.parameters())
    net(torch.randn(4, 8, device="cuda")).sum().backward()
    assert [id(p) for p in held] == [id(p) for p in net.parameters()]
    assert all(p.device.type == "cuda" and p.grad is not None for p in net.parameters())


def test_build_deferred_lazy_model_onto_cuda_is_exact() -> None:
    torch.manual_seed(0)
    with tl.deferred():
        lazy = nn.Sequential(tl.nn.Conv2d(8, 3), nn.Flatten(), tl.nn.Linear(5))
    tl.build(lazy, tl.Spec(2, 3, 6, 6), device="cuda")
    torch.manual_seed(0)
    eager = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Flatten(), nn.Linear(8 * 4 * 4, 5))
    assert lazy[0].weight.device.type == "cuda"
    assert_models_identical(lazy.cpu(), eager)


def test_checkpoint_straight_to_cuda(tmp_path: Path) -> None:
    reference = make()
    tl.save(reference, tmp_path / "m.safetensors")
    with tl.deferred():
        model = make()
    tl.materialize(model, checkpoint=tmp_path / "m.safetensors", device="cuda")
    assert model[0].weight.device.type == "cuda"
    assert_models_identical(model.cpu(), reference)


def test_fast_on_cuda_leaves_the_cuda_generator_where_it_was() -> None:
    # draws with no counter-based law (`torch.randn`) seed the device's generator in exact=False replay: it was
    # not put back (the CPU one was)
    torch.cuda.manual_seed(123)
    before = torch.cuda.get_rng_state()
    with tl.deferred():
        model = nn.Linear(4, 4)
        model.extra = nn.Parameter(torch.randn(8))
    tl.materialize(model, device="cuda", exact=False)
    assert torch.equal(torch.cuda.get_rng_state(), before)
