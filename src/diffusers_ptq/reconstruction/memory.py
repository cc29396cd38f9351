"""Memory of reconstruction: cache size estimates, the units' peak memory, and CPU offload of the UNet.

With `reconstruction.offload='cpu'` the UNet stays in CPU memory: the caches are built and the whole-model
checks run there, and only the unit being trained (its modules, its parameters, buffers and the float
weights GPTQ keeps) moves to the compute device for its training, and back. Peak device memory is then one
unit and its mini-batches, not the model.

Peak RAM of a unit is the process's resident-set high-water mark while it ran (Linux resets the mark before
each unit; elsewhere it is the process's peak so far). Peak device memory is
`torch.cuda.max_memory_allocated` over the unit, None when it did not train on a CUDA device.
"""

from __future__ import annotations

import contextlib
import logging
import platform
import resource
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from diffusers_ptq.calibration import CalibrationSet
from diffusers_ptq.initialise import switches_kept
from diffusers_ptq.reconstruction.cache import build_cache
from diffusers_ptq.reconstruction.units import Unit

logger = logging.getLogger("diffusers_ptq")
_CLEAR_REFS = "/proc/self/clear_refs"
_STATUS = "/proc/self/status"


@dataclass
class PeakMemory:
    ram_bytes: int | None = None
    device_bytes: int | None = None


def _reset_rss_peak() -> None:
    with contextlib.suppress(OSError), open(_CLEAR_REFS, "w", encoding="ascii") as f:
        f.write("5")  # Linux: reset the resident-set high-water mark to the current RSS


def _peak_rss_bytes() -> int:
    with contextlib.suppress(OSError, ValueError), open(_STATUS, encoding="ascii") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if platform.system() == "Darwin" else peak * 1024  # bytes on macOS, KiB on Linux


@contextlib.contextmanager
def peak_memory(device: torch.device) -> Iterator[PeakMemory]:
    """Peak RAM and (on CUDA) peak device memory of what runs inside the block."""
    result = PeakMemory()
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    _reset_rss_peak()
    yield result
    result.ram_bytes = _peak_rss_bytes()
    if cuda:
        result.device_bytes = int(torch.cuda.max_memory_allocated(device))


def compute_device(offload_device: str | None) -> torch.device:
    """Where an offloaded unit trains: `offload_device`, else the CUDA device when there is one, else CPU."""
    if offload_device is not None:
        device = torch.device(offload_device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(
                f"reconstruction.offload_device={offload_device!r} but CUDA is not available; leave it "
                "None (the accelerator if there is one, else the CPU) or name an available device"
            )
        return device
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def _move(modules: list[nn.Module], device: torch.device) -> None:
    for module in modules:
        module.to(device)
        for m in module.modules():  # GPTQ's float weights are a plain attribute, not a parameter
            float_weight = m.__dict__.get("float_weight")
            if float_weight is not None:
                m.__dict__["float_weight"] = float_weight.to(device)


@contextlib.contextmanager
def unit_on(unet: nn.Module, unit: Unit, device: torch.device | None) -> Iterator[torch.device | None]:
    """Within the block `unit`'s modules sit on `device` (None: nothing moves); back to the CPU after."""
    if device is None:
        yield None
        return
    modules = unit.modules(unet)
    _move(modules, device)
    try:
        yield device
    finally:
        _move(modules, torch.device("cpu"))


@contextlib.contextmanager
def offloaded(unet: nn.Module, offload: str, offload_device: str | None) -> Iterator[torch.device | None]:
    """With offload='cpu': the UNet on the CPU inside the block, back where it was after (also on failure);
    yields the device the units train on. With offload='none': nothing moves, yields None."""
    if offload == "none":
        yield None
        return
    device = compute_device(offload_device)
    home = next(unet.parameters()).device
    if home.type == "cpu" and device.type == "cpu":
        logger.info(
            "reconstruction: offload='cpu' with the UNet already on the CPU and no accelerator to train on: "
            "nothing to offload"
        )
    _move([unet], torch.device("cpu"))
    try:
        yield device
    finally:
        _move([unet], home)


@torch.no_grad()
def row_bytes(
    unet: nn.Module, unit: Unit, data: CalibrationSet, row: torch.Tensor, cache_dtype: str, with_inner: bool
) -> int:
    """Bytes one calibration row takes in `unit`'s cache, measured by caching `row` (one index) alone.

    The quantizer switches are left as they were.
    """
    with switches_kept(unet):
        probe = build_cache(
            unet,
            unit,
            data,
            row.reshape(1),
            batch_size=1,
            cache_dtype=cache_dtype,
            quant_state=(False, False),
            with_inner=with_inner,
        )
    return probe.nbytes


def estimate_cache_bytes(
    unet: nn.Module,
    units: list[Unit],
    data: CalibrationSet,
    rows: torch.Tensor,
    cache_dtype: str,
    inner: bool,
) -> dict[str, int]:
    """Estimated cache bytes of every unit over `rows`: one probe row's bytes times the rows."""
    return {
        u.name: row_bytes(unet, u, data, rows[:1], cache_dtype, inner and bool(u.inner_layers)) * len(rows)
        for u in units
    }
