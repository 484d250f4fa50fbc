"""DiagonalGaussian: the VAE posterior N(mean, diag(exp(logvar))), on the fused ops."""

from __future__ import annotations

import math

import torch
from torch import nn

import vae_ext

LOGVAR_MIN, LOGVAR_MAX = -30.0, 20.0
RNG_STREAMS = ("philox", "torch")
_NAME = "DiagonalGaussian"


class DiagonalGaussian:
    r"""A diagonal Gaussian N(mean, diag(exp(logvar))), the API of diffusers'
    ``DiagonalGaussianDistribution`` for tensors of any rank.

    Build it from the encoder output, chunked into mean and logvar along ``dim`` (1 by
    default, as diffusers), or from the two tensors::

        posterior = DiagonalGaussian(encoder(x))                 # (N, 2C, ...) -> mean, logvar (N, C, ...)
        posterior = DiagonalGaussian.from_mean_logvar(mu, logvar)
        z = posterior.sample()                                   # fused reparameterization
        loss = recon + posterior.kl().mean()                     # fused KL, per sample (N,)

    logvar is clamped to [-30, 20]. Attributes: ``parameters``, ``mean``, ``logvar``, ``std``,
    ``var``, ``deterministic``. Dim 0 is the batch: ``kl`` and ``nll`` sum over all other
    dims and return shape (N,).

    ``rng`` says where ``sample`` draws ε from when no ``seed`` is given:

    - ``"philox"`` (default): inside the fused ``reparameterize`` kernel, from vae_ext's
      Philox-4x32-10 stream keyed by the generator (or the device's default generator) —
      no ε tensor in memory, but not the numbers ``torch.randn`` gives for that generator;
      a generator on another device than the tensors, or a list of generators, draws with
      ``torch.randn`` on the generator's device instead.
    - ``"torch"``: ``torch.randn(shape, generator=g, device=g.device, dtype=mean.dtype)``, moved
      to the tensors' device (one draw of shape (1, ...) per generator for a list) — exactly
      diffusers' ``randn_tensor``, so ``sample(generator)`` reproduces a seeded diffusers latent
      for a CPU or CUDA generator; then mean + std·ε runs in ``reparameterize`` with that ε.
      ``AutoencoderKL.encode`` returns posteriors in this mode.

    ``deterministic=True`` makes it a point mass at the mean: ``sample`` returns the mean,
    ``std``/``var`` are zeros, ``kl`` and ``nll`` are zeros of shape (N,) (diffusers returns
    ``tensor([0.])``).
    """

    def __init__(self, parameters: torch.Tensor, deterministic: bool = False, dim: int = 1,
                 rng: str = "philox") -> None:
        if not isinstance(parameters, torch.Tensor) or not parameters.is_floating_point():
            raise TypeError(f"{_NAME}: parameters must be a floating tensor, got "
                            f"{getattr(parameters, 'dtype', type(parameters).__name__)}")
        if parameters.dim() < 2:
            raise ValueError(f"{_NAME}: parameters must have a batch dim and a dim to split, got shape "
                             f"{tuple(parameters.shape)}")
        if not -parameters.dim() <= dim < parameters.dim() or dim % parameters.dim() == 0:
            raise ValueError(f"{_NAME}: dim must be a non-batch dim of parameters (shape {tuple(parameters.shape)}), "
                             f"got {dim}")
        if parameters.shape[dim] % 2 != 0:
            raise ValueError(f"{_NAME}: parameters must have an even size in dim {dim} (mean and logvar), got shape "
                             f"{tuple(parameters.shape)}")
        self.parameters = parameters
        mean, logvar = torch.chunk(parameters, 2, dim=dim)
        self._init(mean, logvar, deterministic, rng)

    @classmethod
    def from_mean_logvar(cls, mean: torch.Tensor, logvar: torch.Tensor, deterministic: bool = False,
                         rng: str = "philox") -> "DiagonalGaussian":
        """Build it from ``mean`` and ``logvar`` of the same shape (N, ...)."""
        for name, t in (("mean", mean), ("logvar", logvar)):
            if not isinstance(t, torch.Tensor) or not t.is_floating_point():
                raise TypeError(f"{_NAME}: {name} must be a floating tensor, got "
                                f"{getattr(t, 'dtype', type(t).__name__)}")
        if mean.shape != logvar.shape or mean.dim() < 1:
            raise ValueError(f"{_NAME}: mean and logvar must have one shape with a batch dim, got "
                             f"{tuple(mean.shape)} and {tuple(logvar.shape)}")
        self = cls.__new__(cls)
        self.parameters = None
        self._init(mean, logvar, deterministic, rng)
        return self

    def _init(self, mean, logvar, deterministic, rng):
        if rng not in RNG_STREAMS:
            raise ValueError(f"{_NAME}: rng must be one of {RNG_STREAMS}, got {rng!r}")
        self.rng = rng
        self.mean = mean
        self.logvar = torch.clamp(logvar, LOGVAR_MIN, LOGVAR_MAX)
        self.deterministic = bool(deterministic)

    @property
    def std(self) -> torch.Tensor:
        """exp(½·logvar) (zeros when deterministic); computed on access."""
        return torch.zeros_like(self.mean) if self.deterministic else torch.exp(0.5 * self.logvar)

    @property
    def var(self) -> torch.Tensor:
        """exp(logvar) (zeros when deterministic); computed on access."""
        return torch.zeros_like(self.mean) if self.deterministic else torch.exp(self.logvar)

    # ------------------------------------------------------------------ API

    @property
    def shape(self) -> torch.Size:
        return self.mean.shape

    def sample(self, generator: torch.Generator | list[torch.Generator] | None = None, *,
               seed: int | None = None, num_samples: int = 1) -> torch.Tensor:
        """A reparameterized sample mean + std·ε through the fused ``vae_ext.reparameterize``.

        ``generator``: a torch.Generator (also one on another device than the tensors: ε is
        then drawn there and moved), a list of N generators (one per batch element, as
        diffusers), or None for the default generator. Which stream ε comes from is the
        distribution's ``rng`` (see the class docstring: the kernel's Philox stream, or
        ``torch.randn`` as diffusers). ``seed``: the stateless mode of ``reparameterize`` (same
        draws on every backend, either ``rng``). ``num_samples=K > 1`` returns (K, *shape).
        """
        if self.deterministic:
            return self.mean if num_samples == 1 else self.mean.expand(num_samples, *self.mean.shape)
        eps = None
        k_shape = () if num_samples == 1 else (num_samples,)
        if isinstance(generator, (list, tuple)):
            if len(generator) != self.mean.shape[0]:
                raise ValueError(f"{_NAME}.sample: got {len(generator)} generators for a batch of "
                                 f"{self.mean.shape[0]}")
            parts = [torch.randn((*k_shape, 1, *self.mean.shape[1:]), generator=g, device=g.device,
                                 dtype=self.mean.dtype) for g in generator]
            eps = torch.cat(parts, dim=len(k_shape)).to(self.mean.device)
            generator = None
        elif self.rng == "torch" and seed is None:
            where = generator.device if generator is not None else self.mean.device
            eps = torch.randn((*k_shape, *self.mean.shape), generator=generator, device=where,
                              dtype=self.mean.dtype).to(self.mean.device)
            generator = None
        elif generator is not None and generator.device.type != self.mean.device.type:
            eps = torch.randn((*k_shape, *self.mean.shape), generator=generator, device=generator.device,
                              dtype=self.mean.dtype).to(self.mean.device)
            generator = None
        return vae_ext.reparameterize(self.mean, self.logvar, eps=eps, generator=generator, num_samples=num_samples,
                                      seed=seed)

    def mode(self) -> torch.Tensor:
        """The most likely value: the mean."""
        return self.mean

    def kl(self, other: "DiagonalGaussian | None" = None) -> torch.Tensor:
        """KL(self || other) per batch element, shape (N,), summed over all non-batch dims;
        other=None is the standard normal N(0, I). Runs on the fused KL of ``vae_ext.elbo_loss``."""
        n = self.mean.shape[0]
        if self.deterministic:
            return self.mean.new_zeros(n)
        prior_mu = prior_logvar = None
        if other is not None:
            if not isinstance(other, DiagonalGaussian):
                raise TypeError(f"{_NAME}.kl: other must be a DiagonalGaussian or None, got {type(other).__name__}")
            try:
                ok = torch.broadcast_shapes(other.mean.shape, self.mean.shape) == self.mean.shape
            except RuntimeError:
                ok = False
            if not ok:
                raise ValueError(f"{_NAME}.kl: other has shape {tuple(other.mean.shape)}, which does not "
                                 f"broadcast to this distribution's shape {tuple(self.mean.shape)}")
            prior_mu, prior_logvar = other.mean, other.logvar
        # elbo_loss with a zero reconstruction term: its kl part is exactly the fused KL.
        dummy = self.mean.new_zeros(n, 1)
        return vae_ext.elbo_loss(dummy, dummy, self.mean, self.logvar, likelihood="gaussian", reduction="none",
                                 prior_mu=prior_mu, prior_logvar=prior_logvar).kl

    def nll(self, sample: torch.Tensor, dims=None) -> torch.Tensor:
        """Negative log-likelihood of ``sample`` under this Gaussian, summed over ``dims``
        (default: every non-batch dim)."""
        if dims is None:
            dims = list(range(1, self.mean.dim()))
        dims = list(dims) if isinstance(dims, (list, tuple)) else [dims]
        if self.deterministic:
            out = torch.zeros_like(self.mean)
        else:
            out = 0.5 * (math.log(2.0 * math.pi) + self.logvar + (sample - self.mean) ** 2 * torch.exp(-self.logvar))
        return out.sum(dim=dims) if dims else out  # torch.sum(dim=[]) would reduce every dim

    def entropy(self) -> torch.Tensor:
        """Differential entropy per batch element, summed over the non-batch dims."""
        out = 0.5 * (math.log(2.0 * math.pi) + 1.0 + self.logvar)
        return out.flatten(1).sum(dim=1) if out.dim() > 1 else out

    def __repr__(self) -> str:
        return (f"DiagonalGaussian(shape={tuple(self.mean.shape)}, dtype={self.mean.dtype}, "
                f"deterministic={self.deterministic}, rng={self.rng!r})")


