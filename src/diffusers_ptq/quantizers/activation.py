"""Timestep-aware activation quantizer: a table of G (scale, zero-point) pairs and a timestep -> group map.

The map is a buffer over all training timesteps, so a searched assignment (APQ-DM) can replace the
contiguous default without touching the forward. Indexing is per sample, with a tensor: a batch may mix
timesteps, and `torch.compile` sees no Python branch on the timestep value.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from diffusers_ptq.config import ActivationQuantConfig
from diffusers_ptq.primitives import compute_qparams, fake_quantize, search_range
from diffusers_ptq.quantizers.grid import GridMixin
from diffusers_ptq.quantizers.observer import GroupObserver, observer_salt
from diffusers_ptq.timestep import TimestepContext


def contiguous_group_map(num_train_timesteps: int, num_groups: int) -> torch.Tensor:
    """g(t) = floor(t * G / T): G contiguous, equally wide groups over the training timesteps."""
    t = torch.arange(num_train_timesteps)
    return torch.div(t * num_groups, num_train_timesteps, rounding_mode="floor").clamp(max=num_groups - 1)


def nearest_step_group_map(num_train_timesteps: int, step_timesteps: torch.Tensor) -> torch.Tensor:
    """One group per sampling step: each training timestep joins the step whose timestep is nearest.

    Steps are compared as the quantizers see them, rounded to training timesteps; steps that share one
    (PNDM repeats a timestep, Karras sigmas can collide after rounding) share one group, numbered in
    schedule order, so no group is left that no timestep can reach.
    """
    t = torch.arange(num_train_timesteps, dtype=torch.float64)
    steps = distinct_step_timesteps(num_train_timesteps, step_timesteps).double()
    return (t[:, None] - steps[None, :]).abs().argmin(dim=1)


def distinct_step_timesteps(num_train_timesteps: int, step_timesteps: torch.Tensor) -> torch.Tensor:
    """The schedule's distinct training timesteps (nearest, clamped), in order of first appearance."""
    rounded = step_timesteps.to(torch.float64).reshape(-1).round().clamp(0, num_train_timesteps - 1)
    return torch.tensor(list(dict.fromkeys(rounded.long().tolist())), dtype=torch.long)


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
        self._slots: torch.Tensor | None = None  # observe by another grouping than group_map

    # Set by the group search while it runs (kept outside the module tree: never saved, never a parameter).
    group_mixer: Callable[[TimestepActQuantizer, torch.Tensor], torch.Tensor] | None = None

    @property
    def num_groups(self) -> int:
        return self.scale.shape[0]

    def groups_for(self, x: torch.Tensor) -> torch.Tensor:
        """Group index of each sample along `x`'s leading dim."""
        return self.group_map[self.context.per_sample(x.shape[0])]

    def start_observing(
        self,
        generator: torch.Generator | None = None,
        slots: torch.Tensor | None = None,
        num_slots: int | None = None,
    ) -> None:
        """Collect statistics per group, or per slot of `slots` (training timestep -> slot) when given.

        Observing by slots (e.g. one per sampling step) gathers what a group search needs to choose groups;
        read it back with `stop_observing()`.
        """
        if slots is not None:
            self._slots = slots.to(self.group_map.device).long()
            num_slots = int(self._slots.max()) + 1 if num_slots is None else num_slots
        else:
            self._slots = None
        seed = generator.initial_seed() if generator is not None else 0
        self.observer = GroupObserver(
            num_slots or self.num_groups, self.max_values, salt=observer_salt(seed, self.name)
        )

    def stop_observing(self) -> GroupObserver:
        """End observation and return the raw statistics, without setting any scale."""
        obs = self.observer
        if obs is None:
            raise RuntimeError(f"{self.name}: stop_observing() without start_observing()")
        self.observer, self._slots = None, None
        return obs

    def _observe(self, x: torch.Tensor) -> None:
        if not torch.isfinite(x).all():
            per_sample = torch.isfinite(x.detach().reshape(x.shape[0], -1)).all(dim=1)
            bad = self.context.per_sample(x.shape[0])[~per_sample].unique().tolist()
            raise FloatingPointError(
                f"non-finite activation (NaN or inf) at the input of {self.name or 'a quantizer'} "
                f"for timestep(s) {bad}; check the model's dtype and the calibration inputs"
            )
        t = self.context.per_sample(x.shape[0])
        groups = (self.group_map if self._slots is None else self._slots)[t]
        self.observer.update(x, groups, self.context.element_ids(x.shape[0]))

    @torch.no_grad()
    def finish_observing(self) -> list[int]:
        """Set each group's qparams from its statistics.

        A group with no samples borrows the statistics of the nearest observed group; the caller is told
        which groups did (returned), so it can warn once for the whole model.
        """
        obs = self.observer
        if obs is None:
            raise RuntimeError(f"{self.name}: finish_observing() without start_observing()")
        if self._slots is not None:
            raise RuntimeError(f"{self.name}: observing by slots; read the statistics with stop_observing()")
        empty = obs.empty_groups()
        if len(empty) == self.num_groups:
            raise RuntimeError(f"{self.name}: no calibration activations were observed")
        for g in range(self.num_groups):
            src = g if g not in empty else self._nearest_observed(g, empty)
            self.set_group_range(g, obs.values[src], obs.lo[src], obs.hi[src])
        self.observer = None
        return empty

    @torch.no_grad()
    def set_group_range(self, g: int, values: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> None:
        """Set group `g`'s (scale, zero-point) by this quantizer's range search over `values`.

        `lo`/`hi` are the exact extremes when `values` is only a subsample.
        """
        lo, hi = lo.reshape(1).float(), hi.reshape(1).float()
        if self.unsigned:
            lo = torch.zeros_like(lo)
        lo, hi = search_range(
            values.reshape(1, -1), self.bits, self.symmetric, self.search, lo=lo, hi=hi, **self.search_kwargs
        )
        if self.unsigned:  # every search keeps an unsigned range anchored at 0
            lo = torch.zeros_like(lo)
        scale, zero_point = compute_qparams(lo, hi, self.bits, self.symmetric)
        self.scale[g] = scale[0]
        self.zero_point[g] = zero_point[0]

    def _nearest_observed(self, g: int, empty: list[int]) -> int:
        observed = [h for h in range(self.num_groups) if h not in empty]
        return min(observed, key=lambda h: (abs(h - g), h))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.observer is not None:
            self._observe(x)
            return x
        if not self.enabled:
            return x
        if self.group_mixer is not None:
            return self.group_mixer(self, x)
        g = self.groups_for(x)
        shape = (-1,) + (1,) * (x.ndim - 1)
        scale = self.scale[g].reshape(shape)
        zero_point = self.zero_point[g].reshape(shape)
        return fake_quantize(x.float(), scale, zero_point, self.qmin, self.qmax).to(x.dtype)

    def extra_repr(self) -> str:
        kind = "unsigned" if self.unsigned else ("symmetric" if self.symmetric else "affine")
        return f"bits={self.bits}, {kind}, groups={self.num_groups}, search={self.search}"
