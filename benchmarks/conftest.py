"""Shared pieces of the benchmark suite (pytest-benchmark).

Each benchmark records in `benchmark.extra_info`: op, case, impl (fused |
reference | sdpa | compile), pass (fwd | fwd+bwd), device, and bytes or flops
moved per call, so `benchmarks/report.py` can turn a run's JSON into a table of
GB/s or TFLOP/s. On CUDA every timed call ends with a synchronisation.
"""

import pytest
import torch

CUDA = torch.cuda.is_available()
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not CUDA, reason="no CUDA device"))]


def synchronized(fn, device):
    if torch.device(device).type != "cuda":
        return fn

    def run():
        out = fn()
        torch.cuda.synchronize()
        return out

    return run


def run_benchmark(benchmark, fn, *, device, op, case, impl, pass_, bytes=None, flops=None, warmup=2):
    """Time fn() (already including any backward) after `warmup` untimed calls."""
    fn = synchronized(fn, device)
    for _ in range(warmup):
        fn()
    benchmark.group = f"{op} | {case} | {device} | {pass_}"
    benchmark.extra_info.update(op=op, case=case, impl=impl, **{"pass": pass_}, device=str(device),
                                bytes=bytes, flops=flops)
    return benchmark(fn)
