"""An SDPA-compatible entry point to the fused attention kernels, and patch_sdpa().

`scaled_dot_product_attention` has the signature and semantics of
`torch.nn.functional.scaled_dot_product_attention`; it runs vae_ext's fused
`masked_attention` kernels where they apply and hands every other call, unchanged,
to torch's own SDPA (so torch's error cases stay torch's errors). `patch_sdpa()`
routes `torch.nn.functional.scaled_dot_product_attention` through it inside a
block, for code (diffusers, transformers' "sdpa" backend, timm) that calls torch's
function by attribute.
"""

from __future__ import annotations

import contextlib
import math
import threading

import torch
import torch.nn.functional as F

from vae_ext import _backend
from vae_ext.ops import attention as _attention

__all__ = ["patch_sdpa", "scaled_dot_product_attention", "torch_sdpa"]

# torch's own function, captured at import: the fallback, and what patch_sdpa restores.
torch_sdpa = F.scaled_dot_product_attention

try:  # torch >= 2.3
    from torch.nn.attention.bias import CausalBias, CausalVariant
except ImportError:  # pragma: no cover - older torch
    CausalBias = CausalVariant = None


def _causal_bias_alignment(attn_mask, sq: int, sk: int) -> str | None:
    """The causal alignment a torch CausalBias stands for, or None when it does not fit (sq, sk)."""
    if attn_mask.seq_len_q != sq or attn_mask.seq_len_kv != sk:
        return None
    if attn_mask.variant == CausalVariant.UPPER_LEFT or sq == sk:
        return "upper_left"
    if attn_mask.variant == CausalVariant.LOWER_RIGHT:
        return "lower_right"
    return None


def _causal_bias_fallback(query, key, value, attn_mask, dropout_p, scale, enable_gqa):
    """torch's own handling of a CausalBias (its math path), without going through __torch_function__,
    which would not recognise a patched F.scaled_dot_product_attention."""
    if attn_mask.variant == CausalVariant.UPPER_LEFT or attn_mask.seq_len_q == attn_mask.seq_len_kv:
        return torch_sdpa(query, key, value, attn_mask=None, dropout_p=dropout_p, is_causal=True, scale=scale,
                          enable_gqa=enable_gqa)
    return torch_sdpa(query, key, value, attn_mask=attn_mask._materialize(query.device), dropout_p=dropout_p,
                      is_causal=False, scale=scale, enable_gqa=enable_gqa)


def _fused_plan(query, key, value, attn_mask, dropout_p, scale, enable_gqa):
    """Whether the fused kernels run this call: (True, 4-D mask or None) or (False, None).

    The kernels take (B, H, S, D) with one head dim for q, k and v, H a multiple of Hkv,
    bool or additive masks, dropout in [0, 1). Anything else goes to torch.
    """
    tensors = (query, key, value)
    if not all(type(t) is torch.Tensor for t in tensors) or any(t.is_nested for t in tensors):
        return False, None
    if query.dim() < 2 or key.dim() != query.dim() or value.shape != key.shape:
        return False, None
    if key.dtype != query.dtype or value.dtype != query.dtype or query.dtype not in _attention.FLOAT_DTYPES:
        return False, None
    if key.device != query.device or value.device != query.device:
        return False, None
    if query.shape[-1] != key.shape[-1] or query.numel() == 0 or key.numel() == 0:
        return False, None
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, (int, float)) or not 0.0 <= dropout_p < 1.0:
        return False, None
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float))
                              or not math.isfinite(scale)):
        return False, None
    if query.dim() >= 3:
        hq, hk = query.shape[-3], key.shape[-3]
        if query.shape[:-3] != key.shape[:-3]:
            return False, None
        if hq != hk and not (enable_gqa and hk > 0 and hq % hk == 0):
            return False, None
    mask = None
    if attn_mask is not None:
        if type(attn_mask) is not torch.Tensor or attn_mask.device != query.device:
            return False, None
        if attn_mask.dtype != torch.bool and attn_mask.dtype != query.dtype:
            return False, None
        if attn_mask.dtype != torch.bool and attn_mask.requires_grad and torch.is_grad_enabled():
            return False, None  # the kernels compute no gradient for the mask
        if attn_mask.dtype == torch.float64:
            return False, None  # the kernels add a float mask in float32: not torch's float64 result
        full = query.shape[:-1] + (key.shape[-2],)
        if attn_mask.dim() > len(full) or attn_mask.dim() < 2:  # torch refuses a 0-D or 1-D mask
            return False, None
        try:
            expanded = attn_mask.expand(full)
        except RuntimeError:
            return False, None
        # Up to 4-D the kernels broadcast the mask themselves; more leading dims fold into the batch.
        mask = expanded.reshape((-1,) + tuple(full[-3:])) if len(full) > 4 else attn_mask
    needs_grad = torch.is_grad_enabled() and (query.requires_grad or key.requires_grad or value.requires_grad)
    ok, reason = _attention.supports(query.device, query.dtype, query.shape[-1], needs_grad=needs_grad)
    if not ok or not _backend.use_extension(_attention.OP, ok, reason):
        return False, None
    return True, mask


