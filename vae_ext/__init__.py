"""vae_ext: fused PyTorch C++/CUDA operators for VAEs and Transformers.

Operators (each with a CPU kernel, a CUDA kernel and a pure-PyTorch reference):
    reparameterize(mu, logvar, ...)   z = mu + eps * exp(0.5 * logvar), eps drawn in-kernel

Backend control: the environment variable VAE_EXT_BACKEND=auto|extension|reference,
or `with vae_ext.use_backend("reference"): ...`; `vae_ext.backend_info()` says what runs.
"""

__version__ = "0.1.0"

from vae_ext import reference  # noqa: E402
from vae_ext._backend import use_backend  # noqa: E402
from vae_ext import ops  # noqa: E402
from vae_ext.ops import reparameterize  # noqa: E402
from vae_ext._info import backend_info  # noqa: E402

__all__ = ["__version__", "backend_info", "ops", "reference", "reparameterize", "use_backend"]
