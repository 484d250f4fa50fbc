"""Which path runs an op: the compiled extension (torch.ops.vae_ext.*) or the
pure-PyTorch reference (vae_ext.reference).

Mode, from the environment variable VAE_EXT_BACKEND (the process default) or
`use_backend(...)` (for the calling thread only: other threads keep theirs):
  auto       the extension when it loaded and supports the input, else the reference (default)
  extension  the extension; an input it cannot handle raises an error saying why
  reference  always the reference
"""

from __future__ import annotations

import contextlib
import functools
import os
import threading
import warnings

import torch

MODES = ("auto", "extension", "reference")

_C = None
_load_error: str | None = None
try:
    from vae_ext import _C  # noqa: F401  (registers torch.ops.vae_ext.*)
except Exception as exc:  # the extension is missing or does not load: reference ops run
    _C = None
    _load_error = f"{type(exc).__name__}: {exc}"

_BUILD = dict(_C.build_info()) if _C is not None else {}


def _mode_from_env() -> str:
    mode = os.environ.get("VAE_EXT_BACKEND", "auto").strip().lower() or "auto"
    if mode not in MODES:
        warnings.warn(f"VAE_EXT_BACKEND={mode!r} is not one of {MODES}; using 'auto'", stacklevel=2)
        mode = "auto"
    return mode


_default_mode = _mode_from_env()  # the process default, for every thread without a use_backend block
_local = threading.local()  # .mode: this thread's use_backend override, if any
# How many use_backend blocks are open in any thread: while none is, mode() is the process default
# without the thread-local lookup (a missing attribute of a threading.local costs ~0.3 µs per call).
_open_blocks = 0
_open_blocks_lock = threading.Lock()
_warned_missing = False


def mode() -> str:
    """The backend mode now in force in the calling thread: 'auto', 'extension' or 'reference'."""
    if not _open_blocks:
        return _default_mode
    return getattr(_local, "mode", _default_mode)


@contextlib.contextmanager
def use_backend(name: str):
    """Run the code in the block with backend mode `name` ('auto', 'extension' or 'reference').

    The mode is per thread: a block in one thread does not change which path other
    threads run (they keep their own block's mode, or VAE_EXT_BACKEND's default).
    """
    if name not in MODES:
        raise ValueError(f"use_backend: name must be one of {MODES}, got {name!r}")
    global _open_blocks
    had, previous = hasattr(_local, "mode"), getattr(_local, "mode", None)
    _local.mode = name
    with _open_blocks_lock:
        _open_blocks += 1
    try:
        yield
    finally:
        if had:
            _local.mode = previous
        else:
            del _local.mode
        with _open_blocks_lock:
            _open_blocks -= 1


def extension_loaded() -> bool:
    return _C is not None


def load_error() -> str | None:
    return _load_error


def build_info() -> dict:
    """What the compiled extension contains: {'cuda': bool, 'cuda_archs': str, 'cpu_capabilities': str (built,
    lowest first), 'cpu_capability': str (the one the CPU kernels run with), ...}."""
    return dict(_C.build_info()) if _C is not None else {}


@functools.lru_cache(maxsize=64)
def device_supported(device: torch.device) -> tuple[bool, str]:
    """Whether the extension has kernels for `device`, and why not (cached: it depends on the build only)."""
    if _C is None:
        return False, f"the compiled extension did not load ({_load_error})"
    if device.type == "cpu":
        return True, "compiled CPU kernels"
    if device.type == "cuda":
        if _BUILD.get("cuda"):
            return True, f"compiled CUDA kernels (archs {_BUILD.get('cuda_archs')})"
        return False, "the extension was built without CUDA"
    return False, f"no kernels for device type {device.type!r}"


def _warn_missing_once() -> None:
    global _warned_missing
    if not _warned_missing and _load_error is not None:
        _warned_missing = True
        warnings.warn(f"vae_ext: the compiled extension is not available, reference ops run instead ({_load_error})",
                      RuntimeWarning, stacklevel=4)


def use_extension(op: str, supported: bool, reason: str = "") -> bool:
    """Decide the path for one call of `op`.

    `supported`: whether the extension can handle this input (device, dtype,
    options); `reason`: why not. Returns True to run the extension.
    """
    current = mode()
    if current == "reference":
        return False
    if _C is None:
        if current == "extension":
            raise RuntimeError(f"vae_ext.{op}: backend 'extension' was requested but the compiled extension "
                               f"did not load ({_load_error})")
        if not torch.compiler.is_compiling():
            _warn_missing_once()
        return False
    if supported:
        return True
    if current == "extension":
        raise RuntimeError(f"vae_ext.{op}: backend 'extension' was requested but the extension does not "
                           f"support this input: {reason}")
    return False
