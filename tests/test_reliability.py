"""Issue 18: the findings of the bad-input sweep, one test (or a few) each.

1-2. NaN in a visible query / key / value propagates (forward and backward, CPU kernel
     and the CUDA kernels under the emulation); NaN in a hidden key does not leak; a
     fully masked row stays exactly 0.
3.   Double backward: attention and reparameterize give the reference's second-order
     gradients; elbo_loss raises a clear error.
4.   elbo_loss gradients never alias its saved buffers (retained graph).
5.   torch.compile(fullgraph=True, dynamic=True) of all three ops, batch size changing.
6.   A list as a mask: a TypeError naming the argument.
7.   Sizes past int32: the reference in 'auto', an error naming the argument in 'extension'.
8.   use_backend is per thread.
9.   vae_ext.nn.subsequent_mask is the Annotated Transformer's; torch's under its own name.
10.  elbo_loss(recon_probs=True): F.binary_cross_entropy, fused (CPU and emulated CUDA).
"""

import math
import threading

import pytest
import torch
import torch.nn.functional as F

import cuda_emu
import vae_ext
from conftest import requires_ext
from vae_ext import _backend, reference
from vae_ext import nn as vnn

ext = pytest.mark.usefixtures("extension_mode")


@pytest.fixture
def extension_mode():
    with vae_ext.use_backend("extension"):
        yield


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _qkv(b, h, sq, sk, d, dtype, seed=0, hkv=None):
    g = _gen(seed)
    hkv = h if hkv is None else hkv
    q = torch.randn(b, h, sq, d, generator=g, dtype=torch.float64).to(dtype)
    k = torch.randn(b, hkv, sk, d, generator=g, dtype=torch.float64).to(dtype)
    v = torch.randn(b, hkv, sk, d, generator=g, dtype=torch.float64).to(dtype)
    return q, k, v


def _grads(fn, inputs, grad_out):
    leaves = [x.detach().clone().requires_grad_() for x in inputs]
    out = fn(*leaves)
    return out, torch.autograd.grad(out, leaves, grad_out)


def _assert_same_nan_and_close(actual, expected, what, rtol=1e-5, atol=1e-5):
    nan_a, nan_e = torch.isnan(actual), torch.isnan(expected)
    assert torch.equal(nan_a, nan_e), (f"{what}: NaN pattern differs ({int(nan_a.sum())} NaN, expected "
                                       f"{int(nan_e.sum())})")
    torch.testing.assert_close(actual[~nan_a].double(), expected[~nan_e].double(), rtol=rtol, atol=atol,
                               msg=lambda m: f"{what}: {m}")


# ---------------------------------------------------------------- 1-2: NaN, CPU kernels

