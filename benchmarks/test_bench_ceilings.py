"""The device's measured ceilings, in the same run as the op benchmarks:
copy bandwidth (GB/s, bytes read + written) and dense matrix rate (TFLOP/s;
bf16 on CUDA, float32 on CPU). report.py states each op as a fraction of them."""

import pytest
import torch

from conftest import DEVICES, run_benchmark


@pytest.mark.parametrize("device", DEVICES)
def test_copy_bandwidth(benchmark, device):
    n = (256 if device == "cuda" else 64) * 1024 * 1024 // 4
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    run_benchmark(benchmark, lambda: dst.copy_(src), device=device, op="ceiling", case="copy float32",
                  impl="copy", pass_="fwd", bytes=2 * 4 * n)


@pytest.mark.parametrize("device", DEVICES)
def test_matmul_rate(benchmark, device):
    n, dtype = (8192, torch.bfloat16) if device == "cuda" else (2048, torch.float32)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    run_benchmark(benchmark, lambda: a @ b, device=device, op="ceiling", case=f"matmul {str(dtype)[6:]}",
                  impl="matmul", pass_="fwd", flops=2 * n**3)
