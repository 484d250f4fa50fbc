"""AutoencoderKL: the VAE of Stable Diffusion (SD 1.x/2.x, SDXL, SD3, Flux) on the fused operators.

The module tree and parameter names are diffusers' ``AutoencoderKL``, so a diffusers
``state_dict`` loads with ``strict=True``; the original LDM layout (ComfyUI, A1111) loads through
``from_single_file`` (key maps in ``vae_ext.models.autoencoder_kl_weights``).

    vae = AutoencoderKL.from_pretrained("path/to/vae")          # a diffusers folder
    vae = AutoencoderKL.from_single_file("sd15.safetensors", preset="sd1")
    posterior = vae.encode(images)                            # images in [-1, 1], (N, 3, H, W)
    images = vae.decode(vae.unscale_latents(latents))         # latents as a diffusion model sees them

What runs on the fused kernels: the mid-block self-attention (one head over the H·W tokens,
head dim = the channel count, 512 for SD) on ``vae_ext.masked_attention``; the posterior sample
on ``vae_ext.reparameterize``; ``loss`` on ``vae_ext.elbo_loss``. Convolutions, GroupNorm and
SiLU are PyTorch's.
"""

from __future__ import annotations

import contextlib
import os
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

import vae_ext
from vae_ext.models.base import VAEOutput
from vae_ext.nn.distributions import DiagonalGaussian

_NAME = "AutoencoderKL"

# The known families. SD 1.x and 2.x share one VAE (2.x at 768 px); SDXL retrained it (other
# scaling); SD3 and Flux have 16 latent channels, no quant convs and a shift.
_SD_BLOCKS = dict(down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                  block_out_channels=(128, 256, 512, 512), layers_per_block=2, act_fn="silu", norm_num_groups=32,
                  in_channels=3, out_channels=3)
PRESETS: dict[str, dict] = {
    "sd1": dict(_SD_BLOCKS, latent_channels=4, sample_size=512, scaling_factor=0.18215, force_upcast=True),
    "sd2": dict(_SD_BLOCKS, latent_channels=4, sample_size=768, scaling_factor=0.18215, force_upcast=True),
    "sdxl": dict(_SD_BLOCKS, latent_channels=4, sample_size=1024, scaling_factor=0.13025, force_upcast=True),
    "sd3": dict(_SD_BLOCKS, latent_channels=16, sample_size=1024, scaling_factor=1.5305, shift_factor=0.0609,
                force_upcast=True, use_quant_conv=False, use_post_quant_conv=False),
    "flux": dict(_SD_BLOCKS, latent_channels=16, sample_size=1024, scaling_factor=0.3611, shift_factor=0.1159,
                 force_upcast=True, use_quant_conv=False, use_post_quant_conv=False),
}

_ACTIVATIONS = {"silu": nn.SiLU, "swish": nn.SiLU, "mish": nn.Mish, "gelu": nn.GELU, "relu": nn.ReLU}


def preset_config(name: str) -> dict:
    """The constructor keywords of a preset ('sd1', 'sd2', 'sdxl', 'sd3', 'flux')."""
    if name not in PRESETS:
        raise ValueError(f"{_NAME}: preset must be one of {sorted(PRESETS)}, got {name!r}")
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in PRESETS[name].items()}


# ---------------------------------------------------------------------------- blocks (diffusers' names)

class ResnetBlock2D(nn.Module):
    """GroupNorm → act → 3×3 conv → GroupNorm → act → dropout → 3×3 conv, plus the input (a 1×1
    ``conv_shortcut`` when the channel count changes)."""

    def __init__(self, in_channels: int, out_channels: int, groups: int, act_fn: str, eps: float = 1e-6,
                 dropout: float = 0.0) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_channels, eps=eps)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = nn.GroupNorm(groups, out_channels, eps=eps)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.nonlinearity = _ACTIVATIONS[act_fn]()
        self.conv_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(self.nonlinearity(self.norm1(x)))
        h = self.conv2(self.dropout(self.nonlinearity(self.norm2(h))))
        return (x if self.conv_shortcut is None else self.conv_shortcut(x)) + h


