"""CalibrationSet: UNet inputs recorded from the pipeline's own sampling loop, held on the CPU."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class CalibrationSet:
    """One row per recorded UNet input (with classifier-free guidance a step gives two rows).

    `inputs` holds the UNet's keyword tensors by argument name (`sample`, `encoder_hidden_states`,
    `class_labels`, `timestep_cond`, ...); `added_cond_kwargs` the SDXL extras. `timesteps` are the values
    the pipeline passed (float for sigma-based schedulers), `train_timesteps` the nearest training timestep.
    """

    inputs: dict[str, torch.Tensor]
    timesteps: torch.Tensor
    train_timesteps: torch.Tensor
    step_index: torch.Tensor
    trajectory: torch.Tensor
    step_timesteps: torch.Tensor
    num_train_timesteps: int
    added_cond_kwargs: dict[str, torch.Tensor] = field(default_factory=dict)
    guidance_halves: int = 1

    def __len__(self) -> int:
        return int(self.timesteps.shape[0])

    @property
    def num_steps(self) -> int:
        return int(self.step_timesteps.shape[0])

    def unet_kwargs(
        self,
        index: torch.Tensor | slice,
        device: torch.device | str = "cpu",
        dtype: torch.dtype | None = None,
    ) -> dict[str, Any]:
        """Keyword arguments for `unet(**kwargs)` over the rows `index` (float tensors cast to `dtype`)."""

        def move(t: torch.Tensor) -> torch.Tensor:
            t = t[index].to(device)
            return t.to(dtype) if dtype is not None and t.is_floating_point() else t

        kwargs: dict[str, Any] = {name: move(t) for name, t in self.inputs.items()}
        kwargs["timestep"] = move(self.timesteps)
        if self.added_cond_kwargs:
            kwargs["added_cond_kwargs"] = {name: move(t) for name, t in self.added_cond_kwargs.items()}
        return kwargs

    def batches(
        self, batch_size: int, device: torch.device | str = "cpu", dtype: torch.dtype | None = None
    ) -> Iterator[dict[str, Any]]:
        """UNet keyword batches over all rows, in recording order."""
        for start in range(0, len(self), batch_size):
            yield self.unet_kwargs(slice(start, start + batch_size), device, dtype)

    def samples_per_group(self, group_map: torch.Tensor) -> list[int]:
        """Rows falling in each timestep group of `group_map` (training timestep -> group)."""
        groups = group_map.cpu()[self.train_timesteps]
        return torch.bincount(groups, minlength=int(group_map.max()) + 1).tolist()

    def check_finite(self) -> None:
        """Raise if any recorded input holds NaN or inf, naming the input and the timesteps."""
        tensors = {
            **self.inputs,
            **{f"added_cond_kwargs[{k!r}]": v for k, v in self.added_cond_kwargs.items()},
        }
        for name, t in tensors.items():
            if not t.is_floating_point():
                continue
            bad_rows = ~torch.isfinite(t.reshape(t.shape[0], -1)).all(dim=1)
            if bad_rows.any():
                steps = self.train_timesteps[bad_rows].unique().tolist()
                raise FloatingPointError(
                    f"the pipeline produced non-finite values (NaN or inf) in UNet input {name!r} at "
                    f"timestep(s) {steps}; run the float pipeline in float32 or check its inputs"
                )
