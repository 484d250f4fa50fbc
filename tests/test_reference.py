"""The references themselves against outside oracles (SDPA, torch.nn.functional,
torch.distributions), so that every kernel test compares with a trusted oracle."""

import pytest
import torch
import torch.nn.functional as F

from vae_ext import reference


def _qkv(b=2, h=4, hkv=2, sq=7, sk=9, d=8, dtype=torch.float64):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(b, h, sq, d, generator=g, dtype=dtype)
    k = torch.randn(b, hkv, sk, d, generator=g, dtype=dtype)
    v = torch.randn(b, hkv, sk, d, generator=g, dtype=dtype)
    return q, k, v


@pytest.mark.parametrize("is_causal", [False, True])
def test_attention_reference_matches_sdpa(is_causal):
    q, k, v = _qkv()
    kpm = torch.zeros(2, 9, dtype=torch.bool)
    kpm[0, 6:] = True
    bool_mask = torch.rand(7, 9, generator=torch.Generator().manual_seed(1)) > 0.2
    add_mask = torch.randn(2, 1, 7, 9, dtype=torch.float64)
    out = reference.masked_attention(q, k, v, bool_mask, kpm, is_causal)
    out2 = reference.masked_attention(q, k, v, add_mask, None, is_causal, scale=0.3)
    ke, ve = k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)
    allowed = bool_mask & ~kpm[:, None, None, :]
    if is_causal:
        allowed = allowed & torch.ones(7, 9, dtype=torch.bool).tril()
    expected = F.scaled_dot_product_attention(q, ke, ve, attn_mask=allowed)
    rows = allowed.any(-1, keepdim=True)  # SDPA gives NaN for empty rows; the contract says zeros
    torch.testing.assert_close(out, torch.where(rows, expected, torch.zeros_like(expected)))
    causal_add = torch.zeros(7, 9, dtype=torch.float64).masked_fill(~torch.ones(7, 9, dtype=torch.bool).tril(),
                                                                       float("-inf"))
    expected2 = F.scaled_dot_product_attention(q, ke, ve, attn_mask=add_mask + (causal_add if is_causal else 0),
                                               scale=0.3)
    torch.testing.assert_close(out2, expected2)


def test_attention_reference_empty_rows_are_zero_with_zero_grad():
    q, k, v = _qkv(h=2, hkv=2)
    q.requires_grad_()
    kpm = torch.ones(2, 9, dtype=torch.bool)
    kpm[1] = False
    out = reference.masked_attention(q, k, v, key_padding_mask=kpm)
    assert torch.equal(out[0], torch.zeros_like(out[0]))
    out.sum().backward()
    assert torch.equal(q.grad[0], torch.zeros_like(q.grad[0])) and torch.isfinite(q.grad).all()


def test_attention_reference_dropout_seed_is_deterministic_and_unbiased():
    q, k, v = _qkv(b=1, h=1, hkv=1, sq=64, sk=64, d=4)
    a = reference.masked_attention(q, k, v, dropout_p=0.5, seed=3)
    assert torch.equal(a, reference.masked_attention(q, k, v, dropout_p=0.5, seed=3))
    mean = sum(reference.masked_attention(q, k, v, dropout_p=0.5, seed=s) for s in range(200)) / 200
    torch.testing.assert_close(mean, reference.masked_attention(q, k, v), atol=0.1, rtol=0.1)
    keep = reference.dropout_keep_mask(7, (2, 3, 50, 50), 0.25)
    assert abs(keep.double().mean().item() - 0.75) < 0.02


@pytest.mark.parametrize("prior", [False, True])
def test_elbo_reference_matches_torch_oracles(prior):
    torch.manual_seed(0)
    x = torch.randn(4, 3, 5, dtype=torch.float64)
    t = torch.rand(4, 3, 5, dtype=torch.float64)
    mu, lv = torch.randn(4, 6, dtype=torch.float64), torch.randn(4, 6, dtype=torch.float64)
    pm, plv = (torch.randn(6, dtype=torch.float64), torch.randn(4, 6, dtype=torch.float64)) if prior else (None, None)
    res = reference.elbo_loss(x, t, mu, lv, "bernoulli", beta=0.7, reduction="none", prior_mu=pm, prior_logvar=plv)
    recon = F.binary_cross_entropy_with_logits(x, t, reduction="none").sum((1, 2))
    q = torch.distributions.Normal(mu, torch.exp(0.5 * lv))
    p = torch.distributions.Normal(pm if prior else torch.zeros_like(mu),
                                   torch.exp(0.5 * plv) if prior else torch.ones_like(mu))
    kl = torch.distributions.kl_divergence(q, p).sum(1)
    torch.testing.assert_close(res.recon, recon)
    torch.testing.assert_close(res.kl, kl)
    torch.testing.assert_close(res.loss, recon + 0.7 * kl)
    mean = reference.elbo_loss(x, t, mu, lv, "bernoulli", beta=0.7, prior_mu=pm, prior_logvar=plv)
    torch.testing.assert_close(mean.loss, (recon + 0.7 * kl).mean())


def test_elbo_reference_gaussian_and_categorical():
    torch.manual_seed(1)
    x, t = torch.randn(3, 10, dtype=torch.float64), torch.randn(3, 10, dtype=torch.float64)
    mu, lv = torch.randn(3, 2, dtype=torch.float64), torch.randn(3, 2, dtype=torch.float64)
    sse = reference.elbo_loss(x, t, mu, lv, "gaussian", reduction="sum").recon
    torch.testing.assert_close(sse, F.mse_loss(x, t, reduction="sum"))
    olv = torch.randn(10, dtype=torch.float64)
    nll = reference.elbo_loss(x, t, mu, lv, "gaussian", reduction="sum", obs_logvar=olv).recon
    torch.testing.assert_close(nll, F.gaussian_nll_loss(x, t, torch.exp(olv).expand(3, 10), full=True,
                                                        reduction="sum"))
    logits = torch.randn(3, 5, 7, dtype=torch.float64)
    ids = torch.randint(0, 7, (3, 5))
    ids[1, 2:] = -100
    ce = reference.elbo_loss(logits, ids, mu, lv, "categorical", reduction="sum").recon
    torch.testing.assert_close(ce, F.cross_entropy(logits.reshape(-1, 7), ids.reshape(-1), reduction="sum"))


def test_elbo_reference_free_bits():
    mu = torch.tensor([[0.0, 2.0], [0.0, 2.0]], dtype=torch.float64, requires_grad=True)
    lv = torch.zeros(2, 2, dtype=torch.float64)
    x = torch.zeros(2, 1, dtype=torch.float64)
    res = reference.elbo_loss(x, torch.zeros_like(x), mu, lv, free_bits=0.5, reduction="none")
    # dim 0 has KL 0 < 0.5 -> counts 0.5; dim 1 has KL 2 per sample
    torch.testing.assert_close(res.kl, torch.tensor([2.5, 2.5], dtype=torch.float64))
    res.kl.sum().backward()
    torch.testing.assert_close(mu.grad, torch.tensor([[0.0, 2.0], [0.0, 2.0]], dtype=torch.float64))