class Downsample2D(nn.Module):
    """Stride-2 3×3 conv after padding one row and column at the bottom/right (as LDM)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample2D(nn.Module):
    """Nearest-neighbour ×2, then a 3×3 conv."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Attention(nn.Module):
    r"""The mid-block self-attention: GroupNorm, one head over the H·W positions with head dim =
    channels, output projection, residual. Runs on ``vae_ext.masked_attention`` (the kernels take
    any head dim on the CPU; on CUDA a head dim above 256 runs the reference, as ``backend_info``
    says). Parameter names as diffusers (``group_norm, to_q, to_k, to_v, to_out.0``)."""

    def __init__(self, channels: int, groups: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.group_norm = nn.GroupNorm(groups, channels, eps=eps)
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        self.to_out = nn.ModuleList([nn.Linear(channels, channels), nn.Dropout(0.0)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        tokens = self.group_norm(x).reshape(n, c, h * w).transpose(1, 2)  # (N, HW, C)
        q, k, v = (proj(tokens).unsqueeze(1) for proj in (self.to_q, self.to_k, self.to_v))  # (N, 1, HW, C)
        out = vae_ext.masked_attention(q, k, v).squeeze(1)
        out = self.to_out[1](self.to_out[0](out))
        return x + out.transpose(1, 2).reshape(n, c, h, w)


class UNetMidBlock2D(nn.Module):
    """ResNet block, self-attention (optional), ResNet block."""

    def __init__(self, channels: int, groups: int, act_fn: str, add_attention: bool) -> None:
        super().__init__()
        self.attentions = nn.ModuleList([Attention(channels, groups) if add_attention else None])
        self.resnets = nn.ModuleList([ResnetBlock2D(channels, channels, groups, act_fn) for _ in range(2)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.resnets[0](x)
        for attn, resnet in zip(self.attentions, self.resnets[1:]):
            if attn is not None:
                x = attn(x)
            x = resnet(x)
        return x


class DownEncoderBlock2D(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, num_layers: int, groups: int, act_fn: str,
                 add_downsample: bool) -> None:
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels, groups,
                                                    act_fn) for i in range(num_layers)])
        self.downsamplers = nn.ModuleList([Downsample2D(out_channels)]) if add_downsample else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for resnet in self.resnets:
            x = resnet(x)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)
        return x


class UpDecoderBlock2D(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, num_layers: int, groups: int, act_fn: str,
                 add_upsample: bool) -> None:
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels, groups,
                                                    act_fn) for i in range(num_layers)])
        self.upsamplers = nn.ModuleList([Upsample2D(out_channels)]) if add_upsample else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for resnet in self.resnets:
            x = resnet(x)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x)
        return x


