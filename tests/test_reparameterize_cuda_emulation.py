"""reparameterize's CUDA kernels under the CPU emulation (tests/cuda_emu), against the CPU kernel and the
reference: the same Philox stream, eps given, the grid-stride loop, the graph-capture seed path, backward."""

import math

import pytest
import torch

import cuda_emu
from conftest import EXT, FLOAT_DTYPES, assert_close, requires_ext
from vae_ext import reference

pytestmark = cuda_emu.requires_emulation


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _reparameterize_inputs(n, dtype, seed):
    g = _gen(seed)
    mu = torch.randn(n, generator=g, dtype=torch.float64).to(dtype)
    logvar = (0.5 * torch.randn(n, generator=g, dtype=torch.float64)).to(dtype)
    return mu, logvar


def _cpu_kernel(mu, logvar, num_samples, seed):
    return torch.ops.vae_ext.reparameterize(mu, logvar, None, num_samples, seed, None)


REPARAM_CASES = [  # (n, num_samples, misaligned view): the vectorised path, n % 4 != 0, K > 1, misaligned
    (4096, 1, False),
    (1003, 1, False),
    (1000, 3, False),
    (257, 4, False),
    (1024, 2, True),
]


@requires_ext
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("n, num_samples, misaligned", REPARAM_CASES)
def test_reparam_forward_matches_cpu_kernel(emu, dtype, n, num_samples, misaligned):
    mu, logvar = _reparameterize_inputs(n + 1, dtype, seed=n)
    if misaligned:  # views one element in: the kernel takes its scalar path
        mu, logvar = mu[1:], logvar[1:]
    else:
        mu, logvar = mu[:n].clone(), logvar[:n].clone()
    seed = 1234 + n
    z = emu.reparameterize_forward(mu, logvar, None, num_samples, seed)
    expected = _cpu_kernel(mu.contiguous(), logvar.contiguous(), num_samples, seed)
    assert z.shape == (num_samples, n) and z.dtype == dtype
    assert not torch.isnan(z).any()  # every element written
    # Same Philox integers; the math libraries differ in the last bits (Sleef on the CPU).
    assert_close(z, expected, dtype, scale=2.0 if dtype == torch.float32 else 1.0)


@requires_ext
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_reparam_forward_grid_stride(emu, dtype):
    # One SM: 8 blocks of 256 threads, so each thread loops over several groups.
    mu, logvar = _reparameterize_inputs(30002, dtype, seed=7)
    old = emu.set_num_sms(1)
    try:
        z = emu.reparameterize_forward(mu, logvar, None, 2, 99)
    finally:
        emu.set_num_sms(old)
    assert_close(z, _cpu_kernel(mu, logvar, 2, 99), dtype, scale=2.0 if dtype == torch.float32 else 1.0)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("n, num_samples, misaligned", [(4096, 1, False), (1001, 3, False), (512, 2, True)])
def test_reparam_forward_given_eps(emu, dtype, n, num_samples, misaligned):
    mu, logvar = _reparameterize_inputs(n + 1, dtype, seed=11)
    eps = torch.randn(num_samples, n + 1, generator=_gen(12), dtype=torch.float64).to(dtype)
    if misaligned:
        mu, logvar, eps = mu[1:], logvar[1:], eps[:, 1:]
    else:
        mu, logvar, eps = mu[:n], logvar[:n], eps[:, :n]
    z = emu.reparameterize_forward(mu, logvar, eps, num_samples, 0)
    expected = reference.reparameterize(mu.double(), logvar.double(), eps=eps.double(), num_samples=num_samples)
    assert_close(z, expected, dtype)


def test_reparam_forward_philox_offset_and_graph_capture_state(emu):
    # The kernel's stream at counter offset 8 (draws), read from device memory as under CUDA-graph capture.
    n, seed, offset = 999, 5, 8
    mu, logvar = _reparameterize_inputs(n, torch.float64, seed=13)
    z = emu.reparameterize_forward(mu, logvar, None, 1, seed, offset, False)
    z_captured = emu.reparameterize_forward(mu, logvar, None, 1, seed, offset, True)
    assert torch.equal(z, z_captured)
    groups = torch.arange((n + 3) // 4, dtype=torch.int64)
    x, y, zz, w = reference.philox_bits(seed, offset // 4, groups)

    def pair(a, b):
        u1 = ((a >> 8) + 1).double() * 2.0**-24
        u2 = (b >> 8).double() * 2.0**-24
        r = torch.sqrt(-2.0 * torch.log(u1))
        return r * torch.cos(2 * math.pi * u2), r * torch.sin(2 * math.pi * u2)

    eps = torch.stack([*pair(x, y), *pair(zz, w)], dim=1).flatten()[:n]
    torch.testing.assert_close(z[0], mu + eps * torch.exp(0.5 * logvar), rtol=1e-12, atol=1e-12)
    assert not torch.equal(z, emu.reparameterize_forward(mu, logvar, None, 1, seed, 0, False))


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("n, num_samples", [(4096, 1), (1003, 3)])
def test_reparam_backward_matches_cpu(emu, dtype, n, num_samples):
    g = _gen(21)
    mu = torch.randn(n, generator=g, dtype=torch.float64).to(dtype)
    z = torch.randn(num_samples, n, generator=g, dtype=torch.float64).to(dtype)
    grad = torch.randn(num_samples, n, generator=g, dtype=torch.float64).to(dtype)
    grad_mu, grad_logvar = emu.reparameterize_backward(grad, z, mu)
    exp_mu = grad.double().sum(0)
    exp_lv = 0.5 * (grad.double() * (z.double() - mu.double())).sum(0)
    assert_close(grad_mu, exp_mu, dtype)
    assert_close(grad_logvar, exp_lv, dtype, scale=1.0 if dtype in (torch.float32, torch.float64) else 4.0)
    if EXT:  # and the CPU kernel
        cpu_mu, cpu_lv = torch.ops.vae_ext.reparameterize_backward(grad, z, mu)
        assert_close(grad_mu, cpu_mu, dtype)
        assert_close(grad_logvar, cpu_lv, dtype)


