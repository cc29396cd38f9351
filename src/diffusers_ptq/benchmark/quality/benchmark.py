"""The quality benchmark: float vs each preset at each bit setting, on identical noise (paired rows).

Unconditional DDPM/DDIM pipelines, and text-to-image pipelines (Stable Diffusion 1.x/2.x, SDXL) when
`settings.prompts` is set: then every row generates image i from prompt i mod len(prompts) with
classifier-free guidance, and the prompt list (cycled) also calibrates the quantized rows.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import torch
from tqdm.auto import tqdm

from diffusers_ptq.api import quantize_pipeline
from diffusers_ptq.benchmark.metrics.clip_score import clip_fidelity
from diffusers_ptq.benchmark.quality.sampling import (
    Trajectory,
    ddim_pipeline,
    ddim_text_pipeline,
    fresh_pipeline,
    image_prompts,
    noise_errors_per_step,
    pooled_sqnr_db,
    record_trajectory,
    sample_images,
)
from diffusers_ptq.benchmark.quality.settings import BenchSettings
from diffusers_ptq.benchmark.quanto_row import (
    QUANTO_METHOD,
    QUANTO_ROW,
    quanto_pipeline_quantizer,
    quanto_unavailable_reason,
)
from diffusers_ptq.calibration import get_pipeline_spec
from diffusers_ptq.config import PTQConfig

GRID_IMAGES = 64


class Fidelity(Protocol):
    """Turns a batch of generated images in [-1, 1] into named scores (e.g. FD, IS)."""

    name: str

    def compute(self, images: torch.Tensor) -> dict[str, float]: ...


class PromptFidelity(Protocol):
    """Text-to-image rows: scores images against the prompt each was generated from (e.g. CLIP score)."""

    name: str

    def compute(self, images: torch.Tensor, prompts: list[str]) -> dict[str, float]: ...


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
    # Per step: RMS over (C, H, W) of the mean over samples of eps_q - eps (`primitives.mean_error_rms`).
    bias_per_step: list[float] = field(default_factory=list)
    calibration_s: float = 0.0  # all of quantize_pipeline: capture, scales, group search, reconstruction
    search_s: float | None = None  # the APQ-DM group search's share of calibration_s; None: no search ran
    sampling_s: float = 0.0
    config: dict[str, Any] | None = None
    # What the selector chose (samples per step, TDAC scores, active picks); group search, reconstruction,
    # GPTQ, bias-correction and mixed-precision summaries (None when they did not run).
    calibration_info: dict[str, Any] = field(default_factory=dict)

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


def check_pipeline_prompts(pipe: Any, prompts: list[str] | None) -> None:
    """Text-to-image pipelines need prompts and unconditional ones take none (ValueError naming both)."""
    spec = get_pipeline_spec(pipe)
    if spec.text_conditioned and prompts is None:
        raise ValueError(
            f"{spec.name} is text-conditioned: set prompts (BenchSettings.prompts, --prompts FILE) to "
            "benchmark it"
        )
    if not spec.text_conditioned and prompts is not None:
        raise ValueError(
            f"prompts are for text-to-image pipelines; {spec.name} is unconditional: leave prompts None"
        )


def calibration_prompts(settings: BenchSettings, config: PTQConfig) -> list[str] | None:
    """The evaluation prompts, cycled to one per calibration trajectory (the random selector records one
    trajectory per prompt and needs at most `num_samples` of them); None for unconditional runs."""
    if settings.prompts is None:
        return None
    count = max(len(settings.prompts), config.calibration.num_samples)
    return image_prompts(settings.prompts, 0, count)


def _row_config(settings: BenchSettings, preset: str, w: int, a: int) -> PTQConfig:
    calibration: dict[str, Any] = {
        "num_inference_steps": settings.num_inference_steps,
        "seed": settings.calibration_seed,
    }
    if settings.calibration_samples is not None:
        calibration["num_samples"] = settings.calibration_samples
    if settings.prompts is not None:  # calibration sees the guidance the rows sample with
        calibration["guidance_scale"] = settings.guidance_scale
    config = PTQConfig.preset(preset, weight_bits=w, act_bits=a, calibration=calibration)
    if not settings.reconstruction and config.reconstruction.enabled:
        return config.replace(reconstruction={"enabled": False})
    minutes = settings.reconstruction_minutes
    if minutes is not None and config.reconstruction.enabled:
        config = config.replace(reconstruction={"max_minutes": minutes})
    return config


def reconstruction_note(settings: BenchSettings) -> str | None:
    """The table's note when reconstruction is switched off (None when presets run as published)."""
    if settings.reconstruction:
        return None
    names = [p for p in settings.presets if PTQConfig.preset(p).reconstruction.enabled]
    which = f" ({', '.join(names)} reconstruct by default)" if names else ""
    return (
        "reconstruction off (--no-reconstruction): every preset ran with block reconstruction disabled"
        f"{which}; these rows are calibration only, not the published recipes"
    )


