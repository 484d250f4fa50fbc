"""masked_attention: parity with F.scaled_dot_product_attention (float64, the outside
oracle) and with the reference, forward and gradients, every mask kind and their
combinations, GQA, Sq != Sk, empty rows, dropout (the kernels' exact stream, its
expectation, reproducibility), gradcheck, opcheck, torch.compile and bad input."""

import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import vae_ext
from conftest import DEVICES, TOL, assert_close, requires_cuda, requires_ext
from vae_ext import reference

pytestmark = requires_ext

MASKS = ["none", "causal", "padding", "bool", "float", "causal+padding", "bool+padding", "float+causal",
         "causal+padding+bool"]


# ---------------------------------------------------------------- helpers

def _make(b, h, hkv, sq, sk, d, dtype, device, seed=0, masks="none", layout="contiguous"):
    """Random q, k, v and the masks named in `masks` ('+'-separated)."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, sq, d, generator=g, dtype=torch.float64)
    k = torch.randn(b, hkv, sk, d, generator=g, dtype=torch.float64)
    v = torch.randn(b, hkv, sk, d, generator=g, dtype=torch.float64)
    kinds = set(masks.split("+"))
    kpm = attn_mask = None
    if "padding" in kinds:
        lengths = torch.randint(1, sk + 1, (b,), generator=g)
        kpm = torch.arange(sk)[None, :] >= lengths[:, None]
        if sk > 3:
            kpm[0, sk // 3] = True  # padding in the middle too
    if "bool" in kinds:
        attn_mask = torch.rand(b, 1, sq, sk, generator=g) > 0.25
    if "float" in kinds:
        # float32-exact values: the kernels apply an additive mask in float32
        attn_mask = torch.randn(h, sq, sk, generator=g).float().double()
    if layout == "bshd":  # (B, S, H, D) storage viewed as (B, H, S, D)
        q, k, v = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v))

    def to(t):
        if t is None:
            return None
        if t.dtype == torch.bool:
            return t.to(device)
        return t.to(device=device, dtype=dtype)

    q, k, v = (t.to(device=device, dtype=dtype) for t in (q, k, v))
    return q, k, v, to(attn_mask), None if kpm is None else kpm.to(device), "causal" in kinds


def _sdpa_oracle(q, k, v, attn_mask, kpm, is_causal, scale=None, grad=None):
    """Float64 F.scaled_dot_product_attention with the masks combined into one and
    empty rows defined as zeros (SDPA gives NaN there): out and (dq, dk, dv)."""
    q, k, v = (t.detach().double().requires_grad_() for t in (q, k, v))
    b, h, sq, _ = q.shape
    sk = k.shape[2]
    allowed = torch.ones(b, h, sq, sk, dtype=torch.bool, device=q.device)
    additive = torch.zeros(b, h, sq, sk, dtype=torch.float64, device=q.device)
    if is_causal:
        allowed &= torch.ones(sq, sk, dtype=torch.bool, device=q.device).tril()
    if kpm is not None:
        allowed &= ~kpm[:, None, None, :]
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            allowed &= attn_mask
        else:
            additive = additive + attn_mask.double()
    rows = allowed.any(-1, keepdim=True)
    mask = additive.masked_fill(~allowed, float("-inf"))
    mask = torch.where(rows, mask, torch.zeros_like(mask))  # empty rows: any finite row, zeroed below
    ke = k.repeat_interleave(h // k.shape[1], dim=1)
    ve = v.repeat_interleave(h // k.shape[1], dim=1)
    out = F.scaled_dot_product_attention(q, ke, ve, attn_mask=mask, scale=scale)
    out = torch.where(rows, out, torch.zeros_like(out))
    grads = None
    if grad is not None:
        grads = torch.autograd.grad(out, (q, k, v), grad.double())
    return out, grads


def _run(fn, q, k, v, grad, **kwargs):
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out = fn(q, k, v, **kwargs)
    grads = torch.autograd.grad(out, (q, k, v), grad)
    return out, grads


def _as_double(mask):
    """A mask for the float64 reference: bool stays bool, a float mask becomes float64."""
    return mask if mask is None or mask.dtype == torch.bool else mask.double()


def _grad_scale(dtype):
    return 1.0 if dtype == torch.float64 else 4.0


# ---------------------------------------------------------------- parity

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("masks", MASKS)
@pytest.mark.parametrize("d", [8, 24, 64, 80, 128])
def test_matches_sdpa_and_reference_float64(device, masks, d):
    sq, sk = (37, 53) if d in (8, 80) else (130, 77)
    q, k, v, am, kpm, causal = _make(2, 4, 2, sq, sk, d, torch.float64, device, seed=d, masks=masks)
    grad = torch.randn(q.shape, dtype=torch.float64, device=device)
    out, grads = _run(vae_ext.masked_attention, q, k, v, grad, attn_mask=am, key_padding_mask=kpm, is_causal=causal)
    ref_out, ref_grads = _sdpa_oracle(q, k, v, am, kpm, causal, grad=grad)
    assert out.shape == q.shape and out.dtype == torch.float64
    assert_close(out, ref_out, torch.float64)
    for a, e in zip(grads, ref_grads):
        assert_close(a, e, torch.float64)
    r_out, r_grads = _run(reference.masked_attention, q, k, v, grad, attn_mask=am, key_padding_mask=kpm,
                          is_causal=causal)
    assert_close(out, r_out, torch.float64)
    for a, e in zip(grads, r_grads):
        assert_close(a, e, torch.float64)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("masks", ["none", "causal+padding", "float+causal", "bool+padding"])
def test_low_precision_matches_float64_oracle(device, dtype, masks):
    q, k, v, am, kpm, causal = _make(2, 4, 2, 150, 203, 64, dtype, device, seed=3, masks=masks)
    grad = torch.randn(q.shape, dtype=torch.float64, device=device).to(dtype)
    out, grads = _run(vae_ext.masked_attention, q, k, v, grad, attn_mask=am, key_padding_mask=kpm, is_causal=causal)
    assert out.dtype == dtype and all(g.dtype == dtype for g in grads)
    ref_out, ref_grads = _sdpa_oracle(q, k, v, am, kpm, causal, grad=grad)
    assert_close(out, ref_out, dtype)
    for a, e in zip(grads, ref_grads):
        assert_close(a, e, dtype, scale=_grad_scale(dtype))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [
    # (B, H, Hkv, Sq, Sk, D): GQA, MQA, Sq != Sk both ways, single rows and keys, tile-crossing sizes
    (1, 8, 2, 67, 190, 24),
    (2, 6, 1, 190, 67, 32),
    (3, 2, 2, 1, 300, 16),
    (2, 3, 3, 257, 1, 8),
    (1, 1, 1, 333, 333, 48),
    (2, 4, 4, 129, 129, 1),
    (1, 2, 1, 65, 70, 256),
])
@pytest.mark.parametrize("masks", ["none", "causal", "causal+padding", "float+causal"])
def test_shapes_gqa_and_lengths(device, shape, masks):
    b, h, hkv, sq, sk, d = shape
    q, k, v, am, kpm, causal = _make(b, h, hkv, sq, sk, d, torch.float32, device, seed=sum(shape), masks=masks)
    grad = torch.randn(q.shape, device=device)
    out, grads = _run(vae_ext.masked_attention, q, k, v, grad, attn_mask=am, key_padding_mask=kpm, is_causal=causal)
    ref_out, ref_grads = _sdpa_oracle(q, k, v, am, kpm, causal, grad=grad)
    assert out.shape == (b, h, sq, d)
    assert grads[1].shape == k.shape and grads[2].shape == v.shape
    assert_close(out, ref_out, torch.float32)
    for a, e in zip(grads, ref_grads):
        assert_close(a, e, torch.float32, scale=_grad_scale(torch.float32))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_scale_and_non_contiguous_layouts(device, dtype):
    q, k, v, am, kpm, causal = _make(2, 4, 2, 70, 90, 40, dtype, device, seed=5, masks="causal+padding",
                                     layout="bshd")
    assert not q.is_contiguous()
    grad = torch.randn(2, 70, 4, 40, dtype=dtype, device=device).transpose(1, 2)  # a non-contiguous grad too
    out, grads = _run(vae_ext.masked_attention, q, k, v, grad, key_padding_mask=kpm, is_causal=causal, scale=0.37)
    ref_out, ref_grads = _sdpa_oracle(q, k, v, None, kpm, causal, scale=0.37, grad=grad)
    assert_close(out, ref_out, dtype)
    for a, e in zip(grads, ref_grads):
        assert_close(a, e, dtype, scale=_grad_scale(dtype))


@pytest.mark.parametrize("device", DEVICES)
def test_broadcast_mask_forms(device):
    """attn_mask of every broadcastable rank: (Sk,), (Sq, Sk), (1, Sq, Sk), (B, 1, 1, Sk), (B, H, Sq, Sk)."""
    b, h, sq, sk, d = 2, 3, 20, 33, 16
    q, k, v, _, _, _ = _make(b, h, h, sq, sk, d, torch.float64, device, seed=9)
    grad = torch.randn(q.shape, dtype=torch.float64, device=device)
    g = torch.Generator().manual_seed(1)
    for shape in [(sk,), (sq, sk), (1, sq, sk), (b, 1, 1, sk), (b, h, sq, sk), (h, 1, sk)]:
        for kind in ("bool", "float"):
            if kind == "bool":
                m = (torch.rand(shape, generator=g) > 0.3).to(device)
            else:
                m = torch.randn(shape, generator=g).float().double().to(device)
            out, grads = _run(vae_ext.masked_attention, q, k, v, grad, attn_mask=m)
            ref_out, ref_grads = _sdpa_oracle(q, k, v, m, None, False, grad=grad)
            assert_close(out, ref_out, torch.float64)
            for a, e in zip(grads, ref_grads):
                assert_close(a, e, torch.float64)
    # A mask stored transposed (column stride != 1) and a float16 additive mask.
    mt = torch.randn(sk, sq, generator=g).float().double().to(device).t()
    out = vae_ext.masked_attention(q, k, v, attn_mask=mt)
    assert_close(out, _sdpa_oracle(q, k, v, mt, None, False)[0], torch.float64)
    mh = torch.randn(sq, sk, generator=g).half().to(device)
    out = vae_ext.masked_attention(q, k, v, attn_mask=mh)
    assert_close(out, _sdpa_oracle(q, k, v, mh.double(), None, False)[0], torch.float64)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_fully_masked_rows_are_zero_with_zero_grads(device, dtype):
    b, h, sq, sk, d = 2, 2, 40, 150, 16
    q, k, v, _, _, _ = _make(b, h, h, sq, sk, d, dtype, device, seed=11)
    kpm = torch.zeros(b, sk, dtype=torch.bool, device=device)
    kpm[0] = True  # batch 0: every key is padding
    kpm[1, :100] = True  # batch 1: leading padding, with causal rows < 100 see nothing
    am = torch.ones(sq, sk, dtype=torch.bool, device=device)
    am[-3:] = False  # and the last rows are masked out for every batch
    fm = torch.zeros(b, h, sq, sk, dtype=torch.float64, device=device)
    fm[:, :, 5] = float("-inf")  # an additive -inf row
    grad = torch.randn(q.shape, dtype=torch.float64, device=device).to(dtype)
    for kwargs in (dict(key_padding_mask=kpm, is_causal=True), dict(key_padding_mask=kpm, attn_mask=am),
                   dict(attn_mask=fm.to(dtype))):
        out, (dq, dk, dv) = _run(vae_ext.masked_attention, q, k, v, grad, **kwargs)
        for t in (out, dq, dk, dv):
            assert torch.isfinite(t).all()
        assert torch.equal(out[0] if "key_padding_mask" in kwargs else out[:, :, 5],
                           torch.zeros_like(out[0] if "key_padding_mask" in kwargs else out[:, :, 5]))
        if "key_padding_mask" in kwargs:
            assert torch.equal(dq[0], torch.zeros_like(dq[0]))
            assert torch.equal(dk[0], torch.zeros_like(dk[0])) and torch.equal(dv[0], torch.zeros_like(dv[0]))
            assert torch.equal(dk[1, :, :100], torch.zeros_like(dk[1, :, :100]))
        r_out, r_grads = _run(reference.masked_attention, q.double(), k.double(), v.double(), grad.double(),
                              **{n: (m.double() if m.dtype != torch.bool else m) if torch.is_tensor(m) else m
                                 for n, m in kwargs.items()})
        assert_close(out, r_out, dtype)
        for a, e in zip((dq, dk, dv), r_grads):
            assert_close(a, e, dtype, scale=_grad_scale(dtype))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("sq", [40, 300])  # below and above the CPU panel line (Sq·G >= 256)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_finfo_min_additive_masks_as_transformers_builds_them(device, sq, dtype):
    # Key padding as an additive finfo(dtype).min mask, and a row whose every key carries it:
    # softmax attends to those keys uniformly (the float kernels work in the log2 domain, where
    # finfo.min · log2(e) must not overflow into a hidden pair). That row gets no upstream
    # gradient, as padded rows do in training: its P cannot be recomputed from an lse of
    # magnitude 3e38 (nor can SDPA's; DESIGN.md).
    b, h, sk, d = 2, 2, 70, 64
    q, k, v, _, _, _ = _make(b, h, h, sq, sk, d, dtype, device, seed=21)
    low = torch.finfo(dtype).min
    m = torch.zeros(b, 1, sq, sk, dtype=dtype, device=device)
    m[0, :, :, 50:] = low
    m[1, :, 3, :] = low
    grad = torch.randn(q.shape, dtype=torch.float64, device=device).to(dtype)
    grad[1, :, 3] = 0
    out, grads = _run(vae_ext.masked_attention, q, k, v, grad, attn_mask=m)
    r_out, r_grads = _run(reference.masked_attention, q.double(), k.double(), v.double(), grad.double(),
                          attn_mask=m.double())
    assert_close(out, r_out, dtype)
    assert out[1, :, 3].abs().sum() > 0  # uniform attention, not a hidden row's zeros
    for a, e in zip(grads, r_grads):
        assert_close(a, e, dtype, scale=_grad_scale(dtype))


@pytest.mark.parametrize("device", DEVICES)
def test_padding_tiles_are_skipped_without_changing_the_result(device):
    """Left padding (whole leading key tiles of padding) and right padding: the result
    equals attention over the unpadded keys alone."""
    b, h, sq, sk, d = 2, 2, 50, 400, 32
    q, k, v, _, _, _ = _make(b, h, h, sq, sk, d, torch.float64, device, seed=13)
    kpm = torch.zeros(b, sk, dtype=torch.bool, device=device)
    kpm[0, :300] = True
    kpm[1, 170:] = True
    grad = torch.randn(q.shape, dtype=torch.float64, device=device)
    out, (dq, dk, dv) = _run(vae_ext.masked_attention, q, k, v, grad, key_padding_mask=kpm)
    for i, keys in ((0, slice(300, None)), (1, slice(0, 170))):
        o_i, (dq_i, dk_i, dv_i) = _run(reference.masked_attention, q[i:i + 1], k[i:i + 1, :, keys],
                                       v[i:i + 1, :, keys], grad[i:i + 1])
        assert_close(out[i:i + 1], o_i, torch.float64)
        assert_close(dq[i:i + 1], dq_i, torch.float64)
        assert_close(dk[i:i + 1, :, keys], dk_i, torch.float64)
        assert_close(dv[i:i + 1, :, keys], dv_i, torch.float64)
    assert torch.equal(dk[0, :, :300], torch.zeros_like(dk[0, :, :300]))
    assert torch.equal(dv[1, :, 170:], torch.zeros_like(dv[1, :, 170:]))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bh", [(1, 1), (8, 4)])
def test_backward_is_deterministic(device, bh):
    """Bit-identical gradients run to run: with few (batch, kv head) pairs dq is summed over
    key ranges in a fixed order, with many each task owns its dq rows."""
    b, hkv = bh
    q, k, v, am, kpm, causal = _make(b, 2 * hkv, hkv, 300, 280, 32, torch.float32, device, seed=17,
                                     masks="causal+padding")
    grad = torch.randn(q.shape, device=device)
    _, g1 = _run(vae_ext.masked_attention, q, k, v, grad, key_padding_mask=kpm, is_causal=causal)
    _, g2 = _run(vae_ext.masked_attention, q, k, v, grad, key_padding_mask=kpm, is_causal=causal)
    for a, c in zip(g1, g2):
        assert torch.equal(a, c)
    ref_out, ref_grads = _sdpa_oracle(q, k, v, None, kpm, causal, grad=grad)
    for a, e in zip(g1, ref_grads):
        assert_close(a, e, torch.float32, scale=4.0)


@pytest.mark.parametrize("device", DEVICES)
def test_expanded_upstream_gradient(device):
    q, k, v, _, _, _ = _make(2, 2, 2, 30, 30, 8, torch.float64, device)
    q.requires_grad_()
    vae_ext.masked_attention(q, k, v, is_causal=True).sum().backward()  # grad_out has stride 0 everywhere
    q2 = q.detach().clone().requires_grad_()
    reference.masked_attention(q2, k, v, is_causal=True).sum().backward()
    assert_close(q.grad, q2.grad, torch.float64)


@pytest.mark.parametrize("device", DEVICES)
def test_single_rows_with_any_stride(device):
    """A length-1 sequence dim may carry any stride (here 0): the kernels must not use it."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 2, 1, 8, generator=g).to(device).as_strided((2, 2, 1, 8), (16, 8, 0, 1))
    k = torch.randn(2, 2, 1, 8, generator=g).to(device).as_strided((2, 2, 1, 8), (16, 8, 0, 1))
    v = torch.randn(2, 2, 1, 8, generator=g).to(device)
    grad = torch.randn(2, 2, 1, 8, generator=g).to(device).as_strided((2, 2, 1, 8), (16, 8, 0, 1))
    out, grads = _run(vae_ext.masked_attention, q, k, v, grad)
    r_out, r_grads = _run(reference.masked_attention, q, k, v, grad)
    assert_close(out, r_out, torch.float32)
    for a, e in zip(grads, r_grads):
        assert_close(a, e, torch.float32)


