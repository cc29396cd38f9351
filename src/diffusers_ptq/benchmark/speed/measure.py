"""How the speed benchmark measures: per-call latency, peak memory, weight bytes, and the device's name.

Latency: each call is timed on its own (`torch.cuda.synchronize` around it on a GPU); the median and the
spread (quartiles, min, max) are over the timed calls. Peak memory over the timed calls (warm-up included,
the first call, which compiles, not): on a GPU `torch.cuda.max_memory_allocated` after a reset (all the
tensors the row holds: weights, activations, workspaces). On a CPU torch allocates outside Python's
tracing, so it is the process's peak resident set size (VmHWM, else `resource.getrusage`), reset before
the row where Linux allows it (`/proc/self/clear_refs`), next to the bytes the row's model holds
(parameters, buffers and prepacked copies, each storage counted once).
"""

from __future__ import annotations

import contextlib
import os
import platform
import resource
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

_CLEAR_REFS = "/proc/self/clear_refs"
_STATUS = "/proc/self/status"


def device_name(device: torch.device) -> str:
    """'NVIDIA H100 80GB HBM3' or 'AMD EPYC 7B13 (2 cores, 1 torch thread)', plus the torch version."""
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}"
    threads = torch.get_num_threads()
    plural = "s" if threads != 1 else ""
    cpu = f"{cpu_model()} ({os.cpu_count()} cores, {threads} torch thread{plural})"
    return f"{cpu}, torch {torch.__version__}"


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo, else what `platform` knows."""
    with contextlib.suppress(OSError), open("/proc/cpuinfo", encoding="utf-8") as f:
        for line in f:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine() or "unknown CPU"


def _storage_key(t: torch.Tensor) -> tuple[int, int] | None:
    try:
        return (t.untyped_storage().data_ptr(), t.storage_offset())
    except (RuntimeError, NotImplementedError, TypeError):
        return None


def tensor_bytes(t: torch.Tensor, seen: set[tuple[int, int]]) -> int:
    """Bytes of `t`, counted once per storage; wrapper subclasses (torchao, quanto) by their inner tensors."""
    if type(t) not in (torch.Tensor, nn.Parameter) and hasattr(t, "__tensor_flatten__"):
        names, _ = t.__tensor_flatten__()
        return sum(tensor_bytes(getattr(t, name), seen) for name in names)
    key = _storage_key(t)
    if key is not None:
        if key in seen:
            return 0
        seen.add(key)
    return t.numel() * t.element_size()


def model_bytes(module: nn.Module) -> int:
    """Parameters and buffers of `module` (a torch.compile wrapper counts its original module)."""
    module = getattr(module, "_orig_mod", module)
    seen: set[tuple[int, int]] = set()
    tensors = [*module.parameters(), *module.buffers()]
    return sum(tensor_bytes(t.detach() if isinstance(t, nn.Parameter) else t, seen) for t in tensors)


@dataclass
class PeakMemory:
    """Filled in when the `peak_memory` block ends."""

    bytes: int | None = None
    kind: str = ""  # "cuda max allocated" | "peak RSS (this row)" | "peak RSS (process so far)"


def _reset_rss_peak() -> bool:
    try:
        with open(_CLEAR_REFS, "w", encoding="ascii") as f:
            f.write("5")  # Linux: reset the resident-set high-water mark to the current RSS
        return True
    except OSError:
        return False


def _peak_rss_bytes() -> int:
    with contextlib.suppress(OSError, ValueError), open(_STATUS, encoding="ascii") as f:
        for line in f:
            if line.startswith("VmHWM:"):  # the high-water mark clear_refs resets
                return int(line.split()[1]) * 1024
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if platform.system() == "Darwin" else peak * 1024  # bytes on macOS, KiB on Linux


@contextlib.contextmanager
def peak_memory(device: torch.device) -> Iterator[PeakMemory]:
    """The peak memory of what runs inside the block (see the module docstring for what is counted)."""
    result = PeakMemory()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        yield result
        torch.cuda.synchronize(device)
        result.bytes, result.kind = torch.cuda.max_memory_allocated(device), "cuda max allocated"
        return
    row_only = _reset_rss_peak()
    yield result
    result.bytes = _peak_rss_bytes()
    result.kind = "peak RSS (this row)" if row_only else "peak RSS (process so far)"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Timing:
    times_s: list[float]  # the timed calls, in order

    def summary_ms(self) -> dict[str, float]:
        """median, quartiles (p25, p75), min and max of the timed calls, in ms."""
        ms = sorted(t * 1000 for t in self.times_s)
        quartiles = statistics.quantiles(ms, n=4, method="inclusive") if len(ms) > 1 else [ms[0]] * 3
        return {
            "median_ms": statistics.median(ms),
            "p25_ms": quartiles[0],
            "p75_ms": quartiles[2],
            "min_ms": ms[0],
            "max_ms": ms[-1],
        }


def time_call(fn: Callable[[dict[str, Any]], Any], kwargs: dict[str, Any], device: torch.device) -> float:
    """Seconds of one call, the device synchronised before and after."""
    _sync(device)
    start = time.perf_counter()
    fn(kwargs)
    _sync(device)
    return time.perf_counter() - start


@torch.no_grad()
def time_calls(
    fn: Callable[[dict[str, Any]], Any],
    inputs: list[dict[str, Any]],
    device: torch.device,
    warmup: int,
    repeats: int,
) -> Timing:
    """`warmup` untimed calls, then `repeats` timed ones; the inputs are used in turn."""
    for i in range(warmup):
        time_call(fn, inputs[i % len(inputs)], device)
    return Timing([time_call(fn, inputs[(warmup + i) % len(inputs)], device) for i in range(repeats)])
