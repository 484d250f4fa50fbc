"""Transformer encoder/decoder layers of "Attention Is All You Need" on the fused attention,
signature- and state_dict-compatible with torch.nn's, plus the causal masks (subsequent_mask,
generate_square_subsequent_mask) and positional encodings."""

from __future__ import annotations

import copy
import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from vae_ext.nn.attention import MultiheadAttention


def _activation(activation) -> Callable[[torch.Tensor], torch.Tensor]:
    if isinstance(activation, str):
        if activation == "relu":
            return F.relu
        if activation == "gelu":
            return F.gelu
        raise ValueError(f"activation must be 'relu', 'gelu' or a callable, got {activation!r}")
    if not callable(activation):
        raise TypeError(f"activation must be 'relu', 'gelu' or a callable, got {type(activation).__name__}")
    return activation


def _relu_or_gelu(activation) -> int:
    if activation is F.relu or isinstance(activation, nn.ReLU):
        return 1
    if activation is F.gelu or isinstance(activation, nn.GELU):
        return 2
    return 0


def generate_square_subsequent_mask(size: int, device=None, dtype: torch.dtype = torch.bool) -> torch.Tensor:
    """The causal mask of a decoder in **torch's convention**: (size, size), position i may not see j > i.

    The convention of these modules and of ``torch.nn.MultiheadAttention`` /
    ``torch.nn.Transformer``: bool with **True = not allowed** (the strict upper triangle),
    or, for a floating ``dtype``, an additive mask with -inf above the diagonal and 0
    elsewhere (exactly ``torch.nn.Transformer.generate_square_subsequent_mask``). Pass it as
    ``attn_mask`` / ``tgt_mask`` of these modules; for ``vae_ext.masked_attention`` (True =
    attend) use ``subsequent_mask(n)[0]``, or simply ``is_causal=True``.
    """
    if isinstance(size, bool) or not isinstance(size, int) or size < 0:
        raise ValueError(f"generate_square_subsequent_mask: size must be an int >= 0, got {size!r}")
    hidden = torch.ones(size, size, dtype=torch.bool, device=device).triu(1)
    if dtype == torch.bool:
        return hidden
    if not dtype.is_floating_point:
        raise TypeError(f"generate_square_subsequent_mask: dtype must be torch.bool or floating, got {dtype}")
    return torch.zeros(size, size, dtype=dtype, device=device).masked_fill(hidden, -math.inf)


def subsequent_mask(size: int, device=None) -> torch.Tensor:
    """The causal mask of The Annotated Transformer's ``subsequent_mask``: bool (1, size, size),
    **True = may attend** (position i sees j <= i: the lower triangle with the diagonal).

    That is the convention of ``vae_ext.masked_attention`` / SDPA (``attn_mask`` True =
    attend; the leading 1 broadcasts over the batch). The modules of ``vae_ext.nn``
    (``MultiheadAttention``, the Transformer layers) take torch's opposite convention
    (True = not allowed): give them ``generate_square_subsequent_mask(size)``, or
    ``~subsequent_mask(size)[0]``.
    """
    if isinstance(size, bool) or not isinstance(size, int) or size < 0:
        raise ValueError(f"subsequent_mask: size must be an int >= 0, got {size!r}")
    return torch.ones(1, size, size, dtype=torch.bool, device=device).tril()