@pytest.mark.parametrize("device", DEVICES)
def test_empty_sizes(device):
    q = torch.randn(2, 2, 5, 8, device=device, requires_grad=True)
    k = torch.randn(2, 2, 0, 8, device=device, requires_grad=True)
    v = torch.randn(2, 2, 0, 8, device=device, requires_grad=True)
    out = vae_ext.masked_attention(q, k, v)
    assert torch.equal(out, torch.zeros_like(out))
    out.sum().backward()
    assert torch.equal(q.grad, torch.zeros_like(q))
    out = vae_ext.masked_attention(torch.randn(0, 2, 5, 8, device=device), torch.randn(0, 2, 5, 8, device=device),
                                   torch.randn(0, 2, 5, 8, device=device))
    assert out.shape == (0, 2, 5, 8)
    out = vae_ext.masked_attention(torch.randn(1, 2, 0, 8, device=device), torch.randn(1, 2, 5, 8, device=device),
                                   torch.randn(1, 2, 5, 8, device=device))
    assert out.shape == (1, 2, 0, 8)


_TILE_PATH_SCRIPT = r"""
import sys, torch
sys.path.insert(0, sys.argv[1])
import test_attention as T, vae_ext
for dtype in (torch.float64, torch.float32):
    for masks, shape in (("causal+padding+bool", (2, 4, 2, 131, 150, 24)), ("float", (1, 2, 1, 70, 300, 80))):
        b, h, hkv, sq, sk, d = shape
        q, k, v, am, kpm, causal = T._make(b, h, hkv, sq, sk, d, dtype, "cpu", seed=3, masks=masks)
        grad = torch.randn(q.shape, dtype=dtype)
        kw = dict(attn_mask=am, key_padding_mask=kpm, is_causal=causal, dropout_p=0.2, seed=9)
        out, grads = T._run(vae_ext.masked_attention, q, k, v, grad, **kw)
        r_out, r_grads = T._run(vae_ext.reference.masked_attention, q.double(), k.double(), v.double(),
                                grad.double(), **{**kw, "attn_mask": T._as_double(am)})
        T.assert_close(out, r_out, dtype)
        for a, e in zip(grads, r_grads):
            T.assert_close(a, e, dtype, scale=T._grad_scale(dtype))
print("ok")
"""


