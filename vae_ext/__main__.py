"""Command line of vae_ext (also installed as `vae-ext`).

    python -m vae_ext train [--model conv|mlp|transformer] [--data digits|text|PATH] ...
    python -m vae_ext bench [--quick] [--device cpu|cuda] [--out DIR]
    python -m vae_ext info  [--json]
    python -m vae_ext reconstruct IMAGE... --weights PATH [--preset sd1|sd2|sdxl|sd3|flux] [--tile PX] [--out DIR]
    python -m vae_ext demo      what `make demo` runs: a short ConvVAE training, fused vs reference

Exit codes: 0 done, 1 an unexpected error, 2 a bad request (arguments, data, checkpoint).
"""

from __future__ import annotations

import argparse
import json
import os
import sys


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
        print(f"extension: built with torch {b.get('torch_version')}, CPU kernels for {b.get('cpu_capabilities')} "
              f"(OpenMP {'on' if b.get('openmp') else 'off'}), {cuda}")
        print(f"CPU capability: {b.get('cpu_capability')} (best on this CPU: {b.get('cpu_capability_best')}; "
              "VAE_EXT_CPU_CAPABILITY=default|avx2|avx512 asks for a lower one)")
        if b.get("cpu_avx512_bf16"):
            if b.get("cpu_capability") != "avx512":
                bf16 = "off (the avx512 kernels use it)"
            elif not b.get("attention_cpu_bf16_dot"):
                bf16 = "off (VAE_EXT_ATTN_BF16_DOT=0)"
            else:
                bf16 = "on (VAE_EXT_ATTN_BF16_DOT=0 turns it off)"
            print(f"AVX512-BF16 products of bfloat16 attention (forward and backward): {bf16}")
    else:
        print(f"extension: not loaded ({info['load_error']}); every op runs the PyTorch reference")
    print(f"backend mode: {info['mode']}")
    for op, per_device in info["ops"].items():
        for device, choice in per_device.items():
            print(f"  {op:<16} {device:<5} {choice['backend']:<10} {choice['reason']}")
    return 0


def _add_train_args(p: argparse.ArgumentParser) -> None:
    from vae_ext.train import MODELS, TrainConfig

    d = TrainConfig()
    g = p.add_argument_group("model and data")
    g.add_argument("--model", choices=MODELS, default=d.model,
                   help="conv: ConvVAE, mlp: VAE (images); transformer: TransformerVAE (text). Default %(default)s")
    g.add_argument("--data", default=None, metavar="digits|text|PATH",
                   help="digits (scikit-learn's 8x8 digits, the default for conv/mlp), text (sentences from "
                        "Python's help texts, the default for transformer), a folder of images, or a text "
                        "file with one sentence per line")
    g.add_argument("--latent", type=int, default=None, help="latent size (default 16 for images, 32 for text)")
    g.add_argument("--level", choices=("char", "word"), default=d.level, help="text tokenization (default %(default)s)")
    g.add_argument("--max-len", type=int, default=None,
                   help="longest sentence in tokens incl. BOS/EOS; longer ones are left out (default 128 char, 40 word)")
    g.add_argument("--image-size", type=int, default=d.image_size,
                   help="images from a folder are resized to this square size (default %(default)s)")
    g.add_argument("--channels", type=int, choices=(1, 3), default=d.channels,
                   help="images from a folder: 1 grey, 3 RGB (default %(default)s)")
    g.add_argument("--val-fraction", type=float, default=d.val_fraction, help="validation share (default %(default)s)")
    g.add_argument("--limit", type=int, default=None, help="use only the first N training examples")
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int, default=d.epochs, help="total epochs (also with --resume; default %(default)s)")
    g.add_argument("--batch-size", type=int, default=d.batch_size, help="per process (default %(default)s)")
    g.add_argument("--lr", type=float, default=None, help="Adam learning rate (default 2e-3 for images, 5e-4 for text)")
    g.add_argument("--beta", type=float, default=d.beta, help="KL weight β after warm-up (default %(default)s)")
    g.add_argument("--kl-warmup", type=float, default=d.kl_warmup,
                   help="epochs over which β rises linearly from 0 to --beta (default %(default)s; 0 = off)")
    g.add_argument("--free-bits", type=float, default=d.free_bits,
                   help="transformer: KL floor per latent dimension in nats, against posterior collapse "
                        "(default %(default)s)")
    g.add_argument("--grad-clip", type=float, default=d.grad_clip, help="max gradient norm, 0 = off (default %(default)s)")
    g.add_argument("--seed", type=int, default=d.seed, help="default %(default)s")
    g = p.add_argument_group("where and how")
    g.add_argument("--device", default=d.device, help="auto (cuda when available, else cpu), cpu, cuda, cuda:N")
    g.add_argument("--backend", choices=("auto", "extension", "reference"), default=d.backend,
                   help="which implementation of the ops runs (default %(default)s)")
    g.add_argument("--out", default=None, help="output folder (default runs/<model>-<data>)")
    g.add_argument("--checkpoint", default=None, help="checkpoint file written every epoch (default <out>/checkpoint.pt)")
    g.add_argument("--resume", nargs="?", const="", default=None, metavar="CHECKPOINT",
                   help="continue from a checkpoint (default <out>/checkpoint.pt) up to --epochs")
    g.add_argument("--time-limit", type=float, default=None, metavar="SECONDS",
                   help="stop after the epoch during which this much training time has passed")
    g.add_argument("--quiet", action="store_true", help="no progress bars or messages")


