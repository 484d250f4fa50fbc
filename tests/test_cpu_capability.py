"""Run-time CPU-capability dispatch: every capability this build compiled and this
CPU runs gives the reference's results (and bit-identical dropout masks), the
choice can be forced lower with VAE_EXT_CPU_CAPABILITY, and `vae-ext info` says
which one runs."""

import os
import subprocess
import sys

import pytest
import torch

import vae_ext
from vae_ext import _backend, reference

pytestmark = pytest.mark.skipif(_backend._C is None, reason="needs the compiled extension")

ORDER = ["default", "avx2", "avx512"]


def _runnable():
    """The capabilities built here that this CPU can run (the best one last)."""
    build = _backend.build_info()
    best = build["cpu_capability_best"]
    return [c for c in build["cpu_capabilities"].split(",") if ORDER.index(c) <= ORDER.index(best)]


@pytest.fixture(params=ORDER)
def capability(request):
    if request.param not in _runnable():
        pytest.skip(f"this CPU or build has no {request.param} (best here: {_backend.build_info()['cpu_capability_best']})")
    _backend._C._set_cpu_capability(request.param)
    assert _backend.build_info()["cpu_capability"] == request.param
    yield request.param
    _backend._C._set_cpu_capability("")


def test_build_reports_capabilities():
    build = _backend.build_info()
    built = build["cpu_capabilities"].split(",")
    assert built[0] == "default"
    if os.uname().machine in ("x86_64", "AMD64"):
        assert built == ORDER, "x86-64 builds compile every capability"
    assert build["cpu_capability"] == build["cpu_capability_best"]  # no env override in the test run
    assert build["cpu_capability"] in built


