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

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..checkpoint import DTYPES
from ..tensors import all_finite, to_bytes, torch_dtype
from . import positional as P

@dataclass(frozen=True)
class Trim:
    """Where the k-th largest |delta| lies: fine-histogram bin `bin`, with `above` entries in higher
    bins, so the `need`-th largest entry inside the bin is the threshold. bin = -1: keep everything."""
    bin: int
    above: int
    need: int

    @property
    def lo(self) -> float:
        """Smallest float32 in the bin: a block whose max |delta| is below it contributes nothing."""
        if self.bin < 0:
            return 0.0
        return float(np.array([self.bin << 16], dtype=np.int32).view(np.float32)[0])

    @property
    def hi(self) -> float:
        """Smallest float32 above the bin: entries at least this large are kept for certain."""
        if self.bin < 0:
            return 0.0
        return float(np.array([(self.bin + 1) << 16], dtype=np.int32).view(np.float32)[0])


def trim_for(fine: np.ndarray, numel: int, density: float) -> Trim:
    """mergekit keeps max(1, int(density * numel)) entries, or all of them when density >= 1."""
    if density >= 1:
        return Trim(-1, 0, 0)
    k = max(1, int(density * numel))
    from_top = np.cumsum(fine[::-1])
    j = int(np.searchsorted(from_top, k))  # first index (from the top) where the count reaches k
    b = len(fine) - 1 - j
    above = int(from_top[j - 1]) if j > 0 else 0
    return Trim(b, above, k - above)


def elect_and_mean(trimmed: torch.Tensor, weights: list[float], lam: float, normalize: bool,
                   base: torch.Tensor) -> torch.Tensor:
    """trimmed: [k, n] float32 trimmed deltas of the experts read here (an unread one is zero, which
    never agrees with a sign, so it is simply left out). Overwrites `trimmed`.

    mergekit's arithmetic, element for element, with masks as float 0/1 (a comparison written
    straight into a float tensor costs one pass; torch's boolean masks, and indexing with them, cost
    several): the elected sign is +1 where the weighted sum is >= 0, and an entry agrees when
    sign(entry) == elected (a zero entry never does)."""
    w = torch.tensor(weights, dtype=trimmed.dtype, device=trimmed.device).view(-1, 1)
    trimmed.mul_(w)
    elected = trimmed.sum(dim=0).sign_().add_(0.5).sign_()  # -1, or +1 where the sum is >= 0
    agree = trimmed.sign()
    torch.eq(agree, elected, out=agree)  # 1.0 where the signs agree, else 0.0
    mixed = trimmed.mul_(agree).sum(dim=0)
    if normalize:
        divisor = (w * agree).sum(dim=0)
        # 1 where 0, as mergekit's divisor[divisor == 0] = 1: adding 0 elsewhere changes no bit
        divisor.add_(torch.eq(divisor, 0, out=torch.empty_like(divisor)))
        mixed /= divisor
    if lam != 1:
        mixed *= lam
    return mixed.add_(base)  # base + mixed: addition commutes exactly


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


@dataclass(frozen=True)
class Cut:
    """Exact-k trimming of one expert: keep |delta| > tau, and of the `group` entries equal to tau
    the `keep` whose positions' seeded hash order is largest (mergekit keeps exactly k; which of
    equal entries it keeps is its sort's arbitrary choice). tau = lo, keep = group = 0: keep the
    whole bin (a partial budget left fewer in-bin entries than needed)."""
    tau: float
    keep: int
    group: int


def _cut(low_hist: torch.Tensor, tbin: int, need: int, lo: float) -> Cut:
    if not 0 < need <= int(low_hist.sum()):
        return Cut(lo, 0, 0)
    from_top = torch.cumsum(low_hist.flip(0), 0)
    j = int(torch.searchsorted(from_top, need))  # the k-th largest is this exact value (from the top)
    above = int(from_top[j - 1]) if j > 0 else 0
    tau = float(np.array([(tbin << 16) + LOW - 1 - j], dtype=np.int32).view(np.float32)[0])
    return Cut(tau, need - above, int(low_hist[LOW - 1 - j]))