class TransformerEncoderLayer(nn.Module):
    r"""Encoder layer of the original Transformer (self-attention + position-wise feed-forward,
    each wrapped in residual + dropout + LayerNorm), on ``vae_ext.masked_attention``.

    Same constructor, forward, parameter names and initialisation as
    ``torch.nn.TransformerEncoderLayer``: ``load_state_dict`` from a torch layer works and
    the outputs match it (eval mode)::

        layer = vae_ext.nn.TransformerEncoderLayer(d_model=64, nhead=4, batch_first=True)
        y = layer(x, src_key_padding_mask=pad)            # pad: (N, S) bool, True = padding

    ``norm_first=False`` is post-norm, x = norm(x + sublayer(x)); ``True`` is pre-norm,
    x = x + sublayer(norm(x)). ``activation`` is 'relu', 'gelu' or any callable. Masks follow
    torch's conventions (see ``vae_ext.nn.MultiheadAttention``): ``src_mask`` bool **True = not
    allowed** (``generate_square_subsequent_mask``, not ``subsequent_mask``) or additive float;
    ``src_key_padding_mask`` True = padding. ``is_causal=True`` needs no ``src_mask``. The
    attention never materialises the weights.
    """

    def __init__(self, d_model: int, nhead: int, dim_feedforward: int = 2048, dropout: float = 0.1,
                 activation: str | Callable[[torch.Tensor], torch.Tensor] = F.relu, layer_norm_eps: float = 1e-5,
                 batch_first: bool = False, norm_first: bool = False, bias: bool = True, device=None,
                 dtype=None) -> None:
        super().__init__()
        fk = {"device": device, "dtype": dtype}
        self.self_attn = MultiheadAttention(d_model, nhead, dropout=dropout, bias=bias, batch_first=batch_first,
                                            **fk)
        self.linear1 = nn.Linear(d_model, dim_feedforward, bias=bias, **fk)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model, bias=bias, **fk)
        self.norm_first = norm_first
        self.norm1 = nn.LayerNorm(d_model, eps=layer_norm_eps, bias=bias, **fk)
        self.norm2 = nn.LayerNorm(d_model, eps=layer_norm_eps, bias=bias, **fk)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.activation = _activation(activation)
        self.activation_relu_or_gelu = _relu_or_gelu(self.activation)

    @classmethod
    def from_torch(cls, layer: nn.TransformerEncoderLayer) -> "TransformerEncoderLayer":
        """A copy of a ``torch.nn.TransformerEncoderLayer`` (weights, dropout rates, mode) on the fused attention."""
        w = layer.linear1.weight
        new = cls(layer.self_attn.embed_dim, layer.self_attn.num_heads, layer.linear1.out_features,
                  layer.dropout.p, layer.activation, layer.norm1.eps, layer.self_attn.batch_first, layer.norm_first,
                  layer.linear1.bias is not None, device=w.device, dtype=w.dtype)
        _copy_from(new, layer, ("dropout", "dropout1", "dropout2"), ("self_attn",))
        return new

    def forward(self, src: torch.Tensor, src_mask: torch.Tensor | None = None,
                src_key_padding_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        x = src
        if self.norm_first:
            x = x + self._sa_block(self.norm1(x), src_mask, src_key_padding_mask, is_causal)
            x = x + self._ff_block(self.norm2(x))
        else:
            x = self.norm1(x + self._sa_block(x, src_mask, src_key_padding_mask, is_causal))
            x = self.norm2(x + self._ff_block(x))
        return x

    def _sa_block(self, x, attn_mask, key_padding_mask, is_causal):
        x = self.self_attn(x, x, x, attn_mask=attn_mask, key_padding_mask=key_padding_mask, need_weights=False,
                           is_causal=bool(is_causal))[0]
        return self.dropout1(x)

    def _ff_block(self, x):
        return self.dropout2(self.linear2(self.dropout(self.activation(self.linear1(x)))))


class TransformerDecoderLayer(nn.Module):
    r"""Decoder layer of the original Transformer (causal self-attention, cross-attention to the
    encoder memory, position-wise feed-forward; residual + dropout + LayerNorm around each),
    on ``vae_ext.masked_attention``.

    Same constructor, forward, parameter names and initialisation as
    ``torch.nn.TransformerDecoderLayer``::

        layer = vae_ext.nn.TransformerDecoderLayer(d_model=64, nhead=4, batch_first=True)
        y = layer(tgt, memory, tgt_is_causal=True, memory_key_padding_mask=src_pad)

    Masks: torch's convention: a bool mask is **True = not allowed** (``generate_square_subsequent_mask``,
    not the Annotated Transformer's ``subsequent_mask``, which is True = may attend), a float
    mask is added to the scores; key padding masks are True = padding.
    ``tgt_is_causal=True`` applies the causal mask without a ``tgt_mask`` (torch needs one);
    ``generate_square_subsequent_mask(T)`` builds it explicitly (torch's convention, True =
    not allowed; ``subsequent_mask`` is the Annotated Transformer's opposite one).
    """

    def __init__(self, d_model: int, nhead: int, dim_feedforward: int = 2048, dropout: float = 0.1,
                 activation: str | Callable[[torch.Tensor], torch.Tensor] = F.relu, layer_norm_eps: float = 1e-5,
                 batch_first: bool = False, norm_first: bool = False, bias: bool = True, device=None,
                 dtype=None) -> None:
        super().__init__()
        fk = {"device": device, "dtype": dtype}
        self.self_attn = MultiheadAttention(d_model, nhead, dropout=dropout, batch_first=batch_first, bias=bias,
                                            **fk)
        self.multihead_attn = MultiheadAttention(d_model, nhead, dropout=dropout, batch_first=batch_first,
                                                 bias=bias, **fk)
        self.linear1 = nn.Linear(d_model, dim_feedforward, bias=bias, **fk)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model, bias=bias, **fk)
        self.norm_first = norm_first
        self.norm1 = nn.LayerNorm(d_model, eps=layer_norm_eps, bias=bias, **fk)
        self.norm2 = nn.LayerNorm(d_model, eps=layer_norm_eps, bias=bias, **fk)
        self.norm3 = nn.LayerNorm(d_model, eps=layer_norm_eps, bias=bias, **fk)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.dropout3 = nn.Dropout(dropout)
        self.activation = _activation(activation)

    @classmethod
    def from_torch(cls, layer: nn.TransformerDecoderLayer) -> "TransformerDecoderLayer":
        """A copy of a ``torch.nn.TransformerDecoderLayer`` (weights, dropout rates, mode) on the fused attention."""
        w = layer.linear1.weight
        new = cls(layer.self_attn.embed_dim, layer.self_attn.num_heads, layer.linear1.out_features,
                  layer.dropout.p, layer.activation, layer.norm1.eps, layer.self_attn.batch_first, layer.norm_first,
                  layer.linear1.bias is not None, device=w.device, dtype=w.dtype)
        _copy_from(new, layer, ("dropout", "dropout1", "dropout2", "dropout3"), ("self_attn", "multihead_attn"))
        return new

    def forward(self, tgt: torch.Tensor, memory: torch.Tensor, tgt_mask: torch.Tensor | None = None,
                memory_mask: torch.Tensor | None = None, tgt_key_padding_mask: torch.Tensor | None = None,
                memory_key_padding_mask: torch.Tensor | None = None, tgt_is_causal: bool = False,
                memory_is_causal: bool = False) -> torch.Tensor:
        x = tgt
        if self.norm_first:
            x = x + self._sa_block(self.norm1(x), tgt_mask, tgt_key_padding_mask, tgt_is_causal)
            x = x + self._mha_block(self.norm2(x), memory, memory_mask, memory_key_padding_mask, memory_is_causal)
            x = x + self._ff_block(self.norm3(x))
        else:
            x = self.norm1(x + self._sa_block(x, tgt_mask, tgt_key_padding_mask, tgt_is_causal))
            x = self.norm2(x + self._mha_block(x, memory, memory_mask, memory_key_padding_mask, memory_is_causal))
            x = self.norm3(x + self._ff_block(x))
        return x

    def _sa_block(self, x, attn_mask, key_padding_mask, is_causal):
        x = self.self_attn(x, x, x, attn_mask=attn_mask, key_padding_mask=key_padding_mask, need_weights=False,
                           is_causal=bool(is_causal))[0]
        return self.dropout1(x)

    def _mha_block(self, x, mem, attn_mask, key_padding_mask, is_causal):
        x = self.multihead_attn(x, mem, mem, attn_mask=attn_mask, key_padding_mask=key_padding_mask,
                                need_weights=False, is_causal=bool(is_causal))[0]
        return self.dropout2(x)

    def _ff_block(self, x):
        return self.dropout3(self.linear2(self.dropout(self.activation(self.linear1(x)))))


def _copy_from(new: nn.Module, old: nn.Module, dropouts, attns) -> None:
    new.load_state_dict(old.state_dict())
    for name in dropouts:
        getattr(new, name).p = getattr(old, name).p
    for name in attns:
        getattr(new, name).dropout = getattr(old, name).dropout
    for name, p in old.named_parameters():
        new.get_parameter(name).requires_grad_(p.requires_grad)
    new.train(old.training)


class TransformerEncoder(nn.Module):
    """A stack of ``num_layers`` copies of ``encoder_layer`` and an optional final norm, as
    ``torch.nn.TransformerEncoder`` (same state_dict keys: ``layers.<i>.*``, ``norm.*``).

    ``enable_nested_tensor`` and ``mask_check`` are accepted for compatibility and ignored
    (no nested-tensor path). ``is_causal=None`` uses ``mask`` as given (no data-dependent
    check whether it is causal, so the stack compiles without graph breaks).

    Masks: torch's convention: a bool mask is **True = not allowed** (``generate_square_subsequent_mask``,
    not the Annotated Transformer's ``subsequent_mask``, which is True = may attend), a float
    mask is added to the scores; key padding masks are True = padding.
    """

    def __init__(self, encoder_layer: nn.Module, num_layers: int, norm: nn.Module | None = None,
                 enable_nested_tensor: bool = True, mask_check: bool = True) -> None:
        super().__init__()
        self.layers = nn.ModuleList([copy.deepcopy(encoder_layer) for _ in range(num_layers)])
        self.num_layers = num_layers
        self.norm = norm

    def forward(self, src: torch.Tensor, mask: torch.Tensor | None = None,
                src_key_padding_mask: torch.Tensor | None = None, is_causal: bool | None = None) -> torch.Tensor:
        out = src
        for layer in self.layers:
            out = layer(out, src_mask=mask, src_key_padding_mask=src_key_padding_mask, is_causal=bool(is_causal))
        return self.norm(out) if self.norm is not None else out


