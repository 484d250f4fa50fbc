"""masked_attention at the shapes real models run (vae_ext/bench_shapes.py: ViT, BERT with key padding,
the SD VAE mid-block, SD UNet self- and cross-attention, LLM prefill and decode) against
F.scaled_dot_product_attention: forward under torch.inference_mode(), and forward+backward at the
training shapes.

pytest-benchmark:  pytest benchmarks/test_bench_attention_models.py --benchmark-only
One process, the two implementations alternating call by call (steadier ratios on a shared machine):
    python benchmarks/test_bench_attention_models.py [--dtypes float32 bfloat16] [--reps 15] [--backward]
"""

from __future__ import annotations

import argparse
import statistics
import time

import pytest
import torch

from vae_ext.bench_shapes import MODEL_SHAPES, calls, make_inputs

# fwd+bwd: the shapes models are trained at (the SD VAE and UNet self-attention are inference shapes
# here, and take seconds per step on a 2-core CPU)
TRAINING = [s for s in MODEL_SHAPES if s.sq > 1 and s.family not in ("SD VAE mid-block 64x64", "SD UNet self-attn")]
DTYPES = [torch.float32, torch.bfloat16]


def _forward(shape, impl, dtype):
    q, k, v, kpm = make_inputs(shape, dtype)
    fn = calls(shape, kpm)[impl]

    def run():
        with torch.inference_mode():
            return fn(q, k, v)
    return run


def _training(shape, impl, dtype):
    q, k, v, kpm = make_inputs(shape, dtype)
    qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))
    grad = torch.randn_like(q)
    fn = calls(shape, kpm)[impl]
    return lambda: torch.autograd.grad(fn(qg, kg, vg), (qg, kg, vg), grad)


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "bf16"])
@pytest.mark.parametrize("impl", ["fused", "sdpa"])
@pytest.mark.parametrize("shape", MODEL_SHAPES, ids=[s.family for s in MODEL_SHAPES])
def test_attention_model_shapes_forward(benchmark, shape, impl, dtype):
    run = _forward(shape, impl, dtype)
    run()
    benchmark.group = f"attention inference | {shape.family} {shape.label()} | {dtype}"
    benchmark.extra_info.update(op="attention", case=shape.family, impl=impl, **{"pass": "fwd"}, device="cpu")
    benchmark(run)


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "bf16"])
@pytest.mark.parametrize("impl", ["fused", "sdpa"])
@pytest.mark.parametrize("shape", TRAINING, ids=[s.family for s in TRAINING])
def test_attention_model_shapes_forward_backward(benchmark, shape, impl, dtype):
    run = _training(shape, impl, dtype)
    run()
    benchmark.group = f"attention training | {shape.family} {shape.label()} | {dtype}"
    benchmark.extra_info.update(op="attention", case=shape.family, impl=impl, **{"pass": "fwd+bwd"}, device="cpu")
    benchmark(run)


def alternating(dtypes, reps, backward):
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; median ms of {reps} alternating calls"
          f" ({'forward+backward' if backward else 'forward, inference mode'})")
    print("| family | shape | dtype | fused ms | SDPA ms | SDPA / fused |\n|---|---|---|---:|---:|---:|")
    for shape in (TRAINING if backward else MODEL_SHAPES):
        for dtype in dtypes:
            fns = {impl: (_training if backward else _forward)(shape, impl, dtype) for impl in ("fused", "sdpa")}
            times = {name: [] for name in fns}
            for fn in fns.values():
                fn()
            for _ in range(reps):
                for name, fn in fns.items():
                    t0 = time.perf_counter()
                    fn()
                    times[name].append((time.perf_counter() - t0) * 1e3)
            f, s = statistics.median(times["fused"]), statistics.median(times["sdpa"])
            print(f"| {shape.family} | {shape.label()} | {str(dtype)[6:]} | {f:.3f} | {s:.3f} | {s / f:.2f}x |",
                  flush=True)


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--backward", action="store_true", help="forward+backward at the training shapes")
    a = ap.parse_args()
    alternating([getattr(torch, d) for d in a.dtypes], a.reps, a.backward)
