"""TransformerVAE: a sequence VAE with a Transformer encoder and decoder on the fused attention."""

from __future__ import annotations

import math

import torch
from torch import nn

from vae_ext.models.base import VAEOutput, randn
from vae_ext.nn.distributions import DiagonalGaussian
from vae_ext.nn.losses import ELBOLoss
from vae_ext.nn.transformer import (PositionalEncoding, TransformerDecoder, TransformerDecoderLayer,
                                    TransformerEncoder, TransformerEncoderLayer)

_NAME = "TransformerVAE"


class TransformerVAE(nn.Module):
    r"""A VAE for token sequences (sentences), on the fused attention, reparameterization and ELBO.

    - Encoder: token embedding + sinusoidal positions, ``num_encoder_layers`` Transformer
      encoder layers with a key padding mask, a mean over the non-padding positions, then a
      linear layer to (mu, logvar).
    - Decoder: z -> ``memory_tokens`` memory vectors; ``num_decoder_layers`` Transformer
      decoder layers with causal self-attention over the tokens so far and cross-attention to
      the memory; a linear layer to vocabulary logits.
    - Loss: categorical ELBO of the teacher-forced next-token logits, padding ignored.

    Sequences are (N, T) int64 ids of the form ``[bos, w1, ..., wk, eos, pad, ...]``
    (right-padded with ``pad_id``). ``model(tokens)`` returns ``VAEOutput(loss, recon, kl,
    x_hat, mu, logvar, z)`` with x_hat the (N, T-1, V) logits predicting ``tokens[:, 1:]``.
    ``encode(tokens)`` gives a ``DiagonalGaussian``; ``decode(z)`` generates token ids
    (greedy, or sampled with ``temperature > 0``); ``sample(n)`` decodes z ~ N(0, I);
    ``decode_logits(z, tokens)`` gives teacher-forced logits.

    Args:
        vocab_size: number of token ids (including pad, bos, eos).
        d_model, nhead, num_encoder_layers, num_decoder_layers, dim_feedforward, dropout,
        activation, norm_first: the Transformer layers' settings.
        latent_dim: size of z. max_len: longest sequence (input and generated).
        pad_id, bos_id, eos_id: the special ids. memory_tokens: memory length made from z.
        beta, free_bits: the KL weight and the free-bits floor per latent dimension
            (free bits help against posterior collapse).
    """

    def __init__(self, vocab_size: int, d_model: int = 128, nhead: int = 4, num_encoder_layers: int = 2,
                 num_decoder_layers: int = 2, dim_feedforward: int = 256, latent_dim: int = 32, max_len: int = 64,
                 dropout: float = 0.1, pad_id: int = 0, bos_id: int = 1, eos_id: int = 2, memory_tokens: int = 4,
                 beta: float = 1.0, free_bits: float = 0.0, activation: str = "gelu", norm_first: bool = True) -> None:
        super().__init__()
        for name, v, lo in (("vocab_size", vocab_size, 3), ("d_model", d_model, 1), ("latent_dim", latent_dim, 1),
                            ("max_len", max_len, 2), ("memory_tokens", memory_tokens, 1)):
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise ValueError(f"{_NAME}: {name} must be an int >= {lo}, got {v!r}")
        ids = {"pad_id": pad_id, "bos_id": bos_id, "eos_id": eos_id}
        for name, v in ids.items():
            if not isinstance(v, int) or not 0 <= v < vocab_size:
                raise ValueError(f"{_NAME}: {name} must be an id in [0, vocab_size={vocab_size}), got {v!r}")
        if len(set(ids.values())) != 3:
            raise ValueError(f"{_NAME}: pad_id, bos_id and eos_id must differ, got {ids}")
        self.vocab_size, self.d_model, self.latent_dim, self.max_len = vocab_size, d_model, latent_dim, max_len
        self.pad_id, self.bos_id, self.eos_id, self.memory_tokens = pad_id, bos_id, eos_id, memory_tokens

        self.embed = nn.Embedding(vocab_size, d_model, padding_idx=pad_id)
        self.pos = PositionalEncoding(d_model, dropout=dropout, max_len=max_len, batch_first=True)
        layer = dict(d_model=d_model, nhead=nhead, dim_feedforward=dim_feedforward, dropout=dropout,
                     activation=activation, batch_first=True, norm_first=norm_first)
        self.encoder = TransformerEncoder(TransformerEncoderLayer(**layer), num_encoder_layers,
                                          norm=nn.LayerNorm(d_model) if norm_first else None)
        self.to_latent = nn.Linear(d_model, 2 * latent_dim)
        self.to_memory = nn.Linear(latent_dim, memory_tokens * d_model)
        self.decoder = TransformerDecoder(TransformerDecoderLayer(**layer), num_decoder_layers,
                                          norm=nn.LayerNorm(d_model) if norm_first else None)
        self.out = nn.Linear(d_model, vocab_size)
        self.loss_fn = ELBOLoss("categorical", beta=beta, reduction="mean", free_bits=free_bits, ignore_index=pad_id)

    @property
    def beta(self) -> float:
        return self.loss_fn.beta

    @beta.setter
    def beta(self, value: float) -> None:
        self.loss_fn.beta = value

    # ------------------------------------------------------------------ pieces

    def _check_tokens(self, tokens: torch.Tensor, what: str = "tokens") -> None:
        if not isinstance(tokens, torch.Tensor) or tokens.dim() != 2 or tokens.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"{_NAME}: {what} must be an (N, T) integer tensor of token ids, got "
                             f"{getattr(tokens, 'dtype', type(tokens).__name__)} "
                             f"{tuple(getattr(tokens, 'shape', ()))}")
        if tokens.shape[1] > self.max_len:
            raise ValueError(f"{_NAME}: {what} has length {tokens.shape[1]} > max_len={self.max_len}")
        if not torch.compiler.is_compiling() and tokens.numel():
            lo, hi = int(tokens.min()), int(tokens.max())
            if lo < 0 or hi >= self.vocab_size:
                raise ValueError(f"{_NAME}: {what} holds ids outside [0, vocab_size={self.vocab_size}): "
                                 f"min {lo}, max {hi}")

    def _embed(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.pos(self.embed(tokens) * math.sqrt(self.d_model))

    def memory(self, z: torch.Tensor) -> torch.Tensor:
        """The decoder's cross-attention memory made from z: (N, memory_tokens, d_model)."""
        if z.dim() != 2 or z.shape[1] != self.latent_dim:
            raise ValueError(f"{_NAME}: z must be (N, latent_dim={self.latent_dim}), got shape {tuple(z.shape)}")
        return self.to_memory(z).view(z.shape[0], self.memory_tokens, self.d_model)

    def encode(self, tokens: torch.Tensor) -> DiagonalGaussian:
        """q(z | tokens) as a DiagonalGaussian with mean and logvar of shape (N, latent_dim)."""
        self._check_tokens(tokens)
        pad = tokens == self.pad_id
        h = self.encoder(self._embed(tokens), src_key_padding_mask=pad)
        keep = (~pad).unsqueeze(-1).to(h.dtype)
        pooled = (h * keep).sum(dim=1) / keep.sum(dim=1).clamp_min(1.0)
        return DiagonalGaussian(self.to_latent(pooled), dim=1)

    def _decode_hidden(self, tokens: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        x = self._embed(tokens)
        h = self.decoder(x, memory, tgt_key_padding_mask=tokens == self.pad_id, tgt_is_causal=True)
        return self.out(h)

    def decode_logits(self, z: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Teacher-forced logits (N, T, V): position t predicts the token after tokens[:, t]."""
        self._check_tokens(tokens)
        return self._decode_hidden(tokens, self.memory(z))

    def forward(self, tokens: torch.Tensor, generator: torch.Generator | None = None) -> VAEOutput:
        """−ELBO of a batch of sequences (N, T): categorical NLL of tokens[:, 1:] given z and
        the tokens before, plus beta·KL; padding positions are ignored."""
        if tokens.dim() == 2 and tokens.shape[1] < 2:
            raise ValueError(f"{_NAME}: sequences need at least 2 tokens (bos and one more), got shape "
                             f"{tuple(tokens.shape)}")
        posterior = self.encode(tokens)
        z = posterior.sample(generator)
        logits = self._decode_hidden(tokens[:, :-1], self.memory(z))
        elbo = self.loss_fn(logits, tokens[:, 1:], posterior)
        return VAEOutput(elbo.loss, elbo.recon, elbo.kl, logits, posterior.mean, posterior.logvar, z)

    # ------------------------------------------------------------------ generation

    @torch.no_grad()
    def decode(self, z: torch.Tensor, max_len: int | None = None, temperature: float = 0.0,
               generator: torch.Generator | None = None) -> torch.Tensor:
        """Generate token ids from codes z (N, latent_dim), autoregressively.

        ``temperature=0`` is greedy decoding (argmax); ``temperature > 0`` samples from
        softmax(logits / temperature) (with ``generator`` if given). Returns (N, L) int64, L <=
        max_len (default ``self.max_len``): each row starts with bos_id and ends with eos_id
        (when produced within max_len), then pad_id. pad and bos are never generated. Runs in
        eval mode (dropout off) and restores the mode.
        """
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature >= 0:
            raise ValueError(f"{_NAME}.decode: temperature must be a float >= 0, got {temperature!r}")
        max_len = self.max_len if max_len is None else max_len
        if isinstance(max_len, bool) or not isinstance(max_len, int) or not 2 <= max_len <= self.max_len:
            raise ValueError(f"{_NAME}.decode: max_len must be an int in [2, {self.max_len}], got {max_len!r}")
        was_training = self.training
        self.eval()
        try:
            memory = self.memory(z)
            n = z.shape[0]
            seq = torch.full((n, 1), self.bos_id, dtype=torch.long, device=z.device)
            done = torch.zeros(n, dtype=torch.bool, device=z.device)
            banned = torch.zeros(self.vocab_size, dtype=torch.bool, device=z.device)
            banned[[self.pad_id, self.bos_id]] = True
            for _ in range(max_len - 1):
                logits = self._decode_hidden(seq, memory)[:, -1].float().masked_fill(banned, -math.inf)
                if temperature == 0:
                    nxt = logits.argmax(dim=-1)
                else:  # Gumbel-max: argmax(logits / T + Gumbel noise) ~ softmax(logits / T)
                    u = randn(logits.shape, generator, logits.device, torch.float32, uniform=True)
                    gumbel = -torch.log(-torch.log(u.clamp_min(1e-20)))
                    nxt = (logits / temperature + gumbel).argmax(dim=-1)
                nxt = nxt.masked_fill(done, self.pad_id)
                seq = torch.cat([seq, nxt[:, None]], dim=1)
                done |= nxt == self.eos_id
                if bool(done.all()):
                    break
            return seq
        finally:
            self.train(was_training)

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None, max_len: int | None = None,
               temperature: float = 0.0) -> torch.Tensor:
        """n sequences decoded from z ~ N(0, I) (see ``decode``)."""
        p = next(self.parameters())
        z = randn((n, self.latent_dim), generator, p.device, p.dtype)
        return self.decode(z, max_len=max_len, temperature=temperature, generator=generator)

    @torch.no_grad()
    def reconstruct(self, tokens: torch.Tensor, max_len: int | None = None) -> torch.Tensor:
        """Greedy decoding of the posterior mean of each sequence."""
        was_training = self.training
        self.eval()
        try:
            z = self.encode(tokens).mode()
        finally:
            self.train(was_training)
        return self.decode(z, max_len=max_len)
