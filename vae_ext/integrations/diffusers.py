"""diffusers: an attention processor that runs diffusers' `Attention` on vae_ext's kernels.

    from vae_ext.integrations.diffusers import FusedAttnProcessor
    vae = diffusers.AutoencoderKL(...)            # or UNet2DConditionModel, ...
    vae.set_attn_processor(FusedAttnProcessor())

It computes what diffusers' default processor (AttnProcessor2_0) computes: self and
cross attention, group_norm, spatial_norm, norm_cross, norm_q / norm_k, the attention
mask diffusers prepares (an additive bias repeated over heads), the output projection
and dropout, the residual connection and rescale_output_factor, with
softmax(q kᵀ · attn.scale) through vae_ext.scaled_dot_product_attention.
"""

from __future__ import annotations

import torch

from vae_ext.integrations import _require
from vae_ext.sdpa import scaled_dot_product_attention

_require("diffusers", "diffusers")

__all__ = ["FusedAttnProcessor"]


class FusedAttnProcessor:
    """Attention processor for `diffusers.models.attention_processor.Attention` on vae_ext's fused kernels.

    Use with ``model.set_attn_processor(FusedAttnProcessor())``. The scale is the module's
    ``attn.scale`` (1/sqrt(head dim) unless the module was built with ``scale_qk=False``);
    diffusers' AttnProcessor2_0 uses SDPA's default, the same value when ``scale_qk=True``.
    """

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None, *args,
                 **kwargs) -> torch.Tensor:
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)

        input_ndim = hidden_states.ndim
        if input_ndim == 4:  # (B, C, H, W) feature maps attend over the H·W positions
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)

        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        batch_size, key_len, _ = context.shape
        if attention_mask is not None:
            # diffusers' (B·heads, 1 or Sq, Sk) additive bias, viewed as (B, heads, 1 or Sq, Sk).
            attention_mask = attn.prepare_attention_mask(attention_mask, key_len, batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])

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
        query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        if getattr(attn, "norm_q", None) is not None:
            query = attn.norm_q(query)
        if getattr(attn, "norm_k", None) is not None:
            key = attn.norm_k(key)

        hidden_states = scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, dropout_p=0.0,
                                                     is_causal=False, scale=float(attn.scale))
        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
        hidden_states = hidden_states.to(query.dtype)

        hidden_states = attn.to_out[0](hidden_states)  # linear projection
        hidden_states = attn.to_out[1](hidden_states)  # dropout
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor
