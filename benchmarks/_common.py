"""Shared measurement helpers for the benchmark scripts."""

from __future__ import annotations

import ctypes
import gc
import json
import os
import re
import statistics
import sys
import time
from typing import Callable

_M_MMAP_THRESHOLD = -3

if os.environ.get("OMP_WAIT_POLICY", "").upper() == "PASSIVE":
    # every operation split over threads then pays to wake a sleeping worker (a sum over 314,000
    # floats: 98 us against 13); loops of mid-sized operations suffer most (README, top)
    print("warning: OMP_WAIT_POLICY=PASSIVE slows torch's multi-threaded operations and skews the "
          "ratios; the tables in benchmarks/README.md are measured without it", file=sys.stderr)


def _status_mib(key: str) -> float:
    with open("/proc/self/status") as f:
        return int(re.search(rf"{key}:\s+(\d+) kB", f.read()).group(1)) / 1024


def peak_memory_mib(fn: Callable[[], object]) -> float:
    """Peak resident memory added by one call of ``fn()``, in MiB (Linux, glibc).

    Serves every allocation of 4 KiB or more by ``mmap`` from then on (returned to the OS when
    freed, so that the peak tracks live tensors to within a few MiB instead of reused heap memory),
    returns the heap's free memory to the OS (``malloc_trim``), resets the process's peak RSS
    (``/proc/self/clear_refs``), calls ``fn``, and returns the new peak (``VmHWM``) minus the RSS
    before the call. Run ``fn`` once beforehand so that lazy initialisation is not counted. The
    allocator setting slows every later allocation (page faults): take all timings first.
    """
    libc = ctypes.CDLL("libc.so.6")
    libc.mallopt(_M_MMAP_THRESHOLD, 4096)
    gc.collect()
    libc.malloc_trim(0)
    base = _status_mib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    fn()
    return max(_status_mib("VmHWM") - base, 0.0)


def interleaved_median_ms(fns: dict[str, Callable[[], object]], repeats: int, warmup: int = 1) -> dict[str, float]:
    """
    Median wall-clock ms of each ``fn``, run round-robin so that drift affects all alike. Each timed
    call follows an untimed call of the same ``fn``, as in a loop of that step alone: timed right
    after a different function, a small step found the caches full of that one's data (a linear
    layer after a layer with a 33 MB intermediate read 0.62 ms instead of 0.33 ms).
    """
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            fn()
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    return {k: 1e3 * statistics.median(v) for k, v in times.items()}


def write_json(path: str, payload: dict, verbose: bool = True) -> None:
    if not path:
        return
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        json.dump(payload, f, indent=2)
    if verbose:
        print(f"wrote {path}")
