"""Pure-PyTorch definitions of every vae_ext operator.

They are the fallback when the compiled extension is missing or does not
support an input, and the oracle the parity tests compare the kernels with.
Each follows the operator contract in DESIGN.md exactly, written for clarity,
not speed.
"""

from __future__ import annotations

import math

import torch

from vae_ext._types import ELBO


def reparameterize(mu: torch.Tensor, logvar: torch.Tensor, eps: torch.Tensor | None = None,
                   generator: torch.Generator | None = None, num_samples: int = 1,
                   seed: int | None = None) -> torch.Tensor:
    """z = mu + eps * exp(0.5 * logvar), eps ~ N(0, I) unless given.

    Returns mu's (broadcast) shape for num_samples == 1, else (num_samples, *shape).
    With `seed`, eps is the kernels' Philox stream (the same numbers up to float
    rounding); otherwise torch.randn from `generator`: the same distribution,
    not the same numbers.
    """
    shape = torch.broadcast_shapes(mu.shape, logvar.shape)
    if num_samples > 1:
        shape = (num_samples, *shape)
    if eps is None:
        if seed is not None:  # exactly the kernels' stream, up to float rounding
            eps = philox_normal(seed, shape, dtype=mu.dtype, device=mu.device)
        else:
            eps = torch.randn(shape, generator=generator, dtype=mu.dtype, device=mu.device)
    return mu + eps * torch.exp(0.5 * logvar)


# ----------------------------------------------------------------------------- Philox stream
# The kernels' random stream (csrc/common/philox.h), written with int64 tensor
# ops, so that in the explicit-seed mode the reference draws exactly what the
# kernels draw: the same dropout keep-mask, the same eps up to float rounding.

_MASK32 = 0xFFFFFFFF