@pytest.mark.parametrize("env", [
    {"VAE_EXT_ATTN_GEMM": "vec"},  # the at::vec tile products (torch builds without a BLAS)
    {"VAE_EXT_ATTN_BLOCK_Q": "16", "VAE_EXT_ATTN_BLOCK_K": "64", "VAE_EXT_ATTN_BWD_BLOCK_Q": "48",
     "VAE_EXT_ATTN_BWD_BLOCK_K": "192"},  # other tile sizes
])
def test_other_kernel_configurations(env):
    """The kernel's alternative tile products and tile sizes (read once per process) in a subprocess."""
    here = os.path.dirname(os.path.abspath(__file__))
    result = subprocess.run([sys.executable, "-c", _TILE_PATH_SCRIPT, here], env={**os.environ, **env},
                            cwd=os.path.dirname(here), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stdout + result.stderr


def _on_and_off(switch, run):
    """run() with a kernel switch (_C._set_attention_cpu_panels, ..._bf16_dot) on, then off; the
    switch is restored afterwards."""
    before = switch(True)
    try:
        on = run()
        switch(False)
        off = run()
    finally:
        switch(before)
    return on, off


def _forward_on_and_off(switch, q, k, v, **kw):
    """The inference forward with a kernel switch on and off."""
    def run():
        with torch.inference_mode():
            return vae_ext.masked_attention(q, k, v, **kw)
    return _on_and_off(switch, run)


def _grads_on_and_off(switch, q, k, v, grad, **kw):
    """The gradients of q, k, v with a kernel switch on and off."""
    return _on_and_off(switch, lambda: _run(vae_ext.masked_attention, q, k, v, grad, **kw)[1])


# The CPU forward's packed-panel tile products (attention_cpu.cpp: panel_gemm) run where a kv head has
# at least 256 query rows (Sq * G; 16 in the AVX512 build); these shapes use panels with every form: head dims whose
# last V panel is 8 wide (40, 8) or zero-padded (60), D = 512 (k split in chunks), key counts that are
# not a multiple of the 16-key panels, GQA, strided (B, S, H, D) inputs, every mask kind, dropout.
_PANEL_CASES = [
    ((1, 2, 1, 256, 300, 40), "causal+padding+bool", torch.float32, "contiguous", 0.2),
    ((1, 1, 1, 300, 260, 60), "float", torch.float32, "bshd", 0.0),
    ((1, 2, 2, 256, 200, 8), "none", torch.float32, "contiguous", 0.0),
    ((1, 1, 1, 260, 520, 512), "padding", torch.float32, "contiguous", 0.1),
    ((2, 4, 2, 128, 129, 64), "causal", torch.bfloat16, "bshd", 0.0),
    ((1, 2, 1, 256, 77, 40), "float+causal", torch.bfloat16, "contiguous", 0.3),
]


@requires_ext
@pytest.mark.parametrize("shape,masks,dtype,layout,dropout_p", _PANEL_CASES)
def test_forward_on_packed_panels_matches_the_reference(shape, masks, dtype, layout, dropout_p):
    """Panels on and off (the BLAS products) both match the float64 reference, same dropout mask."""
    b, h, hkv, sq, sk, d = shape
    q, k, v, am, kpm, causal = _make(b, h, hkv, sq, sk, d, dtype, "cpu", seed=5, masks=masks, layout=layout)
    kw = dict(attn_mask=am, key_padding_mask=kpm, is_causal=causal, dropout_p=dropout_p, seed=11)
    expected = vae_ext.reference.masked_attention(q.double(), k.double(), v.double(),
                                                  **{**kw, "attn_mask": _as_double(am)})
    on, off = _forward_on_and_off(vae_ext._C._set_attention_cpu_panels, q, k, v, **kw)
    assert_close(on, expected, dtype)
    assert_close(off, expected, dtype)
    assert_close(on, off, dtype)


@requires_ext
@pytest.mark.parametrize("shape,masks,dtype,layout,dropout_p", _PANEL_CASES[:3] + _PANEL_CASES[4:] + [
    ((2, 4, 2, 37, 53, 24), "causal+padding+bool", torch.float32, "contiguous", 0.0),  # small, 8-wide last panel
    ((1, 3, 1, 70, 45, 60), "float", torch.float32, "bshd", 0.25),
])
def test_backward_on_packed_panels_matches_the_reference(shape, masks, dtype, layout, dropout_p):
    """The backward's five tile products on panels and through the BLAS: both match float64 autograd
    of the reference, same dropout mask."""
    b, h, hkv, sq, sk, d = shape
    q, k, v, am, kpm, causal = _make(b, h, hkv, sq, sk, d, dtype, "cpu", seed=6, masks=masks, layout=layout)
    kw = dict(attn_mask=am, key_padding_mask=kpm, is_causal=causal, dropout_p=dropout_p, seed=13)
    grad = torch.randn(q.shape, dtype=torch.float64).to(dtype)
    _, expected = _run(vae_ext.reference.masked_attention, q.double(), k.double(), v.double(), grad.double(),
                       **{**kw, "attn_mask": _as_double(am)})
    on, off = _grads_on_and_off(vae_ext._C._set_attention_cpu_panels, q, k, v, grad, **kw)
    for a, o, e in zip(on, off, expected):
        assert_close(a, e, dtype, scale=_grad_scale(dtype))
        assert_close(o, e, dtype, scale=_grad_scale(dtype))


@requires_ext
@pytest.mark.parametrize("h,hkv,sq,sk,d,masks", [
    (32, 8, 1, 128, 128, "none"),          # decode: the 4 heads of a kv head as one 4-row tile
    (16, 2, 1, 77, 40, "padding"),         # 8 rows, D with a part-vector tail
    (9, 1, 1, 300, 72, "float"),           # 9 rows: past the few-rows path, through the BLAS
    (4, 4, 5, 130, 8, "causal+padding"),   # 5-row tiles, D below one vector
    (2, 1, 3, 64, 64, "bool+padding"),
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_few_query_rows_match_the_reference(h, hkv, sq, sk, d, masks, dtype):
    """Tiles of at most 8 query rows (decoding, short queries) multiply without packing
    (gemm_few_rows): forward and gradients match float64 autograd of the reference."""
    q, k, v, am, kpm, causal = _make(2, h, hkv, sq, sk, d, dtype, "cpu", seed=8, masks=masks)
    kw = dict(attn_mask=am, key_padding_mask=kpm, is_causal=causal)
    grad = torch.randn(q.shape, dtype=torch.float64).to(dtype)
    e_out, e_grads = _run(vae_ext.reference.masked_attention, q.double(), k.double(), v.double(), grad.double(),
                          **{**kw, "attn_mask": _as_double(am)})
    out, grads = _run(vae_ext.masked_attention, q, k, v, grad, **kw)
    with torch.inference_mode():
        inf_out = vae_ext.masked_attention(q, k, v, **kw)
    assert_close(out, e_out, dtype)
    assert_close(inf_out, e_out, dtype)
    for g, e in zip(grads, e_grads):
        assert_close(g, e, dtype, scale=_grad_scale(dtype))


@requires_ext
def test_scratch_memory_is_reused_across_calls_without_leaking_old_data():
    """The K/V panels and the backward's split dq accumulators live in scratch memory the
    thread keeps for its next call (cpu_scratch.h): a call after one whose keys were all NaN
    (and longer, and wider) packs its own panels, padding included, and gets the reference's
    result; the kept block stays within the cap."""
    before = vae_ext._C._set_attention_cpu_panels(True)
    try:
        with torch.inference_mode():
            q, k, v, *_ = _make(1, 4, 2, 300, 530, 72, torch.float32, "cpu", seed=3)
            vae_ext.masked_attention(q, k.fill_(float("nan")), v.fill_(float("nan")))
            held = vae_ext._C._scratch_cached_bytes()
            assert 2 * 530 * 72 * 4 * 2 <= held <= 32 << 20  # K and V panels of the 2 kv heads, f32
            for shape in ((1, 4, 2, 260, 37, 72), (2, 2, 1, 200, 100, 40), (1, 4, 2, 300, 530, 72)):
                b, h, hkv, sq, sk, d = shape
                q, k, v, _, kpm, _ = _make(b, h, hkv, sq, sk, d, torch.float32, "cpu", seed=sk, masks="padding")
                out = vae_ext.masked_attention(q, k, v, key_padding_mask=kpm)
                ref = reference.masked_attention(q.double(), k.double(), v.double(), key_padding_mask=kpm)
                assert_close(out, ref, torch.float32)
                assert vae_ext._C._scratch_cached_bytes() == held  # the same block, taken and given back
    finally:
        vae_ext._C._set_attention_cpu_panels(before)
    # the backward with bfloat16 inputs accumulates dq in float32 scratch (filled with zeros each call)
    for seed in (1, 2):
        q, k, v, *_ = _make(1, 4, 1, 64, 64, 32, torch.bfloat16, "cpu", seed=seed)
        grad = torch.randn(q.shape, dtype=torch.float64).to(torch.bfloat16)
        _, grads = _run(vae_ext.masked_attention, q, k, v, grad)
        _, e_grads = _run(reference.masked_attention, q.double(), k.double(), v.double(), grad.double())
        for g, e in zip(grads, e_grads):
            assert_close(g, e, torch.bfloat16, scale=_grad_scale(torch.bfloat16))


@requires_ext
def test_scratch_memory_under_concurrent_calls():
    """Threads calling the kernels at once each get their own panels (one takes the cached
    block, the others allocate): every result matches the reference, and one block is kept."""
    import threading
    cases = [_make(1, 2, 1, 64 + 40 * i, 90 + 33 * i, 40, torch.float32, "cpu", seed=i) for i in range(4)]
    expected = [reference.masked_attention(q.double(), k.double(), v.double()) for q, k, v, *_ in cases]
    errors = []

    def work(i):
        q, k, v, *_ = cases[i]
        try:
            for _ in range(15):
                with torch.inference_mode():
                    out = vae_ext.masked_attention(q, k, v)
                assert_close(out, expected[i], torch.float32)
        except Exception as exc:  # reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(cases))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert 0 < vae_ext._C._scratch_cached_bytes() <= 32 << 20


@requires_ext
def test_packed_panels_keep_a_hidden_nan_out():
    """A NaN in the value of a padded key or a key hidden by the causal mask reaches no output row
    on the panel path (the tile is redone with products that skip zero weights)."""
    q, k, v, _, kpm, _ = _make(1, 2, 1, 256, 96, 40, torch.float32, "cpu", seed=2, masks="padding")
    kpm[:] = False
    kpm[0, 90:] = True
    v[0, 0, 93] = float("nan")   # padded
    v[0, 0, 40] = float("inf")   # hidden from queries < 40 by the causal mask
    for kw in (dict(key_padding_mask=kpm), dict(key_padding_mask=kpm, is_causal=True)):
        with torch.inference_mode():
            out = vae_ext.masked_attention(q, k, v, **kw)
        expected = vae_ext.reference.masked_attention(q.double(), k.double(), v.double(), **kw)
        finite = torch.isfinite(expected)
        assert torch.equal(torch.isfinite(out), finite)
        assert_close(out[finite], expected[finite], torch.float32)


_BF16_DOT = bool(vae_ext._C.build_info().get("cpu_avx512_bf16")) and \
    vae_ext._C.build_info().get("cpu_capability") == "avx512" if vae_ext._backend.extension_loaded() else False
requires_bf16_dot = pytest.mark.skipif(not _BF16_DOT, reason="needs a CPU with AVX512-BF16 (and the AVX512 kernels)")


@requires_ext
@requires_bf16_dot
@pytest.mark.parametrize("shape,masks,layout,dropout_p", [
    ((2, 4, 2, 197, 197, 64), "none", "contiguous", 0.0),       # ViT-like, GQA
    ((1, 2, 1, 40, 77, 40), "causal+padding+bool", "bshd", 0.2),  # odd Sk, 8-wide last V panel, strided
    ((1, 1, 1, 33, 129, 7), "float", "contiguous", 0.0),        # odd D: a zero upper half in the last pair
    ((1, 1, 1, 64, 300, 512), "padding", "contiguous", 0.1),    # the SD VAE's head dim
    ((2, 3, 3, 17, 5, 72), "float+causal", "bshd", 0.0),        # fewer keys than a pair panel
])
def test_bf16_dot_products_match_the_widened_path_and_the_reference(shape, masks, layout, dropout_p):
    """bfloat16 on a CPU with AVX512-BF16: the forward's tile products on bf16 pairs (vdpbf16ps, P rounded
    to bf16) match the widened float32 products and the float64 reference within bf16 rounding, with
    the same dropout mask (a different one would move outputs far past bf16 rounding); the switch
    really changes the arithmetic."""
    b, h, hkv, sq, sk, d = shape
    q, k, v, am, kpm, causal = _make(b, h, hkv, sq, sk, d, torch.bfloat16, "cpu", seed=9, masks=masks, layout=layout)
    kw = dict(attn_mask=am, key_padding_mask=kpm, is_causal=causal, dropout_p=dropout_p, seed=3)
    expected = reference.masked_attention(q.double(), k.double(), v.double(), **{**kw, "attn_mask": _as_double(am)})
    on, off = _forward_on_and_off(vae_ext._C._set_attention_cpu_bf16_dot, q, k, v, **kw)
    assert_close(on, expected, torch.bfloat16)
    assert_close(on, off, torch.bfloat16)
    assert torch.isfinite(on).all()
    if shape[0] == 2 and masks == "none":
        assert not torch.equal(on, off)  # bf16 P and pair sums: not the float32 path's bits


@requires_ext
@requires_bf16_dot
@pytest.mark.parametrize("shape,masks,layout,dropout_p", [
    ((2, 4, 2, 197, 197, 64), "none", "contiguous", 0.0),       # ViT-like, GQA (dk/dv summed over 2 heads)
    ((1, 2, 1, 77, 129, 40), "causal+padding+bool", "bshd", 0.2),  # odd Sq and Sk, 8-wide last panel
    ((1, 1, 1, 33, 65, 7), "float", "contiguous", 0.0),         # odd D
    ((1, 2, 2, 130, 70, 72), "float+causal", "bshd", 0.25),
])
def test_bf16_dot_backward_matches_the_widened_path_and_the_reference(shape, masks, layout, dropout_p):
    """The backward's five products on bf16 pairs (P and dS rounded to bf16): gradients match the
    widened float32 products and float64 autograd of the reference, with a hidden NaN kept out."""
    b, h, hkv, sq, sk, d = shape
    q, k, v, am, kpm, causal = _make(b, h, hkv, sq, sk, d, torch.bfloat16, "cpu", seed=4, masks=masks, layout=layout)
    if kpm is not None:
        v[0, 0, int(kpm[0].nonzero()[0])] = float("nan")  # a padded key's value: its tile is redone carefully
    kw = dict(attn_mask=am, key_padding_mask=kpm, is_causal=causal, dropout_p=dropout_p, seed=7)
    grad = torch.randn(q.shape, dtype=torch.float64).to(torch.bfloat16)
    v_ref = v.double().nan_to_num(0.0)
    _, expected = _run(reference.masked_attention, q.double(), k.double(), v_ref, grad.double(),
                       **{**kw, "attn_mask": _as_double(am)})
    on, off = _grads_on_and_off(vae_ext._C._set_attention_cpu_bf16_dot, q, k, v, grad, **kw)
    for name, a, o, e in zip("qkv", on, off, expected):
        finite = torch.isfinite(e)  # the NaN value's own gradient row (dv of a padded key) is zero
        assert torch.isfinite(a).all(), name
        assert_close(a[finite], e[finite], torch.bfloat16, scale=_grad_scale(torch.bfloat16))
        assert_close(a, o, torch.bfloat16, scale=_grad_scale(torch.bfloat16))
    if masks == "none":
        assert not all(torch.equal(a, o) for a, o in zip(on, off))  # the switch changes the arithmetic


@requires_ext
@requires_bf16_dot
def test_bf16_dot_products_keep_a_hidden_nan_out_and_a_visible_one_in():
    q, k, v, _, kpm, _ = _make(1, 2, 1, 64, 96, 40, torch.bfloat16, "cpu", seed=2, masks="padding")
    kpm[:] = False
    kpm[0, 90:] = True
    v_clean = v.clone()
    v[0, 0, 93] = float("nan")  # padded: hidden (the oracle: the same call without it)
    for kw in (dict(key_padding_mask=kpm), dict(key_padding_mask=kpm, is_causal=True)):
        with torch.inference_mode():
            out = vae_ext.masked_attention(q, k, v, **kw)
        expected = reference.masked_attention(q.double(), k.double(), v_clean.double(), **kw)
        assert torch.isfinite(out).all()
        assert_close(out, expected, torch.bfloat16)
    # an odd number of visible keys: the last key pair's upper half is the first hidden key, whose
    # value (inf here) meets a zero weight (the tile is then redone on the float path)
    kpm[0, 77:] = True
    v[0, 0, 77] = float("inf")
    with torch.inference_mode():
        out = vae_ext.masked_attention(q, k, v, key_padding_mask=kpm)
    expected = reference.masked_attention(q.double(), k.double(), v_clean.double(), key_padding_mask=kpm)
    assert torch.isfinite(out).all()
    assert_close(out, expected, torch.bfloat16)
    k[0, 0, 5] = float("nan")  # a visible key: every row that sees it is NaN
    with torch.inference_mode():
        out = vae_ext.masked_attention(q, k, v, key_padding_mask=kpm, is_causal=True)
    assert torch.isnan(out[0, :, 5:]).all() and torch.isfinite(out[0, :, :5]).all()


# ---------------------------------------------------------------- dropout

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("masks", ["none", "causal+padding", "float", "bool+padding"])
def test_dropout_matches_the_reference_stream_exactly(device, dtype, masks):
    """With an explicit seed the reference drops exactly the kernels' elements: forward
    and gradients agree to rounding, so the backward regenerates the forward's mask."""
    q, k, v, am, kpm, causal = _make(2, 4, 2, 70, 133, 16, dtype, device, seed=21, masks=masks)
    grad = torch.randn(q.shape, dtype=dtype, device=device)
    kw = dict(attn_mask=am, key_padding_mask=kpm, is_causal=causal, dropout_p=0.3, seed=1234)
    out, grads = _run(vae_ext.masked_attention, q, k, v, grad, **kw)
    r_out, r_grads = _run(reference.masked_attention, q.double(), k.double(), v.double(), grad.double(),
                          **{**kw, "attn_mask": _as_double(am)})
    assert_close(out, r_out, dtype)
    for a, e in zip(grads, r_grads):
        assert_close(a, e, dtype, scale=_grad_scale(dtype))
    no_drop = vae_ext.masked_attention(q, k, v, attn_mask=am, key_padding_mask=kpm, is_causal=causal)
    assert not torch.allclose(out, no_drop)


@pytest.mark.parametrize("device", DEVICES)
def test_dropout_seed_generator_and_manual_seed(device):
    q, k, v, _, _, _ = _make(2, 2, 2, 40, 50, 8, torch.float32, device)
    a = vae_ext.masked_attention(q, k, v, dropout_p=0.2, seed=7)
    torch.manual_seed(99)
    assert torch.equal(a, vae_ext.masked_attention(q, k, v, dropout_p=0.2, seed=7)), "seed is stateless"
    assert not torch.equal(a, vae_ext.masked_attention(q, k, v, dropout_p=0.2, seed=8))
    torch.manual_seed(3)
    x1 = vae_ext.masked_attention(q, k, v, dropout_p=0.2)
    x2 = vae_ext.masked_attention(q, k, v, dropout_p=0.2)
    torch.manual_seed(3)
    assert torch.equal(x1, vae_ext.masked_attention(q, k, v, dropout_p=0.2)), "torch.manual_seed reproduces"
    assert not torch.equal(x1, x2), "fresh masks call to call"
    g1 = torch.Generator(device=device).manual_seed(5)
    g2 = torch.Generator(device=device).manual_seed(5)
    assert torch.equal(vae_ext.masked_attention(q, k, v, dropout_p=0.2, generator=g1),
                       vae_ext.masked_attention(q, k, v, dropout_p=0.2, generator=g2))
    # p = 0 draws nothing and equals the plain result
    assert torch.equal(vae_ext.masked_attention(q, k, v, dropout_p=0.0, seed=1), vae_ext.masked_attention(q, k, v))


@pytest.mark.parametrize("device", DEVICES)
def test_dropout_rate_and_expectation(device):
    """E over seeds of dropout attention equals attention without dropout; the fraction
    of dropped weights is p (read off with v = identity rows)."""
    sq = sk = 64
    q, k, _, _, _, _ = _make(1, 1, 1, sq, sk, sk, torch.float64, device, seed=2)
    v = torch.eye(sk, dtype=torch.float64, device=device)[None, None]  # out = the dropped probabilities
    p = 0.25
    probs = vae_ext.masked_attention(q, k, v)
    dropped = vae_ext.masked_attention(q, k, v, dropout_p=p, seed=0)
    kept = dropped != 0
    assert abs(kept.double().mean().item() - (1 - p)) < 0.03
    torch.testing.assert_close(dropped[kept], probs[kept] / (1 - p))
    n = 300
    mean = sum(vae_ext.masked_attention(q, k, v, dropout_p=p, seed=s) for s in range(n)) / n
    # each weight is a scaled Bernoulli: std of the mean = w * sqrt(p / (1 - p) / n)
    tol = 5 * probs * math.sqrt(p / (1 - p) / n) + 1e-12
    assert ((mean - probs).abs() <= tol).all()


def test_dropout_gradcheck_with_fixed_seed():
    q, k, v, am, kpm, causal = _make(1, 2, 1, 9, 11, 4, torch.float64, "cpu", seed=4, masks="causal+padding")
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    assert torch.autograd.gradcheck(
        lambda a, b, c: vae_ext.masked_attention(a, b, c, key_padding_mask=kpm, is_causal=causal, dropout_p=0.4,
                                                 seed=77), (q, k, v))


# ---------------------------------------------------------------- gradcheck, opcheck, compile

@pytest.mark.parametrize("masks", ["none", "causal+padding", "bool", "float+causal"])
def test_gradcheck_float64(masks):
    q, k, v, am, kpm, causal = _make(2, 4, 2, 7, 10, 5, torch.float64, "cpu", seed=8, masks=masks)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    assert torch.autograd.gradcheck(
        lambda a, b, c: vae_ext.masked_attention(a, b, c, attn_mask=am, key_padding_mask=kpm, is_causal=causal),
        (q, k, v))


def test_attn_mask_gradient_runs_the_reference():
    q, k, v, _, _, _ = _make(1, 2, 2, 6, 7, 4, torch.float64, "cpu")
    m = torch.randn(6, 7, dtype=torch.float64, requires_grad=True)
    out = vae_ext.masked_attention(q, k, v, attn_mask=m, is_causal=True)
    (gm,) = torch.autograd.grad(out, m, torch.ones_like(out))
    m2 = m.detach().clone().requires_grad_()
    (gm2,) = torch.autograd.grad(reference.masked_attention(q, k, v, attn_mask=m2, is_causal=True), m2,
                                 torch.ones_like(out))
    torch.testing.assert_close(gm, gm2)
    assert torch.autograd.gradcheck(lambda mm: vae_ext.masked_attention(q, k, v, attn_mask=mm), (m,))
    with vae_ext.use_backend("extension"):
        with pytest.raises(RuntimeError, match="attn_mask"):
            vae_ext.masked_attention(q, k, v, attn_mask=m)
        with torch.no_grad():  # no gradient wanted: the kernels run
            out = vae_ext.masked_attention(q, k, v, attn_mask=m)
    torch.testing.assert_close(out, reference.masked_attention(q, k, v, attn_mask=m.detach()))


def test_op_autograd_edges():
    """The C++ autograd node: gradients only where asked, and a float mask requiring grad is refused
    (its autograd edge exists only when a mask is given)."""
    q, k, v, _, kpm, _ = _make(2, 4, 2, 9, 13, 8, torch.float64, "cpu", seed=2, masks="padding")
    op = torch.ops.vae_ext.masked_attention_forward
    kk, vv = k.clone().requires_grad_(), v.clone().requires_grad_()
    out, _, _ = op(q, kk, vv, None, kpm, False, 0.35, 0.0, None, None)
    g = torch.randn_like(out)
    dk, dv = torch.autograd.grad(out, (kk, vv), g)
    k2, v2 = k.clone().requires_grad_(), v.clone().requires_grad_()
    want = reference.masked_attention(q, k2, v2, key_padding_mask=kpm, scale=0.35)
    dk2, dv2 = torch.autograd.grad(want, (k2, v2), g)
    torch.testing.assert_close(dk, dk2)
    torch.testing.assert_close(dv, dv2)
    fm = torch.randn(4, 9, 13, dtype=torch.float64, requires_grad=True)
    out, _, _ = op(q.clone().requires_grad_(), k, v, fm, None, False, 0.35, 0.0, None, None)
    with pytest.raises(RuntimeError, match="float attn_mask"):
        out.sum().backward()


def test_opcheck():
    q, k, v, am, kpm, causal = _make(2, 4, 2, 9, 13, 8, torch.float32, "cpu", seed=1, masks="causal+padding")
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    fm = torch.randn(4, 9, 13)
    op = torch.ops.vae_ext.masked_attention_forward.default
    torch.library.opcheck(op, (q, k, v, None, kpm, True, 0.35, 0.0, None, None))
    torch.library.opcheck(op, (q, k, v, fm, None, False, 0.35, 0.0, None, None))
    torch.library.opcheck(op, (q, k, v, am, kpm, causal, 0.35, 0.3, 5, None))
    out, lse, rng = op(q, k, v, None, kpm, True, 0.35, 0.3, 5, None)
    g = torch.randn_like(out)
    torch.library.opcheck(torch.ops.vae_ext.masked_attention_backward.default,
                          (g, q.detach(), k.detach(), v.detach(), out.detach(), lse, rng, None, kpm, True, 0.35, 0.3))


def test_torch_compile_fullgraph():
    q, k, v, am, kpm, causal = _make(2, 4, 2, 33, 47, 16, torch.float32, "cpu", seed=6, masks="causal+padding")

    @torch.compile(fullgraph=True, backend="inductor")
    def f(a, b, c):
        return vae_ext.masked_attention(a * 2, b, c, key_padding_mask=kpm, is_causal=True).sum(dim=-1)

    @torch.compile(fullgraph=True, backend="inductor")
    def g(a, b, c):
        return vae_ext.masked_attention(a, b, c, is_causal=True, dropout_p=0.5, seed=3)

    q1 = q.clone().requires_grad_()
    out = f(q1, k, v)
    q2 = q.clone().requires_grad_()
    expected = vae_ext.masked_attention(q2 * 2, k, v, key_padding_mask=kpm, is_causal=True).sum(dim=-1)
    torch.testing.assert_close(out, expected)
    grad = torch.randn_like(out)
    out.backward(grad)
    expected.backward(grad)
    torch.testing.assert_close(q1.grad, q2.grad)
    torch.testing.assert_close(g(q, k, v), vae_ext.masked_attention(q, k, v, is_causal=True, dropout_p=0.5, seed=3))


# ---------------------------------------------------------------- bad input

def test_bad_input_raises_naming_the_argument():
    q, k, v = torch.randn(2, 4, 5, 8), torch.randn(2, 2, 6, 8), torch.randn(2, 2, 6, 8)
    with pytest.raises(ValueError, match="q must be 4-D"):
        vae_ext.masked_attention(q[0], k, v)
    with pytest.raises(ValueError, match="k must be 4-D"):
        vae_ext.masked_attention(q, k[0], v)
    with pytest.raises(ValueError, match="batch"):
        vae_ext.masked_attention(q, k[:1], v[:1])
    with pytest.raises(ValueError, match="head dims"):
        vae_ext.masked_attention(q, k[..., :4], v[..., :4])
    with pytest.raises(ValueError, match="v must have"):
        vae_ext.masked_attention(q, k, v[:, :, :5])
    with pytest.raises(ValueError, match="multiple"):
        vae_ext.masked_attention(q, torch.randn(2, 3, 6, 8), torch.randn(2, 3, 6, 8))
    with pytest.raises(TypeError, match="k dtype"):
        vae_ext.masked_attention(q, k.double(), v)
    with pytest.raises(TypeError, match="q must be"):
        vae_ext.masked_attention(q.long(), k, v)
    with pytest.raises(TypeError, match="key_padding_mask must be bool"):
        vae_ext.masked_attention(q, k, v, key_padding_mask=torch.zeros(2, 6))
    with pytest.raises(ValueError, match="key_padding_mask must have shape"):
        vae_ext.masked_attention(q, k, v, key_padding_mask=torch.zeros(2, 5, dtype=torch.bool))
    with pytest.raises(TypeError, match="attn_mask must be bool"):
        vae_ext.masked_attention(q, k, v, attn_mask=torch.zeros(5, 6, dtype=torch.int64))
    with pytest.raises(ValueError, match="attn_mask"):
        vae_ext.masked_attention(q, k, v, attn_mask=torch.zeros(5, 7, dtype=torch.bool))
    with pytest.raises(ValueError, match="attn_mask"):
        vae_ext.masked_attention(q, k, v, attn_mask=torch.zeros(1, 2, 4, 5, 6, dtype=torch.bool))
    for p in (-0.1, 1.0, 1.5, float("nan")):
        with pytest.raises(ValueError, match="dropout_p"):
            vae_ext.masked_attention(q, k, v, dropout_p=p)
    with pytest.raises(TypeError, match="is_causal"):
        vae_ext.masked_attention(q, k, v, is_causal=1)
    with pytest.raises(ValueError, match="scale"):
        vae_ext.masked_attention(q, k, v, scale=float("inf"))
    with pytest.raises(ValueError, match="not both"):
        vae_ext.masked_attention(q, k, v, dropout_p=0.1, seed=1, generator=torch.Generator())
    with pytest.raises(TypeError, match="seed"):
        vae_ext.masked_attention(q, k, v, dropout_p=0.1, seed=1.0)
    with pytest.raises(ValueError, match="device"):
        vae_ext.masked_attention(q, k, v, key_padding_mask=torch.zeros(2, 6, dtype=torch.bool, device="meta"))


@pytest.mark.parametrize("kw", [{}, {"is_causal": True}, {"is_causal": True, "causal_alignment": "lower_right"},
                                {"scale": 0.3}, {"scale": 1}, {"dropout_p": 0}])
@pytest.mark.parametrize("shape", [(2, 4, 2, 1, 9, 16), (1, 2, 2, 5, 7, 8)])
def test_plain_calls_take_the_fast_path(monkeypatch, kw, shape):
    """A call without mask tensors, generator or seed skips the full validation (the per-call
    cost of small decode steps) and gives what the full path gives, forward and gradients."""
    from vae_ext.ops import attention as attention_mod
    b, h, hkv, sq, sk, d = shape
    q, k, v, *_ = _make(b, h, hkv, sq, sk, d, torch.float32, "cpu")
    with torch.no_grad():
        full = vae_ext.masked_attention(q, k, v, key_padding_mask=torch.zeros(b, sk, dtype=torch.bool), **kw)
    ref = reference.masked_attention(q.double(), k.double(), v.double(), **kw)

    def no_full_path(*args, **kwargs):
        raise AssertionError("the full validation ran")

    monkeypatch.setattr(attention_mod, "check_same_device", no_full_path)
    qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))
    out = vae_ext.masked_attention(qg, kg, vg, **kw)
    torch.testing.assert_close(out, full, atol=0, rtol=0)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)
    out.square().sum().backward()
    qr, kr, vr = (t.detach().double().requires_grad_() for t in (q, k, v))
    reference.masked_attention(qr, kr, vr, **kw).square().sum().backward()
    for got, want in ((qg, qr), (kg, kr), (vg, vr)):
        torch.testing.assert_close(got.grad.double(), want.grad, atol=1e-4, rtol=1e-4)
    with pytest.raises(AssertionError, match="full validation"):  # anything else takes the full path
        vae_ext.masked_attention(q, k, v, key_padding_mask=torch.zeros(b, sk, dtype=torch.bool), **kw)


