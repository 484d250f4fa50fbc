"""elbo_loss: negative ELBO = reconstruction NLL + beta * KL, with its gradients in one pass."""

from __future__ import annotations

import math

import torch

from vae_ext import _backend, reference
from vae_ext._types import ELBO
from vae_ext._validation import (FLOAT_DTYPES, as_float, broadcast_shape, check_float, check_same_device, check_tensor,
                                 is_concrete, is_number)

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
    if broadcast_shape(t.shape, shape) != shape:
        raise ValueError(f"{OP}: {name} of shape {tuple(t.shape)} does not broadcast to {to} {tuple(shape)}")


def elbo_loss(recon: torch.Tensor, target: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor,
              likelihood: str = "bernoulli", beta: float = 1.0, reduction: str = "mean",
              prior_mu: torch.Tensor | None = None, prior_logvar: torch.Tensor | None = None,
              free_bits: float = 0.0, ignore_index: int = -100, obs_logvar=None, recon_probs: bool = False) -> ELBO:
    r"""Negative evidence lower bound of a VAE, per sample b (dim 0 is the batch):

        loss_b = recon_b + beta * kl_b

    recon_b, summed over all non-batch elements:
      - ``bernoulli``: recon are logits, target in [0, 1] (soft targets allowed), same shape;
        BCE-with-logits, max(x, 0) - x t + log(1 + exp(-|x|)). With ``recon_probs=True``
        recon are probabilities in [0, 1] (a decoder that ends in a sigmoid, as in
        pytorch/examples' VAE): F.binary_cross_entropy, -(t log x + (1 - t) log(1 - x)) with
        each log clamped at -100 and the gradient (x - t) / max(x (1 - x), 1e-12), as torch's.
        Logits are the better input (no clamping, no lost digits near 0 and 1).
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
    ELBO(loss, recon, kl), all three reduced the same way.

    NaN policy: no error; NaN inputs propagate as in torch's own losses. A NaN in sample b
    makes recon_b / kl_b (and loss_b) NaN and leaves the other samples alone (so 'mean' and
    'sum' are NaN); its gradients are NaN in the rows it reaches. With free bits a NaN KL
    makes its latent dimension's batch mean NaN, and that dimension is then not clamped.

    Fused path (compiled kernels): one pass over the inputs computes the loss and, for every
    input that requires grad (while grad mode is on), the gradient of the reduced recon and
    kl parts; the backward multiplies them by the upstream gradients (on CUDA always, with no
    host sync; on the CPU it returns them as they are when those are exactly 1, as for
    loss.backward() of a 'mean' or 'sum' loss). Gradients are kept from forward to backward (the size of the
    inputs that require grad); a gradient returned on a retained graph (retain_graph=True) is
    a copy, never the saved buffer. Results are bitwise reproducible run to run. Double
    backward (create_graph=True) raises an error (the fused backward has no derivative; the
    reference backend, vae_ext.use_backend('reference'), supports it). Under torch.compile the class-id range check is skipped (an id out of
    range then gives a NaN loss for its sample).
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
    if not is_number(beta) or (is_concrete(beta) and not math.isfinite(beta)):
        raise ValueError(f"{OP}: beta must be a finite float, got {beta!r}")
    if not is_number(free_bits) or (is_concrete(free_bits) and not free_bits >= 0.0):
        raise ValueError(f"{OP}: free_bits must be a float >= 0, got {free_bits!r}")
    if not isinstance(recon_probs, bool):
        raise TypeError(f"{OP}: recon_probs must be a bool, got {type(recon_probs).__name__}")
    if recon_probs and likelihood != "bernoulli":
        raise ValueError(f"{OP}: recon_probs applies to the bernoulli likelihood only")
    if recon_probs and not torch.compiler.is_compiling() and recon.numel():
        # As F.binary_cross_entropy (one pass over recon; skipped while torch.compile traces,
        # where a value outside [0, 1] gives a NaN loss). NaN passes and propagates.
        lo, hi = torch.aminmax(recon.detach())
        if bool(lo < 0) or bool(hi > 1):
            raise ValueError(f"{OP}: with recon_probs=True recon must hold probabilities in [0, 1], "
                             f"got values in [{lo.item()}, {hi.item()}]")

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
        # A data-dependent check (one host sync on CUDA); skipped while torch.compile traces,
        # where the kernels give such a position a NaN loss instead (never an out-of-bounds read).
        if not torch.compiler.is_compiling():
            bad = (target != ignore_index) & ((target < 0) | (target >= vocab))
            if target.numel() and bool(bad.any()):
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
        return reference.elbo_loss(recon, target, mu, logvar, likelihood, as_float(beta), reduction, prior_mu,
                                   prior_logvar, as_float(free_bits), ignore_index, obs_logvar, recon_probs)
    kernel_likelihood = "bernoulli_probs" if recon_probs else likelihood
    return _fused(recon, target, mu, logvar, kernel_likelihood, as_float(beta), reduction, prior_mu, prior_logvar,
                  as_float(free_bits), int(ignore_index), obs_logvar)


def _needs_grad(t) -> bool:
    return isinstance(t, torch.Tensor) and t.requires_grad and torch.is_grad_enabled()


def _fused(recon, target, mu, logvar, likelihood, beta, reduction, prior_mu, prior_logvar, free_bits, ignore_index,
           obs_logvar) -> ELBO:
    out = torch.ops.vae_ext.elbo_forward(*_op_args(recon, target, mu, logvar, likelihood, beta, reduction, prior_mu,
                                                   prior_logvar, free_bits, ignore_index, obs_logvar))
    return ELBO(out[0], out[1], out[2])


def _to(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """t in `dtype`; no op call when it already is (a no-op .to still costs microseconds)."""
    return t if t.dtype == dtype else t.to(dtype)


def _op_args(recon, target, mu, logvar, likelihood, beta, reduction, prior_mu, prior_logvar, free_bits, ignore_index,
             obs_logvar) -> tuple:
    """The arguments of torch.ops.vae_ext.elbo_forward for (validated) elbo_loss inputs.

    dtypes: the reconstruction group (recon, target, obs_logvar) and the latent group (mu,
    logvar, priors) are each promoted to one dtype. Priors are expanded to mu's shape (a
    prior shared by the batch is read in place); obs_logvar becomes (1,) / (B,) when it has
    one value per sample, else (1 or B, *recon.shape[1:]). Autograd sums gradients of the
    expanded views back to the caller's shapes. needs_grad is taken from the inputs.
    """
    recon_dtype = recon.dtype
    if likelihood != "categorical":
        recon_dtype = torch.promote_types(recon_dtype, target.dtype)
    if isinstance(obs_logvar, torch.Tensor):
        recon_dtype = torch.promote_types(recon_dtype, obs_logvar.dtype)
    latent_dtype = torch.promote_types(mu.dtype, logvar.dtype)
    for t in (prior_mu, prior_logvar):
        if t is not None:
            latent_dtype = torch.promote_types(latent_dtype, t.dtype)

    needs = [_needs_grad(recon), _needs_grad(mu), _needs_grad(logvar), _needs_grad(prior_mu),
             _needs_grad(prior_logvar), _needs_grad(obs_logvar)]
    recon_in = _to(recon, recon_dtype)
    target_in = target if likelihood == "categorical" else _to(target, recon_dtype)
    mu_in, logvar_in = _to(mu, latent_dtype), _to(logvar, latent_dtype)
    pm_in = plv_in = None
    if prior_mu is not None or prior_logvar is not None:
        row_zeros = torch.zeros((1, *mu.shape[1:]), dtype=latent_dtype, device=mu.device)
        pm_in = (row_zeros if prior_mu is None else prior_mu.to(latent_dtype)).expand(mu.shape)
        plv_in = (row_zeros if prior_logvar is None else prior_logvar.to(latent_dtype)).expand(mu.shape)
    obs_in = None
    if obs_logvar is not None:
        if isinstance(obs_logvar, torch.Tensor):
            o = obs_logvar.to(recon_dtype)
            o = o.reshape((1,) * (recon.dim() - o.dim()) + tuple(o.shape))
        else:
            o = torch.full((1,) * recon.dim(), float(obs_logvar), dtype=recon_dtype, device=recon.device)
        if all(s == 1 for s in o.shape[1:]):
            obs_in = o.reshape(o.shape[0])  # one value per sample (or for all)
        else:
            obs_in = o.expand((o.shape[0], *recon.shape[1:]))  # one per element
    return (recon_in, target_in, mu_in, logvar_in, pm_in, plv_in, obs_in, likelihood, reduction, beta, free_bits,
            ignore_index, needs)




def _register() -> None:
    """Fake (meta) kernels for the compiled ops (their autograd is in C++)."""

    @torch.library.register_fake("vae_ext::elbo_forward")
    def _(recon, target, mu, logvar, prior_mu, prior_logvar, obs_logvar, likelihood, reduction, beta, free_bits,
          ignore_index, needs_grad):
        torch._check(mu.shape == logvar.shape, lambda: "elbo_forward: logvar must have the shape of mu")
        torch._check(recon.dim() >= 1 and mu.dim() >= 1, lambda: "elbo_forward: recon and mu need a batch dim")
        torch._check(recon.shape[0] == mu.shape[0], lambda: "elbo_forward: recon and mu batch sizes differ")
        shape = (recon.shape[0],) if reduction == "none" else ()
        loss = recon.new_empty(shape, dtype=torch.promote_types(recon.dtype, mu.dtype))
        none = recon.new_empty((0,))

        def grad(flag, like):
            return like.new_empty(like.shape) if flag else like.new_empty((0,))

        g_obs = none
        if needs_grad[5] and obs_logvar is not None:
            g_obs = recon.new_empty((recon.shape[0],) if obs_logvar.dim() == 1 else recon.shape)
        return (loss, recon.new_empty(shape), mu.new_empty(shape), grad(needs_grad[0], recon),
                grad(needs_grad[1], mu), grad(needs_grad[2], mu), grad(needs_grad[3] and prior_mu is not None, mu),
                grad(needs_grad[4] and prior_logvar is not None, mu), g_obs)

    @torch.library.register_fake("vae_ext::elbo_scale_grad")
    def _(grad, scale):
        torch._check(scale.numel() == 1 or scale.numel() == grad.shape[0],
                     lambda: "elbo_scale_grad: scale must have 1 or B elements")
        return grad.new_empty(grad.shape)

    # Autograd is registered in C++ (csrc/elbo/elbo_autograd.cpp): the backward multiplies each
    # gradient buffer by its group's upstream gradient (recon group g_loss + g_recon, latent group
    # beta * g_loss + g_kl), or returns it as it is where that is exactly 1 (loss.backward() of a
    # 'mean' or 'sum' loss: no pass over memory).


if _backend.extension_loaded() and _has_kernel():
    _register()