class TransformerDecoder(nn.Module):
    """A stack of ``num_layers`` copies of ``decoder_layer`` and an optional final norm, as
    ``torch.nn.TransformerDecoder`` (same state_dict keys).

    Masks (``tgt_mask``, ``memory_mask``, the key padding masks): torch's convention: a bool mask is **True = not allowed** (``generate_square_subsequent_mask``,
    not the Annotated Transformer's ``subsequent_mask``, which is True = may attend), a float
    mask is added to the scores; key padding masks are True = padding.
    """

    def __init__(self, decoder_layer: nn.Module, num_layers: int, norm: nn.Module | None = None) -> None:
        super().__init__()
        self.layers = nn.ModuleList([copy.deepcopy(decoder_layer) for _ in range(num_layers)])
        self.num_layers = num_layers
        self.norm = norm

    def forward(self, tgt: torch.Tensor, memory: torch.Tensor, tgt_mask: torch.Tensor | None = None,
                memory_mask: torch.Tensor | None = None, tgt_key_padding_mask: torch.Tensor | None = None,
                memory_key_padding_mask: torch.Tensor | None = None, tgt_is_causal: bool | None = None,
                memory_is_causal: bool = False) -> torch.Tensor:
        out = tgt
        for layer in self.layers:
            out = layer(out, memory, tgt_mask=tgt_mask, memory_mask=memory_mask,
                        tgt_key_padding_mask=tgt_key_padding_mask, memory_key_padding_mask=memory_key_padding_mask,
                        tgt_is_causal=bool(tgt_is_causal), memory_is_causal=memory_is_causal)
        return self.norm(out) if self.norm is not None else out


