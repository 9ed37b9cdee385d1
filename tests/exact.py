"""The one way the tests compare tensors and models: everything that can differ, down to the raw bytes.

`torch.equal` is too loose for "bit-for-bit": it is True for float32 against bfloat16 holding the same
values, for -0.0 against 0.0, and False for a NaN against the very same NaN. Comparing state dicts misses
non-persistent buffers, plain tensor attributes and ties. Here two tensors are the same when their type,
shape, dtype, device, strides (over dimensions longer than 1), `requires_grad` and raw bytes all match;
two models are the same when they hold the same named tensors (parameters, persistent and non-persistent
buffers, plain tensor attributes) that are the same, tied the same way. Every failure names the first
differing key and what differs.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import nn

Tensors = torch.Tensor | Mapping[str, torch.Tensor]


def raw_bytes(t: torch.Tensor) -> bytes:
    """The bytes of a contiguous CPU copy: what the tensor holds, whatever its dtype means."""
    flat = t.detach().to("cpu").contiguous().reshape(-1)
    return bytes(flat.view(torch.uint8).numpy().tobytes()) if flat.numel() else b""


def difference(a: torch.Tensor, b: torch.Tensor) -> str | None:
    """What differs between two tensors (the first thing found), or None when they are the same."""
    if type(a) is not type(b):
        return f"type {type(a).__name__} != {type(b).__name__}"
    if a.shape != b.shape:
        return f"shape {tuple(a.shape)} != {tuple(b.shape)}"
    if a.dtype != b.dtype:
        return f"dtype {a.dtype} != {b.dtype}"
    if a.device != b.device:
        return f"device {a.device} != {b.device}"
    if a.requires_grad != b.requires_grad:
        return f"requires_grad {a.requires_grad} != {b.requires_grad}"
    if a.layout != torch.strided or b.layout != torch.strided:
        return None if a.layout == b.layout and torch.equal(a.to_dense(), b.to_dense()) else f"layout {a.layout}"
    long_a = [s for s, n in zip(a.stride(), a.shape) if n > 1]
    long_b = [s for s, n in zip(b.stride(), b.shape) if n > 1]
    if long_a != long_b:
        return f"strides {a.stride()} != {b.stride()}"
    if a.device.type == "meta":
        return None  # no values to compare
    bytes_a, bytes_b = raw_bytes(a), raw_bytes(b)
    if bytes_a != bytes_b:
        index = next(i for i, (x, y) in enumerate(zip(bytes_a, bytes_b)) if x != y) // a.element_size()
        flat_a, flat_b = a.detach().reshape(-1), b.detach().reshape(-1)
        return f"values differ first at flat index {index}: {flat_a[index].item()!r} != {flat_b[index].item()!r}"
    return None


def assert_same_tensors(a: Tensors, b: Tensors, name: str = "tensor") -> None:
    """Assert two tensors, or two mappings of name -> tensor (state dicts), are the same to the bit."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        assert isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor), f"`{name}`: a tensor against a mapping"
        diff = difference(a, b)
        assert diff is None, f"`{name}`: {diff}"
        return
    assert list(a) == list(b), _key_message(a, b)
    for key in a:
        assert_same_tensors(a[key], b[key], key)


def named_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every tensor a model holds by name: parameters, all buffers (non-persistent too), plain tensor attributes.

    Shared tensors appear under every name that holds them (ties are checked separately).
    """
    out: dict[str, torch.Tensor] = {}
    for prefix, module in model.named_modules(remove_duplicate=False):
        dot = f"{prefix}." if prefix else ""
        for name, p in module._parameters.items():
            if p is not None:
                out[dot + name] = p
        for name, b in module._buffers.items():
            if b is not None:
                out[dot + name] = b
        for name, value in vars(module).items():
            if isinstance(value, torch.Tensor) and not name.startswith("_"):
                out[dot + name] = value
    return out


def ties(tensors: Mapping[str, torch.Tensor]) -> list[list[str]]:
    """Groups of names holding the very same tensor object (groups of one left out)."""
    groups: dict[int, list[str]] = {}
    for name, t in tensors.items():
        groups.setdefault(id(t), []).append(name)
    return sorted(sorted(g) for g in groups.values() if len(g) > 1)


def _key_message(a: Mapping[str, object], b: Mapping[str, object]) -> str:
    only_a, only_b = [k for k in a if k not in b], [k for k in b if k not in a]
    if only_a or only_b:
        return f"keys differ: only in the first {only_a}, only in the second {only_b}"
    first = next(i for i, (x, y) in enumerate(zip(a, b)) if x != y)
    return f"same keys in another order, first at position {first}: `{list(a)[first]}` != `{list(b)[first]}`"


def assert_models_identical(model_a: nn.Module, model_b: nn.Module) -> None:
    """Assert two models hold the same named tensors, the same to the bit, tied the same way, same state-dict keys."""
    a, b = named_tensors(model_a), named_tensors(model_b)
    assert sorted(a) == sorted(b), _key_message(dict.fromkeys(sorted(a)), dict.fromkeys(sorted(b)))
    for key in a:
        assert_same_tensors(a[key], b[key], key)
    assert ties(a) == ties(b), f"ties differ: {ties(a)} != {ties(b)}"
    keys_a, keys_b = list(model_a.state_dict()), list(model_b.state_dict())
    assert keys_a == keys_b, "state_dict " + _key_message(dict.fromkeys(keys_a), dict.fromkeys(keys_b))


def eager_and_deferred(
    make: Callable[[], nn.Module], seed: int = 0, concretize: bool = False
) -> tuple[nn.Module, nn.Module]:
    """`make()` built eagerly, and under `tl.deferred(concretize=concretize)` then materialized, each after
    `torch.manual_seed(seed)`; asserts that the block leaves the global generator where eager construction does."""
    import torchlazy as tl

    torch.manual_seed(seed)
    eager = make()
    eager_state = torch.get_rng_state()
    torch.manual_seed(seed)
    with tl.deferred(concretize=concretize):
        model = make()
    assert_same_tensors(torch.get_rng_state(), eager_state, "the generator after the block")
    tl.materialize(model)
    return eager, model
