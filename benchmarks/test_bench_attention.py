"""masked_attention: the fused kernels vs F.scaled_dot_product_attention vs the reference.

CPU (issue targets, float32, B=4, H=8, S=1024, D=64):
  - causal, and key padding with per-batch lengths uniform in [S/2, S] (the B quantiles
    of that distribution; SDPA gets the equivalent boolean mask), forward and forward+backward;
  - forward+backward >= 1.0x SDPA for causal, >= 1.3x for key padding;
  - peak extra memory of forward+backward at S=8192 (B=1, H=4, D=64) <= 10% of the
    reference's: test_attention_peak_memory (benchmarks/attention_memory.py).
CUDA: B=4, H=16, S in {1024, 4096, 8192}, D in {64, 128}, bfloat16, causal and key padding,
forward and forward+backward. Every case records its flops (forward 4·B·H·Sq·Sk·D, halved
for causal; backward 2.5x the forward), so report.py gives TFLOP/s.

    python -m pytest benchmarks/test_bench_attention.py --benchmark-only
"""

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import vae_ext
from conftest import CUDA, run_benchmark
from vae_ext import reference

HERE = os.path.dirname(os.path.abspath(__file__))

CPU_CASES = [("cpu", 4, 8, 1024, 64, torch.float32)]
CUDA_CASES = [("cuda", 4, 16, s, d, torch.bfloat16) for s in (1024, 4096, 8192) for d in (64, 128)]
CASES = [pytest.param(*c, id=f"{c[0]}-B{c[1]}-H{c[2]}-S{c[3]}-D{c[4]}") for c in CPU_CASES] + [
    pytest.param(*c, id=f"{c[0]}-B{c[1]}-H{c[2]}-S{c[3]}-D{c[4]}",
                 marks=pytest.mark.skipif(not CUDA, reason="no CUDA device")) for c in CUDA_CASES]


def _lengths(b, s, device):
    """Per-batch key lengths uniform in [S/2, S]: the B quantiles (2i + 1) / 2B of that
    distribution, so the case costs what a random draw costs on average (a draw of
    B = 4 lengths has a mean anywhere from 0.6 S to 0.9 S)."""
    return torch.tensor([s // 2 + (s // 2) * (2 * i + 1) // (2 * b) for i in range(b)], device=device)


def _impl(impl, mask_kind, lengths, s, device):
    """fn(q, k, v) for one implementation, with its form of the mask."""
    if mask_kind == "causal":
        if impl == "fused":
            return lambda q, k, v: vae_ext.masked_attention(q, k, v, is_causal=True)
        if impl == "sdpa":
            return lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return lambda q, k, v: reference.masked_attention(q, k, v, is_causal=True)
    kpm = torch.arange(s, device=device)[None, :] >= lengths[:, None]  # True = padding
    if impl == "fused":
        return lambda q, k, v: vae_ext.masked_attention(q, k, v, key_padding_mask=kpm)
    if impl == "sdpa":
        allowed = ~kpm[:, None, None, :]  # SDPA's bool convention: True = attend
        return lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
    return lambda q, k, v: reference.masked_attention(q, k, v, key_padding_mask=kpm)


@pytest.mark.parametrize("device,b,h,s,d,dtype", CASES)
@pytest.mark.parametrize("mask_kind", ["causal", "padding"])
@pytest.mark.parametrize("pass_", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("impl", ["fused", "sdpa", "reference"])
def test_masked_attention(benchmark, device, b, h, s, d, dtype, mask_kind, pass_, impl):
    if impl == "reference" and device == "cuda" and s > 4096:
        pytest.skip("the reference materialises B·H·S² scores: out of memory at S=8192")
    torch.manual_seed(0)
    q = torch.randn(b, h, s, d, device=device, dtype=dtype)
    k = torch.randn(b, h, s, d, device=device, dtype=dtype)
    v = torch.randn(b, h, s, d, device=device, dtype=dtype)
    lengths = _lengths(b, s, device)
    fn = _impl(impl, mask_kind, lengths, s, device)
    flops = 4.0 * b * h * s * s * d * (0.5 if mask_kind == "causal" else 1.0)
    if pass_ == "fwd":
        def call():
            with torch.no_grad():
                return fn(q, k, v)
    else:
        flops *= 3.5  # forward + backward (2.5x the forward)
        q.requires_grad_()
        k.requires_grad_()
        v.requires_grad_()
        grad = torch.randn_like(q)

        def call():
            out = fn(q, k, v)
            return torch.autograd.grad(out, (q, k, v), grad)
    if mask_kind == "causal":
        case = f"causal B={b} H={h} S={s} D={d} {str(dtype)[6:]}"
    else:
        case = f"key padding (lengths in [S/2, S]) B={b} H={h} S={s} D={d} {str(dtype)[6:]}"
    run_benchmark(benchmark, call, device=device, op="attention", case=case, impl=impl, pass_=pass_, flops=flops,
                  warmup=1)


@pytest.mark.parametrize("impl", ["fused", "reference"])
def test_attention_peak_memory(benchmark, impl):
    """Peak extra memory (max RSS growth) of one forward+backward at S=8192, B=1, H=4, D=64,
    float32, causal, measured in a fresh subprocess; reported in extra_info['peak_extra_mb']."""
    cmd = [sys.executable, os.path.join(HERE, "attention_memory.py"), "--impl", impl]

    def run():
        out = subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=900)
        return float(out.stdout.strip().splitlines()[-1].split()[-1])

    peak_mb = benchmark.pedantic(run, rounds=1, iterations=1)
    benchmark.group = "attention | peak extra memory, fwd+bwd, S=8192 B=1 H=4 D=64 float32 causal | cpu"
    benchmark.extra_info.update(measure="attention peak extra memory", impl=impl, peak_extra_mb=peak_mb)
    print(f"\n{impl}: peak extra memory {peak_mb:.1f} MB")
