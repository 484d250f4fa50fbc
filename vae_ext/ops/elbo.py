"""elbo_loss: negative ELBO = reconstruction NLL + beta * KL, with its gradients in one pass."""

from __future__ import annotations

import math

import torch

from vae_ext import _backend, reference
from vae_ext._types import ELBO
from vae_ext._validation import FLOAT_DTYPES, check_float, check_same_device, check_tensor

OP = "elbo_loss"
LIKELIHOODS = ("bernoulli", "gaussian", "categorical")
REDUCTIONS = ("mean", "sum", "none")


def _has_kernel() -> bool:
    return _backend.extension_loaded() and hasattr(torch.ops.vae_ext, "elbo_forward")


def supports(device: torch.device, dtype: torch.dtype) -> tuple[bool, str]:
    """Whether the compiled kernels handle this input, and why not."""
    ok, reason = _backend.device_supported(device)
    if not ok:
        return ok, reason
    if not _has_kernel():
        return False, "this build has no elbo_loss kernels"
    if dtype not in FLOAT_DTYPES:
        return False, f"dtype {dtype} has no kernel"
    return True, reason


def _check_broadcast_to(name: str, t: torch.Tensor, shape: torch.Size, to: str) -> None:
    try:
        ok = torch.broadcast_shapes(t.shape, shape) == shape
    except RuntimeError:
        ok = False
    if not ok:
        raise ValueError(f"{OP}: {name} of shape {tuple(t.shape)} does not broadcast to {to} {tuple(shape)}")


