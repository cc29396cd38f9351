"""TFMQ-DM's temporal information block: the time embedding plus every ResNet block's time projection.

Its only input is the timestep, so it is reconstructed on the time features alone: the loss is
sum_k |e_k^q - e_k^fp|^p over the time features e_k = time_emb_proj_k(act(emb)) of every ResNet block.
The UNet adds class / added-condition embeddings (SDXL's text-time embedding) to the time embedding before
the ResNet blocks see it; that contribution is recorded from the quantized forward and added back, so the
block stays exact for UNet2DModel, SD 1.x/2.x and SDXL.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any

import torch
from diffusers.models.resnet import ResnetBlock2D
from torch import nn
from torch.utils.hooks import RemovableHandle

from diffusers_ptq.nn.layers import QuantLayerMixin
from diffusers_ptq.reconstruction.units import InputSink, OutputSink, StopForward, Unit

EMBEDDING = "time_embedding"


def _time_resnets(unet: nn.Module) -> list[str]:
    return [
        name
        for name, m in unet.named_modules()
        if isinstance(m, ResnetBlock2D) and isinstance(m.time_emb_proj, nn.Linear)
    ]


@dataclass(eq=False)
class TemporalUnit(Unit):
    """The time embedding MLP and the time projections of `resnets` (qualified names, module order)."""

    resnets: list[str] = field(default_factory=list)
    # Class / added embeddings are summed into the time embedding: record their sum from the forward.
    adds_embeddings: bool = False

    @classmethod
    def build(cls, unet: nn.Module, quant_layers: dict[str, QuantLayerMixin]) -> TemporalUnit | None:
        """The temporal block of `unet`, or None when none of its layers is quantized."""
        if not isinstance(getattr(unet, EMBEDDING, None), nn.Module):
            raise ValueError(
                f"reconstruction.temporal_block needs a UNet with a `{EMBEDDING}` module; "
                f"{type(unet).__name__} has none (set temporal_block=False)"
            )
        if getattr(unet.config, "class_embeddings_concat", False):
            raise ValueError(
                "reconstruction.temporal_block supports class embeddings that are added to the time "
                "embedding, not concatenated (class_embeddings_concat=True); set temporal_block=False"
            )
        resnets = _time_resnets(unet)
        projections = {f"{r}.time_emb_proj" for r in resnets}
        layers = [n for n in quant_layers if n.startswith(f"{EMBEDDING}.") or n in projections]
        if not layers or not resnets:
            return None
        acts = [
            f"{layer}.act_quantizers.{i}"
            for layer in layers
            for i in range(len(quant_layers[layer].act_quantizers))
        ]
        adds = any(getattr(unet, a, None) is not None for a in ("class_embedding", "add_embedding"))
        return cls(
            name="temporal_block",
            kind="temporal",
            layers=layers,
            act_quantizers=acts,
            inner_layers=[],
            order_offset=-0.5,
            resnets=resnets,
            adds_embeddings=adds,
        )

    def anchors(self, unet: nn.Module) -> list[nn.Module]:
        return [unet.get_submodule(r) for r in self.resnets]

    def modules(self, unet: nn.Module) -> list[nn.Module]:
        act = self._activation(unet)
        projections = [unet.get_submodule(f"{r}.time_emb_proj") for r in self.resnets]
        return [unet.get_submodule(EMBEDDING), *([act] if act is not None else []), *projections]

    @staticmethod
    def _activation(unet: nn.Module) -> nn.Module | None:
        act = getattr(unet, "time_embed_act", None)
        return act if isinstance(act, nn.Module) else None

    def capture_inputs(self, unet: nn.Module, sink: InputSink) -> list[RemovableHandle]:
        embedding = unet.get_submodule(EMBEDDING)
        act = self._activation(unet)
        state: dict[str, Any] = {}

        def finish(emb: torch.Tensor) -> None:
            sink((state["args"], state["kwargs"], emb - state["e0"]), {})
            raise StopForward

        def pre(module: nn.Module, args: tuple, kwargs: dict) -> None:
            state["args"], state["kwargs"] = args, kwargs
            if not self.adds_embeddings:
                sink((args, kwargs, None), {})
                raise StopForward

        def post(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            state["e0"] = output

        handles = [
            embedding.register_forward_pre_hook(pre, with_kwargs=True),
            embedding.register_forward_hook(post),
        ]
        if not self.adds_embeddings:
            return handles
        if act is not None:  # the summed embedding is the activation's input
            handles.append(act.register_forward_pre_hook(lambda m, args: finish(args[0])))
            return handles
        for r in self.resnets:  # otherwise the `temb` the first ResNet block receives
            resnet = unet.get_submodule(r)
            signature = inspect.signature(resnet.forward)

            def resnet_pre(module: nn.Module, args: tuple, kwargs: dict, signature=signature) -> None:
                finish(signature.bind(*args, **kwargs).arguments["temb"])

            handles.append(resnet.register_forward_pre_hook(resnet_pre, with_kwargs=True))
        return handles

    def capture_outputs(self, unet: nn.Module, sink: OutputSink, inner: bool) -> list[RemovableHandle]:
        store: dict[str, torch.Tensor] = {}
        handles = []
        for r in self.resnets:

            def hook(module: nn.Module, args: tuple, output: torch.Tensor, r: str = r) -> None:
                store[r] = output
                if len(store) == len(self.resnets):
                    sink([store[name] for name in self.resnets], {})
                    store.clear()
                    raise StopForward

            handles.append(unet.get_submodule(f"{r}.time_emb_proj").register_forward_hook(hook))
        return handles

    def run(
        self, unet: nn.Module, args: tuple, kwargs: dict, inner: bool = False
    ) -> tuple[list[torch.Tensor], dict[str, torch.Tensor]]:
        emb_args, emb_kwargs, added = args
        emb = unet.get_submodule(EMBEDDING)(*emb_args, **emb_kwargs)
        if added is not None:
            emb = emb + added
        act = self._activation(unet)
        if act is not None:
            emb = act(emb)
        outputs = []
        for r in self.resnets:
            resnet = unet.get_submodule(r)
            temb = emb if resnet.skip_time_act else resnet.nonlinearity(emb)
            outputs.append(resnet.time_emb_proj(temb))
        return outputs, {}
