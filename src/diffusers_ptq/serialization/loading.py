"""Load side: rebuild the quantized modules from the stored plan, then convert checkpoint tensors.

diffusers' `from_pretrained` drives this through `PTQQuantizer`'s hooks, in this order:
1. `read_manifest` reads the plan and checksums from the safetensors header (no tensor is read);
2. `rebuild_modules` checks the empty (meta) UNet against the plan and installs the quantized modules, so
   the model's state dict has exactly the checkpoint's keys — no calibration runs;
3. `CheckpointReader.convert` (`reader.py`), for each shard, verifies every tensor's CRC-32, turns packed
   codes back into the quantized float weight (bit-exact: `(code - zero_point) * scale`, the forward's
   own arithmetic) and expands the shared timestep -> group map; a layer whose scales sit in a later
   shard waits for them;
4. `CheckpointReader.finish` checks nothing is missing and restores every quantizer buffer exactly (diffusers
   casts floating tensors to `torch_dtype`; the scales must stay as calibrated), then `PTQState` is rebuilt.
"""

from __future__ import annotations

import os
import warnings
from typing import Any

import torch
from diffusers.models.attention_processor import Attention, AttnProcessor, AttnProcessor2_0
from safetensors import safe_open
from torch import nn

from diffusers_ptq.config import PTQConfig
from diffusers_ptq.initialise import initialise_weights, set_quant_state
from diffusers_ptq.job import PTQState
from diffusers_ptq.prepare import AttentionPlan, LayerPlan, QuantPlan, install, plan_quantization
from diffusers_ptq.quantizers import (
    TimestepActQuantizer,
    WeightQuantizer,
    contiguous_group_map,
)
from diffusers_ptq.report import QuantizationReport
from diffusers_ptq.serialization.layout import (
    PACKED_SUFFIX,
    SHARED_GROUP_MAP_KEY,
    CheckpointError,
    LayerRecord,
    Manifest,
)
from diffusers_ptq.serialization.quant_config import PTQQuantizationConfig
from diffusers_ptq.timestep import TimestepContext

DEFAULT_TRAIN_TIMESTEPS = 1000
_PROCESSORS = {"AttnProcessor": AttnProcessor, "AttnProcessor2_0": AttnProcessor2_0}
_KINDS = {"conv": nn.Conv2d, "linear": nn.Linear}


def read_manifest(checkpoint_files: list[Any]) -> Manifest:
    """The manifest in the header of the first checkpoint file (every shard carries the same one)."""
    files = [os.fspath(f) for f in checkpoint_files if isinstance(f, str | os.PathLike)]
    if not files:
        raise CheckpointError("diffusers-ptq checkpoints are loaded from files; no checkpoint file was given")
    for path in files:
        if not path.endswith(".safetensors"):
            raise CheckpointError(
                f"{os.path.basename(path)} is not a safetensors file: diffusers-ptq checkpoints are "
                "safetensors only and never read pickle files"
            )
    try:
        with safe_open(files[0], framework="pt") as f:
            metadata = f.metadata()
    except Exception as err:  # safetensors raises its own error type for every malformed header
        raise CheckpointError(
            f"cannot read the safetensors header of {files[0]}: {err}. The file is truncated or corrupted; "
            "download or save it again"
        ) from err
    return Manifest.from_metadata(metadata, os.path.basename(files[0]))


def map_loaded_keys(keys: list[str]) -> list[str]:
    """Checkpoint keys -> the model keys they load into (packed codes fill the float weight)."""
    out = []
    for key in keys:
        if key == SHARED_GROUP_MAP_KEY:
            continue
        out.append(key[: -len(PACKED_SUFFIX)] + ".weight" if key.endswith(PACKED_SUFFIX) else key)
    return out


