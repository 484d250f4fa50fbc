"""vae_ext.backend_info(): what was built, and which path each op takes here."""

from __future__ import annotations

import torch

from vae_ext import _backend
from vae_ext.ops import attention as _attention
from vae_ext.ops import elbo as _elbo
from vae_ext.ops.reparameterize import supports as _reparameterize_supports


def _devices() -> list[torch.device]:
    devices = [torch.device("cpu")]
    if torch.cuda.is_available():
        devices.append(torch.device("cuda"))
    return devices


def backend_info() -> dict:
    """A dict describing the build and the backend each op uses on this machine.

    Keys: version, torch, cuda (torch's CUDA version or None), gpu, mode,
    extension_loaded, load_error, build ({'cuda', 'cuda_archs', 'cpu_capabilities', 'cpu_capability', 'openmp', ...}),
    ops ({op: {device: {'backend': 'extension'|'reference', 'reason': str}}}).
    """
    from vae_ext import __version__

    checks = {
        "masked_attention": lambda d: _attention.supports(d, torch.float32 if d.type == "cpu" else torch.bfloat16, 64),
        "reparameterize": lambda d: _reparameterize_supports(d, torch.float32),
        "elbo_loss": lambda d: _elbo.supports(d, torch.float32),
    }
    ops = {}
    for name, check in checks.items():
        ops[name] = {}
        for device in _devices():
            ok, reason = check(device)
            mode = _backend.mode()
            if mode == "reference":
                backend, reason = "reference", "VAE_EXT_BACKEND / use_backend chose 'reference'"
            else:
                backend = "extension" if ok else "reference"
            ops[name][device.type] = {"backend": backend, "reason": reason}
    return {
        "version": __version__,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "mode": _backend.mode(),
        "extension_loaded": _backend.extension_loaded(),
        "load_error": _backend.load_error(),
        "build": _backend.build_info(),
        "ops": ops,
    }
