"""Checkpoints: read values straight into a deferred model, and write them.

Sources are opened without reading tensors: safetensors files are memory
mapped and each tensor is read when its turn comes; `.pt`/`.bin` files are
loaded with `weights_only=True` and `mmap=True`, so no arbitrary object is ever
unpickled and untouched pages are never read. A tensor found in the checkpoint
is never initialized at random: only what the checkpoint lacks is replayed
from the record.
"""

from __future__ import annotations

import json
import os
import pickle
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from . import _lazy, _paths
from ._errors import CheckpointError, ShapeError

if TYPE_CHECKING:
    from ._materialize import _Target

__all__ = ["save", "open_checkpoint", "load_into_targets"]

KeyMap = Callable[[str], str | None] | Mapping[str, str] | None


class CheckpointShapeError(CheckpointError, ShapeError):
    """A checkpoint tensor has another shape than the model's."""


@dataclass
class _Entry:
    shape: tuple[int, ...]
    dtype: torch.dtype
    read: Callable[[], torch.Tensor]
    where: str
    read_slice: Callable[[tuple[slice, ...]], torch.Tensor] | None = None

    def slice(self, index: tuple[slice, ...]) -> torch.Tensor:
        """Only the bytes of `index` (memory-mapped files read no more)."""
        if self.read_slice is not None:
            return self.read_slice(index)
        return self.read()[index].clone()


class Checkpoint:
    """Keys, shapes and dtypes of a checkpoint; tensors read on demand."""

    def __init__(self, entries: dict[str, _Entry], path: str) -> None:
        self.entries = entries
        self.path = path

    def __contains__(self, key: str) -> bool:
        return key in self.entries


_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}  # fmt: skip


def _safetensors_entries(path: Path) -> dict[str, _Entry]:
    from safetensors import safe_open

    if not path.exists():
        raise CheckpointError(f"checkpoint file `{path}` does not exist (a shard named in the index is missing?).")
    try:
        handle = safe_open(str(path), framework="pt", device="cpu")
    except Exception as e:
        raise CheckpointError(
            f"`{path}` is not a readable safetensors file ({e}). It may be truncated or corrupt: "
            "write it again, or check the download."
        ) from None
    entries: dict[str, _Entry] = {}
    for key in handle.keys():
        info = handle.get_slice(key)
        name = info.get_dtype()
        dtype = _SAFETENSORS_DTYPES.get(name)
        if dtype is None:
            raise CheckpointError(
                f"`{key}` in `{path}` has dtype {name}, which this PyTorch cannot hold. Convert the "
                "checkpoint to a supported dtype (for example with safetensors in float32)."
            )

        def read(key: str = key) -> torch.Tensor:
            try:
                return handle.get_tensor(key)
            except Exception as e:
                raise CheckpointError(
                    f"reading `{key}` from `{path}` failed: {e}. The file may be truncated."
                ) from None

        def read_slice(index: tuple[slice, ...], key: str = key) -> torch.Tensor:
            return handle.get_slice(key)[index]

        entries[key] = _Entry(tuple(info.get_shape()), dtype, read, str(path), read_slice)
    return entries


def _pickle_entries(path: Path) -> dict[str, _Entry]:
    if not path.exists():
        raise CheckpointError(f"checkpoint file `{path}` does not exist.")
    try:
        data = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"`{path}` needs to run code to load ({str(e).splitlines()[0]}); torchlazy only reads "
            "tensors (`weights_only=True`). Re-save it as a plain state dict or as safetensors "
            "(`tl.save(model, 'model.safetensors')`)."
        ) from None
    except Exception as e:
        raise CheckpointError(
            f"`{path}` is not a readable PyTorch checkpoint ({e}); it may be truncated or corrupt."
        ) from None
    if isinstance(data, Mapping) and "state_dict" in data and isinstance(data["state_dict"], Mapping):
        data = data["state_dict"]
    if not isinstance(data, Mapping) or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise CheckpointError(f"`{path}` does not hold a state dict (a mapping of names to tensors).")

    def reader(t: torch.Tensor) -> Callable[[], torch.Tensor]:
        return lambda: t

    return {k: _Entry(tuple(v.shape), v.dtype, reader(v), str(path)) for k, v in data.items()}


def _from_index(index: Path) -> dict[str, _Entry]:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"`{index}` is not a checkpoint index (JSON with a `weight_map`): {e}") from None
    entries: dict[str, _Entry] = {}
    opened: dict[str, dict[str, _Entry]] = {}
    for key, file in weight_map.items():
        if file not in opened:
            shard = index.parent / file
            opened[file] = _safetensors_entries(shard) if file.endswith(".safetensors") else _pickle_entries(shard)
        if key not in opened[file]:
            raise CheckpointError(f"`{index}` maps `{key}` to `{file}`, which does not contain it.")
        entries[key] = opened[file][key]
    return entries


