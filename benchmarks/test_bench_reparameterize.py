"""reparameterize: fused kernel vs the eager reference vs torch.compile of the reference.

Issue target (2-core CPU, 4096x4096 float32): fused forward >= 4x the eager
reference; on a GPU >= 80% of the measured copy bandwidth.
"""

import pytest
import torch

import vae_ext
from conftest import DEVICES, run_benchmark
from vae_ext import reference

N = 4096
_compiled = {}


def _impl_fn(impl):
    if impl == "fused":
        return vae_ext.reparameterize
    if impl == "reference":
        return reference.reparameterize
    if "compile" not in _compiled:
        _compiled["compile"] = torch.compile(reference.reparameterize)
    return _compiled["compile"]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("pass_", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("impl", ["fused", "reference", "compile"])
def test_reparameterize(benchmark, device, pass_, impl):
    torch.manual_seed(0)
    mu = torch.randn(N, N, device=device)
    logvar = 0.5 * torch.randn(N, N, device=device)
    fn = _impl_fn(impl)
    elem = 4  # float32
    if pass_ == "fwd":
        def call():
            return fn(mu, logvar)
        moved = 3 * elem * N * N  # read mu, logvar; write z
    else:
        mu.requires_grad_()
        logvar.requires_grad_()
        grad = torch.randn(N, N, device=device)

        def call():
            z = fn(mu, logvar)
            dmu, dlogvar = torch.autograd.grad(z, (mu, logvar), grad)
            return dmu
        # forward 3 + backward (read grad, z, mu; write dmu, dlogvar) 5
        moved = 8 * elem * N * N
    run_benchmark(benchmark, call, device=device, op="reparameterize", case=f"{N}x{N} float32", impl=impl,
                  pass_=pass_, bytes=moved)
