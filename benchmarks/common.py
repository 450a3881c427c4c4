"""What every benchmark prints with its figures: the machine and versions it ran on, and
each figure as the median and range of repeated, interleaved runs.

A benchmark script imports this as `common` (its own folder is on sys.path when run as
`python benchmarks/<name>.py`).
"""

from __future__ import annotations

import os
import platform
import statistics

import torch


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if "model name" in line)
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def hardware(device: torch.device | None = None) -> str:
    """The device (a GPU's name, or the CPU's and its cores) and the versions that matter."""
    if device is not None and device.type == "cuda":
        where = f"{torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda})"
    else:
        where = f"{cpu_name()}, {os.cpu_count()} cores"
    versions = [f"torch {torch.__version__}", f"Python {platform.python_version()}"]
    for module in ("torchvision", "ray"):
        try:
            versions.append(f"{module} {__import__(module).__version__}")
        except ImportError:
            pass
    return f"{where}; {', '.join(versions)}"


def summary(values: list[float], fmt: str = "{:.3g}") -> str:
    """`median [min-max]` of repeated runs: the figure and its spread."""
    if len(values) == 1:
        return fmt.format(values[0])
    low, mid, high = (fmt.format(f(values)) for f in (min, statistics.median, max))
    return f"{mid} [{low}-{high}]"


def ratio_verdict(ratios: list[float]) -> str:
    """What a ratio's runs say: a gain, a loss, or no measurable difference (the range
    includes 1)."""
    if min(ratios) <= 1.0 <= max(ratios):
        return "no measurable gain (the range includes 1)"
    return "faster in every run" if min(ratios) > 1 else "slower in every run"
