"""Task arithmetic: W = W0 + lambda * sum_k w_k (W_k - W0) [/ sum_k w_k when normalize].

The arithmetic mirrors mergekit 0.1.5's generalized task arithmetic step for step (delta, scale,
stacked sum over experts, normalise, lambda, add base) so float32 results agree bit for bit. Two
kernels compute it: numpy on the CPU (no torch import), torch on a GPU or for dtypes numpy lacks.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .. import floats
from . import Blockwise, Operator, Param, TensorParams, register

if TYPE_CHECKING:
    import torch

    from ..sources import BlockInputs, F32Block, TensorSources

class TaskArithmetic(Operator):
    name = "task_arithmetic"
    aliases = ("ta",)
    params = (
        Param("weight", float, per_expert=True, expect="a number"),
        Param("lambda", float, per_expert=False, default=1.0, expect="a number"),
        Param("normalize", bool, per_expert=False, default=False, expect="true or false"),
        # mergekit 0.1.5 declares these for every generalized task arithmetic method and, without
        # sparsification or sign consensus, ignores them: taken here only at values that change
        # nothing, so that a density or rescale meant for another method is refused, not ignored
        Param("int8_mask", bool, per_expert=False, default=False, expect="true or false", since_default=True),
        Param("rescale", bool, per_expert=False, default=False, check=lambda v: v is False,
              expect="false (task_arithmetic keeps every entry, so there is nothing to rescale; dare_linear does)",
              since_default=True),
        Param("density", float, per_expert=True, default=1.0, check=lambda v: v == 1.0,
              expect="1 (task_arithmetic keeps every entry; dare_linear, ties or breadcrumbs sparsify)",
              since_default=True),
    )
    additive = True

    def coefficients(self, tp: TensorParams) -> list[float]:
        return coefficients(tp.weights(), tp.shared["lambda"], tp.shared["normalize"])

    def kernel(self, job: TensorSources, dev: str, scratch: Path) -> Blockwise:
        weights = job.params.weights()
        lam, normalize = job.params.shared["lambda"], job.params.shared["normalize"]

        def merge(block: BlockInputs) -> np.ndarray:
            if not block.experts:
                return self.passthrough(block)
            read = [weights[k] for k, _ in block.experts]
            if dev == "cpu" and block.numpy_ok():
                out, finite = merge_numpy(block, read, weights, lam, normalize)
            else:
                out, finite = merge_torch(block, read, weights, lam, normalize, dev)
            block.check_finite(finite)
            return out
        return Blockwise(job.name, merge)


TA = register(TaskArithmetic())


def coefficients(weights: list[float], lam: float, normalize: bool) -> list[float]:
    """c_k in M = W0 + sum_k c_k Delta_k: what the planner scores and the certificate multiplies."""
    div = sum(weights)
    scale = lam / (div if normalize and abs(div) >= 1e-8 else 1.0)
    return [w * scale for w in weights]


CHUNK = 1 << 18  # elements per step: four experts' float32 scratch stays in the L2 cache
NP_CHUNK = 1 << 18  # numpy makes a pass per operation: this step keeps its operands in cache
SUM_GROUP = 16  # torch sums a stack over dim 0 in runs of 16 rows, then sums the runs' partials


@functools.lru_cache(maxsize=8)
def _divisor(all_weights: tuple[float, ...]) -> np.float32:
    """mergekit's torch.tensor(weights).sum() in float32. torch sums a short vector in an order of its
    own (several accumulators from 5 entries on); up to 4 that is a running sum, beyond it torch is
    asked (imported only then: task arithmetic does not normalize by default)."""
    if len(all_weights) > 4:
        import torch
        return np.float32(torch.tensor(all_weights, dtype=torch.float32).sum().item())
    div = np.float32(0)
    for w in all_weights:
        div = np.float32(div + np.float32(w))
    return div


def merge_numpy(block: BlockInputs, weights: list[float], all_weights: list[float], lam: float,
                normalize: bool) -> tuple[np.ndarray, bool]:
    """The merge of one block on the CPU in numpy, in torch's operations and order (so the same bits):
    (output bytes, whether all came out finite). `weights`: of the experts read here, in order."""
    isz = floats.ITEMSIZE
    out_dtype = block.job.out_dtype
    finite = True
    n = block.base.numel
    out = np.empty(n * isz[out_dtype], np.uint8)
    step = min(NP_CHUNK, n)
    b, x, total, acc = (np.empty(step, np.float32) for _ in range(4))
    scratch = np.empty(step, np.uint32)
    w = [np.float32(v) for v in weights]
    div = _divisor(tuple(all_weights)) if normalize else None
    scale = div if div is not None and abs(float(div)) >= 1e-8 else None
    experts = [x for _, x in block.experts]
    for s in range(0, n, step):
        e = min(s + step, n)
        m = e - s
        bv, xv, tv, av = b[:m], x[:m], total[:m], acc[:m]
        pairs = block.paired(m)
        block.base.values(s, e, bv, pairs)
        for g in range(0, len(experts), SUM_GROUP):
            group = range(g, min(g + SUM_GROUP, len(experts)))
            dst = tv if g == 0 else av
            for i in group:
                experts[i].values(s, e, xv, pairs)
                np.subtract(xv, bv, out=xv if i > group[0] else dst)
                if i > group[0]:
                    np.multiply(xv, w[i], out=xv)
                    np.add(dst, xv, out=dst)
                else:
                    np.multiply(dst, w[i], out=dst)
            if g:
                np.add(tv, av, out=tv)
        if not experts:
            tv.fill(0)
        if scale is not None:
            np.divide(tv, scale, out=tv)
        if lam != 1:
            np.multiply(tv, np.float32(lam), out=tv)
        np.add(tv, bv, out=tv)
        finite &= floats.from_f32(tv, out_dtype, out[s * isz[out_dtype]:e * isz[out_dtype]], scratch[:m], pairs)
    return out, finite


def merge_torch(block: BlockInputs, weights: list[float], all_weights: list[float], lam: float, normalize: bool,
                dev: str) -> tuple[np.ndarray, bool]:
    """The same merge in torch: on a GPU, or for dtypes numpy lacks (float64, float8)."""
    import torch
    from ..tensors import all_finite, to_bytes, torch_dtype
    tdev = torch.device(dev)
    out = torch.empty(block.base.numel, dtype=torch_dtype(block.job.out_dtype), device=tdev)
    merge_into(out, block.base, [x for _, x in block.experts], weights, all_weights, lam, normalize, tdev)
    return to_bytes(out), all_finite(out)


def merge_into(out: torch.Tensor, base: F32Block, experts: list[F32Block], weights: list[float],
               all_weights: list[float], lam: float, normalize: bool, dev: torch.device) -> None:
    """Merge one block into `out` (flat, output dtype). `experts` holds only the experts the plan read
    here (an unread one is a zero delta) and `all_weights` every expert's weight, for the normalising
    divisor.

    Chunked so that each element is converted, differenced and weighted while in cache; the
    operations and their order are mergekit's, so the float32 results are identical to it."""
    import torch  # here, not at the top: the CPU path (merge_numpy) runs without it

    w = torch.tensor(weights, dtype=torch.float32, device=out.device).view(-1, 1)
    div = torch.tensor(all_weights, dtype=torch.float32).sum()  # a float32 sum, as in mergekit
    scratch = torch.empty((len(experts), min(CHUNK, out.numel())), dtype=torch.float32, device=out.device)
    for s in range(0, out.numel(), CHUNK):
        e = min(s + CHUNK, out.numel())
        b = base.tensor(dev, s, e)
        d = scratch[:, :e - s]
        for i, x in enumerate(experts):
            torch.sub(x.tensor(dev, s, e), b, out=d[i])
        d.mul_(w)
        mixed = d.sum(dim=0)
        if normalize:
            mixed /= div if abs(float(div)) >= 1e-8 else 1.0
        if lam != 1:
            mixed *= lam
        out[s:e] = mixed.add_(b)  # base + mixed: addition commutes exactly
