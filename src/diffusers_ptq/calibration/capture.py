"""Record UNet inputs while the pipeline runs its own sampling loop.

A forward pre-hook on `pipe.unet` counts the UNet calls of each pipeline run, checks each call against
the planned schedule, and copies to the CPU only the rows the recording mask asks for. Once a run has
recorded its last planned step the hook stops it, so the rest of the trajectory is never computed; a run
that ends before that (fewer UNet calls than planned) is an error, not a smaller calibration set.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator
from typing import Any

import torch
from tqdm.auto import tqdm

from diffusers_ptq.calibration.dataset import CalibrationSet
from diffusers_ptq.calibration.pipelines import PipelineSpec

# UNet arguments that are per-sample conditioning and so belong in the calibration set.
RECORDED_ARGS = (
    "sample",
    "encoder_hidden_states",
    "class_labels",
    "timestep_cond",
    "attention_mask",
    "encoder_attention_mask",
)


class _StopRun(Exception):
    """Raised by the hook to end a pipeline run once everything it should record is recorded."""


class _Recorder:
    def __init__(self, unet: torch.nn.Module, step_timesteps: torch.Tensor, num_train_timesteps: int) -> None:
        self.signature = inspect.signature(unet.forward)
        self.step_timesteps = step_timesteps
        self.num_train_timesteps = num_train_timesteps
        self.rows: list[dict[str, Any]] = []
        self.mask: torch.Tensor | None = None  # (trajectories of this run, steps)
        self.first_trajectory = 0
        self.call = 0
        self.halves = 1

    def start_run(self, mask: torch.Tensor, first_trajectory: int) -> None:
        self.mask, self.first_trajectory, self.call = mask, first_trajectory, 0
        steps_needed = mask.any(dim=0).nonzero()
        self.last_step = int(steps_needed.max()) if len(steps_needed) else -1

    def hook(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        step = self.call
        self.call += 1
        if step >= len(self.step_timesteps):
            raise RuntimeError(
                f"the pipeline called the UNet more than the {len(self.step_timesteps)} times "
                "its scheduler planned"
            )
        bound = self.signature.bind(*args, **kwargs).arguments
        sample, timestep = bound["sample"], bound["timestep"]
        t_value = float(torch.as_tensor(timestep).reshape(-1)[0])
        planned = float(self.step_timesteps[step])
        if abs(t_value - planned) > 1e-3 * max(1.0, abs(planned)):
            raise RuntimeError(
                f"UNet call {step} ran at timestep {t_value}, but the scheduler planned {planned}; "
                "the pipeline's schedule differs from the calibration plan"
            )
        n_traj = self.mask.shape[0]
        if sample.shape[0] % n_traj != 0:
            raise RuntimeError(f"UNet batch {sample.shape[0]} is not a multiple of the {n_traj} trajectories")
        self.halves = sample.shape[0] // n_traj
        for j in self.mask[:, step].nonzero().flatten().tolist():
            # With classifier-free guidance the pipeline stacks [uncond, cond]: row j + h * n_traj.
            for h in range(self.halves):
                self.rows.append(self._row(bound, j + h * n_traj, step, self.first_trajectory + j, t_value))
        if step >= self.last_step:
            raise _StopRun

    def check_run(self, recorded: int) -> None:
        """RuntimeError if the run just made recorded fewer rows than its mask planned (it ended early)."""
        planned = int(self.mask.sum()) * self.halves
        if recorded != planned:
            raise RuntimeError(
                f"calibration planned {planned} UNet input rows from this pipeline run but recorded "
                f"{recorded}: it ended after {self.call} UNet calls, but recording needed "
                f"{self.last_step + 1} of the {len(self.step_timesteps)} its scheduler planned (a callback "
                "that stops the loop, or a pipeline that returns early?)"
            )

    def _row(self, bound: dict, row: int, step: int, trajectory: int, t_value: float) -> dict[str, Any]:
        batch = bound["sample"].shape[0]

        def take(t: Any) -> Any:
            if torch.is_tensor(t) and t.ndim > 0 and t.shape[0] == batch:
                return t[row].detach().to("cpu", copy=True)
            return None

        inputs = {name: take(bound.get(name)) for name in RECORDED_ARGS}
        added = bound.get("added_cond_kwargs") or {}
        timestep = torch.as_tensor(bound["timestep"]).reshape(-1)
        t_row = float(timestep[row]) if timestep.numel() == batch else t_value
        return {
            "inputs": {k: v for k, v in inputs.items() if v is not None},
            "added": {k: t for k, v in added.items() if (t := take(v)) is not None},
            "timestep": t_row,
            "step": step,
            "trajectory": trajectory,
        }

    def to_dataset(self) -> CalibrationSet:
        if not self.rows:
            raise RuntimeError("calibration recorded no UNet inputs")

        def stack(key: str, name: str) -> torch.Tensor:
            return torch.stack([r[key][name] for r in self.rows])

        timesteps = torch.tensor([r["timestep"] for r in self.rows], dtype=torch.float64)
        train = timesteps.round().long().clamp(0, self.num_train_timesteps - 1)
        first = self.rows[0]
        return CalibrationSet(
            inputs={name: stack("inputs", name) for name in first["inputs"]},
            timesteps=timesteps.to(
                self.step_timesteps.dtype if self.step_timesteps.is_floating_point() else torch.long
            ),
            train_timesteps=train,
            step_index=torch.tensor([r["step"] for r in self.rows]),
            trajectory=torch.tensor([r["trajectory"] for r in self.rows]),
            step_timesteps=self.step_timesteps,
            num_train_timesteps=self.num_train_timesteps,
            added_cond_kwargs={name: stack("added", name) for name in first["added"]},
            guidance_halves=self.halves,
        )


def capture(
    pipe: Any,
    spec: PipelineSpec,
    mask: torch.Tensor,
    step_timesteps: torch.Tensor,
    *,
    num_train_timesteps: int,
    num_inference_steps: int,
    prompts: list[str] | None,
    guidance_scale: float | None,
    batch_size: int,
    generator: torch.Generator,
    progress: bool = True,
) -> CalibrationSet:
    """Run `pipe` over the trajectories of `mask` (trajectories, steps), `batch_size` at a time."""
    recorder = _Recorder(pipe.unet, step_timesteps, num_train_timesteps)
    handle = pipe.unet.register_forward_pre_hook(recorder.hook, with_kwargs=True)
    n_traj = mask.shape[0]
    try:
        with (
            quiet_pipeline(pipe),
            tqdm(
                total=int(mask.sum()), desc="calibration: capture", unit="sample", disable=not progress
            ) as bar,
        ):
            for start in range(0, n_traj, batch_size):
                chunk = mask[start : start + batch_size]
                before = len(recorder.rows)
                recorder.start_run(chunk, start)
                trajectories = prompts[start : start + len(chunk)] if spec.text_conditioned else len(chunk)
                with contextlib.suppress(_StopRun):
                    spec.run(pipe, trajectories, num_inference_steps, guidance_scale, generator)
                recorder.check_run(len(recorder.rows) - before)
                bar.update((len(recorder.rows) - before) // max(recorder.halves, 1))
    finally:
        handle.remove()
    return recorder.to_dataset()


@contextlib.contextmanager
def quiet_pipeline(pipe: Any) -> Iterator[None]:
    """Silence the pipeline's own progress bar (calibration shows its own), restoring it afterwards."""
    saved_bar_config = dict(getattr(pipe, "_progress_bar_config", {}))
    pipe.set_progress_bar_config(disable=True)
    try:
        yield
    finally:
        pipe._progress_bar_config = saved_bar_config


