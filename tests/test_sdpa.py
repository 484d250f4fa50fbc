"""vae_ext.scaled_dot_product_attention against torch's own SDPA (the outside oracle),
patch_sdpa(), and the lower-right causal alignment of masked_attention (CPU kernels,
forward and backward, against torch's causal_lower_right and the reference).

The fused-path tests replace vae_ext.sdpa.torch_sdpa (the fallback) with a function that
fails, so they prove the kernels ran; the fallback tests prove torch ran."""

import threading

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right, causal_upper_left

import vae_ext
from conftest import TOL, requires_ext
from vae_ext import reference, sdpa

pytestmark = requires_ext

TORCH_SDPA = sdpa.torch_sdpa


@pytest.fixture
def no_fallback(monkeypatch):
    """The call must run on vae_ext's kernels: torch's SDPA may not be called."""
    def fail(*args, **kwargs):
        raise AssertionError("torch's SDPA was called: the fused path did not run")
    monkeypatch.setattr(sdpa, "torch_sdpa", fail)


@pytest.fixture
def fallback_calls(monkeypatch):
    calls = []

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return TORCH_SDPA(*args, **kwargs)
    monkeypatch.setattr(sdpa, "torch_sdpa", spy)
    return calls


def rand(*shape, dtype=torch.float64, seed=0, grad=True):
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)
    return t.requires_grad_(grad)


def check(q, k, v, expected_fn=None, tol_scale=1.0, **kw):
    """vae_ext's SDPA vs torch's, forward and gradients of q, k, v (upstream gradient not 1)."""
    out = vae_ext.scaled_dot_product_attention(q, k, v, **kw)
    qd, kd, vd = (t.detach().double().requires_grad_() for t in (q, k, v))
    kw64 = dict(kw)
    if type(kw64.get("attn_mask")) is torch.Tensor and kw64["attn_mask"].is_floating_point():
        kw64["attn_mask"] = kw64["attn_mask"].double()
    ref = (expected_fn or TORCH_SDPA)(qd, kd, vd, **kw64)
    assert out.shape == ref.shape and out.dtype == q.dtype
    assert not torch.isnan(out).any()
    tol = TOL[q.dtype]
    torch.testing.assert_close(out.double(), ref, rtol=tol["rtol"] * tol_scale, atol=tol["atol"] * tol_scale)
    grad = torch.randn(ref.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    got = torch.autograd.grad(out, (q, k, v), grad.to(q.dtype))
    want = torch.autograd.grad(ref, (qd, kd, vd), grad)
    for name, a, e in zip("qkv", got, want):
        assert not torch.isnan(a).any(), f"NaN in d{name}"
        torch.testing.assert_close(a.double(), e, rtol=4 * tol["rtol"] * tol_scale,
                                   atol=4 * tol["atol"] * tol_scale, msg=lambda m: f"d{name}: {m}")
    return out


# ---------------------------------------------------------------- fused path: torch's semantics

@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shape_q,shape_k", [
    ((2, 3, 5, 8), (2, 3, 7, 8)),        # (B, H, S, D)
    ((3, 5, 8), (3, 7, 8)),              # 3-D: (H, S, D)
    ((5, 8), (7, 8)),                    # 2-D: (S, D)
    ((2, 2, 3, 4, 8), (2, 2, 3, 6, 8)),  # two leading dims
])
def test_shapes_no_mask(no_fallback, dtype, shape_q, shape_k):
    check(rand(*shape_q, dtype=dtype), rand(*shape_k, dtype=dtype, seed=1), rand(*shape_k, dtype=dtype, seed=2))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("sq,sk", [(6, 6), (4, 9), (9, 4)])
def test_is_causal_upper_left(no_fallback, dtype, sq, sk):
    check(rand(2, 2, sq, 16, dtype=dtype), rand(2, 2, sk, 16, dtype=dtype, seed=1),
          rand(2, 2, sk, 16, dtype=dtype, seed=2), is_causal=True)


