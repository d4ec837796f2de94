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

from pathlib import Path

import numpy as np
import torch

from .checkpoint import DTYPES
from .manifest import OperatorSpec
from .operators import ties

LOW = 1 << 16


def _threshold(low_hist: torch.Tensor, tbin: int, need: int, lo: float) -> float:
    """The `need`-th largest in-bin |delta|, from the histogram of its low 16 bits. Every entry at
    least this large is kept, as in the TIES reference code (|d| >= kthvalue); mergekit keeps exactly
    k through an unstable argsort, so the two differ only where magnitudes tie at the threshold.
    With fewer entries than `need` (a partial budget left blocks unread) the whole bin is kept."""
    if not 0 < need <= int(low_hist.sum()):
        return lo
    from_top = torch.cumsum(low_hist.flip(0), 0)
    j = LOW - 1 - int(torch.searchsorted(from_top, need))
    return float(np.array([(tbin << 16) | j], dtype=np.int32).view(np.float32)[0])


def _rows(raw: np.ndarray, itemsize: int, idx: np.ndarray) -> np.ndarray:
    return raw.reshape(-1, itemsize)[idx].reshape(-1)


def ties_tensor(job, op: OperatorSpec, stream, dev: torch.device, sink, spill_path: Path, progress) -> None:
    from .execute import raw_view, to_bytes
    weights = [p["weight"] for p in op.expert_params]
    lam, normalize = op.params["lambda"], op.params["normalize"]
    out_t = DTYPES[job.out_dtype][0]
    out_size = DTYPES[job.out_dtype][1]
    low = [torch.zeros(LOW, dtype=torch.int64, device=dev) for _ in job.experts]
    records = []  # (block offset in elements, count, experts) of spilled positions, in spill order
    with open(spill_path, "w+b") as spill:
        for (b, reads), raws in stream:
            blk = reads[0][2]
            first = (blk.start - job.base.start) // job.base.itemsize
            base_f = raw_view(raws[0], job.base.dtype, (-1,), dev).float()
            ks = [k for k, _, _ in reads[1:]]
            if not ks:
                sink.write(to_bytes(base_f.to(out_t)), hashed=False)
                continue
            d = torch.empty((len(ks), base_f.numel()), dtype=torch.float32, device=dev)
            for i, ((_, info, _), raw) in enumerate(zip(reads[1:], raws[1:])):
                torch.sub(raw_view(raw, info.dtype, (-1,), dev), base_f, out=d[i])
            pending = torch.zeros(base_f.numel(), dtype=torch.bool, device=dev)
            for i, k in enumerate(ks):
                tbin = job.trim[k][0]
                if tbin < 0:
                    continue  # density 1: nothing trimmed
                bits = ties.bins_of(d[i])
                in_bin = bits == tbin
                low[k] += torch.bincount(d[i].abs().view(torch.int32)[in_bin] & 0xFFFF, minlength=LOW)
                pending |= in_bin
                d[i].mul_(bits > tbin)
            if pending.any():
                idx = pending.nonzero().squeeze(1).cpu().numpy().astype(np.int32)
                idx.tofile(spill)
                _rows(raws[0], job.base.itemsize, idx).tofile(spill)
                for (_, info, _), raw in zip(reads[1:], raws[1:]):
                    _rows(raw, info.itemsize, idx).tofile(spill)
                records.append((first, len(idx), [(k, info.dtype) for k, info, _ in reads[1:]]))
            merged = ties.elect_and_mean(d, [weights[k] for k in ks], lam, normalize, base_f)
            sink.write(to_bytes(merged.to(out_t)), hashed=False)
            if progress:
                progress(sum(len(r) for r in raws))
        tau = [_threshold(low[k], t[0], t[2], ties.Trim(*t).lo) for k, t in enumerate(job.trim)]
        spill.seek(0)
        for first, n, experts in records:
            idx = np.fromfile(spill, np.int32, n)
            base_v = _read_values(spill, job.base.dtype, n, dev)
            d = torch.stack([_read_values(spill, dt, n, dev) for _, dt in experts]) - base_v
            for i, (k, _) in enumerate(experts):
                if job.trim[k][0] >= 0:
                    d[i].mul_(d[i].abs() >= tau[k])
            fixed = to_bytes(ties.elect_and_mean(d, [weights[k] for k, _ in experts], lam, normalize, base_v).to(out_t))
            lo, hi = int(idx[0]), int(idx[-1]) + 1  # patch the span these positions cover
            span = sink.pread((first + lo) * out_size, (hi - lo) * out_size).reshape(-1, out_size)
            span[idx - lo] = fixed.reshape(-1, out_size)
            sink.pwrite((first + lo) * out_size, span.reshape(-1))
    spill_path.unlink()
    sink.end(job.name, rehash=True)


def _read_values(f, dtype: str, n: int, dev: torch.device) -> torch.Tensor:
    torch_dtype, size = DTYPES[dtype]
    raw = np.fromfile(f, np.uint8, n * size)
    return torch.from_numpy(raw).view(torch_dtype).to(dev).float()
