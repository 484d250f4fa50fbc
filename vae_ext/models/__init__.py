"""Ready VAE models on the fused operators; each works with any backend.

    VAE              MLP encoder/decoder; also a plain ('ae') or denoising ('denoising') autoencoder
    ConvVAE          convolutional, for (N, C, H, W) images (8×8 digits, 28×28, ...); same modes
    TransformerVAE   token sequences: Transformer encoder (padding mask, mean-pooled) -> z ->
                     Transformer decoder (causal self-attention + cross-attention to z); greedy/sampled decoding

forward returns VAEOutput(loss, recon, kl, x_hat, mu, logvar, z); encode -> DiagonalGaussian;
decode; sample(n, generator=None).
"""

from vae_ext.models.base import AUTOENCODER_MODES, VAEOutput
from vae_ext.models.conv import ConvVAE
from vae_ext.models.mlp import VAE
from vae_ext.models.transformer import TransformerVAE

__all__ = ["AUTOENCODER_MODES", "ConvVAE", "TransformerVAE", "VAE", "VAEOutput"]
