"""The attention shapes real models run (issue 15's families), shared by `vae-ext bench --ops
attention_models` and benchmarks/test_bench_attention_models.py: ViT, BERT with key padding, the SD VAE
mid-block (one head of 512 channels), SD UNet self- and cross-attention, LLM prefill (causal, GQA) and
decode (Sq = 1, GQA). Each is timed fused against F.scaled_dot_product_attention on the same inputs."""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F


class Shape(NamedTuple):
    family: str
    b: int
    h: int
    hkv: int
    sq: int
    sk: int
    d: int
    mask: str | None  # None | "causal" | "padding" (key lengths uniform in [Sk/2, Sk])

    def label(self) -> str:
        return (f"B{self.b} H{self.h}/{self.hkv} Sq{self.sq} Sk{self.sk} D{self.d}"
                + (f" {self.mask}" if self.mask else ""))


MODEL_SHAPES = [
    Shape("ViT-S/16", 8, 6, 6, 197, 197, 64, None),
    Shape("ViT-B/16 384px", 4, 12, 12, 577, 577, 64, None),
    Shape("BERT-base padded", 8, 12, 12, 128, 128, 64, "padding"),
    Shape("BERT-base padded S512", 4, 12, 12, 512, 512, 64, "padding"),
    Shape("SD VAE mid-block 64x64", 1, 1, 1, 4096, 4096, 512, None),
    Shape("SD UNet self-attn", 2, 8, 8, 4096, 4096, 40, None),
    Shape("SD UNet cross-attn", 2, 8, 8, 4096, 77, 40, None),
    Shape("LLM prefill GQA", 1, 32, 8, 1024, 1024, 128, "causal"),
    Shape("LLM decode GQA", 1, 32, 8, 1, 1024, 128, None),
]
# The ends of each family's usual range of sizes (issue 15), timed forward by
# `benchmarks/test_bench_attention_models.py --range`: other ViT resolutions, BERT at S256, the SD VAE
# mid-block at 32x32 and 128x128 latents, UNet self- and cross-attention at head dims 64, 80 and 160,
# LLM prefill at S256 and S4096, decode over 128 and 8192 cached keys.
RANGE_SHAPES = [
    Shape("ViT-B/16", 8, 12, 12, 197, 197, 64, None),
    Shape("ViT-S/16 384px", 4, 6, 6, 577, 577, 64, None),
    Shape("BERT-base padded S256", 8, 12, 12, 256, 256, 64, "padding"),
    Shape("SD VAE mid-block 32x32", 1, 1, 1, 1024, 1024, 512, None),
    Shape("SD VAE mid-block 128x128", 1, 1, 1, 16384, 16384, 512, None),
    Shape("SD2 UNet self-attn D64", 2, 5, 5, 4096, 4096, 64, None),
    Shape("SD UNet self-attn D80", 2, 8, 8, 1024, 1024, 80, None),
    Shape("SD UNet self-attn D160", 2, 8, 8, 1024, 1024, 160, None),
    Shape("SD UNet cross-attn D80", 2, 8, 8, 1024, 77, 80, None),
    Shape("SD UNet cross-attn D160", 2, 8, 8, 256, 77, 160, None),
    Shape("LLM prefill GQA S256", 1, 32, 8, 256, 256, 128, "causal"),
    Shape("LLM prefill GQA S4096", 1, 32, 8, 4096, 4096, 128, "causal"),
    Shape("LLM decode GQA Sk128", 1, 32, 8, 1, 128, 128, None),
    Shape("LLM decode GQA Sk8192", 1, 32, 8, 1, 8192, 128, None),
]
# The families whose fwd+bwd a CPU takes seconds for: `vae-ext bench --quick` leaves them out.
SLOW_ON_CPU = ("SD VAE mid-block 64x64", "SD UNet self-attn", "ViT-B/16 384px", "LLM prefill GQA")
# Timed forward+backward too: the shapes models are trained at (the SD VAE and UNet self-attention
# are inference shapes here, and decoding has no backward).
TRAINING_SHAPES = [s for s in MODEL_SHAPES
                   if s.sq > 1 and s.family not in ("SD VAE mid-block 64x64", "SD UNet self-attn")]


def make_inputs(shape: Shape, dtype: torch.dtype, device="cpu", seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(shape.b, shape.h, shape.sq, shape.d, generator=g).to(device, dtype)
    k = torch.randn(shape.b, shape.hkv, shape.sk, shape.d, generator=g).to(device, dtype)
    v = torch.randn(shape.b, shape.hkv, shape.sk, shape.d, generator=g).to(device, dtype)
    kpm = None
    if shape.mask == "padding":
        lengths = torch.randint(shape.sk // 2, shape.sk + 1, (shape.b,), generator=g)
        kpm = (torch.arange(shape.sk)[None, :] >= lengths[:, None]).to(device)
    return q, k, v, kpm


def calls(shape: Shape, kpm):
    """{'fused': f, 'sdpa': f}, each f(q, k, v) -> out, with the shape's mask."""
    import vae_ext

    causal = shape.mask == "causal"
    gqa = shape.h != shape.hkv
    sdpa_mask = None if kpm is None else ~kpm[:, None, None, :]

    def fused(q, k, v):
        return vae_ext.masked_attention(q, k, v, key_padding_mask=kpm, is_causal=causal)

    def sdpa(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=sdpa_mask, is_causal=causal, enable_gqa=gqa)
    return {"fused": fused, "sdpa": sdpa}


def call(shape: Shape, impl: str, dtype: torch.dtype, backward: bool, device="cpu"):
    """A no-argument callable timing `impl` ('fused' or 'sdpa') on fresh inputs of `shape`: the forward
    under torch.inference_mode(), or (backward) forward and backward with a random output gradient."""
    q, k, v, kpm = make_inputs(shape, dtype, device)
    fn = calls(shape, kpm)[impl]
    if not backward:
        def run():
            with torch.inference_mode():
                return fn(q, k, v)
        return run
    qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))
    grad = torch.randn_like(q)
    return lambda: torch.autograd.grad(fn(qg, kg, vg), (qg, kg, vg), grad)


def flops(shape: Shape) -> float:
    """Forward flops (4·B·H·Sq·Sk·D, halved when causal)."""
    f = 4.0 * shape.b * shape.h * shape.sq * shape.sk * shape.d
    return f / 2 if shape.mask == "causal" else f
