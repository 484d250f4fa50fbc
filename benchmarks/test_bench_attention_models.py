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

from vae_ext.bench_shapes import MODEL_SHAPES, RANGE_SHAPES, TRAINING_SHAPES, call

DTYPES = [torch.float32, torch.bfloat16]


def _bench(benchmark, shape, impl, dtype, backward):
    run = call(shape, impl, dtype, backward)
    run()
    kind = "training" if backward else "inference"
    benchmark.group = f"attention {kind} | {shape.family} {shape.label()} | {dtype}"
    benchmark.extra_info.update(op="attention", case=shape.family, impl=impl,
                                **{"pass": "fwd+bwd" if backward else "fwd"}, device="cpu")
    benchmark(run)


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "bf16"])
@pytest.mark.parametrize("impl", ["fused", "sdpa"])
@pytest.mark.parametrize("shape", MODEL_SHAPES, ids=[s.family for s in MODEL_SHAPES])
def test_attention_model_shapes_forward(benchmark, shape, impl, dtype):
    _bench(benchmark, shape, impl, dtype, backward=False)


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "bf16"])
@pytest.mark.parametrize("impl", ["fused", "sdpa"])
@pytest.mark.parametrize("shape", TRAINING_SHAPES, ids=[s.family for s in TRAINING_SHAPES])
def test_attention_model_shapes_forward_backward(benchmark, shape, impl, dtype):
    _bench(benchmark, shape, impl, dtype, backward=True)


def alternating(dtypes, reps, backward, panels_ab=False, shapes=None):
    """Median ms of alternating calls in one process. panels_ab: the fused forward twice, with the CPU
    tile products on packed panels and through the BLAS (vae_ext._C._set_attention_cpu_panels), the
    call order rotated every round. shapes: the shapes to time (default: the model shapes, or the
    training shapes with backward)."""
    import vae_ext

    set_panels = vae_ext._C._set_attention_cpu_panels
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; median ms of {reps} alternating calls"
          f" ({'forward+backward' if backward else 'forward, inference mode'})")
    if panels_ab:
        print("| family | shape | dtype | panels ms | BLAS ms | SDPA ms | SDPA / panels | SDPA / BLAS | BLAS / panels |"
              "\n|---|---|---|---:|---:|---:|---:|---:|---:|")
    else:
        print("| family | shape | dtype | fused ms | SDPA ms | SDPA / fused |\n|---|---|---|---:|---:|---:|")
    if shapes is None:
        shapes = TRAINING_SHAPES if backward else MODEL_SHAPES
    for shape in shapes:
        for dtype in dtypes:
            fused, sdpa = call(shape, "fused", dtype, backward), call(shape, "sdpa", dtype, backward)
            if panels_ab:
                fns = {"panels": (fused, True), "blas": (fused, False), "sdpa": (sdpa, True)}
            else:
                fns = {"fused": (fused, True), "sdpa": (sdpa, True)}
            times = {name: [] for name in fns}
            names = list(fns)
            for fn, panels in fns.values():
                set_panels(panels)
                fn()
            for i in range(reps):
                for name in names[i % len(names):] + names[:i % len(names)]:
                    fn, panels = fns[name]
                    set_panels(panels)
                    t0 = time.perf_counter()
                    fn()
                    times[name].append((time.perf_counter() - t0) * 1e3)
            set_panels(True)
            med = {name: statistics.median(t) for name, t in times.items()}
            head = f"| {shape.family} | {shape.label()} | {str(dtype)[6:]} |"
            if panels_ab:
                p, b, sd = med["panels"], med["blas"], med["sdpa"]
                print(f"{head} {p:.3f} | {b:.3f} | {sd:.3f} | {sd / p:.2f}x | {sd / b:.2f}x | {b / p:.2f}x |", flush=True)
            else:
                f, sd = med["fused"], med["sdpa"]
                print(f"{head} {f:.3f} | {sd:.3f} | {sd / f:.2f}x |", flush=True)


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--backward", action="store_true", help="forward+backward at the training shapes")
    ap.add_argument("--panels-ab", action="store_true",
                    help="the fused CPU forward with and without the packed-panel tile products, and SDPA")
    ap.add_argument("--range", action="store_true",
                    help="the forward at the ends of each family's range of sizes (bench_shapes.RANGE_SHAPES)")
    a = ap.parse_args()
    if a.range and a.backward:
        ap.error("--range times the forward only")
    alternating([getattr(torch, d) for d in a.dtypes], a.reps, a.backward, a.panels_ab,
                RANGE_SHAPES if a.range else None)