@pytest.mark.parametrize("mask_shape", [(5, 7), (2, 1, 5, 7), (1, 3, 1, 7), (3, 5, 7), (1, 7)])
def test_bool_mask_broadcasts_as_torch(no_fallback, mask_shape):
    mask = torch.rand(*mask_shape, generator=torch.Generator().manual_seed(3)) > 0.3
    check(rand(2, 3, 5, 8), rand(2, 3, 7, 8, seed=1), rand(2, 3, 7, 8, seed=2), attn_mask=mask)


def test_float_mask_and_scale(no_fallback):
    mask = torch.randn(1, 3, 5, 7, generator=torch.Generator().manual_seed(3))
    mask[..., 2] = float("-inf")
    check(rand(2, 3, 5, 8, dtype=torch.float32), rand(2, 3, 7, 8, dtype=torch.float32, seed=1),
          rand(2, 3, 7, 8, dtype=torch.float32, seed=2), attn_mask=mask, scale=0.3)


def test_float64_float_mask_goes_to_torch(fallback_calls):
    # The kernels add a float mask in float32; torch's float64 result needs the mask in float64.
    mask = torch.randn(1, 3, 5, 7, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    check(rand(2, 3, 5, 8), rand(2, 3, 7, 8, seed=1), rand(2, 3, 7, 8, seed=2), attn_mask=mask, scale=0.3)
    assert fallback_calls


def test_mask_with_five_dims_folds_into_batch(no_fallback):
    mask = torch.rand(2, 1, 3, 4, 6, generator=torch.Generator().manual_seed(3)) > 0.3
    check(rand(2, 2, 3, 4, 8), rand(2, 2, 3, 6, 8, seed=1), rand(2, 2, 3, 6, 8, seed=2), attn_mask=mask)


@pytest.mark.parametrize("masked", [False, True])
def test_enable_gqa(no_fallback, masked):
    mask = (torch.rand(2, 1, 5, 7, generator=torch.Generator().manual_seed(3)) > 0.3) if masked else None
    check(rand(2, 6, 5, 8), rand(2, 2, 7, 8, seed=1), rand(2, 2, 7, 8, seed=2), attn_mask=mask, enable_gqa=True)


@pytest.mark.parametrize("sq,sk", [(1, 9), (4, 9), (9, 4), (6, 6)])
@pytest.mark.parametrize("bias", [causal_lower_right, causal_upper_left])
def test_causal_bias_objects(no_fallback, bias, sq, sk):
    # torch's own SDPA with the CausalBias materialised is the oracle.
    check(rand(2, 2, sq, 8), rand(2, 2, sk, 8, seed=1), rand(2, 2, sk, 8, seed=2), attn_mask=bias(sq, sk),
          expected_fn=lambda q, k, v, attn_mask: TORCH_SDPA(q, k, v, attn_mask=attn_mask._materialize()))


def test_low_precision_against_float64(no_fallback):
    for dtype in (torch.bfloat16, torch.float16):
        check(rand(2, 2, 9, 16, dtype=dtype), rand(2, 2, 9, 16, dtype=dtype, seed=1),
              rand(2, 2, 9, 16, dtype=dtype, seed=2), is_causal=True, tol_scale=2.0)


def test_fully_masked_rows_are_zero_with_zero_grads(no_fallback):
    mask = torch.ones(5, 7, dtype=torch.bool)
    mask[1] = False
    q, k, v = (rand(2, 2, s, 8, dtype=torch.float32, seed=i) for i, s in enumerate((5, 7, 7)))
    check(q, k, v, attn_mask=mask)
    out = vae_ext.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    assert torch.equal(out[:, :, 1], torch.zeros_like(out[:, :, 1]))
    (dq,) = torch.autograd.grad(out.sum(), q)
    assert torch.equal(dq[:, :, 1], torch.zeros_like(dq[:, :, 1]))


def test_dropout_runs_fused_and_reproduces_under_manual_seed(no_fallback):
    q, k, v = (rand(1, 2, 16, 8, seed=s, grad=False) for s in range(3))
    torch.manual_seed(0)
    a = vae_ext.scaled_dot_product_attention(q, k, v, dropout_p=0.5)
    torch.manual_seed(0)
    b = vae_ext.scaled_dot_product_attention(q, k, v, dropout_p=0.5)
    assert torch.equal(a, b)
    assert not torch.allclose(a, TORCH_SDPA(q, k, v))


# ---------------------------------------------------------------- fallback and errors: torch's own

@pytest.mark.parametrize("case", ["value_head_dim", "broadcast_batch", "broadcast_kv_heads", "mask_requires_grad",
                                  "mask_dtype", "empty_query", "dropout_one"])
def test_what_the_kernels_cannot_do_goes_to_torch(fallback_calls, case):
    q, k, v = rand(2, 3, 5, 8), rand(2, 3, 7, 8, seed=1), rand(2, 3, 7, 8, seed=2)
    kw = {}
    if case == "value_head_dim":
        v = rand(2, 3, 7, 5, seed=2)
    elif case == "broadcast_batch":
        q = rand(1, 3, 5, 8)
    elif case == "broadcast_kv_heads":
        k, v = rand(2, 1, 7, 8, seed=1), rand(2, 1, 7, 8, seed=2)
    elif case == "mask_requires_grad":
        kw["attn_mask"] = torch.randn(5, 7, dtype=torch.float64, requires_grad=True)
    elif case == "mask_dtype":
        q, k, v = (t.detach().float() for t in (q, k, v))
        kw["attn_mask"] = torch.zeros(5, 7, dtype=torch.float16)
    elif case == "empty_query":
        q = rand(2, 3, 0, 8)
    elif case == "dropout_one":
        kw["dropout_p"] = 1.0
    try:
        want = TORCH_SDPA(q, k, v, **kw)
    except RuntimeError as e:
        with pytest.raises(RuntimeError, match=str(e)[:30]):
            vae_ext.scaled_dot_product_attention(q, k, v, **kw)
    else:
        got = vae_ext.scaled_dot_product_attention(q, k, v, **kw)
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert fallback_calls, "torch's SDPA should have run"


@pytest.mark.parametrize("case", ["causal_and_mask", "gqa_bad_heads", "dropout_out_of_range", "dtype_mismatch",
                                  "mask_shape", "one_dim", "heads_without_gqa", "int_mask", "one_dim_mask"])
def test_error_cases_are_torchs(case):
    q, k, v = rand(2, 3, 5, 8, grad=False), rand(2, 3, 7, 8, seed=1, grad=False), rand(2, 3, 7, 8, seed=2,
                                                                                      grad=False)
    kw = {}
    if case == "causal_and_mask":
        kw = dict(attn_mask=torch.ones(5, 7, dtype=torch.bool), is_causal=True)
    elif case == "gqa_bad_heads":
        q, kw = rand(2, 5, 5, 8, grad=False), dict(enable_gqa=True)
    elif case == "dropout_out_of_range":
        kw = dict(dropout_p=1.5)
    elif case == "dtype_mismatch":
        k = k.float()
    elif case == "mask_shape":
        kw = dict(attn_mask=torch.zeros(4, 7, dtype=torch.float64))
    elif case == "one_dim":
        q, k, v = q[0, 0, 0], k[0, 0, 0], v[0, 0, 0]
    elif case == "heads_without_gqa":
        q = rand(2, 6, 5, 8, grad=False)
    elif case == "one_dim_mask":
        kw = dict(attn_mask=torch.ones(7, dtype=torch.bool))
    elif case == "int_mask":
        kw = dict(attn_mask=torch.ones(5, 7, dtype=torch.int64))
    with pytest.raises(Exception) as torch_err:
        TORCH_SDPA(q, k, v, **kw)
    with pytest.raises(type(torch_err.value)) as ours:
        vae_ext.scaled_dot_product_attention(q, k, v, **kw)
    assert str(ours.value) == str(torch_err.value)


def test_causal_bias_with_is_causal_is_a_value_error():
    q = rand(1, 1, 4, 8, grad=False)
    with pytest.raises(ValueError, match="CausalBias should not be used with causal=True"):
        vae_ext.scaled_dot_product_attention(q, q, q, attn_mask=causal_lower_right(4, 4), is_causal=True)


def test_causal_bias_of_the_wrong_size_gets_torchs_error():
    q, k = rand(1, 1, 4, 8, grad=False), rand(1, 1, 6, 8, grad=False)
    with pytest.raises(RuntimeError):
        TORCH_SDPA(q, k, k, attn_mask=causal_lower_right(3, 6)._materialize())
    with pytest.raises(RuntimeError):
        vae_ext.scaled_dot_product_attention(q, k, k, attn_mask=causal_lower_right(3, 6))


def test_reference_backend_hands_everything_to_torch(fallback_calls):
    q = rand(1, 2, 4, 8, grad=False)
    with vae_ext.use_backend("reference"):
        vae_ext.scaled_dot_product_attention(q, q, q)
    assert len(fallback_calls) == 1


# ---------------------------------------------------------------- patch_sdpa

def test_patch_sdpa_routes_and_restores(monkeypatch):
    calls = []
    real_run = sdpa._run_fused
    monkeypatch.setattr(sdpa, "_run_fused", lambda *a: calls.append(1) or real_run(*a))
    q = rand(1, 2, 4, 8, grad=False)
    original = F.scaled_dot_product_attention
    with vae_ext.patch_sdpa():
        assert F.scaled_dot_product_attention is vae_ext.scaled_dot_product_attention
        out = F.scaled_dot_product_attention(q, q, q, is_causal=True)
    assert F.scaled_dot_product_attention is original
    assert calls == [1]
    torch.testing.assert_close(out, TORCH_SDPA(q, q, q, is_causal=True))
    F.scaled_dot_product_attention(q, q, q)
    assert calls == [1]


def test_patch_sdpa_restores_on_exception_and_nests():
    original = F.scaled_dot_product_attention
    with pytest.raises(KeyError):
        with vae_ext.patch_sdpa():
            raise KeyError("boom")
    assert F.scaled_dot_product_attention is original
    with vae_ext.patch_sdpa():
        with vae_ext.patch_sdpa():
            assert F.scaled_dot_product_attention is vae_ext.scaled_dot_product_attention
        assert F.scaled_dot_product_attention is vae_ext.scaled_dot_product_attention  # outer block still on
    assert F.scaled_dot_product_attention is original


def test_patch_sdpa_as_decorator():
    original = F.scaled_dot_product_attention

    @vae_ext.patch_sdpa()
    def inside():
        return F.scaled_dot_product_attention

    assert inside() is vae_ext.scaled_dot_product_attention
    assert F.scaled_dot_product_attention is original


def test_patch_sdpa_is_process_wide_and_thread_safe():
    original = F.scaled_dot_product_attention
    seen, barrier = [], threading.Barrier(4)

    def worker():
        with vae_ext.patch_sdpa():
            barrier.wait()
            seen.append(F.scaled_dot_product_attention is vae_ext.scaled_dot_product_attention)
            barrier.wait()

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert seen == [True] * 4
    assert F.scaled_dot_product_attention is original


def test_patched_sdpa_with_causal_bias_falls_back_without_recursion(fallback_calls):
    # Head dim of value != query's: the kernels cannot; torch's CausalBias handling runs.
    q, k, v = rand(1, 1, 3, 8, grad=False), rand(1, 1, 5, 8, seed=1, grad=False), rand(1, 1, 5, 4, seed=2,
                                                                                      grad=False)
    with vae_ext.patch_sdpa():
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=causal_lower_right(3, 5))
    torch.testing.assert_close(out, TORCH_SDPA(q, k, v, attn_mask=causal_lower_right(3, 5)._materialize()))
    assert fallback_calls