def visible_pairs_attention(q, k, v, attn_mask=None, kpm=None, causal=False, scale=None):
    """The NaN oracle: softmax attention written as sums over the visible (query, key) pairs only
    (float64, differentiable). Every operand of a product is zeroed by torch.where at the hidden
    pairs, so neither the values nor the gradients see a hidden pair (a plain matmul's 0 * NaN would):
    a NaN reaches exactly the outputs and gradients that visible pairs connect it to. On NaN-free
    input it is vae_ext.reference.masked_attention; SDPA's math path agrees with it where nothing is
    hidden (where something is, SDPA adds -inf to a NaN score and gets NaN)."""
    b, h, sq, d = q.shape
    hkv, sk = k.shape[1], k.shape[2]
    k = k.repeat_interleave(h // hkv, dim=1)
    v = v.repeat_interleave(h // hkv, dim=1)
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    vis = torch.ones(sq, sk, dtype=torch.bool)
    if causal:
        vis = vis.tril()
    vis = vis.expand(b, h, sq, sk)
    if kpm is not None:
        vis = vis & ~kpm[:, None, None, :]
    if attn_mask is not None:
        vis = vis & (attn_mask if attn_mask.dtype == torch.bool else attn_mask != float("-inf"))
    vis5 = vis[..., None]  # (B, H, Sq, Sk, 1)

    def gate(x):  # x broadcast to (B, H, Sq, Sk, D), 0 at the hidden pairs
        x = x.expand(*vis.shape, d)
        return torch.where(vis5, x, torch.zeros_like(x))

    s = (gate(q[:, :, :, None, :]) * gate(k[:, :, None, :, :])).sum(-1) * scale
    if attn_mask is not None and attn_mask.dtype != torch.bool:
        s = s + torch.where(vis, attn_mask.double(), torch.zeros_like(s))
    ninf = torch.tensor(float("-inf"), dtype=s.dtype)
    s = torch.where(vis, s, ninf)
    empty = ~vis.any(-1, keepdim=True)
    m = torch.where(empty, torch.zeros_like(s[..., :1]), s.amax(-1, keepdim=True)).detach()
    e = torch.where(vis, torch.exp(s - m), torch.zeros_like(s))
    probs = torch.where(vis, e / torch.where(empty, torch.ones_like(m), e.sum(-1, keepdim=True)), torch.zeros_like(s))
    return (gate(probs[..., None]) * gate(v[:, :, None, :, :])).sum(-2)


NAN_CASES = [
    # (name, tensor, index, sk, causal): a NaN at `index` of q, k or v
    ("key, first of 3 key tiles", "k", (0, 0, 5, 0), 300, False),  # the case: a dropped key tile
    ("key, single key tile", "k", (0, 1, 5, 3), 100, False),
    ("key, last key tile", "k", (1, 0, 290, 7), 300, False),
    ("key, causal (rows before it do not see it)", "k", (0, 0, 70, 0), 300, True),
    ("query", "q", (0, 1, 3, 2), 300, False),
    ("query, causal", "q", (1, 0, 66, 0), 300, True),
    ("value", "v", (0, 0, 5, 1), 300, False),
    ("value, causal", "v", (0, 1, 70, 1), 300, True),
]


@requires_ext
@ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name,which,index,sk,causal", NAN_CASES, ids=[c[0] for c in NAN_CASES])
def test_nan_in_visible_input_propagates_cpu(name, which, index, sk, causal, dtype):
    sq = 130 if causal else 70  # several query tiles (64 rows each)
    if causal:
        sk = sq
        index = tuple(min(i, sq - 1) if n == 2 else i for n, i in enumerate(index))
    q, k, v = _qkv(2, 2, sq, sk, 16, dtype, seed=len(name))
    {"q": q, "k": k, "v": v}[which][index] = float("nan")
    grad_out = torch.randn(q.shape, generator=_gen(1), dtype=torch.float64).to(dtype)

    out, (dq, dk, dv) = _grads(lambda a, b, c: vae_ext.masked_attention(a, b, c, is_causal=causal), (q, k, v),
                               grad_out)
    ref, (rq, rk, rv) = _grads(lambda a, b, c: visible_pairs_attention(a, b, c, causal=causal),
                               (q.double(), k.double(), v.double()), grad_out.double())
    assert torch.isnan(out).any(), "a NaN in a visible input must reach the output"
    if not causal:  # nothing hidden: the outside oracles give the same NaN rows
        sdpa = F.scaled_dot_product_attention(q.double(), k.double(), v.double())
        assert torch.equal(torch.isnan(ref), torch.isnan(sdpa))
        assert torch.equal(torch.isnan(ref), torch.isnan(reference.masked_attention(q.double(), k.double(),
                                                                                    v.double())))
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-10)
    _assert_same_nan_and_close(out, ref, "out", **tol)
    for got, want, what in ((dq, rq, "dq"), (dk, rk, "dk"), (dv, rv, "dv")):
        _assert_same_nan_and_close(got, want, what, rtol=tol["rtol"] * 4, atol=tol["atol"] * 4)


HIDDEN_CASES = ["causal", "padding", "bool", "additive-inf"]


@requires_ext
@ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("which", ["k", "v"])
@pytest.mark.parametrize("hidden", HIDDEN_CASES)
def test_nan_in_hidden_key_does_not_leak_cpu(hidden, which, dtype):
    """A NaN in a key (or its value) that no query sees (or that some queries do not see) leaves those
    rows finite and equal to the same attention without the NaN; a fully masked row stays exactly 0
    with zero gradients."""
    b, h, sq, sk, d = 2, 2, 70, 150, 16
    q, k, v = _qkv(b, h, sq, sk, d, dtype, seed=3)
    j = 40 if hidden == "causal" else 77  # a hidden key in the middle of a key tile
    kpm = attn_mask = None
    causal = hidden == "causal"
    if hidden == "padding":
        kpm = torch.zeros(b, sk, dtype=torch.bool)
        kpm[:, j] = True
        kpm[1] = True  # batch 1: every key is padding (rows with no visible key)
    elif hidden == "bool":
        attn_mask = torch.ones(b, 1, sq, sk, dtype=torch.bool)
        attn_mask[..., j] = False
        attn_mask[:, :, 3] = False  # a fully masked row
    elif hidden == "additive-inf":
        attn_mask = torch.randn(1, h, sq, sk, generator=_gen(4), dtype=torch.float32)
        attn_mask[..., j] = float("-inf")
        attn_mask[:, :, 3] = float("-inf")
    clean = vae_ext.masked_attention(q, k, v, attn_mask, kpm, causal)
    k_nan, v_nan = k.clone(), v.clone()
    (k_nan if which == "k" else v_nan)[:, :, j] = float("nan")
    grad_out = torch.randn(q.shape, generator=_gen(5), dtype=torch.float64).to(dtype)
    out, (dq, dk, dv) = _grads(lambda a, c, e: vae_ext.masked_attention(a, c, e, attn_mask, kpm, causal),
                               (q, k_nan, v_nan), grad_out)
    if causal:  # rows before the key do not see it
        torch.testing.assert_close(out[:, :, :j], clean[:, :, :j], rtol=1e-6, atol=1e-6)
        assert torch.isnan(out[:, :, j:]).all()
        assert not torch.isnan(dq[:, :, :j]).any()
        ref, grads = _grads(lambda a, c, e: visible_pairs_attention(a, c, e, causal=True),
                            (q.double(), k_nan.double(), v_nan.double()), grad_out.double())
        tol = 1e-5 if dtype == torch.float32 else 1e-10
        _assert_same_nan_and_close(out, ref, "out", rtol=tol, atol=tol)
        for got, want, what in zip((dq, dk, dv), grads, ("dq", "dk", "dv")):
            _assert_same_nan_and_close(got, want, what, rtol=4 * tol, atol=4 * tol)
    else:
        assert not torch.isnan(out).any(), "a NaN in a hidden key leaked into the output"
        if which == "k":  # the same arithmetic as without the NaN
            assert torch.equal(out, clean)
        else:  # the same up to rounding (the product skips the zero weights)
            tol = 1e-6 if dtype == torch.float32 else 1e-12
            torch.testing.assert_close(out, clean, rtol=tol, atol=tol)
        for g, what in ((dq, "dq"), (dk, "dk"), (dv, "dv")):
            assert not torch.isnan(g).any(), f"a NaN in a hidden key leaked into {what}"
        if which == "k":
            assert torch.equal(dk[:, :, j], torch.zeros_like(dk[:, :, j]))
    if hidden == "padding":
        assert torch.equal(out[1], torch.zeros_like(out[1]))
        assert torch.equal(dq[1], torch.zeros_like(dq[1]))
    if hidden in ("bool", "additive-inf"):
        assert torch.equal(out[:, :, 3], torch.zeros_like(out[:, :, 3]))
        assert torch.equal(dq[:, :, 3], torch.zeros_like(dq[:, :, 3]))


@requires_ext
@ext
def test_fully_masked_row_with_nan_query_stays_zero_cpu():
    q, k, v = _qkv(1, 1, 8, 20, 16, torch.float32, seed=6)
    q[0, 0, 2] = float("nan")
    kpm = torch.ones(1, 20, dtype=torch.bool)  # no key visible: every row is empty
    out, (dq, dk, dv) = _grads(lambda a, b, c: vae_ext.masked_attention(a, b, c, key_padding_mask=kpm), (q, k, v),
                               torch.ones(q.shape))
    assert torch.equal(out, torch.zeros_like(out))
    for g in (dq, dk, dv):
        assert torch.equal(g, torch.zeros_like(g))


# ---------------------------------------------------------------- 1-2: NaN, CUDA kernels under the emulation

@pytest.fixture(scope="module")
def emu():
    return cuda_emu.load()


EMU_CASES = ["key", "query", "value", "key, causal", "value, causal", "hidden: padding", "hidden: bool",
             "hidden: additive -inf", "hidden value: padding", "hidden value: bool", "hidden value: additive -inf"]


@cuda_emu.requires_emulation
@pytest.mark.parametrize("dtype,d", [(torch.bfloat16, 64), (torch.float32, 16)], ids=["tensor-core", "simt"])
@pytest.mark.parametrize("case", EMU_CASES)
@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic-dq", "dq-kernel"])
def test_nan_cuda_kernels_emulated(emu, case, dtype, d, deterministic):
    """The CUDA forward and backward under the emulation: a NaN in a visible input gives exactly the
    reference's NaN pattern (the rest close to it); a NaN in a hidden key leaks nowhere."""
    b, h, sq, sk = 2, 2, 40, 70
    j = 30 if "causal" in case else 50  # a key inside a key tile
    q, k, v = _qkv(b, h, sq, sk, d, dtype, seed=len(case) + d)
    causal = "causal" in case
    kpm = attn_mask = None
    if case.endswith(": padding"):
        kpm = torch.zeros(b, sk, dtype=torch.bool)
        kpm[:, j] = True
    elif case.endswith(": bool"):
        attn_mask = torch.ones(b, 1, sq, sk, dtype=torch.bool)
        attn_mask[..., j] = False
    elif case.endswith(": additive -inf"):
        attn_mask = torch.randn(1, h, sq, sk, generator=_gen(16))
        attn_mask[..., j] = float("-inf")
    if case == "query":
        q[0, 1, 7, 3] = float("nan")
    elif "value" in case:
        v[1, 0, j, 2] = float("nan")
        if case.startswith("hidden"):
            v[0, 1, j, 0] = float("inf")  # an infinity must not leak either (0 * inf = NaN)
    else:
        k[0, 0, j, 1] = float("nan")
    scale = 1.0 / math.sqrt(d)
    out, lse, rng = emu.attention_forward(q, k, v, attn_mask, kpm, causal, scale, 0.0, 0, 0, False, True, 0)
    grad = torch.randn(q.shape, generator=_gen(17), dtype=torch.float64).to(dtype)
    dq, dk, dv, _ = emu.attention_backward(grad, q, k, v, out, lse, rng, attn_mask, kpm, causal, scale, 0.0,
                                           deterministic, True, 0)
    ref, (rq, rk, rv) = _grads(lambda a, c, e: visible_pairs_attention(a, c, e, attn_mask, kpm, causal, scale),
                               (q.double(), k.double(), v.double()), grad.double())
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    if causal and "value" in case:  # rows before the NaN value's key do not see it; the rows after do
        assert not torch.isnan(out[:, :, :j]).any() and torch.isnan(out[1, 0, j:, 2]).all()
    elif causal:  # rows before the NaN key do not see it
        assert not torch.isnan(out[:, :, :j]).any() and torch.isnan(out[0, 0, j:]).all()
    elif case.startswith("hidden"):
        for t, what in ((out, "out"), (dk, "dk"), (dv, "dv")):
            assert not torch.isnan(t).any(), f"a NaN in a hidden key leaked into {what}"
    else:
        assert torch.isnan(out).any()
    _assert_same_nan_and_close(out, ref, "out", rtol=tol, atol=tol)
    # the lse is NaN exactly for the rows with a NaN score (a NaN value leaves the scores finite)
    want_lse_nan = torch.isnan(ref).any(-1) if case in ("key", "query", "key, causal") else torch.zeros_like(lse,
                                                                                                         dtype=bool)
    assert torch.equal(torch.isnan(lse), want_lse_nan), "lse must be NaN exactly for the rows with a NaN score"
    # dq too: a hidden NaN key (dS = 0 there) must not reach it through the dS K product, nor a
    # hidden NaN value (dS is exactly 0 at a hidden pair, whatever dP holds).
    grads = [(dk, rk, "dk"), (dv, rv, "dv"), (dq, rq, "dq")]
    for got, want, what in grads:
        _assert_same_nan_and_close(got, want, what, rtol=4 * tol, atol=4 * tol)


# ---------------------------------------------------------------- 3: double backward

@requires_ext
@ext
@pytest.mark.parametrize("masks", ["none", "causal+padding", "bool+gqa", "additive", "causal lower_right"])
def test_attention_double_backward_matches_reference(masks):
    b, h, sq, sk, d = 2, 4, 9, 11, 8
    hkv = 2 if "gqa" in masks else h
    q, k, v = _qkv(b, h, sq, sk, d, torch.float64, seed=7, hkv=hkv)
    kpm = attn_mask = None
    causal = "causal" in masks
    if "padding" in masks:
        kpm = torch.zeros(b, sk, dtype=torch.bool)
        kpm[1, 6:] = True
    if "bool" in masks:
        attn_mask = torch.rand(b, 1, sq, sk, generator=_gen(8)) > 0.3
        attn_mask[:, :, 0] = False  # an empty row
    if masks == "additive":
        attn_mask = torch.randn(1, h, sq, sk, generator=_gen(8)).double()  # float32 values: the kernels round to it
        attn_mask[..., ::4] = float("-inf")
    w = torch.randn(b, h, sq, d, generator=_gen(9), dtype=torch.float64)

    def second_order(fn):
        leaves = [x.clone().requires_grad_() for x in (q, k, v)]
        align = "lower_right" if "lower_right" in masks else "upper_left"  # Sk - Sq = 2 keys more per row
        out = fn(*leaves, attn_mask, kpm, causal, causal_alignment=align)
        g = torch.autograd.grad((out * w).sum(), leaves, create_graph=True)
        penalty = sum((gi ** 2).sum() for gi in g)  # a gradient penalty
        return g, torch.autograd.grad(penalty, leaves)

    g1, g2 = second_order(vae_ext.masked_attention)
    r1, r2 = second_order(reference.masked_attention)
    for a, e in zip(g1 + g2, r1 + r2):
        torch.testing.assert_close(a, e, rtol=1e-9, atol=1e-9)
    assert any(x.abs().max() > 1e-3 for x in g2), "second-order gradients must not vanish"


@requires_ext
@ext
def test_attention_double_backward_with_dropout_raises():
    q, k, v = (x.requires_grad_() for x in _qkv(1, 1, 4, 4, 8, torch.float32))
    out = vae_ext.masked_attention(q, k, v, dropout_p=0.5, seed=1)
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(out.sum(), q, create_graph=True)


@requires_ext
@ext
@pytest.mark.parametrize("num_samples", [1, 3])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_reparameterize_double_backward_matches_reference(num_samples, dtype):
    g = _gen(10)
    mu = torch.randn(5, 3, generator=g, dtype=torch.float64).to(dtype)
    logvar = (0.5 * torch.randn(5, 3, generator=g, dtype=torch.float64)).to(dtype)
    shape = (5, 3) if num_samples == 1 else (num_samples, 5, 3)
    eps = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
    w = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)

    def second_order(fn, **kw):
        m, lv = mu.clone().requires_grad_(), logvar.clone().requires_grad_()
        z = fn(m, lv, **kw)
        gm, glv = torch.autograd.grad((z * w).sum(), (m, lv), create_graph=True)
        second = torch.autograd.grad((gm * glv).sum() + (glv ** 2).sum(), (m, lv), allow_unused=True,
                                     materialize_grads=True)  # d/dmu is 0: z - mu does not depend on mu
        return (gm, glv) + second

    tol = dict(rtol=1e-10, atol=1e-10) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-5)
    for kw in ({"eps": eps}, {"seed": 123, "num_samples": num_samples}):
        if "eps" in kw and num_samples > 1:
            kw["num_samples"] = num_samples
        got = second_order(vae_ext.reparameterize, **kw)
        want = second_order(reference.reparameterize, **kw)
        for a, e in zip(got, want):
            torch.testing.assert_close(a, e, **tol)
        assert got[3].abs().max() > 1e-3, "the second-order gradient of logvar must not vanish"