class Reparameterize(nn.Module):
    r"""z = mu + ε·exp(½·logvar), ε ~ N(0, I) drawn inside the fused kernel (``vae_ext.reparameterize``).

    Args:
        num_samples: K samples per element; K > 1 returns (K, *mu.shape).
        sample_in_eval: if False, eval mode returns mu (the posterior mode) instead of a sample.

    Forward ``(mu, logvar, eps=None, generator=None, seed=None)`` as ``vae_ext.reparameterize``.
    """

    def __init__(self, num_samples: int = 1, sample_in_eval: bool = True) -> None:
        super().__init__()
        if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
            raise ValueError(f"Reparameterize: num_samples must be an int >= 1, got {num_samples!r}")
        self.num_samples, self.sample_in_eval = num_samples, sample_in_eval

    def forward(self, mu: torch.Tensor, logvar: torch.Tensor, eps: torch.Tensor | None = None,
                generator: torch.Generator | None = None, seed: int | None = None) -> torch.Tensor:
        if not self.training and not self.sample_in_eval:
            shape = torch.broadcast_shapes(mu.shape, logvar.shape)
            mode = mu.expand(shape)
            return mode if self.num_samples == 1 else mode.expand(self.num_samples, *shape)
        return vae_ext.reparameterize(mu, logvar, eps=eps, generator=generator, num_samples=self.num_samples,
                                      seed=seed)

    def extra_repr(self) -> str:
        return f"num_samples={self.num_samples}, sample_in_eval={self.sample_in_eval}"
