"""Timestep-aware activation quantizer: a table of G (scale, zero-point) pairs and a timestep -> group map.

The map is a buffer over all training timesteps, so a searched assignment (APQ-DM) can replace the
contiguous default without touching the forward. Indexing is per sample, with a tensor: a batch may mix
timesteps, and `torch.compile` sees no Python branch on the timestep value.
"""

from __future__ import annotations

import torch
from torch import nn

from diffusers_ptq.config import ActivationQuantConfig
from diffusers_ptq.primitives import compute_qparams, fake_quantize, search_range
from diffusers_ptq.quantizers.grid import GridMixin
from diffusers_ptq.quantizers.observer import GroupObserver
from diffusers_ptq.timestep import TimestepContext


def contiguous_group_map(num_train_timesteps: int, num_groups: int) -> torch.Tensor:
    """g(t) = floor(t * G / T): G contiguous, equally wide groups over the training timesteps."""
    t = torch.arange(num_train_timesteps)
    return torch.div(t * num_groups, num_train_timesteps, rounding_mode="floor").clamp(max=num_groups - 1)


def nearest_step_group_map(num_train_timesteps: int, step_timesteps: torch.Tensor) -> torch.Tensor:
    """One group per sampling step: each training timestep joins the step whose timestep is nearest."""
    t = torch.arange(num_train_timesteps, dtype=torch.float64)
    steps = step_timesteps.to(torch.float64).reshape(-1)
    return (t[:, None] - steps[None, :]).abs().argmin(dim=1)


class TimestepActQuantizer(GridMixin, nn.Module):
    """Per-tensor activation fake quantizer with one (scale, zero-point) per timestep group."""

    def __init__(
        self,
        config: ActivationQuantConfig,
        context: TimestepContext,
        group_map: torch.Tensor,
        *,
        bits: int | None = None,
        unsigned: bool = False,
        name: str = "",
    ) -> None:
        super().__init__()
        self.bits = int(bits if bits is not None else config.bits)
        # Unsigned (softmax): the range starts at 0, so the affine grid has zero-point 0.
        self.unsigned = unsigned
        self.symmetric = False if unsigned else config.symmetric
        self.search = config.scale_search
        self.search_kwargs = {
            "lp_norm": config.lp_norm,
            "num_candidates": config.num_candidates,
            "percentile": config.percentile,
        }
        self.max_values = config.observer_samples
        self.name = name
        self.context = context
        num_groups = int(group_map.max()) + 1
        self.register_buffer("group_map", group_map.clone().long())
        self.register_buffer("scale", torch.ones(num_groups))
        self.register_buffer("zero_point", torch.zeros(num_groups))
        self.enabled = True
        self.observer: GroupObserver | None = None

    @property
    def num_groups(self) -> int:
        return self.scale.shape[0]

    def groups_for(self, x: torch.Tensor) -> torch.Tensor:
        """Group index of each sample along `x`'s leading dim."""
        return self.group_map[self.context.per_sample(x.shape[0])]

    def start_observing(self, generator: torch.Generator | None = None) -> None:
        self.observer = GroupObserver(self.num_groups, self.max_values, generator)

    def _observe(self, x: torch.Tensor) -> None:
        if not torch.isfinite(x).all():
            per_sample = torch.isfinite(x.detach().reshape(x.shape[0], -1)).all(dim=1)
            bad = self.context.per_sample(x.shape[0])[~per_sample].unique().tolist()
            raise FloatingPointError(
                f"non-finite activation (NaN or inf) at the input of {self.name or 'a quantizer'} "
                f"for timestep(s) {bad}; check the model's dtype and the calibration inputs"
            )
        self.observer.update(x, self.groups_for(x))

    @torch.no_grad()
    def finish_observing(self) -> list[int]:
        """Set each group's qparams from its statistics.

        A group with no samples borrows the statistics of the nearest observed group; the caller is told
        which groups did (returned), so it can warn once for the whole model.
        """
        obs = self.observer
        if obs is None:
            raise RuntimeError(f"{self.name}: finish_observing() without start_observing()")
        empty = obs.empty_groups()
        if len(empty) == self.num_groups:
            raise RuntimeError(f"{self.name}: no calibration activations were observed")
        for g in range(self.num_groups):
            src = g if g not in empty else self._nearest_observed(g, empty)
            values = obs.values[src].reshape(1, -1)
            lo, hi = obs.lo[src].reshape(1), obs.hi[src].reshape(1)
            if self.unsigned:
                lo = torch.zeros_like(lo)
            lo, hi = search_range(
                values, self.bits, self.symmetric, self.search, lo=lo, hi=hi, **self.search_kwargs
            )
            if self.unsigned:  # every search keeps an unsigned range anchored at 0
                lo = torch.zeros_like(lo)
            scale, zero_point = compute_qparams(lo, hi, self.bits, self.symmetric)
            self.scale[g] = scale[0]
            self.zero_point[g] = zero_point[0]
        self.observer = None
        return empty

    def _nearest_observed(self, g: int, empty: list[int]) -> int:
        observed = [h for h in range(self.num_groups) if h not in empty]
        return min(observed, key=lambda h: (abs(h - g), h))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.observer is not None:
            self._observe(x)
            return x
        if not self.enabled:
            return x
        g = self.groups_for(x)
        shape = (-1,) + (1,) * (x.ndim - 1)
        scale = self.scale[g].reshape(shape)
        zero_point = self.zero_point[g].reshape(shape)
        return fake_quantize(x.float(), scale, zero_point, self.qmin, self.qmax).to(x.dtype)

    def extra_repr(self) -> str:
        kind = "unsigned" if self.unsigned else ("symmetric" if self.symmetric else "affine")
        return f"bits={self.bits}, {kind}, groups={self.num_groups}, search={self.search}"
