"""The CUDA masked_attention kernels (csrc/attention/*.cu), run on the CPU under the
CUDA emulation (tests/cuda_emu), against a float64 oracle.

Covers both kernel families (tensor-core mma.sync for bf16/fp16 with D <= 128, FFMA
for float32 and D in (128, 256]), every mask kind, GQA, Sq != Sk, fully masked rows,
head dims that need padding, strided and misaligned inputs, dropout (the Philox
layout of attention.h, so the mask is the one vae_ext.reference.dropout_keep_mask
draws), the rng_state protocol, and both dQ modes of the backward (atomic, and
deterministic = bitwise reproducible). Sizes are small: every CUDA thread is a fiber.
"""

import math

import pytest
import torch

import cuda_emu
from vae_ext import reference

pytestmark = cuda_emu.requires_emulation

# The tolerances of tests/conftest.py (outputs; gradients get 4x, as in test_attention.py).
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-2}


def keep_mask(seed, offset, shape, p):
    """The kernels' dropout keep-mask for counter_lo = offset // 4 (reference.dropout_keep_mask is offset 0)."""
    b, h, sq, sk = shape
    gpr = (sk + 3) // 4
    rows = torch.arange(b * h * sq, dtype=torch.int64)
    group = rows[:, None] * gpr + torch.arange(gpr, dtype=torch.int64)
    words = torch.stack(reference.philox_bits(seed, offset // 4, group), dim=-1).reshape(b * h * sq, gpr * 4)[:, :sk]
    return ((words >> 8) >= math.ceil(p * 2**24)).reshape(b, h, sq, sk)


def oracle(q, k, v, attn_mask=None, kpm=None, causal=False, scale=None, keep=None, p=0.0):
    """float64 out and lse (+inf for rows that see no key), differentiable in q, k, v.

    causal: False, True (upper-left aligned) or "lower_right" (query i sees keys j <= i + Sk - Sq).
    """
    b, h, sq, d = q.shape
    hkv, sk = k.shape[1], k.shape[2]
    k = k.repeat_interleave(h // hkv, dim=1)
    v = v.repeat_interleave(h // hkv, dim=1)
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    s = torch.matmul(q, k.transpose(-2, -1)) * scale
    vis = torch.ones(sq, sk, dtype=torch.bool)
    if causal:
        vis = torch.tril(vis, diagonal=sk - sq if causal == "lower_right" else 0)
    vis = vis.expand(b, h, sq, sk)
    if kpm is not None:
        vis = vis & ~kpm[:, None, None, :]
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            vis = vis & attn_mask
        else:
            s = s + attn_mask.double()
    s = s.masked_fill(~vis, float("-inf"))
    lse = torch.logsumexp(s.detach(), dim=-1)
    empty = torch.isneginf(lse)
    # Rows that see no key: softmax of zeros, then zeroed (no NaN in autograd).
    probs = torch.softmax(s.masked_fill(empty[..., None], 0.0), dim=-1).masked_fill(empty[..., None], 0.0)
    if keep is not None:
        probs = probs * keep / (1.0 - p)
    out = torch.matmul(probs, v)
    return out, torch.where(empty, torch.full_like(lse, float("inf")), lse)


def make(b, h, hkv, sq, sk, d, dtype, gen, layout="contiguous"):
    def t(heads, s):
        if layout == "bshd":  # (B, S, H, D) storage viewed as (B, H, S, D): strided rows
            return torch.randn(b, s, heads, d, generator=gen).to(dtype).transpose(1, 2)
        return torch.randn(b, heads, s, d, generator=gen).to(dtype)
    return t(h, sq), t(hkv, sk), t(hkv, sk)


def close(actual, expected, dtype, what, scale=1.0):
    tol = TOL[dtype] * scale
    a, e = actual.double(), expected.double()
    assert not torch.isnan(a).any(), f"{what}: NaN in the kernel's result"
    torch.testing.assert_close(a, e, rtol=tol, atol=tol, msg=lambda m: f"{what}: {m}")


def run_case(emu, *, b=1, h=2, hkv=None, sq=40, sk=40, d=64, dtype=torch.bfloat16, causal=False, padding=False,
             mask=None, p=0.0, seed=0, offset=0, layout="contiguous", misalign=0, deterministic=False,
             pass_padding_mask=True, seed_in_device_memory=False, backward=True, scale=None):
    hkv = h if hkv is None else hkv
    gen = torch.Generator().manual_seed(1234 + sq * 7 + sk * 13 + d)
    q, k, v = make(b, h, hkv, sq, sk, d, dtype, gen, layout)
    kpm = None
    if padding:
        lengths = torch.randint(0, sk + 1, (b,), generator=gen)
        lengths[0] = sk // 2
        kpm = torch.arange(sk)[None, :] >= lengths[:, None]
        if padding == "holes":  # padding inside the sequence too, not only a suffix
            kpm = kpm | (torch.rand(b, sk, generator=gen) < 0.3)
    attn_mask = None
    if mask == "bool":
        attn_mask = torch.rand(b, 1, sq, sk, generator=gen) > 0.3
        attn_mask[:, :, 1, :] = False  # a fully masked row
    elif mask == "additive":
        attn_mask = torch.randn(1, h, sq, sk, generator=gen)
        attn_mask[:, :, :, ::5] = float("-inf")
        attn_mask[:, :, 2, :] = float("-inf")  # a fully masked row
    sc = (1.0 / math.sqrt(d)) if scale is None else scale
    lower_right = causal == "lower_right"
    out, lse, rng = emu.attention_forward(q, k, v, attn_mask, kpm, bool(causal), sc, p, seed, offset,
                                          seed_in_device_memory, pass_padding_mask, misalign, lower_right)
    keep = keep_mask(seed, offset, (b, h, sq, sk), p) if p > 0 else None
    qd, kd, vd = (x.double().requires_grad_() for x in (q, k, v))
    ref_out, ref_lse = oracle(qd, kd, vd, attn_mask, kpm, causal, sc, keep, p)
    close(out, ref_out, dtype, "out")
    finite = torch.isfinite(ref_lse)
    assert torch.equal(torch.isinf(lse) & (lse > 0), ~finite), "lse must be +inf exactly for rows that see no key"
    close(lse[finite], ref_lse[finite], torch.float32 if dtype == torch.float32 else dtype, "lse")
    if p > 0:
        assert rng.tolist() == [seed, offset], f"rng_state {rng.tolist()} != {[seed, offset]}"
    if not backward:
        return
    grad = torch.randn(q.shape, generator=gen).to(dtype)
    if layout == "bshd":
        grad = torch.randn(b, sq, h, d, generator=gen).to(dtype).transpose(1, 2)
    dq, dk, dv, _delta = emu.attention_backward(grad, q, k, v, out, lse, rng, attn_mask, kpm, bool(causal), sc, p,
                                                deterministic, pass_padding_mask, misalign, lower_right)
    # The oracle's gradient at the kernel's own output rounding: compare to float64 autograd.
    ref_dq, ref_dk, ref_dv = torch.autograd.grad(ref_out, (qd, kd, vd), grad.double())
    gscale = 4.0
    close(dq, ref_dq, dtype, "dq", gscale)
    close(dk, ref_dk, dtype, "dk", gscale)
    close(dv, ref_dv, dtype, "dv", gscale)
    return dq, dk, dv


# ---------------------------------------------------------------- tensor-core kernels (bf16 / fp16)

@pytest.mark.parametrize("d", [32, 64, 96, 128])
def test_tc_head_dims_causal(emu, d):
    run_case(emu, d=d, sq=72, sk=72, causal=True)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_tc_multi_tile_plain(emu, dtype):
    # Several key tiles (online softmax across tiles) and query tiles (the grid), Sq != Sk.
    run_case(emu, dtype=dtype, d=64, sq=150, sk=200)


def test_tc_causal_sq_gt_sk(emu):
    run_case(emu, d=32, sq=140, sk=70, causal=True)


def test_tc_causal_sq_lt_sk(emu):
    run_case(emu, d=64, sq=50, sk=170, causal=True)


@pytest.mark.parametrize("sq,sk", [(1, 70), (50, 170), (140, 70), (72, 72)])
def test_tc_causal_lower_right(emu, sq, sk):
    # KV-cache decoding (Sq < Sk: the diagonal ends in the last key), and Sq > Sk (the
    # first Sq - Sk rows see no key: zeros, lse = +inf, zero gradients).
    run_case(emu, d=64, sq=sq, sk=sk, causal="lower_right")


def test_tc_causal_lower_right_gqa_padding_dropout(emu):
    run_case(emu, b=2, h=4, hkv=2, d=32, sq=40, sk=150, causal="lower_right", padding="holes", p=0.2, seed=11)


@pytest.mark.parametrize("padding", [True, "holes"])
def test_tc_key_padding(emu, padding):
    run_case(emu, b=3, d=64, sq=70, sk=140, padding=padding)


def test_tc_key_lengths_only(emu):
    # The glue may pass only key_len (a suffix mask): the kernels must skip and mask by length alone.
    run_case(emu, b=3, d=32, sq=40, sk=150, padding=True, pass_padding_mask=False, causal=True)


@pytest.mark.parametrize("mask", ["bool", "additive"])
def test_tc_attn_masks(emu, mask):
    run_case(emu, b=2, d=64, sq=40, sk=72, mask=mask, padding=True)


def test_tc_gqa(emu):
    run_case(emu, b=1, h=4, hkv=2, d=64, sq=70, sk=130, causal=True)


@pytest.mark.parametrize("d", [8, 40, 72, 100])
def test_tc_padded_head_dims(emu, d):
    run_case(emu, d=d, sq=33, sk=47, mask="bool")


def test_tc_odd_head_dim_misaligned(emu):
    run_case(emu, d=36, sq=20, sk=30, misalign=2, causal=True)


def test_tc_strided_inputs(emu):
    run_case(emu, b=2, h=3, d=64, sq=40, sk=70, layout="bshd", causal=True)


def test_tc_misaligned_path(emu):
    run_case(emu, d=64, sq=40, sk=70, misalign=2, padding=True)


def test_tc_deterministic_mode(emu):
    kw = dict(b=1, h=4, hkv=2, d=64, sq=100, sk=140, causal=True, padding="holes", deterministic=True)
    first = run_case(emu, **kw)
    second = run_case(emu, **kw)
    for a, c in zip(first, second):
        assert torch.equal(a, c), "deterministic mode must be bitwise reproducible"


@pytest.mark.parametrize("deterministic", [False, True])
def test_tc_dropout_matches_reference_mask(emu, deterministic):
    run_case(emu, b=1, h=2, d=64, sq=70, sk=90, p=0.25, seed=1234, causal=True, deterministic=deterministic)


def test_tc_dropout_offset_and_graph_safe_state(emu):
    run_case(emu, d=32, sq=40, sk=37, p=0.5, seed=-77, offset=4 * 1000, seed_in_device_memory=True, padding=True)


def test_tc_dropout_same_mask_as_reference_dropout_keep_mask(emu):
    # reference.dropout_keep_mask is the stream the CPU kernel uses: dropout with v = I reads P ∘ Z / (1 - p).
    b, h, s, p, seed = 1, 2, 24, 0.4, 99
    q = torch.zeros(b, h, s, 32, dtype=torch.bfloat16)  # uniform probabilities 1 / s
    k = torch.zeros(b, h, s, 32, dtype=torch.bfloat16)
    v = torch.zeros(b, h, s, 32, dtype=torch.bfloat16)
    v[:, :, torch.arange(s), torch.arange(s)] = 1  # out[i, j] = P[i, j] Z[i, j] / (1 - p)
    out, _, _ = emu.attention_forward(q, k, v, None, None, False, 1.0, p, seed)
    kept = out[..., :s].float() != 0
    expected = reference.dropout_keep_mask(seed, (b, h, s, s), p)
    assert torch.equal(kept, expected)


def test_tc_empty_rows_and_zero_length_batches(emu):
    # Batch 0 has no visible key at all (length 0): out = 0, lse = +inf, zero gradients.
    gen = torch.Generator().manual_seed(5)
    q, k, v = make(2, 2, 2, 30, 50, 64, torch.bfloat16, gen)
    kpm = torch.zeros(2, 50, dtype=torch.bool)
    kpm[0] = True
    out, lse, rng = emu.attention_forward(q, k, v, None, kpm, False, 0.125)
    assert torch.all(out[0] == 0) and torch.all(torch.isposinf(lse[0]))
    dq, dk, dv, _ = emu.attention_backward(torch.randn(q.shape, generator=gen).to(q.dtype), q, k, v, out, lse, rng,
                                           None, kpm, False, 0.125)
    assert torch.all(dq[0] == 0) and torch.all(dk[0] == 0) and torch.all(dv[0] == 0)
    assert not torch.isnan(dq).any()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_finfo_min_additive_mask_keeps_a_fully_masked_row_uniform(emu, dtype):
    # transformers builds additive masks from finfo(dtype).min. Times log2(e) (the kernels'
    # score domain) that overflows to -inf; it must stay finite (mask_term_log2), so a row
    # whose every key carries it attends to them uniformly, as softmax does, not as a hidden row.
    gen = torch.Generator().manual_seed(8)
    q, k, v = make(1, 2, 2, 24, 40, 64, dtype, gen)
    m = torch.zeros(1, 1, 24, 40)
    m[..., 30:] = torch.finfo(torch.float32).min
    m[:, :, 3, :] = torch.finfo(torch.float32).min  # row 3: every key
    out, lse, _ = emu.attention_forward(q, k, v, m, None, False, 0.125)
    ref_out, ref_lse = oracle(q.double(), k.double(), v.double(), m, None, False, 0.125)
    close(out, ref_out, dtype, "out")
    assert not torch.allclose(out[:, :, 3].double(), torch.zeros(1, 2, 64, dtype=torch.float64))
    rows = torch.ones(24, dtype=torch.bool)
    rows[3] = False  # its lse is that of the clamped term (DESIGN.md)
    close(lse[:, :, rows], ref_lse[:, :, rows], torch.float32 if dtype == torch.float32 else dtype, "lse")


def test_tc_workspace_sizes(emu):
    q = torch.zeros(2, 4, 100, 64, dtype=torch.bfloat16)
    k = torch.zeros(2, 2, 50, 64, dtype=torch.bfloat16)
    atomic = emu.attention_workspace_bytes(q, k, False)
    det = emu.attention_workspace_bytes(q, k, True)
    assert det >= 2 * 8 * 128 * 4 and atomic >= det + 8 * 100 * 64 * 4
    assert emu.attention_workspace_bytes(q.float(), k.float(), False) == 0  # SIMT path needs none


# ---------------------------------------------------------------- FFMA kernels (float32, D > 128)

@pytest.mark.parametrize("d", [16, 64, 100])
def test_simt_float32(emu, d):
    run_case(emu, dtype=torch.float32, d=d, sq=40, sk=70, causal=True, padding="holes")


def test_simt_float32_masks_gqa_dropout(emu):
    run_case(emu, dtype=torch.float32, b=2, h=4, hkv=1, d=32, sq=37, sk=45, mask="additive", p=0.3, seed=7)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_simt_large_head_dim(emu, dtype):
    run_case(emu, dtype=dtype, d=160, sq=20, sk=40, causal=True, mask="bool")


@pytest.mark.parametrize("sq,sk", [(3, 70), (70, 30)])
def test_simt_causal_lower_right(emu, sq, sk):
    run_case(emu, dtype=torch.float32, d=48, sq=sq, sk=sk, causal="lower_right", padding=True)


def test_simt_strided_misaligned(emu):
    run_case(emu, dtype=torch.float32, d=48, sq=20, sk=33, layout="bshd", misalign=4, padding=True)


def test_tc_atomic_and_deterministic_dq_agree_tightly(emu):
    # Two independent dQ computations (atomics in the dK/dV kernel; the separate dQ kernel) of the
    # same quantity: in float16 they agree far below the dtype tolerance of the oracle comparisons.
    kw = dict(dtype=torch.float16, b=1, h=4, hkv=2, d=64, sq=100, sk=140, causal=True, padding=True)
    dq_a, dk_a, dv_a = run_case(emu, deterministic=False, **kw)
    dq_d, dk_d, dv_d = run_case(emu, deterministic=True, **kw)
    torch.testing.assert_close(dq_a.double(), dq_d.double(), rtol=3e-3, atol=3e-4)
    assert torch.equal(dk_a, dk_d) and torch.equal(dv_a, dv_d)  # the same kernel computes them


@pytest.mark.parametrize("deterministic", [False, True])
def test_tc_larger_everything_at_once(emu, deterministic):
    # Several query tiles, key tiles and key blocks at D = 128 with every feature on.
    run_case(emu, b=2, h=4, hkv=2, d=128, sq=260, sk=300, causal=True, padding="holes", p=0.1, seed=3,
             deterministic=deterministic)


@pytest.mark.parametrize("dtype,d", [(torch.bfloat16, 512), (torch.float32, 512), (torch.float16, 300)])
def test_simt_forward_head_dims_up_to_512(emu, dtype, d):
    # The SD VAE mid-block: one head of 512 channels (forward only; its backward runs the reference).
    run_case(emu, dtype=dtype, d=d, sq=20, sk=45, causal=d == 300, padding=True, backward=False)


def test_simt_backward_refuses_head_dims_past_256(emu):
    q = torch.randn(1, 1, 8, 300)
    out, lse, rng = emu.attention_forward(q, q, q, None, None, False, 0.05, 0.0, 0, 0, False, True, 0, False)
    with pytest.raises(Exception, match="head dim 300 > 256 has no CUDA kernel"):
        emu.attention_backward(q, q, q, q, out, lse, rng, None, None, False, 0.05, 0.0, False, True, 0, False)
