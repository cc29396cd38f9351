"""Save side: the checkpoint tensors and manifest of a UNet quantized by diffusers-ptq.

Each quantized layer's float weight is replaced by the integer codes its weight quantizers produce (the
same `quantize` the fake-quant forward uses, so loading reproduces the quantized weight exactly); every
other tensor (quantizer scales, zero points, group tables, layers kept float) is stored as it is.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from diffusers_ptq.nn import QuantAttnProcessor
from diffusers_ptq.nn.layers import QuantLayerMixin
from diffusers_ptq.prepare import LayerPlan
from diffusers_ptq.primitives import quantize
from diffusers_ptq.quantizers import OutputCorrection, TimestepActQuantizer, TimestepBiasTable
from diffusers_ptq.serialization.layout import (
    PACKED_SUFFIX,
    SHARED_GROUP_MAP_KEY,
    AttentionRecord,
    CheckpointError,
    LayerRecord,
    Manifest,
    checksum,
)
from diffusers_ptq.serialization.packing import pack_codes

logger = logging.getLogger("diffusers_ptq")

# int16 holds any group index (PTQConfig allows at most 1000 groups) in a quarter of int64's bytes.
GROUP_MAP_DTYPE = torch.int16
# Modules with a `group_map` buffer that may be the model's shared one.
GROUP_MAP_HOLDERS = (TimestepActQuantizer, TimestepBiasTable, OutputCorrection)


def checkpoint_state_dict(
    model: nn.Module, state_dict: dict[str, torch.Tensor]
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors to write, safetensors header metadata) for `model`, whose `state_dict()` is `state_dict`."""
    ptq_state = getattr(model, "ptq_state", None)
    if ptq_state is None:
        raise CheckpointError(
            f"this {type(model).__name__} has no ptq_state: it was not quantized by diffusers-ptq"
        )
    plan = ptq_state.plan
    replaced: dict[str, tuple[str, torch.Tensor]] = {}
    layers = []
    for layer in plan.layers:
        module = _quant_layer(model, layer.name)
        key = f"{layer.name}.weight"
        if key not in state_dict:
            raise CheckpointError(f"the state dict has no {key!r} for the quantized layer {layer.name!r}")
        record, packed = _pack_layer(layer.name, layer, module, state_dict[key])
        layers.append(record)
        replaced[key] = (f"{layer.name}{PACKED_SUFFIX}", packed)
    attentions = [_attention_record(model, a.name, a.act_bits, a.softmax_bits) for a in plan.attentions]
    _warn_if_disabled(model)

    out: dict[str, torch.Tensor] = {}
    for key, tensor in state_dict.items():  # keep the model's order, so shards follow the module tree
        if key in replaced:
            new_key, packed = replaced[key]
            out[new_key] = packed
        else:
            out[key] = tensor
    _share_group_maps(model, out, ptq_state.group_map)
    manifest = Manifest(
        layers=layers,
        attentions=attentions,
        kept_float=[(str(n), str(r)) for n, r in plan.kept_float],
        checksums={key: checksum(tensor) for key, tensor in out.items()},
    )
    return out, manifest.to_metadata()


def _quant_layer(model: nn.Module, name: str) -> QuantLayerMixin:
    try:
        module = model.get_submodule(name)
    except AttributeError:
        module = None
    if not isinstance(module, QuantLayerMixin):
        raise CheckpointError(
            f"{name!r} is in the quantization plan but the model has a {type(module).__name__} there; "
            "was the layer replaced after quantization?"
        )
    return module


@torch.no_grad()
def _pack_layer(
    name: str, layer: LayerPlan, module: QuantLayerMixin, weight: torch.Tensor
) -> tuple[LayerRecord, torch.Tensor]:
    quantizers = list(module.weight_quantizers)
    grids = {(q.bits, q.qmin, q.qmax) for q in quantizers}
    if len(grids) != 1:
        raise CheckpointError(
            f"{name}: the weight quantizers of a split layer must share one grid, got {grids}"
        )
    bits, qmin, qmax = grids.pop()
    codes = []
    for q, part in zip(quantizers, module._weight_parts(weight)):
        # Exactly the forward's arithmetic (WeightQuantizer.forward), so the codes are the ones it uses.
        scale, zero_point = q.qparams(part)
        codes.append(quantize(part.float(), scale, zero_point, qmin, qmax))
    all_codes = codes[0] if len(codes) == 1 else torch.cat(codes, dim=1)
    try:
        packed = pack_codes(all_codes, bits, qmin)
    except ValueError as err:
        raise CheckpointError(f"{name}: cannot pack the weight codes ({err})") from err
    record = LayerRecord(
        name=name,
        kind=layer.kind,
        weight_bits=int(bits),
        act_bits=layer.act_bits,
        split=layer.split,
        special=bool(layer.special),
        shape=tuple(int(s) for s in weight.shape),
        dtype=str(weight.dtype).removeprefix("torch."),
        qmin=int(qmin),
        group_sizes=tuple(q.group_size for q in quantizers),
    )
    return record, packed


def _attention_record(
    model: nn.Module, name: str, act_bits: int, softmax_bits: int | None
) -> AttentionRecord:
    processor = getattr(model.get_submodule(name), "processor", None)
    if not isinstance(processor, QuantAttnProcessor):
        raise CheckpointError(
            f"attention {name!r} is in the quantization plan but its processor is a "
            f"{type(processor).__name__}; was set_attn_processor called after quantization?"
        )
    original = processor.__dict__.get("original_processor")
    original_name = type(original).__name__ if original is not None else "AttnProcessor2_0"
    return AttentionRecord(name, int(act_bits), softmax_bits, original_name)


def _share_group_maps(model: nn.Module, out: dict[str, torch.Tensor], shared: torch.Tensor) -> None:
    """Store one copy of the timestep -> group map every activation quantizer shares (in place).

    Bias tables and the output correction index the same map and share it the same way.
    """
    shared = shared.detach().cpu().long()
    dropped = False
    for name, module in model.named_modules():
        if not isinstance(module, GROUP_MAP_HOLDERS):
            continue
        key = f"{name}.group_map"
        if key not in out:
            continue
        own = out[key].detach()
        if own.shape == shared.shape and torch.equal(own.cpu().long(), shared):
            del out[key]
            dropped = True
        else:
            out[key] = own.to(GROUP_MAP_DTYPE)
    if dropped:
        out[SHARED_GROUP_MAP_KEY] = shared.to(GROUP_MAP_DTYPE)


def _warn_if_disabled(model: nn.Module) -> None:
    off = [
        name
        for name, m in model.named_modules()
        if isinstance(m, TimestepActQuantizer | QuantLayerMixin) and not _enabled(m)
    ]
    if off:
        logger.warning(
            "saving with fake quantization switched off in %d module(s) (e.g. %s); the checkpoint stores the "
            "quantized model, and loading switches quantization back on",
            len(off),
            off[0],
        )


def _enabled(module: nn.Module) -> bool:
    if isinstance(module, QuantLayerMixin):
        return all(q.enabled for q in module.weight_quantizers)
    return bool(module.enabled)
