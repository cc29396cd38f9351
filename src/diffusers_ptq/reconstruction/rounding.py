"""AdaRound on quantized layers: wrap a layer's weight quantizers, restore frozen roundings, bake the result.

While reconstruction runs, a layer's WeightQuantizer(s) are replaced by AdaRoundQuantizers that wrap them
(same grid); its float weight is kept, because later blocks' targets come from the float model. Baking
gives the layer a new on-grid float weight holding the learned codes (the float layer's weight is left as
it was) and puts the original quantizers back, so the
state dict has exactly the keys it had before and serialization stores plain integer codes.
"""

from __future__ import annotations

import torch
from torch import nn

from diffusers_ptq.nn.layers import QuantLayerMixin
from diffusers_ptq.primitives import quantize
from diffusers_ptq.quantizers.adaround import AdaRoundQuantizer


def adaround_quantizers(layer: QuantLayerMixin) -> list[AdaRoundQuantizer]:
    return [q for q in layer.weight_quantizers if isinstance(q, AdaRoundQuantizer)]


def wrap_layer(layer: QuantLayerMixin) -> list[AdaRoundQuantizer]:
    """Give every weight quantizer of `layer` learnable rounding (soft mode); returns the wrappers."""
    parts = layer._weight_parts(layer.weight)
    wrappers = []
    for i, (q, part) in enumerate(zip(layer.weight_quantizers, parts, strict=True)):
        if not isinstance(q, AdaRoundQuantizer):
            q = AdaRoundQuantizer(q, part)
            layer.weight_quantizers[i] = q
        wrappers.append(q)
    return wrappers


def restore_rounding(layer: QuantLayerMixin, masks: list[torch.Tensor]) -> None:
    """Install frozen AdaRound quantizers with the given round-up masks (resuming from a checkpoint)."""
    wrappers = wrap_layer(layer)
    if len(masks) != len(wrappers):
        raise ValueError(f"{len(masks)} rounding masks for a layer with {len(wrappers)} weight quantizers")
    for q, mask in zip(wrappers, masks):
        q.freeze(mask)


def unwrap_layer(layer: QuantLayerMixin) -> None:
    """Put the original weight quantizers back without changing the weight (undo)."""
    for i, q in enumerate(layer.weight_quantizers):
        if isinstance(q, AdaRoundQuantizer):
            layer.weight_quantizers[i] = q.base


@torch.no_grad()
def baked_weight(name: str, layer: QuantLayerMixin) -> torch.Tensor:
    """The on-grid weight whose round-to-nearest codes are the layer's AdaRound codes (not yet written).

    It is checked here: the plain quantizer must yield exactly the learned codes from it, so the fake-quant
    forward and the saved integer weights reproduce the reconstructed layer.
    """
    baked = []
    for q, part in zip(layer.weight_quantizers, layer._weight_parts(layer.weight), strict=True):
        if not isinstance(q, AdaRoundQuantizer):
            baked.append(part.clone())
            continue
        q.freeze()
        codes = q.codes(part)
        new = q.baked_weight(part)
        base = q.base
        scale, zero_point = base.qparams(new)
        if not torch.equal(quantize(new.float(), scale, zero_point, base.qmin, base.qmax), codes):
            raise RuntimeError(
                f"{name}: the baked weight does not reproduce the AdaRound codes in {part.dtype}; "
                "this is a bug in diffusers-ptq"
            )
        baked.append(new)
    return baked[0] if len(baked) == 1 else torch.cat(baked, dim=1)


@torch.no_grad()
def bake_layers(layers: list[tuple[str, QuantLayerMixin]]) -> None:
    """Give `layers` new weight Parameters holding their AdaRound codes and restore their plain quantizers.

    Every baked weight is computed (and checked) before any is set, so a failure changes nothing. The old
    Parameter is the float layer's own (`from_float` shares it) and is never written: rebinding the
    quantized layer to the old one undoes the bake, and the float model stays intact for a restore.
    """
    baked = [baked_weight(name, layer) for name, layer in layers]
    for (_, layer), weight in zip(layers, baked):
        old = layer.weight
        layer.weight = nn.Parameter(weight.to(old.device, old.dtype), requires_grad=old.requires_grad)
        unwrap_layer(layer)


def wrapped_layers(unet: nn.Module) -> list[tuple[str, QuantLayerMixin]]:
    return [
        (name, m)
        for name, m in unet.named_modules()
        if isinstance(m, QuantLayerMixin) and adaround_quantizers(m)
    ]
