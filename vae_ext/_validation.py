"""Input checks shared by the public ops. Each raises TypeError or ValueError
with a message that names the argument and says what was expected."""

from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def check_tensor(op: str, name: str, x) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(x).__name__}")


def check_float(op: str, name: str, x: torch.Tensor) -> None:
    check_tensor(op, name, x)
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{op}: {name} must be float32, float64, bfloat16 or float16, got {x.dtype}")


def check_same_device(op: str, tensors: dict) -> None:
    """All tensors of `tensors` (name -> tensor or None) on one device; a value that is
    not a tensor is a TypeError naming it (checked first: a list has no .device)."""
    first = None
    same = True
    for name, t in tensors.items():
        if t is None:
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a torch.Tensor or None, got {type(t).__name__}")
        if first is None:
            first = t.device
        elif t.device != first:
            same = False
    if not same:
        listed = ", ".join(f"{n} on {t.device}" for n, t in tensors.items() if t is not None)
        raise ValueError(f"{op}: all tensors must be on one device, got {listed}")


def check_generator(op: str, generator, device: torch.device) -> None:
    if generator is None:
        return
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"{op}: generator must be a torch.Generator, got {type(generator).__name__}")
    if generator.device.type != device.type:
        raise ValueError(f"{op}: generator is for {generator.device.type} but the inputs are on {device}")


def check_seed(op: str, seed) -> None:
    if seed is None:
        return
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"{op}: seed must be an int or None, got {type(seed).__name__}")
    if not -(2**63) <= seed < 2**64:
        raise ValueError(f"{op}: seed must fit in 64 bits, got {seed}")


def is_number(x) -> bool:
    """An int or float (not a bool), or a symbolic one (torch.compile with dynamic=True)."""
    return not isinstance(x, bool) and isinstance(x, (int, float, torch.SymInt, torch.SymFloat))


def is_concrete(x) -> bool:
    """A plain Python number whose value can be checked now: not while torch.compile traces,
    where a float argument may be symbolic (dynamic=True) and math.isfinite cannot take it."""
    return isinstance(x, (int, float)) and not torch.compiler.is_compiling()


def as_float(x) -> float:
    """float(x), also while torch.compile traces (a symbolic float is then specialised: the op
    schemas take a plain float, and inductor cannot pass a symbolic one to a custom op)."""
    return float(x)


def seed_to_int64(seed: int) -> int:
    """Map a seed in [-2**63, 2**64) to the int64 the op schema carries (same 64 bits)."""
    return seed - 2**64 if seed >= 2**63 else seed


def broadcast_shape(*shapes):
    """The broadcast of `shapes` as a torch.Size, or None if they do not broadcast.

    The rule of torch.broadcast_shapes, without its per-call overhead (~10x faster for the
    small tuples of op validation, which runs on every call).
    """
    first = shapes[0]
    if all(s == first for s in shapes[1:]):
        return torch.Size(first)
    ndim = max(len(s) for s in shapes)
    out = [1] * ndim
    for s in shapes:
        offset = ndim - len(s)
        for i, size in enumerate(s):
            current = out[offset + i]
            if current == 1:
                out[offset + i] = size
            elif size != 1 and size != current:
                return None
    return torch.Size(out)