# ---------------------------------------------------------------- masked_attention: lower-right causal alignment

def _lower_right_oracle(q, k, v, kpm=None):
    """torch's SDPA with causal_lower_right materialised (and key padding), float64, GQA expanded."""
    b, h, sq, _ = q.shape
    hkv, sk = k.shape[1], k.shape[2]
    k, v = k.repeat_interleave(h // hkv, 1), v.repeat_interleave(h // hkv, 1)
    mask = causal_lower_right(sq, sk)._materialize().expand(b, h, sq, sk)
    if kpm is not None:
        mask = mask & ~kpm[:, None, None, :]
    return TORCH_SDPA(q, k, v, attn_mask=mask)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("sq,sk", [(1, 70), (5, 200), (33, 90), (64, 64), (90, 33)])
def test_masked_attention_lower_right(dtype, sq, sk):
    q, k, v = (rand(2, 4, s, 16, dtype=dtype, seed=i) for i, s in enumerate((sq, sk, sk)))
    kpm = torch.zeros(2, sk, dtype=torch.bool)
    kpm[1, sk - sk // 3:] = True
    with vae_ext.use_backend("extension"):
        out = vae_ext.masked_attention(q, k, v, key_padding_mask=kpm, is_causal=True, causal_alignment="lower_right")
    qd, kd, vd = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = _lower_right_oracle(qd, kd, vd, kpm)
    tol = TOL[dtype]
    assert not torch.isnan(out).any()
    torch.testing.assert_close(out.double(), ref, **tol)
    g = torch.randn(ref.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    got = torch.autograd.grad(out, (q, k, v), g.to(dtype))
    want = torch.autograd.grad(ref, (qd, kd, vd), g)
    for name, a, e in zip("qkv", got, want):
        assert not torch.isnan(a).any()
        torch.testing.assert_close(a.double(), e, rtol=4 * tol["rtol"], atol=4 * tol["atol"],
                                   msg=lambda m: f"d{name}: {m}")
    if sq > sk:  # the first Sq - Sk rows see no key: zeros and zero gradients
        assert torch.equal(out[:, :, : sq - sk], torch.zeros_like(out[:, :, : sq - sk]))
        assert torch.equal(got[0][:, :, : sq - sk], torch.zeros_like(got[0][:, :, : sq - sk]))


def test_masked_attention_lower_right_gqa_matches_reference():
    q, k, v = rand(1, 6, 20, 8), rand(1, 2, 50, 8, seed=1), rand(1, 2, 50, 8, seed=2)
    with vae_ext.use_backend("extension"):
        out = vae_ext.masked_attention(q, k, v, is_causal=True, causal_alignment="lower_right")
    ref = reference.masked_attention(q, k, v, is_causal=True, causal_alignment="lower_right")
    torch.testing.assert_close(out, ref, **TOL[torch.float64])
    torch.testing.assert_close(ref, _lower_right_oracle(q, k, v), **TOL[torch.float64])


def test_lower_right_equals_upper_left_when_square():
    q, k, v = (rand(1, 2, 24, 8, seed=i, grad=False) for i in range(3))
    a = vae_ext.masked_attention(q, k, v, is_causal=True, causal_alignment="lower_right")
    b = vae_ext.masked_attention(q, k, v, is_causal=True)
    assert torch.equal(a, b)


def test_lower_right_gradcheck():
    q, k, v = rand(1, 2, 3, 4), rand(1, 2, 6, 4, seed=1), rand(1, 2, 6, 4, seed=2)
    with vae_ext.use_backend("extension"):
        assert torch.autograd.gradcheck(
            lambda q, k, v: vae_ext.masked_attention(q, k, v, is_causal=True, causal_alignment="lower_right"),
            (q, k, v))


def test_lower_right_opcheck():
    q, k, v = (rand(1, 2, s, 8, seed=i) for i, s in enumerate((3, 7, 7)))
    torch.library.opcheck(torch.ops.vae_ext.masked_attention_forward,
                          (q, k, v, None, None, True, 0.35, 0.0, None, None, True))


def test_causal_alignment_is_checked():
    q = rand(1, 1, 2, 4, grad=False)
    with pytest.raises(ValueError, match="causal_alignment"):
        vae_ext.masked_attention(q, q, q, is_causal=True, causal_alignment="bottom")


def test_compiles_fullgraph(no_fallback):
    q, k, v = (rand(1, 2, s, 8, seed=i, dtype=torch.float32) for i, s in enumerate((3, 7, 7)))

    @torch.compile(fullgraph=True, backend="aot_eager")
    def f(q, k, v):
        return vae_ext.scaled_dot_product_attention(q, k, v, is_causal=True)

    out = f(q, k, v)
    torch.testing.assert_close(out, TORCH_SDPA(q, k, v, is_causal=True), **TOL[torch.float32])
    out.sum().backward()
    assert q.grad is not None and not torch.isnan(q.grad).any()
