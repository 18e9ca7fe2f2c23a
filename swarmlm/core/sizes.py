"""Sizes in bytes as users write them (`--max-memory 8GiB`, `--kv-budget 800MB`) and as swarmlm prints them,
and the numbers of the memory rules that `model/memory.py` applies: here, so that the settings' help can
state them without importing PyTorch."""

from __future__ import annotations

import re

KV_RESERVE_TOKENS = 8192  # the KV a span reserves beyond its weights: this many tokens through each layer
KV_DEFAULT_MAX = 8 << 30  # a KV budget taken from what the weights leave stops here
# The default memory budget is the memory free at start less a headroom for what is neither weights nor
# KV: activations, the runtime, loading (a span's checkpoint values are held once more while they are cast
# or quantized), other programs.
HEADROOM_FRACTION = 0.1
HEADROOM_MIN = 512 << 20
MAX_MEMORY_HELP = (
    "Memory for weights and KV cache, e.g. 8GiB or 1.5GB "
    "(default: free RAM, or free GPU memory on CUDA, less 10% and at least 512 MiB)"
)

# Decimal units as disk and RAM vendors use them, binary ones as `free -h` does; both are common in flags.
_UNITS = {
    "": 1,
    "b": 1,
    "kb": 1000,
    "mb": 1000**2,
    "gb": 1000**3,
    "tb": 1000**4,
    "kib": 1 << 10,
    "mib": 1 << 20,
    "gib": 1 << 30,
    "tib": 1 << 40,
}
_SIZE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*")


def parse_size(text: str) -> int:
    """'2GiB', '1.5GB', '800MB', '123456' (bytes) -> bytes. Raises ValueError with a message for the user."""
    m = _SIZE.fullmatch(text)
    unit = _UNITS.get(m.group(2).lower()) if m else None
    if m is None or unit is None:
        raise ValueError("not a size: give e.g. 8GiB, 1.5GB, 800MB or 123456 (bytes)")
    size = int(float(m.group(1)) * unit)
    if size <= 0:
        raise ValueError("a size must be positive")
    return size


def format_size(size: int) -> str:
    """Bytes in decimal units with one decimal: 6_900_000_000 -> '6.9 GB', 14_160_384 -> '14.2 MB'."""
    for unit, scale in (("TB", 1000**4), ("GB", 1000**3), ("MB", 1000**2), ("KB", 1000)):
        if abs(size) >= scale:
            return f"{size / scale:.1f} {unit}"
    return f"{size} B"
