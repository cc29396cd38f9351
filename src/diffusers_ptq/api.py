"""`quantize_pipeline`: validate, plan, capture through the pipeline, install, initialise scales."""

from __future__ import annotations

import copy
import dataclasses
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from diffusers_ptq.calibration import (
    CalibrationSet,
    SelectionRequest,
    get_pipeline_spec,
    planned_timesteps,
    recording_mask,
    select_calibration,
)
from diffusers_ptq.calibration.active import candidate_steps
from diffusers_ptq.calibration.features import feature_module
from diffusers_ptq.calibration.pipelines import default_call_arg
from diffusers_ptq.config import CalibrationConfig, PTQConfig
from diffusers_ptq.initialise import initialise_activations, initialise_weights, set_quant_state
from diffusers_ptq.prepare import QuantPlan, install, is_quantized, plan_quantization
from diffusers_ptq.quantizers import contiguous_group_map, nearest_step_group_map
from diffusers_ptq.report import QuantizationReport
from diffusers_ptq.search import FloatTargets, GroupSearch, NoiseTargets, resolve_target, sample_clean_images
from diffusers_ptq.serialization import attach_quantizer
from diffusers_ptq.serialization.model_card import infer_base_model
from diffusers_ptq.timestep import TimestepContext

logger = logging.getLogger("diffusers_ptq")


@dataclass
class PTQState:
    """What a quantized UNet carries: its recipe, timestep context, plan and report.

    `metrics` (name -> number, e.g. measured FID or SQNR) and `base_model` (the float model's Hub id) are
    saved with the checkpoint and shown on the model card by `push_to_hub`.
    """

    config: PTQConfig
    context: TimestepContext
    plan: QuantPlan
    group_map: torch.Tensor
    report: QuantizationReport | None = None
    borrowed_groups: list[int] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)
    base_model: str | None = None
    num_prompts: int | None = None  # calibration prompts (text-conditioned pipelines)
    # What the sample selector chose (samples per step; TDAC scores; active picks), for reports and ablations.
    selection: dict[str, Any] = field(default_factory=dict)
    # Group search summary (learning rate, loss per epoch, final entropies); None when it did not run.
    group_search: dict[str, Any] | None = None


def build_group_map(
    timestep_groups: int | str, num_train_timesteps: int, step_timesteps: torch.Tensor
) -> torch.Tensor:
    """Training timestep -> group: contiguous groups, or one group per sampling step ('per_step')."""
    if timestep_groups == "per_step":
        return nearest_step_group_map(num_train_timesteps, step_timesteps)
    if timestep_groups > num_train_timesteps:
        raise ValueError(
            f"activations.timestep_groups={timestep_groups} exceeds the scheduler's {num_train_timesteps} "
            "training timesteps"
        )
    return contiguous_group_map(num_train_timesteps, int(timestep_groups))


def _calibration_config(config: PTQConfig, **overrides: Any) -> CalibrationConfig:
    calib = copy.deepcopy(config.calibration)
    for name, value in overrides.items():
        if value is not None:
            setattr(calib, name, value)
    calib.validate()
    return calib


def _check_prompts(prompts: Any, text_conditioned: bool, pipe_name: str) -> list[str] | None:
    if not text_conditioned:
        return None
    if prompts is None or (isinstance(prompts, list | tuple) and len(prompts) == 0):
        raise ValueError(f"{pipe_name} is text-conditioned: pass calibration prompts, e.g. prompts=[...]")
    if isinstance(prompts, str):
        prompts = [prompts]
    if not isinstance(prompts, list | tuple) or not all(isinstance(p, str) for p in prompts):
        raise TypeError("prompts must be a list of strings")
    return list(prompts)


def _seeded_generator(generator: torch.Generator | int | None, seed: int) -> torch.Generator:
    if isinstance(generator, torch.Generator):
        return generator
    return torch.Generator().manual_seed(seed if generator is None else int(generator))


