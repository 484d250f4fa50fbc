"""elbo_loss timings with the implementations interleaved round by round.

    python benchmarks/elbo_interleaved.py [--device cpu|cuda] [--case bernoulli categorical] [--rounds 7]

The same cases as benchmarks/test_bench_elbo.py (fused vs eager reference vs
torch.compile of the reference, fwd under no_grad and fwd+bwd), but each round
times fused, reference and compile back to back, so a machine shared with other
jobs slows all three alike and the ratios stay meaningful. Prints median ms.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.dirname(HERE)]  # this checkout's benchmarks and vae_ext

import vae_ext  # noqa: E402
from test_bench_elbo import case_name, make_case  # noqa: E402
from vae_ext import reference  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--case", nargs="*", default=["bernoulli", "categorical"])
    p.add_argument("--rounds", type=int, default=7)
    args = p.parse_args(argv)
    impls = {"fused": vae_ext.elbo_loss, "reference": reference.elbo_loss,
             "compile": torch.compile(reference.elbo_loss)}
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
    print("| case | pass | fused ms | reference ms | compile ms | fused vs reference | fused vs compile |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for case in args.case:
        recon, target, mu, logvar = make_case(case, args.device)
        for t in (recon, mu, logvar):
            t.requires_grad_()

        def fwd(fn):
            with torch.no_grad():
                fn(recon, target, mu, logvar, case).loss

        def fwd_bwd(fn):
            torch.autograd.grad(fn(recon, target, mu, logvar, case).loss, (recon, mu, logvar))

        for name, step in (("fwd", fwd), ("fwd+bwd", fwd_bwd)):
            for fn in impls.values():  # warm up (and compile)
                step(fn)
                step(fn)
            sync()
            times = {k: [] for k in impls}
            for _ in range(args.rounds):
                for k, fn in impls.items():
                    t0 = time.perf_counter()
                    step(fn)
                    sync()
                    times[k].append(time.perf_counter() - t0)
            med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
            print(f"| {case_name(case)} | {name} | {med['fused']:.1f} | {med['reference']:.1f} | "
                  f"{med['compile']:.1f} | {med['reference'] / med['fused']:.2f}x | "
                  f"{med['compile'] / med['fused']:.2f}x |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
