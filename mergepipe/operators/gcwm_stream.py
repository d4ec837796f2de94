"""The GCWM kernel of one whole target tensor: its SVD, barycenter and inner solve are not block-separable, so
the base and each planned expert tensor are assembled from their hash-checked blocks as they stream,
merged on the device, written, and freed before the next tensor. Memory: (T + 1) float32 copies of
one tensor plus the solver's buffers."""

from __future__ import annotations

import time
from typing import Callable

import torch

from ..errors import MergepipeError
from ..tensors import all_finite, to_bytes, torch_dtype

WRITE_ROWS_BYTES = 16 << 20  # output written in slices of about this size, so the writer overlaps the cast

class GcwmTensor:
    """The GCWM kernel of one target tensor: blocks are assembled as they come, merged at the end."""
    journal_blocks = False  # computed from the whole tensor: no record inside it
    in_place = False

    def __init__(self, job, dev: torch.device, delta: Callable, nonfinite: type) -> None:
        """delta(deltas, weights, params, dev) -> (Delta*, diagnostics); it raises `nonfinite` (with
        the offending delta's .index) on NaN or Inf."""
        self.job, self.dev, self.delta, self.nonfinite = job, dev, delta, nonfinite
        self.active = [k for k, sel in enumerate(job.exact) if sel]
        self.base = self.experts = self.last = None

    def compute(self, b: int, block):
        rows = (block.row_end - block.row_start, *self.job.shape[1:])
        return (block.row_start, block.row_end, block.base.tensor(self.dev).view(rows),
                [(k, x.tensor(self.dev).view(rows)) for k, x in block.experts], block)

    def take(self, b: int, result, sink) -> None:
        r0, r1, base, experts, self.last = result
        if self.base is None:  # allocated at the tensor's first block, not while the one before merges
            self.base = torch.empty(self.job.shape, dtype=torch.float32, device=self.dev)
            self.experts = {k: torch.empty(self.job.shape, dtype=torch.float32, device=self.dev) for k in self.active}
        self.base[r0:r1] = base
        for k, x in experts:
            self.experts[k][r0:r1] = x

    def finish(self, sink, pool=None) -> None:
        job, dev, active, base = self.job, self.dev, self.active, self.base
        # float32, as the spec asks (the reference subtracts in bf16)
        deltas = [self.experts.pop(k).sub_(base) for k in active]
        weights = [job.params.experts[k]["weight"] for k in active]
        t0 = time.perf_counter()
        try:
            delta, diag = self.delta(deltas, weights, job.params.shared, dev)
        except self.nonfinite as e:
            raise MergepipeError(f"{job.experts[active[e.index]].file}: tensor {job.name!r} holds NaN or Inf (or its "
                                 "delta from the base does); gcwm's SVD cannot take it") from None
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        seconds = time.perf_counter() - t0
        # How far Delta* moved from the plain sum, the inner solve's start: a user sees at once when a
        # solver leaves the neighbourhood the reference's short Adam schedule stays in.
        total = deltas.pop()
        for d in deltas:  # summed in place: no stacked copy of T tensors
            total.add_(d)
        departure = float(torch.linalg.vector_norm(delta - total) / torch.linalg.vector_norm(total).clamp_min(1e-30))
        del deltas, total
        merged = base.add_(delta, alpha=job.params.shared["lambda"])
        del delta
        self.base = self.experts = None
        self.last.check_finite(all_finite(merged))
        out = merged.to(torch_dtype(job.out_dtype))
        step = max(1, WRITE_ROWS_BYTES // max(1, out[0].numel() * out.element_size()))
        for r in range(0, job.shape[0], step):
            sink.write(to_bytes(out[r:r + step].contiguous()))
        sink.end(job.name, meta={"experts": active, **diag, "departure": departure, "seconds": round(seconds, 4)})  # seconds: compute only
