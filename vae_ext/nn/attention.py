"""MultiheadAttention on the fused masked_attention op, and replace_attention(model)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

import vae_ext

_NAME = "MultiheadAttention"


def _mask_dtype_ok(mask: torch.Tensor) -> bool:
    return mask.dtype == torch.bool or mask.is_floating_point()


class MultiheadAttention(nn.MultiheadAttention):
    r"""Drop-in ``torch.nn.MultiheadAttention`` whose attention runs on ``vae_ext.masked_attention``.

    The constructor, the forward signature, the defaults, the shapes, the parameter names and
    the initialisation are those of ``torch.nn.MultiheadAttention`` (it is a subclass), so
    ``load_state_dict`` from a torch module works and the outputs match it::

        attn = vae_ext.nn.MultiheadAttention(embed_dim, num_heads, batch_first=True)
        out, _ = attn(q, k, v, key_padding_mask=pad, need_weights=False)

    Args:
        embed_dim, num_heads, dropout, bias, add_bias_kv, add_zero_attn, kdim, vdim,
        batch_first, device, dtype: as ``torch.nn.MultiheadAttention``.

    Forward ``(query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
    average_attn_weights=True, is_causal=False) -> (attn_output, attn_weights or None)``,
    with torch's shapes: (L, E) unbatched, (L, N, E), or (N, L, E) with ``batch_first``.

    Masks follow ``torch.nn.MultiheadAttention`` (not SDPA):

    - ``attn_mask``: (L, S) or (N·num_heads, L, S) ((num_heads, L, S) unbatched); bool
      **True = not allowed to attend** (``vae_ext.nn.generate_square_subsequent_mask``; the
      Annotated Transformer's ``vae_ext.nn.subsequent_mask`` is True = may attend), or an
      additive float mask.
    - ``key_padding_mask``: (N, S) ((S,) unbatched); bool True = ignore that key, or additive float.
    - ``is_causal=True``: query i sees keys j <= i. As in torch, it is a hint that ``attn_mask``
      is the causal mask; the fused path applies the causal pattern itself (skipping the
      masked tiles) and does not read ``attn_mask``. Unlike torch, ``attn_mask`` may be None.

    ``need_weights=False`` runs the fused kernel: the L×S weight matrix is never
    materialised. ``need_weights=True`` (torch's default) returns the weights (averaged over
    heads with ``average_attn_weights``) through a path that materialises them, which is
    slower and uses O(L·S) memory per head: pass ``need_weights=False`` when you do not
    need them (``TransformerEncoderLayer`` and the other layers do).

    Differences from torch: a query row that sees no key at all (every key masked or
    padded) gives zero attention (so its output is ``out_proj.bias``) and zero gradients on
    both paths, where torch's ``need_weights=True`` path gives NaN (and its SDPA path NaN or
    zeros depending on the torch version and backend). Bad inputs raise ``ValueError``/``TypeError`` naming the argument
    (torch raises ``AssertionError``/``RuntimeError``). Nested tensors are not accepted.
    Dropout on the attention weights draws from torch's default generator (through the
    kernel's Philox stream), so it matches torch in distribution, not element by element.
    """

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                key_padding_mask: torch.Tensor | None = None, need_weights: bool = True,
                attn_mask: torch.Tensor | None = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        batched = self._check_inputs(query, key, value, key_padding_mask, attn_mask, is_causal)
        e, h = self.embed_dim, self.num_heads
        d = e // h

        # ---- projections, in the caller's layout (no transposes of the inputs)
        q, k, v = self._project(query, key, value)

        # ---- to (N, H, S, D) views
        def heads(x: torch.Tensor) -> torch.Tensor:
            if not batched:  # (S, E)
                return x.unflatten(-1, (h, d)).permute(1, 0, 2).unsqueeze(0)
            if self.batch_first:  # (N, S, E)
                return x.unflatten(-1, (h, d)).permute(0, 2, 1, 3)
            return x.unflatten(-1, (h, d)).permute(1, 2, 0, 3)  # (S, N, E)

        q, k, v = heads(q), heads(k), heads(v)
        n, _, tgt_len, _ = q.shape

        # ---- masks: torch.nn.MultiheadAttention conventions -> masked_attention conventions
        kpm = None  # bool, True = ignore
        mask = None  # bool, True = attend; or additive float, broadcastable to (N, H, L, S)
        if key_padding_mask is not None:
            kpm = key_padding_mask if batched else key_padding_mask.unsqueeze(0)
        if attn_mask is not None and not is_causal:
            mask = attn_mask
            if mask.dim() == 3:
                mask = mask.view(n, h, tgt_len, mask.shape[-1])
            if mask.dtype == torch.bool:
                mask = ~mask
            else:
                mask = mask.to(q.dtype)
        if kpm is not None and kpm.dtype != torch.bool:  # additive float padding mask
            add = kpm.to(q.dtype)[:, None, None, :]
            if mask is None:
                mask = add
            elif mask.dtype == torch.bool:
                mask = torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill(~mask, -math.inf) + add
            else:
                mask = mask + add
            kpm = None

        # ---- extra keys: bias_k / bias_v, then a zero key (both visible to every query)
        extra = []
        if self.bias_k is not None:
            extra.append((self.bias_k.view(1, h, 1, d), self.bias_v.view(1, h, 1, d)))
        if self.add_zero_attn:
            zero = q.new_zeros(1, h, 1, d)
            extra.append((zero, zero))
        for bk, bv in extra:
            k = torch.cat([k, bk.to(k.dtype).expand(n, h, 1, d)], dim=2)
            v = torch.cat([v, bv.to(v.dtype).expand(n, h, 1, d)], dim=2)
            if kpm is not None:
                kpm = F.pad(kpm, (0, 1), value=False)
            if mask is not None:
                mask = F.pad(mask, (0, 1), value=True if mask.dtype == torch.bool else 0.0)
        # is_causal with extra keys: the causal pattern is over the original keys, the extra
        # keys stay visible (torch pads the causal attn_mask with an allowed column).
        causal = bool(is_causal)
        if causal and extra:
            src_len = k.shape[2] - len(extra)
            allowed = torch.ones(tgt_len, src_len, dtype=torch.bool, device=q.device).tril()
            allowed = F.pad(allowed, (0, len(extra)), value=True)
            if mask is None:
                mask = allowed
            elif mask.dtype == torch.bool:
                mask = mask & allowed
            else:
                mask = mask.masked_fill(~allowed, -math.inf)
            causal = False

        dropout_p = self.dropout if self.training else 0.0
        weights = None
        if need_weights:
            out, weights = _attention_with_weights(q, k, v, mask, kpm, causal, dropout_p)
            if average_attn_weights:
                weights = weights.mean(dim=1)
            if not batched:
                weights = weights.squeeze(0)
        else:
            out = vae_ext.masked_attention(q, k, v, attn_mask=mask, key_padding_mask=kpm, is_causal=causal,
                                           dropout_p=dropout_p)

        # ---- back to the caller's layout, output projection
        if not batched:
            out = out.squeeze(0).transpose(0, 1).reshape(tgt_len, e)
        elif self.batch_first:
            out = out.transpose(1, 2).reshape(n, tgt_len, e)
        else:
            out = out.permute(2, 0, 1, 3).reshape(tgt_len, n, e)
        out = self.out_proj(out)
        return out, weights

    # ------------------------------------------------------------------ helpers

    def _project(self, query, key, value):
        e = self.embed_dim
        if self._qkv_same_embed_dim:
            w, b = self.in_proj_weight, self.in_proj_bias
            if query is key and key is value:
                return F.linear(query, w, b).chunk(3, dim=-1)
            bq, bk, bv = (None, None, None) if b is None else b.chunk(3)
            wq, wk, wv = w.chunk(3)
            if key is value:
                kv = F.linear(key, w[e:], None if b is None else b[e:]).chunk(2, dim=-1)
                return F.linear(query, wq, bq), kv[0], kv[1]
            return F.linear(query, wq, bq), F.linear(key, wk, bk), F.linear(value, wv, bv)
        bq, bk, bv = (None, None, None) if self.in_proj_bias is None else self.in_proj_bias.chunk(3)
        return (F.linear(query, self.q_proj_weight, bq), F.linear(key, self.k_proj_weight, bk),
                F.linear(value, self.v_proj_weight, bv))

    def _check_inputs(self, query, key, value, key_padding_mask, attn_mask, is_causal) -> bool:
        for name, t in (("query", query), ("key", key), ("value", value)):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{_NAME}: {name} must be a torch.Tensor, got {type(t).__name__}")
            if not t.is_floating_point():
                raise TypeError(f"{_NAME}: {name} must be a floating tensor, got {t.dtype}")
            if t.is_nested:
                raise ValueError(f"{_NAME}: nested tensors are not supported ({name})")
        if query.dim() not in (2, 3):
            raise ValueError(f"{_NAME}: query must be 2-D (L, E) unbatched or 3-D batched, "
                             f"got shape {tuple(query.shape)}")
        batched = query.dim() == 3
        for name, t in (("key", key), ("value", value)):
            if t.dim() != query.dim():
                raise ValueError(f"{_NAME}: {name} must be {query.dim()}-D like query "
                                 f"({'batched' if batched else 'unbatched'}), got shape {tuple(t.shape)}")
        layout = "(N, L, E)" if self.batch_first else "(L, N, E)"
        for name, t, want, what in (("query", query, self.embed_dim, "embed_dim"), ("key", key, self.kdim, "kdim"),
                                    ("value", value, self.vdim, "vdim")):
            if t.shape[-1] != want:
                raise ValueError(f"{_NAME}: {name} must have {what}={want} features in its last dim, "
                                 f"got shape {tuple(t.shape)}")
        if batched:
            bd, sd = (0, 1) if self.batch_first else (1, 0)
            n = query.shape[bd]
            if key.shape[bd] != n or value.shape[bd] != n:
                raise ValueError(
                    f"{_NAME}: query, key and value must share the batch size in dim {bd} (batch_first="
                    f"{self.batch_first}, layout {layout}), got shapes {tuple(query.shape)}, {tuple(key.shape)}, "
                    f"{tuple(value.shape)}; are the inputs in the other layout?")
            tgt_len, src_len = query.shape[sd], key.shape[sd]
            if value.shape[sd] != src_len:
                raise ValueError(f"{_NAME}: key and value must have the same length (dim {sd}), got "
                                 f"{tuple(key.shape)} and {tuple(value.shape)}")
        else:
            n, tgt_len, src_len = 1, query.shape[0], key.shape[0]
            if value.shape[0] != src_len:
                raise ValueError(f"{_NAME}: key and value must have the same length, got "
                                 f"{tuple(key.shape)} and {tuple(value.shape)}")
        if key_padding_mask is not None:
            if not isinstance(key_padding_mask, torch.Tensor) or not _mask_dtype_ok(key_padding_mask):
                raise TypeError(f"{_NAME}: key_padding_mask must be a bool (True = ignore) or float tensor, "
                                f"got {getattr(key_padding_mask, 'dtype', type(key_padding_mask).__name__)}")
            want = (n, src_len) if batched else (src_len,)
            if tuple(key_padding_mask.shape) != want:
                raise ValueError(f"{_NAME}: key_padding_mask must have shape {'(N, S)' if batched else '(S,)'} = "
                                 f"{want} (batch_first={self.batch_first}), got {tuple(key_padding_mask.shape)}")
        if attn_mask is not None:
            if not isinstance(attn_mask, torch.Tensor) or not _mask_dtype_ok(attn_mask):
                raise TypeError(f"{_NAME}: attn_mask must be a bool (True = not allowed) or float tensor, "
                                f"got {getattr(attn_mask, 'dtype', type(attn_mask).__name__)}")
            shapes = [(tgt_len, src_len), (n * self.num_heads, tgt_len, src_len)]
            if tuple(attn_mask.shape) not in shapes:
                raise ValueError(f"{_NAME}: attn_mask must have shape (L, S) = {shapes[0]} or "
                                 f"(N*num_heads, L, S) = {shapes[1]}, got {tuple(attn_mask.shape)}")
        for name, t in (("key", key), ("value", value), ("key_padding_mask", key_padding_mask),
                        ("attn_mask", attn_mask)):
            if t is not None and t.device != query.device:
                raise ValueError(f"{_NAME}: {name} is on {t.device} but query is on {query.device}")
        if not isinstance(is_causal, bool):
            raise TypeError(f"{_NAME}: is_causal must be a bool, got {type(is_causal).__name__}")
        return batched


def _attention_with_weights(q, k, v, mask, kpm, is_causal, dropout_p):
    """The materialising path for need_weights=True: returns (out (N,H,L,D), weights (N,H,L,S))."""
    scale = 1.0 / math.sqrt(q.shape[-1])
    scores = torch.matmul(q * scale, k.transpose(-2, -1))
    hidden = None  # bool, True = not visible
    if is_causal:
        hidden = torch.ones(scores.shape[-2:], dtype=torch.bool, device=q.device).triu(1)
    if kpm is not None:
        pad = kpm[:, None, None, :]
        hidden = pad if hidden is None else hidden | pad
    if mask is not None:
        if mask.dtype == torch.bool:
            hidden = ~mask if hidden is None else hidden | ~mask
        else:
            scores = scores + mask
    if hidden is not None:
        scores = scores.masked_fill(hidden, -math.inf)
    # A row with no visible key gives zero weights (not NaN), as the fused op.
    empty = torch.isneginf(scores.amax(dim=-1, keepdim=True))
    weights = torch.softmax(scores.masked_fill(empty, 0.0), dim=-1).masked_fill(empty, 0.0)
    if dropout_p > 0.0:
        weights = F.dropout(weights, p=dropout_p)
    return torch.matmul(weights, v), weights
