"""Peak memory of one elbo_loss forward+backward: fused vs eager reference vs torch.compile.

    python benchmarks/elbo_memory.py [--device cpu|cuda] [--case bernoulli categorical]

Each measurement runs in a fresh subprocess: build the inputs of the benchmark
case (benchmarks/test_bench_elbo.py), run one untimed forward+backward (compiles,
warms allocators), then measure the peak memory of one more forward+backward above
what was in use just before it (the inputs). The gradients are kept until the peak
is read, as a training step keeps them until the optimizer step.
CPU: the process's peak resident set (VmHWM, reset through /proc/self/clear_refs);
CUDA: torch.cuda.max_memory_allocated.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(field)


def measure(case: str, impl: str, device: str) -> dict:
    sys.path[:0] = [HERE, os.path.dirname(HERE)]  # this checkout's benchmarks and vae_ext
    import torch

    from test_bench_elbo import _impl_fn, make_case

    recon, target, mu, logvar = make_case(case, device)
    for t in (recon, mu, logvar):
        t.requires_grad_()
    fn = _impl_fn(impl)

    def step():
        loss = fn(recon, target, mu, logvar, case).loss
        return torch.autograd.grad(loss, (recon, mu, logvar))

    grads = step()
    del grads
    gc.collect()
    if device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        grads = step()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        base = _status_kb("VmRSS") * 1024
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the peak RSS to the current RSS
        grads = step()
        peak = _status_kb("VmHWM") * 1024 - base
    del grads
    return {"case": case, "impl": impl, "device": device, "peak_extra_mb": peak / 2**20,
            "inputs_mb": sum(t.numel() * t.element_size() for t in (recon, target, mu, logvar)) / 2**20}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--case", nargs="*", default=["bernoulli", "categorical"])
    p.add_argument("--impl", nargs="*", default=["fused", "reference", "compile"])
    p.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(measure(*args.child)))
        return 0
    rows = []
    for case in args.case:
        for impl in args.impl:
            out = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", case, impl, args.device],
                                 capture_output=True, text=True, check=True)
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(f"| case | impl | inputs MB | peak above inputs, MB (fwd+bwd, {args.device}) |")
    print("|---|---|---:|---:|")
    for r in rows:
        print(f"| {r['case']} | {r['impl']} | {r['inputs_mb']:.0f} | {r['peak_extra_mb']:.0f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
