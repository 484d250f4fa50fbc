"""masked_attention: softmax(q kᵀ · scale + mask) v without materialising the S×S scores."""

from __future__ import annotations

import functools
import math

import torch

from vae_ext import _backend, reference
from vae_ext._validation import (FLOAT_DTYPES, as_float, broadcast_shape, check_float, check_generator,
                                 check_same_device, check_seed, check_tensor, is_concrete, is_number, seed_to_int64)

OP = "masked_attention"
# Where the causal mask's diagonal starts: query i sees keys j <= i ("upper_left", SDPA's
# is_causal) or j <= i + Sk - Sq ("lower_right", KV-cache decoding).
CAUSAL_ALIGNMENTS = ("upper_left", "lower_right")


def _has_kernel() -> bool:
    return _backend.extension_loaded() and hasattr(torch.ops.vae_ext, "masked_attention_forward")


@functools.cache
def _forward_op():
    """The forward op's overload, looked up once (torch.ops attribute lookups cost µs per call)."""
    return torch.ops.vae_ext.masked_attention_forward.default


_INT32_MAX = 2**31 - 1  # the kernels' params hold B, H, Hkv, Sq, Sk, D as int32


def _size_over_int32(q: torch.Tensor, k: torch.Tensor) -> str | None:
    """Why the kernels cannot take these sizes (a dim past int32, naming the argument), or None."""
    if torch.compiler.is_compiling():
        return None  # symbolic sizes: the kernels' own check runs on the real ones
    if max(q.shape) <= _INT32_MAX and max(k.shape) <= _INT32_MAX:
        return None  # the usual case, without a loop per dim
    for name, t, dims in (("q", q, ("B", "H", "Sq", "D")), ("k", k, ("B", "Hkv", "Sk", "D"))):
        for dim, size in zip(dims, t.shape):
            if size > _INT32_MAX:
                return (f"{name} has {dim} = {size}, past the kernels' int32 limit of {_INT32_MAX} "
                        f"(the reference handles it)")
    return None


def _cuda_head_dims() -> tuple[tuple[int, ...], int, int]:
    """The CUDA kernels' head dims as the build reports them (csrc/attention/attention.h): the compiled
    tensor-core head dims, the largest head dim of any CUDA forward kernel and of the backward (0: no
    CUDA kernels)."""
    info = _backend.build_info()
    max_fwd = int(info.get("attention_cuda_max_head_dim", 0))
    return (tuple(info.get("attention_cuda_tensor_core_head_dims", ())), max_fwd,
            int(info.get("attention_cuda_max_backward_head_dim", max_fwd)))


def supports(device: torch.device, dtype: torch.dtype, head_dim: int, attn_mask_grad: bool = False,
             size_limit: str | None = None, needs_grad: bool = False) -> tuple[bool, str]:
    """Whether the compiled kernels handle this input, and why not (size_limit: a reason
    from _size_over_int32; needs_grad: the backward will run too)."""
    if size_limit is not None:
        ok, reason = _backend.device_supported(device)
        return (False, size_limit) if ok else (ok, reason)
    return _supports(device, dtype, int(head_dim), bool(attn_mask_grad), bool(needs_grad))


