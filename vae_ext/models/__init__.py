"""Ready VAE models on the fused operators; each works with any backend.

    VAE              MLP encoder/decoder; also a plain ('ae') or denoising ('denoising') autoencoder
    ConvVAE          convolutional, for (N, C, H, W) images (8×8 digits, 28×28, ...); same modes
    TransformerVAE   token sequences: Transformer encoder (padding mask, mean-pooled) -> z ->
                     Transformer decoder (causal self-attention + cross-attention to z); greedy/sampled decoding
    AutoencoderKL    Stable Diffusion's VAE (diffusers' module tree and state_dict; SD 1.x/2.x, SDXL, SD3,
                     Flux presets); from_pretrained (diffusers folder), from_single_file (LDM layout)

forward returns VAEOutput(loss, recon, kl, x_hat, mu, logvar, z); encode -> DiagonalGaussian;
decode; sample(n, generator=None).
"""

from vae_ext.models.autoencoder_kl import PRESETS as AUTOENCODER_KL_PRESETS
from vae_ext.models.autoencoder_kl import AutoencoderKL
from vae_ext.models.autoencoder_kl_weights import CheckpointError
from vae_ext.models.base import AUTOENCODER_MODES, VAEOutput
from vae_ext.models.conv import ConvVAE
from vae_ext.models.mlp import VAE
from vae_ext.models.transformer import TransformerVAE

__all__ = ["AUTOENCODER_KL_PRESETS", "AUTOENCODER_MODES", "AutoencoderKL", "CheckpointError", "ConvVAE", "TransformerVAE", "VAE", "VAEOutput"]
