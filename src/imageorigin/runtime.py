"""Process-wide settings: the device models run on, and a faster CPU allocator.

PyTorch's CPU forward pass allocates and frees tens of MB per layer.  glibc
serves blocks that large with mmap and hands them back to the kernel at once,
so every layer of every batch page-faults its memory in again: measured here,
500k minor faults per MobileNetV2 batch of 32 and half the CPU time spent in
the kernel.  Keeping those blocks on the heap (no mmap below 1 GiB, no trim
below 1 GiB free) makes the same forward pass 2-3x faster for a few hundred MB
more resident memory.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import platform
from pathlib import Path

import torch

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_ONE_GIB = 1 << 30
_WORKER_THRESHOLD = 4 << 20


@functools.cache
def tune_allocator() -> bool:
    """Keep large freed blocks on the heap (glibc only).  Returns whether it applied."""
    return _mallopt(_ONE_GIB)


def untune_allocator(*_) -> bool:
    """Smaller thresholds for decoding worker processes (forked from a tuned one).

    Workers allocate images of every size and hand each batch over; with 1 GiB
    thresholds their heaps grow with every image (measured: +700 MB each over
    6,000 images), with glibc's default 128 KiB they page-fault every image
    buffer in (augmenting 25% slower).  4 MiB keeps them flat at 20-70 MB
    and as fast as 1 GiB.
    """
    return _mallopt(_WORKER_THRESHOLD)


def _mallopt(threshold: int) -> bool:
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, threshold)) and bool(
            libc.mallopt(_M_TRIM_THRESHOLD, threshold)
        )
    except (OSError, AttributeError):
        return False


def device() -> torch.device:
    """Where models run: ``IMAGEORIGIN_DEVICE`` if set, else CUDA when present, else the CPU."""
    name = os.environ.get("IMAGEORIGIN_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def cache_dir() -> Path:
    """Where converted models and cached features live: ``IMAGEORIGIN_CACHE``, else
    ``$XDG_CACHE_HOME/imageorigin`` (``~/.cache/imageorigin``)."""
    if os.environ.get("IMAGEORIGIN_CACHE"):
        return Path(os.environ["IMAGEORIGIN_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "imageorigin"