@functools.lru_cache(maxsize=256)
def _supports(device: torch.device, dtype: torch.dtype, head_dim: int, attn_mask_grad: bool,
              needs_grad: bool) -> tuple[bool, str]:
    # Cached: it runs on every call, and its answer depends on the build only.
    ok, reason = _backend.device_supported(device)
    if not ok:
        return ok, reason
    if not _has_kernel():
        return False, "this build has no masked_attention kernels"
    if head_dim < 1:
        return False, "head dim 0 has no kernel"
    if attn_mask_grad:
        return False, "the kernels do not compute a gradient for attn_mask (it requires grad)"
    if dtype not in FLOAT_DTYPES:
        return False, f"dtype {dtype} has no kernel"
    if device.type == "cuda":
        # Tensor cores for bf16/fp16 up to the largest compiled head dim (padded to the next one),
        # FFMA kernels for float32 and the larger 16-bit head dims: the limits the build reports.
        if dtype == torch.float64:
            return False, "float64 has no CUDA kernel (the reference runs)"
        tc_dims, max_dim, max_bwd = _cuda_head_dims()
        if head_dim > max_dim:
            return False, f"head dim {head_dim} > {max_dim} has no CUDA kernel (the reference runs)"
        if needs_grad and head_dim > max_bwd:
            return False, (f"head dim {head_dim} > {max_bwd} has no CUDA backward kernel (the reference runs "
                           f"while gradients are needed; the forward alone runs fused)")
        if dtype in (torch.bfloat16, torch.float16) and tc_dims and head_dim <= tc_dims[-1]:
            padded = next(c for c in tc_dims if head_dim <= c)
            return True, f"{reason}: tensor-core kernels (head dim padded to {padded})"
        return True, f"{reason}: FFMA kernels (float32 arithmetic)"
    return True, reason


_FAST_DTYPES = frozenset(FLOAT_DTYPES)
_Tensor = torch.Tensor


def _fast_call(q, k, v, is_causal, scale, dropout_p, causal_alignment) -> torch.Tensor | None:
    """The compiled forward for the plain call of small-step inference (decoding, short sequences):
    q, k, v plain tensors of one dtype and device, no mask tensors, generator or seed, valid
    sizes and numbers, the extension chosen and supported. None for anything else: the full path
    then validates (and raises its errors) and decides. The same checks as that path, in fewer
    Python steps: it costs ~1 µs where the full validation costs ~5 (an SDPA call ~3 in all)."""
    if torch.compiler.is_compiling():
        return None  # traced: the full path (no guards from these checks)
    if type(q) is not _Tensor or type(k) is not _Tensor or type(v) is not _Tensor:
        return None  # subclasses (and non-tensors) take the full path
    qs, ks = q.shape, k.shape
    if len(qs) != 4 or len(ks) != 4 or v.shape != ks:
        return None
    b, h, _sq, d = qs
    if ks[0] != b or ks[3] != d or d == 0 or ks[1] == 0 or h % ks[1] != 0:
        return None
    dtype = q.dtype
    if k.dtype != dtype or v.dtype != dtype or dtype not in _FAST_DTYPES:
        return None
    device = q.device
    if k.device != device or v.device != device:
        return None
    if max(qs) > _INT32_MAX or max(ks) > _INT32_MAX or type(is_causal) is not bool:
        return None
    if causal_alignment != "upper_left" and causal_alignment != "lower_right":
        return None
    if scale is None:
        scale = 1.0 / math.sqrt(d)
    elif (type(scale) is not float and type(scale) is not int) or not math.isfinite(scale):
        return None
    if (type(dropout_p) is not float and type(dropout_p) is not int) or not 0.0 <= dropout_p < 1.0:
        return None
    if _backend.mode() == "reference":
        return None
    needs_grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    if not _supports(device, dtype, d, False, needs_grad)[0]:
        return None
    return _forward_op()(q, k, v, None, None, is_causal, float(scale), float(dropout_p), None, None,
                         is_causal and causal_alignment == "lower_right")[0]


def _check_mask_broadcast(name: str, mask: torch.Tensor, full: tuple[int, int, int, int]) -> None:
    if mask.dim() > 4:
        raise ValueError(f"{OP}: {name} must have at most 4 dims (broadcastable to (B, H, Sq, Sk) = {full}), "
                         f"got shape {tuple(mask.shape)}")
    if broadcast_shape(mask.shape, full) != torch.Size(full):
        raise ValueError(f"{OP}: {name} of shape {tuple(mask.shape)} does not broadcast to (B, H, Sq, Sk) = {full}")


