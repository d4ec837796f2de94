"""Streaming TIES over one tensor in a single read of each planned block, in bounded memory.

Before anything is read, the plan has pinned each expert's trim threshold to one fine-histogram bin
(the top 16 bits of |delta|). While blocks stream, entries above the bin are kept and entries below
dropped at once; entries inside the bin are counted in a histogram of their low 16 bits, which
gives the exact k-th largest value once the tensor has streamed. Positions where some expert has an
in-bin entry get a provisional result and their raw inputs are appended to a spill file; when the
threshold is known they are recomputed and patched in place, and the tensor is hashed from the
written bytes. Memory: a few blocks, whatever the tensor size.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import torch

from . import blocks as B
from .checkpoint import DTYPES
from .manifest import OperatorSpec
from .operators import ties
from .tensors import all_finite, raw_view, to_bytes, torch_dtype

LOW = 1 << 16
IN_MEMORY_BYTES = 512 << 20  # a tensor's output up to this size is patched in memory
CHUNK = 1 << 19  # elements per step: large enough that per-step overhead stays small (measured)


def _threshold(low_hist: torch.Tensor, tbin: int, need: int, lo: float) -> float:
    """The trim threshold t (keep |delta| >= t) from the histogram of the in-bin entries' low 16 bits.

    mergekit keeps exactly k entries through an unstable argsort, so which of several entries equal
    to the k-th largest value it keeps is unspecified. mergepipe keeps the whole group of equal
    entries, or none of it, whichever is nearer to k: deterministic, and the choice that disagrees
    with an arbitrary tie order in the fewest entries. With fewer in-bin entries than `need` (a
    partial budget left blocks unread) the whole bin is kept."""
    if not 0 < need <= int(low_hist.sum()):
        return lo
    from_top = torch.cumsum(low_hist.flip(0), 0)
    j = int(torch.searchsorted(from_top, need))  # the k-th largest sits in this sub-bin (from the top)
    above = int(from_top[j - 1]) if j > 0 else 0
    group = int(low_hist[LOW - 1 - j])
    low_bits = LOW - 1 - j if 2 * (need - above) >= group else LOW - j  # keep the group, or start above it
    return float(np.array([(tbin << 16) + low_bits], dtype=np.int32).view(np.float32)[0])


def _at_least(a: torch.Tensor, bound: torch.Tensor) -> torch.Tensor:
    """1.0 where a >= bound, else 0.0, in float operations (a - bound is exactly 0 only when equal)."""
    return (a - bound).sign_().add_(0.5).sign_().clamp_(min=0)


def _block(job, trims: list[ties.Trim], weights: list[float], lam: float, normalize: bool, dev: torch.device,
           guard, b: int, reads, raws):
    """One block, independent of every other (so blocks run in parallel): its provisional output
    bytes per chunk, the low-bit counts of its threshold-bin entries per expert, and the raw inputs
    at the positions that wait for the exact thresholds."""
    out_t = torch_dtype(job.out_dtype)
    base_all = raw_view(raws[0], job.base.dtype, (-1,), dev)
    experts = [(k, raw_view(raw, info.dtype, (-1,), dev)) for (k, info, _), raw in zip(reads[1:], raws[1:])]
    # entries below lo are dropped, at or above hi kept, in between (the threshold bin) wait;
    # an expert that trims nothing has lo = hi = 0
    lo = torch.tensor([[trims[k].lo] for k, _ in experts], device=dev)
    hi = torch.tensor([[trims[k].hi] for k, _ in experts], device=dev)
    outs, lows, spills = [], {}, []
    for s in range(0, base_all.numel(), CHUNK):
        e = min(s + CHUNK, base_all.numel())
        base_f = base_all[s:e].float()
        if not experts:
            outs.append(to_bytes(base_f.to(out_t)))
            continue
        d = torch.empty((len(experts), e - s), dtype=torch.float32, device=dev)
        for i, (_, x) in enumerate(experts):
            torch.sub(x[s:e], base_f, out=d[i])
        a = d.abs()
        keep = _at_least(a, hi)
        waiting = _at_least(a, lo).sub_(keep)  # 1.0 in the threshold bin
        idx = waiting.amax(dim=0).nonzero().squeeze(1)  # waiting is 0 or 1: amax is the cheaper "any"
        if idx.numel():
            aw, ww = a[:, idx], waiting[:, idx]
            for i, (k, _) in enumerate(experts):
                vals = aw[i][ww[i] > 0]
                counts = torch.bincount(vals.view(torch.int32) & 0xFFFF, minlength=LOW)
                lows[k] = lows[k] + counts if k in lows else counts
            ix = idx.cpu().numpy().astype(np.int32) + s
            spills.append([ix, _gather(base_all, ix), *(_gather(x, ix) for _, x in experts)])
        d.mul_(keep)
        merged = ties.elect_and_mean(d, [weights[k] for k, _ in experts], lam, normalize, base_f)
        guard(b, reads, raws, all_finite(merged))
        outs.append(to_bytes(merged.to(out_t)))
    return outs, lows, spills


def patched_in_memory(job) -> bool:
    """Whether the tensor's provisional output is held in memory and patched there (then written
    once, so its file can skip the page cache), rather than written and patched in the file."""
    return job.base.numel * DTYPES[job.out_dtype][1] <= IN_MEMORY_BYTES


def ties_tensor(job, op: OperatorSpec, stream, dev: torch.device, sink, spill_path: Path, progress,
                guard) -> None:
    weights = [p["weight"] for p in op.expert_params]
    lam, normalize = op.params["lambda"], op.params["normalize"]
    out_t = torch_dtype(job.out_dtype)
    out_size = DTYPES[job.out_dtype][1]
    trims = [ties.Trim(*t) for t in job.trim]
    low = [torch.zeros(LOW, dtype=torch.int64, device=dev) for _ in job.experts]
    records = []  # (element offset in the tensor, count, experts) of spilled positions, in spill order
    block = functools.partial(_block, job, trims, weights, lam, normalize, dev, guard)
    memory = np.empty(job.base.numel * out_size, np.uint8) if patched_in_memory(job) else None
    filled = 0
    with open(spill_path, "w+b") as spill:
        for ((_, reads), raws), (outs, lows, spills) in B.in_order(dev, block, stream):
            for data in outs:
                if memory is None:
                    sink.write(data, hashed=False)
                else:
                    memory[filled:filled + data.nbytes] = data
                    filled += data.nbytes
            for k, counts in lows.items():
                low[k] += counts
            first = (reads[0][2].start - job.base.start) // job.base.itemsize
            for arrays in spills:
                for arr in arrays:
                    arr.tofile(spill)
                records.append((first, len(arrays[0]), [(k, info.dtype) for k, info, _ in reads[1:]]))
            if progress:
                progress(sum(len(r) for r in raws))
        tau = [_threshold(low[k], t.bin, t.need, t.lo) for k, t in enumerate(trims)]
        spill.seek(0)
        for first, n, experts in records:
            idx = np.fromfile(spill, np.int32, n)
            base_v = _read_values(spill, job.base.dtype, n, dev)
            d = torch.stack([_read_values(spill, dt, n, dev) for _, dt in experts]) - base_v
            for i, (k, _) in enumerate(experts):
                if trims[k].bin >= 0:
                    d[i].mul_(d[i].abs() >= tau[k])
            fixed = to_bytes(ties.elect_and_mean(d, [weights[k] for k, _ in experts], lam, normalize, base_v).to(out_t))
            if memory is not None:
                memory.reshape(-1, out_size)[first + idx] = fixed.reshape(-1, out_size)
                continue
            lo_i, hi_i = int(idx[0]), int(idx[-1]) + 1  # patch the span these positions cover
            span = sink.pread((first + lo_i) * out_size, (hi_i - lo_i) * out_size).reshape(-1, out_size)
            span[idx - lo_i] = fixed.reshape(-1, out_size)
            sink.pwrite((first + lo_i) * out_size, span.reshape(-1))
    spill_path.unlink()
    if memory is not None:
        sink.write(memory)
    sink.end(job.name, rehash=memory is None)


def _gather(x: torch.Tensor, idx: np.ndarray) -> np.ndarray:
    """Raw stored values at idx, as bytes (dtype-agnostic: numpy has no bfloat16)."""
    size = x.element_size()
    ints = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[size]
    return x.view(ints)[torch.from_numpy(idx).to(x.device, torch.int64)].cpu().numpy().view(np.uint8)


def _read_values(f, dtype: str, n: int, dev: torch.device) -> torch.Tensor:
    raw = np.fromfile(f, np.uint8, n * DTYPES[dtype][1])
    return torch.from_numpy(raw).view(torch_dtype(dtype)).to(dev).float()
