"""`python -m vae_ext bench`: each op fused vs the eager reference vs the best peer.

Peers: F.scaled_dot_product_attention for masked_attention; torch.compile of the reference
for reparameterize and elbo_loss (left out by --quick: compiling takes longer than the whole
quick run). Sizes suit the device: realistic training shapes on a GPU, smaller ones on a
CPU, small ones with --quick. Each case is timed forward and forward+backward: after warm-up,
rounds that call every implementation once each (so load changes on a shared machine hit all
of them alike; CUDA calls end with a synchronisation), the median per implementation, stated as GB/s
(reparameterize, elbo_loss: the bytes a single fused pass must move) or TFLOP/s (attention:
4·B·H·Sq·Sk·D per forward, ×3.5 with the backward, halved when causal), also as a fraction
of the device's copy bandwidth and matrix rate measured in the same run.

Writes <out>/bench.json (the results format of DESIGN.md plus the machine) and
<out>/bench.png, and prints the table.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch

import vae_ext
from vae_ext import _report, reference

OPS = ("attention", "reparameterize", "elbo", "sd_vae", "attention_models")


@dataclass
class Case:
    op: str
    name: str
    impls: dict[str, Callable[[], Callable]]  # impl -> factory of (fwd or fwd+bwd) callables
    bytes_fwd: float | None = None
    bytes_bwd: float | None = None
    flops_fwd: float | None = None
    passes: tuple[str, ...] = ("fwd", "fwd+bwd")


def _timeit(fn: Callable, device: torch.device, min_time: float, warmup: int = 2, min_reps: int = 5,
            max_reps: int = 200) -> float:
    """Median seconds per call of fn() after `warmup` calls."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    times = []
    start = time.perf_counter()
    while len(times) < min_reps or (time.perf_counter() - start < min_time and len(times) < max_reps):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _sizes(device: torch.device, quick: bool) -> dict:
    if device.type == "cuda":
        if quick:
            return dict(reparameterize=(4096, 4096), elbo_bern=(1024, 4096, 64), elbo_cat=(32, 128, 2048),
                        attn=(4, 8, 1024, 64), attn_dtype=torch.bfloat16)
        return dict(reparameterize=(8192, 8192), elbo_bern=(4096, 16384, 128), elbo_cat=(64, 256, 8192),
                    attn=(8, 16, 2048, 64), attn_dtype=torch.bfloat16)
    if quick:
        return dict(reparameterize=(512, 512), elbo_bern=(256, 784, 32), elbo_cat=(16, 64, 256),
                    attn=(2, 4, 128, 32), attn_dtype=torch.float32)
    return dict(reparameterize=(2048, 2048), elbo_bern=(1024, 4096, 64), elbo_cat=(32, 128, 1024),
                attn=(4, 8, 512, 64), attn_dtype=torch.float32)


def _compiled(fn):
    cache = {}

    def get():
        if "fn" not in cache:
            cache["fn"] = torch.compile(fn)
        return cache["fn"]
    return get


def _fused(op_fn):
    """op_fn run with the compiled extension only (an unsupported input raises, it never falls back)."""
    def run(*args, **kwargs):
        with vae_ext.use_backend("extension"):
            return op_fn(*args, **kwargs)
    return run


def _reparameterize_case(device, shape, quick) -> Case:
    n = shape[0] * shape[1]
    mu = torch.randn(shape, device=device)
    logvar = 0.5 * torch.randn(shape, device=device)
    grad = torch.randn(shape, device=device)
    impls = {"fused": lambda: _fused(vae_ext.reparameterize), "reference": lambda: reference.reparameterize}
    if not quick:
        impls["compile"] = _compiled(reference.reparameterize)

    def make(fn, backward):
        if not backward:
            return lambda: fn(mu, logvar)
        m, lv = mu.clone().requires_grad_(), logvar.clone().requires_grad_()
        return lambda: torch.autograd.grad(fn(m, lv), (m, lv), grad)

    return Case("reparameterize", f"{shape[0]}x{shape[1]} float32", {"make": make, **impls},
                bytes_fwd=3 * 4 * n, bytes_bwd=8 * 4 * n)