@requires_ext
@ext
def test_elbo_double_backward_raises_clearly():
    x = torch.randn(4, 6, requires_grad=True)
    mu = torch.randn(4, 3, requires_grad=True)
    lv = torch.randn(4, 3, requires_grad=True)
    loss = vae_ext.elbo_loss(x, torch.rand(4, 6), mu, lv).loss
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(loss, (x, mu), create_graph=True)


# ---------------------------------------------------------------- 4: elbo gradients never alias saved state

@requires_ext
@ext
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_elbo_gradients_do_not_alias_saved_buffers(reduction):
    g = _gen(11)
    x = torch.randn(4, 6, generator=g, requires_grad=True)
    t = torch.rand(4, 6, generator=g)
    mu = torch.randn(4, 3, generator=g, requires_grad=True)
    lv = torch.randn(4, 3, generator=g, requires_grad=True)
    loss = vae_ext.elbo_loss(x, t, mu, lv, reduction=reduction).loss
    first = torch.autograd.grad(loss, (x, mu, lv), retain_graph=True)
    second = torch.autograd.grad(loss, (x, mu, lv), retain_graph=True)
    for a, b in zip(first, second):
        assert a.data_ptr() != b.data_ptr(), "two backward passes returned the same storage"
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    expected = [s.clone() for s in second]
    for a in first:
        a.mul_(100.0)  # the caller owns its gradient
    for b, e in zip(second, expected):
        torch.testing.assert_close(b, e, rtol=0, atol=0)
    third = torch.autograd.grad(loss, (x, mu, lv))  # no "modified by an inplace operation"
    for c, e in zip(third, expected):
        torch.testing.assert_close(c, e, rtol=0, atol=0)


