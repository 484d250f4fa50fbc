"""`python -m vae_ext demo` (what `make demo` runs).

1. Trains the ConvVAE on scikit-learn's 8×8 digits with the fused kernels (backend 'auto':
   the compiled kernels wherever they apply) for 100 epochs or 90 seconds, whichever ends
   first, and writes the pictures.
2. Times training steps of the same model with the fused ops and with the PyTorch reference
   ops, alternating step by step so both see the same machine load, and the two fused ops
   themselves (reparameterize + elbo_loss, forward and backward) at the demo's batch shape.
3. Prints where the pictures are and the time per step of both backends side by side.
"""

from __future__ import annotations

import copy
import os
import statistics
import time

import torch

DEMO_EPOCHS = 100
BATCH = 64
LATENT = 16


def _step_times(model, optimizer, task, batches, backend: str, beta: float = 1.0) -> list[float]:
    from vae_ext import use_backend
    from vae_ext.train import _forward

    times = []
    model.train()
    with use_backend(backend):
        for idx in batches:
            t0 = time.perf_counter()
            loss, _, _ = _forward(model, task.batch("train", idx), beta)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            loss.item()
            times.append(time.perf_counter() - t0)
    return times


def _op_times(backends, device, batch: int, image: tuple, latent: int, rounds: int) -> dict:
    """Median seconds per backend of reparameterize + bernoulli elbo_loss, forward and
    backward, for a batch of `batch` images of shape `image` and latents of size `latent`;
    the backends take turns call by call."""
    import vae_ext

    g = torch.Generator().manual_seed(0)
    mu = torch.randn(batch, latent, generator=g).to(device).requires_grad_()
    logvar = (0.3 * torch.randn(batch, latent, generator=g)).to(device).requires_grad_()
    logits = torch.randn(batch, *image, generator=g).to(device).requires_grad_()
    target = torch.rand(batch, *image, generator=g).to(device)
    times = {b: [] for b in backends}
    for r in range(rounds + 3):
        for b in backends:
            with vae_ext.use_backend(b):
                t0 = time.perf_counter()
                z = vae_ext.reparameterize(mu, logvar)
                out = vae_ext.elbo_loss(logits, target, mu, logvar)
                (out.loss + z.sum()).backward()
                if r >= 3:  # the first rounds warm up
                    times[b].append(time.perf_counter() - t0)
    return {b: statistics.median(t) for b, t in times.items()}


def main(args) -> int:
    import vae_ext
    from vae_ext.train import MODEL_BUILDERS, Dist, TrainConfig, _batches, _load_task, _shown, train

    info = vae_ext.backend_info()
    fused_mode = "auto"  # the compiled kernels wherever they apply; the header line says which op runs what
    epochs = args.epochs or DEMO_EPOCHS
    print(f"vae_ext {info['version']} demo: a convolutional VAE learns scikit-learn's 8x8 handwritten digits "
          f"on the CPU ({torch.get_num_threads()} threads)")
    if not info["extension_loaded"]:
        print(f"note: the compiled extension did not load ({info['load_error']}); both runs use the reference")
    print()
    t0 = time.perf_counter()
    metrics = train(TrainConfig(model="conv", data="digits", epochs=epochs, batch_size=BATCH, latent=LATENT,
                                backend=fused_mode, device="cpu", out=args.out, kl_warmup=2.0,
                                time_limit=args.time_limit))
    train_s = time.perf_counter() - t0

    print()
    print("timing training steps: fused kernels and PyTorch reference ops in turn, step by step ...")
    cfg = TrainConfig(model="conv", data="digits", batch_size=BATCH, latent=LATENT, device="cpu").resolved()
    task = _load_task(cfg, torch.device("cpu"))
    torch.manual_seed(0)
    base = MODEL_BUILDERS["conv"](**task.model_kwargs())
    models = {b: copy.deepcopy(base) for b in (fused_mode, "reference")}
    optimizers = {b: torch.optim.Adam(m.parameters(), lr=cfg.lr) for b, m in models.items()}
    batches = _batches(task.n_train(), BATCH, 0, 0, Dist())
    rounds = max(4, args.reference_steps or 40)
    times = {b: [] for b in models}
    for b in models:  # warm-up, not counted
        _step_times(models[b], optimizers[b], task, batches[:4], b)
    for r in range(rounds):  # step by step in turn, so a change in the machine's load hits both alike
        for b in models:
            times[b] += _step_times(models[b], optimizers[b], task, [batches[r % len(batches)]], b)
    fused_ms = 1e3 * statistics.median(times[fused_mode])
    ref_ms = 1e3 * statistics.median(times["reference"])
    cpu = torch.device("cpu")
    small = _op_times((fused_mode, "reference"), cpu, BATCH, (1, 8, 8), LATENT, rounds=100)
    large = _op_times((fused_mode, "reference"), cpu, 256, (3, 64, 64), 128, rounds=10)

    files = metrics["files"]
    out = _shown(args.out)
    print()
    print(f"trained {len(metrics['history'])} epochs ({metrics['timing']['steps']} steps) in {train_s:.0f} s; "
          f"validation loss {metrics['final'].get('val_loss', float('nan')):.2f} "
          f"(reconstruction {metrics['final'].get('val_recon', float('nan')):.2f}, "
          f"KL {metrics['final'].get('val_kl', float('nan')):.2f} nats per image)")
    print(f"pictures in {out}:")
    for key in ("reconstruction", "samples", "interpolation", "loss_curves"):
        if key in files:
            print(f"  {os.path.basename(files[key]):<20} " + {
                "reconstruction": "validation digits and their reconstructions",
                "samples": "new digits decoded from z ~ N(0, I)",
                "interpolation": "decoding along straight lines between two encoded digits",
                "loss_curves": "loss, reconstruction and KL per epoch"}[key])
    print(f"  {'metrics.json':<20} every number of the run; checkpoint.pt to --resume")
    print()
    print(f"time per training step (ConvVAE, batch {BATCH}, median of {len(times[fused_mode])} steps each):")
    print(f"  fused vae_ext kernels   {fused_ms:8.2f} ms")
    print(f"  PyTorch reference ops   {ref_ms:8.2f} ms   (fused: {ref_ms / fused_ms:.2f}x the speed)")
    print("the fused ops alone (reparameterize + elbo_loss, forward + backward):")
    print(f"  this demo's sizes (64 images of 8x8, latent 16):  fused {1e3 * small[fused_mode]:7.2f} ms, "
          f"reference {1e3 * small['reference']:7.2f} ms ({small['reference'] / small[fused_mode]:.1f}x)")
    print(f"  larger ones (256 images of 3x64x64, latent 128):  fused {1e3 * large[fused_mode]:7.2f} ms, "
          f"reference {1e3 * large['reference']:7.2f} ms ({large['reference'] / large[fused_mode]:.1f}x)")
    print("at the demo's sizes the convolutions take nearly all of a step; `python -m vae_ext bench` "
          "compares every op")
    return 0