def _elbo_cases(device, sizes, quick) -> list[Case]:
    cases = []
    b, d, z = sizes["elbo_bern"]
    recon = torch.randn(b, d, device=device)
    target = torch.rand(b, d, device=device)
    mu, logvar = torch.randn(b, z, device=device), 0.3 * torch.randn(b, z, device=device)
    bt, t, v = sizes["elbo_cat"]
    logits = torch.randn(bt, t, v, device=device)
    ids = torch.randint(0, v, (bt, t), device=device)
    ids[:, t * 3 // 4:] = -100  # a quarter of the positions are padding
    mu_c, logvar_c = torch.randn(bt, z, device=device), 0.3 * torch.randn(bt, z, device=device)

    for name, (r, tg, m, lv, kind), nbytes in (
            (f"bernoulli B={b} D={d} Z={z}", (recon, target, mu, logvar, "bernoulli"),
             (2 * b * d * 4 + 2 * b * z * 4, 3 * b * d * 4 + 4 * b * z * 4)),
            (f"categorical B={bt} T={t} V={v}", (logits, ids, mu_c, logvar_c, "categorical"),
             (bt * t * v * 4 + bt * t * 8 + 2 * bt * z * 4, 2 * bt * t * v * 4 + bt * t * 8 + 4 * bt * z * 4))):
        def loss_of(fn, kind=kind):
            return lambda rr, tt, mm, ll: fn(rr, tt, mm, ll, likelihood=kind, beta=0.5)[0]

        impls = {"fused": lambda lo=loss_of: lo(_fused(vae_ext.elbo_loss)),
                 "reference": lambda lo=loss_of: lo(reference.elbo_loss)}
        if not quick:
            impls["compile"] = _compiled(loss_of(reference.elbo_loss))

        def make(fn, backward, r=r, tg=tg, m=m, lv=lv):
            if not backward:
                return lambda: fn(r, tg, m, lv)
            rg, mg, lg = (x.clone().requires_grad_() for x in (r, m, lv))
            return lambda: torch.autograd.grad(fn(rg, tg, mg, lg), (rg, mg, lg))

        cases.append(Case("elbo_loss", name, {"make": make, **impls}, bytes_fwd=nbytes[0], bytes_bwd=nbytes[1]))
    return cases


def _attention_cases(device, sizes) -> list[Case]:
    import torch.nn.functional as F

    b, h, s, d = sizes["attn"]
    dtype = sizes["attn_dtype"]
    q, k, v = (torch.randn(b, h, s, d, device=device, dtype=dtype) for _ in range(3))
    grad = torch.randn(b, h, s, d, device=device, dtype=dtype)
    lengths = torch.linspace(s // 2, s, b, device=device).long()  # varied lengths, as in a padded batch
    kpm = torch.arange(s, device=device).unsqueeze(0) >= lengths.unsqueeze(1)
    sdpa_mask = (~kpm)[:, None, None, :]
    flops = 4.0 * b * h * s * s * d
    dt = str(dtype).replace("torch.", "")
    cases = []
    for name, kw, sdpa_kw, f in (
            (f"B={b} H={h} S={s} D={d} {dt} key padding", {"key_padding_mask": kpm}, {"attn_mask": sdpa_mask}, flops),
            (f"B={b} H={h} S={s} D={d} {dt} causal", {"is_causal": True}, {"is_causal": True}, flops / 2)):
        impls = {"fused": lambda kw=kw: (lambda q, k, v: _fused(vae_ext.masked_attention)(q, k, v, **kw)),
                 "reference": lambda kw=kw: (lambda q, k, v: reference.masked_attention(q, k, v, **kw)),
                 "sdpa": lambda skw=sdpa_kw: (lambda q, k, v: F.scaled_dot_product_attention(q, k, v, **skw))}

        def make(fn, backward):
            if not backward:
                return lambda: fn(q, k, v)
            qg, kg, vg = (x.clone().requires_grad_() for x in (q, k, v))
            return lambda: torch.autograd.grad(fn(qg, kg, vg), (qg, kg, vg), grad)

        cases.append(Case("attention", name, {"make": make, **impls}, flops_fwd=f))
    return cases


def _sd_vae_cases(device, quick) -> list[Case]:
    """Decode of one latent by the SD 1.x VAE (random weights): vae_ext's AutoencoderKL with the
    fused attention (fused), the same model on the reference ops (reference), diffusers'
    AutoencoderKL with its default attention on the same weights (diffusers; left out when
    diffusers is not installed). Forward only, no grad."""
    from vae_ext.models import AutoencoderKL

    side, dtype = (2, torch.float32) if quick else \
        ((64, torch.bfloat16) if device.type == "cuda" else (32, torch.float32))
    ours = AutoencoderKL.from_preset("sd1").to(device, dtype).eval()
    z = torch.randn(1, 4, side, side, device=device, dtype=dtype)
    impls = {"fused": lambda: ours.decode,
             "reference": lambda: (lambda zz: _with_reference(ours.decode, zz))}
    try:
        import diffusers

        peer = diffusers.AutoencoderKL(**ours.config).to(device, dtype).eval()
        peer.load_state_dict(ours.state_dict())
        impls["diffusers"] = lambda: (lambda zz: peer.decode(zz).sample)
    except ImportError:
        pass

    def make(fn, backward):
        def run():
            with torch.no_grad():
                return fn(z)
        return run

    dt = str(dtype).replace("torch.", "")
    return [Case("sd_vae_decode", f"SD1 latent {side}x{side} -> {8 * side}px {dt}", {"make": make, **impls},
                 passes=("fwd",))]


def _attention_model_cases(device, quick) -> list[Case]:
    """vae_ext.bench_shapes: the attention of real models, fused vs SDPA, float32 and bfloat16, forward
    (inference mode) and forward+backward (the training shapes). --quick keeps the small families."""
    from vae_ext import bench_shapes

    cases = []
    for shape in bench_shapes.MODEL_SHAPES:
        if quick and shape.family in bench_shapes.SLOW_ON_CPU:
            continue
        for dtype in ((torch.bfloat16,) if quick else (torch.float32, torch.bfloat16)):
            impls = {impl: (lambda impl=impl: impl) for impl in ("fused", "sdpa")}

            def make(impl, backward, shape=shape, dtype=dtype):
                return bench_shapes.call(shape, impl, dtype, backward, device)

            training = shape in bench_shapes.TRAINING_SHAPES
            cases.append(Case("attention_models", f"{shape.family} {shape.label()} {str(dtype)[6:]}",
                              {"make": make, **impls}, flops_fwd=bench_shapes.flops(shape),
                              passes=("fwd", "fwd+bwd") if training else ("fwd",)))
    return cases


def _with_reference(fn, *args):
    with vae_ext.use_backend("reference"):
        return fn(*args)


def _ceilings(device, quick, min_time) -> list[dict]:
    n = (64 if device.type == "cuda" else 16) * 1024 * 1024 // 4 if quick else \
        (256 if device.type == "cuda" else 64) * 1024 * 1024 // 4
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    copy_s = _timeit(lambda: dst.copy_(src), device, min_time)
    m, dtype = ((4096 if quick else 8192), torch.bfloat16) if device.type == "cuda" else \
        ((512 if quick else 1024), torch.float32)
    a = torch.randn(m, m, device=device, dtype=dtype)
    bm = torch.randn(m, m, device=device, dtype=dtype)
    mm_s = _timeit(lambda: a @ bm, device, min_time)
    dev = device.type
    return [dict(op="ceiling", case="copy float32", impl="copy", pass_="fwd", device=dev, median_ms=copy_s * 1e3,
                 gbps=2 * 4 * n / copy_s / 1e9, tflops=None),
            dict(op="ceiling", case=f"matmul {str(dtype)[6:]}", impl="matmul", pass_="fwd", device=dev,
                 median_ms=mm_s * 1e3, gbps=None, tflops=2 * m ** 3 / mm_s / 1e12)]


def run(device: torch.device, quick: bool = False, ops=OPS, min_time: float | None = None,
        log=print) -> tuple[list[dict], list[str]]:
    """Time every case; returns (rows, notes). Notes say which implementations could not run."""
    if min_time is None:
        min_time = 0.05 if quick else 0.5
    torch.manual_seed(0)
    sizes = _sizes(device, quick)
    cases: list[Case] = []
    if "attention" in ops:
        cases += _attention_cases(device, sizes)
    if "reparameterize" in ops:
        cases.append(_reparameterize_case(device, sizes["reparameterize"], quick))
    if "elbo" in ops:
        cases += _elbo_cases(device, sizes, quick)
    if "sd_vae" in ops:
        cases += _sd_vae_cases(device, quick)
    if "attention_models" in ops:
        cases += _attention_model_cases(device, quick)
    rows, notes = _ceilings(device, quick, min_time), []
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for case in cases:
        make = case.impls["make"]
        for pass_ in case.passes:
            backward = pass_ == "fwd+bwd"
            fns = {}
            for impl, factory in case.impls.items():
                if impl == "make":
                    continue
                try:
                    fn = make(factory(), backward)
                    for _ in range(2):  # warm-up (and compilation for the torch.compile peer)
                        fn()
                    sync()
                    fns[impl] = fn
                except Exception as exc:  # no kernel for this input, or a peer that cannot run here
                    msg = str(exc).split("\n")[0]
                    note = f"{case.op} {case.name} {impl}: not run ({type(exc).__name__}: {msg[:160]})"
                    if note not in notes:
                        notes.append(note)
                        log(f"  {note}")
            # round robin: each round times every implementation once, so a change in the
            # machine's load hits all of them alike (this matters on a shared machine)
            times = {impl: [] for impl in fns}
            start = time.perf_counter()
            while fns and (min(len(t) for t in times.values()) < 5 or
                           (time.perf_counter() - start < min_time * len(fns) and
                            min(len(t) for t in times.values()) < 200)):
                for impl, fn in fns.items():
                    t0 = time.perf_counter()
                    fn()
                    sync()
                    times[impl].append(time.perf_counter() - t0)
            for impl, ts in times.items():
                seconds = statistics.median(ts)
                nbytes = case.bytes_bwd if backward else case.bytes_fwd
                flops = None if case.flops_fwd is None else case.flops_fwd * (3.5 if backward else 1.0)
                rows.append(dict(op=case.op, case=case.name, impl=impl, pass_=pass_, device=device.type,
                                 median_ms=seconds * 1e3, gbps=None if nbytes is None else nbytes / seconds / 1e9,
                                 tflops=None if flops is None else flops / seconds / 1e12))
                log(f"  {case.op:<15} {case.name:<38} {pass_:<8} {impl:<10} {seconds * 1e3:10.3f} ms "
                    f"(median of {len(ts)})")
    return rows, notes


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return name


def main(args) -> int:
    from vae_ext.train import TrainError, pick_device

    device = pick_device(args.device)
    ops = [o.strip() for o in args.ops.split(",") if o.strip()]
    bad = [o for o in ops if o not in OPS]
    if bad:
        raise TrainError(f"--ops: unknown {', '.join(bad)} (choose from {', '.join(OPS)})")
    info = vae_ext.backend_info()
    name = device_name(device)
    threads = torch.get_num_threads()
    print(f"vae_ext {info['version']} bench on {name} ({device.type}"
          + (f", {threads} threads" if device.type == "cpu" else "") + f"), torch {torch.__version__}"
          + (", quick sizes" if args.quick else ""))
    if not info["extension_loaded"]:
        print(f"the compiled extension did not load ({info['load_error']}): no fused rows")
    t0 = time.perf_counter()
    rows, notes = run(device, args.quick, ops, args.min_time)
    ceil = _report.ceilings(rows)
    print()
    print(_report.markdown(rows, ceil))
    for note in notes:
        print(f"note: {note}")
    os.makedirs(args.out, exist_ok=True)
    json_path = os.path.join(args.out, "bench.json")
    png_path = os.path.join(args.out, "bench.png")
    extra = {"quick": bool(args.quick), "threads": threads if device.type == "cpu" else None, "notes": notes,
             "vae_ext": info["version"], "build": info["build"]}
    with open(json_path, "w") as f:
        json.dump(_report.results(rows, ceil, name, device.type, None, extra), f, indent=1)
    if any(r["op"] != "ceiling" for r in rows):
        _report.chart(rows, png_path, title=f"{name}, torch {torch.__version__}")
    print(f"wrote {json_path} and {png_path} in {time.perf_counter() - t0:.1f} s")
    return 0