def _mulhilo32(a: torch.Tensor, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """High and low 32-bit words of a * m for int64 tensors `a` holding uint32 values."""
    p_lo = (a & 0xFFFF) * m  # < 2**48
    p_hi = (a >> 16) * m  # < 2**48
    low = p_lo + ((p_hi & 0xFFFF) << 16)  # < 2**49
    return ((p_hi >> 16) + (low >> 32)) & _MASK32, low & _MASK32


def philox_bits(seed: int, counter_lo: int, counter_hi: torch.Tensor) -> list[torch.Tensor]:
    """The four 32-bit words (as int64 tensors) of Philox-4x32-10 blocks with key `seed`,
    counter (counter_lo, counter_hi) for every value of the int64 tensor counter_hi."""
    seed &= 0xFFFFFFFFFFFFFFFF
    c0 = torch.full_like(counter_hi, counter_lo & _MASK32)
    c1 = torch.full_like(counter_hi, (counter_lo >> 32) & _MASK32)
    c2 = counter_hi & _MASK32
    c3 = (counter_hi >> 32) & _MASK32
    k0, k1 = seed & _MASK32, (seed >> 32) & _MASK32
    for _ in range(10):
        hi0, lo0 = _mulhilo32(c0, 0xD2511F53)
        hi1, lo1 = _mulhilo32(c2, 0xCD9E8D57)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0, k1 = (k0 + 0x9E3779B9) & _MASK32, (k1 + 0xBB67AE85) & _MASK32
    return [c0, c1, c2, c3]


def philox_normal(seed: int, shape, dtype=torch.float32, device=None) -> torch.Tensor:
    """N(0, 1) draws of the kernels' stream for flat elements 0..numel-1 (offset 0)."""
    n = 1
    for s in shape:
        n *= s
    groups = torch.arange((n + 3) // 4, dtype=torch.int64, device=device)
    x, y, z, w = philox_bits(seed, 0, groups)
    acc = torch.float64 if dtype == torch.float64 else torch.float32

    def pair(a, b):
        u1 = ((a >> 8) + 1).to(acc) * 2.0**-24
        u2 = (b >> 8).to(acc) * 2.0**-24
        r = torch.sqrt(-2.0 * torch.log(u1))
        return r * torch.cos(2 * torch.pi * u2), r * torch.sin(2 * torch.pi * u2)

    n0, n1 = pair(x, y)
    n2, n3 = pair(z, w)
    return torch.stack([n0, n1, n2, n3], dim=1).flatten()[:n].reshape(shape).to(dtype)


def dropout_keep_mask(seed: int, shape, dropout_p: float, device=None) -> torch.Tensor:
    """The attention kernels' dropout keep-mask for probabilities of shape (B, H, Sq, Sk).

    Element (b, h, i, j) uses word j % 4 of the Philox block with counter
    (offset / 4, row * ceil(Sk / 4) + j / 4), row = (b * H + h) * Sq + i; it is
    kept iff (word >> 8) >= ceil(dropout_p * 2**24).
    """
    b, h, sq, sk = shape
    groups_per_row = (sk + 3) // 4
    rows = torch.arange(b * h * sq, dtype=torch.int64, device=device)
    group = rows[:, None] * groups_per_row + torch.arange(groups_per_row, dtype=torch.int64, device=device)
    words = torch.stack(philox_bits(seed, 0, group), dim=-1).reshape(b * h * sq, groups_per_row * 4)[:, :sk]
    threshold = math.ceil(dropout_p * 2**24)
    return ((words >> 8) >= threshold).reshape(b, h, sq, sk)


# ----------------------------------------------------------------------------- attention

def masked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None = None,
                     key_padding_mask: torch.Tensor | None = None, is_causal: bool = False,
                     scale: float | None = None, dropout_p: float = 0.0, generator: torch.Generator | None = None,
                     seed: int | None = None, causal_alignment: str = "upper_left") -> torch.Tensor:
    """softmax(q kᵀ · scale + mask) v with every mask kind of vae_ext.masked_attention.

    q (B, H, Sq, D); k, v (B, Hkv, Sk, D) with H a multiple of Hkv. `is_causal`:
    query i sees keys j <= i (causal_alignment "upper_left", as SDPA) or
    j <= i + Sk - Sq ("lower_right", KV-cache decoding). `key_padding_mask`
    (B, Sk) bool, True = ignore. `attn_mask` bool (True = attend) or additive
    float, broadcastable to (B, H, Sq, Sk). Masks intersect; a row that sees no
    key gives zeros. Dropout: with `seed`, exactly the kernels' keep-mask; else
    drawn with torch.rand from `generator`.
    """
    b, h, sq, d = q.shape
    hkv, sk = k.shape[1], k.shape[2]
    if hkv != h:
        k = k.repeat_interleave(h // hkv, dim=1)
        v = v.repeat_interleave(h // hkv, dim=1)
    if scale is None:
        scale = 1.0 / math.sqrt(d)
    scores = torch.matmul(q, k.transpose(-2, -1)) * scale
    visible = torch.ones(sq, sk, dtype=torch.bool, device=q.device)
    if is_causal:
        visible = torch.tril(visible, diagonal=sk - sq if causal_alignment == "lower_right" else 0)
    visible = visible.expand(b, h, sq, sk)
    if key_padding_mask is not None:
        visible = visible & ~key_padding_mask[:, None, None, :]
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            visible = visible & attn_mask
        else:  # -inf hides the key as False does (so a NaN score there does not leak)
            visible = visible & (attn_mask != float("-inf"))
            scores = scores + attn_mask.to(scores.dtype)
    scores = scores.masked_fill(~visible, float("-inf"))
    row_max = scores.amax(dim=-1, keepdim=True)
    empty = torch.isneginf(row_max)  # the row sees no key: its probabilities are zero
    weights = torch.exp(scores - torch.where(empty, torch.zeros_like(row_max), row_max))
    probs = weights / weights.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(weights.dtype).tiny)
    probs = probs.masked_fill(empty, 0.0)
    if dropout_p > 0.0:
        if seed is not None:
            keep = dropout_keep_mask(seed, (b, h, sq, sk), dropout_p, device=q.device)
        else:
            keep = torch.rand((b, h, sq, sk), generator=generator, device=q.device) >= dropout_p
        probs = probs * keep / (1.0 - dropout_p)
    return torch.matmul(probs, v)


# ----------------------------------------------------------------------------- ELBO

_LOG_2PI = math.log(2 * math.pi)


def gaussian_kl(mu: torch.Tensor, logvar: torch.Tensor, prior_mu: torch.Tensor | None = None,
                prior_logvar: torch.Tensor | None = None) -> torch.Tensor:
    """Elementwise KL(N(mu, exp(logvar)) || prior), prior N(0, I) unless prior_mu / prior_logvar are given."""
    if prior_mu is None and prior_logvar is None:
        return 0.5 * (mu * mu + torch.exp(logvar) - 1.0 - logvar)
    pm = torch.zeros_like(mu) if prior_mu is None else prior_mu
    plv = torch.zeros_like(logvar) if prior_logvar is None else prior_logvar
    return 0.5 * (plv - logvar + (torch.exp(logvar) + (mu - pm) ** 2) * torch.exp(-plv) - 1.0)


def _per_sample(t: torch.Tensor, batch: int) -> torch.Tensor:
    """(batch, elements per sample); an empty batch gives (0, 0)."""
    return t.reshape(batch, -1) if batch > 0 else t.reshape(0, 0)


def elbo_loss(recon: torch.Tensor, target: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor,
              likelihood: str = "bernoulli", beta: float = 1.0, reduction: str = "mean",
              prior_mu: torch.Tensor | None = None, prior_logvar: torch.Tensor | None = None,
              free_bits: float = 0.0, ignore_index: int = -100, obs_logvar=None, recon_probs: bool = False) -> ELBO:
    """Negative ELBO = reconstruction NLL + beta * KL, per sample (dim 0 is the batch).

    See vae_ext.elbo_loss for the full contract, free bits included.
    """
    import torch.nn.functional as F

    batch = recon.shape[0]
    if likelihood == "bernoulli" and recon_probs:  # recon are probabilities
        nll = F.binary_cross_entropy(recon, target, reduction="none")
    elif likelihood == "bernoulli":
        nll = F.binary_cross_entropy_with_logits(recon, target, reduction="none")
    elif likelihood == "gaussian":
        if obs_logvar is None:
            nll = (recon - target) ** 2
        else:
            if not isinstance(obs_logvar, torch.Tensor):
                obs_logvar = torch.tensor(float(obs_logvar), dtype=recon.dtype, device=recon.device)
            nll = 0.5 * (_LOG_2PI + obs_logvar + (target - recon) ** 2 * torch.exp(-obs_logvar))
    elif likelihood == "categorical":
        vocab = recon.shape[-1]
        nll = F.cross_entropy(recon.reshape(-1, vocab), target.reshape(-1), ignore_index=ignore_index,
                              reduction="none").reshape(target.shape)
    else:
        raise ValueError(f"elbo_loss: unknown likelihood {likelihood!r}")
    recon_b = _per_sample(nll, batch).sum(dim=1)

    kl_el = _per_sample(gaussian_kl(mu, logvar, prior_mu, prior_logvar), batch)
    if free_bits > 0.0:
        # Each latent dimension's batch-average KL counts as at least free_bits: below it,
        # every sample contributes the constant free_bits for that dimension (no gradient).
        below = kl_el.mean(dim=0, keepdim=True) < free_bits
        kl_el = torch.where(below, torch.full_like(kl_el, free_bits), kl_el)
    kl_b = kl_el.sum(dim=1)
    loss_b = recon_b + beta * kl_b
    if reduction == "none":
        return ELBO(loss_b, recon_b, kl_b)
    if reduction == "sum":
        return ELBO(loss_b.sum(), recon_b.sum(), kl_b.sum())
    if reduction == "mean":
        return ELBO(loss_b.mean(), recon_b.mean(), kl_b.mean())
    raise ValueError(f"elbo_loss: unknown reduction {reduction!r}")
