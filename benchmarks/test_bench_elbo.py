"""elbo_loss: fused kernels vs the eager reference vs torch.compile of the reference.

Cases (issue 3): Bernoulli with recon 2048x4096 and latent 2048x256 float32;
categorical with (B, T, V) = (64, 128, 8192) and latent 64x256 float32.
'fwd' is the loss alone (under torch.no_grad, as in evaluation); 'fwd+bwd' is
the loss and the gradients of recon, mu and logvar.

Targets: on the 2-core CPU, fwd+bwd >= 3x the eager reference (Bernoulli) and
>= 2x (categorical) with lower peak memory (benchmarks/elbo_memory.py); on a GPU
>= 80% of the measured copy bandwidth and >= 1.3x torch.compile of the reference.
`bytes` is the traffic a perfect kernel needs: read the inputs (and write the
gradients for fwd+bwd).
"""

import pytest
import torch

import vae_ext
from conftest import DEVICES, run_benchmark
from vae_ext import reference

CASES = {
    "bernoulli": dict(recon=(2048, 4096), latent=(2048, 256)),
    "categorical": dict(recon=(64, 128, 8192), latent=(64, 256)),
}
_compiled = {}


def _impl_fn(impl):
    if impl == "fused":
        return vae_ext.elbo_loss
    if impl == "reference":
        return reference.elbo_loss
    if "compile" not in _compiled:
        _compiled["compile"] = torch.compile(reference.elbo_loss)
    return _compiled["compile"]


def make_case(likelihood, device):
    torch.manual_seed(0)
    shape = CASES[likelihood]
    recon = torch.randn(shape["recon"], device=device)
    if likelihood == "categorical":
        target = torch.randint(0, shape["recon"][2], shape["recon"][:2], device=device)
        target[:, -8:] = -100  # some padding
    else:
        target = torch.rand(shape["recon"], device=device)
    mu = torch.randn(shape["latent"], device=device)
    logvar = 0.5 * torch.randn(shape["latent"], device=device)
    return recon, target, mu, logvar


def case_name(likelihood):
    shape = CASES[likelihood]
    return f"{likelihood} recon {'x'.join(map(str, shape['recon']))} latent {'x'.join(map(str, shape['latent']))} float32"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("likelihood", list(CASES))
@pytest.mark.parametrize("pass_", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("impl", ["fused", "reference", "compile"])
def test_elbo(benchmark, device, likelihood, pass_, impl):
    recon, target, mu, logvar = make_case(likelihood, device)
    fn = _impl_fn(impl)
    elem = 4
    read = recon.numel() * elem + target.numel() * target.element_size() + 2 * mu.numel() * elem
    if pass_ == "fwd":
        def call():
            with torch.no_grad():
                return fn(recon, target, mu, logvar, likelihood).loss
        moved = read
    else:
        for t in (recon, mu, logvar):
            t.requires_grad_()

        def call():
            loss = fn(recon, target, mu, logvar, likelihood).loss
            return torch.autograd.grad(loss, (recon, mu, logvar))
        moved = read + (recon.numel() + 2 * mu.numel()) * elem  # + write the gradients
    run_benchmark(benchmark, call, device=device, op="elbo", case=case_name(likelihood), impl=impl, pass_=pass_,
                  bytes=moved)
