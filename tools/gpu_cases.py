#!/usr/bin/env python3
"""One forward and backward of each fused op on the CUDA device, for compute-sanitizer and ncu
(tools/gpu_check.py). The extension backend is forced, so a kernel that cannot run fails loudly.

  --ops all|attention|reparameterize|elbo   --size small (sanitizers) | large (profiling)
"""

import argparse
import os

os.environ["VAE_EXT_BACKEND"] = "extension"

import torch  # noqa: E402

import vae_ext  # noqa: E402


def attention(size):
    b, h, s, d = (1, 2, 160, 64) if size == "small" else (4, 16, 4096, 128)
    cases = [(torch.bfloat16, d, True, None), (torch.float16, d, False, "padding"), (torch.float32, 40, True, None)]
    if size == "small":
        cases.append((torch.bfloat16, 128, False, "dropout"))
    else:
        cases = cases[:1]
    for dtype, hd, causal, extra in cases:
        g = torch.Generator(device="cuda").manual_seed(0)
        q, k, v = (torch.randn(b, h, s, hd, device="cuda", dtype=dtype, generator=g, requires_grad=True)
                   for _ in range(3))
        kpm = None
        if extra == "padding":
            kpm = torch.arange(s, device="cuda")[None] >= torch.tensor([s, s // 3], device="cuda")[:b, None]
        out = vae_ext.masked_attention(q, k, v, key_padding_mask=kpm, is_causal=causal,
                                       dropout_p=0.1 if extra == "dropout" else 0.0)
        out.backward(torch.randn_like(out))
    torch.cuda.synchronize()


def reparameterize(size):
    n = (257, 33) if size == "small" else (4096, 4096)
    for dtype in (torch.float32, torch.bfloat16):
        mu = torch.randn(*n, device="cuda", dtype=dtype, requires_grad=True)
        logvar = torch.randn(*n, device="cuda", dtype=dtype, requires_grad=True)
        z = vae_ext.reparameterize(mu, logvar, num_samples=2)
        z.backward(torch.randn_like(z))
    torch.cuda.synchronize()


def elbo(size):
    b, dim, z = (37, 301, 17) if size == "small" else (2048, 4096, 256)
    recon = torch.randn(b, dim, device="cuda", requires_grad=True)
    x = torch.rand(b, dim, device="cuda")
    mu = torch.randn(b, z, device="cuda", requires_grad=True)
    logvar = torch.randn(b, z, device="cuda", requires_grad=True)
    for likelihood in ("bernoulli", "gaussian"):
        loss, _, _ = vae_ext.elbo_loss(recon, x, mu, logvar, likelihood=likelihood, beta=0.5)
        loss.backward()
    t, v = (5, 97) if size == "small" else (128, 8192)
    logits = torch.randn(b, t, v, device="cuda", requires_grad=True)
    ids = torch.randint(0, v, (b, t), device="cuda")
    loss, _, _ = vae_ext.elbo_loss(logits, ids, mu, logvar, likelihood="categorical")
    loss.backward()
    torch.cuda.synchronize()


OPS = {"attention": attention, "reparameterize": reparameterize, "elbo": elbo}

if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--ops", default="all", choices=["all", *OPS])
    ap.add_argument("--size", default="small", choices=["small", "large"])
    a = ap.parse_args()
    for name, fn in OPS.items():
        if a.ops in ("all", name):
            fn(a.size)
            print(f"{name}: ok", flush=True)
