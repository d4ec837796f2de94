"""Tensor-by-tensor comparison of two checkpoints with the same names, streamed (never two whole
models in memory): Frobenius deviation, and counts of differing elements for agreement checks."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from .checkpoint import open_model


@dataclass
class Comparison:
    elements: int = 0
    differing: int = 0
    max_ulp: int = 0  # in the stored dtype, for same-dtype outputs
    sq_dev: float = 0.0  # sum of squared differences (float64)
    sq_ref_delta: float = 0.0  # sum of squares of (b - base), when a base is given

    @property
    def frobenius(self) -> float:
        return self.sq_dev ** 0.5

    @property
    def relative(self) -> float:
        return (self.sq_dev / self.sq_ref_delta) ** 0.5 if self.sq_ref_delta else 0.0


def _ordered_int(t: torch.Tensor) -> torch.Tensor:
    """Map floats to integers whose difference counts ulps (sign-magnitude to two's complement)."""
    bits = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32}[t.dtype]
    i = t.contiguous().view(bits).to(torch.int64)
    top = torch.iinfo(bits).min
    return torch.where(i < 0, top - i, i)


def compare(a: str | Path, b: str | Path, base: str | Path | None = None) -> Comparison:
    """Compare checkpoint a against reference b (deviation ||a - b||, relative to ||b - base||)."""
    ma, mb = open_model(a), open_model(b)
    mbase = open_model(base) if base else None
    c = Comparison()
    handles: dict[Path, object] = {}

    def get(info):
        h = handles.get(info.file)
        if h is None:
            h = handles[info.file] = safe_open(str(info.file), "pt")
        return h.get_tensor(info.name)

    for name, ib in mb.tensors.items():
        if not ib.is_float or name not in ma.tensors:
            continue
        ta, tb = get(ma.tensors[name]), get(ib)
        c.elements += tb.numel()
        diff = ta.float() - tb.float()
        c.differing += int((ta != tb).sum()) if ta.dtype == tb.dtype else int((diff != 0).sum())
        c.sq_dev += float(diff.double().square().sum())
        if ta.dtype == tb.dtype and ta.dtype in (torch.bfloat16, torch.float16, torch.float32):
            c.max_ulp = max(c.max_ulp, int((_ordered_int(ta) - _ordered_int(tb)).abs().max()) if tb.numel() else 0)
        if mbase is not None:
            c.sq_ref_delta += float((tb.float() - get(mbase.tensors[name]).float()).double().square().sum())
    return c
