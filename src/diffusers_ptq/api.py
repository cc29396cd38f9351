"""`quantize_pipeline`: validate, plan, capture through the pipeline, install, initialise scales."""

from __future__ import annotations

import copy
import dataclasses
import logging
import os
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from diffusers_ptq import distributed as ranks
from diffusers_ptq.calibration import (
    CalibrationSet,
    SelectionRequest,
    get_pipeline_spec,
    select_calibration,
)
from diffusers_ptq.calibration.active import candidate_steps
from diffusers_ptq.calibration.driver import CalibrationDriver, check_pipeline_kwargs, plan_unet_calls
from diffusers_ptq.calibration.features import feature_module
from diffusers_ptq.calibration.pipelines import inference_steps
from diffusers_ptq.config import CalibrationConfig, PTQConfig
from diffusers_ptq.job import QuantizationJob
from diffusers_ptq.offload import onloaded
from diffusers_ptq.prepare import is_quantized, plan_quantization
from diffusers_ptq.quantizers import contiguous_group_map, nearest_step_group_map
from diffusers_ptq.reconstruction.sampling import SamplingCheck
from diffusers_ptq.reconstruction.spill import check_cache_dir
from diffusers_ptq.report import QuantizationReport
from diffusers_ptq.search import NoiseTargets, resolve_target, sample_clean_images
from diffusers_ptq.sensitivity.mixed import check_budget
from diffusers_ptq.serialization import attach_quantizer
from diffusers_ptq.serialization.model_card import infer_base_model

logger = logging.getLogger("diffusers_ptq")


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


def _check_calibration_fn(fn: Any, prompts: Any, pipeline_kwargs: Any) -> None:
    if not callable(fn):
        raise TypeError(f"calibration_fn must be a callable taking the pipeline, got {type(fn).__name__}")
    for name, value in (("prompts", prompts), ("pipeline_kwargs", pipeline_kwargs)):
        if value is not None:
            raise ValueError(
                f"{name} is for the calls quantize_pipeline makes; calibration_fn runs the pipeline itself, "
                f"so pass {name} in its own pipe(...) calls"
            )


def _seeded_generator(generator: torch.Generator | int | None, seed: int) -> torch.Generator:
    if isinstance(generator, torch.Generator):
        return generator
    return torch.Generator().manual_seed(seed if generator is None else int(generator))


