"""`measure_sensitivity`: which layers (and groups of layers) of a UNet are most sensitive to quantization."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from diffusers_ptq.calibration import (
    CalibrationSet,
    SelectionRequest,
    get_pipeline_spec,
    select_calibration,
)
from diffusers_ptq.calibration.driver import CalibrationDriver, check_pipeline_kwargs, plan_unet_calls
from diffusers_ptq.calibration.pipelines import inference_steps
from diffusers_ptq.config import PTQConfig
from diffusers_ptq.prepare import is_quantized, plan_quantization
from diffusers_ptq.sensitivity.measure import (
    calibrated_probe,
    even_rows,
    measure_units,
    warn_if_bias_is_rms,
)
from diffusers_ptq.sensitivity.report import SensitivityReport, UnitSensitivity
from diffusers_ptq.sensitivity.units import group_units, layer_units


def measure_sensitivity(
    pipe_or_unet: Any,
    config: PTQConfig | None = None,
    *,
    data: CalibrationSet | None = None,
    prompts: list[str] | None = None,
    num_samples: int | None = None,
    num_inference_steps: int | None = None,
    guidance_scale: float | None = None,
    batch_size: int | None = None,
    pipeline_kwargs: dict[str, Any] | list[dict[str, Any]] | None = None,
    max_rows: int | None = None,
    layers: bool = True,
    groups: bool = True,
    metric: str = "mse",
    progress: bool = True,
) -> SensitivityReport:
    """Quantize one layer (or one group) at a time on top of the float UNet and measure its noise error.

    `config`'s plan and bits are used, with the scales its calibration would set (weights by their search,
    activations per timestep group from the float activations), all computed once from one calibration set:
    `data`, or one captured through the pipeline's own loop with `config.calibration` (keyword arguments
    override its fields, and `pipeline_kwargs` go to every call, as in `quantize_pipeline`; the steps are
    planned from what the pipeline really calls, e.g. the truncated schedule of img2img `strength`). Each
    unit's error against the float prediction is reported per sampling step as MSE, SQNR and bias (RMS over
    elements of the per-element mean error over the step's rows). `max_rows` spreads the measurement over
    that many rows evenly. The UNet is left float. Group search and reconstruction are not run: the ranking
    is of calibration-only quantization.
    """
    config = PTQConfig() if config is None else config
    if not isinstance(config, PTQConfig):
        raise TypeError(f"config must be a PTQConfig, got {type(config).__name__}")
    config.validate()
    if metric not in ("mse", "bias"):
        raise ValueError(f"metric={metric!r} is invalid; expected one of 'mse', 'bias'")
    if not (layers or groups):
        raise ValueError("layers=False and groups=False leave nothing to measure")
    if max_rows is not None and (isinstance(max_rows, bool) or not isinstance(max_rows, int) or max_rows < 1):
        raise ValueError(f"max_rows={max_rows!r} is invalid; expected an integer >= 1 or None")
    unet = pipe_or_unet if isinstance(pipe_or_unet, nn.Module) else getattr(pipe_or_unet, "unet", None)
    if not isinstance(unet, nn.Module):
        raise TypeError("pipe_or_unet must be a diffusers pipeline with a .unet or a UNet module")
    if is_quantized(unet):
        raise ValueError("the UNet is already quantized; sensitivity starts from the float model")
    plan = plan_quantization(unet, config)
    if not plan.layers and not plan.attentions:
        raise ValueError(
            "the layer selection matches no Conv2d/Linear layer of the UNet; check layers.include"
        )
    from diffusers_ptq.api import build_group_map  # lazy: the quantization job imports this package

    calib_batch = batch_size or config.calibration.batch_size
    if data is None:
        if isinstance(pipe_or_unet, nn.Module):
            raise ValueError("pass data=CalibrationSet(...) with a bare UNet, or pass the pipeline")
    elif pipeline_kwargs is not None:
        raise ValueError("pipeline_kwargs configure the calibration run; with data= there is none")
    if data is None:
        data = capture_for_sensitivity(
            pipe_or_unet,
            config,
            prompts,
            num_samples,
            num_inference_steps,
            guidance_scale,
            batch_size,
            progress,
            pipeline_kwargs=pipeline_kwargs,
        )
    group_map = build_group_map(
        config.activations.timestep_groups, data.num_train_timesteps, data.step_timesteps
    )
    units = (layer_units(plan) if layers else []) + (group_units(unet, plan) if groups else [])
    rows = even_rows(len(data), max_rows)
    if metric == "bias":
        warn_if_bias_is_rms(data, rows, "metric", "max_rows")
    with calibrated_probe(
        unet, plan, config, group_map, data, calib_batch, config.calibration.seed, progress
    ):
        errors = measure_units(
            unet,
            data,
            units,
            acts=config.activations.enabled,
            rows=rows,
            batch_size=calib_batch,
            progress=progress,
        )
    steps = errors[0].steps
    report = SensitivityReport(
        tag=config.tag,
        metric=metric,
        rows=len(rows),
        steps=steps,
        timesteps=[float(data.step_timesteps[s]) for s in steps],
    )
    for unit, err in zip(units, errors):
        report.units.append(
            UnitSensitivity(
                name=unit.name,
                kind=unit.kind,
                size=unit.size,
                mse=err.total_mse,
                sqnr_db=err.total_sqnr_db,
                bias=err.mean_bias,
                mse_per_step=err.mse.tolist(),
                sqnr_per_step=err.sqnr_db.tolist(),
                bias_per_step=err.bias.tolist(),
            )
        )
    return report


def capture_for_sensitivity(
    pipe: Any,
    config: PTQConfig,
    prompts: list[str] | None,
    num_samples: int | None,
    num_inference_steps: int | None,
    guidance_scale: float | None,
    batch_size: int | None,
    progress: bool,
    pipeline_kwargs: dict[str, Any] | list[dict[str, Any]] | None = None,
) -> CalibrationSet:
    """The calibration set `quantize_pipeline` would capture ('active' selection needs the group search)."""
    from diffusers_ptq.api import _calibration_config, _check_prompts, _seeded_generator

    spec = get_pipeline_spec(pipe)
    prompts = _check_prompts(prompts, spec.text_conditioned, spec.name)
    kwargs_list, per_trajectory = check_pipeline_kwargs(spec, pipeline_kwargs)
    calib = _calibration_config(
        config,
        num_samples=num_samples,
        num_inference_steps=num_inference_steps,
        guidance_scale=guidance_scale,
        batch_size=batch_size,
    )
    if calib.selector == "active":
        raise ValueError(
            "calibration.selector='active' needs the group search; measure sensitivity with 'random' or "
            "'density_diversity'"
        )
    steps = inference_steps(pipe, calib.num_inference_steps)
    driver = CalibrationDriver(
        spec,
        steps,
        calib.guidance_scale,
        prompts,
        kwargs_list,
        per_trajectory,
        batch_size=calib.batch_size,
    )
    # The steps the pipeline really calls (img2img strength, custom schedules), from one stub run.
    step_timesteps, _ = plan_unet_calls(pipe, driver, torch.Generator().manual_seed(calib.seed))
    request = SelectionRequest(
        pipe=pipe,
        spec=spec,
        calibration=calib,
        selection=config.selection,
        step_timesteps=step_timesteps,
        num_train_timesteps=int(pipe.scheduler.config.num_train_timesteps),
        num_inference_steps=steps,
        prompts=prompts,
        generator=_seeded_generator(None, calib.seed),
        progress=progress,
        driver=driver,
    )
    with torch.no_grad():
        return select_calibration(request, None).data
