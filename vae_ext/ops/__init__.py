"""Public operators. Each validates its inputs once, picks the backend
(compiled extension or reference, see vae_ext._backend) and calls it."""

from vae_ext.ops.attention import masked_attention
from vae_ext.ops.elbo import elbo_loss
from vae_ext.ops.reparameterize import reparameterize

__all__ = ["elbo_loss", "masked_attention", "reparameterize"]
