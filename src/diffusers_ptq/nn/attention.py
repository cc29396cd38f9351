"""Attention processor that fake-quantizes the operands of both attention matmuls.

q, k and v are quantized after the projections (and any q/k norms), the softmax output with its own
unsigned quantizer. With the softmax at 16 bits or more it is left float and the fused SDPA kernel runs on
the quantized q, k, v. The projections themselves are QuantLinear layers, quantized like any other layer.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention, AttnProcessor, AttnProcessor2_0
from torch import nn

from diffusers_ptq.quantizers import TimestepActQuantizer

SUPPORTED_PROCESSORS = (AttnProcessor, AttnProcessor2_0)
SOFTMAX_FLOAT_BITS = 16


class QuantAttnProcessor(nn.Module):
    """Drop-in replacement for diffusers' `AttnProcessor2_0` with q/k/v/softmax quantizers."""

    def __init__(
        self,
        q: TimestepActQuantizer,
        k: TimestepActQuantizer,
        v: TimestepActQuantizer,
        softmax: TimestepActQuantizer | None,
        original: object | None = None,
    ) -> None:
        super().__init__()
        self.q_quantizer, self.k_quantizer, self.v_quantizer = q, k, v
        self.softmax_quantizer = softmax
        # Kept outside the module tree so that removal restores exactly what was there.
        self.__dict__["original_processor"] = original
        # AttnProcessor2_0 lets SDPA use 1/sqrt(head_dim) and ignores `attn.scale`; the classic one uses it.
        self.use_attn_scale = type(original) is AttnProcessor

    def quantizers(self) -> list[TimestepActQuantizer]:
        qs = [self.q_quantizer, self.k_quantizer, self.v_quantizer]
        return qs if self.softmax_quantizer is None else [*qs, self.softmax_quantizer]

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        *args: object,
        **kwargs: object,
    ) -> torch.Tensor:
        # An explicit signature: diffusers filters the kwargs it passes (e.g. `temb`) by this signature.
        return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, temb)

    def set_quant_state(self, weights: bool, acts: bool) -> None:
        for q in self.quantizers():
            q.enabled = acts

    def forward(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
    ) -> torch.Tensor:
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channel, height * width).transpose(1, 2)
        batch, seq_len, _ = (
            hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape
        )
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, seq_len, batch)
            attention_mask = attention_mask.view(batch, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)

        head_dim = key.shape[-1] // attn.heads
        query = query.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        query, key, value = self.q_quantizer(query), self.k_quantizer(key), self.v_quantizer(value)
        scale = attn.scale if self.use_attn_scale else head_dim**-0.5

        if self.softmax_quantizer is None:
            hidden_states = F.scaled_dot_product_attention(
                query, key, value, attn_mask=attention_mask, dropout_p=0.0, is_causal=False, scale=scale
            )
        else:
            scores = torch.matmul(query.float(), key.float().transpose(-1, -2)) * scale
            if attention_mask is not None:
                if attention_mask.dtype == torch.bool:
                    scores = scores.masked_fill(~attention_mask, float("-inf"))
                else:
                    scores = scores + attention_mask.float()
            probs = self.softmax_quantizer(scores.softmax(dim=-1))
            hidden_states = torch.matmul(probs, value.float()).to(query.dtype)

        hidden_states = (
            hidden_states.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim).to(query.dtype)
        )
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor
