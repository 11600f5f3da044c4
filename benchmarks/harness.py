"""Timing harness: ours against an anchor, same process, interleaved repeats, medians."""

from __future__ import annotations

import json
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, TextIO

import torch

__all__ = ["Measurement", "environment", "format_table", "time_pair", "write_json"]


@dataclass
class Measurement:
    """One comparison: median seconds of ours and of the anchor, and their ratio (ours / anchor)."""

    name: str
    ours_s: float
    anchor_s: float
    repeats: int
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def ratio(self) -> float:
        return self.ours_s / self.anchor_s

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ratio": self.ratio}


def _synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def time_pair(
    name: str,
    ours: Callable[[], Any],
    anchor: Callable[[], Any],
    *,
    repeats: int = 7,
    warmup: int = 1,
    timer: Callable[[], float] = time.perf_counter,
    info: Mapping[str, Any] | None = None,
) -> Measurement:
    """Time ``ours()`` and ``anchor()`` alternately ``repeats`` times after ``warmup`` calls each.

    Alternating the two cancels slow drifts of the machine (thermal, other load) out of the ratio;
    the median discards the odd interrupted run.

    :param name: row label.
    :param ours: the pyro_ext call, with all inputs prepared outside it.
    :param anchor: the reference call (the upstream library's equivalent) on the same inputs.
    :param repeats: number of timed calls of each.
    :param warmup: untimed calls of each first (allocator, caches, lazy compilation).
    :param timer: a clock returning seconds; injectable for tests.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1; got {repeats}")
    if warmup < 0:
        raise ValueError(f"warmup must be >= 0; got {warmup}")
    for _ in range(warmup):
        ours()
        anchor()
    ours_times, anchor_times = [], []
    for _ in range(repeats):
        for fn, times in ((ours, ours_times), (anchor, anchor_times)):
            _synchronize()
            start = timer()
            fn()
            _synchronize()
            times.append(timer() - start)
    return Measurement(
        name, statistics.median(ours_times), statistics.median(anchor_times), repeats, dict(info or {})
    )


def format_table(measurements: Iterable[Measurement]) -> str:
    """A fixed-width text table: name, ours, anchor (milliseconds), ratio, extra info."""
    rows = [("benchmark", "ours [ms]", "anchor [ms]", "ratio", "info")]
    for m in measurements:
        extra = ", ".join(f"{key}={value}" for key, value in m.info.items())
        rows.append((m.name, f"{1e3 * m.ours_s:.3f}", f"{1e3 * m.anchor_s:.3f}", f"{m.ratio:.3f}", extra))
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    lines = []
    for index, row in enumerate(rows):
        cells = [row[0].ljust(widths[0])] + [row[i].rjust(widths[i]) for i in (1, 2, 3)] + [row[4]]
        lines.append("  ".join(cells).rstrip())
        if index == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def environment() -> dict[str, Any]:
    """What the figures depend on: versions, threads, device."""
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "machine": platform.machine(),
        "processor": platform.processor() or platform.machine(),
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }


def write_json(
    path: str, benchmark: str, measurements: Iterable[Measurement], out: TextIO | None = None
) -> None:
    """Write the measurements and the environment to ``path`` as JSON."""
    payload = {
        "benchmark": benchmark,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "environment": environment(),
        "measurements": [m.as_dict() for m in measurements],
    }
    with open(path, "w") as handle:
        json.dump(payload, handle, indent=2)
    print(f"wrote {path}", file=out or sys.stdout)