def test_fast_path_keeps_the_backend_mode(monkeypatch):
    """The fast path runs the extension only where the full path would: not under
    use_backend('reference'), and a block open in another thread changes nothing here."""
    import threading
    from vae_ext import _backend
    from vae_ext.ops import attention as attention_mod
    q, k, v = torch.randn(1, 2, 3, 8), torch.randn(1, 2, 4, 8), torch.randn(1, 2, 4, 8)
    calls, reference_op = [], reference.masked_attention
    monkeypatch.setattr(attention_mod.reference, "masked_attention",
                        lambda *a, **kw: calls.append(1) or reference_op(*a, **kw))
    with vae_ext.use_backend("reference"):
        vae_ext.masked_attention(q, k, v)
    assert calls == [1]
    entered, release = threading.Event(), threading.Event()

    def other_thread():
        with vae_ext.use_backend("reference"):
            entered.set()
            release.wait(10)

    worker = threading.Thread(target=other_thread)
    worker.start()
    try:
        assert entered.wait(10)
        assert _backend._open_blocks == 1
        vae_ext.masked_attention(q, k, v)  # this thread: the default mode, the extension
        assert calls == [1]
    finally:
        release.set()
        worker.join()
    assert _backend._open_blocks == 0
    with pytest.raises(RuntimeError):
        with vae_ext.use_backend("reference"):
            raise RuntimeError("leaves the block")
    assert _backend._open_blocks == 0 and _backend.mode() == _backend._default_mode


