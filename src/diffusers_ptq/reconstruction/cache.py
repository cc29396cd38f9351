"""The block cache: one unit's inputs (from the quantized model) and targets (from the float model).

For every calibration row, the UNet runs twice up to the unit and stops there (a hook raises
`StopForward`): once in the current quantized state, recording the unit's call arguments — features,
timestep embedding, encoder hidden states, everything it receives — and the per-sample timesteps the
quantizers saw; once fully float, recording the unit's outputs (and its inner layers' outputs for
fine-grained reconstruction). Only this unit's cache exists at a time; it stays on the CPU in
`cache_dtype` (in RAM, or in memory-mapped files when it would exceed `cache_max_gb`: `spill.py`) and goes
to the device one mini-batch at a time.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils import _pytree as pytree
from tqdm.auto import tqdm

from diffusers_ptq.calibration import CalibrationSet
from diffusers_ptq.initialise import set_quant_state
from diffusers_ptq.reconstruction.units import StopForward, Unit

Allocate = Callable[[tuple[int, ...], torch.dtype], torch.Tensor]
_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def _store(t: torch.Tensor, dtype: torch.dtype, what: str) -> torch.Tensor:
    t = t.detach()
    if not t.is_floating_point():
        return t.cpu()
    out = t.to("cpu", dtype)
    if not torch.isfinite(out).all():
        if not torch.isfinite(t).all():
            raise FloatingPointError(
                f"{what} holds NaN or inf values; check the model and calibration inputs"
            )
        raise FloatingPointError(
            f"{what} overflows {dtype} in the reconstruction cache; set reconstruction.cache_dtype to "
            "'bfloat16' or 'float32'"
        )
    return out


class RowBuffer:
    """Rows of one tensor over the whole cache, filled batch by batch into one preallocated CPU tensor (so
    the cache never holds a second, concatenated copy); `allocate` makes that tensor (RAM or a file)."""

    def __init__(self, total: int, dtype: torch.dtype, what: str, allocate: Allocate | None = None) -> None:
        self.total, self.dtype, self.what = total, dtype, what
        self.allocate = allocate or (lambda shape, dtype: torch.empty(shape, dtype=dtype))
        self.data: torch.Tensor | None = None
        self.filled = 0

    def append(self, t: torch.Tensor) -> None:
        chunk = _store(t, self.dtype, self.what)
        if self.data is None:
            self.data = self.allocate((self.total, *chunk.shape[1:]), chunk.dtype)
        if chunk.shape[1:] != self.data.shape[1:]:
            raise ValueError(f"{self.what} changes shape across batches: {tuple(chunk.shape[1:])}")
        self.data[self.filled : self.filled + chunk.shape[0]] = chunk
        self.filled += chunk.shape[0]

    def result(self) -> torch.Tensor:
        if self.data is None or self.filled != self.total:
            raise RuntimeError(f"{self.what}: cached {self.filled} of {self.total} rows")
        return self.data


class CachedArgs:
    """Call arguments of a unit over all rows: per-row tensors stacked, everything else stored once."""

    def __init__(
        self, unit: str, cache_dtype: torch.dtype, total: int, allocate: Allocate | None = None
    ) -> None:
        self.unit = unit
        self.allocate = allocate
        self.cache_dtype = cache_dtype
        self.total = total
        self.spec: pytree.TreeSpec | None = None
        self.constants: list[Any] = []
        self.dtypes: list[torch.dtype | None] = []
        self.buffers: list[RowBuffer | None] = []
        self.rows: list[torch.Tensor | None] = []

    def add(self, args: tuple, kwargs: dict, batch: int) -> None:
        leaves, spec = pytree.tree_flatten((args, kwargs))
        if self.spec is None:
            self.spec = spec
            self.dtypes = [leaf.dtype if torch.is_tensor(leaf) else None for leaf in leaves]
            self.constants = [None if torch.is_tensor(leaf) else leaf for leaf in leaves]
            what = f"the input of {self.unit}"
            self.buffers = [
                RowBuffer(self.total, self.cache_dtype, what, self.allocate) if torch.is_tensor(x) else None
                for x in leaves
            ]
        elif spec != self.spec:
            raise ValueError(f"{self.unit} was called with differently structured arguments across batches")
        for i, leaf in enumerate(leaves):
            if torch.is_tensor(leaf):
                if leaf.ndim == 0 or leaf.shape[0] != batch:
                    raise ValueError(
                        f"{self.unit} received a tensor argument of shape {tuple(leaf.shape)} that is not "
                        f"batched like the UNet input (batch {batch}); its inputs cannot be cached per row"
                    )
                self.buffers[i].append(leaf)
            elif self.dtypes[i] is not None or leaf != self.constants[i]:
                raise ValueError(f"{self.unit} received an argument that changes across batches: {leaf!r}")

    def finish(self) -> None:
        self.rows = [None if b is None else b.result() for b in self.buffers]
        self.buffers = []

    def select(self, index: torch.Tensor, device: torch.device) -> tuple[tuple, dict]:
        """(args, kwargs) for the rows `index`, on `device` in the dtypes the unit was called with."""
        leaves = [
            self.constants[i] if rows is None else rows[index].to(device=device, dtype=self.dtypes[i])
            for i, rows in enumerate(self.rows)
        ]
        return pytree.tree_unflatten(leaves, self.spec)

    @property
    def nbytes(self) -> int:
        return sum(r.numel() * r.element_size() for r in self.rows if r is not None)


@dataclass
class CacheBatch:
    args: tuple
    kwargs: dict
    timesteps: torch.Tensor
    targets: list[torch.Tensor]
    inner: dict[str, torch.Tensor]


@dataclass
class BlockCache:
    """Inputs, per-row timesteps and float targets of one unit over the selected calibration rows."""

    unit: Unit
    inputs: CachedArgs
    timesteps: torch.Tensor
    targets: list[torch.Tensor]
    inner: dict[str, torch.Tensor]

    def __len__(self) -> int:
        return int(self.timesteps.shape[0])

    def batch(self, index: torch.Tensor, device: torch.device, dtype: torch.dtype) -> CacheBatch:
        args, kwargs = self.inputs.select(index, device)
        return CacheBatch(
            args=args,
            kwargs=kwargs,
            timesteps=self.timesteps[index].to(device),
            targets=[t[index].to(device=device, dtype=dtype) for t in self.targets],
            inner={k: v[index].to(device=device, dtype=dtype) for k, v in self.inner.items()},
        )

    @property
    def nbytes(self) -> int:
        tensors = [*self.targets, *self.inner.values(), self.timesteps]
        return self.inputs.nbytes + sum(t.numel() * t.element_size() for t in tensors)


def _run_until_stop(unet: nn.Module, kwargs: dict, unit: Unit, handles: list) -> None:
    try:
        unet(**kwargs)
    except StopForward:
        return
    finally:
        for h in handles:
            h.remove()
    raise RuntimeError(f"the UNet forward finished without reaching reconstruction unit {unit.name}")


@torch.no_grad()
def build_cache(
    unet: nn.Module,
    unit: Unit,
    data: CalibrationSet,
    rows: torch.Tensor,
    *,
    batch_size: int,
    cache_dtype: str,
    quant_state: tuple[bool, bool],
    with_inner: bool = False,
    progress: bool = False,
    allocate: Allocate | None = None,
) -> BlockCache:
    """Cache `unit`'s inputs under `quant_state` = (weights, acts) and its float targets over `rows`.

    Leaves every quantizer switched as `quant_state` says. `allocate(shape, dtype)` makes each cached
    tensor's storage (default: `torch.empty`, in RAM).
    """
    dtype = _DTYPES[cache_dtype]
    param = next(unet.parameters())
    context = unet.ptq_state.context
    total = len(rows)
    inputs = CachedArgs(unit.name, dtype, total, allocate)
    timesteps: list[torch.Tensor] = []
    targets: list[RowBuffer] = []
    inner: dict[str, RowBuffer] = {}

    batches = [rows[start : start + batch_size] for start in range(0, len(rows), batch_size)]

    def on_output(outputs: list[torch.Tensor], inner_out: dict[str, torch.Tensor]) -> None:
        if not targets:
            targets.extend(
                RowBuffer(total, dtype, f"the float output of {unit.name}", allocate) for _ in outputs
            )
        for buffer, out in zip(targets, outputs, strict=True):
            buffer.append(out)
        for name, out in inner_out.items():
            if name not in inner:
                inner[name] = RowBuffer(total, dtype, f"the float output of {name}", allocate)
            inner[name].append(out)

    # Two sweeps (float targets, then quantized inputs) switch the quantizers twice per unit, not per batch.
    set_quant_state(unet, weights=False, acts=False)
    bar = tqdm(
        total=2 * len(batches), desc=f"cache {unit.name}", unit="batch", leave=False, disable=not progress
    )
    for index in batches:
        kwargs = data.unet_kwargs(index, param.device, param.dtype)
        _run_until_stop(unet, kwargs, unit, unit.capture_outputs(unet, on_output, with_inner))
        bar.update()
    set_quant_state(unet, weights=quant_state[0], acts=quant_state[1])
    for index in batches:
        n = len(index)

        def on_input(args: tuple, call_kwargs: dict, n: int = n) -> None:
            inputs.add(args, call_kwargs, n)
            timesteps.append(context.per_sample(n).cpu())

        kwargs = data.unet_kwargs(index, param.device, param.dtype)
        _run_until_stop(unet, kwargs, unit, unit.capture_inputs(unet, on_input))
        bar.update()
    bar.close()
    inputs.finish()
    return BlockCache(
        unit=unit,
        inputs=inputs,
        timesteps=torch.cat(timesteps),
        targets=[buffer.result() for buffer in targets],
        inner={name: buffer.result() for name, buffer in inner.items()},
    )