@requires_ext
@ext
def test_elbo_backward_without_retain_still_correct():
    g = _gen(12)
    x = torch.randn(3, 5, generator=g, requires_grad=True)
    t = torch.rand(3, 5, generator=g)
    mu = torch.randn(3, 2, generator=g, requires_grad=True)
    lv = torch.randn(3, 2, generator=g, requires_grad=True)
    vae_ext.elbo_loss(x, t, mu, lv).loss.backward()
    xr, mr, lr = (a.detach().clone().requires_grad_() for a in (x, mu, lv))
    reference.elbo_loss(xr, t, mr, lr).loss.backward()
    for a, e in ((x, xr), (mu, mr), (lv, lr)):
        torch.testing.assert_close(a.grad, e.grad)


# ---------------------------------------------------------------- 5: torch.compile, dynamic shapes

@requires_ext
@ext
def test_compile_dynamic_all_ops_batch_size_changes():
    torch._dynamo.reset()

    @torch.compile(fullgraph=True, dynamic=True, backend="aot_eager")
    def step(x, t, q, k, v, kpm):
        mu, logvar = x[:, :3], x[:, 3:6]
        z = vae_ext.reparameterize(mu, logvar, seed=7)
        parts = vae_ext.elbo_loss(x, t, mu, logvar)  # default keywords
        att = vae_ext.masked_attention(q, k, v, key_padding_mask=kpm, is_causal=True)
        return parts.loss + z.sum() + att.sum()

    for batch in (4, 6, 3):
        g = _gen(batch)
        x = torch.randn(batch, 8, generator=g, requires_grad=True)
        t = torch.rand(batch, 8, generator=g)
        q, k, v = (a.requires_grad_() for a in _qkv(batch, 2, 5, 5, 8, torch.float32, seed=batch))
        kpm = torch.zeros(batch, 5, dtype=torch.bool)
        kpm[0, 3:] = True
        out = step(x, t, q, k, v, kpm)
        out.backward()
        with vae_ext.use_backend("reference"):
            xr, qr, kr, vr = (a.detach().clone().requires_grad_() for a in (x, q, k, v))
            mu, logvar = xr[:, :3], xr[:, 3:6]
            want = (vae_ext.elbo_loss(xr, t, mu, logvar).loss + vae_ext.reparameterize(mu, logvar, seed=7).sum()
                    + vae_ext.masked_attention(qr, kr, vr, key_padding_mask=kpm, is_causal=True).sum())
            want.backward()
        torch.testing.assert_close(out, want)
        for a, e in ((x, xr), (q, qr), (k, kr), (v, vr)):
            torch.testing.assert_close(a.grad, e.grad)


