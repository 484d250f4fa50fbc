"""elbo_loss: the fused kernels against the reference and against torch's own losses
(forward and every gradient), dtypes, determinism, torch.library integration, bad input."""

import math

import pytest
import torch
import torch.nn.functional as F

import vae_ext
from conftest import DEVICES, FLOAT_DTYPES, assert_close, requires_cuda, requires_ext
from vae_ext import reference

pytestmark = requires_ext

LIKELIHOODS = ["bernoulli", "gaussian", "categorical"]
REDUCTIONS = ["mean", "sum", "none"]


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def make_inputs(likelihood, dtype=torch.float64, device="cpu", batch=5, recon_shape=(3, 37), vocab=11, latent=(2, 9),
                seed=0, prior=False, obs=None):
    """Fresh random inputs (float64 draws cast to dtype). recon_shape is the per-sample shape
    ((T,) positions for categorical). obs: None, 'float', 'scalar', 'row', 'channel', 'element'."""
    g = _gen(seed)

    def randn(*shape, scale=1.0):
        return (scale * torch.randn(tuple(shape), generator=g, dtype=torch.float64)).to(device=device, dtype=dtype)

    if likelihood == "categorical":
        recon = randn(batch, recon_shape[0], vocab, scale=2.0)
        target = torch.randint(0, vocab, (batch, recon_shape[0]), generator=g).to(device)
        target[0, ::3] = -100  # some padding
    else:
        recon = randn(batch, *recon_shape, scale=2.0)
        target = torch.rand(batch, *recon_shape, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)
    mu = randn(batch, *latent)
    logvar = randn(batch, *latent, scale=0.5)
    kw = {}
    if prior:
        kw["prior_mu"] = randn(*latent[1:], scale=0.5)  # broadcast over the batch and the first latent dim
        kw["prior_logvar"] = randn(batch, *latent, scale=0.3)
    if obs == "float":
        kw["obs_logvar"] = -0.3
    elif obs == "scalar":
        kw["obs_logvar"] = randn(1, scale=0.3).reshape(())
    elif obs == "row":
        kw["obs_logvar"] = randn(batch, *([1] * len(recon_shape)), scale=0.3)
    elif obs == "channel":
        kw["obs_logvar"] = randn(recon_shape[0], 1, scale=0.3)
    elif obs == "element":
        kw["obs_logvar"] = randn(*recon_shape, scale=0.3)
    elif obs == "full":
        kw["obs_logvar"] = randn(batch, *recon_shape, scale=0.3)
    return recon, target, mu, logvar, kw


def _grad_inputs(recon, mu, logvar, kw):
    """The tensors that get gradients (everything floating except the target)."""
    out = {"recon": recon, "mu": mu, "logvar": logvar}
    for k in ("prior_mu", "prior_logvar", "obs_logvar"):
        if isinstance(kw.get(k), torch.Tensor):
            out[k] = kw[k]
    return out


def _upstream(res, seed=7):
    """A non-trivial upstream gradient for each of loss, recon and kl."""
    g = _gen(seed)
    return [(torch.randn(r.shape, generator=g, dtype=torch.float64) + 0.5).to(device=r.device, dtype=r.dtype)
            for r in res]


def run_with_grads(fn, recon, target, mu, logvar, kw, upstream=None, **opts):
    """Calls fn on fresh leaf copies; returns (results, {name: grad})."""
    leaves = {k: v.detach().clone().requires_grad_() for k, v in _grad_inputs(recon, mu, logvar, kw).items()}
    kw2 = dict(kw)
    for k in ("prior_mu", "prior_logvar", "obs_logvar"):
        if k in leaves:
            kw2[k] = leaves[k]
    res = fn(leaves["recon"], target, leaves["mu"], leaves["logvar"], **kw2, **opts)
    if upstream is None:
        upstream = _upstream(res)
    grads = torch.autograd.grad(list(res), list(leaves.values()), upstream)
    return res, dict(zip(leaves, grads)), upstream


