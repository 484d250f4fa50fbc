"""transformers: vae_ext as an attention implementation of transformers' AttentionInterface.

    import vae_ext.integrations.transformers as vt
    vt.register()
    model = transformers.AutoModel.from_config(cfg, attn_implementation="vae_ext")   # or from_pretrained

register() adds the name "vae_ext" to transformers' AttentionInterface (the attention
function) and AttentionMaskInterface (the masks it gets: SDPA's boolean masks, or None
where `is_causal` says it all), so encoder models run with padding masks and decoder
models with causal masks, padding, grouped-query attention (Llama-style
num_key_value_heads) and generate() with the KV cache.
"""

from __future__ import annotations

import torch

from vae_ext.integrations import _require
from vae_ext.sdpa import scaled_dot_product_attention

_transformers = _require("transformers", "transformers")

NAME = "vae_ext"

__all__ = ["NAME", "attention_forward", "register"]


def attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                      is_causal: bool | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """The attention function transformers calls: (B, H, Sq, D) query, (B, Hkv, Sk, D) key/value.

    Returns (attn_output (B, Sq, H, D), None): the layout of transformers' own "sdpa"
    function; attention weights are not computed (as with "sdpa").
    """
    if kwargs.get("softcap") is not None:
        raise ValueError("attn_implementation='vae_ext' does not support `softcap`; use 'eager' for such models")
    position_bias = kwargs.get("position_bias")
    if is_causal is None:
        is_causal = getattr(module, "is_causal", True)
    # As transformers' sdpa: a mask, when there is one, already holds the causal pattern;
    # a single query (decoding with a cache) sees every cached key.
    is_causal = bool(is_causal) and attention_mask is None and query.shape[2] > 1
    if position_bias is not None:  # T5-style relative bias: folded into one additive mask
        from transformers.integrations.sdpa_attention import create_position_bias_mask

        attention_mask = create_position_bias_mask(position_bias, attention_mask, is_causal, query, key)
        is_causal = False
    gqa = query.shape[1] != key.shape[1]  # the kernels read kv head h // (H / Hkv): no repeat_kv copy
    out = scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, dropout_p=dropout,
                                       is_causal=is_causal, scale=scaling, enable_gqa=gqa)
    return out.transpose(1, 2).contiguous(), None


def register(name: str = NAME) -> str:
    """Register vae_ext under `name` (default "vae_ext") in transformers' attention interfaces; returns the name.

    Idempotent. Afterwards ``attn_implementation=name`` works in ``from_config``,
    ``from_pretrained`` and ``model.set_attn_implementation``.
    """
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(name, attention_forward)
    AttentionMaskInterface.register(name, sdpa_mask)
    return name
