"""Module forms of the fused ops: ELBOLoss (vae_ext.elbo_loss) and Reparameterize (vae_ext.reparameterize)."""

from __future__ import annotations

import torch
from torch import nn

import vae_ext
from vae_ext._types import ELBO
from vae_ext.nn.distributions import DiagonalGaussian
from vae_ext.ops.elbo import LIKELIHOODS, REDUCTIONS


class ELBOLoss(nn.Module):
    r"""Negative ELBO, recon NLL + beta·KL, as a module: ``vae_ext.elbo_loss`` with its options fixed.

    Args:
        likelihood: 'bernoulli' (recon are logits), 'gaussian' (recon is the mean) or
            'categorical' (recon are logits (N, T, V), target (N, T) class ids).
        beta: KL weight; an attribute, so KL annealing is ``loss_fn.beta = w``.
        reduction: 'mean' over the batch, 'sum' or 'none'.
        free_bits: minimum KL per latent dimension (batch average), see ``vae_ext.elbo_loss``.
        ignore_index: target id ignored by the categorical likelihood (padding).
        obs_logvar: gaussian observation log-variance: None (sum of squared errors), a
            float, a tensor broadcastable to recon (kept as a buffer), or ``'learned'``: a
            scalar parameter initialised to 0 and trained with the model.

    Forward ``(recon, target, mu, logvar, prior_mu=None, prior_logvar=None)`` or
    ``(recon, target, posterior)`` with a ``DiagonalGaussian`` posterior (and optionally
    ``prior=`` another one); returns ``ELBO(loss, recon, kl)``::

        loss_fn = vae_ext.nn.ELBOLoss("bernoulli", beta=0.5)
        out = loss_fn(logits, x, mu, logvar)
        out.loss.backward()
    """

    def __init__(self, likelihood: str = "bernoulli", beta: float = 1.0, reduction: str = "mean",
                 free_bits: float = 0.0, ignore_index: int = -100, obs_logvar=None) -> None:
        super().__init__()
        if likelihood not in LIKELIHOODS:
            raise ValueError(f"ELBOLoss: likelihood must be one of {LIKELIHOODS}, got {likelihood!r}")
        if reduction not in REDUCTIONS:
            raise ValueError(f"ELBOLoss: reduction must be one of {REDUCTIONS}, got {reduction!r}")
        self.likelihood, self.beta, self.reduction = likelihood, beta, reduction
        self.free_bits, self.ignore_index = free_bits, ignore_index
        if obs_logvar is not None and likelihood != "gaussian":
            raise ValueError("ELBOLoss: obs_logvar applies to the gaussian likelihood only")
        if isinstance(obs_logvar, str):
            if obs_logvar != "learned":
                raise ValueError(f"ELBOLoss: obs_logvar must be None, a float, a tensor or 'learned', "
                                 f"got {obs_logvar!r}")
            self.obs_logvar = nn.Parameter(torch.zeros(()))
        elif isinstance(obs_logvar, torch.Tensor):
            self.register_buffer("obs_logvar", obs_logvar.detach().clone())
        else:
            self.obs_logvar = obs_logvar

    def forward(self, recon: torch.Tensor, target: torch.Tensor, mu, logvar: torch.Tensor | None = None,
                prior_mu: torch.Tensor | None = None, prior_logvar: torch.Tensor | None = None,
                prior: DiagonalGaussian | None = None) -> ELBO:
        if isinstance(mu, DiagonalGaussian):
            if logvar is not None:
                raise ValueError("ELBOLoss: pass a DiagonalGaussian posterior or mu and logvar, not both")
            posterior = mu
            if posterior.deterministic:  # a point mass: no KL term
                mu = logvar = posterior.mean.new_zeros(posterior.mean.shape[0], 1)
            else:
                mu, logvar = posterior.mean, posterior.logvar
        elif logvar is None:
            raise ValueError("ELBOLoss: logvar is required when mu is a tensor")
        if prior is not None:
            if prior_mu is not None or prior_logvar is not None:
                raise ValueError("ELBOLoss: pass prior or prior_mu/prior_logvar, not both")
            prior_mu, prior_logvar = prior.mean, prior.logvar
        obs_logvar = self.obs_logvar
        if isinstance(obs_logvar, torch.Tensor) and obs_logvar.device != recon.device:
            obs_logvar = obs_logvar.to(recon.device)
        return vae_ext.elbo_loss(recon, target, mu, logvar, likelihood=self.likelihood, beta=self.beta,
                                 reduction=self.reduction, prior_mu=prior_mu, prior_logvar=prior_logvar,
                                 free_bits=self.free_bits, ignore_index=self.ignore_index, obs_logvar=obs_logvar)

    def extra_repr(self) -> str:
        return (f"likelihood={self.likelihood!r}, beta={self.beta}, reduction={self.reduction!r}, "
                f"free_bits={self.free_bits}")
