"""GCWM over one whole target tensor: its SVD, barycenter and inner solve are not block-separable, so
the base and each planned expert tensor are assembled from their hash-checked blocks as they stream,
merged on the device, written, and freed before the next tensor. Memory: (T + 1) float32 copies of
one tensor plus the solver's buffers."""

from __future__ import annotations

import contextlib
import os
import time

import torch

from .errors import MergepipeError
from .manifest import OperatorSpec
from .operators import gcwm
from .tensors import all_finite, raw_view, to_bytes, torch_dtype

PARALLEL_NUMEL = 1 << 18  # from this many elements a tensor's GCWM uses every CPU core
WRITE_ROWS_BYTES = 16 << 20  # output written in slices of about this size, so the writer overlaps the cast


@contextlib.contextmanager
def _all_cores(dev: torch.device, numel: int):
    """Streaming keeps torch single-threaded (its own threads do whole blocks); one large SVD or
    matmul on the CPU wants every core instead. Small tensors stay on one thread: OpenMP's barriers
    cost more than they save there (measured 15 ms against 3 us per tiny op on a busy 2-core box)."""
    before = torch.get_num_threads()
    if dev.type == "cpu":
        torch.set_num_threads((os.cpu_count() or 1) if numel >= PARALLEL_NUMEL else 1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def tensor_delta(deltas: list[torch.Tensor], weights: list[float], params: dict, dev: torch.device):
    """gcwm_delta under execute's thread policy. BLAS and LAPACK results depend on the thread count,
    so anything that must match an execute bit for bit (a replay, a test's reference) goes through here."""
    with _all_cores(dev, deltas[0].numel() if deltas else 0):
        return gcwm.gcwm_delta(deltas, weights, params)


def gcwm_tensor(job, op: OperatorSpec, stream, dev: torch.device, sink, progress, guard) -> None:
    shape = job.base.shape
    active = [k for k, sel in enumerate(job.selected) if sel]
    base = torch.empty(shape, dtype=torch.float32, device=dev)
    experts = {k: torch.empty(shape, dtype=torch.float32, device=dev) for k in active}
    for (b, reads), raws in stream:
        for (k, info, blk), raw in zip(reads, raws):
            rows = blk.row_end - blk.row_start
            (base if k < 0 else experts[k])[blk.row_start:blk.row_end] = raw_view(raw, info.dtype, (rows, *shape[1:]), dev)
        if progress:
            progress(sum(len(r) for r in raws))
    # float32, as the spec asks (the reference subtracts in bf16)
    deltas = [experts.pop(k).sub_(base) for k in active]
    weights = [op.expert_params[k]["weight"] for k in active]
    t0 = time.perf_counter()
    try:
        delta, diag = tensor_delta(deltas, weights, op.params, dev)
    except gcwm.NonFiniteDelta as e:
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
    merged = base.add_(delta, alpha=op.params["lambda"])
    del delta
    guard(0, [], [], all_finite(merged))
    out = merged.to(torch_dtype(job.out_dtype))
    step = max(1, WRITE_ROWS_BYTES // max(1, out[0].numel() * out.element_size()))
    for r in range(0, shape[0], step):
        sink.write(to_bytes(out[r:r + step].contiguous()))
    sink.end(job.name, meta={"experts": active, **diag, "departure": departure, "seconds": round(seconds, 4)})  # seconds: compute only