def _double(kw):
    return {k: (v.double() if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}


# ---------------------------------------------------------------- parity with the reference

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_the_fused_kernel_runs(device, dtype):
    """Guards every parity test below: they must compare the kernels, not the reference with itself."""
    recon, target, mu, logvar, _ = make_inputs("bernoulli", dtype=dtype, device=device)
    with vae_ext.use_backend("extension"):
        res = vae_ext.elbo_loss(recon.requires_grad_(), target, mu, logvar)
    assert "ElboForward" in res.loss.grad_fn.name()  # the C++ autograd node of vae_ext::elbo_forward
    assert vae_ext.backend_info()["ops"]["elbo_loss"]["cpu"]["backend"] == "extension"
    with vae_ext.use_backend("reference"):
        ref = vae_ext.elbo_loss(recon, target, mu, logvar)
    assert "ElboForward" not in ref.loss.grad_fn.name()
    assert_close(res.loss, ref.loss.double(), dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("likelihood", LIKELIHOODS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("prior", [False, True])
def test_matches_reference_forward_and_all_gradients(device, likelihood, reduction, prior):
    recon, target, mu, logvar, kw = make_inputs(likelihood, device=device, prior=prior, seed=1)
    opts = dict(likelihood=likelihood, reduction=reduction, beta=0.7)
    res, grads, up = run_with_grads(vae_ext.elbo_loss, recon, target, mu, logvar, kw, **opts)
    ref, ref_grads, _ = run_with_grads(reference.elbo_loss, recon, target, mu, logvar, kw, upstream=up, **opts)
    for a, b in zip(res, ref):
        assert a.shape == b.shape
        assert_close(a, b, torch.float64)
    assert set(grads) == set(ref_grads)
    for name in grads:
        assert grads[name].shape == ref_grads[name].shape, name
        assert_close(grads[name], ref_grads[name], torch.float64)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("obs", ["float", "scalar", "row", "channel", "element", "full"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_gaussian_obs_logvar_forms(device, obs, reduction):
    recon, target, mu, logvar, kw = make_inputs("gaussian", device=device, obs=obs, recon_shape=(4, 6), seed=2)
    opts = dict(likelihood="gaussian", reduction=reduction, beta=1.3)
    res, grads, up = run_with_grads(vae_ext.elbo_loss, recon, target, mu, logvar, kw, **opts)
    ref, ref_grads, _ = run_with_grads(reference.elbo_loss, recon, target, mu, logvar, kw, upstream=up, **opts)
    for a, b in zip(res, ref):
        assert_close(a, b, torch.float64)
    for name in ref_grads:
        assert grads[name].shape == ref_grads[name].shape, name
        assert_close(grads[name], ref_grads[name], torch.float64)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("prior", [False, True])
def test_free_bits(device, reduction, prior):
    recon, target, mu, logvar, kw = make_inputs("bernoulli", device=device, prior=prior, batch=6, seed=3)
    mu = mu * torch.linspace(0.05, 2.0, mu[0].numel(), dtype=mu.dtype, device=device).reshape(mu.shape[1:])
    lam = 0.4
    opts = dict(likelihood="bernoulli", reduction=reduction, beta=2.0, free_bits=lam)
    res, grads, up = run_with_grads(vae_ext.elbo_loss, recon, target, mu, logvar, kw, **opts)
    ref, ref_grads, _ = run_with_grads(reference.elbo_loss, recon, target, mu, logvar, kw, upstream=up, **opts)
    kl_el = reference.gaussian_kl(mu, logvar, kw.get("prior_mu"), kw.get("prior_logvar")).reshape(6, -1)
    below = kl_el.mean(0) < lam
    assert 0 < int(below.sum()) < below.numel(), "the case must clamp some dimensions and not others"
    for a, b in zip(res, ref):
        assert_close(a, b, torch.float64)
    for name in ref_grads:
        assert_close(grads[name], ref_grads[name], torch.float64)
    # Clamped dimensions get no KL gradient.
    assert torch.all(grads["mu"].reshape(6, -1)[:, below] == 0)
    assert torch.all(grads["logvar"].reshape(6, -1)[:, below] == 0)
    # The documented semantics: 'mean' = sum_d max(mean_b KL_bd, lambda), 'sum' = B times that.
    expected = torch.clamp(kl_el.mean(0), min=lam).sum()
    if reduction == "mean":
        torch.testing.assert_close(res.kl, expected)
    elif reduction == "sum":
        torch.testing.assert_close(res.kl, 6 * expected)


# ---------------------------------------------------------------- outside oracles

@pytest.mark.parametrize("device", DEVICES)
def test_bernoulli_matches_bce_with_logits_and_kl_divergence(device):
    recon, target, mu, logvar, kw = make_inputs("bernoulli", device=device, prior=True, seed=4)
    leaves = [t.clone().requires_grad_() for t in (recon, mu, logvar, kw["prior_mu"], kw["prior_logvar"])]
    x, m, lv, pm, plv = leaves
    res = vae_ext.elbo_loss(x, target, m, lv, reduction="none", beta=0.5, prior_mu=pm, prior_logvar=plv)
    bce = F.binary_cross_entropy_with_logits(x, target, reduction="none").flatten(1).sum(1)
    q = torch.distributions.Normal(m, torch.exp(0.5 * lv))
    p = torch.distributions.Normal(pm.expand_as(m), torch.exp(0.5 * plv))
    kl = torch.distributions.kl_divergence(q, p).flatten(1).sum(1)
    oracle = (bce + 0.5 * kl, bce, kl)
    for a, b in zip(res, oracle):
        torch.testing.assert_close(a, b)
    up = _upstream(res)
    g = torch.autograd.grad(list(res), leaves, up)
    g_oracle = torch.autograd.grad(list(oracle), leaves, up)
    for a, b in zip(g, g_oracle):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("device", DEVICES)
def test_gaussian_matches_mse_and_gaussian_nll_loss(device):
    recon, target, mu, logvar, _ = make_inputs("gaussian", device=device, seed=5)
    x = recon.clone().requires_grad_()
    sse = vae_ext.elbo_loss(x, target, mu, logvar, "gaussian", reduction="sum").recon
    torch.testing.assert_close(sse, F.mse_loss(x, target, reduction="sum"))
    (g,) = torch.autograd.grad(sse, x)
    (g_oracle,) = torch.autograd.grad(F.mse_loss(x, target, reduction="sum"), x)
    torch.testing.assert_close(g, g_oracle)

    olv = (0.3 * torch.randn(recon.shape[1:], dtype=torch.float64, device=device)).requires_grad_()
    res = vae_ext.elbo_loss(x, target, mu, logvar, "gaussian", reduction="mean", obs_logvar=olv).recon
    var = torch.exp(olv).expand_as(x)
    oracle = F.gaussian_nll_loss(x, target, var, full=True, reduction="sum", eps=0.0) / x.shape[0]
    torch.testing.assert_close(res, oracle)
    g = torch.autograd.grad(res, (x, olv))
    g_oracle = torch.autograd.grad(oracle, (x, olv))
    for a, b in zip(g, g_oracle):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_categorical_matches_cross_entropy(device, reduction):
    recon, target, mu, logvar, _ = make_inputs("categorical", device=device, recon_shape=(9,), vocab=70, seed=6)
    target[1, 2:5] = 7  # a repeated class
    x = recon.clone().requires_grad_()
    res = vae_ext.elbo_loss(x, target, mu, logvar, "categorical", reduction=reduction).recon
    ce = F.cross_entropy(x.reshape(-1, 70), target.reshape(-1), ignore_index=-100, reduction="none")
    oracle = ce.reshape(target.shape).sum(1)
    oracle = {"mean": oracle.mean(), "sum": oracle.sum(), "none": oracle}[reduction]
    torch.testing.assert_close(res, oracle)
    up = torch.randn_like(res)
    torch.testing.assert_close(torch.autograd.grad(res, x, up)[0], torch.autograd.grad(oracle, x, up)[0])


@pytest.mark.parametrize("device", DEVICES)
def test_categorical_ignore_index_and_all_padding_row(device):
    recon, target, mu, logvar, _ = make_inputs("categorical", device=device, recon_shape=(6,), vocab=13, seed=7)
    target[target == -100] = 1
    target[2] = 5  # a custom ignore_index fills sample 2 entirely
    target[3, 0] = 5
    x = recon.clone().requires_grad_()
    res = vae_ext.elbo_loss(x, target, mu, logvar, "categorical", reduction="none", ignore_index=5)
    assert res.recon[2].item() == 0.0
    ref = reference.elbo_loss(x, target, mu, logvar, "categorical", reduction="none", ignore_index=5)
    torch.testing.assert_close(res.recon, ref.recon)
    (g,) = torch.autograd.grad(res.loss.sum(), x)
    assert torch.all(g[2] == 0) and torch.all(g[3, 0] == 0)
    assert torch.all(g[3, 1:].abs().sum(-1) > 0)


# ---------------------------------------------------------------- dtypes

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("likelihood", LIKELIHOODS)
def test_dtypes_against_float64_reference(device, dtype, likelihood):
    # Sizes that are not multiples of any vector width, and recon rows longer than one chunk.
    recon_shape = (8195,) if likelihood != "categorical" else (5,)
    recon, target, mu, logvar, kw = make_inputs(likelihood, dtype=dtype, device=device, recon_shape=recon_shape,
                                                vocab=1003, latent=(37,), prior=True, batch=3, seed=8,
                                                obs="element" if likelihood == "gaussian" else None)
    opts = dict(likelihood=likelihood, reduction="mean", beta=0.9)
    res, grads, up = run_with_grads(vae_ext.elbo_loss, recon, target, mu, logvar, kw, **opts)
    t64 = target.double() if likelihood != "categorical" else target
    ref, ref_grads, _ = run_with_grads(reference.elbo_loss, recon.double(), t64, mu.double(), logvar.double(),
                                       _double(kw), upstream=[u.double() for u in up], **opts)
    for a, b in zip(res, ref):
        assert a.dtype == dtype
        assert_close(a, b, dtype)
    for name in ref_grads:
        assert grads[name].dtype == dtype
        # per-element gradients are O(1/B): compare on that scale
        assert_close(grads[name] * 3, ref_grads[name] * 3, dtype, scale=2.0 if dtype != torch.float64 else 1.0)


@pytest.mark.parametrize("device", DEVICES)
def test_mixed_dtypes_promote_per_group(device):
    recon, target, mu, logvar, _ = make_inputs("bernoulli", dtype=torch.float32, device=device, seed=9)
    res = vae_ext.elbo_loss(recon, target.double(), mu.bfloat16(), logvar.float())
    assert res.recon.dtype == torch.float64 and res.kl.dtype == torch.float32 and res.loss.dtype == torch.float64
    ref = reference.elbo_loss(recon.double(), target.double(), mu.bfloat16().float(), logvar.float())
    for a, b in zip(res, ref):
        torch.testing.assert_close(a.double(), b.double(), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- numerics, NaN, layout

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_extreme_logits_stay_finite(device, dtype):
    x = torch.tensor([[80.0, -80.0, 79.5, -79.5, 0.0, 30.0, -30.0, 80.0]], dtype=dtype, device=device).repeat(2, 1)
    t = torch.tensor([[0.0, 1.0, 1.0, 0.0, 0.5, 0.0, 1.0, 0.3]], dtype=dtype, device=device).repeat(2, 1)
    mu, lv = torch.zeros(2, 3, dtype=dtype, device=device), torch.zeros(2, 3, dtype=dtype, device=device)
    xg = x.clone().requires_grad_()
    res = vae_ext.elbo_loss(xg, t, mu, lv, reduction="none")
    (g,) = torch.autograd.grad(res.loss.sum(), xg)
    assert torch.isfinite(res.loss).all() and torch.isfinite(g).all()
    ref = F.binary_cross_entropy_with_logits(x.double(), t.double(), reduction="none").sum(1)
    assert_close(res.recon, ref, dtype)
    # categorical with logits of +-80 (and -inf for a masked class)
    logits = torch.tensor([[[80.0, -80.0, 0.0, float("-inf")], [-80.0, -80.0, -80.0, -80.0]]], dtype=dtype,
                          device=device)
    lg = logits.clone().requires_grad_()
    ids = torch.tensor([[1, 3 - 1]], device=device)
    res = vae_ext.elbo_loss(lg, ids, mu[:1], lv[:1], "categorical", reduction="sum")
    (g,) = torch.autograd.grad(res.loss, lg)
    assert torch.isfinite(res.loss) and torch.isfinite(g).all()
    ce = F.cross_entropy(logits.double().reshape(-1, 4), ids.reshape(-1), reduction="sum")
    assert_close(res.recon, ce, dtype)


@pytest.mark.parametrize("device", DEVICES)
def test_bce_terms_are_accurate_per_element(device):
    """Each element's BCE-with-logits and its gradient to a few float32 ulps over the whole logit range
    (the CPU kernel evaluates log1p(exp(-|x|)) with its own polynomial)."""
    x = torch.linspace(-40, 40, 40001, dtype=torch.float32)
    t = torch.rand(x.shape, generator=_gen(30)).round()  # hard 0/1 targets: no cancellation in the oracle
    t[::7] = 0.5
    mu = torch.zeros(x.numel(), 1)
    xg = x[:, None].clone().to(device).requires_grad_()
    res = vae_ext.elbo_loss(xg, t[:, None].to(device), mu.to(device), mu.to(device), reduction="none")
    (g,) = torch.autograd.grad(res.recon.sum(), xg)
    xd, td = x.double(), t.double()
    oracle = torch.clamp(xd, min=0) - xd * td + torch.log1p(torch.exp(-xd.abs()))
    torch.testing.assert_close(res.recon.cpu().double(), oracle, rtol=4e-7, atol=1e-30)
    torch.testing.assert_close(g[:, 0].cpu().double(), torch.sigmoid(xd) - td, rtol=4e-7, atol=1e-7)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("likelihood", LIKELIHOODS)
def test_nan_inputs_propagate_to_their_sample_only(device, likelihood):
    recon, target, mu, logvar, _ = make_inputs(likelihood, device=device, seed=10)
    recon[1].view(-1)[3] = float("nan")
    mu[3].view(-1)[0] = float("nan")
    x = recon.clone().requires_grad_()
    res = vae_ext.elbo_loss(x, target, mu, logvar, likelihood, reduction="none")
    assert torch.isnan(res.recon[1]) and torch.isnan(res.kl[3])
    assert torch.isnan(res.loss[[1, 3]]).all()
    keep = [0, 2, 4]
    assert torch.isfinite(res.loss[keep]).all()
    ref = reference.elbo_loss(recon, target, mu, logvar, likelihood, reduction="none")
    torch.testing.assert_close(res.loss[keep], ref.loss[keep])
    (g,) = torch.autograd.grad(res.loss[keep].sum(), x)
    assert torch.isfinite(g[keep]).all()
    mean = vae_ext.elbo_loss(recon, target, mu, logvar, likelihood)
    assert torch.isnan(mean.loss)


@pytest.mark.parametrize("device", DEVICES)
def test_non_contiguous_and_expanded_inputs(device):
    recon, target, mu, logvar, _ = make_inputs("gaussian", device=device, recon_shape=(6, 10), seed=11)
    x = recon.transpose(1, 2)  # (B, 10, 6), not contiguous
    t = target.transpose(1, 2)
    m = mu.reshape(5, -1)[:, ::2]  # strided
    lv = logvar.reshape(5, -1)[:, ::2]
    pm = torch.randn(m.shape[1], dtype=torch.float64, device=device).expand_as(m)
    res = vae_ext.elbo_loss(x, t, m, lv, "gaussian", reduction="none", prior_mu=pm)
    ref = reference.elbo_loss(x.contiguous(), t.contiguous(), m.contiguous(), lv.contiguous(), "gaussian",
                              reduction="none", prior_mu=pm.contiguous())
    for a, b in zip(res, ref):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("device", DEVICES)
def test_only_some_inputs_require_grad(device):
    recon, target, mu, logvar, _ = make_inputs("bernoulli", device=device, seed=12)
    m = mu.clone().requires_grad_()
    res = vae_ext.elbo_loss(recon, target, m, logvar, beta=3.0)
    (g,) = torch.autograd.grad(res.loss, m)
    torch.testing.assert_close(g, 3.0 * m.detach() / recon.shape[0])
    x = recon.clone().requires_grad_()
    res = vae_ext.elbo_loss(x, target, mu, logvar)
    (g,) = torch.autograd.grad(res.kl + 2 * res.recon, x)
    torch.testing.assert_close(g, 2 * (torch.sigmoid(recon) - target) / recon.shape[0])
    with torch.no_grad():
        res = vae_ext.elbo_loss(x, target, m, logvar)
    assert res.loss.grad_fn is None


def test_op_writes_only_requested_gradients():
    recon, target, mu, logvar, _ = make_inputs("bernoulli", dtype=torch.float32, seed=13)
    out = torch.ops.vae_ext.elbo_forward(recon, target, mu, logvar, None, None, None, "bernoulli", "sum", 1.0, 0.0,
                                         -100, [False, True, False, False, False, False])
    assert out[3].numel() == 0 and out[5].numel() == 0 and out[4].shape == mu.shape
    torch.testing.assert_close(out[4], mu)  # d kl / d mu = mu for 'sum'


@pytest.mark.parametrize("device", DEVICES)
def test_empty_batch_and_empty_sample(device):
    x = torch.zeros(0, 4, device=device, requires_grad=True)
    mu = torch.zeros(0, 2, device=device)
    res = vae_ext.elbo_loss(x, torch.zeros(0, 4, device=device), mu, mu, reduction="sum")
    assert res.loss.item() == 0.0
    assert torch.isnan(vae_ext.elbo_loss(x, torch.zeros(0, 4, device=device), mu, mu).loss)
    assert vae_ext.elbo_loss(x, torch.zeros(0, 4, device=device), mu, mu, reduction="none").loss.shape == (0,)
    # samples with no latent elements: KL 0
    x = torch.randn(3, 4, device=device)
    res = vae_ext.elbo_loss(x, torch.rand(3, 4, device=device), torch.zeros(3, 0, device=device),
                            torch.zeros(3, 0, device=device), reduction="none")
    assert torch.equal(res.kl, torch.zeros(3, device=device))


# ---------------------------------------------------------------- determinism

@pytest.mark.parametrize("likelihood", LIKELIHOODS)
def test_deterministic_run_to_run_and_across_thread_counts(likelihood):
    recon, target, mu, logvar, kw = make_inputs(likelihood, dtype=torch.float32, recon_shape=(20000,) if
                                                likelihood != "categorical" else (64,), vocab=301, latent=(9000,),
                                                batch=4, prior=True, seed=14)
    # A prior shared by the batch: autograd sums its gradient over dim 0 (per column, in order). A scalar
    # prior would be summed to one number by torch's own reduction, whose order depends on the thread count.
    kw["prior_mu"] = 0.5 * mu[:1].clone()
    threads = torch.get_num_threads()

    def run():
        res, grads, _ = run_with_grads(vae_ext.elbo_loss, recon, target, mu, logvar, kw, likelihood=likelihood,
                                       reduction="mean", free_bits=0.3)
        return list(res) + list(grads.values())

    first = run()
    try:
        torch.set_num_threads(1)
        single = run()
    finally:
        torch.set_num_threads(threads)
    again = run()
    for a, b, c in zip(first, single, again):
        assert torch.equal(a, b) and torch.equal(a, c)


# ---------------------------------------------------------------- autograd details

def test_gradcheck_float64():
    for likelihood, obs in (("bernoulli", None), ("gaussian", "channel"), ("categorical", None)):
        recon, target, mu, logvar, kw = make_inputs(likelihood, recon_shape=(3, 4) if likelihood != "categorical"
                                                    else (3,), vocab=5, latent=(4,), batch=3, prior=True, obs=obs,
                                                    seed=15)
        pm, plv = kw["prior_mu"], kw["prior_logvar"]
        tensors = [t.clone().requires_grad_() for t in (recon, mu, logvar, pm, plv)]
        olv = kw["obs_logvar"].clone().requires_grad_() if obs else None
        if olv is not None:
            tensors.append(olv)

        def f(x, m, lv, p_mu, p_lv, *rest, likelihood=likelihood):
            r = vae_ext.elbo_loss(x, target, m, lv, likelihood, beta=0.6, reduction="none", prior_mu=p_mu,
                                  prior_logvar=p_lv, obs_logvar=rest[0] if rest else None)
            return r.loss, r.recon, r.kl

        assert torch.autograd.gradcheck(f, tensors)


@pytest.mark.parametrize("device", DEVICES)
def test_repeated_backward_through_one_call(device):
    """retain_graph: the saved gradient buffers are never modified, whichever path the backward takes
    (returned as they are for unit upstream gradients, scaled into a new tensor otherwise)."""
    recon, target, mu, logvar, _ = make_inputs("bernoulli", dtype=torch.float32, device=device, seed=16)
    x, m = recon.clone().requires_grad_(), mu.clone().requires_grad_()
    res = vae_ext.elbo_loss(x, target, m, logvar, beta=0.5)
    ref = reference.elbo_loss(x, target, m, logvar, beta=0.5)
    for outputs, upstream in ((("loss",), None), (("loss",), 3.0), (("recon", "kl"), None), (("loss",), None)):
        got = torch.autograd.grad([getattr(res, o) * (upstream or 1) for o in outputs], (x, m), retain_graph=True)
        want = torch.autograd.grad([getattr(ref, o) * (upstream or 1) for o in outputs], (x, m), retain_graph=True)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b)


def test_double_backward_is_refused():
    recon, target, mu, logvar, _ = make_inputs("bernoulli", seed=16)
    x = recon.clone().requires_grad_()
    res = vae_ext.elbo_loss(x, target, mu, logvar)
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(res.loss, x, create_graph=True)


def test_scale_grad_op():
    g = torch.randn(4, 10)
    out = torch.ops.vae_ext.elbo_scale_grad(g, torch.tensor([2.0, 1.0, 0.0, -0.5]))
    torch.testing.assert_close(out, g * torch.tensor([2.0, 1.0, 0.0, -0.5])[:, None])
    h = torch.randn(3, 5, dtype=torch.bfloat16)
    out = torch.ops.vae_ext.elbo_scale_grad(h, torch.tensor(0.5, dtype=torch.float64))
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, h * 0.5)


# ---------------------------------------------------------------- torch.library integration

def test_opcheck():
    recon, target, mu, logvar, kw = make_inputs("gaussian", dtype=torch.float32, prior=True, obs="element", seed=17)
    pm = kw["prior_mu"].expand(mu.shape)
    plv = kw["prior_logvar"]
    olv = kw["obs_logvar"].reshape(1, *recon.shape[1:])
    args = [t.clone().requires_grad_() for t in (recon,)] + [target] + [
        t.clone().requires_grad_() for t in (mu, logvar)]
    torch.library.opcheck(torch.ops.vae_ext.elbo_forward.default,
                          (*args, pm, plv.clone().requires_grad_(), olv.clone().requires_grad_(), "gaussian", "mean",
                           0.7, 0.2, -100, [True, True, True, False, True, True]))
    torch.library.opcheck(torch.ops.vae_ext.elbo_forward.default,
                          (recon, target, mu, logvar, None, None, None, "bernoulli", "none", 1.0, 0.0, -100,
                           [False] * 6))
    logits, ids, mu2, lv2, _ = make_inputs("categorical", dtype=torch.float32, seed=18)
    torch.library.opcheck(torch.ops.vae_ext.elbo_forward.default,
                          (logits.requires_grad_(), ids, mu2, lv2, None, None, None, "categorical", "sum", 2.0, 0.0,
                           -100, [True, False, False, False, False, False]))
    torch.library.opcheck(torch.ops.vae_ext.elbo_scale_grad.default, (torch.randn(3, 4), torch.randn(3)))


@pytest.mark.parametrize("likelihood", LIKELIHOODS)
def test_torch_compile_fullgraph(likelihood):
    recon, target, mu, logvar, kw = make_inputs(likelihood, dtype=torch.float32, prior=True, seed=19,
                                                obs="channel" if likelihood == "gaussian" else None)

    @torch.compile(fullgraph=True)
    def step(x, m, lv, plv, olv):
        kw2 = dict(kw, prior_logvar=plv)
        if olv is not None:
            kw2["obs_logvar"] = olv
        r = vae_ext.elbo_loss(x * 1.5, target, m, lv, likelihood, beta=0.8, free_bits=0.1, **kw2)
        return r.loss, r.kl

    leaves = [t.clone().requires_grad_() for t in (recon, mu, logvar, kw["prior_logvar"])]
    olv = kw["obs_logvar"].clone().requires_grad_() if "obs_logvar" in kw else None
    loss, kl = step(*leaves, olv)
    all_leaves = leaves + ([olv] if olv is not None else [])
    grads = torch.autograd.grad(loss, all_leaves)

    eager_leaves = [t.detach().clone().requires_grad_() for t in all_leaves]
    kw2 = dict(kw, prior_logvar=eager_leaves[3])
    if olv is not None:
        kw2["obs_logvar"] = eager_leaves[4]
    ref = reference.elbo_loss(eager_leaves[0] * 1.5, target, eager_leaves[1], eager_leaves[2], likelihood, beta=0.8,
                              free_bits=0.1, **kw2)
    ref_grads = torch.autograd.grad(ref.loss, eager_leaves)
    torch.testing.assert_close(loss, ref.loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(kl, ref.kl, rtol=1e-5, atol=1e-5)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- bad input

def test_bad_input_raises_naming_the_argument():
    recon, target, mu, logvar, _ = make_inputs("bernoulli", dtype=torch.float32, seed=20)
    with pytest.raises(ValueError, match="target"):
        vae_ext.elbo_loss(recon, target[:, :2], mu, logvar)
    with pytest.raises(ValueError, match="logvar"):
        vae_ext.elbo_loss(recon, target, mu, logvar[:, :1])
    with pytest.raises(ValueError, match="mu"):
        vae_ext.elbo_loss(recon, target, mu[:3], logvar[:3])
    with pytest.raises(ValueError, match="likelihood"):
        vae_ext.elbo_loss(recon, target, mu, logvar, likelihood="poisson")
    with pytest.raises(ValueError, match="reduction"):
        vae_ext.elbo_loss(recon, target, mu, logvar, reduction="avg")
    with pytest.raises(ValueError, match="prior_mu"):
        vae_ext.elbo_loss(recon, target, mu, logvar, prior_mu=torch.zeros(7))
    with pytest.raises(ValueError, match="beta"):
        vae_ext.elbo_loss(recon, target, mu, logvar, beta=float("nan"))
    with pytest.raises(ValueError, match="free_bits"):
        vae_ext.elbo_loss(recon, target, mu, logvar, free_bits=-1.0)
    with pytest.raises(TypeError, match="recon"):
        vae_ext.elbo_loss(recon.long(), target, mu, logvar)
    with pytest.raises(ValueError, match="obs_logvar"):
        vae_ext.elbo_loss(recon, target, mu, logvar, obs_logvar=0.0)  # bernoulli has no obs variance
    with pytest.raises(ValueError, match="obs_logvar"):
        vae_ext.elbo_loss(recon, target, mu, logvar, "gaussian", obs_logvar=torch.zeros(5))
    with pytest.raises(ValueError, match="device"):
        vae_ext.elbo_loss(recon, target, mu.to("meta"), logvar)


def test_bad_categorical_input():
    logits, ids, mu, logvar, _ = make_inputs("categorical", dtype=torch.float32, recon_shape=(4,), vocab=6, seed=21)
    with pytest.raises(TypeError, match="target"):
        vae_ext.elbo_loss(logits, ids.float(), mu, logvar, "categorical")
    with pytest.raises(ValueError, match="target"):
        vae_ext.elbo_loss(logits, ids[:, :3], mu, logvar, "categorical")
    with pytest.raises(ValueError, match="recon"):
        vae_ext.elbo_loss(logits.flatten(1), ids, mu, logvar, "categorical")
    bad = ids.clone()
    bad[1, 2] = 6
    with pytest.raises(ValueError, match="class id 6"):
        vae_ext.elbo_loss(logits, bad, mu, logvar, "categorical")
    bad[1, 2] = -3
    with pytest.raises(ValueError, match="class id -3"):
        vae_ext.elbo_loss(logits, bad, mu, logvar, "categorical")
    # int32 ids are accepted
    ok = vae_ext.elbo_loss(logits, ids.int(), mu, logvar, "categorical")
    torch.testing.assert_close(ok.loss, vae_ext.elbo_loss(logits, ids, mu, logvar, "categorical").loss)


def test_op_gives_nan_not_a_crash_for_ids_out_of_range():
    """The public API rejects such ids; the op itself (e.g. under torch.compile) must not read out of bounds."""
    logits, ids, mu, logvar, _ = make_inputs("categorical", dtype=torch.float32, recon_shape=(4,), vocab=6, seed=22)
    ids[1, 0] = 1000
    ids[2, 1] = -7
    out = torch.ops.vae_ext.elbo_forward(logits, ids, mu, logvar, None, None, None, "categorical", "none", 1.0, 0.0,
                                         -100, [True, False, False, False, False, False])
    assert torch.isnan(out[1][[1, 2]]).all() and torch.isfinite(out[1][[0, 3, 4]]).all()
    assert torch.all(out[3][1, 0] == 0) and torch.all(out[3][2, 1] == 0)


# ---------------------------------------------------------------- CUDA

@requires_cuda
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("likelihood", LIKELIHOODS)
@pytest.mark.parametrize("aligned", [True, False])
def test_cuda_matches_cpu(dtype, likelihood, aligned):
    recon_shape = (4100,) if likelihood != "categorical" else (33,)
    recon, target, mu, logvar, kw = make_inputs(likelihood, dtype=dtype, recon_shape=recon_shape, vocab=1024,
                                                latent=(64,), prior=True, batch=6, seed=23,
                                                obs="element" if likelihood == "gaussian" else None)
    if not aligned:  # offset views: the kernels fall back to scalar accesses
        recon = torch.cat([recon.flatten(), recon.flatten()[:1]])[1:].reshape(recon.shape)
    for reduction in REDUCTIONS:
        opts = dict(likelihood=likelihood, reduction=reduction, beta=0.6, free_bits=0.05)
        cpu, cpu_grads, up = run_with_grads(vae_ext.elbo_loss, recon, target, mu, logvar, kw, **opts)
        kw_cuda = {k: (v.cuda() if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
        cuda, cuda_grads, _ = run_with_grads(vae_ext.elbo_loss, recon.cuda(), target.cuda(), mu.cuda(),
                                             logvar.cuda(), kw_cuda, upstream=[u.cuda() for u in up], **opts)
        for a, b in zip(cuda, cpu):
            assert_close(a.cpu(), b, dtype)
        for name in cpu_grads:
            assert_close(cuda_grads[name].cpu() * 6, cpu_grads[name] * 6, dtype)


@requires_cuda
def test_cuda_deterministic():
    recon, target, mu, logvar, kw = make_inputs("categorical", dtype=torch.float32, device="cuda", recon_shape=(300,),
                                                vocab=5000, latent=(5000,), batch=8, seed=24)
    runs = [run_with_grads(vae_ext.elbo_loss, recon, target, mu, logvar, kw, free_bits=0.2)[:2] for _ in range(3)]
    for res, grads in runs[1:]:
        for a, b in zip(res, runs[0][0]):
            assert torch.equal(a, b)
        for k in grads:
            assert torch.equal(grads[k], runs[0][1][k])
