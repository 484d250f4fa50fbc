#!/usr/bin/env python3
"""CUDA benchmarks for `make gpu-check` (tools/gpu_check.py): the device's ceilings, then every op fused vs
the PyTorch reference vs the best peer, written into DESIGN.md's results file after every measurement.

- ceilings: device-to-device copy bandwidth (bytes read + written) and an 8192³ bf16 matmul;
- attention: B=4 H=16, D in {64, 128}, S in {1024, 4096, 8192}, causal and key padding (lengths uniform
  in [S/2, S], given to SDPA as a boolean mask), forward and forward+backward, bf16 then fp16; peers:
  SDPA with each of its backends (flash, efficient, cuDNN, math when small; the fastest is kept as
  "sdpa", each also as "sdpa-<backend>") and flash_attn when importable; FLOPs counted as
  4·B·H·S²·D (halved when causal), forward+backward 3.5x that;
- reparameterize (4096×4096) and elbo_loss (Bernoulli 2048×4096 with a 2048×256 latent; categorical
  64×128×8192): fused vs reference vs torch.compile of the reference, GB/s of the bytes each must move.

Timing: CUDA events around each call after warm-up, repeated until ~0.15 s, median. `--budget` seconds
bound the whole run: what does not fit is left out (bf16 attention first, the compiled peers last).
Usage: gpu_bench.py --results FILE.json [--budget S]; `markdown(data)` renders a results file.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

B, H = 4, 16


def time_ms(fn, min_time=0.15, max_reps=200):
    for _ in range(2):
        fn()
    torch.cuda.synchronize()
    times = []
    t_end = time.perf_counter() + min_time
    while len(times) < 3 or (time.perf_counter() < t_end and len(times) < max_reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


class Results:
    def __init__(self, path):
        self.path = path
        with open(path) as f:
            self.data = json.load(f)

    def add(self, op, case, impl, pass_, ms, flops=None, nbytes=None):
        row = {"op": op, "case": case, "impl": impl, "pass": pass_, "median_ms": round(ms, 4),
               "tflops": round(flops / ms / 1e9, 1) if flops else None,
               "gbps": round(nbytes / ms / 1e6, 1) if nbytes else None}
        self.data["results"].append(row)
        self.save()
        print(f"{op:15s} {case:48s} {impl:16s} {pass_:8s} {ms:9.3f} ms"
              + (f" {row['tflops']:7.1f} TFLOP/s" if row["tflops"] else "")
              + (f" {row['gbps']:7.1f} GB/s" if row["gbps"] else ""), flush=True)

    def save(self):
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(self.data, f, indent=1)
        os.replace(tmp, self.path)


def ceilings(res):
    x = torch.empty(1 << 28, dtype=torch.float32, device="cuda")  # 1 GiB
    y = torch.empty_like(x)
    ms = time_ms(lambda: y.copy_(x))
    copy_gbps = 2 * x.numel() * 4 / ms / 1e6
    x = y = None  # free the 2 GiB before the matmul
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    ms = time_ms(lambda: a @ b)
    tflops = 2 * 8192 ** 3 / ms / 1e9
    res.data["ceilings"] = {"copy_gbps": round(copy_gbps, 1), "bf16_matmul_tflops": round(tflops, 1)}
    res.save()
    print(f"ceilings: copy {copy_gbps:.0f} GB/s, bf16 matmul {tflops:.0f} TFLOP/s", flush=True)


def _sdpa_backends():
    from torch.nn.attention import SDPBackend
    names = {"flash": "FLASH_ATTENTION", "efficient": "EFFICIENT_ATTENTION", "cudnn": "CUDNN_ATTENTION",
             "math": "MATH"}
    return {k: getattr(SDPBackend, v) for k, v in names.items() if hasattr(SDPBackend, v)}


def _time_impls(res, case, pass_, calls, flops):
    """Times each no-argument callable of `calls` (impl -> call) and records it as soon as it is measured
    (an implementation that does not take the input is reported and skipped); then the fastest SDPA
    backend again as impl "sdpa", its name in the case."""
    best = None
    for impl, call in calls.items():
        try:
            ms = time_ms(call)
        except Exception as e:  # a backend that does not take this input
            print(f"{impl} {case} {pass_}: not run ({type(e).__name__}: {str(e)[:120]})", flush=True)
            continue
        res.add("attention", case, impl, pass_, ms, flops=flops)
        if impl.startswith("sdpa-") and (best is None or ms < best[1]):
            best = (impl, ms)
    if best is not None:
        res.add("attention", case + f" [{best[0][5:]}]", "sdpa", pass_, best[1], flops=flops)


def attention(res, dtype, deadline):
    import vae_ext
    from torch.nn.attention import sdpa_kernel

    from vae_ext import reference

    try:
        from flash_attn import flash_attn_func
    except Exception:
        flash_attn_func = None
    backends = _sdpa_backends()
    tag = {torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]
    for s in (1024, 4096, 8192):
        for d in (64, 128):
            for mask in ("causal", "padding"):
                if time.monotonic() > deadline:
                    print("attention: out of time", flush=True)
                    return
                causal = mask == "causal"
                g = torch.Generator(device="cuda").manual_seed(0)
                q, k, v = (torch.randn(B, H, s, d, device="cuda", dtype=dtype, generator=g) for _ in range(3))
                kpm = None
                if not causal:
                    lengths = torch.randint(s // 2, s + 1, (B,), device="cuda", generator=g)
                    kpm = torch.arange(s, device="cuda")[None, :] >= lengths[:, None]
                sdpa_mask = None if kpm is None else ~kpm[:, None, None, :]
                fwd_flops = 4 * B * H * s * s * d // (2 if causal else 1)
                case = f"B{B} H{H} S{s} D{d} {tag} {'causal' if causal else 'key padding (bool mask)'}"
                impls = {"fused": lambda q, k, v: vae_ext.masked_attention(q, k, v, key_padding_mask=kpm,
                                                                           is_causal=causal)}
                for name, backend in backends.items():
                    if name == "math" and s > 1024:
                        continue

                    def sd(q, k, v, backend=backend):
                        with sdpa_kernel([backend]):
                            return F.scaled_dot_product_attention(q, k, v, attn_mask=sdpa_mask, is_causal=causal)
                    impls[f"sdpa-{name}"] = sd
                if flash_attn_func is not None and causal:
                    impls["flash_attn"] = lambda q, k, v: flash_attn_func(
                        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=True).transpose(1, 2)
                if s <= 1024:
                    impls["reference"] = lambda q, k, v: reference.masked_attention(
                        q, k, v, key_padding_mask=kpm, is_causal=causal)
                for pass_ in ("fwd", "fwd+bwd"):
                    calls = {}
                    for impl, fn in impls.items():
                        if pass_ == "fwd":
                            def call(fn=fn):
                                with torch.no_grad():
                                    fn(q, k, v)
                        else:
                            qg, kg, vg = (t.detach().requires_grad_() for t in (q, k, v))
                            grad = torch.randn_like(q)

                            def call(fn=fn, qg=qg, kg=kg, vg=vg, grad=grad):
                                torch.autograd.grad(fn(qg, kg, vg), (qg, kg, vg), grad)
                        calls[impl] = call
                    _time_impls(res, case, pass_, calls, fwd_flops if pass_ == "fwd" else int(3.5 * fwd_flops))
                q = k = v = kpm = None  # free before the next size
                torch.cuda.empty_cache()


def attention_sd_vae(res, deadline):
    """The SD VAE mid-block's attention, forward only (what decoding runs): one head of 512 channels,
    S = 64² and 128² latent pixels, bf16; fused (FFMA kernel: no tensor-core kernel has D = 512) vs
    every SDPA backend that takes it."""
    import vae_ext
    from torch.nn.attention import sdpa_kernel

    for s in (4096, 16384):
        if time.monotonic() > deadline:
            print("attention (SD VAE): out of time", flush=True)
            return
        g = torch.Generator(device="cuda").manual_seed(0)
        q, k, v = (torch.randn(1, 1, s, 512, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(3))
        case = f"SD VAE mid-block B1 H1 S{s} D512 bf16"
        def fused():
            with torch.no_grad():
                vae_ext.masked_attention(q, k, v)
        impls = {"fused": fused}
        for name, backend in _sdpa_backends().items():
            def sd(backend=backend):
                with sdpa_kernel([backend]), torch.no_grad():
                    F.scaled_dot_product_attention(q, k, v)
            impls[f"sdpa-{name}"] = sd
        _time_impls(res, case, "fwd", impls, 4 * s * s * 512)
        q = k = v = None
        torch.cuda.empty_cache()


def elementwise(res, deadline, which):
    import vae_ext
    from vae_ext import reference

    n = 4096
    mu = torch.randn(n, n, device="cuda")
    logvar = torch.randn(n, n, device="cuda")
    eps = torch.randn(n, n, device="cuda")
    impls = {"fused": lambda m, l: vae_ext.reparameterize(m, l),
             "reference": lambda m, l: reference.reparameterize(m, l, eps=eps)}
    if "compile" in which:
        impls["compile"] = torch.compile(lambda m, l: m + torch.randn_like(m) * torch.exp(0.5 * l))
    for impl, fn in impls.items():
        if impl not in which:
            continue
        if time.monotonic() > deadline:
            return
        res.add("reparameterize", f"{n}x{n} f32", impl, "fwd", time_ms(lambda: fn(mu, logvar)),
                nbytes=3 * n * n * 4)
        mg, lg = mu.detach().requires_grad_(), logvar.detach().requires_grad_()
        g = torch.randn_like(mu)
        res.add("reparameterize", f"{n}x{n} f32", impl, "fwd+bwd",
                time_ms(lambda: torch.autograd.grad(fn(mg, lg), (mg, lg), g)), nbytes=3 * n * n * 4 + 4 * n * n * 4)
    b, dim, z = 2048, 4096, 256
    recon = torch.randn(b, dim, device="cuda")
    x = torch.rand(b, dim, device="cuda")
    zm, zl = torch.randn(b, z, device="cuda"), torch.randn(b, z, device="cuda")
    impls = {"fused": lambda r, m, l: vae_ext.elbo_loss(r, x, m, l)[0],
             "reference": lambda r, m, l: reference.elbo_loss(r, x, m, l)[0]}
    if "compile" in which:
        impls["compile"] = torch.compile(lambda r, m, l: reference.elbo_loss(r, x, m, l)[0])
    nb = (2 * b * dim + 2 * b * z) * 4
    for impl, fn in impls.items():
        if impl not in which:
            continue
        if time.monotonic() > deadline:
            return
        res.add("elbo", "bernoulli 2048x4096, latent 2048x256 f32", impl, "fwd", time_ms(lambda: fn(recon, zm, zl)),
                nbytes=nb)
        rg, mg, lg = (t.detach().requires_grad_() for t in (recon, zm, zl))
        res.add("elbo", "bernoulli 2048x4096, latent 2048x256 f32", impl, "fwd+bwd",
                time_ms(lambda: torch.autograd.grad(fn(rg, mg, lg), (rg, mg, lg))), nbytes=nb + (b * dim + 2 * b * z) * 4)


def markdown(data):
    lines = [f"# GPU benchmarks: {data['device']}", "",
             f"torch {data['torch']}, CUDA {data['cuda']}, {data['date']}, commit {data['commit']}; "
             f"tests {data.get('tests')}; ceilings {data.get('ceilings')}", "",
             "| op | case | pass | fused ms | best peer ms | reference ms | fused vs peer | fused TFLOP/s or GB/s |",
             "|---|---|---|---:|---:|---:|---:|---:|"]
    rows = {}
    for r in data["results"]:
        case = r["case"].split(" [")[0]
        key = (r["op"], case, r["pass"])
        rows.setdefault(key, {})
        if r["impl"] == "sdpa":
            rows[key]["peer"] = (r["median_ms"], "sdpa " + r["case"].split(" [")[-1].rstrip("]"))
        elif r["impl"] in ("compile", "flash_attn"):
            if "peer" not in rows[key] or r["median_ms"] < rows[key]["peer"][0]:
                rows[key]["peer"] = (r["median_ms"], r["impl"])
        elif r["impl"] in ("fused", "reference"):
            rows[key][r["impl"]] = r
    for (op, case, pass_), v in rows.items():
        fused, ref, peer = v.get("fused"), v.get("reference"), v.get("peer")
        rate = "" if fused is None else (f"{fused['tflops']} TFLOP/s" if fused["tflops"] else f"{fused['gbps']} GB/s")
        ratio = f"{peer[0] / fused['median_ms']:.2f}x ({peer[1]})" if fused and peer else ""
        lines.append(f"| {op} | {case} | {pass_} | {fused['median_ms'] if fused else ''} | "
                     f"{peer[0] if peer else ''} | {ref['median_ms'] if ref else ''} | {ratio} | {rate} |")
    return "\n".join(lines) + "\n"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--results", required=True, help="results JSON (created by gpu_check.py) to append to")
    ap.add_argument("--budget", type=float, default=120.0, help="seconds for the whole run")
    a = ap.parse_args()
    deadline = time.monotonic() + a.budget
    res = Results(a.results)
    ceilings(res)
    attention_sd_vae(res, deadline - 0.85 * a.budget)
    attention(res, torch.bfloat16, deadline - 0.45 * a.budget)
    elementwise(res, deadline - 0.3 * a.budget, which=("fused", "reference"))
    attention(res, torch.float16, deadline - 0.2 * a.budget)
    if deadline - time.monotonic() > 0.15 * a.budget:  # compiling takes a while: last, if there is time
        elementwise(res, deadline, which=("compile",))


if __name__ == "__main__":
    main()
