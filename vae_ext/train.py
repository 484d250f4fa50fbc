"""Training loop behind `python -m vae_ext train`.

One loop for the three models: conv and mlp train on images (Bernoulli likelihood on pixels
in [0, 1]), transformer on padded token sequences (categorical likelihood, key padding mask).
β is warmed up linearly from 0 over the first --kl-warmup epochs. Under torchrun the model
is wrapped in DistributedDataParallel (gloo on CPU, nccl on GPU), each process reads its
DistributedSampler shard, and only rank 0 prints, plots and writes files.

A checkpoint (model, optimizer, epoch, step, history, every rank's RNG state, the tokenizer
and the model configuration) is written at the end of every epoch; --resume continues from it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from vae_ext import data as vdata

CHECKPOINT_FORMAT = "vae_ext-checkpoint-1"
MODELS = ("conv", "mlp", "transformer")


class TrainError(Exception):
    """A problem with the command line's request (not a bug): printed, exit code 2."""


@dataclass
class TrainConfig:
    model: str = "conv"
    data: str | None = None  # default: digits for conv/mlp, text for transformer
    epochs: int = 10
    batch_size: int = 64
    latent: int | None = None  # default: 16 for images, 32 for text
    lr: float | None = None  # default: 2e-3 for images, 5e-4 for text
    beta: float = 1.0
    kl_warmup: float = 1.0  # epochs over which beta rises linearly from 0
    seed: int = 0
    device: str = "auto"
    backend: str = "auto"
    out: str | None = None  # default: runs/<model>-<data>
    checkpoint: str | None = None  # default: <out>/checkpoint.pt
    resume: str | None = None
    level: str = "char"
    max_len: int | None = None  # default: 128 (char), 40 (word)
    image_size: int = 32
    channels: int = 1
    val_fraction: float = 0.1
    limit: int | None = None
    grad_clip: float = 1.0
    free_bits: float = 0.0  # text: KL floor per latent dimension (nats), against posterior collapse
    time_limit: float | None = None  # seconds: stop after the epoch that passes it
    quiet: bool = False
    outputs: bool = True

    def resolved(self) -> "TrainConfig":
        c = dataclasses.replace(self)
        if c.model not in MODELS:
            raise TrainError(f"--model must be one of {', '.join(MODELS)}, got {c.model!r}")
        if c.data is None:
            c.data = "text" if c.model == "transformer" else "digits"
        if c.latent is None:
            c.latent = 32 if c.model == "transformer" else 16
        if c.lr is None:
            c.lr = 5e-4 if c.model == "transformer" else 2e-3
        if c.max_len is None:
            c.max_len = 128 if c.level == "char" else 40
        if c.out is None:
            data_name = c.data if c.data in ("digits", "text") else os.path.basename(os.path.normpath(c.data))
            c.out = os.path.join("runs", f"{c.model}-{data_name}")
        if c.checkpoint is None:
            c.checkpoint = os.path.join(c.out, "checkpoint.pt")
        for name, value, low in (("--epochs", c.epochs, 1), ("--batch-size", c.batch_size, 1),
                                 ("--latent", c.latent, 1), ("--max-len", c.max_len, 3)):
            if value < low:
                raise TrainError(f"{name} must be >= {low}, got {value}")
        if not (c.lr > 0 and math.isfinite(c.lr)):
            raise TrainError(f"--lr must be a positive number, got {c.lr}")
        if not (c.beta >= 0 and math.isfinite(c.beta)) or not c.kl_warmup >= 0:
            raise TrainError("--beta and --kl-warmup must be >= 0")
        if c.time_limit is not None and not c.time_limit > 0:
            raise TrainError(f"--time-limit must be > 0 seconds, got {c.time_limit}")
        if c.limit is not None and c.limit < 1:
            raise TrainError(f"--limit must be >= 1, got {c.limit}")
        return c


# ----------------------------------------------------------------------------- models
# The CLI reaches the models only through these functions, so the adapter to the models'
# API (vae_ext.models: forward -> VAEOutput(loss, recon, kl, ...), a settable `beta`,
# encode -> DiagonalGaussian, decode) is in one place.

def _build_conv(shape, latent, **_):
    from vae_ext.models import ConvVAE

    c, h, w = shape
    return ConvVAE(in_channels=c, image_size=(h, w), latent_dim=latent)


def _build_mlp(shape, latent, **_):
    from vae_ext.models import VAE

    return VAE(input_dim=tuple(shape), latent_dim=latent)


