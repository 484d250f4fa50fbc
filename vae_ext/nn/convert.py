"""Model converters: swap torch's (and timm's) attention in an existing model for the fused modules.

Kept apart from the modules themselves (nn/attention.py, nn/transformer.py), which it imports, so that
no module of vae_ext.nn imports another that imports it back.
"""

from __future__ import annotations

from torch import nn

from vae_ext.nn.attention import MultiheadAttention
from vae_ext.nn.transformer import TransformerDecoderLayer, TransformerEncoderLayer


def _fused_from_torch(m: nn.MultiheadAttention) -> MultiheadAttention:
    ref = m.in_proj_weight if m.in_proj_weight is not None else m.q_proj_weight
    new = MultiheadAttention(m.embed_dim, m.num_heads, dropout=m.dropout, bias=m.in_proj_bias is not None,
                             add_bias_kv=m.bias_k is not None, add_zero_attn=m.add_zero_attn,
                             kdim=m.kdim, vdim=m.vdim, batch_first=m.batch_first,
                             device=ref.device, dtype=ref.dtype)
    new.load_state_dict(m.state_dict())
    new.train(m.training)
    for name, p in m.named_parameters():
        new.get_parameter(name).requires_grad_(p.requires_grad)
    return new


def replace_attention(model: nn.Module, layers: bool = True) -> nn.Module:
    """Swap every ``torch.nn.MultiheadAttention`` in ``model`` for ``vae_ext.nn.MultiheadAttention``.

    The weights (and requires_grad flags, device, dtype, train/eval mode) are kept, so the
    model computes the same function (up to float rounding, and zeros instead of NaN for
    rows that see no key). The model is changed in place and returned::

        model = vae_ext.nn.replace_attention(model)

    With ``layers=True`` (the default), ``torch.nn.TransformerEncoderLayer`` and
    ``TransformerDecoderLayer`` are replaced by the vae_ext layers of the same signature
    (same parameters): torch's own layers take a native fast path in inference (eval mode,
    no grad) that would bypass the swapped attention module. With ``layers=False`` only the
    attention modules are swapped. ``torch.nn.TransformerEncoder`` stacks stop converting
    padded inputs to nested tensors (which the fused module does not take).

    Only modules whose type is exactly ``torch.nn.MultiheadAttention`` (or the torch layers)
    are replaced; subclasses with their own forward are left alone. Do this before creating
    the optimizer (or before wrapping in DistributedDataParallel): the parameters are new
    tensors.

    timm's ``timm.layers.Attention`` (ViT and friends), when timm is imported, is switched in
    place to ``vae_ext.integrations.timm.FusedAttention`` (same module, same parameters).
    """
    import sys

    timm_convert = None
    if "timm" in sys.modules:  # a model holding timm's Attention means timm is imported
        from vae_ext.integrations import timm as _timm

        timm_convert = _timm.convert

    def convert(module: nn.Module) -> nn.Module:
        t = type(module)
        if timm_convert is not None and timm_convert(module):
            return module
        if layers and t is nn.TransformerEncoderLayer:
            return TransformerEncoderLayer.from_torch(module)
        if layers and t is nn.TransformerDecoderLayer:
            return TransformerDecoderLayer.from_torch(module)
        if t is nn.MultiheadAttention:
            return _fused_from_torch(module)
        if isinstance(module, nn.TransformerEncoder):
            module.use_nested_tensor = False
        for name, child in list(module.named_children()):
            new = convert(child)
            if new is not child:
                setattr(module, name, new)
        return module

    return convert(model)
