"""How quantizers learn the current timestep: one forward pre-hook on the UNet, one context per UNet.

The hook reads `timestep` however the pipeline passes it (positional or keyword; 0-d or 1-d tensor;
Python number; float timesteps of sigma-based schedulers), maps it to the nearest training timestep and
stores one value per sample. Quantizers index their scale tables with that tensor, so a batch may mix
timesteps and there is no Python branching on its value.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn


class TimestepContext:
    """Per-UNet holder of the current per-sample training timesteps (a 1-d long tensor)."""

    def __init__(self, num_train_timesteps: int) -> None:
        if num_train_timesteps < 1:
            raise ValueError(f"num_train_timesteps={num_train_timesteps} must be >= 1")
        self.num_train_timesteps = int(num_train_timesteps)
        self.timesteps: torch.Tensor | None = None
        # Calibration row of each UNet batch row while observers run (`observing_rows`); None otherwise.
        self.row_ids: torch.Tensor | None = None
        self._handle: torch.utils.hooks.RemovableHandle | None = None
        self._positions = (0, 1)

    def to_training_timesteps(self, timestep: Any, batch_size: int, device: torch.device) -> torch.Tensor:
        """Per-sample long tensor of training timesteps, nearest to what the pipeline passed."""
        t = timestep if torch.is_tensor(timestep) else torch.tensor(timestep)
        t = t.to(device).reshape(-1)
        if t.is_floating_point():
            t = t.round()
        t = t.long().clamp(0, self.num_train_timesteps - 1)
        if t.numel() == 1:
            return t.expand(batch_size)
        if t.numel() != batch_size:
            raise ValueError(f"timestep has {t.numel()} values but the sample batch has {batch_size}")
        return t

    def per_sample(self, batch_size: int) -> torch.Tensor:
        """Current timesteps for a tensor whose leading dim is `batch_size` (a multiple of the UNet batch)."""
        t = self.timesteps
        if t is None:
            raise RuntimeError(
                "a timestep-aware quantizer ran outside a UNet forward; call the quantized UNet itself, "
                "or wrap direct calls of its blocks in `context.use(timesteps)`"
            )
        if t.shape[0] == batch_size:
            return t
        if batch_size % t.shape[0] != 0:
            raise RuntimeError(
                f"cannot match a tensor of batch {batch_size} to the UNet batch of {t.shape[0]} timesteps"
            )
        return t.repeat_interleave(batch_size // t.shape[0])

    @contextlib.contextmanager
    def observing_rows(self, rows: torch.Tensor) -> Iterator[None]:
        """Name the calibration rows of the UNet batches run inside, so observers key their values by row."""
        previous, self.row_ids = self.row_ids, rows.reshape(-1).long()
        try:
            yield
        finally:
            self.row_ids = previous

    def element_ids(self, batch_size: int) -> torch.Tensor | None:
        """A distinct id per leading element of a tensor of leading dim `batch_size` (a multiple of the UNet
        batch, as in `per_sample`) from the current row ids; None when no rows are named."""
        rows = self.row_ids
        if rows is None or batch_size % rows.shape[0] != 0:
            return None
        m = batch_size // rows.shape[0]
        return rows.repeat_interleave(m) * m + torch.arange(batch_size) % m

    @contextlib.contextmanager
    def use(self, timesteps: torch.Tensor) -> Iterator[None]:
        """Set the per-sample timesteps by hand, for running blocks of the UNet outside its forward."""
        previous = self.timesteps
        t = timesteps.reshape(-1)
        t = t.round() if t.is_floating_point() else t
        self.timesteps = t.long().clamp(0, self.num_train_timesteps - 1)
        try:
            yield
        finally:
            self.timesteps = previous

    def attach(self, unet: nn.Module) -> None:
        """Install the pre-hook on `unet` (only that module: no global hooks)."""
        if self._handle is not None:
            raise RuntimeError("this TimestepContext is already attached to a UNet")
        names = list(inspect.signature(unet.forward).parameters)
        self._positions = (names.index("sample"), names.index("timestep"))
        # A bound method, not a closure: a deep copy of the UNet re-targets the hook at the copy's context.
        self._handle = unet.register_forward_pre_hook(self._pre_hook, with_kwargs=True)

    def _pre_hook(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        sample_pos, timestep_pos = self._positions
        sample = args[sample_pos] if len(args) > sample_pos else kwargs["sample"]
        timestep = args[timestep_pos] if len(args) > timestep_pos else kwargs["timestep"]
        self.timesteps = self.to_training_timesteps(timestep, sample.shape[0], sample.device)

    def detach(self, unet: nn.Module) -> None:
        """Remove this context's pre-hook from `unet` (also on a deep copy, whose handle is not ours)."""
        # Collect the keys first: the with-kwargs registry is keyed like the hook registry, and popping from
        # the hook registry while reading it would leave the with-kwargs entry behind.
        keys = [k for k, h in unet._forward_pre_hooks.items() if getattr(h, "__self__", None) is self]
        for hooks in (unet._forward_pre_hooks, unet._forward_pre_hooks_with_kwargs):
            for key in keys:
                hooks.pop(key, None)
        self._handle = None
        self.timesteps = None

    def __deepcopy__(self, memo: dict) -> TimestepContext:
        new = TimestepContext(self.num_train_timesteps)
        new._positions = self._positions
        memo[id(self)] = new
        return new