def open_checkpoint(path: str | os.PathLike[str]) -> Checkpoint:
    """A safetensors file, a folder or index of shards, or a `.pt`/`.bin` state dict."""
    p = Path(path)
    if p.is_dir():
        for name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
            if (p / name).exists():
                return Checkpoint(_from_index(p / name), str(p))
        indexes = sorted(p.glob("*.safetensors.index.json"))
        if indexes:
            return Checkpoint(_from_index(indexes[0]), str(p))
        files = sorted(p.glob("*.safetensors"))
        if len(files) == 1:
            return Checkpoint(_safetensors_entries(files[0]), str(p))
        for name in ("pytorch_model.bin", "model.pt"):
            if (p / name).exists():
                return Checkpoint(_pickle_entries(p / name), str(p))
        raise CheckpointError(
            f"no checkpoint found in folder `{p}` (looked for safetensors files, an index, pytorch_model.bin)."
        )
    if p.name.endswith(".index.json"):
        return Checkpoint(_from_index(p), str(p))
    if p.suffix == ".safetensors":
        return Checkpoint(_safetensors_entries(p), str(p))
    if p.suffix in (".pt", ".pth", ".bin"):
        return Checkpoint(_pickle_entries(p), str(p))
    raise CheckpointError(
        f"`{p}`: unknown checkpoint format; expected .safetensors, an index .json, a folder, or .pt/.bin."
    )


def _mapper(key_map: KeyMap) -> Callable[[str], str | None]:
    if key_map is None:
        return lambda k: k
    if callable(key_map):
        return key_map
    rules = sorted(key_map.items(), key=lambda kv: -len(kv[0]))

    def by_prefix(key: str) -> str | None:
        for old, new in rules:
            if key.startswith(old):
                return new + key[len(old) :]
        return key

    return by_prefix


def _model_keys(module: nn.Module) -> dict[int, list[str]]:
    """id(tensor) -> the state-dict keys naming it (tied tensors have several)."""
    keys: dict[int, list[str]] = {}
    for key, t in module.state_dict(keep_vars=True).items():
        keys.setdefault(id(t), []).append(key)
    return keys


def _sub_module_prefix(module: nn.Module, known: set[str], ckpt: Checkpoint) -> Callable[[str], str | None] | None:
    """For a sub-module and a whole model's checkpoint: the prefix under which all its keys are.

    `tl.materialize(model.layers[3], checkpoint=...)` then reads `layers.3.*` and ignores the rest.
    Where several sub-modules fit (identical layers), the sub-module's path decides, if known.
    """
    if not known or known & ckpt.entries.keys():
        return None
    first = min(known)
    candidates = []
    for key in ckpt.entries:
        if key.endswith("." + first):
            prefix = key[: -len(first)]
            if all(prefix + k in ckpt.entries for k in known):
                candidates.append(prefix)
    if len(candidates) == 1:
        return _only_under(candidates[0])
    path = _paths.known_path(module)
    if path is not None and f"{path}." in candidates:
        return _only_under(f"{path}.")
    if candidates:
        raise CheckpointError(
            f"`{ckpt.path}` holds this sub-module's keys under several prefixes ({_listing(candidates)}): "
            "say which with `key_map={'<prefix>': ''}`, or materialize from the root module."
        )
    return None


def _only_under(prefix: str) -> Callable[[str], str | None]:
    """Strip `prefix`; drop every key outside it (they belong to other sub-modules)."""
    return lambda key: key[len(prefix) :] if key.startswith(prefix) else None


def build_lazy_from_checkpoint(module: nn.Module, ckpt: Checkpoint, rename: Callable[[str], str | None]) -> None:
    """Shape unbuilt lazy layers from the checkpoint's tensor shapes (no data read)."""
    shapes: dict[str, tuple[int, ...]] = {}
    for key, entry in ckpt.entries.items():
        new = rename(key)
        if new is not None:
            shapes[new] = entry.shape
    for path, sub in list(module.named_modules()):
        if isinstance(sub, _lazy._LazyLayer):
            prefix = f"{path}." if path else ""
            mine = {k[len(prefix) :]: torch.empty(s, device="meta") for k, s in shapes.items() if k.startswith(prefix)}
            if mine:
                sub._tl_build_from_state(mine, prefix)