def rebuild_modules(
    model: nn.Module, manifest: Manifest, qconfig: PTQQuantizationConfig
) -> tuple[QuantPlan, TimestepContext]:
    """Check `model` against the stored plan, then install its quantized modules (scales load later)."""
    for record in manifest.layers:
        _check_layer(model, record)
    for att in manifest.attentions:
        module = _submodule(model, att.name)
        if not isinstance(module, Attention):
            raise CheckpointError(
                f"the checkpoint quantizes the attention block {att.name!r}, which this "
                f"{type(model).__name__} does not have (found {type(module).__name__}): the checkpoint was "
                "saved from a UNet of another architecture"
            )
        if att.processor not in _PROCESSORS:
            raise CheckpointError(f"attention {att.name!r}: unknown float processor {att.processor!r}")
        if type(module.processor) is not _PROCESSORS[att.processor]:
            module.set_processor(_PROCESSORS[att.processor]())
    plan = QuantPlan(
        layers=[
            LayerPlan(r.name, r.kind, r.weight_bits, r.act_bits, r.split, r.special) for r in manifest.layers
        ],
        attentions=[AttentionPlan(a.name, a.act_bits, a.softmax_bits) for a in manifest.attentions],
        kept_float=list(manifest.kept_float),
    )
    num_train = qconfig.num_train_timesteps or DEFAULT_TRAIN_TIMESTEPS
    num_groups = qconfig.num_timestep_groups or 1
    if num_groups > num_train:
        raise CheckpointError(
            f"quantization_config.num_timestep_groups={num_groups} exceeds num_train_timesteps={num_train}"
        )
    context = TimestepContext(num_train)
    # A placeholder with the right number of groups; the stored map replaces it while loading.
    install(model, plan, qconfig.ptq, context, contiguous_group_map(num_train, num_groups))
    for record in manifest.layers:
        _set_group_sizes(model.get_submodule(record.name), record, qconfig.ptq.weights.group_size)
        quantizer = model.get_submodule(record.name).weight_quantizers[0]
        if quantizer.qmin != record.qmin:
            raise CheckpointError(
                f"layer {record.name!r}: its weight codes start at {record.qmin}, but the stored recipe's "
                f"grid starts at {quantizer.qmin} (weights.symmetric disagrees with the weights)"
            )
    return plan, context


def _set_group_sizes(module: nn.Module, record: LayerRecord, configured: int) -> None:
    """Give each weight quantizer the group size it was saved with (the stored recipe's rule can change)."""
    quantizers = list(module.weight_quantizers)
    sizes = record.group_sizes
    if sizes is None:  # written when a layer's groups were the configured size or none
        sizes = tuple(configured if q.group_size == configured else None for q in quantizers)
    if len(sizes) != len(quantizers):
        raise CheckpointError(
            f"layer {record.name!r}: the checkpoint has {len(sizes)} group sizes for {len(quantizers)} "
            "weight quantizers"
        )
    for q, part, size in zip(quantizers, module._weight_parts(module.weight), sizes):
        if q.group_size != size:
            try:
                q.set_group_size(size, part[0].numel())
            except ValueError as err:
                raise CheckpointError(f"layer {record.name!r}: {err}") from None


def _submodule(model: nn.Module, name: str) -> nn.Module | None:
    try:
        return model.get_submodule(name)
    except AttributeError:
        return None


def _check_layer(model: nn.Module, record: LayerRecord) -> None:
    module = _submodule(model, record.name)
    expected = _KINDS.get(record.kind)
    if expected is None:
        raise CheckpointError(f"layer {record.name!r}: unknown layer kind {record.kind!r}")
    where = f"this {type(model).__name__}"
    if module is None or type(module) is not expected:
        found = "nothing" if module is None else f"a {type(module).__name__}"
        raise CheckpointError(
            f"the checkpoint quantizes {expected.__name__} {record.name!r} (weight {list(record.shape)}), "
            f"but {where} has {found} there: the checkpoint was saved from a UNet of another architecture"
        )
    if tuple(module.weight.shape) != record.shape:
        raise CheckpointError(
            f"layer {record.name!r}: the checkpoint's weight has shape {list(record.shape)}, {where} has "
            f"{list(module.weight.shape)}: the checkpoint was saved from a UNet of another architecture"
        )


