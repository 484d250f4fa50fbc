"""Tiny models with the API of vae_ext.models, for the CLI tests until vae_ext.models lands.

forward(x) -> (loss, recon, kl, ...) means over the batch, with a settable `beta`;
encode(x) -> an object with .mean and .logvar; images: decode(z) -> logits, to_data(logits);
text: decode(z, max_len) -> greedy token ids. They call the real vae_ext ops.
"""

from types import SimpleNamespace

import torch
from torch import nn

import vae_ext


class TinyImageVAE(nn.Module):
    def __init__(self, shape, latent):
        super().__init__()
        self.shape, self.beta = tuple(shape), 1.0
        n = self.shape[0] * self.shape[1] * self.shape[2]
        self.enc = nn.Sequential(nn.Flatten(), nn.Linear(n, 32), nn.ReLU(), nn.Linear(32, 2 * latent))
        self.dec = nn.Sequential(nn.Linear(latent, 32), nn.ReLU(), nn.Linear(32, n))

    def encode(self, x):
        mean, logvar = self.enc(x).chunk(2, dim=-1)
        return SimpleNamespace(mean=mean, logvar=logvar)

    def decode(self, z):
        return self.dec(z).view(z.shape[0], *self.shape)

    def to_data(self, logits):
        return torch.sigmoid(logits)

    def forward(self, x):
        q = self.encode(x)
        z = vae_ext.reparameterize(q.mean, q.logvar)
        return vae_ext.elbo_loss(self.decode(z), x, q.mean, q.logvar, likelihood="bernoulli", beta=self.beta)


class TinyTextVAE(nn.Module):
    def __init__(self, vocab_size, latent, max_len, pad_id, bos_id, d=16):
        super().__init__()
        self.pad_id, self.bos_id, self.max_len, self.beta = pad_id, bos_id, max_len, 1.0
        self.emb = nn.Embedding(vocab_size, d)
        self.pos = nn.Embedding(max_len, d)
        self.qkv = nn.Linear(d, 3 * d)
        self.to_stats = nn.Linear(d, 2 * latent)
        self.from_z = nn.Linear(latent, d)
        self.out = nn.Linear(d, vocab_size)

    def encode(self, tokens):
        pad = tokens == self.pad_id
        h = self.emb(tokens) + self.pos.weight[:tokens.shape[1]]
        q, k, v = self.qkv(h).unsqueeze(1).chunk(3, dim=-1)  # one head
        h = vae_ext.masked_attention(q, k, v, key_padding_mask=pad).squeeze(1)
        keep = (~pad).unsqueeze(-1).to(h.dtype)
        mean, logvar = self.to_stats((h * keep).sum(1) / keep.sum(1)).chunk(2, dim=-1)
        return SimpleNamespace(mean=mean, logvar=logvar)

    def _logits(self, z, prev):
        h = self.emb(prev) + self.pos.weight[:prev.shape[1]] + self.from_z(z).unsqueeze(1)
        return self.out(torch.tanh(h))

    def forward(self, tokens):
        q = self.encode(tokens)
        z = vae_ext.reparameterize(q.mean, q.logvar)
        logits = self._logits(z, tokens[:, :-1])
        return vae_ext.elbo_loss(logits, tokens[:, 1:], q.mean, q.logvar, likelihood="categorical", beta=self.beta,
                                 ignore_index=self.pad_id)

    @torch.no_grad()
    def decode(self, z, max_len=None):
        out = torch.full((z.shape[0], 1), self.bos_id, dtype=torch.int64, device=z.device)
        for _ in range((max_len or self.max_len) - 1):
            nxt = self._logits(z, out)[:, -1].argmax(-1, keepdim=True)
            out = torch.cat([out, nxt], dim=1)
        return out


def build(kind, **kw):
    if kind == "transformer":
        return TinyTextVAE(kw["vocab_size"], kw["latent"], kw["max_len"], kw["pad_id"], kw["bos_id"])
    return TinyImageVAE(kw["shape"], kw["latent"])


BUILDERS = {k: (lambda k: (lambda **kw: build(k, **kw)))(k) for k in ("conv", "mlp", "transformer")}


def install():
    """Make the CLI build these models instead of vae_ext.models."""
    from vae_ext import train

    train.MODEL_BUILDERS.update(BUILDERS)