# ---------------------------------------------------------------- 6: a list as a mask

@pytest.mark.parametrize("arg", ["key_padding_mask", "attn_mask"])
def test_list_mask_is_a_type_error_naming_it(arg):
    q, k, v = _qkv(1, 1, 2, 3, 4, torch.float32)
    mask = [[False, True, False]] if arg == "key_padding_mask" else [[[[True, True, False]] * 2]]
    with pytest.raises(TypeError, match=arg):
        vae_ext.masked_attention(q, k, v, **{arg: mask})


def test_list_tensors_elsewhere_are_type_errors_naming_them():
    mu = torch.zeros(2, 3)
    with pytest.raises(TypeError, match="eps"):
        vae_ext.reparameterize(mu, mu, eps=[[0.0] * 3] * 2)
    with pytest.raises(TypeError, match="prior_mu"):
        vae_ext.elbo_loss(torch.zeros(2, 4), torch.zeros(2, 4), mu, mu, prior_mu=[0.0, 0.0, 0.0])


# ---------------------------------------------------------------- 7: sizes past int32

def _huge_qkv():
    n = 2**31 + 5  # rows of q and of k/v, expanded (no memory)
    q = torch.randn(1, 1, 1, 4).expand(1, 1, n, 4)
    k = torch.randn(1, 1, 1, 4).expand(1, 1, n, 4)
    return q, k, k


