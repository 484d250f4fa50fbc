"""masked_attention on CUDA: the fused kernels vs F.scaled_dot_product_attention vs the reference.

Issue targets (H100, bf16, B=4, H=16): forward+backward >= 1.0x SDPA with is_causal,
>= 2x SDPA with key padding given to SDPA as a boolean mask (lengths uniform in
[S/2, S]); forward >= 350 TFLOP/s at S=8192, D=128, causal. Reported, never asserted.

FLOPs in extra_info are nominal: forward 4·B·H·S²·D (halved with is_causal; the full
S² for key padding, whatever the lengths), forward+backward 3.5x the forward.
Skipped without a GPU.
"""

import pytest
import torch
import torch.nn.functional as F

import vae_ext
from conftest import CUDA, run_benchmark
from vae_ext import reference

pytestmark = pytest.mark.skipif(not CUDA, reason="no CUDA device")

B, H = 4, 16
DTYPE = torch.bfloat16


def _inputs(s, d, mask, requires_grad):
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(B, H, s, d, device="cuda", dtype=DTYPE, generator=gen).requires_grad_(requires_grad)
               for _ in range(3))
    kpm = None
    if mask == "padding":  # True = padding; lengths uniform in [S/2, S]
        lengths = torch.randint(s // 2, s + 1, (B,), device="cuda", generator=gen)
        kpm = torch.arange(s, device="cuda")[None, :] >= lengths[:, None]
    return q, k, v, kpm


def _call(impl, q, k, v, kpm, causal):
    if impl == "fused":
        return vae_ext.masked_attention(q, k, v, key_padding_mask=kpm, is_causal=causal)
    if impl == "sdpa":
        attn_mask = None if kpm is None else ~kpm[:, None, None, :]  # True = attend
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=causal)
    return reference.masked_attention(q, k, v, key_padding_mask=kpm, is_causal=causal)


def _reference_fits(s, pass_):
    """The reference materialises several (B, H, S, S) tensors (more with the backward)."""
    free, _ = torch.cuda.mem_get_info()
    per_tensor = B * H * s * s * 4
    return (8 if pass_ == "fwd" else 14) * per_tensor < free


@pytest.mark.parametrize("pass_", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("impl", ["fused", "sdpa", "reference"])
@pytest.mark.parametrize("mask", ["causal", "padding"])
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("s", [1024, 4096, 8192])
def test_attention_cuda(benchmark, s, d, mask, impl, pass_):
    if impl == "fused" and not vae_ext.ops.attention.supports(torch.device("cuda"), DTYPE, d)[0]:
        pytest.skip("the extension has no CUDA attention kernel here")
    if impl == "reference" and not _reference_fits(s, pass_):
        pytest.skip(f"the reference does not fit in GPU memory at S={s}")
    torch.cuda.empty_cache()
    causal = mask == "causal"
    q, k, v, kpm = _inputs(s, d, mask, requires_grad=pass_ != "fwd")
    fwd_flops = 4 * B * H * s * s * d // (2 if causal else 1)
    if pass_ == "fwd":
        def call():
            with torch.no_grad():
                return _call(impl, q, k, v, kpm, causal)
        flops = fwd_flops
    else:
        grad = torch.randn_like(q)

        def call():
            out = _call(impl, q, k, v, kpm, causal)
            return torch.autograd.grad(out, (q, k, v), grad)
        flops = int(3.5 * fwd_flops)
    case = f"B{B} H{H} S{s} D{d} bf16 {'causal' if causal else 'key padding (bool mask)'}"
    run_benchmark(benchmark, call, device="cuda", op="attention", case=case, impl=impl, pass_=pass_, flops=flops)