def _at_least(a: torch.Tensor, bound: torch.Tensor) -> torch.Tensor:
    """1.0 where a >= bound, else 0.0, as a float tensor of a's shape."""
    return torch.ge(a, bound, out=torch.empty_like(a))


class TiesTensor:
    """The TIES kernel of one tensor (see the module docstring)."""
    journal_blocks = False  # its bytes are patched after the last block: no record inside it

    def __init__(self, op, job, dev: torch.device, scratch: Path) -> None:
        self.op, self.job, self.dev = op, job, dev
        self.weights = job.params.weights()
        self.lam, self.normalize = job.params.shared["lambda"], job.params.shared["normalize"]
        self.trims = [Trim(*t) for t in job.data["trim"]]
        self.exact_k = job.data.get("tie") == "hash"
        seed = job.data.get("tie_seed", 0)
        self.keys = [P.stream_key(seed, job.name, k, "tie") for k in range(len(job.experts))]
        self.records = []  # (element offset in the tensor, count, experts) of spilled positions, in spill order
        self.out_size = DTYPES[job.out_dtype][1]
        self.in_place = not patched_in_memory(job)
        self.low = self.memory = None  # allocated at the first block, freed at the end
        self.filled = 0
        self.spill_path = scratch / ".deferred"
        self.spill = None

    def compute(self, b: int, block):
        """One block, independent of every other (so blocks run in parallel): its provisional output
        bytes per chunk, the low-bit counts of its threshold-bin entries per expert, and the float32
        inputs at the positions that wait for the exact thresholds."""
        if not block.experts:
            return block.first, [self.op.passthrough(block)], {}, []
        dev, trims = self.dev, self.trims
        out_t = torch_dtype(self.job.out_dtype)
        experts = block.experts
        # entries below lo are dropped, at or above hi kept, in between (the threshold bin) wait;
        # an expert that trims nothing has lo = hi = 0
        lo = torch.tensor([[trims[k].lo] for k, _ in experts], device=dev)
        hi = torch.tensor([[trims[k].hi] for k, _ in experts], device=dev)
        outs, lows, spills = [], {}, []
        n = block.base.numel
        for s in range(0, n, CHUNK):
            e = min(s + CHUNK, n)
            base_f = block.base.tensor(dev, s, e)
            xs = [x.tensor(dev, s, e) for _, x in experts]
            d = torch.empty((len(experts), e - s), dtype=torch.float32, device=dev)
            for i, x in enumerate(xs):
                torch.sub(x, base_f, out=d[i])
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
                spills.append([ix, _values(base_f, idx), *(_values(x, idx) for x in xs)])
            d.mul_(keep)
            merged = elect_and_mean(d, [self.weights[k] for k, _ in experts], self.lam, self.normalize, base_f)
            block.check_finite(all_finite(merged))
            outs.append(to_bytes(merged.to(out_t)))
        return block.first, outs, lows, [(spill, [k for k, _ in experts]) for spill in spills]

    def take(self, b: int, result, sink) -> None:
        first, outs, lows, spills = result
        if self.low is None:
            self.low = [torch.zeros(LOW, dtype=torch.int64, device=self.dev) for _ in self.job.experts]
            if not self.in_place:
                self.memory = np.empty(self.job.numel * self.out_size, np.uint8)
        for data in outs:
            if self.memory is None:
                sink.write(data, hashed=False)
            else:
                self.memory[self.filled:self.filled + data.nbytes] = data
                self.filled += data.nbytes
        for k, counts in lows.items():
            self.low[k] += counts
        for arrays, ks in spills:
            if self.spill is None:
                self.spill = open(self.spill_path, "w+b")
            for arr in arrays:
                arr.tofile(self.spill)
            self.records.append((first, len(arrays[0]), ks))

    def finish(self, sink, pool=None) -> None:
        job, dev, trims = self.job, self.dev, self.trims
        out_t, out_size = torch_dtype(job.out_dtype), self.out_size
        if self.exact_k:
            cuts = [_cut(self.low[k], t.bin, t.need, t.lo) for k, t in enumerate(trims)]
            tau = [c.tau for c in cuts]
            orders = self._tie_orders(cuts)
        else:  # the first rule (manifests planned before exact k): whole tie groups
            tau = [_threshold(self.low[k], t.bin, t.need, t.lo) for k, t in enumerate(trims)]
            orders = {}
        for first, idx, base_v, d, ks in self._spilled():
            for i, k in enumerate(ks):
                if trims[k].bin < 0:
                    continue
                if k in orders:
                    a = d[i].abs()
                    tied_kept = (a == tau[k]) & (P.order_at(self.keys[k], torch.from_numpy(idx).to(dev) + first)
                                                  >= orders[k])
                    d[i].mul_((a > tau[k]) | tied_kept)
                else:
                    d[i].mul_(d[i].abs() >= tau[k])
            fixed = to_bytes(elect_and_mean(d, [self.weights[k] for k in ks], self.lam, self.normalize,
                                                 base_v).to(out_t))
            if self.memory is not None:
                self.memory.reshape(-1, out_size)[first + idx] = fixed.reshape(-1, out_size)
                continue
            lo_i, hi_i = int(idx[0]), int(idx[-1]) + 1  # patch the span these positions cover
            span = sink.pread((first + lo_i) * out_size, (hi_i - lo_i) * out_size).reshape(-1, out_size)
            span[idx - lo_i] = fixed.reshape(-1, out_size)
            sink.pwrite((first + lo_i) * out_size, span.reshape(-1))
        if self.spill is not None:
            self.spill.close()
            self.spill_path.unlink()
        if self.memory is not None:
            sink.write(self.memory)
        sink.end(job.name, rehash=self.memory is None)
        self.low = self.memory = None

    def _spilled(self):
        """The spilled positions, record by record: (first, positions in the block, base values,
        [experts, n] deltas, experts)."""
        if self.spill is None:
            return
        self.spill.seek(0)
        for first, n, ks in self.records:
            idx = np.fromfile(self.spill, np.int32, n)
            base_v = _read_values(self.spill, n, self.dev)
            d = torch.stack([_read_values(self.spill, n, self.dev) for _ in ks]) - base_v
            yield first, idx, base_v, d, ks

    def _tie_orders(self, cuts: list[Cut]) -> dict[int, int]:
        """Per expert that keeps only some of its entries equal to tau, the smallest hash order kept
        among them (the orders are distinct, so exactly `keep` are at or above it)."""
        partial = {k for k, c in enumerate(cuts) if 0 < c.keep < c.group}
        if not partial:
            return {}
        found: dict[int, list[torch.Tensor]] = {k: [] for k in partial}
        for first, idx, _, d, ks in self._spilled():
            for i, k in enumerate(ks):
                if k in partial:
                    at = torch.from_numpy(idx).to(self.dev)[d[i].abs() == cuts[k].tau] + first
                    found[k].append(P.order_at(self.keys[k], at))
        return {k: int(torch.topk(torch.cat(v), cuts[k].keep, sorted=False).values.min()) for k, v in found.items()}


def patched_in_memory(job) -> bool:
    """Whether the tensor's provisional output is held in memory and patched there (then written
    once, so its file can skip the page cache), rather than written and patched in the file."""
    return job.numel * DTYPES[job.out_dtype][1] <= IN_MEMORY_BYTES


def _values(x: torch.Tensor, idx: torch.Tensor) -> np.ndarray:
    """float32 values at idx, on the CPU."""
    return x[idx].cpu().numpy()


def _read_values(f, n: int, dev: torch.device) -> torch.Tensor:
    return torch.from_numpy(np.fromfile(f, np.float32, n)).to(dev)
