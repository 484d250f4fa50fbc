"""Checkpoints of AutoencoderKL: diffusers folders, original-LDM single files, and the key map between them.

The key map is one table (``key_table(config)``): rows (diffusers key, LDM key, reshape), one per
tensor of the model, built from the architecture; ``ldm_to_diffusers`` and ``diffusers_to_ldm``
both read it, so the two directions cannot drift apart. ``reshape`` marks the mid-block attention
projections, Linear (C, C) weights in diffusers and 1×1 Conv (C, C, 1, 1) weights in LDM.

Every loader checks the whole state dict against the model before loading anything: missing,
unexpected or mis-shaped keys raise ``CheckpointError`` naming the file and the keys.
"""

from __future__ import annotations

import json
import os
import warnings

import torch

_NAME = "AutoencoderKL"
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "diffusion_pytorch_model"
SD_PREFIX = "first_stage_model."  # the VAE inside a whole SD checkpoint (LDM layout)
_IGNORED_LDM_PREFIXES = ("loss.", "model_ema.")  # training-only parts some LDM VAE files carry
_CONFIG_KEYS = ("in_channels", "out_channels", "down_block_types", "up_block_types", "block_out_channels",
                "layers_per_block", "act_fn", "latent_channels", "norm_num_groups", "sample_size", "scaling_factor",
                "shift_factor", "latents_mean", "latents_std", "force_upcast", "use_quant_conv", "use_post_quant_conv",
                "mid_block_add_attention")


class CheckpointError(ValueError):
    """A checkpoint that does not fit the model (or is not a checkpoint); names the file and keys."""


# ---------------------------------------------------------------------------- the one key table

def _resnet_rows(d, l, has_shortcut):
    rows = [(f"{d}.{p}.{s}", f"{l}.{p}.{s}", False) for p in ("norm1", "conv1", "norm2", "conv2")
            for s in ("weight", "bias")]
    if has_shortcut:
        rows += [(f"{d}.conv_shortcut.{s}", f"{l}.nin_shortcut.{s}", False) for s in ("weight", "bias")]
    return rows


def _mid_rows(d, l, channels, attention):
    rows = _resnet_rows(f"{d}.resnets.0", f"{l}.block_1", False)
    if attention:
        a, b = f"{d}.attentions.0", f"{l}.attn_1"
        for dk, lk, reshape in (("group_norm", "norm", False), ("to_q", "q", True), ("to_k", "k", True),
                                ("to_v", "v", True), ("to_out.0", "proj_out", True)):
            rows += [(f"{a}.{dk}.weight", f"{b}.{lk}.weight", reshape), (f"{a}.{dk}.bias", f"{b}.{lk}.bias", False)]
    return rows + _resnet_rows(f"{d}.resnets.1", f"{l}.block_2", False)


def key_table(config: dict) -> list[tuple[str, str, bool]]:
    """(diffusers key, LDM key, reshape) for every tensor of an AutoencoderKL with this config.

    LDM names: ``{encoder,decoder}.{conv_in,conv_out,norm_out}``, ``encoder.down.{i}.block.{j}``
    (``nin_shortcut``), ``encoder.down.{i}.downsample.conv``, ``{..}.mid.{block_1,attn_1,block_2}``
    (attention ``norm, q, k, v, proj_out``), ``decoder.up.{L−1−i}.block.{j}`` (decoder levels are
    numbered from the bottom in LDM, from the top in diffusers), ``decoder.up.{..}.upsample.conv``,
    ``quant_conv``, ``post_quant_conv``."""
    ch = list(config["block_out_channels"])
    levels, layers = len(ch), config["layers_per_block"]
    attention = config.get("mid_block_add_attention", True)
    wb = ("weight", "bias")
    rows = [(f"encoder.conv_in.{s}", f"encoder.conv_in.{s}", False) for s in wb]
    prev = ch[0]
    for i, c in enumerate(ch):
        for j in range(layers):
            rows += _resnet_rows(f"encoder.down_blocks.{i}.resnets.{j}", f"encoder.down.{i}.block.{j}",
                                 (prev if j == 0 else c) != c)
        if i < levels - 1:
            rows += [(f"encoder.down_blocks.{i}.downsamplers.0.conv.{s}", f"encoder.down.{i}.downsample.conv.{s}",
                      False) for s in wb]
        prev = c
    rows += _mid_rows("encoder.mid_block", "encoder.mid", ch[-1], attention)
    rows += [(f"encoder.conv_norm_out.{s}", f"encoder.norm_out.{s}", False) for s in wb]
    rows += [(f"encoder.conv_out.{s}", f"encoder.conv_out.{s}", False) for s in wb]

    rows += [(f"decoder.conv_in.{s}", f"decoder.conv_in.{s}", False) for s in wb]
    rows += _mid_rows("decoder.mid_block", "decoder.mid", ch[-1], attention)
    rev = list(reversed(ch))
    prev = rev[0]
    for i, c in enumerate(rev):
        up = levels - 1 - i
        for j in range(layers + 1):
            rows += _resnet_rows(f"decoder.up_blocks.{i}.resnets.{j}", f"decoder.up.{up}.block.{j}",
                                 (prev if j == 0 else c) != c)
        if i < levels - 1:
            rows += [(f"decoder.up_blocks.{i}.upsamplers.0.conv.{s}", f"decoder.up.{up}.upsample.conv.{s}", False)
                     for s in wb]
        prev = c
    rows += [(f"decoder.conv_norm_out.{s}", f"decoder.norm_out.{s}", False) for s in wb]
    rows += [(f"decoder.conv_out.{s}", f"decoder.conv_out.{s}", False) for s in wb]
    if config.get("use_quant_conv", True):
        rows += [(f"quant_conv.{s}", f"quant_conv.{s}", False) for s in wb]
    if config.get("use_post_quant_conv", True):
        rows += [(f"post_quant_conv.{s}", f"post_quant_conv.{s}", False) for s in wb]
    return rows


