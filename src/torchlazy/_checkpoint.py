"""Checkpoints: open them, match their keys to a model's, read tensors on demand.

Sources are opened without reading tensors: safetensors files are memory
mapped and each tensor is read when its turn comes; `.pt`/`.bin` files are
loaded with `weights_only=True` and `mmap=True`, so no arbitrary object is ever
unpickled and untouched pages are never read. A tensor found in the checkpoint
is never initialized at random: only what the checkpoint lacks is replayed
from the record. This module knows nothing of lazy layers or records: the
orchestrator (`_materialize.py`) decides what to read; writing is `_save.py`.
"""

from __future__ import annotations

import json
import os
import pickle
import zipfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from . import _paths
from . import _torch_compat as tc
from ._errors import ArgumentError, CheckpointError, ShapeError

__all__ = ["Checkpoint", "CheckpointShapeError", "KeyPlan", "mapper", "open_checkpoint", "plan_keys"]

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
    # a read may become the model's tensor as it is: a safetensors file's memory map (pages read on first use, as
    # `from_pretrained` and `load_state_dict(assign=True)` leave them; safetensors' writers replace a file, they
    # never write into it). Otherwise (a caller's tensors; a `torch.load` map, which `torch.save` to the same path
    # truncates under the model; keys sharing one storage) materialize copies it
    mapped: bool = False

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
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "C64": torch.complex64,
    "U16": torch.uint16, "U32": torch.uint32, "U64": torch.uint64,
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

        entries[key] = _Entry(tuple(info.get_shape()), dtype, read, str(path), read_slice, mapped=True)
    return entries


def _pickle_entries(path: Path) -> dict[str, _Entry]:
    if not path.exists():
        raise CheckpointError(f"checkpoint file `{path}` does not exist.")
    if path.stat().st_size == 0:
        raise CheckpointError(f"`{path}` is an empty file, not a PyTorch checkpoint.")
    legacy = not zipfile.is_zipfile(path)  # torch.save(..., _use_new_zipfile_serialization=False): no mmap
    try:
        data = torch.load(str(path), map_location="cpu", weights_only=True, mmap=not legacy)
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
    if not isinstance(data, Mapping):
        raise CheckpointError(
            f"`{path}` holds a {type(data).__name__}, not a state dict (a mapping of names to tensors)."
        )
    odd = [k for k, v in data.items() if not (isinstance(k, str) and isinstance(v, torch.Tensor))]
    if odd:
        raise CheckpointError(
            f"`{path}` does not hold a state dict (a mapping of names to tensors): not tensors under "
            f"{_listing([str(k) for k in odd])} (a training checkpoint's step or optimizer state?). Save `model.state_dict()` "
            "alone, or pass the tensors: `checkpoint={k: v for k, v in torch.load(path).items() if ...}`."
        )
    return _mapping_entries(data, str(path))


def _mapping_entries(data: Mapping[str, torch.Tensor], where: str) -> dict[str, _Entry]:
    """Entries over the tensors of `data` (a read is the tensor itself: materialize copies what it loads)."""

    def reader(t: torch.Tensor) -> Callable[[], torch.Tensor]:
        return lambda: t.detach()

    def slicer(t: torch.Tensor) -> Callable[[tuple[slice, ...]], torch.Tensor]:
        return lambda index: t.detach()[index].clone()  # the slice's own copy, not one of the whole tensor first

    DTensor = tc.dtensor_type()
    return {
        k: _dtensor_entry(k, v, where)
        if DTensor is not None and isinstance(v, DTensor)
        else _Entry(tuple(v.shape), v.dtype, reader(v), where, slicer(v))
        for k, v in data.items()
    }


