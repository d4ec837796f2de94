"""Tensor-by-tensor comparison of two checkpoints with the same names, streamed in blocks of rows
(never two whole models, nor a whole embedding in float32, in memory): Frobenius deviation, and
counts of differing elements and ulps for agreement checks."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open

from .checkpoint import Model, open_model

CHUNK = 1 << 24  # elements per comparison step


@dataclass
class Comparison:
    elements: int = 0
    differing: int = 0
    max_ulp: int = 0  # in the stored dtype, for same-dtype tensors
    max_abs: float = 0.0
    sq_dev: float = 0.0  # sum of squared differences (float64)
    sq_ref_delta: float = 0.0  # sum of squares of (b - base), when a base is given
    worst: list[tuple[str, int, int]] = field(default_factory=list)  # (tensor, differing, max ulp)

    @property
    def frobenius(self) -> float:
        return self.sq_dev ** 0.5

    @property
    def relative(self) -> float:
        return (self.sq_dev / self.sq_ref_delta) ** 0.5 if self.sq_ref_delta else 0.0

    @property
    def fraction(self) -> float:
        return self.differing / self.elements if self.elements else 0.0


def ordered_int(t: torch.Tensor) -> torch.Tensor:
    """Floats as integers whose difference counts ulps (+0 and -0 coincide)."""
    bits = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32}[t.dtype]
    i = t.contiguous().view(bits).to(torch.int64)
    mag = i & torch.iinfo(bits).max
    return torch.where(i < 0, -mag, mag)


def _chunks(stack: contextlib.ExitStack, handles: dict, model: Model, name: str):
    info = model.tensors[name]
    h = handles.get(info.file)
    if h is None:
        h = handles[info.file] = stack.enter_context(safe_open(str(info.file), "pt"))
    sl = h.get_slice(name)
    if len(info.shape) < 2:
        yield sl[:]
        return
    rows = max(1, CHUNK // max(1, info.row_elems))
    for r in range(0, info.shape[0], rows):
        yield sl[r:r + rows]


def compare(a: str | Path, b: str | Path, base: str | Path | None = None) -> Comparison:
    """Compare checkpoint a against reference b (deviation ||a - b||, relative to ||b - base||)."""
    ma, mb = open_model(a), open_model(b)
    mbase = open_model(base) if base else None
    c = Comparison()
    handles: dict = {}
    with contextlib.ExitStack() as stack:
        for name, ib in mb.tensors.items():
            if not ib.is_float or name not in ma.tensors:
                continue
            t_diff = t_ulp = 0
            parts = [_chunks(stack, handles, ma, name), _chunks(stack, handles, mb, name)]
            if mbase is not None:
                parts.append(_chunks(stack, handles, mbase, name))
            for xs in zip(*parts):
                x, y = xs[0], xs[1]
                diff = x.float() - y.float()
                c.elements += y.numel()
                t_diff += int((x != y).sum()) if x.dtype == y.dtype else int((diff != 0).sum())
                c.sq_dev += float(diff.double().square().sum())
                c.max_abs = max(c.max_abs, float(diff.abs().max()) if diff.numel() else 0.0)
                if x.dtype == y.dtype and x.dtype in (torch.bfloat16, torch.float16, torch.float32) and x.numel():
                    t_ulp = max(t_ulp, int((ordered_int(x) - ordered_int(y)).abs().max()))
                if mbase is not None:
                    c.sq_ref_delta += float((y.float() - xs[2].float()).double().square().sum())
            c.differing += t_diff
            c.max_ulp = max(c.max_ulp, t_ulp)
            if t_diff:
                c.worst.append((name, t_diff, t_ulp))
    c.worst.sort(key=lambda w: -w[1])
    return c
