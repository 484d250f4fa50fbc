"""Drop-in modules on the fused operators.

    MultiheadAttention          torch.nn.MultiheadAttention on vae_ext.masked_attention (same API and weights)
    replace_attention(model)    (nn/convert.py) swap every torch.nn.MultiheadAttention (and torch's Transformer layers) in a model
    TransformerEncoderLayer, TransformerDecoderLayer, TransformerEncoder, TransformerDecoder
                                torch-compatible Transformer layers and stacks on the fused attention
    subsequent_mask             the Annotated Transformer's causal mask: (1, n, n) bool, True = may attend
    generate_square_subsequent_mask   torch's: (n, n), True (or -inf) = not allowed, what these modules take
    PositionalEncoding, LearnedPositionalEncoding, sinusoidal_table
    DiagonalGaussian            the VAE posterior (diffusers' DiagonalGaussianDistribution API, any rank)
    Reparameterize              module form of vae_ext.reparameterize (nn/distributions.py)
    ELBOLoss                    module form of vae_ext.elbo_loss (nn/losses.py)
"""

from vae_ext.nn.attention import MultiheadAttention
from vae_ext.nn.convert import replace_attention
from vae_ext.nn.distributions import DiagonalGaussian, Reparameterize
from vae_ext.nn.losses import ELBOLoss
from vae_ext.nn.transformer import (LearnedPositionalEncoding, PositionalEncoding, TransformerDecoder,
                                    TransformerDecoderLayer, TransformerEncoder, TransformerEncoderLayer,
                                    generate_square_subsequent_mask, sinusoidal_table, subsequent_mask)

__all__ = ["DiagonalGaussian", "ELBOLoss", "LearnedPositionalEncoding", "MultiheadAttention", "PositionalEncoding",
           "Reparameterize", "TransformerDecoder", "TransformerDecoderLayer", "TransformerEncoder",
           "TransformerEncoderLayer", "generate_square_subsequent_mask", "replace_attention", "sinusoidal_table",
           "subsequent_mask"]
