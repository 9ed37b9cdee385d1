"""torchlazy end to end: sizes inferred from data, shapes from a Spec, exact deferred init, training.

Run with `./scripts/demo` (it creates the virtual environment on first use).
"""

from __future__ import annotations

import time

import torch
from torch import nn

import torchlazy as tl


def section(title: str) -> None:
    print(f"\n=== {title}")


def classic() -> None:
    section("1. A Linear that learns in_features from its first input")
    net = nn.Sequential(tl.nn.Linear(128), nn.ReLU(), tl.nn.Linear(10))
    print("before:", net[0])
    net(torch.randn(1, 64))
    print("after: ", net[0], "->", type(net[0]).__module__ + "." + type(net[0]).__name__)


def make_cnn() -> nn.Module:
    return nn.Sequential(
        tl.nn.Conv2d(32, 3, padding=1), tl.nn.BatchNorm2d(), nn.ReLU(), nn.MaxPool2d(2),
        tl.nn.Conv2d(64, 3, padding=1), tl.nn.GroupNorm(8), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), tl.nn.Linear(128), tl.nn.LayerNorm(), nn.ReLU(), tl.nn.Linear(10),
    )  # fmt: skip


def make_cnn_eager() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1), nn.GroupNorm(8, 64), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(64 * 8 * 8, 128), nn.LayerNorm(128), nn.ReLU(), nn.Linear(128, 10),
    )  # fmt: skip


def cnn() -> nn.Module:
    section("2. A CNN whose conv, norm and linear sizes are all inferred, before any allocation")
    torch.manual_seed(0)
    with tl.deferred():
        model = make_cnn()  # no memory, no random draws yet
    print(tl.summary(model, tl.Spec(8, 3, 32, 32)))
    start = time.perf_counter()
    tl.build(model, tl.Spec(8, 3, 32, 32))  # shape inference on fake tensors, then one allocation each
    print(f"\nbuilt in {1e3 * (time.perf_counter() - start):.1f} ms; inferred sizes:")
    for name, m in model.named_modules():
        for attr in ("in_channels", "num_features", "num_channels", "in_features", "normalized_shape"):
            if hasattr(m, attr):
                print(f"  {name:>2} {type(m).__name__:<12} {attr} = {getattr(m, attr)}")
                break
    torch.manual_seed(0)
    eager = make_cnn_eager()
    same = all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), eager.state_dict().values()))
    print(f"bit-for-bit equal to the eager model with explicit sizes, same seed: {same}")
    return model


def train(model: nn.Module) -> None:
    section("3. A few training steps on synthetic data: it is a plain torch.nn model now")
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    x, y = torch.randn(64, 3, 32, 32), torch.randint(0, 10, (64,))
    for step in range(5):
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        print(f"  step {step}: loss {loss.item():.4f}")


def big() -> None:
    section("4. Deferred construction: a 1.2B-parameter model described without allocating it")
    with tl.deferred():
        layer = nn.TransformerEncoderLayer(2048, 16, 8192, batch_first=True)
        model = nn.TransformerEncoder(layer, num_layers=24, enable_nested_tensor=False)
    s = tl.summary(model, depth=1)
    print("\n".join(str(s).splitlines()[-5:]))
    print("still deferred:", tl.is_deferred(model), f"({len(tl.deferred_tensors(model))} tensors)")
    one = model.layers[0]
    tl.materialize(one, dtype=torch.bfloat16)  # stream it: one block at a time
    print("materialized block 0 only:", one.linear1.weight.dtype, tuple(one.linear1.weight.shape))


def encoder(layers: int) -> nn.Module:
    layer = nn.TransformerEncoderLayer(1024, 16, 4096, batch_first=True)
    return nn.TransformerEncoder(layer, num_layers=layers, enable_nested_tensor=False)


def fit_and_scale() -> None:
    section("5. Will it fit? Compute and training memory of a deferred model, nothing allocated")
    torch.manual_seed(0)
    with tl.deferred():
        model = encoder(8)
    example = tl.Spec(4, 512, 1024)
    flops = tl.summary(model, example, flops=True)
    print(f"forward {flops.total_flops / 1e9:.1f} GFLOP, forward+backward {flops.total_flops_train / 1e9:.1f} GFLOP")
    memory = tl.estimate_memory(model, example, optimizer=torch.optim.AdamW)
    print(f"one AdamW training step peaks at {memory.peak / 2**30:.2f} GiB "
          f"(params {memory.params / 2**20:.0f} MiB, optimizer {memory.optimizer / 2**20:.0f} MiB)")  # fmt: skip

    section("6. Exact and fast: dead draws jumped over, the RNG left where eager construction leaves it")
    _ = torch.randn(1000)  # whatever the program draws in between does not matter
    start = time.perf_counter()
    tl.materialize(model)
    ours = time.perf_counter() - start
    torch.manual_seed(0)
    start = time.perf_counter()
    eager = encoder(8)
    theirs = time.perf_counter() - start
    after_eager = torch.randn(3)
    same = all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), eager.state_dict().values()))
    print(f"exact materialize {ours:.2f} s vs eager construction {theirs:.2f} s; bit-for-bit equal: {same}")
    torch.manual_seed(0)
    with tl.deferred():  # leaving the block puts the generator where eager construction leaves it
        fast = encoder(8)
    print(f"the generator after a deferred block is eager's: {torch.equal(torch.randn(3), after_eager)}")
    tl.materialize(fast, exact=False)  # counter-based: the same values whole or sharded, on any thread count
    w = fast.layers[0].linear1.weight
    print(f"exact=False: eager's law (uniform within +-{1 / 1024**0.5:.4f}: {w.abs().max().item():.4f}), not its bits")


if __name__ == "__main__":
    classic()
    train(cnn())
    big()
    fit_and_scale()
