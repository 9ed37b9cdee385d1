"""A transformers model from its `config.json`, constructed under `tl.deferred()` (for the command line).

The config is read from a local file or folder (no download); the class is the
config's first `architectures` entry when transformers has it, `AutoModel`
otherwise. Nothing is allocated: the model is deferred.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from torch import nn

from ._deferred import deferred
from ._errors import LazyError

__all__ = ["config_file", "model_from_config"]


def config_file(target: str) -> Path | None:
    """The `config.json` that `target` names (the file or a folder holding one), or None."""
    path = Path(target)
    if path.is_dir() and (path / "config.json").is_file():
        return path / "config.json"
    if path.is_file() and path.suffix == ".json":
        return path
    return None


def model_from_config(path: Path, concretize: bool = False) -> nn.Module:
    try:
        import transformers
    except ImportError:
        raise LazyError(
            f"`{path}` is a transformers config, but transformers is not installed: `pip install transformers`."
        ) from None
    try:
        config = transformers.AutoConfig.from_pretrained(os.fspath(path.parent if path.name == "config.json" else path))
    except Exception as e:  # noqa: BLE001  (transformers raises many kinds for a bad file)
        raise LazyError(
            f"cannot read the transformers config `{path}`: {type(e).__name__}: {e}. Expected a `config.json` "
            "with a `model_type`, as `PretrainedConfig.save_pretrained` writes it."
        ) from None
    names = getattr(config, "architectures", None) or []
    cls: Any = getattr(transformers, names[0], None) if names else None
    with deferred(concretize=concretize):
        if cls is not None and hasattr(cls, "_from_config"):
            model = cls._from_config(config)
        else:
            model = transformers.AutoModel.from_config(config)
    return model  # type: ignore[no-any-return]
