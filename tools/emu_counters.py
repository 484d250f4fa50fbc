#!/usr/bin/env python3
"""Memory-transaction counters of every CUDA kernel of the project, from the CPU emulation.

Runs each op's CUDA entry points under the emulation (tests/cuda_emu) at a representative size with the
emulator's counters on, and writes a markdown table (default benchmarks/results/cuda_emu_counters.md):
per kernel, global-memory 32-byte sectors per warp-level request against the fewest the request's bytes
could take (coalescing), shared-memory and ldmatrix passes against conflict-free (bank conflicts),
cp.async sectors, mma.sync, barriers. The counts are what the host compiler's code does with the same
source: a 16-byte vector access it splits is merged back, but loads it leaves out (dead) or adds (spills
of the emulated registers never touch shared or device memory) can differ from nvcc's code.

Usage: python tools/emu_counters.py [--out FILE] [--quick]
"""

from __future__ import annotations

import argparse
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))

import torch  # noqa: E402

import cuda_emu  # noqa: E402


def _cases(quick):
    """(op label, size label, function running the emulated entry points)."""
    s = 64 if quick else 128
    cases = []

    def attention(dtype, d, causal, padding):
        def run(emu):
            g = torch.Generator().manual_seed(0)
            q, k, v = (torch.randn(1, 2, s, d, generator=g).to(dtype) for _ in range(3))
            kpm = (torch.arange(s)[None] >= s * 3 // 4) if padding else None
            out, lse, rng = emu.attention_forward(q, k, v, None, kpm, causal, d ** -0.5)
            grad = torch.randn(out.shape, generator=g).to(dtype)
            emu.attention_backward(grad, q, k, v, out, lse, rng, None, kpm, causal, d ** -0.5)
        tag = {torch.bfloat16: "bf16", torch.float32: "f32"}[dtype]
        return (f"attention {tag} D={d}{' causal' if causal else ''}{' key padding' if padding else ''}",
                f"B1 H2 S{s}", run)

    cases.append(attention(torch.bfloat16, 64, True, False))
    if not quick:
        cases.append(attention(torch.bfloat16, 128, False, True))
        cases.append(attention(torch.float32, 64, True, False))

    def reparameterize(emu):
        g = torch.Generator().manual_seed(0)
        mu, logvar = torch.randn(256, 256, generator=g), torch.randn(256, 256, generator=g)
        z = emu.reparameterize_forward(mu, logvar, None, 1, 7)
        emu.reparameterize_backward(torch.randn(z.shape, generator=g), z, mu)
    cases.append(("reparameterize f32", "256x256", reparameterize))

    def elbo(likelihood):
        def run(emu):
            g = torch.Generator().manual_seed(0)
            b, z = 64, 32
            if likelihood == "categorical":
                recon, target = torch.randn(b, 16, 256, generator=g), torch.randint(0, 256, (b, 16), generator=g)
            else:
                recon, target = torch.randn(b, 512, generator=g), torch.rand(b, 512, generator=g)
            mu, logvar = torch.randn(b, z, generator=g), torch.randn(b, z, generator=g)
            emu.elbo_forward(recon, target, mu, logvar, None, None, None, likelihood, "mean", 1.0, 0.0, -100,
                             [True, True, True, False, False, False])
        return (f"elbo {likelihood} f32", "64x512, latent 64x32" if likelihood != "categorical" else
                "64x16x256, latent 64x32", run)
    cases += [elbo("bernoulli"), elbo("categorical")]
    return cases


def _parse(report):
    rows = {}
    for line in report.splitlines():
        name, *fields = line.split("\t")
        rows[name] = {k: int(v) for k, v in (f.split("=") for f in fields)}
    return rows


def _short(name):
    """A kernel's demangled name without namespaces and its parameter list."""
    base, depth = name, 0
    if name.endswith(")"):
        for i in range(len(name) - 1, -1, -1):
            depth += {")": 1, "(": -1}.get(name[i], 0)
            if depth == 0:
                base = name[:i]
                break
    for junk in ("void ", "vae_ext::", "(anonymous namespace)::"):
        base = base.replace(junk, "")
    return base


def _ratio(a, b):
    return f"{a / b:.2f}" if b else "-"


def table(emu, quick=False):
    lines = ["| case | kernel | launches | global sectors / request (ideal) | shared passes / request (ideal) | "
             "ldmatrix passes / instr (ideal) | cp.async sectors / request (ideal) | mma.sync | barriers |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    summary = {}
    for label, size, run in _cases(quick):
        emu.reset_counters()
        old = emu.set_checks(True, True)
        try:
            run(emu)
        finally:
            emu.set_checks(bool(old[0]), bool(old[1]))
        for name, c in sorted(_parse(emu.counters()).items()):
            g, sh, lm, cp = c["global_requests"], c["shared_requests"], c["ldmatrix"], c["cp_async_requests"]
            lines.append(
                f"| {label}, {size} | `{_short(name)}` | {c['launches']} | "
                f"{_ratio(c['global_sectors'], g)} ({_ratio(c['global_ideal_sectors'], g)}) | "
                f"{_ratio(c['shared_wavefronts'], sh)} ({_ratio(c['shared_ideal_wavefronts'], sh)}) | "
                f"{_ratio(c['ldmatrix_wavefronts'], lm)} ({_ratio(c['ldmatrix_ideal_wavefronts'], lm)}) | "
                f"{_ratio(c['cp_async_sectors'], cp)} ({_ratio(c['cp_async_ideal_sectors'], cp)}) | "
                f"{c['mma']} | {c['barriers']} |")
            summary[(label, _short(name))] = c
    return "\n".join(lines) + "\n", summary


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "cuda_emu_counters.md"))
    ap.add_argument("--quick", action="store_true", help="smaller sizes, fewer cases")
    a = ap.parse_args()
    emu = cuda_emu.load()
    md, _ = table(emu, a.quick)
    head = ("# Memory-transaction counters of the CUDA kernels (CPU emulation)\n\n"
            "Made by `python tools/emu_counters.py` (`make emu-counters`); see that script for what is counted.\n"
            "Ratios are per warp-level request; the ideal in parentheses is what a conflict-free, fully coalesced\n"
            "request of the same bytes takes.\n\n")
    with open(a.out, "w") as f:
        f.write(head + md)
    print(head + md)


if __name__ == "__main__":
    main()
