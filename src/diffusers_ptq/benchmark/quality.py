"""The quality benchmark: float vs each preset at each bit setting, on identical noise (paired rows)."""

from __future__ import annotations

import copy
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import torch
from diffusers import DDIMPipeline
from tqdm.auto import tqdm

from diffusers_ptq.api import quantize_pipeline
from diffusers_ptq.benchmark.sampling import (
    Trajectory,
    ddim_pipeline,
    noise_error_per_step,
    pooled_sqnr_db,
    record_trajectory,
    sample_images,
)
from diffusers_ptq.benchmark.settings import BenchSettings
from diffusers_ptq.calibration import get_pipeline_spec
from diffusers_ptq.config import PTQConfig

GRID_IMAGES = 64


class Fidelity(Protocol):
    """Turns a batch of generated images in [-1, 1] into named scores (e.g. FD, IS)."""

    name: str

    def compute(self, images: torch.Tensor) -> dict[str, float]: ...


@dataclass
class RowResult:
    name: str
    preset: str | None
    weight_bits: int | None
    act_bits: int | None
    metrics: dict[str, list[float]] = field(default_factory=dict)  # one value per seed
    sqnr_db: float | None = None
    sqnr_per_step: list[float] = field(default_factory=list)
    mse_per_step: list[float] = field(default_factory=list)
    calibration_s: float = 0.0
    sampling_s: float = 0.0
    config: dict[str, Any] | None = None

    def mean(self, metric: str) -> float | None:
        values = self.metrics.get(metric)
        return sum(values) / len(values) if values else None


@dataclass
class BenchResult:
    settings: BenchSettings
    rows: list[RowResult]
    timesteps: list[int]
    grids: dict[str, torch.Tensor]  # row name -> first images of the first seed
    fidelity: str | None
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "settings": self.settings.to_dict(),
            "fidelity": self.fidelity,
            "timesteps": self.timesteps,
            "notes": self.notes,
            "rows": [asdict(row) for row in self.rows],
        }


def check_unconditional(pipe: Any) -> None:
    spec = get_pipeline_spec(pipe)
    if spec.text_conditioned:
        raise ValueError(
            f"the quality benchmark samples unconditional DDPM/DDIM pipelines; "
            f"{spec.name} is text-conditioned"
        )


def _row_config(settings: BenchSettings, preset: str, w: int, a: int) -> PTQConfig:
    calibration: dict[str, Any] = {"num_inference_steps": settings.num_inference_steps}
    if settings.calibration_samples is not None:
        calibration["num_samples"] = settings.calibration_samples
    return PTQConfig.preset(preset, weight_bits=w, act_bits=a, calibration=calibration)


def _fresh_pipe(float_pipe: DDIMPipeline) -> DDIMPipeline:
    return DDIMPipeline(unet=copy.deepcopy(float_pipe.unet), scheduler=copy.deepcopy(float_pipe.scheduler))


def run_row(
    row: RowResult,
    float_pipe: DDIMPipeline,
    settings: BenchSettings,
    trajectory: Trajectory,
    fidelity: Fidelity | None,
    progress: bool,
) -> tuple[RowResult, torch.Tensor]:
    """Calibrate (unless float), sample every seed, score; returns the row and its grid images."""
    pipe = float_pipe
    if row.preset is not None:
        config = _row_config(settings, row.preset, row.weight_bits, row.act_bits)
        row.config = config.to_dict()
        pipe = _fresh_pipe(float_pipe)
        start = time.perf_counter()
        quantize_pipeline(pipe, config, progress=False)
        row.calibration_s = round(time.perf_counter() - start, 2)
        row.mse_per_step, row.sqnr_per_step = noise_error_per_step(pipe.unet, trajectory)
        row.sqnr_db = pooled_sqnr_db(trajectory, row.mse_per_step)
    grid = torch.empty(0)
    start = time.perf_counter()
    for seed in settings.seeds:
        images = sample_images(
            pipe,
            settings.num_samples,
            seed,
            settings.num_inference_steps,
            settings.batch_size,
            desc=f"{row.name} seed {seed}",
            progress=progress,
        )
        if grid.numel() == 0:
            grid = images[:GRID_IMAGES].clone()
        if fidelity is not None:
            for name, value in fidelity.compute(images).items():
                row.metrics.setdefault(name, []).append(round(value, 4))
    row.sampling_s = round(time.perf_counter() - start, 2)
    return row, grid


def run_quality_benchmark(
    pipe: Any, settings: BenchSettings, fidelity: Fidelity | None = None, progress: bool = True
) -> BenchResult:
    """Float row, then one row per (preset, bits): same noise seeds, DDIM `settings.num_inference_steps`.

    `pipe` is an unconditional pipeline (its UNet is never modified); `fidelity` None skips FD/IS and keeps
    the noise-prediction SQNR.
    """
    settings.validate()
    check_unconditional(pipe)
    float_pipe = ddim_pipeline(pipe)
    notes = []
    if fidelity is None:
        notes.append("no classifier matches this model: FD and IS are skipped; noise SQNR is still measured")
    trajectory = record_trajectory(
        float_pipe, settings.sqnr_samples, settings.seeds[0], settings.num_inference_steps
    )
    rows, grids = [], {}
    specs = settings.rows()
    for name, preset, w, a in tqdm(specs, desc="bench rows", disable=not progress):
        row = RowResult(name=name, preset=preset, weight_bits=w, act_bits=a)
        row, grids[name] = run_row(row, float_pipe, settings, trajectory, fidelity, progress)
        rows.append(row)
    return BenchResult(
        settings=settings,
        rows=rows,
        timesteps=[int(t) for t in trajectory.timesteps],
        grids=grids,
        fidelity=None if fidelity is None else fidelity.name,
        notes=notes,
    )
