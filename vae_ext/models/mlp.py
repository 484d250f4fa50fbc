"""VAE: a multilayer-perceptron encoder and decoder (Kingma & Welling 2014)."""

from __future__ import annotations

import math

import torch
from torch import nn

from vae_ext.models.base import LatentAutoencoder


def _mlp(sizes: list[int], activation: type[nn.Module]) -> list[nn.Module]:
    layers: list[nn.Module] = []
    for a, b in zip(sizes[:-1], sizes[1:]):
        layers += [nn.Linear(a, b), activation()]
    return layers


class VAE(LatentAutoencoder):
    r"""A VAE with MLP encoder and decoder, on the fused reparameterization and ELBO.

    Args:
        input_dim: the data size, an int, or a shape such as (1, 28, 28) (inputs (N, *shape)
            are flattened; outputs have that shape).
        latent_dim: size of z.
        hidden_dims: widths of the encoder's hidden layers (the decoder mirrors them).
        likelihood: 'bernoulli' (data in [0, 1]; the decoder gives logits) or 'gaussian'
            (the decoder gives the mean; squared error, or the Gaussian NLL with ``obs_logvar``).
        beta, free_bits, obs_logvar: as ``vae_ext.nn.ELBOLoss`` (``obs_logvar='learned'`` learns it).
        autoencoder_mode: 'vae'; 'ae', a plain undercomplete autoencoder (deterministic code,
            reconstruction loss only); or 'denoising', an autoencoder trained to reconstruct the
            clean input from a corrupted one.
        corruption, corruption_type: the denoising corruption: 'mask' sets each input to 0 with
            probability ``corruption``; 'gaussian' adds noise of std ``corruption``.
        activation: the hidden-layer activation class.

    ``model(x)`` returns ``VAEOutput(loss, recon, kl, x_hat, mu, logvar, z)``; ``encode(x)`` a
    ``DiagonalGaussian``; ``decode(z)`` the decoder output (logits or mean); ``sample(n)``
    and ``reconstruct(x)`` data-space tensors.
    """

    def __init__(self, input_dim: int | tuple[int, ...] = 784, latent_dim: int = 16,
                 hidden_dims: tuple[int, ...] = (256,), likelihood: str = "bernoulli", beta: float = 1.0,
                 free_bits: float = 0.0, autoencoder_mode: str = "vae", corruption: float = 0.3,
                 corruption_type: str = "mask", obs_logvar=None, activation: type[nn.Module] = nn.SiLU) -> None:
        super().__init__(latent_dim, likelihood, beta, free_bits, autoencoder_mode, corruption, corruption_type,
                         obs_logvar)
        self.input_shape = (input_dim,) if isinstance(input_dim, int) else tuple(input_dim)
        if not self.input_shape or any(not isinstance(s, int) or s < 1 for s in self.input_shape):
            raise ValueError(f"VAE: input_dim must be a positive int or shape, got {input_dim!r}")
        n_in = math.prod(self.input_shape)
        hidden = list(hidden_dims)
        self.encoder = nn.Sequential(nn.Flatten(1), *_mlp([n_in, *hidden], activation),
                                     nn.Linear(hidden[-1] if hidden else n_in, self.encoder_out_features))
        self.decoder = nn.Sequential(*_mlp([latent_dim, *reversed(hidden)], activation),
                                     nn.Linear(hidden[0] if hidden else latent_dim, n_in),
                                     nn.Unflatten(1, self.input_shape))

    def _check_input(self, x: torch.Tensor) -> None:
        if not isinstance(x, torch.Tensor) or tuple(x.shape[1:]) != self.input_shape:
            raise ValueError(f"VAE: input must have shape (N, {', '.join(map(str, self.input_shape))}), got "
                             f"{tuple(getattr(x, 'shape', ()))}")