def elbo_loss(recon: torch.Tensor, target: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor,
              likelihood: str = "bernoulli", beta: float = 1.0, reduction: str = "mean",
              prior_mu: torch.Tensor | None = None, prior_logvar: torch.Tensor | None = None,
              free_bits: float = 0.0, ignore_index: int = -100, obs_logvar=None) -> ELBO:
    r"""Negative evidence lower bound of a VAE, per sample b (dim 0 is the batch):

        loss_b = recon_b + beta * kl_b

    recon_b, summed over all non-batch elements:
      - ``bernoulli``: recon are logits, target in [0, 1] (soft targets allowed), same shape;
        BCE-with-logits, max(x, 0) - x t + log(1 + exp(-|x|)).
      - ``gaussian``: recon is the predicted mean; with obs_logvar=None the sum of squared
        errors (recon - target)^2; with obs_logvar (float, or tensor broadcastable to recon,
        may require grad) the exact NLL 0.5 (log 2π + obs_logvar + (target - recon)^2 e^{-obs_logvar}).
      - ``categorical``: recon are logits (B, T, V), target (B, T) int64 class ids;
        cross-entropy summed over positions whose target != ignore_index.
    kl_b, summed over all non-batch latent elements: KL(N(mu, e^{logvar}) || N(0, I)) =
    0.5 (mu^2 + e^{logvar} - 1 - logvar), or with prior_mu / prior_logvar (broadcastable to mu)
    0.5 (prior_logvar - logvar + (e^{logvar} + (mu - prior_mu)^2) e^{-prior_logvar} - 1).

    free_bits λ > 0 (Kingma et al. 2016): each latent dimension's KL averaged over the batch
    counts as at least λ. For a dimension whose batch-average KL is below λ, every sample
    contributes the constant λ for it (and no gradient); so with reduction 'none' kl_b sums
    those per-sample terms, 'mean' gives Σ_d max(mean_b KL_bd, λ) and 'sum' B times that.

    reduction: 'mean' over the batch, 'sum', or 'none' (shape (B,)). Returns
    ELBO(loss, recon, kl), all three reduced the same way. NaN inputs propagate to the
    results (no error), as in torch's own losses.
    """
    if likelihood not in LIKELIHOODS:
        raise ValueError(f"{OP}: likelihood must be one of {LIKELIHOODS}, got {likelihood!r}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"{OP}: reduction must be one of {REDUCTIONS}, got {reduction!r}")
    check_float(OP, "recon", recon)
    check_float(OP, "mu", mu)
    check_float(OP, "logvar", logvar)
    check_tensor(OP, "target", target)
    if recon.dim() == 0:
        raise ValueError(f"{OP}: recon must have a batch dim (dim 0)")
    if mu.shape != logvar.shape:
        raise ValueError(f"{OP}: logvar shape {tuple(logvar.shape)} must equal mu shape {tuple(mu.shape)}")
    if mu.dim() == 0 or mu.shape[0] != recon.shape[0]:
        raise ValueError(f"{OP}: mu must have the batch size of recon ({recon.shape[0]}) in dim 0, "
                         f"got shape {tuple(mu.shape)}")
    for name, t in (("prior_mu", prior_mu), ("prior_logvar", prior_logvar)):
        if t is not None:
            check_float(OP, name, t)
            _check_broadcast_to(name, t, mu.shape, "mu")
    if isinstance(obs_logvar, torch.Tensor):
        check_float(OP, "obs_logvar", obs_logvar)
    check_same_device(OP, {"recon": recon, "target": target, "mu": mu, "logvar": logvar, "prior_mu": prior_mu,
                           "prior_logvar": prior_logvar,
                           "obs_logvar": obs_logvar if isinstance(obs_logvar, torch.Tensor) else None})
    if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not math.isfinite(beta):
        raise ValueError(f"{OP}: beta must be a finite float, got {beta!r}")
    if isinstance(free_bits, bool) or not isinstance(free_bits, (int, float)) or not free_bits >= 0.0:
        raise ValueError(f"{OP}: free_bits must be a float >= 0, got {free_bits!r}")

    if likelihood == "categorical":
        if recon.dim() != 3:
            raise ValueError(f"{OP}: categorical recon must be logits (B, T, V), got shape {tuple(recon.shape)}")
        if target.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"{OP}: categorical target must hold integer class ids (int64), got {target.dtype}")
        if tuple(target.shape) != tuple(recon.shape[:2]):
            raise ValueError(f"{OP}: categorical target must have shape (B, T) = {tuple(recon.shape[:2])}, "
                             f"got {tuple(target.shape)}")
        if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
            raise TypeError(f"{OP}: ignore_index must be an int, got {type(ignore_index).__name__}")
        vocab = recon.shape[2]
        bad = (target != ignore_index) & ((target < 0) | (target >= vocab))
        if target.numel() and not torch.compiler.is_compiling() and bool(bad.any()):
            first = target[bad][0].item()
            raise ValueError(f"{OP}: target holds class id {first} outside [0, {vocab}) "
                             f"(and not ignore_index={ignore_index})")
        target = target.long()
    else:
        check_float(OP, "target", target)
        if target.shape != recon.shape:
            raise ValueError(f"{OP}: target shape {tuple(target.shape)} must equal recon shape {tuple(recon.shape)}")
    if obs_logvar is not None:
        if likelihood != "gaussian":
            raise ValueError(f"{OP}: obs_logvar applies to the gaussian likelihood only")
        if isinstance(obs_logvar, torch.Tensor):
            _check_broadcast_to("obs_logvar", obs_logvar, recon.shape, "recon")
        elif isinstance(obs_logvar, bool) or not isinstance(obs_logvar, (int, float)):
            raise TypeError(f"{OP}: obs_logvar must be a float or a tensor, got {type(obs_logvar).__name__}")

    ok, reason = supports(recon.device, recon.dtype)
    if not _backend.use_extension(OP, ok, reason):
        return reference.elbo_loss(recon, target, mu, logvar, likelihood, float(beta), reduction, prior_mu,
                                   prior_logvar, float(free_bits), ignore_index, obs_logvar)
    raise NotImplementedError("elbo_loss kernels are registered but not wired")  # replaced by the kernel issue