def _config_from_args(args):
    from vae_ext.train import TrainConfig

    cfg = TrainConfig(model=args.model, data=args.data, epochs=args.epochs, batch_size=args.batch_size,
                      latent=args.latent, lr=args.lr, beta=args.beta, kl_warmup=args.kl_warmup, seed=args.seed,
                      device=args.device, backend=args.backend, out=args.out, checkpoint=args.checkpoint,
                      level=args.level, max_len=args.max_len, image_size=args.image_size, channels=args.channels,
                      val_fraction=args.val_fraction, limit=args.limit, grad_clip=args.grad_clip,
                      free_bits=args.free_bits, time_limit=args.time_limit, quiet=args.quiet)
    if args.resume is not None:
        cfg.resume = args.resume or os.path.join(cfg.resolved().out, "checkpoint.pt")
    return cfg


def _cmd_train(args) -> int:
    from vae_ext.train import train

    train(_config_from_args(args))
    return 0


def _cmd_bench(args) -> int:
    from vae_ext import bench

    return bench.main(args)


def _cmd_reconstruct(args) -> int:
    from vae_ext import reconstruct

    return reconstruct.main(args)


def _cmd_demo(args) -> int:
    from vae_ext import demo

    return demo.main(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vae-ext", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a VAE (images or text) with the fused ops")
    _add_train_args(p)
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("bench", help="time each op: fused vs reference vs the best peer")
    p.add_argument("--quick", action="store_true", help="small sizes, no torch.compile peer: a few seconds")
    p.add_argument("--device", default="auto", help="auto (cuda when available), cpu or cuda")
    p.add_argument("--ops", default="attention,reparameterize,elbo",
                   help="comma-separated subset of attention, reparameterize, elbo, sd_vae (the SD VAE "
                        "decode vs diffusers), attention_models (the attention of ViT, BERT, the SD VAE and "
                        "UNet, LLM prefill and decode, fused vs SDPA); the last two are not in the default "
                        "set: slow on a CPU")
    p.add_argument("--out", default=os.path.join("runs", "bench"), help="folder for bench.json and bench.png")
    p.add_argument("--min-time", type=float, default=None, help="seconds of timing per case")
    p.set_defaults(func=_cmd_bench)

    p = sub.add_parser("info", help="what was built and which backend each op uses here")
    p.add_argument("--json", action="store_true", help="print the backend_info() dict as JSON")
    p.set_defaults(func=_cmd_info)

    p = sub.add_parser("reconstruct", help="encode and decode images with a Stable Diffusion VAE checkpoint")
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files (PNG, JPEG, ...)")
    p.add_argument("--weights", required=True, metavar="PATH",
                   help="a diffusers folder (config.json + diffusion_pytorch_model.safetensors) or a single "
                        "checkpoint file in the LDM layout (a VAE file or a whole SD checkpoint; needs --preset)")
    p.add_argument("--preset", default=None, choices=("sd1", "sd2", "sdxl", "sd3", "flux"),
                   help="the model family of a single checkpoint file")
    p.add_argument("--tile", type=int, default=None, metavar="PX",
                   help="tiled encode/decode with tiles of PX pixels (bounded memory for big images)")
    p.add_argument("--dtype", default="float32", help="float32, bfloat16 or float16 (default %(default)s)")
    p.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda, cuda:N")
    p.add_argument("--out", default=os.path.join("runs", "reconstruct"),
                   help="folder for the side-by-side images (default %(default)s)")
    p.set_defaults(func=_cmd_reconstruct)

    p = sub.add_parser("demo", help="what `make demo` runs: ConvVAE on digits, fused vs reference time per step")
    p.add_argument("--epochs", type=int, default=None, help="epochs of the fused run (default 100)")
    p.add_argument("--time-limit", type=float, default=90.0, metavar="SECONDS",
                   help="stop the fused run after the epoch that passes this (default %(default)s)")
    p.add_argument("--reference-steps", type=int, default=None,
                   help="timed steps of each backend in the comparison (default 40)")
    p.add_argument("--out", default=os.path.join("runs", "demo"))
    p.set_defaults(func=_cmd_demo)
    return parser


def main(argv=None) -> int:
    from vae_ext.data import DataError
    from vae_ext.models.autoencoder_kl_weights import CheckpointError
    from vae_ext.train import TrainError

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (DataError, TrainError, CheckpointError) as exc:
        print(f"vae-ext {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"vae-ext {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
