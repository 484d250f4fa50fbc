"""What the image/vector models share: the three autoencoder modes, corruption, the ELBO, sampling."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from vae_ext.nn.distributions import DiagonalGaussian
from vae_ext.nn.losses import ELBOLoss

AUTOENCODER_MODES = ("vae", "ae", "denoising")
CORRUPTIONS = ("mask", "gaussian")


class VAEOutput(NamedTuple):
    """What a model's forward returns.

    loss: the training loss, mean over the batch: −ELBO = recon + beta·kl for a VAE, recon
        for a plain or denoising autoencoder.
    recon: reconstruction NLL per sample (batch mean). kl: KL(q(z|x) || N(0, I)) per sample
        (batch mean; 0 for the autoencoders).
    x_hat: the decoder output for the input: logits (bernoulli, categorical) or the mean (gaussian).
    mu, logvar: the posterior parameters (logvar None for the autoencoders, whose mu is the code).
    z: the latent code the decoder saw (a sample for a VAE).
    """

    loss: torch.Tensor
    recon: torch.Tensor
    kl: torch.Tensor
    x_hat: torch.Tensor
    mu: torch.Tensor
    logvar: torch.Tensor | None
    z: torch.Tensor


def randn(shape, generator, device, dtype=None, uniform: bool = False) -> torch.Tensor:
    """torch.randn (or torch.rand) on `device`, drawn on the generator's device when it has one."""
    where = generator.device if generator is not None else device
    fn = torch.rand if uniform else torch.randn
    return fn(shape, generator=generator, device=where, dtype=dtype).to(device)


def check_choice(owner: str, name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{owner}: {name} must be one of {choices}, got {value!r}")


class LatentAutoencoder(nn.Module):
    """Base of VAE and ConvVAE: subclasses build ``self.encoder`` (data -> features of size
    ``self.encoder_out_features``) and ``self.decoder`` (latent -> decoder output)."""

    def __init__(self, latent_dim: int, likelihood: str, beta: float, free_bits: float, autoencoder_mode: str,
                 corruption: float, corruption_type: str, obs_logvar) -> None:
        super().__init__()
        name = type(self).__name__
        if isinstance(latent_dim, bool) or not isinstance(latent_dim, int) or latent_dim < 1:
            raise ValueError(f"{name}: latent_dim must be an int >= 1, got {latent_dim!r}")
        check_choice(name, "likelihood", likelihood, ("bernoulli", "gaussian"))
        check_choice(name, "autoencoder_mode", autoencoder_mode, AUTOENCODER_MODES)
        check_choice(name, "corruption_type", corruption_type, CORRUPTIONS)
        if not 0.0 <= corruption < (1.0 if corruption_type == "mask" else float("inf")):
            raise ValueError(f"{name}: corruption must be in [0, 1) for masking noise or >= 0 for gaussian noise, "
                             f"got {corruption!r}")
        self.latent_dim, self.likelihood, self.autoencoder_mode = latent_dim, likelihood, autoencoder_mode
        self.corruption, self.corruption_type = float(corruption), corruption_type
        self.loss_fn = ELBOLoss(likelihood, beta=beta, reduction="mean", free_bits=free_bits, obs_logvar=obs_logvar)

    @property
    def variational(self) -> bool:
        return self.autoencoder_mode == "vae"

    @property
    def encoder_out_features(self) -> int:
        return 2 * self.latent_dim if self.variational else self.latent_dim

    @property
    def beta(self) -> float:
        return self.loss_fn.beta

    @beta.setter
    def beta(self, value: float) -> None:
        self.loss_fn.beta = value

    def _check_input(self, x: torch.Tensor) -> None:  # overridden by subclasses
        pass

    def encode(self, x: torch.Tensor) -> DiagonalGaussian:
        """The posterior q(z|x) as a DiagonalGaussian (mean, logvar of shape (N, latent_dim));
        for the autoencoders a deterministic one whose mean is the code."""
        self._check_input(x)
        h = self.encoder(x)
        if self.variational:
            return DiagonalGaussian(h, dim=1)
        return DiagonalGaussian.from_mean_logvar(h, torch.zeros_like(h), deterministic=True)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """The decoder output for codes z (N, latent_dim): logits (bernoulli) or the mean (gaussian)."""
        if z.dim() != 2 or z.shape[1] != self.latent_dim:
            raise ValueError(f"{type(self).__name__}.decode: z must be (N, latent_dim={self.latent_dim}), got shape "
                             f"{tuple(z.shape)}")
        return self.decoder(z)

    def to_data(self, x_hat: torch.Tensor) -> torch.Tensor:
        """Decoder output -> data space: probabilities (bernoulli) or the mean (gaussian)."""
        return torch.sigmoid(x_hat) if self.likelihood == "bernoulli" else x_hat

    def corrupt(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """The denoising autoencoder's input corruption: masking noise (each input set to 0
        with probability ``corruption``) or additive gaussian noise of std ``corruption``."""
        if self.corruption == 0.0:
            return x
        if self.corruption_type == "mask":
            keep = randn(x.shape, generator, x.device, uniform=True) >= self.corruption
            return x * keep
        return x + self.corruption * randn(x.shape, generator, x.device, x.dtype)

    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None) -> VAEOutput:
        """The loss and its parts for a batch x. In 'denoising' mode the input is corrupted
        (training mode only) and the clean x is the target."""
        inp = self.corrupt(x, generator) if self.autoencoder_mode == "denoising" and self.training else x
        posterior = self.encode(inp)
        z = posterior.sample(generator) if self.variational else posterior.mean
        x_hat = self.decode(z)
        elbo = self.loss_fn(x_hat, x, posterior)
        return VAEOutput(elbo.loss, elbo.recon, elbo.kl, x_hat, posterior.mean,
                         posterior.logvar if self.variational else None, z)

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """Decode the posterior mode of x, in data space."""
        return self.to_data(self.decode(self.encode(x).mode()))

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """n samples in data space (probabilities for bernoulli, the mean for gaussian): the
        decoding of z ~ N(0, I). Meaningful for a VAE; an autoencoder's code space has no prior."""
        p = next(self.parameters())
        z = randn((n, self.latent_dim), generator, p.device, p.dtype)
        return self.to_data(self.decode(z))