def test_op_level_checks_are_clear():
    """The custom op checks what its kernels assume even when called directly."""
    q, k, v = torch.randn(2, 4, 5, 8), torch.randn(2, 2, 6, 8), torch.randn(2, 2, 6, 8)
    op = torch.ops.vae_ext.masked_attention_forward
    with pytest.raises(RuntimeError, match="multiple"):
        op(q, torch.randn(2, 3, 6, 8), torch.randn(2, 3, 6, 8), None, None, False, 1.0, 0.0, None, None)
    with pytest.raises(RuntimeError, match="dropout_p"):
        op(q, k, v, None, None, False, 1.0, 1.0, None, None)
    with pytest.raises(RuntimeError, match="key_padding_mask"):
        op(q, k, v, None, torch.zeros(2, 5, dtype=torch.bool), False, 1.0, 0.0, None, None)
    with pytest.raises(RuntimeError, match="attn_mask"):
        op(q, k, v, torch.zeros(3, 6, dtype=torch.bool), None, False, 1.0, 0.0, None, None)


# ---------------------------------------------------------------- CUDA only

@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_and_cpu_drop_the_same_elements_for_one_seed(dtype):
    q, k, v, _, kpm, _ = _make(2, 4, 2, 70, 133, 64, dtype, "cpu", seed=31, masks="padding")
    grad = torch.randn(q.shape, dtype=dtype)
    kw = dict(key_padding_mask=kpm, is_causal=True, dropout_p=0.3, seed=2024)
    cpu_out, cpu_grads = _run(vae_ext.masked_attention, q, k, v, grad, **kw)
    kw["key_padding_mask"] = kpm.cuda()
    cuda_out, cuda_grads = _run(vae_ext.masked_attention, q.cuda(), k.cuda(), v.cuda(), grad.cuda(), **kw)
    tol = TOL[dtype]
    torch.testing.assert_close(cuda_out.cpu().double(), cpu_out.double(), rtol=tol["rtol"] * 4, atol=tol["atol"] * 4)
    for a, e in zip(cuda_grads, cpu_grads):
        torch.testing.assert_close(a.cpu().double(), e.double(), rtol=tol["rtol"] * 8, atol=tol["atol"] * 8)
    # the same elements are dropped: with v = identity rows the output is the dropped probabilities
    qe = torch.randn(2, 4, 70, 133)
    ke = torch.randn(2, 2, 133, 133)
    v_eye = torch.eye(133)[None, None].expand(2, 2, 133, 133).contiguous()
    a = vae_ext.masked_attention(qe, ke, v_eye, dropout_p=0.3, seed=5) == 0
    b = vae_ext.masked_attention(qe.cuda(), ke.cuda(), v_eye.cuda(), dropout_p=0.3, seed=5) == 0
    assert torch.equal(a, b.cpu())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", ["plain", "padding", "lower_right", "upper_left", "dropout", "strided_q"])