def _build_transformer(vocab_size, latent, max_len, pad_id, bos_id=1, eos_id=2, free_bits=0.0, **_):
    from vae_ext.models import TransformerVAE

    return TransformerVAE(vocab_size=vocab_size, latent_dim=latent, max_len=max_len, pad_id=pad_id, bos_id=bos_id,
                          eos_id=eos_id, free_bits=free_bits)


MODEL_BUILDERS = {"conv": _build_conv, "mlp": _build_mlp, "transformer": _build_transformer}


def _module(model):
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def _model_input(batch):
    """The model's input of a batch: images, or the (N, T) token ids (the models derive the
    key padding mask from pad ids; the collate's mask is kept for tasks that need it)."""
    return batch[0] if isinstance(batch, tuple) else batch


def _forward(model, batch, beta: float):
    """ELBO parts (loss, recon, kl), each a mean over the batch, with KL weight beta."""
    _module(model).beta = beta
    out = model(_model_input(batch))
    return out.loss, out.recon, out.kl


def _encode(model, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior mean and log-variance (N, latent)."""
    posterior = _module(model).encode(_model_input(batch))
    return posterior.mean, posterior.logvar


def _decode_images(model, z: torch.Tensor, shape) -> torch.Tensor:
    """Images in data space ([0, 1] for the Bernoulli likelihood), (N, C, H, W), from latents z."""
    m = _module(model)
    return m.to_data(m.decode(z)).float().clamp(0, 1).reshape(z.shape[0], *shape)


def _generate(model, z: torch.Tensor, max_len: int) -> torch.Tensor:
    """Greedy token ids (N, T) from latents z."""
    return _module(model).decode(z, max_len=max_len)


# ----------------------------------------------------------------------------- distributed

@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def on(self) -> bool:
        return self.world > 1


def pick_device(spec: str, local_rank: int = 0) -> torch.device:
    """The device of a --device flag (auto, cpu, cuda[:N]); a clear TrainError for one that cannot run."""
    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(spec)
    except RuntimeError as exc:
        raise TrainError(f"--device {spec!r}: {exc}") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise TrainError("--device cuda: this torch sees no CUDA device (use --device cpu or auto)")
        if device.index is None:
            device = torch.device("cuda", local_rank % torch.cuda.device_count())
    elif device.type != "cpu":
        raise TrainError(f"--device must be auto, cpu or cuda[:N], got {spec!r}")
    return device


def _setup_distributed(device_spec: str) -> tuple[Dist, torch.device]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist(), pick_device(device_spec, 0)
    d = Dist(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))
    device = pick_device(device_spec, d.local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        dist.init_process_group("gloo")
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
        if "OMP_NUM_THREADS" not in os.environ:
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
    return d, device


def _all_mean(values: list[float], d: Dist, device: torch.device) -> list[float]:
    if not d.on:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return (t / d.world).tolist()


# ----------------------------------------------------------------------------- data plumbing

def _batches(n: int, batch_size: int, epoch: int, seed: int, d: Dist) -> list[list[int]]:
    """This rank's shuffled batches of indices for one epoch (same count on every rank)."""
    from torch.utils.data import DistributedSampler

    sampler = DistributedSampler(range(n), num_replicas=d.world, rank=d.rank, shuffle=True, seed=seed)
    sampler.set_epoch(epoch)
    idx = list(sampler)
    return [idx[i:i + batch_size] for i in range(0, len(idx), batch_size)]


class _Task:
    """What differs between image and text training: batches, and the pictures/sentences at the end."""

    kind = ""

    def __init__(self, data, cfg: TrainConfig, device: torch.device):
        self.data, self.cfg, self.device = data, cfg, device

    def n_train(self) -> int:
        return len(self.data.train)

    def n_val(self) -> int:
        return len(self.data.val)


class _ImageTask(_Task):
    kind = "image"

    def model_kwargs(self) -> dict:
        return {"shape": list(self.data.shape), "latent": self.cfg.latent}

    def batch(self, split: str, idx: list[int]):
        x = (self.data.train if split == "train" else self.data.val)[idx]
        return x.to(self.device, non_blocking=True)

    def batch_size_of(self, batch) -> int:
        return batch.shape[0]

    @torch.no_grad()
    def outputs(self, model, out_dir: str, say) -> dict:
        from vae_ext import plots

        model.eval()
        shape = self.data.shape
        files = {}
        x = self.data.val[:32].to(self.device)
        mu, _ = _encode(model, x)
        recon = _decode_images(model, mu, shape)
        files["reconstruction"] = os.path.join(out_dir, "reconstruction.png")
        plots.save_reconstruction_grid(files["reconstruction"], x.cpu(), recon.cpu())

        g = torch.Generator(device="cpu").manual_seed(self.cfg.seed)
        z = torch.randn(64, mu.shape[1], generator=g).to(self.device, mu.dtype)
        samples = _decode_images(model, z, shape)
        files["samples"] = os.path.join(out_dir, "samples.png")
        plots.save_image_grid(files["samples"], samples.cpu(), nrow=8, title="samples: decode(z), z ~ N(0, I)")

        pool = torch.cat([self.data.val, self.data.train])  # validation images first; tiny folders need both
        n_rows = min(4, len(pool) // 2)
        ends = pool[:2 * n_rows].to(self.device)
        mu_e, _ = _encode(model, ends)
        steps = torch.linspace(0, 1, 10, device=self.device, dtype=mu_e.dtype)
        rows = []
        for r in range(n_rows):
            a, b = mu_e[2 * r], mu_e[2 * r + 1]
            zs = a.unsqueeze(0) + steps.unsqueeze(1) * (b - a).unsqueeze(0)
            imgs = _decode_images(model, zs, shape)
            rows.append(torch.cat([ends[2 * r:2 * r + 1].cpu(), imgs.cpu(), ends[2 * r + 1:2 * r + 2].cpu()]))
        files["interpolation"] = os.path.join(out_dir, "interpolation.png")
        plots.save_interpolation_strip(
            files["interpolation"], torch.stack(rows),
            title="latent interpolation between two validation images (shown at the ends)")
        return files


class _TextTask(_Task):
    kind = "text"

    def model_kwargs(self) -> dict:
        tok = self.data.tokenizer
        return {"vocab_size": len(tok), "latent": self.cfg.latent, "max_len": self.data.max_len,
                "pad_id": tok.pad_id, "bos_id": tok.bos_id, "eos_id": tok.eos_id, "free_bits": self.cfg.free_bits}

    def batch(self, split: str, idx: list[int]):
        seqs = self.data.train if split == "train" else self.data.val
        tokens, mask = vdata.pad_collate([seqs[i] for i in idx], self.data.tokenizer.pad_id)
        return tokens.to(self.device, non_blocking=True), mask.to(self.device, non_blocking=True)

    def batch_size_of(self, batch) -> int:
        return batch[0].shape[0]

    @torch.no_grad()
    def outputs(self, model, out_dir: str, say) -> dict:
        model.eval()
        tok = self.data.tokenizer
        max_len = self.data.max_len
        lines = []

        # one batched greedy decoding for samples, reconstructions and the interpolation
        g = torch.Generator(device="cpu").manual_seed(self.cfg.seed)
        n = min(6, len(self.data.val))
        tokens, mask = vdata.pad_collate(self.data.val[:n], tok.pad_id)
        mu, _ = _encode(model, (tokens.to(self.device), mask.to(self.device)))
        z = torch.randn(8, mu.shape[1], generator=g).to(self.device, mu.dtype)
        steps = torch.linspace(0, 1, 7, device=self.device, dtype=mu.dtype)
        zs = mu[0].unsqueeze(0) + steps.unsqueeze(1) * (mu[min(1, n - 1)] - mu[0]).unsqueeze(0)
        texts = [tok.decode(ids) for ids in _generate(model, torch.cat([z, mu, zs]), max_len)]
        sampled, recons, interp = texts[:8], texts[8:8 + n], texts[8 + n:]

        lines.append("Samples (greedy decoding of z ~ N(0, I)):")
        lines += [f"  {t}" for t in sampled]
        lines.append("")
        lines.append("Reconstructions (validation sentence, then greedy decoding of its posterior mean):")
        for text, out in zip(self.data.val_text[:n], recons):
            lines.append(f"  in:  {text}")
            lines.append(f"  out: {out}")
        if n >= 2:
            lines.append("")
            lines.append("Interpolation between two validation sentences (posterior means, 7 steps):")
            lines.append(f"  from: {self.data.val_text[0]}")
            lines += [f"  t={t:.2f} {out}" for t, out in zip(steps.tolist(), interp)]
            lines.append(f"  to:   {self.data.val_text[1]}")

        text = "\n".join(lines) + "\n"
        say(text)
        path = os.path.join(out_dir, "text_samples.txt")
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
        return {"text_samples": path}


# ----------------------------------------------------------------------------- checkpoints

def _rng_state(device: torch.device) -> dict:
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def load_checkpoint(path: str) -> dict:
    """Read a checkpoint written by `train` (raises TrainError when missing or not one)."""
    if not os.path.isfile(path):
        raise TrainError(f"--resume: checkpoint {path!r} does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a truncated file, a pickle of something else, ...
        raise TrainError(f"--resume: cannot read checkpoint {path!r}: {exc}") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise TrainError(f"--resume: {path!r} is not a vae_ext training checkpoint")
    return ckpt


def _save_atomic(obj, path: str) -> None:
    tmp = path + ".tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- the loop

def _shown(path: str) -> str:
    """A path as the user would type it: relative when under the working directory."""
    full, here = os.path.abspath(path), os.getcwd()
    return os.path.relpath(full, here) if full.startswith(here + os.sep) else full


def _say(d: Dist, quiet: bool):
    def say(msg: str = "") -> None:
        if d.main and not quiet:
            print(msg, flush=True)
    return say


def _progress(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="step", disable=not enabled, dynamic_ncols=True, leave=True,
                file=sys.stdout, mininterval=0.5)


def _beta_at(step: int, cfg: TrainConfig, steps_per_epoch: int) -> float:
    warm = cfg.kl_warmup * steps_per_epoch
    if warm <= 0:
        return cfg.beta
    return cfg.beta * min(1.0, (step + 1) / warm)


@torch.no_grad()
def _evaluate(model, task: _Task, beta: float, batch_size: int = 256) -> dict:
    model.eval()
    n = task.n_val()
    sums = [0.0, 0.0, 0.0]
    for start in range(0, n, batch_size):
        idx = list(range(start, min(n, start + batch_size)))
        batch = task.batch("val", idx)
        loss, recon, kl = _forward(model, batch, beta)
        for i, v in enumerate((loss, recon, kl)):
            sums[i] += float(v) * len(idx)
    return {"val_loss": sums[0] / n, "val_recon": sums[1] / n, "val_kl": sums[2] / n}


def _load_task(cfg: TrainConfig, device: torch.device, tokenizer=None) -> _Task:
    kind = "text" if cfg.model == "transformer" else "image"
    data = vdata.load_data(cfg.data, kind, val_fraction=cfg.val_fraction, seed=cfg.seed, level=cfg.level,
                           max_len=cfg.max_len, image_size=cfg.image_size, channels=cfg.channels,
                           limit=cfg.limit, tokenizer=tokenizer)
    return (_TextTask if kind == "text" else _ImageTask)(data, cfg, device)


def train(cfg: TrainConfig) -> dict:
    """Train as configured; returns the metrics dict (also written to <out>/metrics.json)."""
    from vae_ext import __version__, _backend, backend_info

    resume_ckpt = None
    if cfg.resume:
        resume_ckpt = load_checkpoint(cfg.resume)
        saved = TrainConfig(**{k: v for k, v in resume_ckpt["config"].items()
                               if k in {f.name for f in dataclasses.fields(TrainConfig)}})
        # the run's identity (model, data, sizes, optimizer, seed) comes from the checkpoint;
        # how long and where to run, from this command line
        cfg = dataclasses.replace(saved, epochs=cfg.epochs, device=cfg.device, backend=cfg.backend,
                                  out=cfg.out or saved.out, checkpoint=cfg.checkpoint, quiet=cfg.quiet,
                                  outputs=cfg.outputs, resume=cfg.resume, time_limit=cfg.time_limit)
    cfg = cfg.resolved()
    if cfg.backend not in _backend.MODES:
        raise TrainError(f"--backend must be one of {', '.join(_backend.MODES)}, got {cfg.backend!r}")

    d, device = _setup_distributed(cfg.device)
    try:
        with _backend.use_backend(cfg.backend):
            return _train(cfg, d, device, resume_ckpt, __version__, backend_info)
    finally:
        if d.on and dist.is_initialized():
            dist.destroy_process_group()


def _train(cfg: TrainConfig, d: Dist, device: torch.device, ckpt: dict | None, version: str, backend_info) -> dict:
    say = _say(d, cfg.quiet)
    tokenizer = None
    if ckpt is not None and ckpt.get("tokenizer"):
        tokenizer = vdata.Tokenizer.from_state_dict(ckpt["tokenizer"])
    task = _load_task(cfg, device, tokenizer)
    data = task.data
    if cfg.backend == "extension" and not backend_info()["extension_loaded"]:
        raise TrainError("--backend extension: the compiled extension did not load "
                         f"({backend_info()['load_error']}); use --backend auto or reference")

    torch.manual_seed(cfg.seed)
    model_kwargs = task.model_kwargs() if ckpt is None else ckpt["model_kwargs"]
    model = MODEL_BUILDERS[cfg.model](**model_kwargs).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    start_epoch, step, history, step_losses = 0, 0, [], []
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        start_epoch, step = ckpt["epoch"], ckpt["step"]
        history, step_losses = list(ckpt["history"]), [tuple(x) for x in ckpt["step_losses"]]
        rng = ckpt.get("rng") or []
        if len(rng) == d.world:
            _set_rng_state(rng[d.rank], device)
        else:
            torch.manual_seed(cfg.seed + 1 + d.rank + 7919 * start_epoch)
    else:
        torch.manual_seed(cfg.seed + 1 + d.rank)  # each rank its own noise; the model is the same
    net = model
    if d.on:
        net = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)

    n_params = sum(p.numel() for p in model.parameters())
    if cfg.outputs and d.main:
        os.makedirs(cfg.out, exist_ok=True)
    ops = {op: per["cuda" if device.type == "cuda" else "cpu"]["backend"]
           for op, per in backend_info()["ops"].items()}
    what = (f"{len(data.train)} train / {len(data.val)} validation images of shape {tuple(data.shape)}"
            if task.kind == "image" else
            f"{len(data.train)} train / {len(data.val)} validation sentences, {data.tokenizer.level}-level "
            f"vocabulary of {len(data.tokenizer)}, up to {data.max_len} tokens"
            + (f" ({data.dropped} longer sentences left out)" if data.dropped else ""))
    say(f"vae_ext {version}: training the {cfg.model} VAE ({n_params:,} parameters, latent {cfg.latent}) on "
        f"{data.name}: {what}")
    say(f"device {device}" + (f" × {d.world} processes (DistributedDataParallel)" if d.on else "")
        + f", {torch.get_num_threads()} CPU threads, backend mode '{cfg.backend}': "
        + ", ".join(f"{op} → {b}" for op, b in ops.items()))
    if ckpt is not None:
        say(f"resuming from {cfg.resume} after epoch {start_epoch} (step {step})")

    per_rank_batch = cfg.batch_size
    steps_per_epoch = len(_batches(task.n_train(), per_rank_batch, 0, cfg.seed, d))
    step_times: list[float] = []
    total_seen = 0
    t_run = time.perf_counter()
    if start_epoch >= cfg.epochs:
        say(f"the checkpoint has already trained {start_epoch} epochs (--epochs {cfg.epochs}); nothing to train")
    for epoch in range(start_epoch, cfg.epochs):
        net.train()
        batches = _batches(task.n_train(), per_rank_batch, epoch, cfg.seed, d)
        sums, seen = [0.0, 0.0, 0.0], 0
        bar = _progress(len(batches), f"epoch {epoch + 1}/{cfg.epochs}", d.main and not cfg.quiet)
        t_epoch = time.perf_counter()
        beta = cfg.beta
        for idx in batches:
            t0 = time.perf_counter()
            batch = task.batch("train", idx)
            beta = _beta_at(step, cfg, steps_per_epoch)
            try:
                loss, recon, kl = _forward(net, batch, beta)
            except RuntimeError as exc:
                if "backend 'extension' was requested" in str(exc):
                    raise TrainError(f"--backend extension: {exc}; use --backend auto") from None
                raise
            if not torch.isfinite(loss):
                raise TrainError(f"the loss became {loss.item()} at step {step}; lower --lr or --beta")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            b = task.batch_size_of(batch)
            values = (loss.item(), recon.item(), kl.item())
            step_times.append(time.perf_counter() - t0)
            for i, v in enumerate(values):
                sums[i] += v * b
            seen += b
            step += 1
            if d.main:
                step_losses.append((step, values[0]))
            elapsed = time.perf_counter() - t_epoch
            bar.set_postfix({"loss": f"{values[0]:.2f}", "recon": f"{values[1]:.2f}", "kl": f"{values[2]:.2f}",
                             "β": f"{beta:.2f}", "samples/s": f"{seen * d.world / elapsed:.0f}"}, refresh=False)
            bar.update(1)
        bar.close()
        total_seen += seen
        epoch_s = time.perf_counter() - t_epoch
        train_loss, train_recon, train_kl = _all_mean([s / seen for s in sums], d, device)
        row = {"epoch": epoch + 1, "steps": len(batches), "beta": beta, "train_loss": train_loss,
               "train_recon": train_recon, "train_kl": train_kl, "seconds": epoch_s,
               "samples_per_s": seen * d.world / epoch_s}
        if d.main and task.n_val():
            row.update(_evaluate(model, task, beta))
        history.append(row)
        val = (f", validation loss {row['val_loss']:.3f} (recon {row['val_recon']:.3f}, KL {row['val_kl']:.3f})"
               if "val_loss" in row else "")
        say(f"epoch {epoch + 1}: train loss {train_loss:.3f} (recon {train_recon:.3f}, KL {train_kl:.3f}, "
            f"β {beta:.2f}){val}, {row['samples_per_s']:.0f} samples/s")
        rng = [_rng_state(device)]
        if d.on:
            rng = [None] * d.world
            dist.all_gather_object(rng, _rng_state(device))
        if cfg.outputs and d.main:
            _save_atomic({"format": CHECKPOINT_FORMAT, "version": version, "epoch": epoch + 1, "step": step,
                          "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                          "model_kwargs": model_kwargs, "config": dataclasses.asdict(cfg), "history": history,
                          "step_losses": step_losses, "rng": rng, "world_size": d.world,
                          "tokenizer": data.tokenizer.state_dict() if task.kind == "text" else None},
                         cfg.checkpoint)
        if d.on:
            dist.barrier()
        if cfg.time_limit is not None and epoch + 1 < cfg.epochs:
            stop = torch.tensor([float(time.perf_counter() - t_run >= cfg.time_limit)], device=device)
            if d.on:
                dist.all_reduce(stop, op=dist.ReduceOp.MAX)  # every rank stops after the same epoch
            if stop.item():
                say(f"time limit of {cfg.time_limit:g} s reached after epoch {epoch + 1} of {cfg.epochs}: stopping "
                    f"(--resume continues)")
                break
    total_s = time.perf_counter() - t_run

    timing = {}
    if step_times:
        steady = step_times[min(len(step_times) - 1, 3):]  # the first steps pay for warm-up
        timing = {"steps": len(step_times), "seconds": total_s,
                  "ms_per_step_median": 1e3 * statistics.median(steady),
                  "ms_per_step_mean": 1e3 * sum(step_times) / len(step_times),
                  "samples_per_s": total_seen * d.world / total_s}
    metrics = {
        "vae_ext": version, "torch": torch.__version__, "python": platform.python_version(),
        "model": cfg.model, "parameters": n_params, "model_kwargs": model_kwargs, "data": data.name,
        "n_train": len(data.train), "n_val": len(data.val), "device": str(device), "world_size": d.world,
        "threads": torch.get_num_threads(), "backend_mode": cfg.backend, "ops": ops,
        "config": dataclasses.asdict(cfg), "history": history, "timing": timing, "files": {},
    }
    if history:
        metrics["final"] = {k: v for k, v in history[-1].items() if k.startswith(("train_", "val_"))}
    if d.main and cfg.outputs:
        files = task.outputs(model, cfg.out, say)
        files["loss_curves"] = os.path.join(cfg.out, "loss_curves.png")
        from vae_ext import plots

        plots.save_loss_curves(files["loss_curves"], history, step_losses,
                               title=f"{cfg.model} VAE on {data.name}")
        files["checkpoint"] = cfg.checkpoint
        files["metrics"] = os.path.join(cfg.out, "metrics.json")
        metrics["files"] = files
        with open(files["metrics"], "w") as f:
            json.dump(metrics, f, indent=1)
    if d.main and timing:
        say(f"done: {timing['steps']} steps in {timing['seconds']:.1f} s, {timing['ms_per_step_median']:.2f} ms "
            f"per step (median), {timing['samples_per_s']:.0f} samples/s")
    if d.main and metrics["files"]:
        say(f"outputs in {_shown(cfg.out)}:")
        for name, path in metrics["files"].items():
            say(f"  {name:<15} {path}")
    return metrics
