"""The `torchlazy` command: the same facts for people who do not want to write code.

    torchlazy summary pkg.module:factory [--kwargs JSON] [--input 8x3x224x224[:dtype] ...] [--depth N]
                      [--flops] [--memory [--optimizer adamw] [--autocast bf16]] [--format text|json|markdown]
                      [--concretize]
    torchlazy summary path/to/config.json --input 1x128:int64 --flops --memory   (a transformers config)
    torchlazy materialize pkg.module:factory [--kwargs JSON] [--input ...] [--seed N] [--dtype D]
                      [--concretize] --out FILE[.safetensors|.pt] [--max-shard-size 2GB]

The factory is constructed under `tl.deferred()`: nothing is allocated by
`summary`, and `materialize` writes exactly what eager construction would
have built under `--seed` (a "seed checkpoint").

`--out` ending in `.pt`, `.pth` or `.bin` writes a `torch.save` state dict; any other name
a safetensors file (a folder of shards with `--max-shard-size`).

Exit codes: 0 done, 2 bad arguments, 3 the factory cannot be imported,
4 the model cannot be constructed, built or written.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import typing
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from . import _lazy
from ._costs import CostError, estimate_memory, optimizer_class
from ._deferred import deferred, deferred_tensors
from ._errors import ArgumentError, LazyError
from ._from_config import config_file, model_from_config
from ._infer import build
from ._materialize import materialize
from ._save import parse_size, save, save_state_dict
from ._spec import Spec
from ._summary import summary

TORCH_SUFFIXES = (".pt", ".pth", ".bin")
DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "f32": torch.float32, "float": torch.float32,
    "float16": torch.float16, "fp16": torch.float16, "f16": torch.float16, "half": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float64": torch.float64, "fp64": torch.float64, "double": torch.float64,
    "int64": torch.int64, "long": torch.int64, "int32": torch.int32, "int": torch.int32,
    "int16": torch.int16, "int8": torch.int8, "uint8": torch.uint8, "bool": torch.bool,
}  # fmt: skip


class UsageError(Exception):
    """Bad arguments: exit code 2."""


class ImportFailure(Exception):
    """The factory cannot be imported: exit code 3."""


class FactoryFailure(Exception):
    """The model's factory raised (its own code): exit code 4, the error naming the call."""


def parse_dtype(flag: str, text: str) -> torch.dtype:
    dtype = DTYPES.get(text.strip().lower())
    if dtype is None:
        raise UsageError(f"{flag}: unknown dtype `{text}`; use one of {', '.join(sorted(DTYPES))}")
    return dtype


def parse_float_dtype(flag: str, text: str) -> torch.dtype:
    dtype = parse_dtype(flag, text)
    if not dtype.is_floating_point:
        raise UsageError(
            f"{flag} `{text}`: parameters are cast to a floating dtype; use float32, bf16, fp16 or float64"
        )
    return dtype


def parse_input(text: str) -> tuple[str | None, Spec]:
    """`8x3x224x224`, `8x128:int64`, or `input_ids=8x128:int64` (a keyword input)."""
    name, _, rest = text.rpartition("=")
    shape_text, _, dtype_text = rest.partition(":")
    try:
        shape = tuple(int(s) for s in shape_text.lower().split("x"))
    except ValueError:
        raise UsageError(f"bad --input `{text}`: expected sizes joined by `x`, like 8x3x224x224[:dtype]") from None
    if any(s < 0 for s in shape):
        raise UsageError(f"bad --input `{text}`: sizes must be non-negative")
    dtype = parse_dtype(f"--input `{text}`", dtype_text) if dtype_text else torch.float32
    return (name or None), Spec(*shape, dtype=dtype)


def load_factory(target: str) -> Callable[..., Any]:
    module_name, sep, attr = target.partition(":")
    if not sep and (target.endswith(".json") or os.sep in target):
        raise UsageError(f"no transformers config at `{target}`: no such file, nor a folder holding a config.json")
    if not sep or not module_name or not attr:
        raise UsageError(f"bad model `{target}`: expected MODULE:CALLABLE, like `torchvision.models:resnet50`")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except Exception as e:
        raise ImportFailure(f"cannot import `{module_name}`: {type(e).__name__}: {e}") from None
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ImportFailure(f"`{module_name}` has no attribute `{attr}`")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ImportFailure(f"`{target}` is not callable")
    return obj  # type: ignore[no-any-return]


