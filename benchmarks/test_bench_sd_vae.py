"""Stable Diffusion's VAE decode: vae_ext's AutoencoderKL vs diffusers' AutoencoderKL (its default
attention processor), same random SD 1.x weights, forward only, no grad.

    impl fused      vae_ext AutoencoderKL, backend auto (mid-block attention on masked_attention's kernel)
    impl diffusers  diffusers.AutoencoderKL with the same state dict

As a pytest-benchmark suite (`make bench`): a 32×32 latent on the CPU (a 64×64 and a 128×128 one,
bfloat16, on CUDA). As a script, the one-shot measurement the README's numbers come from:

    python benchmarks/test_bench_sd_vae.py --sizes 64,128 --dtypes float32,bfloat16 [--profile]

times each decode once per round, alternating the implementations, records the peak resident
memory each decode adds (RSS sampled every 2 ms by a thread), and with --profile breaks one decode
of each implementation down by torch.profiler self time: attention, GroupNorm + SiLU, convs, rest.
"""

import argparse
import os
import sys
import threading
import time
import warnings

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
if __name__ == "__main__":  # run as a script from a checkout: import this checkout's vae_ext
    sys.path.insert(1, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from conftest import DEVICES, run_benchmark  # noqa: E402

diffusers = pytest.importorskip("diffusers") if __name__ != "__main__" else None


def _models(device, dtype, seed=0):
    import diffusers as _diffusers

    from vae_ext.models import AutoencoderKL

    torch.manual_seed(seed)
    ours = AutoencoderKL.from_preset("sd1").eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with torch.device("meta"):
            peer = _diffusers.AutoencoderKL(**ours.config)
    peer.load_state_dict(ours.state_dict(), assign=True)
    return ours.to(device, dtype), peer.eval().to(device, dtype)


def _decoders(device, dtype):
    ours, peer = _models(device, dtype)

    def fused(z):
        with torch.no_grad():
            return ours.decode(z)

    def theirs(z):
        with torch.no_grad():
            return peer.decode(z).sample

    return {"fused": fused, "diffusers": theirs}


def _sizes(device):
    if torch.device(device).type == "cuda":
        return [(64, torch.bfloat16), (128, torch.bfloat16)]
    return [(32, torch.float32)]


_CACHE = {}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("size", [0, 1])
@pytest.mark.parametrize("impl", ["fused", "diffusers"])
def test_sd_vae_decode(benchmark, device, size, impl):
    sizes = _sizes(device)
    if size >= len(sizes):
        pytest.skip("one size on the CPU")
    side, dtype = sizes[size]
    key = (device, dtype)
    if key not in _CACHE:
        _CACHE.clear()
        _CACHE[key] = _decoders(device, dtype)
    fn = _CACHE[key][impl]
    z = torch.randn(1, 4, side, side, device=device, dtype=dtype)
    dt = str(dtype).replace("torch.", "")
    run_benchmark(benchmark, lambda: fn(z), device=device, op="sd_vae_decode",
                  case=f"SD1 latent {side}x{side} -> {8 * side}px {dt}", impl=impl, pass_="fwd", warmup=1)


# ---------------------------------------------------------------------------- the one-shot script

def _rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def timed_peak(fn, *args):
    """(seconds, peak RSS added during the call in bytes, result)."""
    base = _rss_bytes()
    peak = [base]
    done = threading.Event()

    def poll():
        while not done.is_set():
            peak[0] = max(peak[0], _rss_bytes())
            time.sleep(0.002)

    t = threading.Thread(target=poll, daemon=True)
    t.start()
    t0 = time.perf_counter()
    out = fn(*args)
    seconds = time.perf_counter() - t0
    done.set()
    t.join()
    peak[0] = max(peak[0], _rss_bytes())
    return seconds, peak[0] - base, out


CATEGORIES = (
    ("attention", ("masked_attention", "scaled_dot_product", "flash_attention", "_efficient_attention", "baddbmm",
                   "bmm", "softmax")),
    ("attention projections", ("addmm", "aten::linear", "aten::mm")),
    ("GroupNorm + SiLU", ("group_norm", "silu")),
    ("convs", ("conv", "mkldnn")),
    ("upsample", ("upsample",)),
)


def profile_breakdown(fn, z):
    """Self CPU time per category of one call of fn(z), in ms, plus the total."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn(z)
    out = {name: 0.0 for name, _ in CATEGORIES}
    out["rest"] = 0.0
    rest_ops = {}
    for ev in prof.key_averages():
        ms = ev.self_cpu_time_total / 1e3
        for name, keys in CATEGORIES:
            if any(k in ev.key for k in keys):
                out[name] += ms
                break
        else:
            out["rest"] += ms
            rest_ops[ev.key] = rest_ops.get(ev.key, 0.0) + ms
    top_rest = sorted(rest_ops.items(), key=lambda kv: -kv[1])[:4]
    return out, sum(out.values()), top_rest


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="64,128", help="latent sides (64 = a 512² image)")
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--rounds", type=int, default=1, help="timed rounds per case (each alternates the impls)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--profile", action="store_true", help="profile one decode per impl at the first size, float32")
    p.add_argument("--device", default="cpu")
    p.add_argument("--reverse", action="store_true", help="diffusers first in the first round")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    import vae_ext

    device = torch.device(args.device)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, extension loaded "
          f"{vae_ext.backend_info()['extension_loaded']}, device {device}", flush=True)
    sizes = [int(s) for s in args.sizes.split(",")]
    dtypes = [getattr(torch, d) for d in args.dtypes.split(",")]
    if args.profile:
        decs = _decoders(device, torch.float32)
        z = torch.randn(1, 4, sizes[0], sizes[0], device=device)
        for impl, fn in decs.items():
            fn(torch.randn(1, 4, 8, 8, device=device))  # warm-up
            parts, total, top_rest = profile_breakdown(fn, z)
            print(f"profile {impl} latent {sizes[0]}x{sizes[0]} float32: total self CPU {total:.0f} ms; " +
                  "; ".join(f"{k} {v:.0f} ms ({100 * v / total:.1f}%)" for k, v in parts.items()) +
                  " | largest in rest: " + ", ".join(f"{k} {v:.0f} ms" for k, v in top_rest), flush=True)
        del decs
    print("| latent | image | dtype | impl | s per image | peak RSS added (MiB) | max abs diff vs diffusers |",
          flush=True)
    print("|---|---|---|---|---:|---:|---:|", flush=True)
    for side in sizes:
        for dtype in dtypes:
            decs = _decoders(device, dtype)
            for fn in decs.values():
                fn(torch.randn(1, 4, 8, 8, device=device, dtype=dtype))  # warm-up at a small size
            z = torch.randn(1, 4, side, side, device=device, dtype=dtype)
            outs, times = {}, {impl: [] for impl in decs}
            for r in range(args.rounds):
                order = list(decs) if (r + args.reverse) % 2 == 0 else list(reversed(decs))
                for impl in order:
                    seconds, peak, out = timed_peak(decs[impl], z)
                    outs[impl] = out
                    times[impl].append(seconds)
                    diff = "" if impl == "diffusers" or "diffusers" not in outs else \
                        f"{(out.float() - outs['diffusers'].float()).abs().max().item():.2e}"
                    dt = str(dtype).replace("torch.", "")
                    print(f"| {side}x{side} | {8 * side}px | {dt} | {impl} | {seconds:.2f} | {peak / 2**20:.0f} | "
                          f"{diff} |", flush=True)
            if "fused" in outs and "diffusers" in outs:
                d = (outs["fused"].float() - outs["diffusers"].float()).abs().max().item()
                med = {impl: sorted(ts)[len(ts) // 2] for impl, ts in times.items()}
                print(f"| {side}x{side} | median of {args.rounds} | | fused / diffusers time "
                      f"{med['fused'] / med['diffusers']:.2f} | | | {d:.2e} |", flush=True)
            del decs, outs


if __name__ == "__main__":
    main()
