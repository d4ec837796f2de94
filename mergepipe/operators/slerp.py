"""SLERP between the base and one model over each whole tensor, as mergekit 0.1.5 computes it: norms
from per-chunk norms, the dot product of the normalised chunks, linear interpolation where the two
are (anti)collinear. Chunks of 2^20 elements, float32, as mergekit's batch of one output tensor."""

from __future__ import annotations

import math

import numpy as np
import torch

from .. import floats
from ..errors import MergepipeError
from . import Blockwise, Candidates, Certificate, Param, register
from .ta import NP_CHUNK
from .whole import SPARES, JoinedTensor, each_step, scratch
from .whole_only import WholeInputs

CHUNK = 1024 * 1024  # mergekit's _CHUNK_ELEMENTS, over a batch of one tensor
DOT_THRESHOLD = 0.9995  # mergekit's: above it (in |cosine|) slerp interpolates linearly


def slerp(t: float, v0: torch.Tensor, v1: torch.Tensor, dot_threshold: float = DOT_THRESHOLD,
          eps: float = 1e-8, pool=None, out: torch.Tensor | None = None) -> torch.Tensor:
    """mergekit's slerp of one tensor, into `out` when given (v0 or v1 themselves included: each chunk
    is read before it is written)."""
    a, b = v0.reshape(1, -1), v1.reshape(1, -1)
    n = a.shape[1]
    if not n:
        tt = torch.tensor([t], dtype=torch.float32, device=v0.device).reshape(-1, 1)
        return ((1 - tt) * a + tt * b).reshape(v0.shape)
    fill = _plan(t, (lambda lo, hi, i: a[:, lo:hi], lambda lo, hi, i: b[:, lo:hi]), n, v0.device, pool,
                 dot_threshold, eps)
    result = (SPARES.take(n, a.device) if out is None else out).view(1, n)
    each_step(pool, n, lambda lo, hi: fill(lo, hi, result[:, lo:hi]), CHUNK)
    return result.reshape(v0.shape)


def _plan(t: float, chunks: tuple, n: int, dev: torch.device, pool, dot_threshold: float, eps: float):
    """mergekit's steps up to its coefficients, then its blend as fill(lo, hi, out). Its norms and dot
    product are sums of per-chunk sums, so each chunk's part runs on the pool (a thread each,
    single-threaded torch) with the same bits. chunks: (chunk_a, chunk_b), where chunk_x(lo, hi, i)
    gives entries [lo, hi) of an input as a
    [1, hi - lo] float32 tensor the caller may overwrite, through the thread's scratch i if it must
    be copied."""
    tt = torch.tensor([t], dtype=torch.float32, device=dev).reshape(-1, 1)
    chunk_a, chunk_b = chunks

    def per_chunk(fn):
        return each_step(pool, n, fn, CHUNK)

    norm_a = torch.linalg.vector_norm(torch.stack(per_chunk(
        lambda lo, hi: torch.linalg.vector_norm(chunk_a(lo, hi, 0), dim=1, keepdim=True))), dim=0)
    norm_b = torch.linalg.vector_norm(torch.stack(per_chunk(
        lambda lo, hi: torch.linalg.vector_norm(chunk_b(lo, hi, 0), dim=1, keepdim=True))), dim=0)
    norm_a = torch.where(norm_a > eps, norm_a, 1)
    norm_b = torch.where(norm_b > eps, norm_b, 1)

    def dot_part(lo: int, hi: int) -> torch.Tensor:  # (a / norm_a * (b / norm_b)).sum(), in thread scratch
        x, y = (scratch(i, hi - lo, dev).view(1, -1) for i in (0, 1))
        torch.div(chunk_a(lo, hi, 0), norm_a, out=x)
        torch.div(chunk_b(lo, hi, 1), norm_b, out=y)
        return x.mul_(y).sum(dim=1, keepdim=True)
    dot = torch.stack(per_chunk(dot_part))
    dot = dot.sum(dim=0).clamp(-1, 1)
    linear = dot.abs() > dot_threshold
    theta = torch.acos(torch.where(linear, 0, dot))
    sin_theta = torch.sin(theta)
    coef_a = torch.where(linear, 1 - tt, torch.sin((1 - tt) * theta) / sin_theta)
    coef_b = torch.where(linear, tt, torch.sin(tt * theta) / sin_theta)

    def fill(lo: int, hi: int, out: torch.Tensor) -> None:  # coef_a * a + coef_b * b
        x, y = (scratch(i, hi - lo, dev).view(1, -1) for i in (0, 1))
        torch.mul(chunk_a(lo, hi, 0), coef_a, out=x)
        torch.mul(chunk_b(lo, hi, 1), coef_b, out=y)
        torch.add(x, y, out=out.view(1, -1))
    return fill