def _dtensor_entry(key: str, t: torch.Tensor, where: str) -> _Entry:
    """A DTensor of a state dict (a sharded model's `state_dict()`): this rank holds only its slice. It gives the
    slice of a parameter sharded as it is (each rank its own, as `load_state_dict` copies shard to shard), or the
    whole of a replicated one; anything else would need the other ranks' slices, so it is refused."""
    mesh, placements = t.device_mesh, t.placements  # type: ignore[attr-defined]
    plain = all(type(p).__name__ in ("Shard", "Replicate") for p in placements)  # not Partial sums, strided shards
    shape, offset = tc.local_shape_and_offset(t.shape, mesh, placements)
    mine = tuple(slice(o, o + n) for o, n in zip(offset, shape))
    local = tc.dtensor_local(t).detach()

    def refuse(wanted: str) -> CheckpointError:
        return CheckpointError(
            f"`{key}` in `checkpoint=` {where} is a DTensor ({tuple(placements)} over a mesh of "
            f"{mesh.size()} ranks) of which this rank holds rows {_rows(mine)}, but {wanted}. Pass a full state dict "
            "(`torch.distributed.checkpoint.state_dict.get_model_state_dict(source, options=StateDictOptions("
            "full_state_dict=True))`, or `{k: v.full_tensor() for k, v in sd.items()}` on every rank), or shard "
            "this model as the source is sharded. The model is unchanged."
        )

    def rows_held() -> None:
        if not plain:
            raise refuse("its values are not this rank's slices (a partial sum, a strided shard)")

    def read() -> torch.Tensor:
        rows_held()
        if mine == tuple(slice(0, n) for n in t.shape):  # replicated: the whole tensor is here
            return local
        raise refuse("the tensor it goes to is not sharded")

    def read_slice(index: tuple[slice, ...]) -> torch.Tensor:
        rows_held()
        if all(m.start <= i.start and i.stop <= m.stop for i, m in zip(index, mine)):  # here (replicated: all is)
            return local[tuple(slice(i.start - m.start, i.stop - m.start) for i, m in zip(index, mine))].clone()
        raise refuse(f"the shard it goes to holds rows {_rows(index)}")

    return _Entry(tuple(t.shape), t.dtype, read, where, read_slice)


def _rows(index: tuple[slice, ...]) -> str:
    return " x ".join(f"{s.start}:{s.stop}" for s in index)


def _from_index(index: Path) -> dict[str, _Entry]:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"`{index}` is not a checkpoint index (JSON with a `weight_map`): {e}") from None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise CheckpointError(
            f"`{index}`: its `weight_map` must map each tensor name to a file name (a JSON object of strings), "
            f"got {type(weight_map).__name__}{' with other values' if isinstance(weight_map, dict) else ''}."
        )
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


def open_checkpoint(path: str | os.PathLike[str] | Mapping[str, torch.Tensor]) -> Checkpoint:
    """A safetensors file, a folder or index of shards, a `.pt`/`.bin` state dict, or a state dict in memory."""
    if isinstance(path, Mapping):
        bad = [k for k, v in path.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
        if bad:
            raise ArgumentError(
                f"`checkpoint=` got a mapping whose entries are not all name -> tensor (first: `{bad[0]!r}`); "
                "pass `model.state_dict()`-like dicts, or a path."
            )
        empty = [k for k, v in path.items() if v.is_meta or tc.is_fake_or_fake_shard(v)]
        if empty:
            raise CheckpointError(
                f"`checkpoint=` got a state dict whose tensors have no values (`{empty[0]}` is "
                f"{'on the meta device' if path[empty[0]].is_meta else 'deferred'}"
                f"{f', and {len(empty) - 1} more' if len(empty) > 1 else ''}): materialize the model it came from "
                "first (`tl.materialize(source)`), or pass a saved file. The model is unchanged."
            )
        return Checkpoint(_mapping_entries(path, "<state dict>"), "<state dict>")
    if not isinstance(path, (str, os.PathLike)):
        raise ArgumentError(
            f"`checkpoint=` takes a path (safetensors, .pt/.bin, a folder or an index) or a state dict, "
            f"not {type(path).__name__}."
        )
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"`checkpoint=`: `{p}` does not exist (no such file or folder). The model is unchanged.")
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


def mapper(key_map: KeyMap) -> Callable[[str], str | None]:
    if key_map is None:
        return lambda k: k
    if callable(key_map):
        return _checked(key_map)
    if not isinstance(key_map, Mapping) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in key_map.items()
    ):
        raise ArgumentError(
            "`key_map=` takes a mapping of checkpoint key prefixes to model key prefixes (strings, e.g. "
            f"`{{'module.': ''}}`) or a function of a key; got {key_map!r}."
        )
    rules = sorted(key_map.items(), key=lambda kv: -len(kv[0]))

    def by_prefix(key: str) -> str | None:
        for old, new in rules:
            if key.startswith(old):
                return new + key[len(old) :]
        return key

    return by_prefix