# distributed hook: a failure on one rank before the first exchange (checks, planning) reaches every rank too.
@ranks.collective("quantize_pipeline")
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
    pipeline_kwargs: dict[str, Any] | list[dict[str, Any]] | None = None,
    calibration_fn: Callable[[Any], Any] | None = None,
    reconstruction_checkpoint: str | os.PathLike[str] | None = None,
    progress: bool = True,
    distributed: bool = False,
) -> Any:
    """Quantize `pipe.unet` in place with timestep-aware fake quantization and return `pipe`.

    `pipe` is any diffusers pipeline whose `unet` is a UNet2DModel or UNet2DConditionModel. Calibration
    runs `pipe(...)` itself (its scheduler, steps, guidance and conditioning; prompts cycled with fresh noise
    when there are fewer than trajectories; `pipeline_kwargs` added to every call, or a list of them cycled
    one trajectory per call), or `calibration_fn(pipe)` if given, and records the
    UNet inputs `config.calibration.selector` chooses (by default: the steps `calibration.sampler` picks);
    with `group_search.enabled` the timestep -> group maps are then searched (APQ-DM), and with
    `reconstruction.enabled` the blocks are reconstructed on the same samples (BRECQ / EDA-DM FBR / TFMQ-DM;
    with `reconstruction_checkpoint` a directory where finished blocks are saved, so an interrupted run
    resumes there). Keyword arguments override the matching `config.calibration` fields. Everything is
    validated before any model runs; if anything fails later, the UNet is restored to exactly what it was.
    Under an initialised torch.distributed group, call it the same way on every rank: capture, activation
    statistics, GPTQ's Hessians and reconstruction are split among the ranks and every rank ends with the
    same UNet (README, "Many GPUs, big models"). `distributed=True` first initialises the default group
    from torchrun / accelerate launch's environment when none exists (NCCL with CUDA, else Gloo).
    """
    if distributed:
        ranks.init_from_environment()
    config = PTQConfig() if config is None else config
    if not isinstance(config, PTQConfig):
        raise TypeError(f"config must be a PTQConfig, got {type(config).__name__}")
    config.validate()
    spec = get_pipeline_spec(pipe)
    unet = pipe.unet
    if is_quantized(unet):
        raise ValueError("pipe.unet is already quantized; load the float model again to re-quantize it")
    if calibration_fn is not None:
        _check_calibration_fn(calibration_fn, prompts, pipeline_kwargs)
    else:
        prompts = _check_prompts(prompts, spec.text_conditioned, spec.name)
    kwargs_list, per_trajectory = check_pipeline_kwargs(spec, pipeline_kwargs)
    calib = _calibration_config(
        config,
        num_samples=num_samples,
        num_inference_steps=num_inference_steps,
        guidance_scale=guidance_scale,
        batch_size=batch_size,
    )
    steps = inference_steps(pipe, calib.num_inference_steps)
    num_train = int(pipe.scheduler.config.num_train_timesteps)
    # --- distributed hook: with a process group, every rank makes the same call; only rank 0 reports.
    on_ranks = ranks.is_initialized()
    if on_ranks:
        ranks.check_same(
            "the quantize_pipeline call (config, pipeline, prompts, arguments, UNet weights)",
            [
                config.to_dict(),
                dataclasses.asdict(calib),
                spec.name,
                type(unet).__name__,
                prompts,
                pipeline_kwargs,
                None if isinstance(generator, torch.Generator) else generator,
                ranks.module_checksum(unet),
            ],
        )
        progress = progress and ranks.is_main_process()
    plan = plan_quantization(unet, config)
    check_budget(unet, plan, config)
    if not plan.layers and not plan.attentions:
        raise ValueError(
            "the layer selection matches no Conv2d/Linear layer of the UNet; check layers.include"
        )
    _check_checkpoint_dir(config, reconstruction_checkpoint)
    driver = CalibrationDriver(
        spec,
        steps,
        calib.guidance_scale,
        prompts,
        kwargs_list,
        per_trajectory,
        calibration_fn,
        calib.batch_size,
    )
    # The plan: one run with a zero stub for the UNet (its own errors, e.g. a missing control image, surface
    # here, before anything is installed).
    step_timesteps, rows = plan_unet_calls(pipe, driver, torch.Generator().manual_seed(calib.seed))
    if calibration_fn is not None:
        if len(set(rows)) != 1:
            raise ValueError(
                f"calibration_fn called the UNet with batches of {sorted(set(rows))} rows; calibration needs "
                "the same batch in every call"
            )
        driver.fn_rows, steps = rows[0], len(step_timesteps)
    group_map = build_group_map(config.activations.timestep_groups, num_train, step_timesteps)
    _check_selection(config, calib, unet, len(step_timesteps))
    search = config.group_search
    target = resolve_target(search.target, spec, pipe.scheduler) if search.enabled else None

    start = time.perf_counter()
    targets = None
    target_seconds = 0.0
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
        target_seconds = time.perf_counter() - start
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
        driver=driver,
        distributed=on_ranks,
    )
    job = QuantizationJob(
        unet,
        config,
        plan,
        group_map,
        step_timesteps,
        calib.batch_size,
        calib.seed,
        progress,
        targets,
        reconstruction_checkpoint,
    )
    job.search_seconds = target_seconds  # the search's clean target images count as search time
    samples = config.reconstruction.sampling_check if config.reconstruction.enabled else 0
    if samples and calibration_fn is None:
        # A generator of its own (calibration draws from seed, the search's clean images from seed + 1).
        job.sampling_check = SamplingCheck(pipe, driver, samples, calib.seed + 2, progress)
    # Everything that changes the UNet, up to the quantizer attachment, is undone if any of it fails; a UNet
    # under sequential CPU offload is held on its execution device meanwhile and offloaded again after.
    # distributed hook: inside guarded(), so a failure on any rank restores every rank's UNet.
    with onloaded(unet), job.guarded(), ranks.guard("quantize_pipeline"):
        selection = select_calibration(request, job.feedback if search.enabled else None)
        data = selection.data
        job.finish(data)
        report = QuantizationReport.build(
            job.plan,  # with layers.mixed_precision, the plan its sensitivity pass promoted layers in
            method=config.method,
            tag=config.tag,
            calibration_samples=calib.num_samples,
            calibration_rows=len(data),
            samples_per_group=data.samples_per_group(group_map),
            num_inference_steps=steps,
            scheduler=type(pipe.scheduler).__name__,
            borrowed_groups=unet.ptq_state.borrowed_groups,
            seconds=time.perf_counter() - start,
            gptq=unet.ptq_state.gptq,
            mixed_precision=job.mixed_precision,
            distinct_prompts=None if prompts is None else len(set(prompts)),
            pipeline=spec.name,
            distributed=_rank_summary(request) if on_ranks else None,
        )
        # distributed hook: rank 0's parameters and buffers everywhere (reduction order may differ).
        ranks.broadcast_module(unet)
        unet.ptq_state.report = report
        unet.ptq_state.selection = selection.info
        # The stored recipe is the one that ran: keyword overrides and the pipeline's default step count.
        unet.ptq_state.config.calibration = dataclasses.replace(calib, num_inference_steps=steps)
        unet.ptq_state.base_model = infer_base_model(pipe, unet)
        unet.ptq_state.num_prompts = None if prompts is None else len(set(prompts))
        # quantization_config + hf_quantizer: stock save_pretrained / from_pretrained now handle this UNet.
        attach_quantizer(unet)
    if ranks.is_main_process():
        logger.info("%s", report)
    if progress:
        print(report)
    return pipe