def row_configs(settings: BenchSettings) -> dict[str, PTQConfig]:
    """Row name -> the recipe it quantizes with (built, so validated, before any model runs)."""
    return {name: _row_config(settings, p, w, a) for name, p, w, a in settings.rows() if p is not None}


def run_row(
    row: RowResult,
    float_pipe: Any,
    settings: BenchSettings,
    trajectory: Trajectory,
    fidelity: Fidelity | PromptFidelity | None,
    progress: bool,
    config: PTQConfig | None = None,
    quantize: Callable[[Any], dict[str, Any]] | None = None,
) -> tuple[RowResult, torch.Tensor]:
    """Calibrate (unless float), sample every seed, score; returns the row and its grid images.

    The recipe is `config`, else the row's preset at its bit widths (`settings` applied); a row with
    neither is the float row. `quantize(pipe) -> info`, when given, quantizes the row's fresh pipeline
    instead (another library's method, e.g. optimum-quanto); its info is the row's calibration_info.
    `settings` gives the sampling: images, seeds, steps, batch size, and for text-to-image pipelines the
    prompts and guidance scale (`fidelity` is then a PromptFidelity, given each image's prompt).
    """
    pipe = float_pipe
    if config is None and quantize is None and row.preset is not None:
        config = _row_config(settings, row.preset, row.weight_bits, row.act_bits)
    if quantize is not None:
        pipe = fresh_pipeline(float_pipe)
        start = time.perf_counter()
        row.calibration_info = quantize(pipe)
        row.calibration_s = round(time.perf_counter() - start, 2)
    elif config is not None:
        row.config = config.to_dict()
        pipe = fresh_pipeline(float_pipe)
        start = time.perf_counter()
        quantize_pipeline(pipe, config, prompts=calibration_prompts(settings, config), progress=False)
        row.calibration_s = round(time.perf_counter() - start, 2)
        state = pipe.unet.ptq_state
        row.search_s = None if state.group_search is None else round(state.group_search["seconds"], 2)
        row.calibration_info = {
            "selection": state.selection,
            "group_search": state.group_search,
            "reconstruction": getattr(state, "reconstruction", None),
            "gptq": state.gptq,
            "bias_correction": state.bias_correction,
            "mixed_precision": None if state.report is None else state.report.mixed_precision,
        }
    if pipe is not float_pipe:
        errors = noise_errors_per_step(pipe.unet, trajectory)
        row.mse_per_step, row.sqnr_per_step, row.bias_per_step = errors.mse, errors.sqnr, errors.bias
        row.sqnr_db = pooled_sqnr_db(trajectory, row.mse_per_step)
    grid = torch.empty(0)
    prompts = settings.prompts
    guidance = None if prompts is None else settings.guidance_scale
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
            prompts=prompts,
            guidance_scale=guidance,
        )
        if grid.numel() == 0:
            grid = images[:GRID_IMAGES].clone()
        if fidelity is not None:
            if prompts is None:
                scores = fidelity.compute(images)
            else:
                scores = fidelity.compute(images, image_prompts(prompts, 0, len(images)))
            for name, value in scores.items():
                row.metrics.setdefault(name, []).append(round(value, 4))
    row.sampling_s = round(time.perf_counter() - start, 2)
    return row, grid


@dataclass
class RowSpec:
    """One row to run: its result (filled in by the run), and its recipe or another library's quantizer
    (neither: the float row)."""

    result: RowResult
    config: PTQConfig | None = None
    quantize: Callable[[Any], dict[str, Any]] | None = None


