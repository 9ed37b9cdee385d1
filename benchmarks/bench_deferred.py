"""tl.deferred() against its floors: per recorded op vs a meta pass under a do-nothing dispatch
mode; the first block of a fresh process; vision models of many small modules vs eager.

    python benchmarks/bench_deferred.py [--runs 5]
"""

from __future__ import annotations

import contextlib
import math
import statistics
import subprocess
import sys
import time

import torch
from torch.utils._python_dispatch import TorchDispatchMode

import torchlazy as tl

RUNS = int(sys.argv[sys.argv.index("--runs") + 1]) if "--runs" in sys.argv else 5


class _Nothing(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        return func(*args, **(kwargs or {}))


_aten = torch.ops.aten
_FILLS = {_aten.zero_.default, _aten.fill_.Scalar, _aten.normal_.default, _aten.uniform_.default}


class _Thin(_Nothing):
    """The same-program floor's mode: it also skips the kernels of in-place fills and draws (a meta tensor has
    no values to write; torch's meta `normal_` is a Python decomposition costing ~250 us)."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        return args[0] if func in _FILLS else func(*args, **(kwargs or {}))


class _Count(_Nothing):
    def __init__(self) -> None:
        super().__init__()
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        self.ops += 1
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def _inits_run_on_meta():  # type: ignore[no-untyped-def]
    """transformers skips its `_init_weights` when it sees the meta device; eager and deferred construction run
    it: the same-program floor runs it too."""
    import transformers.modeling_utils as mu

    saved = mu.get_torch_context_manager_or_global_device
    mu.get_torch_context_manager_or_global_device = lambda: None
    try:
        yield
    finally:
        mu.get_torch_context_manager_or_global_device = saved


def _groups(n: int = 1000) -> None:
    for _ in range(n):
        w = torch.empty(16, 16)
        torch.nn.init.kaiming_uniform_(w, a=math.sqrt(5))
        torch.zeros(16)


def _meta() -> None:
    with torch.device("meta"), _Nothing():
        _groups()


def _deferred() -> None:
    with tl.deferred():
        _groups()


COLD = (
    "import time, torch\nstart = time.perf_counter()\nimport torchlazy as tl\n"
    "with tl.deferred():\n    m = torch.nn.Linear(64, 64)\ntl.materialize(m)\n"
    "print(time.perf_counter() - start)"
)
COLD_TRUNC = COLD.replace(
    "    m = torch.nn.Linear(64, 64)\n",
    "    m = torch.nn.Linear(64, 64)\n    torch.nn.init.trunc_normal_(m.weight, std=0.02)\n",
)
COLD_SUMMARY = (
    "import time, torch\nstart = time.perf_counter()\nimport torchlazy as tl\nnn = torch.nn\n"
    "m = nn.Sequential(tl.nn.Conv2d(16, 3), tl.nn.BatchNorm2d(), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), tl.nn.Linear(10))\n"
    "tl.summary(m, torch.randn(2, 3, 32, 32))\n"
    "print(time.perf_counter() - start)"
)


# transformers vision models: (config class, model class, config overrides). The default configs are the
# published model sizes (2-64M parameters, 100-1100 modules); the reduced-width ones stress the per-op and
# per-tensor cost (a few ms of eager construction, nearly all of it Python).
VISION = {
    "RegNet": ("RegNetConfig", "RegNetModel", {}),
    "MobileNetV1": ("MobileNetV1Config", "MobileNetV1Model", {}),
    "MobileNetV2": ("MobileNetV2Config", "MobileNetV2Model", {}),
    "EfficientNet": ("EfficientNetConfig", "EfficientNetModel", {}),
    "LeViT": ("LevitConfig", "LevitModel", {}),
    "ConvNext": ("ConvNextConfig", "ConvNextModel", {}),
    "MobileViT": ("MobileViTConfig", "MobileViTModel", {}),
    "Swin": ("SwinConfig", "SwinModel", {}),
    # torch 2.13's trunc_normal_ rejection-samples (it reads its draws' values): initialized with it
    "PvtV2": ("PvtV2Config", "PvtV2Model", {}),
    "SwiftFormer": ("SwiftFormerConfig", "SwiftFormerModel", {}),
    "Cvt": ("CvtConfig", "CvtModel", {}),
    "Segformer": ("SegformerConfig", "SegformerModel", {}),
    "RegNet (narrow)": ("RegNetConfig", "RegNetModel", {"hidden_sizes": [16, 32, 64, 128], "embedding_size": 16}),
    "MobileNetV2 (x0.35)": ("MobileNetV2Config", "MobileNetV2Model", {"depth_multiplier": 0.35}),
    "MobileNetV1 (x0.25)": ("MobileNetV1Config", "MobileNetV1Model", {"depth_multiplier": 0.25}),
    "ConvNext (narrow)": ("ConvNextConfig", "ConvNextModel", {"hidden_sizes": [16, 32, 64, 128]}),
}


def _vision() -> list[tuple[str, dict[str, float], bool]]:
    """Per model, timed in turn (a slow spell hits all alike): eager construction; the meta floor (the same
    construction on the meta device under a do-nothing dispatch mode: where torch's `trunc_normal_` returns
    at once, meta tensors having no values, and transformers skips its init); the same-program floor (init
    run, fills and draws not run); `tl.deferred()` construction; then `tl.materialize` (exact). 'ops': the ops
    the meta floor dispatches per op of eager construction (mean over models in the total)."""
    import transformers as tf

    tf.logging.set_verbosity_error()
    rows = []
    for name, (cfg_name, model_name, kw) in VISION.items():
        cfg, model_cls = getattr(tf, cfg_name)(**kw), getattr(tf, model_name)
        made: list[torch.nn.Module] = []

        def eager(model_cls=model_cls, cfg=cfg):  # type: ignore[no-untyped-def]
            torch.manual_seed(0)
            return model_cls(cfg)

        def meta(model_cls=model_cls, cfg=cfg):  # type: ignore[no-untyped-def]
            with torch.device("meta"), _Nothing():
                model_cls(cfg)

        def same(model_cls=model_cls, cfg=cfg):  # type: ignore[no-untyped-def]
            with _inits_run_on_meta(), torch.device("meta"), _Thin():
                model_cls(cfg)

        def deferred(model_cls=model_cls, cfg=cfg, made=made):  # type: ignore[no-untyped-def]
            torch.manual_seed(0)
            with tl.deferred():
                made.append(model_cls(cfg))

        def materialize(made=made):  # type: ignore[no-untyped-def]
            return tl.materialize(made.pop())

        deferred(), meta(), same()
        identical = all(
            torch.equal(a, b) for a, b in zip(eager().state_dict().values(), materialize().state_dict().values())
        )
        with torch.device("meta"), _Count() as on_meta:
            model_cls(cfg)
        with _Count() as eagerly:  # the ops eager construction dispatches: the program deferred records
            eager()
        times = _in_turn({"eager": eager, "meta": meta, "same": same, "deferred": deferred, "materialize": materialize})
        rows.append((name, {**times, "ops": on_meta.ops / eagerly.ops}, identical))
    return rows


def _in_turn(fns: dict) -> dict[str, float]:  # type: ignore[type-arg]
    """Medians of the functions in `fns`, timed one after the other in each round (a load change hits all)."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(RUNS):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def _interleaved(a, b) -> tuple[float, float]:  # type: ignore[no-untyped-def]
    """Medians of `a` and `b` timed alternately."""
    times = _in_turn({"a": a, "b": b})
    return times["a"], times["b"]


def main() -> None:
    _meta(), _deferred()
    meta, deferred = _interleaved(_meta, _deferred)  # alternately: a slow spell hits both alike
    cold, cold_trunc, cold_summary = (
        statistics.median(
            float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
            for _ in range(RUNS)
        )
        for code in (COLD, COLD_TRUNC, COLD_SUMMARY)
    )
    print(f"tl.deferred() vs its floors (median of {RUNS}; peak RSS {_peak_mib():.0f} MiB)\n")
    print(
        f"per group (empty+kaiming_uniform_+zeros): meta+no-op mode {meta * 1e3:.0f} us, deferred "
        f"{deferred * 1e3:.0f} us  ratio {deferred / meta:.2f}x (target <= 2x)"
    )
    print(
        f"cold start: import torchlazy + first deferred block + materialize after import torch: {cold:.3f} s "
        "(target <= 0.35 s)"
    )
    print(f"cold start, the block running torch's trunc_normal_ (a rejection sampler): {cold_trunc:.3f} s")
    print(
        f"cold start: import torchlazy + first tl.summary of a small lazy CNN after import torch: {cold_summary:.3f} s"
    )
    rows = _vision()
    print(
        "\nvision models: the meta floor is the same construction on the meta device under a do-nothing dispatch\n"
        "mode; there transformers skips its weight init (it sees the meta device), so that pass dispatches only\n"
        "a fraction of the ops eager and deferred construction run ('ops'). The same-program floor runs the same\n"
        "program as eager on meta (init included), its mode skipping the kernels of fills and draws."
    )
    head = (
        f"\n{'model (transformers)':20s} {'eager':>8s} {'meta floor':>10s} {'ops':>5s} {'same-prog':>9s}"
        f" {'deferred':>9s} {'/ floor':>7s} {'/ same':>6s} {'materialize':>11s} {'both/eager':>10s}  bit-identical"
    )
    print(head)

    def line(name: str, t: dict[str, float], tail: str) -> None:
        both = t["deferred"] + t["materialize"]
        print(
            f"{name:20s} {t['eager'] * 1e3:6.1f}ms {t['meta'] * 1e3:8.1f}ms {t['ops']:5.2f} {t['same'] * 1e3:7.1f}ms"
            f" {t['deferred'] * 1e3:7.1f}ms {t['deferred'] / t['meta']:6.2f}x {t['deferred'] / t['same']:5.2f}x"
            f" {t['materialize'] * 1e3:9.1f}ms {both / t['eager']:9.2f}x  {tail}"
        )

    for name, t, identical in rows:
        line(name, t, str(identical))
    full = [t for name, t, _ in rows if "(" not in name]
    total = {key: sum(t[key] for t in full) for key in full[0]}
    total["ops"] /= len(full)
    line("published, total", total, "(targets: deferred <= 2x its floor, both <= 1.5x eager)")


def _peak_mib() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


if __name__ == "__main__":
    main()