def _construct(args: argparse.Namespace, seed: int | None = None) -> torch.nn.Module:
    """The model `args.model` names, constructed under `tl.deferred()`; `seed`: `torch.manual_seed` right before the
    construction itself (after the factory's module is imported: an import that draws does not shift the stream)."""
    config = config_file(args.model)
    if config is not None:
        if args.kwargs:
            raise UsageError("--kwargs applies to a MODULE:CALLABLE factory, not to a transformers config")
        if seed is not None:
            torch.manual_seed(seed)
        return model_from_config(config, concretize=args.concretize)
    try:
        kwargs = json.loads(args.kwargs) if args.kwargs else {}
    except json.JSONDecodeError as e:
        raise UsageError(f"--kwargs is not valid JSON: {e}") from None
    if not isinstance(kwargs, dict):
        raise UsageError("--kwargs must be a JSON object, like '{\"num_classes\": 10}'")
    factory = load_factory(args.model)
    if isinstance(factory, torch.nn.Module):  # a module made at import: summarized as it is
        if kwargs or seed is not None:
            raise UsageError(
                f"`{args.model}` is a module already made: it takes no --kwargs, and `materialize` needs a factory "
                "to construct (a MODULE:CALLABLE returning the module)"
            )
        return factory
    if seed is not None:
        torch.manual_seed(seed)
    try:
        with deferred(concretize=args.concretize):
            model = factory(**kwargs)
    except LazyError:
        raise
    except Exception as e:  # the model's own code: say where it ran (the exit code stays 4)
        raise FactoryFailure(
            f"`{args.model}({', '.join(f'{k}={v!r}' for k, v in kwargs.items())})` raised {type(e).__name__}: {e} "
            "(the model's own code, run under tl.deferred(); check --kwargs, or run the factory in Python to see "
            "its traceback)"
        ) from e
    if not isinstance(model, torch.nn.Module):
        raise LazyError(f"`{args.model}` returned {type(model).__name__}, not a torch.nn.Module")
    return model


def _examples(inputs: Sequence[str]) -> tuple[list[Spec], dict[str, Spec]]:
    positional: list[Spec] = []
    keywords: dict[str, Spec] = {}
    for text in inputs:
        name, spec = parse_input(text)
        if name is None:
            positional.append(spec)
        else:
            keywords[name] = spec
    return positional, keywords


def cmd_summary(args: argparse.Namespace) -> int:
    positional, keywords = _examples(args.input)
    if args.depth is not None and args.depth < 0:
        raise UsageError(f"--depth {args.depth}: expected 0 or more (the depth of modules to show)")
    if (args.flops or args.memory) and not (positional or keywords):
        raise UsageError("--flops and --memory run the forward: pass an example with --input SHAPE[:dtype]")
    if not args.memory and (args.optimizer is not None or args.autocast is not None):
        raise UsageError("--optimizer and --autocast apply to the training step of --memory: add --memory")
    autocast = parse_float_dtype("--autocast", args.autocast) if args.autocast else None
    try:
        optimizer = optimizer_class(args.optimizer or "adamw")  # checked before the model is constructed
    except CostError as e:
        raise UsageError(str(e)) from None
    if args.format not in ("text", "json", "markdown"):
        raise UsageError(f"unknown --format `{args.format}`; use text, json or markdown")
    model = _construct(args)
    s = summary(model, *positional, depth=args.depth, flops=args.flops, **keywords)
    memory = None
    if args.memory:
        try:
            memory = estimate_memory(
                model, *positional, optimizer=optimizer, autocast=autocast, example_kwargs=keywords
            )
        except CostError as e:
            raise UsageError(str(e)) from None
    if args.format == "json":
        print(json.dumps({"summary": s.to_dict(), "memory": memory.to_dict() if memory else None}, indent=1))
    elif args.format == "markdown":
        print(s.to_markdown() + (f"\n\n{memory.to_markdown()}" if memory else ""))
    else:
        print(str(s) + (f"\n\n{memory}" if memory else ""))
    return 0


