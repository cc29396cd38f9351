"""Record UNet inputs while the pipeline runs its own sampling loop.

A forward pre-hook on `pipe.unet` counts the UNet calls of each pipeline run, checks each call against
the planned schedule, and copies to the CPU only the rows the recording mask asks for. Once a run has
recorded its last planned step the hook stops it, so the rest of the trajectory is never computed; a run
that ends before that (fewer UNet calls than planned) is an error, not a smaller calibration set.
"""

from __future__ import annotations

import contextlib
import inspect
from typing import Any

import torch
from tqdm.auto import tqdm

from diffusers_ptq.calibration.dataset import CalibrationSet, tree_join, tree_leaves, tree_map
from diffusers_ptq.calibration.driver import CalibrationDriver, quiet_pipeline, zero_forward
from diffusers_ptq.calibration.pipelines import PipelineSpec
from diffusers_ptq.distributed import exchange, rank, split_evenly, world_size

# UNet arguments that are not per-sample inputs: the timestep is recorded on its own.
_NOT_RECORDED = ("timestep", "return_dict")


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
        self.static: dict[str, Any] = {}  # arguments without a batch dimension, from their first call
        self.dry = False  # another rank's run: count and check the calls, record nothing

    def start_run(self, mask: torch.Tensor, first_trajectory: int, dry: bool = False) -> None:
        self.mask, self.first_trajectory, self.call, self.dry = mask, first_trajectory, 0, dry
        steps_needed = mask.any(dim=0).nonzero()
        self.last_step = int(steps_needed.max()) if len(steps_needed) else -1

    def hook(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        step = self.call
        self.call += 1
        if step >= len(self.step_timesteps):
            raise RuntimeError(
                f"the pipeline called the UNet more than the {len(self.step_timesteps)} times "
                "calibration planned (the planning run's calls)"
            )
        bound = self.signature.bind(*args, **kwargs).arguments
        sample, timestep = bound["sample"], bound["timestep"]
        t_value = float(torch.as_tensor(timestep).reshape(-1)[0])
        planned = float(self.step_timesteps[step])
        if abs(t_value - planned) > 1e-3 * max(1.0, abs(planned)):
            raise RuntimeError(
                f"UNet call {step} ran at timestep {t_value}, but calibration planned {planned}; "
                "the pipeline's schedule differs from the planning run's (per-trajectory pipeline_kwargs "
                "that change the schedule, such as strength, must be the same for every trajectory)"
            )
        n_traj = self.mask.shape[0]
        if sample.shape[0] % n_traj != 0:
            raise RuntimeError(f"UNet batch {sample.shape[0]} is not a multiple of the {n_traj} trajectories")
        self.halves = sample.shape[0] // n_traj
        for j in [] if self.dry else self.mask[:, step].nonzero().flatten().tolist():
            # With classifier-free guidance the pipeline stacks [uncond, cond]: row j + h * n_traj.
            for h in range(self.halves):
                self.rows.append(self._row(bound, j + h * n_traj, step, self.first_trajectory + j, t_value))
        if step >= self.last_step:
            raise _StopRun

    def check_run(self, recorded: int) -> None:
        """RuntimeError if the run just made recorded fewer rows than its mask planned (it ended early)."""
        planned = int(self.mask.sum()) * self.halves
        ended_early = self.call <= self.last_step if self.dry else recorded != planned
        if ended_early:
            raise RuntimeError(
                f"calibration planned {planned} UNet input rows from this pipeline run but recorded "
                f"{recorded}: it ended after {self.call} UNet calls, but recording needed "
                f"{self.last_step + 1} of the {len(self.step_timesteps)} its scheduler planned (a callback "
                "that stops the loop, or a pipeline that returns early?)"
            )

    def _row(self, bound: dict, row: int, step: int, trajectory: int, t_value: float) -> dict[str, Any]:
        batch = bound["sample"].shape[0]
        per_row: dict[str, Any] = {}
        for name, value in bound.items():
            if name in _NOT_RECORDED or value is None:
                continue
            leaves = tree_leaves(value)
            if leaves and all(t.ndim > 0 and t.shape[0] == batch for t in leaves):
                # Only this row, copied to the CPU: residuals of every UNet call would not fit in memory.
                per_row[name] = tree_map(lambda t: t[row].detach().to("cpu", copy=True), value)
            elif name not in self.static:
                self.static[name] = tree_map(lambda t: t.detach().to("cpu", copy=True), value)
        timestep = torch.as_tensor(bound["timestep"]).reshape(-1)
        t_row = float(timestep[row]) if timestep.numel() == batch else t_value
        return {"inputs": per_row, "timestep": t_row, "step": step, "trajectory": trajectory}

    def to_dataset(self) -> CalibrationSet:
        if not self.rows:
            raise RuntimeError("calibration recorded no UNet inputs")

        stacked = tree_join([r["inputs"] for r in self.rows], torch.stack)
        added = stacked.pop("added_cond_kwargs", {})
        inputs = {k: v for k, v in stacked.items() if torch.is_tensor(v)}
        extra = {k: v for k, v in stacked.items() if not torch.is_tensor(v)}
        timesteps = torch.tensor([r["timestep"] for r in self.rows], dtype=torch.float64)
        train = timesteps.round().long().clamp(0, self.num_train_timesteps - 1)
        return CalibrationSet(
            inputs=inputs,
            timesteps=timesteps.to(
                self.step_timesteps.dtype if self.step_timesteps.is_floating_point() else torch.long
            ),
            train_timesteps=train,
            step_index=torch.tensor([r["step"] for r in self.rows]),
            trajectory=torch.tensor([r["trajectory"] for r in self.rows]),
            step_timesteps=self.step_timesteps,
            num_train_timesteps=self.num_train_timesteps,
            added_cond_kwargs=added,
            guidance_halves=self.halves,
            extra_inputs=extra,
            static_inputs=self.static,
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
    driver: CalibrationDriver | None = None,
    trajectory_offset: int = 0,
    distributed: bool = False,
) -> CalibrationSet:
    """Run `pipe` over the trajectories of `mask` (trajectories, steps), `batch_size` at a time.

    With a `driver` (pipeline kwargs, a calibration_fn), it makes the calls, `driver.chunk` trajectories
    each, trajectory i of the mask being the driver's trajectory `trajectory_offset + i`; without one,
    the calls are `spec`'s with `prompts[i]` for trajectory i.

    With `distributed` (an initialised process group), the runs are split among the ranks as evenly as
    possible in contiguous blocks (ValueError on every rank if a rank would get none). Every rank still
    makes the other ranks' runs, with the UNet replaced by a zero stub and stopped where the recording would
    stop, so its generator draws the same noise as one process; the recorded rows are then gathered in rank
    order, which is recording order, so every rank returns the one-process CalibrationSet.
    """
    if driver is None:
        driver = CalibrationDriver(spec, num_inference_steps, guidance_scale, prompts, batch_size=batch_size)
        trajectory_offset = 0
    recorder = _Recorder(pipe.unet, step_timesteps, num_train_timesteps)
    handle = pipe.unet.register_forward_pre_hook(recorder.hook, with_kwargs=True)
    n_traj, chunk_size = mask.shape[0], driver.chunk
    starts = list(range(0, n_traj, chunk_size))
    mine = split_runs(n_traj, chunk_size, world_size())[rank()] if distributed else range(len(starts))
    try:
        with (
            quiet_pipeline(pipe),
            tqdm(
                total=int(mask.sum()), desc="calibration: capture", unit="sample", disable=not progress
            ) as bar,
        ):
            for run, start in enumerate(starts):
                chunk = mask[start : start + chunk_size]
                if driver.calibration_fn is not None and len(chunk) < chunk_size:
                    # A calibration_fn always runs its own batch: the rows past the mask are not recorded.
                    chunk = torch.cat([chunk, chunk.new_zeros(chunk_size - len(chunk), chunk.shape[1])])
                before = len(recorder.rows)
                recorder.start_run(chunk, start, dry=run not in mine)
                stub = contextlib.nullcontext() if run in mine else zero_forward(pipe.unet)
                with contextlib.suppress(_StopRun), stub:
                    driver.run(pipe, trajectory_offset + start, len(chunk), generator)
                recorder.check_run(len(recorder.rows) - before)
                bar.update((len(recorder.rows) - before) // max(recorder.halves, 1))
    finally:
        handle.remove()
    if distributed:
        _gather(recorder)
    return recorder.to_dataset()


def split_runs(n_traj: int, chunk_size: int, world: int) -> list[range]:
    """The pipeline runs (`chunk_size` trajectories each) of every rank: contiguous, as even as possible."""
    runs = -(-n_traj // chunk_size)
    if runs < world:
        raise ValueError(
            f"{runs} calibration pipeline runs ({chunk_size} trajectories each, {n_traj} in all) cannot be "
            f"split among {world} ranks: each rank needs at least one; set calibration.batch_size "
            f"(trajectories per pipeline call) to at most {max(n_traj // world, 1)}, or record more "
            "trajectories"
        )
    return split_evenly(runs, world)


def rank_counts(mask: torch.Tensor, chunk_size: int, world: int) -> dict[str, list[int]]:
    """Trajectories and samples (recorded steps) each rank captures from `mask` (see `split_runs`)."""
    trajectories, samples = [], []
    for runs in split_runs(mask.shape[0], chunk_size, world):
        rows = mask[runs.start * chunk_size : runs.stop * chunk_size]
        trajectories.append(int(rows.shape[0]))
        samples.append(int(rows.sum()))
    return {"trajectories": trajectories, "samples": samples}


def _gather(recorder: _Recorder) -> None:
    """Every rank's recorded rows, in rank order (= recording order), into `recorder` on every rank."""
    parts = exchange("calibration capture", (recorder.rows, recorder.static))
    recorder.rows = [row for rows, _ in parts for row in rows]
    static: dict[str, Any] = {}
    for _, part in parts:  # first seen, as one process keeps it
        for name, value in part.items():
            static.setdefault(name, value)
    recorder.static = static


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
            and set(other.extra_inputs) == set(first.extra_inputs)
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
        added_cond_kwargs=tree_join([d.added_cond_kwargs for d in sets], torch.cat),
        guidance_halves=first.guidance_halves,
        extra_inputs=tree_join([d.extra_inputs for d in sets], torch.cat),
        static_inputs=first.static_inputs,
    )
