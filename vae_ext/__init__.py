"""vae_ext: fused PyTorch C++/CUDA operators for VAEs and Transformers.

Operators (each with a CPU kernel, a CUDA kernel and a pure-PyTorch reference):
    masked_attention(q, k, v, ...)    softmax(q kᵀ · scale + mask) v, never materialising S×S
    reparameterize(mu, logvar, ...)   z = mu + eps * exp(0.5 * logvar), eps drawn in-kernel
    elbo_loss(recon, target, mu, logvar, ...)   reconstruction NLL + beta * KL, gradients in one pass

SDPA-compatible entry point: scaled_dot_product_attention(query, key, value, ...) with torch's
signature, and patch_sdpa() (routes torch.nn.functional.scaled_dot_product_attention through it).
Integrations (vae_ext.integrations.diffusers / .transformers / .timm), imported on first use.

Modules (vae_ext.nn) and models (vae_ext.models), imported on first use:
    vae_ext.nn.MultiheadAttention, replace_attention, TransformerEncoderLayer/DecoderLayer,
    DiagonalGaussian, ELBOLoss, Reparameterize; vae_ext.models.VAE, ConvVAE, TransformerVAE

Backend control: the environment variable VAE_EXT_BACKEND=auto|extension|reference,
or `with vae_ext.use_backend("reference"): ...`; `vae_ext.backend_info()` says what runs.
"""

__version__ = "0.1.0"

from vae_ext import reference  # noqa: E402
from vae_ext._backend import use_backend  # noqa: E402
from vae_ext import ops  # noqa: E402
from vae_ext.ops import elbo_loss, masked_attention, reparameterize  # noqa: E402
from vae_ext._types import ELBO  # noqa: E402
from vae_ext._info import backend_info  # noqa: E402
from vae_ext.sdpa import patch_sdpa, scaled_dot_product_attention  # noqa: E402

__all__ = ["ELBO", "__version__", "backend_info", "elbo_loss", "integrations", "masked_attention", "models", "nn",
           "ops", "patch_sdpa", "reference", "reparameterize", "scaled_dot_product_attention", "use_backend"]

_LAZY_SUBMODULES = ("nn", "models", "integrations")


def __getattr__(name: str):
    # vae_ext.nn, vae_ext.models and vae_ext.integrations are imported on first use, keeping `import vae_ext` light.
    if name in _LAZY_SUBMODULES:
        import importlib

        return importlib.import_module(f"vae_ext.{name}")
    raise AttributeError(f"module 'vae_ext' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY_SUBMODULES))