def concat_calibration_sets(sets: list[CalibrationSet]) -> CalibrationSet:
    """One CalibrationSet with the rows of `sets` in order; trajectory ids are kept distinct."""
    if not sets:
        raise ValueError("concat_calibration_sets needs at least one CalibrationSet")
    first = sets[0]
    for other in sets[1:]:
        same = (
            other.num_train_timesteps == first.num_train_timesteps
            and other.guidance_halves == first.guidance_halves
            and torch.equal(other.step_timesteps, first.step_timesteps)
            and set(other.inputs) == set(first.inputs)
            and set(other.added_cond_kwargs) == set(first.added_cond_kwargs)
        )
        if not same:
            raise ValueError("calibration sets from different schedules or pipelines cannot be joined")
    offsets, total = [], 0
    for data in sets:  # shift each set's trajectory ids past the previous sets'
        offsets.append(total)
        total += int(data.trajectory.max()) + 1 if len(data) else 0
    return CalibrationSet(
        inputs={k: torch.cat([d.inputs[k] for d in sets]) for k in first.inputs},
        timesteps=torch.cat([d.timesteps for d in sets]),
        train_timesteps=torch.cat([d.train_timesteps for d in sets]),
        step_index=torch.cat([d.step_index for d in sets]),
        trajectory=torch.cat([d.trajectory + off for d, off in zip(sets, offsets)]),
        step_timesteps=first.step_timesteps,
        num_train_timesteps=first.num_train_timesteps,
        added_cond_kwargs={
            k: torch.cat([d.added_cond_kwargs[k] for d in sets]) for k in first.added_cond_kwargs
        },
        guidance_halves=first.guidance_halves,
    )
