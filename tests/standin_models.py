"""Tiny models with the interface the CLI expects of vae_ext.models, for the CLI tests.

forward(x..., beta) -> ELBO(loss, recon, kl) (means over the batch), encode(x...) -> (mu,
logvar), decode(z) -> logits (images), generate(z, max_len) -> token ids (text). They call the
real vae_ext ops, so the CLI tests exercise the backends too.
"""

import torch
from torch import nn

import vae_ext


class TinyImageVAE(nn.Module):
    def __init__(self, shape, latent):
        super().__init__()
        self.shape = tuple(shape)
        n = self.shape[0] * self.shape[1] * self.shape[2]
        self.enc = nn.Sequential(nn.Flatten(), nn.Linear(n, 32), nn.ReLU(), nn.Linear(32, 2 * latent))
        self.dec = nn.Sequential(nn.Linear(latent, 32), nn.ReLU(), nn.Linear(32, n))

    def encode(self, x):
        return self.enc(x).chunk(2, dim=-1)

    def decode(self, z):
        return self.dec(z).view(z.shape[0], *self.shape)

    def forward(self, x, beta=1.0):
        mu, logvar = self.encode(x)
        z = vae_ext.reparameterize(mu, logvar)
        return vae_ext.elbo_loss(self.decode(z), x, mu, logvar, likelihood="bernoulli", beta=beta)


class TinyTextVAE(nn.Module):
    def __init__(self, vocab_size, latent, max_len, pad_id, d=16):
        super().__init__()
        self.pad_id, self.max_len, self.d = pad_id, max_len, d
        self.emb = nn.Embedding(vocab_size, d)
        self.pos = nn.Embedding(max_len, d)
        self.qkv = nn.Linear(d, 3 * d)
        self.to_stats = nn.Linear(d, 2 * latent)
        self.from_z = nn.Linear(latent, d)
        self.out = nn.Linear(d, vocab_size)

    def encode(self, tokens, key_padding_mask):
        h = self.emb(tokens) + self.pos.weight[:tokens.shape[1]]
        q, k, v = self.qkv(h).unsqueeze(1).chunk(3, dim=-1)  # one head
        h = vae_ext.masked_attention(q, k, v, key_padding_mask=key_padding_mask).squeeze(1)
        keep = (~key_padding_mask).unsqueeze(-1).to(h.dtype)
        pooled = (h * keep).sum(1) / keep.sum(1)
        return self.to_stats(pooled).chunk(2, dim=-1)

    def _logits(self, z, prev):
        h = self.emb(prev) + self.pos.weight[:prev.shape[1]] + self.from_z(z).unsqueeze(1)
        return self.out(torch.tanh(h))

    def forward(self, tokens, key_padding_mask, beta=1.0):
        mu, logvar = self.encode(tokens, key_padding_mask)
        z = vae_ext.reparameterize(mu, logvar)
        logits = self._logits(z, tokens[:, :-1])
        target = tokens[:, 1:].masked_fill(key_padding_mask[:, 1:], -100)
        return vae_ext.elbo_loss(logits, target, mu, logvar, likelihood="categorical", beta=beta,
                                 ignore_index=-100)

    @torch.no_grad()
    def generate(self, z, max_len):
        out = torch.full((z.shape[0], 1), 1, dtype=torch.int64, device=z.device)  # BOS
        for _ in range(max_len - 1):
            nxt = self._logits(z, out)[:, -1].argmax(-1, keepdim=True)
            out = torch.cat([out, nxt], dim=1)
        return out


def build(kind, **kw):
    if kind == "transformer":
        return TinyTextVAE(kw["vocab_size"], kw["latent"], kw["max_len"], kw["pad_id"])
    return TinyImageVAE(kw["shape"], kw["latent"])


BUILDERS = {k: (lambda k: (lambda **kw: build(k, **kw)))(k) for k in ("conv", "mlp", "transformer")}


def install():
    """Make the CLI build these models instead of vae_ext.models."""
    from vae_ext import train

    train.MODEL_BUILDERS.update(BUILDERS)
