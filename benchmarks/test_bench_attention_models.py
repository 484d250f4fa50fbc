"""masked_attention at the shapes real models run, forward only under torch.inference_mode(), against
F.scaled_dot_product_attention (issue 15's families): ViT, BERT with key padding, the SD VAE mid-block
(one head of 512), SD UNet self- and cross-attention, LLM prefill (causal, GQA) and decode (Sq = 1).

pytest-benchmark:  pytest benchmarks/test_bench_attention_models.py --benchmark-only
One process, the two implementations alternating call by call (steadier ratios on a shared machine):
    python benchmarks/test_bench_attention_models.py [--dtypes float32 bfloat16] [--reps 15]
"""

from __future__ import annotations

import argparse
import statistics
import time

import pytest
import torch
import torch.nn.functional as F

import vae_ext

# (family, B, H, Hkv, Sq, Sk, D, mask): mask None | "causal" | "padding" (lengths in [Sk/2, Sk])
SHAPES = [
    ("ViT-S/16", 8, 6, 6, 197, 197, 64, None),
    ("ViT-B/16 384px", 4, 12, 12, 577, 577, 64, None),
    ("BERT-base padded", 8, 12, 12, 128, 128, 64, "padding"),
    ("BERT-base padded S512", 4, 12, 12, 512, 512, 64, "padding"),
    ("SD VAE mid-block 64x64", 1, 1, 1, 4096, 4096, 512, None),
    ("SD UNet self-attn", 2, 8, 8, 4096, 4096, 40, None),
    ("SD UNet cross-attn", 2, 8, 8, 4096, 77, 40, None),
    ("LLM prefill GQA", 1, 32, 8, 1024, 1024, 128, "causal"),
    ("LLM decode GQA", 1, 32, 8, 1, 1024, 128, None),
]


def make_inputs(b, h, hkv, sq, sk, d, mask, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, sq, d, generator=g).to(dtype)
    k = torch.randn(b, hkv, sk, d, generator=g).to(dtype)
    v = torch.randn(b, hkv, sk, d, generator=g).to(dtype)
    kpm = None
    if mask == "padding":
        lengths = torch.randint(sk // 2, sk + 1, (b,), generator=g)
        kpm = torch.arange(sk)[None, :] >= lengths[:, None]
    return q, k, v, kpm


def calls(q, k, v, kpm, mask):
    causal = mask == "causal"
    gqa = q.shape[1] != k.shape[1]
    sdpa_mask = None if kpm is None else ~kpm[:, None, None, :]

    def fused():
        return vae_ext.masked_attention(q, k, v, key_padding_mask=kpm, is_causal=causal)

    def sdpa():
        return F.scaled_dot_product_attention(q, k, v, attn_mask=sdpa_mask, is_causal=causal, enable_gqa=gqa)
    return {"fused": fused, "sdpa": sdpa}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("impl", ["fused", "sdpa"])
@pytest.mark.parametrize("shape", SHAPES, ids=[s[0] for s in SHAPES])
def test_attention_model_shapes_forward(benchmark, shape, impl, dtype):
    family, b, h, hkv, sq, sk, d, mask = shape
    q, k, v, kpm = make_inputs(b, h, hkv, sq, sk, d, mask, dtype)
    fn = calls(q, k, v, kpm, mask)[impl]

    def run():
        with torch.inference_mode():
            return fn()
    run()
    benchmark.group = f"attention inference | {family} B{b} H{h}/{hkv} Sq{sq} Sk{sk} D{d} | {dtype}"
    benchmark.extra_info.update(op="attention", case=family, impl=impl, **{"pass": "fwd"}, device="cpu")
    benchmark(run)


def alternating(dtypes, reps):
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; median ms of {reps} alternating calls")
    print(f"| family | shape | dtype | fused ms | SDPA ms | SDPA / fused |\n|---|---|---|---:|---:|---:|")
    for family, b, h, hkv, sq, sk, d, mask in SHAPES:
        for dtype in dtypes:
            q, k, v, kpm = make_inputs(b, h, hkv, sq, sk, d, mask, dtype)
            fns = calls(q, k, v, kpm, mask)
            times = {name: [] for name in fns}
            with torch.inference_mode():
                for fn in fns.values():
                    fn()
                for _ in range(reps):
                    for name, fn in fns.items():
                        t0 = time.perf_counter()
                        fn()
                        times[name].append((time.perf_counter() - t0) * 1e3)
            f, s = statistics.median(times["fused"]), statistics.median(times["sdpa"])
            shape = f"B{b} H{h}/{hkv} Sq{sq} Sk{sk} D{d}{' ' + mask if mask else ''}"
            print(f"| {family} | {shape} | {str(dtype)[6:]} | {f:.3f} | {s:.3f} | {s / f:.2f}x |", flush=True)


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    ap.add_argument("--reps", type=int, default=15)
    a = ap.parse_args()
    alternating([getattr(torch, d) for d in a.dtypes], a.reps)
