"""The bridge to torch, for the paths that compute with it (a GPU, TIES, GCWM, FeatCal, indexing):
raw block bytes to and from tensors. Modules that merge on the CPU with numpy never import this,
so they start without torch."""

from __future__ import annotations

import contextlib
from typing import Iterator

import numpy as np
import torch

from .checkpoint import DTYPES


def torch_dtype(dtype: str) -> torch.dtype:
    """The torch dtype of a safetensors dtype name."""
    return getattr(torch, DTYPES[dtype][0])


def raw_view(raw: np.ndarray, dtype: str, shape, dev: torch.device) -> torch.Tensor:
    """Bytes of one block as a tensor of its stored dtype on the device (moved there before any
    conversion, so a GPU receives 2-byte bf16, not float32)."""
    t = torch.from_numpy(raw).view(torch_dtype(dtype)).reshape(shape)
    return t.to(dev) if dev.type != "cpu" else t


def to_bytes(t: torch.Tensor) -> np.ndarray:
    """A tensor's bytes, on the CPU, as a flat uint8 array."""
    t = t.contiguous().cpu().reshape(-1)
    return t.view(torch.uint8).numpy() if t.numel() else np.zeros(0, np.uint8)


def all_finite(t: torch.Tensor) -> bool:
    """Whether every entry is finite: one float pass (a sum) in the usual case, an exact check only
    when the sum is not finite (which a sum of large finite entries can also be)."""
    return bool(torch.isfinite(torch.sum(t, dtype=torch.float32))) or bool(torch.isfinite(t).all())


@contextlib.contextmanager
def single_threaded_torch() -> Iterator[None]:
    """Streaming runs its own threads (read-ahead, compute, writer), each doing whole blocks; torch's
    intra-op threads on top would wait on a busy core at every operation (measured 3x slower on 2
    cores), so torch runs each operation on the thread that calls it."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)
