"""Count the real memory torch allocates inside a block: a dispatch mode that sees every new storage."""

from __future__ import annotations

import torch
from torch._subclasses.fake_tensor import FakeTensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


def _real(t: object) -> bool:
    return isinstance(t, torch.Tensor) and not isinstance(t, FakeTensor) and t.device.type != "meta"


class CountAllocations(TorchDispatchMode):
    """Every op whose output lives in a real (not fake, not meta) storage none of its inputs had.

    `storages` lists (op name, bytes) per new storage; `nbytes` is their sum. Views and in-place ops
    add nothing; a tensor created and freed inside the block still counts (this is allocations made,
    not memory held at the end).
    """

    def __init__(self) -> None:
        super().__init__()
        self.storages: list[tuple[str, int]] = []

    @property
    def nbytes(self) -> int:
        return sum(n for _, n in self.storages)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0] if _real(t) and t.numel()}
        seen: set[int] = set()
        for t in tree_flatten(out)[0]:
            if _real(t) and t.numel():
                storage = t.untyped_storage()
                if storage.data_ptr() not in inputs and storage.data_ptr() not in seen:
                    seen.add(storage.data_ptr())
                    self.storages.append((str(func), storage.nbytes()))
        return out


def state_bytes(model: torch.nn.Module) -> int:
    """Bytes of every distinct parameter and buffer storage a model holds."""
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in model.state_dict().values()}
    for b in model.buffers():
        storages[b.untyped_storage().data_ptr()] = b.untyped_storage().nbytes()
    return sum(storages.values())
