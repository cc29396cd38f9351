"""The Hub model card of a diffusers-ptq checkpoint: metadata for the Hub's filters, and what a reader needs.

The YAML header (`ModelCardData`) carries `library_name: diffusers`, the tags (`diffusers-ptq`, the bit-width
tag such as `w4a8`, the method), and `base_model` with `base_model_relation: quantized` when the float model's
Hub id is known. The body gives the loading snippet, the full PTQConfig, the calibration details and any
quality metrics measured on the quantized model.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any

from huggingface_hub import ModelCard, ModelCardData
from torch import nn

from diffusers_ptq.report import mixed_precision_line
from diffusers_ptq.serialization.quant_config import PTQQuantizationConfig
from diffusers_ptq.serialization.quantizer import is_ptq_model

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_CACHE_PATH = re.compile(r"models--([^/\\]+)--([^/\\]+)[/\\]snapshots[/\\]")


def quantized_unet(pipe_or_unet: Any) -> nn.Module:
    """The diffusers-ptq UNet of a pipeline (or the UNet itself); raise a clear error otherwise."""
    if is_ptq_model(pipe_or_unet):
        return pipe_or_unet
    unet = getattr(pipe_or_unet, "unet", None)
    if unet is not None and is_ptq_model(unet):
        return unet
    raise ValueError(
        f"expected a pipeline or UNet quantized by diffusers-ptq, got a {type(pipe_or_unet).__name__} "
        "without one; run diffusers_ptq.quantize_pipeline(pipe, config, ...) first"
    )


def infer_base_model(*candidates: Any) -> str | None:
    """The Hub repo id a pipeline or model was loaded from, if any (`_name_or_path` or an HF cache path)."""
    for obj in candidates:
        config = getattr(obj, "config", None)
        name = getattr(config, "_name_or_path", None) if config is not None else None
        if not isinstance(name, str) or not name:
            continue
        cached = _CACHE_PATH.search(name)
        if cached:
            return f"{cached.group(1)}/{cached.group(2)}"
        # A relative local directory looks like "org/name" too; only a path that does not exist is an id.
        if _REPO_ID.match(name) and not os.path.exists(name):
            return name
    return None


def build_model_card(pipe_or_unet: Any, repo_id: str) -> ModelCard:
    """Model card for pushing `pipe_or_unet` (a pipeline or UNet quantized by diffusers-ptq) to `repo_id`."""
    unet = quantized_unet(pipe_or_unet)
    qconfig = PTQQuantizationConfig.from_model(unet)
    ptq = qconfig.ptq
    is_pipeline = pipe_or_unet is not unet
    tags = ["diffusers", "diffusers-ptq", "quantized", ptq.tag]
    if ptq.method != "custom":
        tags.append(ptq.method)
    data: dict[str, Any] = {"library_name": "diffusers", "tags": tags}
    if qconfig.base_model:
        data["base_model"] = qconfig.base_model
        data["base_model_relation"] = "quantized"
    if is_pipeline:
        conditioned = getattr(pipe_or_unet, "text_encoder", None) is not None
        data["pipeline_tag"] = "text-to-image" if conditioned else "unconditional-image-generation"
    card_data = ModelCardData(**data)
    body = _body(pipe_or_unet, unet, qconfig, repo_id, is_pipeline)
    return ModelCard(f"---\n{card_data.to_yaml()}\n---\n{body}")


def _body(obj: Any, unet: nn.Module, qconfig: PTQQuantizationConfig, repo_id: str, is_pipeline: bool) -> str:
    ptq = qconfig.ptq
    cls = type(obj).__name__
    what = "pipeline" if is_pipeline else "UNet"
    base = (
        f" of [`{qconfig.base_model}`](https://huggingface.co/{qconfig.base_model})"
        if qconfig.base_model
        else ""
    )
    variable = "pipe" if is_pipeline else "unet"
    lines = [
        f"# {repo_id.split('/')[-1]}",
        "",
        f"A {ptq.tag.upper()} post-training-quantized {cls} {what}{base}, made with "
        f"diffusers-ptq (method: `{ptq.method}`). "
        "Weights are stored as integers (int8, or two 4-bit codes per byte), with per-channel scales and "
        "timestep-aware activation scales; outputs match the calibrated model bit for bit on the same "
        "device.",
        "",
        "## Usage",
        "",
        "```python",
        "import diffusers_ptq  # registers the diffusers-ptq quantizer with diffusers; needed before loading",
        f"from diffusers import {cls}",
        "",
        f'{variable} = {cls}.from_pretrained("{repo_id}")',
        "```",
        "",
        "## Quantization",
        "",
    ]
    report = qconfig.report or {}
    granularity = ptq.weights.describe_scales()
    rows = [
        ("method", f"`{ptq.method}`"),
        ("weights", f"{ptq.weights.bits}-bit, {granularity}, {_grid(ptq.weights.symmetric)}"),
        ("activations", _activations(ptq)),
        ("timestep groups", str(qconfig.num_timestep_groups or 1)),
    ]
    if ptq.bias_correction != "off":
        rows.append(("bias correction", f"`{ptq.bias_correction}` (per timestep group)"))
    if report:
        rows.append(("layers by bits", ", ".join(f"{n} at {b}" for b, n in report["layers_by_bits"].items())))
        rows.append(("shortcut-split convs", str(report["shortcut_splits"])))
        rows.append(("attention blocks with quantized matmuls", str(report["attention_blocks"])))
        rows.append(("layers kept float", str(len(report["kept_float"]))))
        if report.get("mixed_precision"):
            line = mixed_precision_line(report["mixed_precision"]).strip()
            rows.append(("mixed precision", line.removeprefix("mixed precision ")))
    lines += _table(("", ""), rows)
    lines += ["", "## Calibration", ""]
    if report:
        groups = report["samples_per_group"]
        calib = [
            (
                "prompts",
                "none (unconditional)"
                if qconfig.calibration_prompts is None
                else str(qconfig.calibration_prompts),
            ),
            (
                "calibration samples",
                f"{report['calibration_samples']} ({report['calibration_rows']} UNet inputs)",
            ),
            ("scheduler", f"`{report['scheduler']}`, {report['num_inference_steps']} steps"),
            ("timestep sampler", f"`{ptq.calibration.sampler}`"),
            (
                "guidance scale",
                "pipeline default"
                if ptq.calibration.guidance_scale is None
                else str(ptq.calibration.guidance_scale),
            ),
            ("seed", str(ptq.calibration.seed)),
            (f"samples per timestep group ({len(groups)} groups)", ", ".join(map(str, groups))),
        ]
        if report.get("borrowed_groups"):
            calib.append(("groups without samples (scales borrowed)", str(report["borrowed_groups"])))
        lines += _table(("", ""), calib)
    else:
        lines.append("Weight-only quantization: no calibration data was used.")
    if qconfig.metrics:
        lines += [
            "",
            "## Quality",
            "",
            *_table(("metric", "value"), [(k, f"{v:g}") for k, v in qconfig.metrics.items()]),
        ]
    lines += [
        "",
        "## Full PTQConfig",
        "",
        "```json",
        json.dumps(ptq.to_dict(), indent=2),
        "```",
        "",
        f"Written by diffusers-ptq {qconfig.library_version} "
        f"(checkpoint format_version {qconfig.format_version}).",
        "",
    ]
    return "\n".join(lines)


def _grid(symmetric: bool) -> str:
    return "symmetric" if symmetric else "asymmetric"


def _activations(ptq: Any) -> str:
    acts = ptq.activations
    if acts.bits is None:
        return "float (weight-only)"
    text = f"{acts.bits}-bit per tensor, {_grid(acts.symmetric)}, {acts.scale_search} range search"
    if acts.quantize_attention:
        softmax = "float" if acts.softmax_bits >= 16 else f"{acts.softmax_bits}-bit"
        text += f"; attention q/k/v quantized, softmax {softmax}"
    return text


def _table(header: tuple[str, str], rows: list[tuple[str, str]]) -> list[str]:
    return [f"| {header[0]} | {header[1]} |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows)]
