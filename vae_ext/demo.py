"""`python -m vae_ext demo` (what `make demo` runs).

1. Trains the ConvVAE on scikit-learn's 8×8 digits with the fused kernels (backend 'auto':
   the compiled kernels wherever they apply) for 100 epochs or 90 seconds, whichever ends
   first, and writes the pictures.
2. Times training steps of the same model with the fused ops and with the PyTorch reference
   ops, in alternating blocks so both see the same machine load, and the two fused ops
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


def _op_times(backend: str, device, rounds: int = 100) -> float:
    """Median seconds of reparameterize + bernoulli elbo_loss, forward and backward, at the
    demo's shapes (batch 64, 8×8 images, latent 16)."""
    import vae_ext

    g = torch.Generator().manual_seed(0)
    mu = torch.randn(BATCH, LATENT, generator=g).to(device).requires_grad_()
    logvar = (0.3 * torch.randn(BATCH, LATENT, generator=g)).to(device).requires_grad_()
    logits = torch.randn(BATCH, 1, 8, 8, generator=g).to(device).requires_grad_()
    target = torch.rand(BATCH, 1, 8, 8, generator=g).to(device)
    times = []
    with vae_ext.use_backend(backend):
        for _ in range(rounds):
            t0 = time.perf_counter()
            z = vae_ext.reparameterize(mu, logvar)
            out = vae_ext.elbo_loss(logits, target, mu, logvar)
            (out.loss + z.sum()).backward()
            times.append(time.perf_counter() - t0)
    return statistics.median(times[rounds // 10:])


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
    print("timing training steps: fused kernels vs the PyTorch reference ops, in alternating blocks ...")
    cfg = TrainConfig(model="conv", data="digits", batch_size=BATCH, latent=LATENT, device="cpu").resolved()
    task = _load_task(cfg, torch.device("cpu"))
    torch.manual_seed(0)
    base = MODEL_BUILDERS["conv"](**task.model_kwargs())
    models = {b: copy.deepcopy(base) for b in (fused_mode, "reference")}
    optimizers = {b: torch.optim.Adam(m.parameters(), lr=cfg.lr) for b, m in models.items()}
    batches = _batches(task.n_train(), BATCH, 0, 0, Dist())
    block = max(4, (args.reference_steps or 30) // 3)
    times = {b: [] for b in models}
    for b in models:  # warm-up, not counted
        _step_times(models[b], optimizers[b], task, batches[:4], b)
    for _ in range(3):
        for b in models:
            times[b] += _step_times(models[b], optimizers[b], task, (batches * 4)[:block], b)
    fused_ms = 1e3 * statistics.median(times[fused_mode])
    ref_ms = 1e3 * statistics.median(times["reference"])
    ops_fused = 1e6 * _op_times(fused_mode, torch.device("cpu"))
    ops_ref = 1e6 * _op_times("reference", torch.device("cpu"))

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
    print(f"the two fused ops alone (reparameterize + elbo_loss, forward + backward, batch {BATCH}):")
    print(f"  fused {ops_fused:.0f} µs vs reference {ops_ref:.0f} µs ({ops_ref / ops_fused:.1f}x); "
          f"the convolutions take the rest of the step")
    return 0
