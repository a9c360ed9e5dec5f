"""Speed measurement: interleaved runs, medians and ratios, with a description of the machine.

On a shared machine absolute times drift; running the models in turn (A, B, A, B, ...) and comparing
medians keeps the ratio meaningful. Absolute times are only worth reporting from a GPU.
"""

from __future__ import annotations

import dataclasses
import os
import platform
import statistics
import time
from collections.abc import Callable, Mapping

import torch

__all__ = ["Timing", "interleaved", "machine"]


@dataclasses.dataclass
class Timing:
    """Seconds per call of each model, from interleaved repeats."""

    samples: dict[str, list[float]]

    def median(self, name: str) -> float:
        return statistics.median(self.samples[name])

    def ratio(self, baseline: str, name: str) -> float:
        """Speed-up of ``name`` over ``baseline`` (median time of baseline / median time of ``name``)."""
        return self.median(baseline) / self.median(name)

    def ratio_quartiles(self, baseline: str, name: str) -> tuple[float, float]:
        """Lower and upper quartiles of the per-round speed-ups ``baseline_i / name_i``: how far one round's
        ratio strays on this machine (rounds are interleaved, so each pair ran under the same load)."""
        rounds = [b / n for b, n in zip(self.samples[baseline], self.samples[name], strict=True)]
        lower, _, upper = statistics.quantiles(rounds, n=4, method="inclusive")
        return lower, upper


def _sync(device: torch.device | str | None) -> None:
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def interleaved(
    fns: Mapping[str, Callable[[], object]],
    repeats: int = 7,
    warmup: int = 2,
    device: torch.device | str | None = None,
) -> Timing:
    """Time each zero-argument callable ``repeats`` times, in turn, after ``warmup`` untimed rounds."""
    samples: dict[str, list[float]] = {name: [] for name in fns}
    with torch.inference_mode():
        for round_ in range(warmup + repeats):
            for name, fn in fns.items():
                _sync(device)
                start = time.perf_counter()
                fn()
                _sync(device)
                if round_ >= warmup:
                    samples[name].append(time.perf_counter() - start)
    return Timing(samples)


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine(device: torch.device | str | None = None) -> str:
    """One line describing where a measurement ran."""
    if device is not None and torch.device(device).type == "cuda":
        where = f"GPU {torch.cuda.get_device_name(device)}"
    else:
        where = f"CPU {_cpu_name()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"
    return f"{where}; torch {torch.__version__}, Python {platform.python_version()}"