def _convert(state_dict, config, to_diffusers: bool):
    """Map every key of the table from one layout to the other; report what does not fit."""
    out, used = {}, set()
    missing = []
    for dk, lk, reshape in key_table(config):
        src, dst = (lk, dk) if to_diffusers else (dk, lk)
        if src not in state_dict:
            missing.append(src)
            continue
        t = state_dict[src]
        used.add(src)
        if reshape:
            t = t.reshape(t.shape[0], t.shape[1]) if to_diffusers and t.dim() == 4 else \
                (t.reshape(*t.shape, 1, 1) if not to_diffusers and t.dim() == 2 else t)
        out[dst] = t
    unexpected = [k for k in state_dict if k not in used]
    return out, missing, unexpected


def ldm_to_diffusers(state_dict: dict, config: dict) -> dict:
    """An LDM-layout VAE state dict → diffusers' keys (raises CheckpointError when keys do not fit)."""
    out, missing, unexpected = _convert(state_dict, config, True)
    _raise_if("state dict", missing, unexpected, [])
    return out


def diffusers_to_ldm(state_dict: dict, config: dict) -> dict:
    """A diffusers-layout AutoencoderKL state dict → LDM keys (attention projections as 1×1 convs)."""
    out, missing, unexpected = _convert(state_dict, config, False)
    _raise_if("state dict", missing, unexpected, [])
    return out


# ---------------------------------------------------------------------------- files

def _listing(keys, limit=8):
    keys = sorted(keys)
    more = f" ... and {len(keys) - limit} more" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def _raise_if(where, missing, unexpected, misshaped, hint=""):
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing key(s): {_listing(missing)}")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected key(s): {_listing(unexpected)}")
    if misshaped:
        parts.append(f"{len(misshaped)} mis-shaped key(s): {_listing(misshaped)}")
    if parts:
        raise CheckpointError(f"{_NAME}: {where} does not fit the model: " + "; ".join(parts) + hint)


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Tensors of a .safetensors file, or of a torch pickle (loaded with ``weights_only=True``;
    a ``{"state_dict": ...}`` wrapper, as in LDM .ckpt files, is unwrapped)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"{_NAME}: {path}: no such file")
    with open(path, "rb") as f:
        head = f.read(9)
    # safetensors: an 8-byte little-endian header length, then the JSON header
    size = os.path.getsize(path)
    if len(head) == 9 and head[8:9] == b"{" and 0 < int.from_bytes(head[:8], "little") < size:
        try:
            from safetensors.torch import load_file
        except ImportError as exc:
            raise CheckpointError(f"{_NAME}: {path} is a safetensors file; install safetensors "
                                  f"(pip install safetensors) to read it") from exc
        try:
            sd = load_file(path)
        except Exception as exc:
            raise CheckpointError(f"{_NAME}: {path} is not a readable safetensors file ({exc})") from exc
    else:
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise CheckpointError(f"{_NAME}: {path} is neither a safetensors file nor a torch checkpoint "
                                  f"loadable with weights_only=True ({type(exc).__name__}: "
                                  f"{str(exc).splitlines()[0][:200]})") from exc
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict) or not sd or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                      for k, v in sd.items()):
        raise CheckpointError(f"{_NAME}: {path} does not hold a state dict (a mapping of names to tensors)")
    return sd


def constructor_kwargs(config: dict, source: str) -> dict:
    """The AutoencoderKL keywords of a diffusers config dict; '_' keys are metadata, unknown keys are
    left out with a warning."""
    if not isinstance(config, dict):
        raise CheckpointError(f"{_NAME}: {source} must hold a JSON object, got {type(config).__name__}")
    unknown = [k for k in config if not k.startswith("_") and k not in _CONFIG_KEYS]
    if unknown:
        warnings.warn(f"{_NAME}: {source}: ignoring unknown config keys {unknown}", stacklevel=3)
    return {k: v for k, v in config.items() if k in _CONFIG_KEYS}


