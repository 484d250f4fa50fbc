"""Command line: `python -m vae_ext info | demo`."""

from __future__ import annotations

import argparse
import json
import sys
import time


def _cmd_info(args) -> int:
    import vae_ext

    info = vae_ext.backend_info()
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"vae_ext {info['version']}  torch {info['torch']}  CUDA {info['cuda'] or '-'}  GPU {info['gpu'] or '-'}")
    if info["extension_loaded"]:
        b = info["build"]
        cuda = f"CUDA archs {b['cuda_archs']}" if b.get("cuda") else "no CUDA kernels"
        print(f"extension: built with torch {b.get('torch_version')}, CPU ({b.get('cpu_arch')}, "
              f"OpenMP {'on' if b.get('openmp') else 'off'}), {cuda}")
    else:
        print(f"extension: not loaded ({info['load_error']}); every op runs the PyTorch reference")
    print(f"backend mode: {info['mode']}")
    for op, per_device in info["ops"].items():
        for device, choice in per_device.items():
            print(f"  {op:<16} {device:<5} {choice['backend']:<10} {choice['reason']}")
    return 0


def _time(fn, repeat: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def _cmd_demo(args) -> int:
    import torch

    import vae_ext

    n = args.size
    mu = torch.randn(n, n)
    logvar = 0.5 * torch.randn(n, n)
    eager = _time(lambda: mu + torch.randn_like(mu) * torch.exp(0.5 * logvar), args.repeat)
    with vae_ext.use_backend("auto"):
        fused = _time(lambda: vae_ext.reparameterize(mu, logvar), args.repeat)
    z = vae_ext.reparameterize(mu, logvar)
    eps = (z - mu) / torch.exp(0.5 * logvar)
    print(f"reparameterize {n}x{n} float32 on CPU ({torch.get_num_threads()} threads), best of {args.repeat}:")
    print(f"  eager PyTorch  mu + randn_like(mu) * exp(0.5 * logvar): {eager * 1e3:8.2f} ms")
    print(f"  vae_ext fused  (backend {vae_ext.backend_info()['ops']['reparameterize']['cpu']['backend']}):"
          f"{' ' * 13}{fused * 1e3:8.2f} ms  ({eager / fused:.1f}x)")
    print(f"  drawn eps: mean {eps.mean().item():+.4f}, std {eps.std().item():.4f}")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="vae-ext", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("info", help="what was built and which backend each op uses here")
    p.add_argument("--json", action="store_true", help="print the backend_info() dict as JSON")
    p.set_defaults(func=_cmd_info)
    p = sub.add_parser("demo", help="a short fused-vs-eager reparameterization comparison")
    p.add_argument("--size", type=int, default=4096)
    p.add_argument("--repeat", type=int, default=5)
    p.set_defaults(func=_cmd_demo)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
