"""ConvVAE: a convolutional VAE for images."""

from __future__ import annotations

import torch
from torch import nn

from vae_ext.models.base import LatentAutoencoder


class ConvVAE(LatentAutoencoder):
    r"""A convolutional VAE for (N, C, H, W) images, on the fused reparameterization and ELBO.

    The encoder halves the resolution with a stride-2 3×3 convolution per entry of
    ``channels`` (28 -> 14 -> 7, 8 -> 4 -> 2), then a linear layer gives (mu, logvar); the
    decoder mirrors it with transposed convolutions back to exactly (C, H, W).

    Args:
        in_channels: image channels C.
        image_size: H = W (int) or (H, W). Works for any size (e.g. 8 for scikit-learn's
            digits, 28 for MNIST, 32 for CIFAR).
        latent_dim: size of z.
        channels: convolution widths, one stride-2 stage each.
        likelihood: 'bernoulli' (pixels in [0, 1], the decoder gives logits) or 'gaussian'
            (the decoder gives the mean; ``obs_logvar`` as ``vae_ext.nn.ELBOLoss``).
        beta, free_bits, autoencoder_mode ('vae', 'ae', 'denoising'), corruption,
        corruption_type, activation: as ``vae_ext.models.VAE``.
    """

    def __init__(self, in_channels: int = 1, image_size: int | tuple[int, int] = 28, latent_dim: int = 16,
                 channels: tuple[int, ...] = (32, 64), likelihood: str = "bernoulli", beta: float = 1.0,
                 free_bits: float = 0.0, autoencoder_mode: str = "vae", corruption: float = 0.3,
                 corruption_type: str = "mask", obs_logvar=None, activation: type[nn.Module] = nn.SiLU) -> None:
        super().__init__(latent_dim, likelihood, beta, free_bits, autoencoder_mode, corruption, corruption_type,
                         obs_logvar)
        hw = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
        if len(hw) != 2 or any(not isinstance(s, int) or s < 1 for s in hw):
            raise ValueError(f"ConvVAE: image_size must be a positive int or (H, W), got {image_size!r}")
        if not channels:
            raise ValueError("ConvVAE: channels must name at least one stage")
        self.image_shape = (in_channels, *hw)
        sizes = [hw]  # spatial size after each stride-2 stage: ceil(n / 2)
        for _ in channels:
            sizes.append(tuple((s + 1) // 2 for s in sizes[-1]))
        c_last, (h_last, w_last) = channels[-1], sizes[-1]
        flat = c_last * h_last * w_last

        enc: list[nn.Module] = []
        prev = in_channels
        for c in channels:
            enc += [nn.Conv2d(prev, c, 3, stride=2, padding=1), activation()]
            prev = c
        self.encoder = nn.Sequential(*enc, nn.Flatten(1), nn.Linear(flat, self.encoder_out_features))

        dec: list[nn.Module] = [nn.Linear(latent_dim, flat), activation(), nn.Unflatten(1, (c_last, h_last, w_last))]
        for i in reversed(range(len(channels))):
            out_c = channels[i - 1] if i > 0 else channels[0]
            small, big = sizes[i + 1], sizes[i]
            # ConvTranspose2d(k=3, s=2, p=1) maps n -> 2n - 1 + output_padding.
            pad = tuple(b - (2 * s - 1) for s, b in zip(small, big))
            dec += [nn.ConvTranspose2d(channels[i], out_c, 3, stride=2, padding=1, output_padding=pad), activation()]
        dec.append(nn.Conv2d(channels[0], in_channels, 3, padding=1))
        self.decoder = nn.Sequential(*dec)

    def _check_input(self, x: torch.Tensor) -> None:
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or tuple(x.shape[1:]) != self.image_shape:
            raise ValueError(f"ConvVAE: input must have shape (N, C, H, W) = (N, {', '.join(map(str, self.image_shape))}), "
                             f"got {tuple(getattr(x, 'shape', ()))}")