def _check_against(model, sd, where, hint=""):
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    misshaped = [f"{k} (file {tuple(sd[k].shape)}, model {tuple(own[k].shape)})" for k in own
                 if k in sd and tuple(sd[k].shape) != tuple(own[k].shape)]
    _raise_if(where, missing, unexpected, misshaped, hint)
    bad_dtype = [k for k, t in sd.items() if not t.is_floating_point()]
    if bad_dtype:
        raise CheckpointError(f"{_NAME}: {where}: non-floating tensors {_listing(bad_dtype)}")


def _empty(cls, config, where):
    """The model with its tensors on the meta device: no time spent on an init the weights replace."""
    try:
        with torch.device("meta"):
            return cls(**config)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{_NAME}: {where}: {exc}") from exc


def _finish(model, sd, dtype):
    """Load the (already checked) state dict into the meta-device model, in float32 or ``dtype``."""
    model.load_state_dict(sd, strict=True, assign=True)
    return model.to(torch.float32 if dtype is None else dtype).eval()


def load_pretrained(cls, folder, *, dtype=None, variant=None):
    folder = os.fspath(folder)
    cfg_path = os.path.join(folder, CONFIG_NAME)
    if not os.path.isdir(folder):
        raise CheckpointError(f"{_NAME}.from_pretrained: {folder} is not a folder (for a single checkpoint "
                              f"file use from_single_file)")
    try:
        with open(cfg_path) as f:
            config = json.load(f)
    except FileNotFoundError:
        raise CheckpointError(f"{_NAME}.from_pretrained: {folder} has no {CONFIG_NAME}") from None
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{_NAME}.from_pretrained: {cfg_path} is not valid JSON ({exc})") from exc
    stem = WEIGHTS_NAME + (f".{variant}" if variant else "")
    for ext in (".safetensors", ".bin"):
        weights = os.path.join(folder, stem + ext)
        if os.path.isfile(weights):
            break
    else:
        raise CheckpointError(f"{_NAME}.from_pretrained: {folder} has neither {stem}.safetensors nor {stem}.bin")
    model = _empty(cls, constructor_kwargs(config, cfg_path), cfg_path)
    sd = read_state_dict(weights)
    _check_against(model, sd, weights)
    return _finish(model, sd, dtype)


def load_single_file(cls, path, *, preset=None, config=None, dtype=None):
    from vae_ext.models.autoencoder_kl import PRESETS, preset_config

    path = os.fspath(path)
    if (preset is None) == (config is None):
        raise ValueError(f"{_NAME}.from_single_file: pass preset (one of {sorted(PRESETS)}) or config, exactly one")
    cfg = preset_config(preset) if preset is not None else constructor_kwargs(config, "config")
    model = _empty(cls, cfg, "config")
    sd = read_state_dict(path)
    if any(k.startswith(SD_PREFIX) for k in sd):  # a whole SD checkpoint: take its VAE
        sd = {k[len(SD_PREFIX):]: v for k, v in sd.items() if k.startswith(SD_PREFIX)}
    hint = (f" (is preset={preset!r} the right family? presets: {sorted(PRESETS)})" if preset is not None else "")
    if any(".down_blocks." in k or ".up_blocks." in k for k in sd):  # already diffusers' layout
        _check_against(model, sd, path, hint)
        return _finish(model, sd, dtype)
    sd = {k: v for k, v in sd.items() if not k.startswith(_IGNORED_LDM_PREFIXES)}
    out, missing, unexpected = _convert(sd, model.config, True)
    own = model.state_dict()
    ldm_of = {d: l for d, l, _ in key_table(model.config)}
    misshaped = [f"{ldm_of[k]} (file {tuple(t.shape)}, model {tuple(own[k].shape)})" for k, t in out.items()
                 if t.numel() != own[k].numel() or t.dim() != own[k].dim()]
    _raise_if(path, missing, unexpected, misshaped, hint)
    _check_against(model, out, path, hint)
    return _finish(model, out, dtype)


def save_pretrained(model, folder, *, safe_serialization=True):
    folder = os.fspath(folder)
    os.makedirs(folder, exist_ok=True)
    config = {"_class_name": "AutoencoderKL", **model.config}
    with open(os.path.join(folder, CONFIG_NAME), "w") as f:
        json.dump(config, f, indent=2)
    sd = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    if safe_serialization:
        from safetensors.torch import save_file

        save_file(sd, os.path.join(folder, WEIGHTS_NAME + ".safetensors"))
    else:
        torch.save(sd, os.path.join(folder, WEIGHTS_NAME + ".bin"))