def test_gqa_decode_packs_heads_of_a_kv_head(dtype, case):
    """Decoding (Sq = 1) with GQA runs the G query heads of a kv head as one tile (CPU);
    the same call with an all-True attn_mask (which the packed path does not take) is the
    oracle: same results, the same dropout mask."""
    g = torch.Generator().manual_seed(21)
    B, H, Hkv, Sk, D = 2, 8, 2, 300, 40
    q = torch.randn(B, H, 1, D, generator=g).to(dtype)
    if case == "strided_q":  # head stride != D
        q = torch.randn(B, H, 3, D, generator=g).to(dtype)[:, :, 1:2]
    k, v = (torch.randn(B, Hkv, Sk, D, generator=g).to(dtype) for _ in range(2))
    kw = {}
    if case == "padding":
        kw["key_padding_mask"] = torch.arange(Sk)[None, :] >= torch.tensor([[Sk], [123]])
    elif case in ("lower_right", "upper_left"):
        kw.update(is_causal=True, causal_alignment=case)
    elif case == "dropout":
        kw.update(dropout_p=0.25, seed=4)
    with vae_ext.use_backend("extension"), torch.inference_mode():
        out = vae_ext.masked_attention(q, k, v, **kw)
        oracle = vae_ext.masked_attention(q, k, v, attn_mask=torch.ones(1, 1, 1, Sk, dtype=torch.bool), **kw)
    with vae_ext.use_backend("reference"):
        ref = vae_ext.masked_attention(q.double(), k.double(), v.double(), **kw)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out.float(), oracle.float(), atol=tol, rtol=tol)
    if case == "dropout":
        assert torch.equal(out == 0, oracle == 0)
    else:
        torch.testing.assert_close(out.double(), ref, atol=tol, rtol=tol)