def run_rows(
    specs: list[RowSpec],
    float_pipe: Any,
    settings: BenchSettings,
    trajectory: Trajectory,
    fidelity: Fidelity | PromptFidelity | None,
    *,
    progress: bool,
    desc: str = "bench rows",
    on_row: Callable[[RowResult], None] | None = None,
) -> tuple[list[RowResult], dict[str, torch.Tensor]]:
    """`run_row` for each spec in order, on the same float pipeline and trajectory; returns the finished
    rows and their grids by row name. `on_row(row)` is called as each row finishes (e.g. to log it)."""
    rows, grids = [], {}
    for spec in tqdm(specs, desc=desc, disable=not progress):
        row, grids[spec.result.name] = run_row(
            spec.result, float_pipe, settings, trajectory, fidelity, progress, spec.config, spec.quantize
        )
        rows.append(row)
        if on_row is not None:
            on_row(row)
    return rows, grids


def _text_fidelity(
    settings: BenchSettings, fidelity: Fidelity | PromptFidelity | None, pipe: Any, notes: list[str]
) -> Fidelity | PromptFidelity | None:
    """The given metric, else the CLIP score when its weights are on disk (else a note saying why not)."""
    if fidelity is not None:
        return fidelity
    device = getattr(pipe, "device", None) or torch.device("cpu")
    metric, reason = clip_fidelity(settings.clip_model, device)
    if reason is not None:
        notes.append(f"{reason}; noise SQNR is still measured")
    return metric


def run_quality_benchmark(
    pipe: Any,
    settings: BenchSettings,
    fidelity: Fidelity | PromptFidelity | None = None,
    progress: bool = True,
) -> BenchResult:
    """Float row, then one row per (preset, bits), then optimum-quanto's W8A8 with `compare_quanto`: same
    noise seeds, DDIM `settings.num_inference_steps`.

    `pipe` is an unconditional pipeline, or a text-to-image one with `settings.prompts` (its UNet is never
    modified). Unconditional: `fidelity` None skips FD/IS. Text-to-image: `fidelity` (a PromptFidelity) None
    means the CLIP score of `settings.clip_model`, skipped with a note when torchmetrics or the cached
    weights are missing. The noise-prediction SQNR is measured either way.
    """
    settings.validate()
    configs = row_configs(settings)
    check_pipeline_prompts(pipe, settings.prompts)
    text = settings.prompts is not None
    float_pipe = ddim_text_pipeline(pipe) if text else ddim_pipeline(pipe)
    notes: list[str] = []
    note = reconstruction_note(settings)
    if note is not None:
        notes.append(note)
    if text:
        fidelity = _text_fidelity(settings, fidelity, pipe, notes)
    elif fidelity is None:
        notes.append("no classifier matches this model: FD and IS are skipped; noise SQNR is still measured")
    quanto = None
    if settings.compare_quanto:
        reason = quanto_unavailable_reason()
        if reason is None:  # calibrated over the q-diffusion row's calibration trajectories
            quanto = quanto_pipeline_quantizer(_row_config(settings, "q-diffusion", 8, 8).calibration)
        else:
            notes.append(f"{QUANTO_ROW} skipped: {reason}")
    trajectory = record_trajectory(
        float_pipe,
        settings.sqnr_samples,
        settings.seeds[0],
        settings.num_inference_steps,
        prompts=settings.prompts,
        guidance_scale=settings.guidance_scale if text else None,
    )
    specs = [
        RowSpec(RowResult(name=name, preset=preset, weight_bits=w, act_bits=a), configs.get(name))
        for name, preset, w, a in settings.rows()
    ]
    if quanto is not None:
        specs.append(RowSpec(RowResult(QUANTO_ROW, QUANTO_METHOD, 8, 8), quantize=quanto))
    rows, grids = run_rows(specs, float_pipe, settings, trajectory, fidelity, progress=progress)
    return BenchResult(
        settings=settings,
        rows=rows,
        timesteps=[int(t) for t in trajectory.timesteps],
        grids=grids,
        fidelity=None if fidelity is None else fidelity.name,
        notes=notes,
    )