@requires_ext
def test_sizes_past_int32_run_the_reference_in_auto(monkeypatch):
    calls = []

    def fake_reference(q, k, v, *args):
        calls.append((tuple(q.shape), tuple(k.shape)))
        return torch.zeros(1)

    monkeypatch.setattr(reference, "masked_attention", fake_reference)
    q, k, v = _huge_qkv()
    with vae_ext.use_backend("auto"):
        vae_ext.masked_attention(q, k, v)
    assert calls == [(tuple(q.shape), tuple(k.shape))]


@requires_ext
def test_sizes_past_int32_in_extension_mode_name_the_argument_and_limit():
    q, k, v = _huge_qkv()
    with vae_ext.use_backend("extension"):
        with pytest.raises(RuntimeError, match=r"q has Sq = 2147483653.*int32 limit of 2147483647"):
            vae_ext.masked_attention(q, k, v)
        with pytest.raises(RuntimeError, match=r"k has Sk = 2147483653"):
            vae_ext.masked_attention(q[:, :, :3], k, v)


# ---------------------------------------------------------------- 8: use_backend per thread

def test_use_backend_is_per_thread():
    inside, release = threading.Event(), threading.Event()
    seen = {}

    def worker():
        with vae_ext.use_backend("reference"):
            seen["worker"] = _backend.mode()
            inside.set()
            release.wait(10)
        seen["worker_after"] = _backend.mode()

    default = _backend.mode()
    th = threading.Thread(target=worker)
    th.start()
    assert inside.wait(10)
    seen["main"] = _backend.mode()  # while the other thread is inside its block
    with vae_ext.use_backend("extension" if _backend.extension_loaded() else "auto"):
        seen["main_block"] = _backend.mode()
    release.set()
    th.join(10)
    assert seen["worker"] == "reference"
    assert seen["main"] == default
    assert seen["worker_after"] == default
    assert seen["main_block"] in ("extension", "auto")
    assert _backend.mode() == default


