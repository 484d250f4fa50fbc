"""Peak extra memory of one masked_attention forward+backward, measured as the growth
of the process's peak resident set (VmHWM) over its resident set just before the call.

    python benchmarks/attention_memory.py [--impl fused|reference|sdpa] [--s 8192] [--b 1] [--h 4] [--d 64]

Run each implementation in its own process (this script does one). Linux only: the
peak is reset through /proc/self/clear_refs. Prints 'peak extra MB: X' last.
"""

import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import vae_ext  # noqa: E402
from vae_ext import reference  # noqa: E402


def _status_kb(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--impl", choices=["fused", "reference", "sdpa"], default="fused")
    p.add_argument("--s", type=int, default=8192)
    p.add_argument("--b", type=int, default=1)
    p.add_argument("--h", type=int, default=4)
    p.add_argument("--d", type=int, default=64)
    p.add_argument("--no-causal", action="store_true")
    args = p.parse_args(argv)
    causal = not args.no_causal
    fn = {"fused": vae_ext.masked_attention, "reference": reference.masked_attention,
          "sdpa": F.scaled_dot_product_attention}[args.impl]
    torch.manual_seed(0)
    shape = (args.b, args.h, args.s, args.d)
    q, k, v = (torch.randn(shape, requires_grad=True) for _ in range(3))
    grad = torch.randn(shape)
    # warm up on a small problem (lazy initialisation, thread pools), outside the measurement
    small = [t[:, :, :64].detach().clone().requires_grad_() for t in (q, k, v)]
    torch.autograd.grad(fn(*small, is_causal=causal), small, grad[:, :, :64])
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak resident set to the current one
    before = _status_kb("VmRSS")
    dq, dk, dv = torch.autograd.grad(fn(q, k, v, is_causal=causal), (q, k, v), grad)
    peak = _status_kb("VmHWM")
    del dq, dk, dv
    print(f"impl {args.impl} B={args.b} H={args.h} S={args.s} D={args.d} causal={causal} float32")
    print(f"inputs (q, k, v, grad): {4 * 4 * q.numel() / 2**20:.1f} MB")
    print(f"peak extra MB: {(peak - before) / 1024:.1f}")


if __name__ == "__main__":
    main()
