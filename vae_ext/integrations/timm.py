"""timm: vision transformers on vae_ext's kernels.

    import vae_ext.integrations.timm as vtimm
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False)
    vtimm.replace_attention(model)          # or: with vae_ext.patch_sdpa(): model(x)

replace_attention switches every `timm.layers.Attention` (the attention of ViT, DeiT,
BEiT-free ViT variants, ...) to FusedAttention, a subclass that computes the same
function with vae_ext.scaled_dot_product_attention. The switch is in place: the same
module objects and parameters (an optimizer built before stays valid).
vae_ext.nn.replace_attention does this too for models that contain timm's Attention.
"""

from __future__ import annotations

import torch
from torch import nn

from vae_ext.integrations import _require
from vae_ext.sdpa import scaled_dot_product_attention

_require("timm", "timm")
from timm.layers import Attention as TimmAttention  # noqa: E402

__all__ = ["FusedAttention", "TimmAttention", "convert", "replace_attention"]


class FusedAttention(TimmAttention):
    """timm's multi-head self-attention (qkv projection, optional q/k norm, scale norm, gate,
    output projection, dropouts) with the attention itself on vae_ext's fused kernels."""

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False
                ) -> torch.Tensor:
        b, n, _ = x.shape
        attn_dim = getattr(self, "attn_dim", self.num_heads * self.head_dim)
        gate_layer = getattr(self, "gate", None)
        gate = gate_layer(x).sigmoid() if gate_layer is not None else None
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # (B, H, N, D) each
        q, k = self.q_norm(q), self.k_norm(k)
        x = scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal,
                                         dropout_p=self.attn_drop.p if self.training else 0.0,
                                         scale=float(self.scale))
        x = x.transpose(1, 2).reshape(b, n, attn_dim)
        x = getattr(self, "norm", nn.Identity())(x)
        if gate is not None:
            x = x * gate
        return self.proj_drop(self.proj(x))


def convert(module: nn.Module) -> bool:
    """Switch one module to FusedAttention if its type is exactly timm's Attention; returns whether it did."""
    if type(module) is TimmAttention:
        module.__class__ = FusedAttention
        return True
    return False


def replace_attention(model: nn.Module) -> nn.Module:
    """Switch every module of `model` whose type is exactly `timm.layers.Attention` to FusedAttention, in place.

    Subclasses of timm's Attention with their own forward are left alone. Returns `model`.
    """
    for m in model.modules():
        convert(m)
    return model
