"""`vae-ext reconstruct IMAGE... --weights PATH`: encode and decode images with an AutoencoderKL.

Each image is read as RGB in [0, 1], cropped at the bottom/right to a multiple of the model's
downscale factor (8 for SD), mapped to [−1, 1], encoded (posterior mean) and decoded. Writes
<out>/<name>.png with the input and the reconstruction side by side, and prints the PSNR (of the
reconstruction clamped to [0, 1], against the input, before 8-bit quantisation) and the time of
encode + decode per image.
"""

from __future__ import annotations

import math
import os
import time

import torch

from vae_ext.data import DataError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_model(weights: str, preset: str | None, dtype: torch.dtype, device: torch.device):
    from vae_ext.models import AutoencoderKL

    if os.path.isdir(weights):
        if preset is not None:
            raise DataError(f"--preset: {weights} is a diffusers folder, whose config.json says the architecture; "
                            f"leave --preset out")
        model = AutoencoderKL.from_pretrained(weights, dtype=dtype)
    else:
        if preset is None:
            from vae_ext.models import AUTOENCODER_KL_PRESETS

            raise DataError(f"--preset: {weights} is a single checkpoint file; say which family it is "
                            f"(--preset {'|'.join(sorted(AUTOENCODER_KL_PRESETS))})")
        model = AutoencoderKL.from_single_file(weights, preset=preset, dtype=dtype)
    return model.to(device)


def read_image(path: str, channels: int, multiple: int) -> torch.Tensor:
    """(1, C, H, W) float32 in [0, 1], cropped to a multiple of `multiple` per side."""
    try:
        from PIL import Image, UnidentifiedImageError
    except ImportError as exc:
        raise DataError("reading images needs Pillow (pip install pillow)") from exc
    try:
        with Image.open(path) as img:
            img = img.convert("RGB" if channels == 3 else "L")
            data = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8)
            h, w = img.height, img.width
    except (UnidentifiedImageError, OSError) as exc:
        raise DataError(f"{path}: not a readable image ({exc})") from exc
    x = data.view(h, w, channels).permute(2, 0, 1).unsqueeze(0).float() / 255.0
    h2, w2 = h - h % multiple, w - w % multiple
    if h2 == 0 or w2 == 0:
        raise DataError(f"{path}: {w}x{h} pixels is smaller than the model's {multiple}-pixel latent cell")
    return x[:, :, :h2, :w2]


def write_image(path: str, x: torch.Tensor) -> None:
    from PIL import Image

    arr = (x[0].clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).contiguous()
    mode = "RGB" if arr.shape[2] == 3 else "L"
    Image.frombytes(mode, (arr.shape[1], arr.shape[0]), arr.numpy().tobytes()).save(path)


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """Peak signal-to-noise ratio in dB of two images in [0, 1]."""
    mse = torch.mean((a.float() - b.float()) ** 2).item()
    return math.inf if mse == 0 else 10.0 * math.log10(1.0 / mse)


def main(args) -> int:
    if args.dtype not in DTYPES:
        raise DataError(f"--dtype must be one of {sorted(DTYPES)}, got {args.dtype!r}")
    dtype = DTYPES[args.dtype]
    from vae_ext.train import pick_device

    device = pick_device(args.device)
    if not os.path.exists(args.weights):
        raise DataError(f"--weights: {args.weights}: no such file or folder")
    missing = [p for p in args.images if not os.path.isfile(p)]
    if missing:
        raise DataError(f"no such image file: {', '.join(missing)}")
    model = load_model(args.weights, args.preset, dtype, device)
    if args.tile is not None:
        model.enable_tiling(tile_sample_size=args.tile)
    os.makedirs(args.out, exist_ok=True)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    names: set[str] = set()
    results = []
    for path in args.images:
        x = read_image(path, model.config["in_channels"], model.downscale)
        with torch.no_grad():
            sync()
            t0 = time.perf_counter()
            z = model.encode((x * 2 - 1).to(device, dtype)).mode()
            rec = model.decode(z)
            sync()
            seconds = time.perf_counter() - t0
        rec01 = ((rec.float().cpu() + 1) / 2).clamp(0, 1)
        score = psnr(rec01, x)
        stem = os.path.splitext(os.path.basename(path))[0]
        name, k = stem, 1
        while name in names:
            k += 1
            name = f"{stem}-{k}"
        names.add(name)
        out_path = os.path.join(args.out, f"{name}.png")
        write_image(out_path, torch.cat([x, rec01], dim=3))
        results.append((score, seconds))
        print(f"{path}: {x.shape[3]}x{x.shape[2]}  PSNR {score:6.2f} dB  {seconds * 1e3:9.1f} ms  -> {out_path}")
    if len(results) > 1:
        mean_psnr = sum(r[0] for r in results) / len(results)
        mean_s = sum(r[1] for r in results) / len(results)
        print(f"mean over {len(results)} images: PSNR {mean_psnr:.2f} dB, {mean_s * 1e3:.1f} ms per image")
    return 0