def test_use_backend_nests_and_restores():
    default = _backend.mode()
    with vae_ext.use_backend("reference"):
        with vae_ext.use_backend("auto"):
            assert _backend.mode() == "auto"
        assert _backend.mode() == "reference"
    assert _backend.mode() == default


# ---------------------------------------------------------------- 9: subsequent_mask

def _annotated_transformer_subsequent_mask(size):
    """The Annotated Transformer's definition (harvardnlp), the oracle."""
    attn_shape = (1, size, size)
    mask = torch.triu(torch.ones(attn_shape), diagonal=1).type(torch.uint8)
    return mask == 0


@pytest.mark.parametrize("n", [0, 1, 5])
def test_subsequent_mask_is_the_annotated_transformers(n):
    m = vnn.subsequent_mask(n)
    want = _annotated_transformer_subsequent_mask(n)
    assert m.shape == (1, n, n) and m.dtype == torch.bool
    assert torch.equal(m, want)
    torch.testing.assert_close(vnn.generate_square_subsequent_mask(n, dtype=torch.float32),
                               torch.nn.Transformer.generate_square_subsequent_mask(n))
    assert torch.equal(vnn.generate_square_subsequent_mask(n), ~m[0])


def test_subsequent_mask_drives_masked_attention_causally():
    q, k, v = _qkv(2, 2, 6, 6, 8, torch.float32, seed=13)
    out = vae_ext.masked_attention(q, k, v, attn_mask=vnn.subsequent_mask(6))
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, is_causal=True))
    layer = vnn.MultiheadAttention(8, 2, batch_first=True).eval()
    ref = torch.nn.MultiheadAttention(8, 2, batch_first=True).eval()
    ref.load_state_dict(layer.state_dict())
    x = torch.randn(2, 6, 8, generator=_gen(14))
    torch_mask = vnn.generate_square_subsequent_mask(6)
    torch.testing.assert_close(layer(x, x, x, attn_mask=torch_mask, need_weights=False)[0],
                               ref(x, x, x, attn_mask=torch_mask, need_weights=False)[0])


def test_mask_taking_modules_state_their_convention():
    for module in (vnn.MultiheadAttention, vnn.TransformerEncoderLayer, vnn.TransformerDecoderLayer,
                   vnn.TransformerEncoder, vnn.TransformerDecoder):
        doc = " ".join((module.__doc__ or "").split())
        assert "True = not allowed" in doc, f"{module.__name__} must say which mask convention it takes"
    assert "True = may attend" in " ".join(vnn.subsequent_mask.__doc__.split())
    with pytest.raises(ValueError, match="size"):
        vnn.subsequent_mask(-1)


# ---------------------------------------------------------------- 10: Bernoulli on probabilities