def quantize_pipeline(
    pipe: Any,
    config: PTQConfig | None = None,
    *,
    prompts: list[str] | None = None,
    num_samples: int | None = None,
    num_inference_steps: int | None = None,
    guidance_scale: float | None = None,
    generator: torch.Generator | int | None = None,
    batch_size: int | None = None,
    progress: bool = True,
) -> Any:
    """Quantize `pipe.unet` in place with timestep-aware fake quantization and return `pipe`.

    Calibration runs `pipe(...)` itself (its scheduler, steps, guidance and conditioning) and records the
    UNet inputs `config.calibration.selector` chooses (by default: the steps `calibration.sampler` picks);
    with `group_search.enabled` the timestep -> group maps are then searched (APQ-DM). Keyword arguments
    override the matching `config.calibration` fields. Everything is validated before any model runs; if
    anything fails later, the UNet is restored to exactly what it was.
    """
    config = PTQConfig() if config is None else config
    if not isinstance(config, PTQConfig):
        raise TypeError(f"config must be a PTQConfig, got {type(config).__name__}")
    config.validate()
    spec = get_pipeline_spec(pipe)
    unet = pipe.unet
    if is_quantized(unet):
        raise ValueError("pipe.unet is already quantized; load the float model again to re-quantize it")
    prompts = _check_prompts(prompts, spec.text_conditioned, spec.name)
    calib = _calibration_config(
        config,
        num_samples=num_samples,
        num_inference_steps=num_inference_steps,
        guidance_scale=guidance_scale,
        batch_size=batch_size,
    )
    steps = calib.num_inference_steps or default_call_arg(pipe, "num_inference_steps")
    if steps is None:
        raise ValueError(
            f"{spec.name} has no default num_inference_steps; set calibration.num_inference_steps"
        )
    num_train = int(pipe.scheduler.config.num_train_timesteps)
    step_timesteps = planned_timesteps(pipe, steps)
    group_map = build_group_map(config.activations.timestep_groups, num_train, step_timesteps)
    plan = plan_quantization(unet, config)
    if not plan.layers and not plan.attentions:
        raise ValueError(
            "the layer selection matches no Conv2d/Linear layer of the UNet; check layers.include"
        )
    if calib.selector == "random":
        mask = recording_mask(calib, step_timesteps, num_train, torch.Generator().manual_seed(calib.seed))
        if prompts is not None and mask.shape[0] > len(prompts):
            raise ValueError(
                f"num_samples={calib.num_samples} with the {calib.sampler!r} sampler needs {mask.shape[0]} "
                f"trajectories (one per prompt), but only {len(prompts)} prompts were given; pass more "
                "prompts or lower num_samples to at most "
                f"{_max_samples(calib, len(prompts), step_timesteps, num_train)}"
            )
    _check_selection(config, calib, unet, len(step_timesteps))
    search = config.group_search
    target = resolve_target(search.target, spec, pipe.scheduler) if search.enabled else None

    start = time.perf_counter()
    targets = None
    if target == "noise":
        # Sampled from the float UNet before anything is installed; a generator of its own, so the captured
        # calibration data are the same with the search on or off.
        images = sample_clean_images(
            pipe,
            search.num_images,
            steps,
            calib.batch_size,
            torch.Generator().manual_seed(calib.seed + 1),
            progress,
        )
        targets = NoiseTargets(unet, pipe.scheduler, images)
    request = SelectionRequest(
        pipe=pipe,
        spec=spec,
        calibration=calib,
        selection=config.selection,
        step_timesteps=step_timesteps,
        num_train_timesteps=num_train,
        num_inference_steps=steps,
        prompts=prompts,
        generator=_seeded_generator(generator, calib.seed),
        progress=progress,
    )
    job = _Quantization(
        unet, config, plan, group_map, step_timesteps, calib.batch_size, calib.seed, progress, targets
    )
    try:
        selection = select_calibration(request, job.feedback if search.enabled else None)
        data = selection.data
        job.finish(data)
    except BaseException:
        job.restore()
        raise
    report = QuantizationReport.build(
        plan,
        method=config.method,
        tag=config.tag,
        calibration_samples=calib.num_samples,
        calibration_rows=len(data),
        samples_per_group=data.samples_per_group(group_map),
        num_inference_steps=steps,
        scheduler=type(pipe.scheduler).__name__,
        borrowed_groups=unet.ptq_state.borrowed_groups,
        seconds=time.perf_counter() - start,
    )
    unet.ptq_state.report = report
    unet.ptq_state.selection = selection.info
    # The stored recipe is the one that ran: keyword overrides and the pipeline's default step count applied.
    unet.ptq_state.config.calibration = dataclasses.replace(calib, num_inference_steps=steps)
    unet.ptq_state.base_model = infer_base_model(pipe, unet)
    unet.ptq_state.num_prompts = None if prompts is None else len(prompts)
    # quantization_config + hf_quantizer: stock save_pretrained / from_pretrained now handle this UNet.
    attach_quantizer(unet)
    logger.info("%s", report)
    if progress:
        print(report)
    return pipe