def cmd_materialize(args: argparse.Namespace) -> int:
    positional, keywords = _examples(args.input)
    dtype = parse_float_dtype("--dtype", args.dtype) if args.dtype else None
    torch_format = args.out.lower().endswith(TORCH_SUFFIXES)
    if args.max_shard_size is not None:
        try:
            parse_size(args.max_shard_size)
        except ArgumentError:
            raise UsageError(
                f"--max-shard-size `{args.max_shard_size}`: expected a size such as 500MB or 2GB"
            ) from None
        if torch_format:
            raise UsageError(
                f"--out `{args.out}` with --max-shard-size: shards are safetensors files in a folder; "
                "give a folder name, or drop --max-shard-size to write one torch.save file"
            )
    if args.max_shard_size is None and Path(args.out).is_dir():  # before any work: a file name is needed
        raise UsageError(
            f"--out `{args.out}` is a folder: name a file (`{Path(args.out) / 'model.safetensors'}`), or add "
            "--max-shard-size 2GB to write numbered shards and an index into it"
        )
    if not -(2**63) <= args.seed < 2**64:
        raise UsageError(
            f"--seed {args.seed}: expected an integer from -2**63 to 2**64 - 1 (what torch.manual_seed takes)"
        )
    model = _construct(args, seed=args.seed)
    if positional or keywords:
        build(model, *positional, dtype=dtype, **dict[str, Any](keywords))
    if not _lazy.is_built(model):
        raise UsageError("the model has lazy layers whose sizes depend on the input: pass --input SHAPE[:dtype]")
    materialize(model, dtype=dtype, progress=None)
    left = deferred_tensors(model)
    if left:
        raise LazyError(f"still deferred after materialization: {', '.join(left[:5])}")
    if torch_format:  # what the name promises: `torch.load` reads it (ties stay shared)
        files = [save_state_dict(model.state_dict(), args.out)]
    else:
        files = save(model, args.out, max_shard_size=args.max_shard_size)
    count = len(model.state_dict())
    size = sum(f.stat().st_size for f in files)
    print(f"wrote {', '.join(str(f) for f in files)} ({count} tensors, {size / 2**20:.2f} MiB, seed {args.seed})")
    return 0


class _Parser(argparse.ArgumentParser):
    """argparse, with its errors (`--depth abc`) as the one line every bad argument gets, exit code 2."""

    def error(self, message: str) -> typing.NoReturn:
        print(f"torchlazy: error: {message} (see `{self.prog} --help`)", file=sys.stderr)
        raise SystemExit(2)


def parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="torchlazy",
        description="Shapes, parameters and exact initialization of PyTorch models, before allocation.",
    )
    sub = p.add_subparsers(dest="command", required=True)

    def common(q: argparse.ArgumentParser) -> None:
        q.add_argument("model", help="MODULE:CALLABLE returning a torch.nn.Module, or a transformers config.json")
        q.add_argument("--kwargs", help="JSON object of keyword arguments for the callable")
        q.add_argument(
            "--concretize",
            action="store_true",
            help="compute values the construction reads (`.item()`, data-dependent shapes) for real: "
            "`tl.deferred(concretize=True)`",
        )
        q.add_argument(
            "--input",
            action="append",
            default=[],
            metavar="SHAPE[:DTYPE]",
            help="an example input such as 8x3x224x224 or input_ids=8x128:int64 (repeatable)",
        )

    s = sub.add_parser("summary", help="print shapes, parameters and bytes; allocates nothing")
    common(s)
    s.add_argument("--depth", type=int, default=None, help="fold modules deeper than this")
    s.add_argument("--flops", action="store_true", help="forward FLOPs per module, and forward + backward in total")
    s.add_argument("--memory", action="store_true", help="peak memory of one training step, on fake tensors")
    s.add_argument("--optimizer", default=None, help="for --memory: adamw (default), adam, sgd, ...")
    s.add_argument("--autocast", default=None, metavar="DTYPE", help="for --memory: mixed precision, e.g. bf16")
    s.add_argument("--format", default="text", help="text (default), json or markdown")
    s.set_defaults(run=cmd_summary)
    m = sub.add_parser(
        "materialize", help="write an exactly initialized checkpoint (safetensors, or torch.save for .pt/.pth/.bin)"
    )
    common(m)
    m.add_argument("--seed", type=int, default=0, help="torch.manual_seed before construction (default 0)")
    m.add_argument("--dtype", help="cast floating tensors, e.g. bf16")
    m.add_argument(
        "--out",
        required=True,
        help="output .safetensors file (a folder with --max-shard-size), or .pt/.pth/.bin for torch.save",
    )
    m.add_argument("--max-shard-size", default=None, help="shard the output, e.g. 2GB")
    m.set_defaults(run=cmd_materialize)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = parser().parse_args(argv)
    except SystemExit as e:  # argparse's own exits: `--help` (0), a malformed argument (2, one line printed)
        return e.code if isinstance(e.code, int) else 2
    try:
        return int(args.run(args))
    except UsageError as e:
        print(f"torchlazy: error: {e}", file=sys.stderr)
        return 2
    except ImportFailure as e:
        print(f"torchlazy: error: {e}", file=sys.stderr)
        return 3
    except FactoryFailure as e:
        print(f"torchlazy: error: {e}", file=sys.stderr)
        return 4
    except Exception as e:  # noqa: BLE001  the model's own code (any exception), torch's, the output not writable
        hint = " (on the command line: --concretize)" if "concretize=True" in str(e) else ""
        print(f"torchlazy: error: {type(e).__name__}: {e}{hint}", file=sys.stderr)
        return 4


if __name__ == "__main__":
    raise SystemExit(main())