def _probs_inputs(dtype, seed=15, batch=4, n=37):
    g = _gen(seed)
    p = torch.sigmoid(3 * torch.randn(batch, n, generator=g, dtype=torch.float64))
    p[0, :4] = torch.tensor([0.0, 1.0, 1e-30, 1 - 1e-12], dtype=torch.float64)  # the clamps
    t = torch.rand(batch, n, generator=g, dtype=torch.float64)
    t[0, :4] = torch.tensor([1.0, 0.0, 0.5, 1.0])
    mu = torch.randn(batch, 3, generator=g, dtype=torch.float64)
    lv = 0.3 * torch.randn(batch, 3, generator=g, dtype=torch.float64)
    return p.to(dtype), t.to(dtype), mu.to(dtype), lv.to(dtype)


@requires_ext
@pytest.mark.parametrize("backend", ["extension", "reference"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_bernoulli_probs_matches_binary_cross_entropy(backend, reduction, dtype):
    p, t, mu, lv = _probs_inputs(dtype)
    batch = p.shape[0]
    up = torch.linspace(0.5, 2.0, batch, dtype=dtype) if reduction == "none" else torch.tensor(1.7, dtype=dtype)
    pl, ml, ll = (a.clone().requires_grad_() for a in (p, mu, lv))
    with vae_ext.use_backend(backend):
        out = vae_ext.elbo_loss(pl, t, ml, ll, beta=0.5, reduction=reduction, recon_probs=True)
    (out.loss * up).sum().backward()
    po, mo, lo = (a.clone().requires_grad_() for a in (p, mu, lv))
    bce = F.binary_cross_entropy(po, t, reduction="none").sum(1)
    kl = (0.5 * (mo ** 2 + lo.exp() - 1 - lo)).sum(1)
    loss_b = bce + 0.5 * kl
    want = {"mean": loss_b.mean(), "sum": loss_b.sum(), "none": loss_b}[reduction]
    (want * up).sum().backward()
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(out.loss, want.detach(), **tol)
    torch.testing.assert_close(out.recon, {"mean": bce.mean(), "sum": bce.sum(), "none": bce}[reduction].detach(),
                               **tol)
    torch.testing.assert_close(pl.grad, po.grad, **tol)  # torch's gradient, its 1e-12 clamp included
    torch.testing.assert_close(ml.grad, mo.grad, **tol)
    torch.testing.assert_close(ll.grad, lo.grad, **tol)


def test_bernoulli_probs_bad_input():
    p, t, mu, lv = _probs_inputs(torch.float32)
    with pytest.raises(ValueError, match="probabilities in \\[0, 1\\]"):
        vae_ext.elbo_loss(p * 2, t, mu, lv, recon_probs=True)
    with pytest.raises(ValueError, match="recon_probs"):
        vae_ext.elbo_loss(p, t, mu, lv, likelihood="gaussian", recon_probs=True)
    with pytest.raises(TypeError, match="recon_probs"):
        vae_ext.elbo_loss(p, t, mu, lv, recon_probs="yes")
    p[1, 2] = float("nan")  # NaN propagates, as in torch's losses
    out = vae_ext.elbo_loss(p, t, mu, lv, reduction="none", recon_probs=True)
    assert torch.isnan(out.loss[1]) and torch.isfinite(out.loss[[0, 2, 3]]).all()


@requires_ext
@cuda_emu.requires_emulation
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("n", [37, 64, 4100], ids=["scalar-path", "vector-path", "two-partials"])
def test_bernoulli_probs_cuda_kernel_emulated(emu, dtype, n):
    """The CUDA recon kernel on probabilities (vector and scalar paths, several partials per sample) against
    the CPU kernel and F.binary_cross_entropy."""
    from vae_ext.ops import elbo as elbo_ops
    p, t, mu, lv = _probs_inputs(dtype, n=n)
    args = elbo_ops._op_args(p, t, mu, lv, "bernoulli_probs", 0.5, "none", None, None, 0.0, -100, None)
    args = args[:-1] + ([True, True, True, False, False, False],)
    out = emu.elbo_forward(*args, [])
    cpu = torch.ops.vae_ext.elbo_forward(*args)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype != torch.bfloat16 else dict(rtol=2e-2, atol=2e-2)
    for o, c in zip(out, cpu):
        torch.testing.assert_close(o.double(), c.double(), **tol)
    pd = p.double().requires_grad_()
    bce = F.binary_cross_entropy(pd, t.double(), reduction="none").sum(1)
    (g,) = torch.autograd.grad(bce.sum(), pd)
    torch.testing.assert_close(out[1].double(), bce.detach(), rtol=tol["rtol"], atol=tol["atol"] * n)
    torch.testing.assert_close(out[3].double(), g, **tol)