def quantize_unet(
    unet: nn.Module,
    config: PTQConfig,
    data: CalibrationSet,
    *,
    batch_size: int = 8,
    seed: int = 0,
    progress: bool = True,
) -> nn.Module:
    """Install quantized modules in `unet` and initialise their scales from a recorded CalibrationSet.

    `data` is used as given (`calibration.selector` applies to capture through a pipeline). With
    `group_search.enabled` the search regresses the float UNet's outputs on `data` (target 'float').
    """
    if is_quantized(unet):
        raise ValueError("the UNet is already quantized; load the float model again to re-quantize it")
    config.validate()
    group_map = build_group_map(
        config.activations.timestep_groups, data.num_train_timesteps, data.step_timesteps
    )
    plan = plan_quantization(unet, config)
    if config.group_search.enabled:
        resolve_target(config.group_search.target, None, None)
    job = _Quantization(unet, config, plan, group_map, data.step_timesteps, batch_size, seed, progress, None)
    try:
        job.finish(data)
    except BaseException:
        job.restore()
        raise
    unet.ptq_state.base_model = infer_base_model(unet)
    attach_quantizer(unet)
    return unet


def _check_selection(config: PTQConfig, calib: CalibrationConfig, unet: nn.Module, num_steps: int) -> None:
    """Selector settings that need the UNet or the schedule, checked before any model runs."""
    if calib.selector == "density_diversity":
        feature_module(unet, config.selection.feature_module)
    if calib.selector == "active":
        candidate_steps(num_steps, config.selection.active_exclude_noisiest)


class _Quantization:
    """Install, initialise and optionally group-search one UNet; `restore()` undoes all of it exactly.

    Installation waits for the first data: with active selection that is the first round, and the search's
    entropies then steer the later rounds (`feedback`).
    """

    def __init__(
        self,
        unet: nn.Module,
        config: PTQConfig,
        plan: QuantPlan,
        group_map: torch.Tensor,
        step_timesteps: torch.Tensor,
        batch_size: int,
        seed: int,
        progress: bool,
        targets: NoiseTargets | None,
    ) -> None:
        self.unet, self.config, self.plan, self.group_map = unet, config, plan, group_map
        self.step_timesteps, self.batch_size, self.seed, self.progress = (
            step_timesteps,
            batch_size,
            seed,
            progress,
        )
        self.targets: NoiseTargets | FloatTargets | None = targets
        self.patch = None
        self.search: GroupSearch | None = None
        self.had_state = "ptq_state" in unet.__dict__

    def install(self, data: CalibrationSet) -> None:
        data.check_finite()
        unet, config = self.unet, self.config
        context = TimestepContext(data.num_train_timesteps)
        device = next(unet.parameters()).device
        self.patch = install(unet, self.plan, config, context, self.group_map.to(device))
        initialise_weights(unet, self.progress)
        borrowed: dict[int, int] = {}
        if config.group_search.enabled:
            self.search = GroupSearch(
                unet,
                config.group_search,
                self.step_timesteps,
                data.num_train_timesteps,
                act_bits=config.activations.bits,
                batch_size=self.batch_size,
                seed=self.seed,
                progress=self.progress,
            )
            self.search.start(data)
            if self.targets is None:
                self.targets = FloatTargets(unet, self.batch_size)
        else:
            borrowed = initialise_activations(unet, data, self.batch_size, self.seed, self.progress)
        set_quant_state(unet, weights=True, acts=config.activations.enabled)
        unet.ptq_state = PTQState(
            config=copy.deepcopy(config),
            context=context,
            plan=self.plan,
            group_map=self.group_map,
            borrowed_groups=sorted(borrowed),
        )

    def feedback(self, data: CalibrationSet) -> torch.Tensor:
        """Active selection: learn from the data so far; return H(sigma_t) per sampling step."""
        if self.patch is None:
            self.install(data)
        else:
            data.check_finite()
        self.search.fit(data, self.targets, self.config.selection.active_search_epochs, decay=False)
        return self.search.step_entropy()

    def finish(self, data: CalibrationSet) -> None:
        if self.patch is None:
            self.install(data)
        if self.search is not None:
            self.search.fit(data, self.targets, self.config.group_search.epochs, decay=True)
            self.unet.ptq_state.group_search = self.search.finish(data)
            set_quant_state(self.unet, weights=True, acts=True)

    def restore(self) -> None:
        if self.search is not None:
            self.search.abort()
        if self.patch is not None:
            self.patch.restore()
        if not self.had_state:
            self.unet.__dict__.pop("ptq_state", None)


def _max_samples(
    calib: CalibrationConfig, n_prompts: int, step_timesteps: torch.Tensor, num_train: int
) -> int:
    """The largest num_samples `n_prompts` trajectories can provide with this sampler."""
    lo, hi = 1, calib.num_samples
    while lo < hi:
        mid = (lo + hi + 1) // 2
        trial = copy.deepcopy(calib)
        trial.num_samples = mid
        needed = recording_mask(trial, step_timesteps, num_train, torch.Generator().manual_seed(0)).shape[0]
        lo, hi = (mid, hi) if needed <= n_prompts else (lo, mid - 1)
    return lo