def load_into_targets(
    module: nn.Module,
    targets: list[_Target],
    checkpoint: Any,
    strict: bool,
    key_map: KeyMap,
    device: torch.device | str | None,
    dtype: torch.dtype | None,
) -> tuple[dict[int, torch.Tensor], list[_Target]]:
    """Values read from the checkpoint, and the targets left for the record."""
    ckpt = checkpoint if isinstance(checkpoint, Checkpoint) else open_checkpoint(checkpoint)
    model_keys = _model_keys(module)
    known = {k for ks in model_keys.values() for k in ks}
    rename = _mapper(key_map) if key_map is not None else _mapper(_sub_module_prefix(module, known, ckpt))
    by_model_key: dict[str, str] = {}
    unexpected: list[str] = []
    for key in ckpt.entries:
        new = rename(key)
        if new is not None and new in known:
            by_model_key[new] = key
        elif new is not None:
            unexpected.append(key)
    values: dict[int, torch.Tensor] = {}
    rest: list[_Target] = []
    missing: list[str] = []
    plan: list[tuple[_Target, str, str]] = []
    for target in targets:
        keys = model_keys.get(id(target.tensor), [])
        found = next((k for k in keys if k in by_model_key), None)
        if found is None:
            rest.append(target)
            if keys:
                missing.append(keys[0])
            continue
        plan.append((target, found, by_model_key[found]))
    for target, key, source in plan:
        entry = ckpt.entries[source]
        if entry.shape != tuple(target.tensor.shape):
            raise CheckpointShapeError(
                f"`{key}`: the model expects shape {tuple(target.tensor.shape)}, the checkpoint "
                f"`{entry.where}` has {entry.shape} (as `{source}`). Check that the checkpoint belongs "
                "to this configuration, or map keys with `key_map=`."
            )
        if entry.dtype.is_complex != target.tensor.dtype.is_complex:
            raise CheckpointError(f"`{key}`: cannot load a {entry.dtype} tensor into a {target.tensor.dtype} one.")
    if strict and (missing or unexpected):
        parts = []
        if missing:
            parts.append(f"missing from the checkpoint: {_listing(missing)}")
        if unexpected:
            parts.append(f"not in the model: {_listing(unexpected)}")
        raise CheckpointError(
            f"`{ckpt.path}` does not match the model ({'; '.join(parts)}). Use `strict=False` to "
            "initialize what is missing from the record (as eager construction would), or "
            "`key_map=` to rename checkpoint keys (a callable, or prefix rules such as "
            "{'module.': ''})."
        )
    for target, _, source in plan:
        tensor = ckpt.entries[source].read()
        final_dtype = dtype if dtype is not None and target.tensor.dtype.is_floating_point else target.tensor.dtype
        final_device = torch.device(device) if device is not None else target.tensor.device
        values[id(target.tensor)] = tensor.to(final_device, final_dtype, copy=False)
    return values, rest


def shard_reader(
    module: nn.Module, checkpoint: Any, key_map: KeyMap, strict: bool
) -> Callable[[Any, tuple[slice, ...]], torch.Tensor | None]:
    """For sharded parameters: read each rank's slice of the checkpoint tensor, nothing more."""
    ckpt = checkpoint if isinstance(checkpoint, Checkpoint) else open_checkpoint(checkpoint)
    rename = _mapper(key_map)
    sources = {rename(k): k for k in ckpt.entries}
    keys = _model_keys(module)

    def read(shard: Any, index: tuple[slice, ...]) -> torch.Tensor | None:
        names = keys.get(id(shard.param), [])
        found = next((k for k in names if k in sources), None)
        if found is None:
            if strict:
                raise CheckpointError(
                    f"`{shard.path}` is missing from `{ckpt.path}`; use `strict=False` to initialize it from the record."
                )
            return None
        entry = ckpt.entries[sources[found]]  # type: ignore[index]
        if entry.shape != tuple(shard.param.shape):
            raise CheckpointShapeError(
                f"`{found}`: the model expects shape {tuple(shard.param.shape)}, the checkpoint has {entry.shape}."
            )
        return entry.slice(index)

    return read


def _listing(keys: list[str], limit: int = 8) -> str:
    shown = ", ".join(f"`{k}`" for k in keys[:limit])
    return shown + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


def _parse_size(size: int | str) -> int:
    if isinstance(size, int):
        return size
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)i?B?\s*", size.upper())
    if match is None:
        raise ValueError(f"`max_shard_size={size!r}`: expected bytes as an int or a string such as '2GB'.")
    scale = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}[match.group(2)]
    return int(float(match.group(1)) * scale)


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
    from safetensors.torch import save_file

    from ._deferred import is_deferred

    if is_deferred(module):
        raise CheckpointError(
            "the model is still deferred: call `tl.materialize(model)` (or `tl.build`) before `tl.save`."
        )
    tensors = [(k, t.contiguous().cpu()) for k, t in _unique_state(module)]
    out = Path(path)
    if max_shard_size is None:
        out.parent.mkdir(parents=True, exist_ok=True)
        save_file(dict(tensors), str(out), metadata={"format": "pt"})
        return [out]
    limit = _parse_size(max_shard_size)
    shards: list[list[tuple[str, torch.Tensor]]] = [[]]
    size = 0
    for key, t in tensors:
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > limit:
            shards.append([])
            size = 0
        shards[-1].append((key, t))
        size += nbytes
    out.mkdir(parents=True, exist_ok=True)
    files, weight_map = [], {}
    for i, shard in enumerate(shards, 1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(dict(shard), str(out / name), metadata={"format": "pt"})
        files.append(out / name)
        weight_map.update({k: name for k, _ in shard})
    total = sum(t.numel() * t.element_size() for _, t in tensors)
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return [*files, out / "model.safetensors.index.json"]
