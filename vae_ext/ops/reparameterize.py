"""reparameterize: z = mu + eps * exp(0.5 * logvar) in one fused pass, eps drawn in-kernel."""

from __future__ import annotations

import torch

from vae_ext import _backend, reference
from vae_ext._validation import (FLOAT_DTYPES, broadcast_shape, check_float, check_generator, check_same_device,
                                 check_seed, seed_to_int64)

OP = "reparameterize"


def _as(t: torch.Tensor, dtype: torch.dtype, shape) -> torch.Tensor:
    """t in `dtype`, expanded to `shape` (no op calls when it already is)."""
    if t.dtype != dtype:
        t = t.to(dtype)
    return t if t.shape == shape else t.expand(shape)


def supports(device: torch.device, dtype: torch.dtype) -> tuple[bool, str]:
    """Whether the compiled kernel handles inputs on `device` of `dtype`, and why not."""
    ok, reason = _backend.device_supported(device)
    if not ok:
        return ok, reason
    if dtype not in FLOAT_DTYPES:
        return False, f"dtype {dtype} has no kernel"
    return True, reason


def reparameterize(mu: torch.Tensor, logvar: torch.Tensor, eps: torch.Tensor | None = None,
                   generator: torch.Generator | None = None, num_samples: int = 1,
                   seed: int | None = None) -> torch.Tensor:
    r"""Reparameterized sample of N(mu, exp(logvar)): z = mu + eps * exp(0.5 * logvar).

    Args:
        mu, logvar: floating tensors that broadcast against each other (as torch.add allows).
        eps: the noise to use, shape (*shape) for num_samples == 1 or (num_samples, *shape);
            None draws eps ~ N(0, I) inside the kernel (Philox-4x32-10 + Box–Muller).
        generator: the torch.Generator to key the draw from (default: the device's default
            generator, so torch.manual_seed reproduces a run). Not with `eps` or `seed`.
        num_samples: K samples per element; K > 1 returns (K, *shape), K == 1 returns *shape.
        seed: stateless mode: Philox key = seed, counter 0. The same seed gives the same
            Philox integers on CPU and CUDA, hence the same eps up to float rounding.

    Gradients: dz/dmu = 1 and dz/dlogvar = 0.5 * (z - mu), summed over samples; no eps
    tensor is stored. For bfloat16/float16 math runs in float32. NaN inputs propagate.
    Double backward (create_graph=True) gives the true second-order gradients.
    """
    check_float(OP, "mu", mu)
    check_float(OP, "logvar", logvar)
    if eps is not None:
        check_float(OP, "eps", eps)
    check_same_device(OP, {"mu": mu, "logvar": logvar, "eps": eps})
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"{OP}: num_samples must be an int >= 1, got {num_samples!r}")
    shape = broadcast_shape(mu.shape, logvar.shape)
    if shape is None:
        raise ValueError(f"{OP}: logvar shape {tuple(logvar.shape)} does not broadcast with mu shape "
                         f"{tuple(mu.shape)}")
    sample_shape = tuple(shape) if num_samples == 1 else (num_samples, *shape)
    if eps is not None:
        if tuple(eps.shape) != sample_shape:
            raise ValueError(f"{OP}: eps must have shape {sample_shape}, got {tuple(eps.shape)}")
        if generator is not None or seed is not None:
            raise ValueError(f"{OP}: pass eps, or generator/seed to draw it, not both")
    if generator is not None and seed is not None:
        raise ValueError(f"{OP}: pass generator or seed, not both")
    check_generator(OP, generator, mu.device)
    check_seed(OP, seed)

    dtype = torch.promote_types(mu.dtype, logvar.dtype)
    if eps is not None:
        dtype = torch.promote_types(dtype, eps.dtype)
    ok, reason = supports(mu.device, dtype)
    if not _backend.use_extension(OP, ok, reason):
        return reference.reparameterize(mu, logvar, eps, generator, num_samples, seed)

    mu_b = _as(mu, dtype, shape)
    logvar_b = _as(logvar, dtype, shape)
    eps_b = None if eps is None else _as(eps, dtype, eps.shape).reshape((num_samples, *shape))
    seed64 = None if seed is None else seed_to_int64(seed)
    z = torch.ops.vae_ext.reparameterize(mu_b, logvar_b, eps_b, num_samples, seed64, generator)
    return z.squeeze(0) if num_samples == 1 else z


def _register() -> None:
    """Fake (meta) kernels for the compiled ops (their autograd is in C++)."""

    @torch.library.register_fake("vae_ext::reparameterize")
    def _(mu, logvar, eps, num_samples, seed, generator):
        torch._check(mu.shape == logvar.shape, lambda: "reparameterize: logvar must have the shape of mu")
        torch._check(num_samples >= 1, lambda: "reparameterize: num_samples must be >= 1")
        return mu.new_empty((num_samples, *mu.shape))

    @torch.library.register_fake("vae_ext::reparameterize_backward")
    def _(grad_z, z, mu):
        torch._check(grad_z.shape == z.shape, lambda: "reparameterize_backward: grad_z must have the shape of z")
        return mu.new_empty(mu.shape), mu.new_empty(mu.shape)

    # Autograd is registered in C++ (csrc/reparameterize/reparameterize_autograd.cpp): no Python round trip per call.


if _backend.extension_loaded():
    _register()