def masked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None = None,
                     key_padding_mask: torch.Tensor | None = None, is_causal: bool = False,
                     scale: float | None = None, dropout_p: float = 0.0, generator: torch.Generator | None = None,
                     seed: int | None = None, causal_alignment: str = "upper_left") -> torch.Tensor:
    r"""Masked multi-head attention, softmax(q kᵀ · scale + mask) · v, fused.

    Args:
        q: (B, H, Sq, D) queries.
        k, v: (B, Hkv, Sk, D) keys and values; H must be a multiple of Hkv (grouped-query
            attention; Hkv == H is plain multi-head attention). Sq may differ from Sk.
        attn_mask: bool (True = may attend, the SDPA convention) or additive float mask,
            broadcastable to (B, H, Sq, Sk).
        key_padding_mask: (B, Sk) bool, True = that key is padding and is ignored (the
            nn.MultiheadAttention convention).
        is_causal: query i sees keys j <= i, top-left aligned, exactly as
            F.scaled_dot_product_attention (causal_alignment="upper_left"), or
            keys j <= i + Sk - Sq, bottom-right aligned (causal_alignment="lower_right":
            torch's causal_lower_right, FlashAttention's convention, what decoding with a
            KV cache needs; with Sq > Sk the first Sq - Sk query rows see no key).
        scale: score scale, default 1/sqrt(D).
        dropout_p: probability of dropping an attention weight (the kept ones are scaled by
            1 / (1 - dropout_p)); randomness as in vae_ext.reparameterize (generator / default
            generator, or an explicit stateless `seed`).

    Masks combine by intersection; -inf in a float attn_mask hides the key as False does. A
    query row that sees no key returns zeros and gets zero gradients. Returns (B, H, Sq, D) in
    q's dtype. Gradients flow to q, k, v; an attn_mask that requires grad is handled by the
    reference path.

    NaN: a NaN in a visible input propagates to the outputs (and gradients) it touches, as
    the math of softmax does: a NaN query gives a NaN output row, a NaN in a visible key or
    value gives NaN rows for every query that sees it. A NaN score of a hidden key (causal,
    padding, a False / -inf mask entry) does not leak.

    Double backward (create_graph=True, e.g. a gradient penalty) is supported without
    dropout: the backward then runs as differentiable torch ops (S×S scores in memory);
    with dropout_p > 0 it raises. Sizes past int32 (any of B, H, S, D) run the reference
    in 'auto' mode.
    """
    if attn_mask is None and key_padding_mask is None and generator is None and seed is None:
        out = _fast_call(q, k, v, is_causal, scale, dropout_p, causal_alignment)
        if out is not None:
            return out
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_float(OP, name, t)
        if t.dim() != 4:
            raise ValueError(f"{OP}: {name} must be 4-D (B, H, S, D), got shape {tuple(t.shape)}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        bad = "k" if k.dtype != q.dtype else "v"
        raise TypeError(f"{OP}: {bad} dtype {(k if bad == 'k' else v).dtype} differs from q dtype {q.dtype}")
    check_same_device(OP, {"q": q, "k": k, "v": v, "attn_mask": attn_mask, "key_padding_mask": key_padding_mask})
    b, h, sq, d = q.shape
    hkv, sk = k.shape[1], k.shape[2]
    if k.shape[0] != b or v.shape[0] != b:
        raise ValueError(f"{OP}: batch sizes differ: q {b}, k {k.shape[0]}, v {v.shape[0]}")
    if k.shape[3] != d or v.shape[3] != d:
        raise ValueError(f"{OP}: head dims differ: q {d}, k {k.shape[3]}, v {v.shape[3]}")
    if tuple(v.shape[1:3]) != (hkv, sk):
        raise ValueError(f"{OP}: v must have the (Hkv, Sk) of k = {(hkv, sk)}, got {tuple(v.shape[1:3])}")
    if hkv == 0 or h % hkv != 0:
        raise ValueError(f"{OP}: q heads H={h} must be a multiple of k/v heads Hkv={hkv}")
    full = (b, h, sq, sk)
    if key_padding_mask is not None:
        check_tensor(OP, "key_padding_mask", key_padding_mask)
        if key_padding_mask.dtype != torch.bool:
            raise TypeError(f"{OP}: key_padding_mask must be bool (True = ignore that key), "
                            f"got {key_padding_mask.dtype}")
        if tuple(key_padding_mask.shape) != (b, sk):
            raise ValueError(f"{OP}: key_padding_mask must have shape (B, Sk) = {(b, sk)}, "
                             f"got {tuple(key_padding_mask.shape)}")
    if attn_mask is not None:
        check_tensor(OP, "attn_mask", attn_mask)
        if attn_mask.dtype != torch.bool and not attn_mask.is_floating_point():
            raise TypeError(f"{OP}: attn_mask must be bool (True = attend) or floating (additive), "
                            f"got {attn_mask.dtype}")
        _check_mask_broadcast("attn_mask", attn_mask, full)
    if not isinstance(is_causal, bool):
        raise TypeError(f"{OP}: is_causal must be a bool, got {type(is_causal).__name__}")
    if causal_alignment not in CAUSAL_ALIGNMENTS:
        raise ValueError(f"{OP}: causal_alignment must be one of {CAUSAL_ALIGNMENTS}, got {causal_alignment!r}")
    if scale is None:
        scale = 1.0 / math.sqrt(d) if d > 0 else 1.0
    elif not is_number(scale) or (is_concrete(scale) and not math.isfinite(scale)):
        raise ValueError(f"{OP}: scale must be a finite float or None, got {scale!r}")
    if not is_number(dropout_p) or (is_concrete(dropout_p) and not 0.0 <= dropout_p < 1.0):
        raise ValueError(f"{OP}: dropout_p must be a float in [0, 1), got {dropout_p!r}")
    if generator is not None and seed is not None:
        raise ValueError(f"{OP}: pass generator or seed, not both")
    check_generator(OP, generator, q.device)
    check_seed(OP, seed)

    mask_grad = attn_mask is not None and attn_mask.requires_grad and torch.is_grad_enabled()
    needs_grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    ok, reason = supports(q.device, q.dtype, d, mask_grad, _size_over_int32(q, k), needs_grad)
    if not _backend.use_extension(OP, ok, reason):
        return reference.masked_attention(q, k, v, attn_mask, key_padding_mask, is_causal, as_float(scale),
                                          as_float(dropout_p), generator, seed, causal_alignment)
    if attn_mask is not None and attn_mask.dtype != torch.bool:
        attn_mask = attn_mask.to(torch.float32)
    seed64 = None if seed is None else seed_to_int64(seed)
    out, _lse, _rng = _forward_op()(
        q, k, v, attn_mask, key_padding_mask, is_causal, as_float(scale), as_float(dropout_p), seed64, generator,
        is_causal and causal_alignment == "lower_right")
    return out


def _register() -> None:
    """Fake (meta) kernels for the compiled ops (their autograd is in C++)."""

    @torch.library.register_fake("vae_ext::masked_attention_forward")
    def _(q, k, v, attn_mask, key_padding_mask, is_causal, scale, dropout_p, seed, generator,
          causal_lower_right=False):
        torch._check(q.dim() == 4 and k.dim() == 4 and v.dim() == 4,
                     lambda: "masked_attention_forward: q, k, v must be 4-D")
        torch._check(k.shape[0] == q.shape[0] and v.shape[0] == q.shape[0],
                     lambda: "masked_attention_forward: batch sizes differ")
        torch._check(k.shape[3] == q.shape[3] and v.shape[3] == q.shape[3],
                     lambda: "masked_attention_forward: head dims differ")
        b, h, sq, d = q.shape
        out = q.new_empty((b, h, sq, d))
        lse = q.new_empty((b, h, sq), dtype=torch.float32)
        rng_state = q.new_empty((2,), dtype=torch.int64)
        return out, lse, rng_state

    @torch.library.register_fake("vae_ext::masked_attention_backward")
    def _(grad_out, q, k, v, out, lse, rng_state, attn_mask, key_padding_mask, is_causal, scale, dropout_p,
          causal_lower_right=False):
        torch._check(grad_out.shape == q.shape, lambda: "masked_attention_backward: grad_out must have q's shape")
        return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)

    # Autograd is registered in C++ (csrc/attention/attention_autograd.cpp): no Python round trip per call.


if _has_kernel():
    _register()