def _widened(x, lo: int, hi: int, i: int) -> torch.Tensor:
    """Entries [lo, hi) of a Joined tensor as [1, hi - lo] float32, in the thread's scratch i."""
    return x.into(scratch(i, hi - lo, torch.device("cpu")), lo).view(1, -1)


def joined(t: float, a, b, pool, dot_threshold: float = DOT_THRESHOLD, eps: float = 1e-8):
    """slerp over two Joined tensors (whole.JoinedTensor's plan), each chunk widened into scratch as
    a pass needs it."""
    return _plan(t, (lambda lo, hi, i: _widened(a, lo, hi, i), lambda lo, hi, i: _widened(b, lo, hi, i)),
                 a.numel, torch.device("cpu"), pool, dot_threshold, eps)


# How far inside the linear regime the index's cosine must be for the tensors' own float32 cosine to
# be on the same side of the threshold: far above the rounding of a float32 sum over any tensor.
MARGIN = 1e-4


def coefficients(t: float, deltas, dot_threshold: float = DOT_THRESHOLD, eps: float = 1e-8) -> tuple[float, float, float]:
    """slerp's (coef_a, coef_b) from the index alone: ||W0||^2 = sum_b ||W0_b||^2, <W0, W1> =
    ||W0||^2 + sum_b <W0_b, Delta_b>, ||W1||^2 = ||W0||^2 + 2 sum_b <W0_b, Delta_b> + ||Delta||^2
    (float64), then mergekit's own float32 steps from the norms and the cosine on, so that where it
    interpolates linearly (the usual case for a fine-tune) the coefficients are its, bit for bit.
    Also returns the cosine (float64)."""
    n0sq, dot0, dsq = float(deltas.base_sq.sum()), float(deltas.dot.sum()), float((deltas.l2 ** 2).sum())
    na, nb = math.sqrt(n0sq), math.sqrt(max(0.0, n0sq + 2 * dot0 + dsq))
    na, nb = (na if na > eps else 1.0), (nb if nb > eps else 1.0)
    cos = (n0sq + dot0) / (na * nb)
    dot = torch.tensor([[cos]], dtype=torch.float32).clamp(-1, 1)
    tt = torch.tensor([t], dtype=torch.float32).reshape(-1, 1)
    linear = dot.abs() > dot_threshold
    theta = torch.acos(torch.where(linear, 0, dot))
    sin_theta = torch.sin(theta)
    coef_a = torch.where(linear, 1 - tt, torch.sin((1 - tt) * theta) / sin_theta)
    coef_b = torch.where(linear, tt, torch.sin(tt * theta) / sin_theta)
    return float(coef_a), float(coef_b), cos


def blend_numpy(block, a: float, b: float) -> tuple[np.ndarray, bool]:
    """a * W0 + b * W1 over one block in numpy, torch's float32 operations in its order (so its bits),
    a cache-sized step at a time: (output bytes, whether all came out finite). W1 is the base where
    the plan does not read the expert."""
    isz = floats.ITEMSIZE[block.job.out_dtype]
    n = block.base.numel
    out = np.empty(n * isz, np.uint8)
    step = min(NP_CHUNK, n)
    x0, x1 = np.empty(step, np.float32), np.empty(step, np.float32)
    scratch = np.empty(step, np.uint32)
    fa, fb = np.float32(a), np.float32(b)
    expert = block.experts[0][1] if block.experts else None
    finite = True
    for s in range(0, n, step):
        e = min(s + step, n)
        v0, v1 = x0[:e - s], x1[:e - s]
        pairs = block.paired(e - s)
        block.base.values(s, e, v0, pairs)
        if expert is None:
            v1[...] = v0
        else:
            expert.values(s, e, v1, pairs)
        np.multiply(v0, fa, out=v0)
        np.multiply(v1, fb, out=v1)
        np.add(v0, v1, out=v0)
        finite &= floats.from_f32(v0, block.job.out_dtype, out[s * isz:e * isz], scratch[:e - s], pairs)
    return out, finite