def test_unknown_or_unavailable_capability_raises():
    with pytest.raises(RuntimeError, match="unknown CPU capability 'sse9'"):
        _backend._C._set_cpu_capability("sse9")
    missing = [c for c in ORDER if c not in _runnable()]
    for c in missing:
        with pytest.raises(RuntimeError, match="not available here"):
            _backend._C._set_cpu_capability(c)
    assert _backend.build_info()["cpu_capability"] == _backend.build_info()["cpu_capability_best"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("case", ["causal_gqa", "padding", "mask_dropout"])
def test_attention_matches_reference(capability, dtype, case):
    g = torch.Generator().manual_seed(3)
    B, H, Hkv, S, D = 2, 4, 2, 150, 40  # odd sizes: tails in every tile and vector
    q = torch.randn(B, H, S, D, generator=g, dtype=dtype).requires_grad_()
    k = torch.randn(B, Hkv if case == "causal_gqa" else H, S, D, generator=g, dtype=dtype).requires_grad_()
    v = torch.randn_like(k).requires_grad_()
    kw = {}
    if case == "causal_gqa":
        kw["is_causal"] = True
    elif case == "padding":
        kw["key_padding_mask"] = torch.arange(S)[None, :] < torch.tensor([[S], [97]])
    else:
        kw["attn_mask"] = torch.randn(1, H, S, S, generator=g, dtype=dtype)
        kw["dropout_p"], kw["seed"] = 0.2, 11
    go = torch.randn(B, H, S, D, generator=g, dtype=dtype)
    with vae_ext.use_backend("extension"):
        out = vae_ext.masked_attention(q, k, v, **kw)
        grads = torch.autograd.grad(out, (q, k, v), go)
    with vae_ext.use_backend("reference"):
        ref = vae_ext.masked_attention(q.double(), k.double(), v.double(), **kw)
        ref_grads = torch.autograd.grad(ref, (q, k, v), go.double())
    tol = {torch.float32: 2e-5, torch.float64: 1e-6, torch.bfloat16: 3e-2}[dtype]
    torch.testing.assert_close(out.double(), ref, atol=tol, rtol=tol)
    for gr, gref in zip(grads, ref_grads):
        torch.testing.assert_close(gr.double(), gref.double(), atol=tol * 4, rtol=tol * 4)


def test_results_agree_across_capabilities():
    """Dropout masks are drawn from the same Philox bits at every capability, so
    outputs differ only by float rounding; reparameterize's normals too."""
    caps = _runnable()
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(1, 2, 130, 64, generator=g) for _ in range(3))
    mu, logvar = torch.randn(64, 33, generator=g), torch.randn(64, 33, generator=g)
    outs = []
    try:
        for c in caps:
            _backend._C._set_cpu_capability(c)
            with vae_ext.use_backend("extension"):
                att = vae_ext.masked_attention(q, k, v, dropout_p=0.3, seed=7, is_causal=True)
                z = vae_ext.reparameterize(mu, logvar, seed=9)
                loss = vae_ext.elbo_loss(torch.randn(64, 50, generator=torch.Generator().manual_seed(1)),
                                         torch.rand(64, 50, generator=torch.Generator().manual_seed(2)), mu, logvar).loss
            outs.append((att, z, loss))
    finally:
        _backend._C._set_cpu_capability("")
    for att, z, loss in outs[1:]:
        torch.testing.assert_close(att, outs[0][0], atol=1e-5, rtol=1e-5)
        assert torch.equal(att == 0, outs[0][0] == 0), "the dropout mask must not depend on the capability"
        torch.testing.assert_close(z, outs[0][1], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(loss, outs[0][2], atol=1e-4, rtol=1e-5)


def test_elbo_and_reparameterize_match_reference(capability):
    g = torch.Generator().manual_seed(8)
    mu, logvar = torch.randn(37, 19, generator=g).requires_grad_(), torch.randn(37, 19, generator=g).requires_grad_()
    recon, target = torch.randn(37, 70, generator=g).requires_grad_(), torch.rand(37, 70, generator=g)
    with vae_ext.use_backend("extension"):
        loss = vae_ext.elbo_loss(recon, target, mu, logvar, likelihood="bernoulli", beta=0.5).loss
        grads = torch.autograd.grad(loss, (recon, mu, logvar))
        eps = torch.randn(37, 19, generator=g)
        z = vae_ext.reparameterize(mu, logvar, eps=eps)
    ref = reference.elbo_loss(recon.double(), target.double(), mu.double(), logvar.double(),
                              likelihood="bernoulli", beta=0.5).loss
    ref_grads = torch.autograd.grad(ref, (recon, mu, logvar))
    torch.testing.assert_close(loss.double(), ref, atol=1e-4, rtol=1e-5)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a.double(), b.double(), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(z, mu + eps * torch.exp(0.5 * logvar), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("asked", ORDER)
def test_env_var_forces_a_lower_capability(asked):
    best = _backend.build_info()["cpu_capability_best"]
    expect = ORDER[min(ORDER.index(asked), ORDER.index(best))]
    env = dict(os.environ, VAE_EXT_CPU_CAPABILITY=asked.upper() if asked == "avx2" else asked)
    res = subprocess.run([sys.executable, "-m", "vae_ext", "info"], env=env, capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, res.stderr
    assert f"CPU capability: {expect} (best on this CPU: {best}" in res.stdout


@pytest.mark.parametrize("env,state", [({}, "on"), ({"VAE_EXT_ATTN_BF16_DOT": "0"}, "off (VAE_EXT_ATTN_BF16_DOT=0)"),
                                       ({"VAE_EXT_CPU_CAPABILITY": "avx2"}, "off (the avx512 kernels use it)")])
def test_info_says_whether_the_bf16_dot_products_run(env, state):
    info = _backend.build_info()
    if not info.get("cpu_avx512_bf16") or info["cpu_capability_best"] != "avx512":
        pytest.skip("needs a CPU with AVX512-BF16 and the AVX512 kernels")
    res = subprocess.run([sys.executable, "-m", "vae_ext", "info"], env=dict(os.environ, **env), capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert f"AVX512-BF16 products of bfloat16 attention (forward and backward): {state}" in res.stdout
