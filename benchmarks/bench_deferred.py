"""tl.deferred() against its floors: per recorded op vs a meta pass under a do-nothing dispatch
mode; the first block of a fresh process; vision models of many small modules vs eager.

    python benchmarks/bench_deferred.py [--runs 5]
"""

from __future__ import annotations

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


def _vision() -> list[tuple[str, float, float, bool]]:
    import transformers as tf

    tf.logging.set_verbosity_error()
    rows = []
    for name, (cfg_name, model_name, kw) in VISION.items():
        cfg, model_cls = getattr(tf, cfg_name)(**kw), getattr(tf, model_name)

        def eager(model_cls=model_cls, cfg=cfg):  # type: ignore[no-untyped-def]
            torch.manual_seed(0)
            return model_cls(cfg)

        def lazy(model_cls=model_cls, cfg=cfg):  # type: ignore[no-untyped-def]
            torch.manual_seed(0)
            with tl.deferred():
                m = model_cls(cfg)
            return tl.materialize(m)

        eager(), lazy()  # warm
        same = all(torch.equal(a, b) for a, b in zip(eager().state_dict().values(), lazy().state_dict().values()))
        rows.append((name, *_interleaved(eager, lazy), same))
    return rows


def _interleaved(a, b) -> tuple[float, float]:  # type: ignore[no-untyped-def]
    """Medians of `a` and `b` timed alternately (a load change hits both)."""
    ta, tb = [], []
    for _ in range(RUNS):
        for fn, times in ((a, ta), (b, tb)):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
    return statistics.median(ta), statistics.median(tb)


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
        f"\n{'vision model (transformers)':28s} {'eager':>9s} {'deferred+materialize':>21s} {'ratio':>7s}  bit-identical"
    )
    for name, e, d, same in rows:
        print(f"{name:28s} {e * 1e3:7.1f}ms {d * 1e3:19.1f}ms {d / e:6.2f}x  {same}")
    full = [r for r in rows if "(" not in r[0]]
    e_sum, d_sum = sum(r[1] for r in full), sum(r[2] for r in full)
    print(
        f"{'published sizes, in total':28s} {e_sum * 1e3:7.1f}ms {d_sum * 1e3:19.1f}ms {d_sum / e_sum:6.2f}x  (target <= 1.5x)"
    )


def _peak_mib() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


if __name__ == "__main__":
    main()