def finalize(
    model: nn.Module,
    qconfig: PTQQuantizationConfig,
    plan: QuantPlan,
    context: TimestepContext,
    group_map: torch.Tensor | None,
) -> None:
    """Switch quantization on and give the loaded model the `ptq_state` quantize_pipeline would have."""
    ptq = qconfig.ptq
    for module in model.modules():
        if isinstance(module, WeightQuantizer):
            module.calibrated = True
    set_quant_state(model, weights=True, acts=ptq.activations.enabled)
    if group_map is None:
        act = next((m for m in model.modules() if isinstance(m, TimestepActQuantizer)), None)
        group_map = act.group_map if act is not None else contiguous_group_map(context.num_train_timesteps, 1)
    report = None
    if qconfig.report is not None:
        try:
            data = dict(qconfig.report)
            data["kept_float"] = [tuple(item) for item in data.get("kept_float", [])]
            report = QuantizationReport(**data)
        except TypeError as err:
            raise CheckpointError(f"quantization_config.report is malformed: {err}") from err
    model.ptq_state = PTQState(
        config=ptq,
        context=context,
        plan=plan,
        group_map=group_map.detach().cpu(),
        report=report,
        borrowed_groups=list(report.borrowed_groups) if report is not None else [],
        metrics=dict(qconfig.metrics),
        base_model=qconfig.base_model,
        num_prompts=qconfig.calibration_prompts,
    )


def data_free_recipe(ptq: PTQConfig) -> tuple[PTQConfig, list[str]]:
    """`ptq` without the parts that need calibration data, and what was dropped (for one warning).

    Second-order rounding solves against the layers' inputs, bias correction is estimated on calibration
    outputs and mixed precision ranks layers on them; while loading there is no data, so they fall back to
    nearest rounding, no correction and no promoted layers.
    """
    dropped = []
    overrides: dict[str, Any] = {}
    if ptq.weights.rounding != "nearest":
        dropped.append(f"weights.rounding={ptq.weights.rounding!r} -> 'nearest'")
        overrides["weights"] = {"rounding": "nearest"}
    if ptq.bias_correction != "off":
        dropped.append(f"bias_correction={ptq.bias_correction!r} -> 'off'")
        overrides["bias_correction"] = "off"
    if ptq.layers.mixed_precision.enabled:
        dropped.append(f"layers.mixed_precision.mode={ptq.layers.mixed_precision.mode!r} -> 'off'")
        overrides["layers"] = {"mixed_precision": {"mode": "off"}}
    return (ptq.replace(**overrides) if overrides else ptq), dropped


def quantize_weights_on_load(model: nn.Module, qconfig: PTQQuantizationConfig) -> None:
    """Weight-only quantization of a just-loaded float UNet (weights need no calibration data).

    The recipe's data-dependent parts are replaced by their data-free forms with one warning, and the
    model's `quantization_config` records the recipe that was applied.
    """
    if qconfig.ptq.activations.enabled:
        raise ValueError(
            "activation quantization needs calibration data: load a checkpoint saved after "
            "quantize_pipeline, or pass a weight-only recipe (act_bits=None) to quantize while loading"
        )
    ptq, dropped = data_free_recipe(qconfig.ptq)
    if dropped:
        warnings.warn(
            "quantizing while loading has no calibration data, so the recipe's data-dependent parts are "
            f"not applied: {'; '.join(dropped)}. Quantize with quantize_pipeline and load the saved "
            "checkpoint for the full recipe.",
            UserWarning,
            stacklevel=2,
        )
        # The loaded model's quantization_config is this object: it must name the recipe applied.
        qconfig.ptq_config = ptq.to_dict()
    plan = plan_quantization(model, ptq)
    if not plan.layers:
        raise ValueError(
            "the layer selection matches no Conv2d/Linear layer of the UNet; check layers.include"
        )
    context = TimestepContext(qconfig.num_train_timesteps or DEFAULT_TRAIN_TIMESTEPS)
    device = next(model.parameters()).device
    group_map = contiguous_group_map(context.num_train_timesteps, 1)
    patch = install(model, plan, ptq, context, group_map.to(device))
    try:
        initialise_weights(model, progress=False)
    except BaseException:
        patch.restore()
        raise
    finalize(model, qconfig, plan, context, group_map)
