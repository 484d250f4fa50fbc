"""Pure-PyTorch definitions of every vae_ext operator.

They are the fallback when the compiled extension is missing or does not
support an input, and the oracle the parity tests compare the kernels with.
Each follows the operator contract in DESIGN.md exactly, written for clarity,
not speed.
"""

from __future__ import annotations

import torch


def reparameterize(mu: torch.Tensor, logvar: torch.Tensor, eps: torch.Tensor | None = None,
                   generator: torch.Generator | None = None, num_samples: int = 1,
                   seed: int | None = None) -> torch.Tensor:
    """z = mu + eps * exp(0.5 * logvar), eps ~ N(0, I) unless given.

    Returns mu's (broadcast) shape for num_samples == 1, else (num_samples, *shape).
    The reference draws eps with torch.randn (from `generator`, or a generator
    seeded with `seed`): the same distribution as the kernels' Philox stream,
    not the same numbers.
    """
    shape = torch.broadcast_shapes(mu.shape, logvar.shape)
    if num_samples > 1:
        shape = (num_samples, *shape)
    if eps is None:
        if seed is not None:
            generator = torch.Generator(device=mu.device).manual_seed(seed)
        eps = torch.randn(shape, generator=generator, dtype=mu.dtype, device=mu.device)
    return mu + eps * torch.exp(0.5 * logvar)
