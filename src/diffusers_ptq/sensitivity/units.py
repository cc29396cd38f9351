"""What sensitivity measures one at a time: single layers, attention matmuls, and named groups of them."""

from __future__ import annotations

from dataclasses import dataclass, field

from diffusers.models.attention_processor import Attention
from torch import nn

from diffusers_ptq.prepare import SPECIAL_PREFIXES, QuantPlan

TIME_PATH_PREFIXES = ("time_embedding.", "add_embedding.")
TIME_PATH_SUFFIX = ".time_emb_proj"


@dataclass
class Unit:
    """A set of quantized modules switched on together: `layers` (QuantConv2d/QuantLinear names) and
    `attentions` (Attention modules whose matmul operands are quantized)."""

    name: str
    kind: str  # "layer" | "attention" | "group"
    layers: list[str] = field(default_factory=list)
    attentions: list[str] = field(default_factory=list)

    @property
    def size(self) -> int:
        return len(self.layers) + len(self.attentions)


def layer_units(plan: QuantPlan, attentions: bool = True) -> list[Unit]:
    """One unit per planned layer (and, with `attentions`, one per attention block's matmuls)."""
    units = [Unit(layer.name, "layer", layers=[layer.name]) for layer in plan.layers]
    if attentions:
        units += [Unit(f"{a.name} (matmuls)", "attention", attentions=[a.name]) for a in plan.attentions]
    return units


def group_units(unet: nn.Module, plan: QuantPlan) -> list[Unit]:
    """Named groups: special layers, embeddings, attention, time path, each down/mid/up block, and all.

    Groups overlap (a block's attention is in both); each is measured on its own. Empty groups are left out.
    """
    layers = [layer.name for layer in plan.layers]
    special = {layer.name for layer in plan.layers if layer.special}
    attn_prefixes = tuple(f"{n}." for n, m in unet.named_modules() if isinstance(m, Attention))
    matmuls = [a.name for a in plan.attentions]

    def group(name: str, keep_layer, keep_attention) -> Unit:
        return Unit(
            name,
            "group",
            layers=[n for n in layers if keep_layer(n)],
            attentions=[n for n in matmuls if keep_attention(n)],
        )

    groups = [
        group("special layers", lambda n: n in special, lambda n: False),
        group("embeddings", lambda n: n.startswith(SPECIAL_PREFIXES), lambda n: False),
        group("attention", lambda n: n.startswith(attn_prefixes), lambda n: True),
        group(
            "time path",
            lambda n: n.startswith(TIME_PATH_PREFIXES) or n.endswith(TIME_PATH_SUFFIX),
            lambda n: False,
        ),
    ]
    for prefix in _block_prefixes(unet):
        groups.append(group(prefix.rstrip("."), _starts(prefix), _starts(prefix)))
    groups.append(group("all", lambda n: True, lambda n: True))
    return [g for g in groups if g.size]


def _starts(prefix: str):
    return lambda name: name.startswith(prefix)


def _block_prefixes(unet: nn.Module) -> list[str]:
    """'down_blocks.0.', ..., 'mid_block.', 'up_blocks.0.', ... in execution order."""
    down = [f"down_blocks.{i}." for i in range(len(getattr(unet, "down_blocks", None) or []))]
    mid = ["mid_block."] if getattr(unet, "mid_block", None) is not None else []
    up = [f"up_blocks.{i}." for i in range(len(getattr(unet, "up_blocks", None) or []))]
    return down + mid + up