# ----------------------------------------------------------------------------- positional encodings

def sinusoidal_table(max_len: int, d_model: int, dtype: torch.dtype = torch.float32, device=None) -> torch.Tensor:
    """The (max_len, d_model) sinusoidal table of Vaswani et al.:
    PE[pos, 2i] = sin(pos / 10000^(2i/d)), PE[pos, 2i+1] = cos(pos / 10000^(2i/d))."""
    pos = torch.arange(max_len, dtype=torch.float64, device=device)[:, None]
    i = torch.arange(0, d_model, 2, dtype=torch.float64, device=device)
    angle = pos * torch.exp(-math.log(10000.0) * i / d_model)
    pe = torch.zeros(max_len, d_model, dtype=torch.float64, device=device)
    pe[:, 0::2] = torch.sin(angle)
    pe[:, 1::2] = torch.cos(angle[:, : d_model // 2])
    return pe.to(dtype)


class _PositionBase(nn.Module):
    def __init__(self, d_model: int, max_len: int, dropout: float, batch_first: bool) -> None:
        super().__init__()
        if d_model <= 0 or max_len <= 0:
            raise ValueError(f"{type(self).__name__}: d_model and max_len must be > 0, got {d_model}, {max_len}")
        self.d_model, self.max_len, self.batch_first = d_model, max_len, batch_first
        self.dropout = nn.Dropout(dropout)

    def _add(self, x: torch.Tensor, table: torch.Tensor, offset: int) -> torch.Tensor:
        if x.dim() not in (2, 3) or x.shape[-1] != self.d_model:
            raise ValueError(f"{type(self).__name__}: x must be (S, E), (S, N, E) or (N, S, E) with E = "
                             f"{self.d_model}, got shape {tuple(x.shape)}")
        seq_dim = 1 if (x.dim() == 3 and self.batch_first) else 0
        length = x.shape[seq_dim]
        if offset + length > self.max_len:
            raise ValueError(f"{type(self).__name__}: positions {offset}..{offset + length - 1} exceed "
                             f"max_len={self.max_len}")
        pe = table[offset: offset + length].to(x.dtype)
        if x.dim() == 3 and not self.batch_first:
            pe = pe[:, None, :]
        return self.dropout(x + pe)


class PositionalEncoding(_PositionBase):
    """Adds the fixed sinusoidal positional encoding, then dropout (Vaswani et al. §3.5).

    Input (S, N, E), or (N, S, E) with ``batch_first=True``, or (S, E); ``offset`` shifts the
    positions (incremental decoding). The table is a non-persistent buffer (not in the state_dict).
    """

    def __init__(self, d_model: int, dropout: float = 0.1, max_len: int = 5000, batch_first: bool = False) -> None:
        super().__init__(d_model, max_len, dropout, batch_first)
        self.register_buffer("pe", sinusoidal_table(max_len, d_model), persistent=False)

    def forward(self, x: torch.Tensor, offset: int = 0) -> torch.Tensor:
        return self._add(x, self.pe, offset)


class LearnedPositionalEncoding(_PositionBase):
    """Adds a learned position embedding (``weight``: (max_len, d_model)), then dropout."""

    def __init__(self, d_model: int, dropout: float = 0.1, max_len: int = 512, batch_first: bool = False,
                 device=None, dtype=None) -> None:
        super().__init__(d_model, max_len, dropout, batch_first)
        self.weight = nn.Parameter(torch.empty(max_len, d_model, device=device, dtype=dtype))
        nn.init.normal_(self.weight, std=0.02)

    def forward(self, x: torch.Tensor, offset: int = 0) -> torch.Tensor:
        return self._add(x, self.weight, offset)