class Encoder(nn.Module):
    """Image (N, in_channels, H, W) → moments (N, 2·latent_channels, H/f, W/f), f = 2^(blocks−1)."""

    def __init__(self, in_channels, latent_channels, block_out_channels, layers_per_block, groups, act_fn,
                 mid_block_add_attention) -> None:
        super().__init__()
        self.conv_in = nn.Conv2d(in_channels, block_out_channels[0], 3, padding=1)
        self.down_blocks = nn.ModuleList()
        prev = block_out_channels[0]
        for i, ch in enumerate(block_out_channels):
            self.down_blocks.append(DownEncoderBlock2D(prev, ch, layers_per_block, groups, act_fn,
                                                       add_downsample=i < len(block_out_channels) - 1))
            prev = ch
        self.mid_block = UNetMidBlock2D(prev, groups, act_fn, mid_block_add_attention)
        self.conv_norm_out = nn.GroupNorm(groups, prev, eps=1e-6)
        self.conv_act = nn.SiLU()
        self.conv_out = nn.Conv2d(prev, 2 * latent_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        x = self.mid_block(x)
        return self.conv_out(self.conv_act(self.conv_norm_out(x)))


class Decoder(nn.Module):
    """Latent (N, latent_channels, h, w) → image (N, out_channels, h·f, w·f)."""

    def __init__(self, latent_channels, out_channels, block_out_channels, layers_per_block, groups, act_fn,
                 mid_block_add_attention) -> None:
        super().__init__()
        rev = list(reversed(block_out_channels))
        self.conv_in = nn.Conv2d(latent_channels, rev[0], 3, padding=1)
        self.mid_block = UNetMidBlock2D(rev[0], groups, act_fn, mid_block_add_attention)
        self.up_blocks = nn.ModuleList()
        prev = rev[0]
        for i, ch in enumerate(rev):
            self.up_blocks.append(UpDecoderBlock2D(prev, ch, layers_per_block + 1, groups, act_fn,
                                                   add_upsample=i < len(rev) - 1))
            prev = ch
        self.conv_norm_out = nn.GroupNorm(groups, prev, eps=1e-6)
        self.conv_act = nn.SiLU()
        self.conv_out = nn.Conv2d(prev, out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(self.conv_act(self.conv_norm_out(x)))


# ---------------------------------------------------------------------------- the model

def _check_int(name, value, low=1):
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{_NAME}: {name} must be an int >= {low}, got {value!r}")


def _check_factors(name, values, channels):
    if values is None:
        return None
    values = tuple(float(v) for v in values)
    if len(values) != channels:
        raise ValueError(f"{_NAME}: {name} must have latent_channels = {channels} entries, got {len(values)}")
    return values


class AutoencoderKL(nn.Module):
    r"""The KL-regularised autoencoder of latent diffusion: diffusers' ``AutoencoderKL``
    (same constructor keys, module tree and ``state_dict``) on vae_ext's fused operators.

    Args (diffusers' config keys):
        in_channels, out_channels: image channels (3).
        down_block_types, up_block_types: 'DownEncoderBlock2D' / 'UpDecoderBlock2D' per level.
        block_out_channels: channels per level; the latent is 2^(levels−1) times smaller per side.
        layers_per_block: ResNet blocks per encoder level (the decoder has one more).
        act_fn: 'silu' (also 'swish', 'mish', 'gelu', 'relu'). latent_channels: 4 (SD), 16 (SD3, Flux).
        norm_num_groups: GroupNorm groups (every channel count must divide by it).
        sample_size: the image side the model was trained at; the default tile size of tiling.
        scaling_factor, shift_factor, latents_mean, latents_std: how raw latents map to the scaled
            latents a diffusion model works on (``scale_latents``).
        force_upcast: a float16 model runs encode and decode in float32 (SDXL's VAE overflows
            float16 activations) and returns float16.
        use_quant_conv, use_post_quant_conv: the 1×1 convs around the latent (absent in SD3/Flux).
        mid_block_add_attention: the self-attention of the mid blocks.

    ``encode`` → ``DiagonalGaussian`` posterior (its ``sample(generator)`` draws ε with
    ``torch.randn`` as diffusers does, so a seeded latent equals diffusers'); ``decode`` → image
    tensor; ``forward(x)`` → reconstruction; ``loss(x)`` → ``VAEOutput`` (ELBO with a Gaussian
    reconstruction term and KL weight ``beta``, 1e-6 as SD). Images are in [−1, 1].
    ``enable_slicing`` runs a batch one image at a time; ``enable_tiling`` runs big images in
    overlapping tiles blended linearly across the seams (diffusers' scheme), so memory is bounded
    by the tile size.
    """

    def __init__(self, in_channels: int = 3, out_channels: int = 3,
                 down_block_types: Sequence[str] = ("DownEncoderBlock2D",),
                 up_block_types: Sequence[str] = ("UpDecoderBlock2D",), block_out_channels: Sequence[int] = (64,),
                 layers_per_block: int = 1, act_fn: str = "silu", latent_channels: int = 4,
                 norm_num_groups: int = 32, sample_size: int | Sequence[int] = 32, scaling_factor: float = 0.18215,
                 shift_factor: float | None = None, latents_mean: Sequence[float] | None = None,
                 latents_std: Sequence[float] | None = None, force_upcast: bool = True, use_quant_conv: bool = True,
                 use_post_quant_conv: bool = True, mid_block_add_attention: bool = True) -> None:
        super().__init__()
        for name, v in (("in_channels", in_channels), ("out_channels", out_channels),
                        ("layers_per_block", layers_per_block), ("latent_channels", latent_channels),
                        ("norm_num_groups", norm_num_groups)):
            _check_int(name, v)
        block_out_channels = tuple(block_out_channels)
        if not block_out_channels:
            raise ValueError(f"{_NAME}: block_out_channels must not be empty")
        for ch in block_out_channels:
            _check_int("block_out_channels entries", ch)
            if ch % norm_num_groups:
                raise ValueError(f"{_NAME}: block_out_channels {block_out_channels} must all be multiples of "
                                 f"norm_num_groups={norm_num_groups}")
        for name, types, want in (("down_block_types", down_block_types, "DownEncoderBlock2D"),
                                  ("up_block_types", up_block_types, "UpDecoderBlock2D")):
            if isinstance(types, str) or len(types) != len(block_out_channels) or any(t != want for t in types):
                raise ValueError(f"{_NAME}: {name} must be {len(block_out_channels)} × {want!r} (one per entry of "
                                 f"block_out_channels), got {types!r}")
        if act_fn not in _ACTIVATIONS:
            raise ValueError(f"{_NAME}: act_fn must be one of {sorted(_ACTIVATIONS)}, got {act_fn!r}")
        if isinstance(scaling_factor, bool) or not isinstance(scaling_factor, (int, float)) or scaling_factor <= 0:
            raise ValueError(f"{_NAME}: scaling_factor must be a positive float, got {scaling_factor!r}")
        if (latents_mean is None) != (latents_std is None):
            raise ValueError(f"{_NAME}: latents_mean and latents_std come together (got only one)")
        sizes = tuple(sample_size) if isinstance(sample_size, (list, tuple)) else (sample_size,)
        for s in sizes:
            _check_int("sample_size", s)
        self.config = dict(
            in_channels=in_channels, out_channels=out_channels, down_block_types=list(down_block_types),
            up_block_types=list(up_block_types), block_out_channels=list(block_out_channels),
            layers_per_block=layers_per_block, act_fn=act_fn, latent_channels=latent_channels,
            norm_num_groups=norm_num_groups, sample_size=list(sample_size) if len(sizes) > 1 else sizes[0],
            scaling_factor=float(scaling_factor), shift_factor=None if shift_factor is None else float(shift_factor),
            latents_mean=_check_factors("latents_mean", latents_mean, latent_channels),
            latents_std=_check_factors("latents_std", latents_std, latent_channels),
            force_upcast=bool(force_upcast), use_quant_conv=bool(use_quant_conv),
            use_post_quant_conv=bool(use_post_quant_conv), mid_block_add_attention=bool(mid_block_add_attention))
        for key in ("latents_mean", "latents_std"):
            if self.config[key] is not None:
                self.config[key] = list(self.config[key])
        self.encoder = Encoder(in_channels, latent_channels, block_out_channels, layers_per_block, norm_num_groups,
                               act_fn, mid_block_add_attention)
        self.decoder = Decoder(latent_channels, out_channels, block_out_channels, layers_per_block, norm_num_groups,
                               act_fn, mid_block_add_attention)
        self.quant_conv = nn.Conv2d(2 * latent_channels, 2 * latent_channels, 1) if use_quant_conv else None
        self.post_quant_conv = nn.Conv2d(latent_channels, latent_channels, 1) if use_post_quant_conv else None
        self.downscale = 2 ** (len(block_out_channels) - 1)
        self.use_slicing = False
        self.use_tiling = False
        self.tile_sample_min_size = sizes[0]
        self.tile_latent_min_size = sizes[0] // self.downscale
        self.tile_overlap_factor = 0.25

    # ------------------------------------------------------------------ construction and weights

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "AutoencoderKL":
        """A randomly initialised model of a known family ('sd1', 'sd2', 'sdxl', 'sd3', 'flux')."""
        return cls(**{**preset_config(name), **overrides})

    @classmethod
    def from_config(cls, config: dict) -> "AutoencoderKL":
        """From a diffusers ``config.json`` dict (keys starting with '_' are metadata and ignored)."""
        from vae_ext.models.autoencoder_kl_weights import constructor_kwargs

        return cls(**constructor_kwargs(config, source="config"))

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike, *, dtype: torch.dtype | None = None,
                        variant: str | None = None) -> "AutoencoderKL":
        """A diffusers folder: ``config.json`` + ``diffusion_pytorch_model[.variant].safetensors``
        (or ``.bin``, read with ``weights_only=True``). The whole checkpoint is checked before it is
        loaded (missing, unexpected or mis-shaped keys raise ``CheckpointError`` naming the file).
        ``dtype``: cast after loading (default float32)."""
        from vae_ext.models.autoencoder_kl_weights import load_pretrained

        return load_pretrained(cls, folder, dtype=dtype, variant=variant)

    @classmethod
    def from_single_file(cls, path: str | os.PathLike, *, preset: str | None = None, config: dict | None = None,
                         dtype: torch.dtype | None = None) -> "AutoencoderKL":
        """An original-LDM-layout file (ComfyUI / A1111: ``encoder.down.0.block.0.norm1.weight``,
        attention as 1×1 convs), standalone or the ``first_stage_model.`` part of a whole SD
        checkpoint (a file already in the diffusers layout is accepted too); safetensors or a torch
        pickle (``weights_only=True``). Training-only entries of LDM files (``loss.*``, the
        discriminator and LPIPS; ``model_ema.*``) are left out. The architecture comes from
        ``preset`` (see ``PRESETS``) or a full ``config`` dict; a preset that does not fit the
        file raises ``CheckpointError``."""
        from vae_ext.models.autoencoder_kl_weights import load_single_file

        return load_single_file(cls, path, preset=preset, config=config, dtype=dtype)

    def save_pretrained(self, folder: str | os.PathLike, *, safe_serialization: bool = True) -> None:
        """Write a diffusers folder (``config.json`` + ``diffusion_pytorch_model.safetensors``) that
        both ``from_pretrained`` and diffusers' ``AutoencoderKL.from_pretrained`` read."""
        from vae_ext.models.autoencoder_kl_weights import save_pretrained

        save_pretrained(self, folder, safe_serialization=safe_serialization)

    def state_dict_ldm(self) -> dict[str, torch.Tensor]:
        """The weights in the original LDM layout (what ``from_single_file`` reads)."""
        from vae_ext.models.autoencoder_kl_weights import diffusers_to_ldm

        return diffusers_to_ldm(self.state_dict(), self.config)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    # ------------------------------------------------------------------ latents

    def _latent_stats(self, z):
        shape = (1, -1) + (1,) * (z.dim() - 2)
        mean = torch.tensor(self.config["latents_mean"], device=z.device, dtype=z.dtype).view(shape)
        std = torch.tensor(self.config["latents_std"], device=z.device, dtype=z.dtype).view(shape)
        return mean, std

    def scale_latents(self, z: torch.Tensor) -> torch.Tensor:
        """Raw latents (what ``encode`` gives) → the scaled latents a diffusion model works on:
        (z − shift)·scaling, or (z − latents_mean)·scaling / latents_std when the config has them."""
        if self.config["latents_mean"] is not None:
            mean, std = self._latent_stats(z)
            return (z - mean) * self.config["scaling_factor"] / std
        return (z - (self.config["shift_factor"] or 0.0)) * self.config["scaling_factor"]

    def unscale_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """The inverse of ``scale_latents``: what ``decode`` takes."""
        if self.config["latents_mean"] is not None:
            mean, std = self._latent_stats(latents)
            return latents * std / self.config["scaling_factor"] + mean
        return latents / self.config["scaling_factor"] + (self.config["shift_factor"] or 0.0)

    # ------------------------------------------------------------------ slicing, tiling, upcast

    def enable_slicing(self) -> None:
        """Encode and decode a batch one image at a time (peak memory of one image)."""
        self.use_slicing = True

    def disable_slicing(self) -> None:
        self.use_slicing = False

    def enable_tiling(self, tile_sample_size: int | None = None, tile_overlap_factor: float | None = None) -> None:
        """Encode/decode images larger than ``tile_sample_size`` pixels (default the config's
        sample_size) in tiles of that size, consecutive tiles overlapping by ``tile_overlap_factor``
        (default 0.25) of a tile; the overlaps are blended linearly (diffusers' ``enable_tiling``)."""
        if tile_sample_size is not None:
            _check_int("tile_sample_size", tile_sample_size, self.downscale)
            if tile_sample_size % self.downscale:
                raise ValueError(f"{_NAME}: tile_sample_size must be a multiple of {self.downscale}, "
                                 f"got {tile_sample_size}")
            self.tile_sample_min_size = tile_sample_size
            self.tile_latent_min_size = tile_sample_size // self.downscale
        if tile_overlap_factor is not None:
            if isinstance(tile_overlap_factor, bool) or not 0.0 <= float(tile_overlap_factor) < 1.0:
                raise ValueError(f"{_NAME}: tile_overlap_factor must be in [0, 1), got {tile_overlap_factor!r}")
            self.tile_overlap_factor = float(tile_overlap_factor)
        self.use_tiling = True

    def disable_tiling(self) -> None:
        self.use_tiling = False

    @contextlib.contextmanager
    def _upcast(self, x: torch.Tensor):
        """force_upcast: a float16 model computes in float32 (the weights are cast for the call and
        cast back, which is exact), the result is float16 again."""
        if not (self.config["force_upcast"] and self.dtype == torch.float16):
            yield x, (lambda t: t)
            return
        self.float()
        try:
            yield x.float(), (lambda t: t.to(torch.float16))
        finally:
            self.half()

    def _check_input(self, name, x, channels):
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            raise TypeError(f"{_NAME}: {name} must be a floating tensor, got "
                            f"{getattr(x, 'dtype', type(x).__name__)}")
        if x.dim() != 4 or x.shape[1] != channels:
            raise ValueError(f"{_NAME}: {name} must have shape (N, {channels}, H, W), got {tuple(x.shape)}")
        if x.shape[0] == 0 or x.shape[2] == 0 or x.shape[3] == 0:
            raise ValueError(f"{_NAME}: {name} is empty (shape {tuple(x.shape)})")
        if x.device != self.device:
            raise ValueError(f"{_NAME}: {name} is on {x.device}, the model on {self.device}")
        if x.dtype != self.dtype:
            raise TypeError(f"{_NAME}: {name} has dtype {x.dtype}, the model {self.dtype} (cast it with "
                            f"{name}.to(model.dtype))")

    @staticmethod
    def _blend_v(a, b, extent):
        extent = min(a.shape[2], b.shape[2], extent)
        w = torch.arange(extent, device=b.device, dtype=b.dtype).view(1, 1, -1, 1) / max(extent, 1)
        b[:, :, :extent] = a[:, :, a.shape[2] - extent:] * (1 - w) + b[:, :, :extent] * w
        return b

    @staticmethod
    def _blend_h(a, b, extent):
        extent = min(a.shape[3], b.shape[3], extent)
        w = torch.arange(extent, device=b.device, dtype=b.dtype).view(1, 1, 1, -1) / max(extent, 1)
        b[:, :, :, :extent] = a[:, :, :, a.shape[3] - extent:] * (1 - w) + b[:, :, :, :extent] * w
        return b

    def _tiled(self, x, fn, tile_in, tile_out):
        """Run fn on overlapping tiles of x (tile side tile_in, stride tile_in·(1 − overlap)) and blend
        the outputs (tile side tile_out) over tile_out·overlap rows/columns, as diffusers."""
        stride = max(1, int(tile_in * (1 - self.tile_overlap_factor)))
        extent = int(tile_out * self.tile_overlap_factor)
        limit = tile_out - extent
        rows = [[fn(x[:, :, i:i + tile_in, j:j + tile_in]) for j in range(0, x.shape[3], stride)]
                for i in range(0, x.shape[2], stride)]
        out_rows = []
        for i, row in enumerate(rows):
            out_row = []
            for j, tile in enumerate(row):
                if i > 0:
                    tile = self._blend_v(rows[i - 1][j], tile, extent)
                if j > 0:
                    tile = self._blend_h(row[j - 1], tile, extent)
                out_row.append(tile[:, :, :limit, :limit])
            out_rows.append(torch.cat(out_row, dim=3))
        return torch.cat(out_rows, dim=2)

    # ------------------------------------------------------------------ encode / decode

    def _encode_moments(self, x):
        if self.use_tiling and max(x.shape[-2:]) > self.tile_sample_min_size:
            return self._tiled(x, self._encode_moments_plain, self.tile_sample_min_size, self.tile_latent_min_size)
        return self._encode_moments_plain(x)

    def _encode_moments_plain(self, x):
        h = self.encoder(x)
        return self.quant_conv(h) if self.quant_conv is not None else h

    def _decode_plain(self, z):
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z)

    def _decode_one(self, z):
        if self.use_tiling and max(z.shape[-2:]) > self.tile_latent_min_size:
            return self._tiled(z, self._decode_plain, self.tile_latent_min_size, self.tile_sample_min_size)
        return self._decode_plain(z)

    def encode(self, x: torch.Tensor) -> DiagonalGaussian:
        """Images (N, in_channels, H, W) in [−1, 1] → the posterior q(z|x) over (N, latent_channels,
        H/f, W/f), f = 2^(levels−1). ``.mode()`` is the mean; ``.sample(generator)`` draws ε with
        ``torch.randn`` on the generator's device (diffusers' stream: the same latent as diffusers for
        the same seed) and forms mean + std·ε with ``vae_ext.reparameterize``; ``.kl()`` is the fused KL."""
        self._check_input("x", x, self.config["in_channels"])
        with self._upcast(x) as (xc, back):
            if self.use_slicing and xc.shape[0] > 1:
                moments = torch.cat([self._encode_moments(s) for s in xc.split(1)])
            else:
                moments = self._encode_moments(xc)
            moments = back(moments)
        return DiagonalGaussian(moments, rng="torch")

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Raw latents (N, latent_channels, h, w) → images (N, out_channels, h·f, w·f) (call
        ``unscale_latents`` first on a diffusion model's latents)."""
        self._check_input("z", z, self.config["latent_channels"])
        with self._upcast(z) as (zc, back):
            if self.use_slicing and zc.shape[0] > 1:
                out = torch.cat([self._decode_one(s) for s in zc.split(1)])
            else:
                out = self._decode_one(zc)
            return back(out)

    def forward(self, x: torch.Tensor, sample_posterior: bool = False,
                generator: torch.Generator | None = None) -> torch.Tensor:
        """Reconstruction decode(z), z the posterior mean (or a sample with ``sample_posterior``)."""
        posterior = self.encode(x)
        z = posterior.sample(generator) if sample_posterior else posterior.mode()
        return self.decode(z)

    def loss(self, x: torch.Tensor, beta: float = 1e-6, generator: torch.Generator | None = None) -> VAEOutput:
        """The training objective of the VAE part of SD: −ELBO per image, batch mean, with a Gaussian
        reconstruction term (sum of squared errors) and KL weight ``beta`` (SD: 1e-6; the perceptual
        and adversarial terms of SD's training are not part of it). z is a reparameterized sample;
        the loss runs on ``vae_ext.elbo_loss``."""
        posterior = self.encode(x)
        z = posterior.sample(generator)
        x_hat = self.decode(z)
        out = vae_ext.elbo_loss(x_hat, x, posterior.mean, posterior.logvar, likelihood="gaussian", beta=beta)
        return VAEOutput(out.loss, out.recon, out.kl, x_hat, posterior.mean, posterior.logvar, z)

    def extra_repr(self) -> str:
        c = self.config
        return (f"latent_channels={c['latent_channels']}, block_out_channels={tuple(c['block_out_channels'])}, "
                f"scaling_factor={c['scaling_factor']}")