def _to_bhsd(t: torch.Tensor) -> torch.Tensor:
    """(N, ..., H, S, D) -> (B, H, S, D); 2-D (S, D) -> (1, 1, S, D); 3-D (H, S, D) -> (1, H, S, D)."""
    if t.dim() == 4:
        return t
    if t.dim() < 4:
        return t.reshape((1,) * (4 - t.dim()) + tuple(t.shape))
    return t.reshape((-1,) + tuple(t.shape[-3:]))


def scaled_dot_product_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                                 attn_mask: torch.Tensor | None = None, dropout_p: float = 0.0,
                                 is_causal: bool = False, scale: float | None = None,
                                 enable_gqa: bool = False) -> torch.Tensor:
    r"""torch.nn.functional.scaled_dot_product_attention, on vae_ext's fused kernels.

    Same signature and semantics: query (N, ..., Hq, L, E), key and value (N, ..., H, S, E)
    (any number of leading dims, also 2-D and 3-D inputs); `attn_mask` bool (True = take
    part) or additive float, broadcast to (N, ..., Hq, L, S) as torch does, or a
    `torch.nn.attention.bias.CausalBias` (`causal_upper_left` / `causal_lower_right`:
    the kernels' two causal alignments); `is_causal` upper-left aligned; `scale` default
    1/sqrt(E); `enable_gqa` lets Hq be a multiple of H. Returns (N, ..., Hq, L, E).

    The fused kernels run when the extension supports the input (see
    vae_ext.backend_info()); what they cannot do (value head dim != query head dim,
    broadcast batch or head dims of key/value, a float mask that requires grad, a mask
    dtype other than bool or query's, a float64 float mask (the kernels add masks in
    float32), tensor subclasses, nested tensors, empty inputs, invalid arguments) goes
    to torch's own SDPA, which also raises torch's errors.
    Differences from torch: dropout draws from vae_ext's Philox stream (the same
    distribution, other random numbers); a query row that sees no key is exactly zero
    (torch's CPU math path agrees).
    """
    if CausalBias is not None and isinstance(attn_mask, CausalBias):
        if is_causal:
            raise ValueError("CausalBias should not be used with causal=True")
        align = _causal_bias_alignment(attn_mask, query.shape[-2], key.shape[-2]) if query.dim() >= 2 else None
        ok = align is not None and _fused_plan(query, key, value, None, dropout_p, scale, enable_gqa)[0]
        if not ok:
            return _causal_bias_fallback(query, key, value, attn_mask, dropout_p, scale, enable_gqa)
        return _run_fused(query, key, value, None, dropout_p, True, scale, align)
    if is_causal is not False and is_causal is not True:
        return torch_sdpa(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                          scale=scale, enable_gqa=enable_gqa)
    if is_causal and attn_mask is not None:  # torch's error
        return torch_sdpa(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                          scale=scale, enable_gqa=enable_gqa)
    ok, mask = _fused_plan(query, key, value, attn_mask, dropout_p, scale, enable_gqa)
    if not ok:
        return torch_sdpa(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                          scale=scale, enable_gqa=enable_gqa)
    return _run_fused(query, key, value, mask, dropout_p, is_causal, scale, "upper_left")


def _run_fused(query, key, value, mask, dropout_p, is_causal, scale, alignment):
    # _fused_plan checked what vae_ext.masked_attention validates, so the op is called
    # directly (per call ~60 us less Python: it matters for one-token decoding steps).
    if mask is not None and mask.dtype != torch.bool and mask.dtype != torch.float32:
        mask = mask.to(torch.float32)  # the kernels add float masks in float32
    scale = 1.0 / math.sqrt(query.shape[-1]) if scale is None else float(scale)
    out, _lse, _rng = torch.ops.vae_ext.masked_attention_forward(
        _to_bhsd(query), _to_bhsd(key), _to_bhsd(value), mask, None, bool(is_causal), scale, float(dropout_p),
        None, None, bool(is_causal) and alignment == "lower_right")
    return out if query.dim() == 4 else out.reshape(query.shape)


# ----------------------------------------------------------------------------- patch_sdpa

_patch_lock = threading.Lock()
_patch_depth = 0
_patch_saved = None


class patch_sdpa(contextlib.ContextDecorator):
    """Route torch.nn.functional.scaled_dot_product_attention through vae_ext inside a block.

        with vae_ext.patch_sdpa():
            out = model(x)          # diffusers / transformers "sdpa" / timm attention on the kernels

        @vae_ext.patch_sdpa()
        def run(model, x): ...

    On exit (also on an exception) the function that was there before is restored.
    Nested use works: the patch is reference-counted and removed when the outermost
    block exits. Threads: the patch replaces a module attribute, so it is process-wide;
    while any thread is inside a block, every thread's calls of
    F.scaled_dot_product_attention go through vae_ext (enter and exit are thread-safe;
    the function is restored when the last block in any thread exits). Code that
    imported the function by name before the block (`from torch.nn.functional import
    scaled_dot_product_attention`) keeps torch's.
    """

    def __enter__(self):
        global _patch_depth, _patch_saved
        with _patch_lock:
            if _patch_depth == 0:
                _patch_saved = F.scaled_dot_product_attention
                F.scaled_dot_product_attention = scaled_dot_product_attention
            _patch_depth += 1
        return self

    def __exit__(self, *exc):
        global _patch_depth, _patch_saved
        with _patch_lock:
            _patch_depth -= 1
            if _patch_depth == 0:
                F.scaled_dot_product_attention = _patch_saved
                _patch_saved = None
        return False
