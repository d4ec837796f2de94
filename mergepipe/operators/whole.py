"""The kernel of an operator that needs whole tensors (slerp's norms, a sparsifier's ranks, an L1
rescale): the base and each read expert tensor are assembled in float32 from their hash-checked
blocks as they stream, merged once the last block is in, written, and freed before the next tensor.
A block the plan does not read for an expert takes the base's rows (a zero delta); an expert read
nowhere is the base itself. Memory: (experts read + 1) float32 copies of one tensor, plus the merge's."""

from __future__ import annotations

from typing import Callable

import torch

from ..tensors import all_finite, to_bytes, torch_dtype

WRITE_ROWS_BYTES = 16 << 20  # output written in slices of about this size

STEP = 1 << 20  # elements per step of a pass split over the compute pool

# merge(job, base, inputs, pool) -> float32 result of the tensor's shape; inputs: one per expert (the
# base itself where the expert was read nowhere), which the merge may release as it goes; pool: the
# compute pool, idle while a whole tensor merges (see each_step)
Merge = Callable[[object, torch.Tensor, list, object], torch.Tensor]


def each_step(pool, n: int, fn: Callable[[int, int], object], step: int = STEP) -> list:
    """[fn(lo, hi) for the steps of [0, n)], run on the pool (None: here), in order. Only for work
    whose bits do not depend on where it is cut: elementwise operations into disjoint slices, or a
    reduction that the method itself defines per step (slerp's chunks). Each step's torch runs
    single-threaded, so a whole tensor's pass uses every compute thread and stays bit-exact."""
    steps = [(lo, min(lo + step, n)) for lo in range(0, n, step)]
    if pool is None or len(steps) < 2:
        return [fn(lo, hi) for lo, hi in steps]
    return [f.result() for f in [pool.submit(fn, lo, hi) for lo, hi in steps]]


class WholeTensor:
    journal_blocks = False  # computed from the whole tensor: no record inside it
    in_place = False

    def __init__(self, job, dev: torch.device, merge: Merge) -> None:
        self.job, self.dev, self.merge = job, dev, merge
        self.active = [k for k, sel in enumerate(job.exact) if sel]
        self.base = self.experts = self.last = None

    def compute(self, b: int, block):
        return (block.first, block.base.tensor(self.dev), {k: x.tensor(self.dev) for k, x in block.experts}, block)

    def take(self, b: int, result, sink) -> None:
        first, base, experts, self.last = result
        n = self.job.numel
        if self.base is None:  # allocated at the tensor's first block, not while the one before merges
            self.base = torch.empty(n, dtype=torch.float32, device=self.dev)
            self.experts = {k: torch.empty(n, dtype=torch.float32, device=self.dev) for k in self.active}
        end = first + base.numel()
        self.base[first:end] = base
        for k, buf in self.experts.items():
            buf[first:end] = experts.get(k, base)

    def finish(self, sink, pool=None) -> None:
        job = self.job
        base = self.base.view(job.shape)
        # the list is the inputs' only holder: a merge may drop each once it has used it
        inputs = [self.experts.pop(k).view(job.shape) if k in self.experts else base for k in range(len(job.experts))]
        self.base = self.experts = None
        merged = self.merge(job, base, inputs, pool).reshape(-1)
        self.last.check_finite(all(each_step(pool, merged.numel(), lambda lo, hi: all_finite(merged[lo:hi]))))
        out = merged
        if merged.dtype != torch_dtype(job.out_dtype):
            out = torch.empty(merged.numel(), dtype=torch_dtype(job.out_dtype), device=merged.device)
            each_step(pool, out.numel(), lambda lo, hi: out[lo:hi].copy_(merged[lo:hi]))
        step = max(1, WRITE_ROWS_BYTES // out.element_size())
        for s in range(0, out.numel(), step):
            sink.write(to_bytes(out[s:s + step]))
        sink.end(job.name)
        self.last = None
