"""CalibrationSet: UNet inputs recorded from the pipeline's own sampling loop, held on the CPU."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch


def tree_map(fn: Callable[[torch.Tensor], Any], tree: Any) -> Any:
    """`fn` applied to every tensor in nested tuples / lists / dicts; other leaves kept as they are."""
    if torch.is_tensor(tree):
        return fn(tree)
    if isinstance(tree, dict):
        return {k: tree_map(fn, v) for k, v in tree.items()}
    if isinstance(tree, list | tuple):
        return type(tree)(tree_map(fn, v) for v in tree)
    return tree


def tree_leaves(tree: Any) -> list[torch.Tensor]:
    """The tensors of a nested structure, in order."""
    leaves: list[torch.Tensor] = []
    tree_map(leaves.append, tree)
    return leaves


def tree_join(trees: list[Any], join: Callable[[list[torch.Tensor]], torch.Tensor]) -> Any:
    """Structures of the same shape joined leaf by leaf (`torch.stack` of rows, `torch.cat` of sets)."""
    first = trees[0]
    if torch.is_tensor(first):
        return join(trees)
    if isinstance(first, dict):
        return {k: tree_join([t[k] for t in trees], join) for k in first}
    if isinstance(first, list | tuple):
        return type(first)(tree_join([t[i] for t in trees], join) for i in range(len(first)))
    return first


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
    added_cond_kwargs: dict[str, Any] = field(default_factory=dict)
    guidance_halves: int = 1
    extra_inputs: dict[str, Any] = field(default_factory=dict)
    static_inputs: dict[str, Any] = field(default_factory=dict)

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
            kwargs["added_cond_kwargs"] = tree_map(move, self.added_cond_kwargs)
        for name, tree in self.extra_inputs.items():
            kwargs[name] = tree_map(move, tree)
        for name, value in self.static_inputs.items():
            kwargs[name] = tree_map(lambda t: t.to(device), value)
        return kwargs

    def batches(
        self,
        batch_size: int,
        device: torch.device | str = "cpu",
        dtype: torch.dtype | None = None,
        rows: range | None = None,
    ) -> Iterator[dict[str, Any]]:
        """UNet keyword batches over `rows` (default: all rows, in recording order)."""
        rows = range(len(self)) if rows is None else rows
        for start in range(rows.start, rows.stop, batch_size):
            yield self.unet_kwargs(slice(start, min(start + batch_size, rows.stop)), device, dtype)

    def samples_per_group(self, group_map: torch.Tensor) -> list[int]:
        """Rows falling in each timestep group of `group_map` (training timestep -> group)."""
        groups = group_map.cpu()[self.train_timesteps]
        return torch.bincount(groups, minlength=int(group_map.max()) + 1).tolist()

    def check_finite(self) -> None:
        """Raise if any recorded input holds NaN or inf, naming the input and the timesteps."""
        tensors = dict(self.inputs)
        for group, tree in (("added_cond_kwargs", self.added_cond_kwargs), ("", self.extra_inputs)):
            for key, value in tree.items():
                name = f"{group}[{key!r}]" if group else key
                if torch.is_tensor(value):
                    tensors[name] = value
                    continue
                for i, leaf in enumerate(tree_leaves(value)):
                    tensors[f"{name}[{i}]"] = leaf
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
