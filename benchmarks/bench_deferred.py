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


def _median(fn) -> float:  # type: ignore[no-untyped-def]
    times = []
    for _ in range(RUNS):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


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


def _vision() -> list[tuple[str, float, float, bool]]:
    import transformers as tf

    configs = {
        "RegNet": (tf.RegNetConfig, tf.RegNetModel, {"hidden_sizes": [16, 32, 64, 128], "embedding_size": 16}),
        "MobileNetV2": (tf.MobileNetV2Config, tf.MobileNetV2Model, {"depth_multiplier": 0.35}),
        "MobileNetV1": (tf.MobileNetV1Config, tf.MobileNetV1Model, {"depth_multiplier": 0.25}),
        "ConvNext": (tf.ConvNextConfig, tf.ConvNextModel, {"hidden_sizes": [16, 32, 64, 128]}),
    }
    rows = []
    for name, (cfg_cls, model_cls, kw) in configs.items():
        cfg = cfg_cls(**kw)

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
        rows.append((name, _median(eager), _median(lazy), same))
    return rows


def main() -> None:
    _meta(), _deferred()
    meta, deferred = _median(_meta), _median(_deferred)
    cold = statistics.median(
        float(subprocess.run([sys.executable, "-c", COLD], capture_output=True, text=True, check=True).stdout)
        for _ in range(RUNS)
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
    for name, e, d, same in _vision():
        print(
            f"{name:12s} eager {e * 1e3:7.1f} ms  deferred+materialize {d * 1e3:7.1f} ms  ratio {d / e:.2f}x  "
            f"bit-identical {same}"
        )


def _peak_mib() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


if __name__ == "__main__":
    main()