class Slerp(WholeInputs):
    """Under a budget the tensor streams: M = a W0 + b W1 = (a + b) W0 + b Delta with (a, b) from the
    index, each block the plan does not read a zero delta. A tensor read whole merges as mergekit
    does (so at 100% the output is mergekit's, bit for bit).

    The certificate: where the cosine puts a tensor in the linear regime, (a, b) = (1 - t, t) in
    float32 both from the index and from the tensors, a read block's bytes are the full merge's and
    an unread one deviates by b Delta, which the Frobenius bound covers. Where a partly read tensor
    interpolates spherically, its (a, b) from the index differ in rounding from those the tensors
    give (measured: 1.5e-5 relative over the bound on the test family), which no bound covers, and
    the plan records none."""
    name = "slerp"
    params = (Param("t", float, per_expert=False, expect="a number"),)
    experts_range = (1, 1)
    budgeted = True
    additive = True
    index_stats = ("dot", "base_sq")

    def tensor_data(self, info, deltas, tp) -> dict:
        a, b, cos = coefficients(tp.shared["t"], deltas[0])
        return {"coef": [a, b], "whole": False, "cos": cos}

    def certificate(self, bound, data=None) -> Certificate:
        spherical = sorted(n for n, d in (data or {}).items()
                           if not d["whole"] and not abs(d.get("cos", 0.0)) > DOT_THRESHOLD + MARGIN)
        if spherical:
            return Certificate("none", None, f"slerp: {len(spherical)} partly read tensor(s) interpolate "
                               f"spherically (first: {spherical[0]}, cosine {data[spherical[0]]['cos']:.6f}); "
                               "their coefficients from the index differ in rounding from the tensors' own, "
                               "which no bound covers: only the measured deviation is reported")
        return super().certificate(bound, data)

    def settle(self, data: dict | None, whole: bool) -> dict | None:
        return {**data, "whole": whole}

    def candidates(self, info, k, delta, tp, coef, data) -> Candidates:
        share = abs(data["coef"][1]) * delta.l2
        idx = np.nonzero(delta.l2 > 0)[0]
        return Candidates(idx, share[idx], share[idx])

    def check_plan(self, name: str, tp, experts: int) -> None:
        d = tp.data or {}
        number = (lambda c: isinstance(c, (int, float)) and not isinstance(c, bool))
        ok = set(d) - {"cos"} == {"coef", "whole"} and isinstance(d["whole"], bool) and isinstance(d["coef"], list) \
            and len(d["coef"]) == 2 and all(map(number, d["coef"])) and number(d.get("cos", 0.0))
        if not ok:
            raise MergepipeError(f"plan.tensors.{name}.data must be {{\"coef\": [a, b], \"whole\": true or false[, "
                                 f"\"cos\": a number]}}")

    def kernel(self, job, dev: str, scratch):
        # Read whole, a tensor the index puts in the linear regime streams too: mergekit's coefficients
        # there are (1 - t, t) in float32 whatever its norms and dot come to, so its bits are these.
        if job.data["whole"] and not abs(job.data.get("cos", 0.0)) > DOT_THRESHOLD + MARGIN:
            if dev != "cpu":
                return super().kernel(job, dev, scratch)
            t = job.params.shared["t"]
            return JoinedTensor(job, lambda job, base, inputs, pool: joined(t, base, inputs[0], pool), CHUNK)
        tdev = torch.device(dev)
        a, b = (torch.tensor(c, dtype=torch.float32, device=tdev) for c in job.data["coef"])
        from ..tensors import all_finite, to_bytes, torch_dtype

        def merge(block):
            if dev == "cpu" and block.numpy_ok():
                out, finite = blend_numpy(block, *job.data["coef"])
                block.check_finite(finite)
                return out
            x0 = block.base.tensor(tdev)
            x1 = block.experts[0][1].tensor(tdev) if block.experts else x0
            out = a * x0 + b * x1
            block.check_finite(all_finite(out))
            return to_bytes(out.to(torch_dtype(block.job.out_dtype)))
        return Blockwise(job.name, merge)

    def merge(self, job, base, inputs, pool):
        return slerp(job.params.shared["t"], base, inputs[0], pool=pool, out=base)


SLERP = register(Slerp())
