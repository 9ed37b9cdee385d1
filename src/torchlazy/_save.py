"""`save()`: a model's state dict as safetensors, sharded on request, ties stored once."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch import nn

from . import _torch_compat as tc
from ._deferred import deferred_tensors, is_deferred
from ._errors import ArgumentError, CheckpointError, listed

__all__ = ["parse_size", "save", "save_state_dict"]


def parse_size(size: int | str) -> int:
    if isinstance(size, int) and not isinstance(size, bool) and size > 0:
        return size
    if not isinstance(size, str):
        raise ArgumentError(
            f"`max_shard_size={size!r}`: expected a positive number of bytes (an int) or a string such as '2GB'."
        )
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)i?B?\s*", size.upper())
    if match is None:
        raise ArgumentError(f"`max_shard_size={size!r}`: expected bytes as an int or a string such as '2GB'.")
    scale = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}[match.group(2)]
    nbytes = int(float(match.group(1)) * scale)
    if nbytes <= 0:
        raise ArgumentError(f"`max_shard_size={size!r}`: a shard must hold at least one byte, e.g. '2GB'.")
    return nbytes


def _unique_state(module: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    seen: set[int] = set()
    for key, t in module.state_dict(keep_vars=True).items():
        if id(t) in seen:
            continue
        seen.add(id(t))
        yield key, t.detach()


def save(module: nn.Module, path: str | os.PathLike[str], max_shard_size: int | str | None = None) -> list[Path]:
    """Write the model's state dict as safetensors; tied tensors stored once. Returns the files.

    With `max_shard_size`, `path` is a folder that receives numbered shards and
    `model.safetensors.index.json` (the layout `save_pretrained` writes).

    >>> import torch, torchlazy as tl, tempfile, os
    >>> emb = torch.nn.Embedding(4, 2); head = torch.nn.Linear(2, 4, bias=False); head.weight = emb.weight
    >>> path = os.path.join(tempfile.mkdtemp(), "model.safetensors")
    >>> [p.name for p in tl.save(torch.nn.ModuleDict(dict(emb=emb, head=head)), path)]
    ['model.safetensors']
    """
    if not isinstance(module, nn.Module):
        raise ArgumentError(
            f"`tl.save(model, path)` takes a torch.nn.Module, not {type(module).__name__} (for a state dict: "
            "`safetensors.torch.save_file(state_dict, path)`)."
        )
    if not isinstance(path, (str, os.PathLike)):
        raise ArgumentError(f"`tl.save(model, path)`: `path` is a file name (str or Path), not {type(path).__name__}.")
    if is_deferred(module):
        left = deferred_tensors(module)
        named = f" ({listed(left, 5)})" if left else ""
        raise CheckpointError(
            f"the model is still deferred{named}: call `tl.materialize(model)` (or `tl.build`) before `tl.save`."
        )
    tensors = []
    storages: set[int] = set()
    dtensor = tc.dtensor_type()
    for key, t in _unique_state(module):
        if dtensor is not None and isinstance(t, dtensor):
            raise CheckpointError(
                f"`{key}` is a sharded DTensor (FSDP2 or tensor parallel): `tl.save` writes whole tensors from one "
                "process. Gather them first, on every rank: `sd = get_model_state_dict(model, "
                "options=StateDictOptions(full_state_dict=True, cpu_offload=True))` (from "
                "`torch.distributed.checkpoint.state_dict`), then on rank 0 `torch.save(sd, path)` (`checkpoint=` reads it); "
                "or save the shards with `torch.distributed.checkpoint.save`. Nothing was written."
            )
        t = t.contiguous().cpu()
        if t.numel() and t.untyped_storage().data_ptr() in storages:
            t = t.clone()  # a view of a tensor saved already (a buffer over another's memory): its own bytes
        storages.add(t.untyped_storage().data_ptr())
        tensors.append((key, t))
    out = Path(path)
    if max_shard_size is None:
        if out.is_dir():
            raise ArgumentError(
                f"`tl.save(model, '{out}')`: that is a folder; name a file (`{out / 'model.safetensors'}`), or pass "
                "`max_shard_size=` to write numbered shards and an index into the folder."
            )
        _mkdir(out.parent)
        _replace_all([(out, lambda tmp: _write(tensors, tmp))])
        return [out]
    limit = parse_size(max_shard_size)
    shards: list[list[tuple[str, torch.Tensor]]] = [[]]
    size = 0
    for key, t in tensors:
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > limit:
            shards.append([])
            size = 0
        shards[-1].append((key, t))
        size += nbytes
    _mkdir(out)
    writes: list[tuple[Path, Callable[[Path], None]]] = []
    weight_map: dict[str, str] = {}
    for i, shard in enumerate(shards, 1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        writes.append((out / name, lambda tmp, shard=shard: _write(shard, tmp)))  # type: ignore[misc]
        weight_map.update({k: name for k, _ in shard})
    total = sum(t.numel() * t.element_size() for _, t in tensors)
    index = json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2)

    def write_index(tmp: Path) -> None:
        tmp.write_text(index)

    writes.append((out / INDEX, write_index))
    _replace_all(writes)
    files = [file for file, _ in writes]
    for old in out.iterdir():  # an earlier run's shards the new index does not name: a folder of one checkpoint
        if _SHARD.fullmatch(old.name) and old not in files:
            old.unlink(missing_ok=True)
    return files


INDEX = "model.safetensors.index.json"
_SHARD = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")


def _replace_all(writes: list[tuple[Path, Callable[[Path], None]]]) -> None:
    """Each `write(tmp)` into a temporary file beside its final name, then every one renamed into place: a failed or
    interrupted save leaves the files that were there (no truncated or partial checkpoint), and its temporaries are
    removed."""
    for file, _ in writes:
        if file.is_dir():
            raise CheckpointError(f"`tl.save`: `{file}` is a folder; move it away, or save elsewhere.")
    done: list[tuple[Path, Path]] = []
    try:
        for file, write in writes:
            tmp = file.with_name(f".{file.name}.{os.getpid()}.tmp")
            done.append((tmp, file))
            try:
                write(tmp)
            except Exception as e:  # noqa: BLE001  (safetensors' own error, an OSError, a full disk: one line)
                raise CheckpointError(
                    f"`tl.save`: cannot write `{file}` ({type(e).__name__}: {e}). Choose a writable place with room "
                    "for it; the files that were there are unchanged."
                ) from None
        # the index last, and an earlier one gone first: a folder caught mid-way has shards and no index, never an
        # index naming shards of two saves
        if done[-1][1].name == INDEX:
            done[-1][1].unlink(missing_ok=True)
        for tmp, file in done:
            try:
                os.replace(tmp, file)
            except OSError as e:
                raise CheckpointError(
                    f"`tl.save`: cannot put `{file}` in place ({type(e).__name__}: {e}). Choose a writable place."
                ) from None
    finally:
        for tmp, _ in done:
            tmp.unlink(missing_ok=True)


def save_state_dict(state_dict: dict[str, torch.Tensor], path: str | os.PathLike[str]) -> Path:
    """`torch.save(state_dict, path)` written as `save` writes: its folder made, the file replaced only once whole."""
    out = Path(path)
    _mkdir(out.parent)
    _replace_all([(out, lambda tmp: torch.save(state_dict, tmp))])
    return out


def _mkdir(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CheckpointError(
            f"`tl.save`: cannot create the folder `{folder}` ({e}). Choose a writable place."
        ) from None


def _write(tensors: list[tuple[str, torch.Tensor]], file: Path) -> None:
    """One safetensors file (its errors, an unwritable place, said by `_replace_all` under the final name)."""
    from safetensors.torch import save_file

    save_file(dict(tensors), str(file), metadata={"format": "pt"})