def _rank_summary(request: SelectionRequest) -> dict[str, Any]:
    """World size and what each rank captured, for the report."""
    counts = request.rank_counts
    return {
        "world_size": ranks.world_size(),
        "trajectories_per_rank": counts.get("trajectories", []),
        "samples_per_rank": counts.get("samples", []),
    }


def quantize_unet(
    unet: nn.Module,
    config: PTQConfig,
    data: CalibrationSet,
    *,
    batch_size: int = 8,
    seed: int = 0,
    reconstruction_checkpoint: str | os.PathLike[str] | None = None,
    progress: bool = True,
) -> nn.Module:
    """Install quantized modules in `unet` and initialise their scales from a recorded CalibrationSet.

    `data` is used as given (`calibration.selector` applies to capture through a pipeline). With
    `group_search.enabled` the search regresses the float UNet's outputs on `data` (target 'float');
    with `reconstruction.enabled` the blocks are then reconstructed on `data`.
    """
    if is_quantized(unet):
        raise ValueError("the UNet is already quantized; load the float model again to re-quantize it")
    config.validate()
    group_map = build_group_map(
        config.activations.timestep_groups, data.num_train_timesteps, data.step_timesteps
    )
    plan = plan_quantization(unet, config)
    check_budget(unet, plan, config)
    if config.group_search.enabled:
        resolve_target(config.group_search.target, None, None)
    _check_checkpoint_dir(config, reconstruction_checkpoint)
    job = QuantizationJob(
        unet,
        config,
        plan,
        group_map,
        data.step_timesteps,
        batch_size,
        seed,
        progress,
        None,
        reconstruction_checkpoint,
    )
    with onloaded(unet), job.guarded():
        job.finish(data)
        unet.ptq_state.base_model = infer_base_model(unet)
        attach_quantizer(unet)
    return unet


def _check_checkpoint_dir(config: PTQConfig, path: str | os.PathLike[str] | None) -> None:
    """The reconstruction's directories: the resume checkpoint and, when caches may spill, `cache_dir`."""
    recon = config.reconstruction
    if recon.enabled and recon.cache_max_gb is not None:  # before any model runs, not hours in
        check_cache_dir(recon.cache_dir)
    if path is None:
        return
    if not config.reconstruction.enabled:
        raise ValueError(
            "reconstruction_checkpoint is given but reconstruction.enabled is False; enable reconstruction "
            "or drop the checkpoint directory"
        )
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"reconstruction_checkpoint={os.fspath(path)!r} exists and is not a directory")


def _check_selection(config: PTQConfig, calib: CalibrationConfig, unet: nn.Module, num_steps: int) -> None:
    """Selector settings that need the UNet or the schedule, checked before any model runs."""
    if calib.selector == "density_diversity":
        feature_module(unet, config.selection.feature_module)
    if calib.selector == "active":
        candidate_steps(num_steps, config.selection.active_exclude_noisiest)