def _checked(key_map: Callable[[str], str | None]) -> Callable[[str], str | None]:
    """A `key_map` callable whose failures say which key they came from, and that names what it returned."""

    def call(key: str) -> str | None:
        try:
            new = key_map(key)
        except Exception as e:
            raise ArgumentError(
                f"`key_map` raised {type(e).__name__} ({e}) for the checkpoint key `{key}`. It is called with every "
                "key of the checkpoint and returns the model's key, or None to skip the key."
            ) from e
        if new is not None and not isinstance(new, str):
            raise ArgumentError(
                f"`key_map` returned {new!r} ({type(new).__name__}) for `{key}`: it returns the model's key (a "
                "string), or None to skip the key."
            )
        return new

    return call


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


@dataclass
class KeyPlan:
    """Which checkpoint tensor each model tensor takes: worked out once per materialize."""

    ckpt: Checkpoint
    model_keys: dict[int, list[str]]  # id(tensor) -> the state-dict keys naming it (ties have several)
    sources: dict[str, str]  # model key -> checkpoint key
    unexpected: list[str]  # checkpoint keys the model does not have (`key -> renamed` where `key_map` renamed)

    def find(self, t: torch.Tensor) -> tuple[str, str] | None:
        """(model key, checkpoint key) for tensor `t`, or None when the checkpoint lacks it."""
        return next(((k, self.sources[k]) for k in self.model_keys.get(id(t), []) if k in self.sources), None)

    def keys_of(self, t: torch.Tensor) -> list[str]:
        return self.model_keys.get(id(t), [])

    def check(self, key: str, source: str, shape: tuple[int, ...], dtype: torch.dtype) -> _Entry:
        """The entry for `source`, after checking it fits a model tensor of `shape` and `dtype`."""
        entry = self.ckpt.entries[source]
        if entry.shape != tuple(shape):
            raise CheckpointShapeError(
                f"`{key}`: the model expects shape {tuple(shape)}, the checkpoint `{entry.where}` has "
                f"{entry.shape} (as `{source}`). Check that the checkpoint belongs to this configuration, "
                "or map keys with `key_map=`."
            )
        if entry.dtype.is_complex != dtype.is_complex:
            raise CheckpointError(f"`{key}`: cannot load a {entry.dtype} tensor into a {dtype} one.")
        return entry

    def mismatch(self, missing: list[str]) -> CheckpointError | None:
        """The error for a strict load with keys missing on either side, if any are."""
        if not (missing or self.unexpected):
            return None
        parts = []
        if missing:
            parts.append(f"missing from the checkpoint: {_listing(missing)}")
        if self.unexpected:
            parts.append(f"not in the model: {_listing(self.unexpected)}")
        return CheckpointError(
            f"`{self.ckpt.path}` does not match the model ({'; '.join(parts)}). Use `strict=False` to "
            "initialize what is missing from the record (as eager construction would), or "
            "`key_map=` to rename checkpoint keys (a callable, or prefix rules such as "
            "{'module.': ''})."
        )


def renamer(
    module: nn.Module, ckpt: Checkpoint, key_map: KeyMap, known: set[str] | None = None
) -> Callable[[str], str | None]:
    """Checkpoint key -> model key: by `key_map`, or under the prefix found for a sub-module's checkpoint
    (`known`: the model's keys, where the caller has them)."""
    if key_map is not None:
        return mapper(key_map)
    if known is None:
        known = {k for ks in _model_keys(module).values() for k in ks}
    return mapper(_sub_module_prefix(module, known, ckpt))


def plan_keys(module: nn.Module, ckpt: Checkpoint, key_map: KeyMap) -> KeyPlan:
    """Match the checkpoint's keys to the model's (renamed by `key_map`, or found under a prefix)."""
    model_keys = _model_keys(module)
    known = {k for ks in model_keys.values() for k in ks}
    rename = renamer(module, ckpt, key_map, known)
    sources: dict[str, str] = {}
    unexpected: list[str] = []
    for key in ckpt.entries:
        new = rename(key)
        if new is not None and new in known:
            if new in sources:  # the file order would pick one silently
                raise CheckpointError(
                    f"checkpoint keys `{sources[new]}` and `{key}` both map to the model's `{new}` (after "
                    f"`key_map`, or under the prefix found for this sub-module). Make `key_map` tell them apart: "
                    f"map the one to keep to `{new}` and the other to None (a callable can return None to skip a key)."
                )
            sources[new] = key
        elif new is not None:
            unexpected.append(key if new == key else f"{key} -> {new}")  # as `key_map` named it
    return KeyPlan(ckpt, model_keys, sources, unexpected)


def _listing(keys: list[str], limit: int = 8) -> str:
    shown = ", ".join(f"`{k}`" for k in keys[:limit])
    return shown + (f" and {len(keys) - limit} more" if len(keys) > limit else "")
