"""Model Stock (arXiv 2403.19522), as mergekit 0.1.5 computes it: the mean pairwise cosine of the
deltas (over the whole tensor, or per row with filter_wise) sets how far the models' average moves
from the base."""

from __future__ import annotations

import torch

from . import Param, register
from .whole import JoinedTensor, deltas, each_job, each_step, scratch
from .whole_only import WholeInputs

STEP = 1 << 16  # entries per step of a job's own elementwise pass: its temporaries stay in cache


def model_stock(w_0: torch.Tensor, ws: list[torch.Tensor], filter_wise: bool, pool=None) -> torch.Tensor:
    out_shape = w_0.shape
    if filter_wise:
        if w_0.dim() == 1:
            w_0, ws = w_0.unsqueeze(0), [w.unsqueeze(0) for w in ws]
        offsets = [w - w_0 for w in ws]
        norms = [torch.norm(a, dim=-1) for a in offsets]
        dots = {(i, j): (offsets[i] * offsets[j]).sum(dim=-1) for i in range(len(ws)) for j in range(i + 1, len(ws))}
        t = _t(norms, dots, len(ws))
        return (t * (sum(ws) / len(ws)) + (1 - t) * w_0).reshape(out_shape)
    return _flat(w_0.reshape(-1), [w.reshape(-1) for w in ws], pool).reshape(out_shape)


def _flat(w_0: torch.Tensor, ws: list[torch.Tensor], pool) -> torch.Tensor:
    """model_stock over flat tensors with mergekit's bits: each norm and dot product one torch sum over
    the whole tensor, as mergekit's, several of them side by side on the compute threads, each over
    its own scratch; the final elementwise pass split over the pool."""
    n = w_0.numel()

    def norm(w):
        def job(s):
            each_step(None, n, lambda lo, hi: torch.sub(w[lo:hi], w_0[lo:hi], out=s[lo:hi]), STEP)
            return torch.norm(s, dim=-1)
        return job

    def dot(a, b):
        def job(s):
            each_step(None, n, lambda lo, hi: torch.mul(a[lo:hi] - w_0[lo:hi], b[lo:hi] - w_0[lo:hi], out=s[lo:hi]),
                      STEP)
            return s.sum(dim=-1)
        return job
    pairs = [(i, j) for i in range(len(ws)) for j in range(i + 1, len(ws))]
    sums, scratches = each_job(pool, [norm(w) for w in ws] + [dot(ws[i], ws[j]) for i, j in pairs], n, w_0.device)
    t = _t(sums[:len(ws)], dict(zip(pairs, sums[len(ws):])), len(ws))
    out = scratches[0]
    mix = _mix(t, len(ws))
    each_step(pool, n, lambda lo, hi: mix([w[lo:hi] for w in ws], w_0[lo:hi], out[lo:hi]))
    return out


def _mix(t: torch.Tensor, count: int):
    """mix(ws, w_0, out): t * (sum(ws) / count) + (1 - t) * w_0 into out, the sum from 0 as Python's."""
    keep = 1 - t

    def mix(ws: list, w_0: torch.Tensor, r: torch.Tensor) -> None:
        torch.add(ws[0], 0, out=r)
        for w in ws[1:]:
            r.add_(w)
        r.div_(count).mul_(t)
        r.add_(keep * w_0)
    return mix


def joined(base, inputs: list, pool):
    """Flat model_stock over Joined tensors (whole.JoinedTensor's plan), with mergekit's bits: each
    model's offset from the base made once, from the blocks as read, into a buffer its norm sums
    directly; each dot product over a scratch; the blend widens the blocks again, a step at a time,
    so that neither the base nor any model is ever copied whole to float32."""
    n, cpu = base.numel, torch.device("cpu")
    offsets = deltas(base, inputs, pool)

    def norm(d):
        return lambda s: torch.norm(d, dim=-1)

    def dot(a, b):
        def job(s):
            each_step(None, n, lambda lo, hi: torch.mul(a[lo:hi], b[lo:hi], out=s[lo:hi]), STEP)
            return s.sum(dim=-1)
        return job
    pairs = [(i, j) for i in range(len(inputs)) for j in range(i + 1, len(inputs))]
    sums, _ = each_job(pool, [norm(d) for d in offsets] + [dot(offsets[i], offsets[j]) for i, j in pairs], n, cpu)
    offsets.clear()
    mix = _mix(_t(sums[:len(inputs)], dict(zip(pairs, sums[len(inputs):])), len(inputs)), len(inputs))

    def fill(lo: int, hi: int, out: torch.Tensor) -> None:
        ws = [x.into(scratch(3 + k, hi - lo, cpu), lo) for k, x in enumerate(inputs)]
        mix(ws, base.into(scratch(0, hi - lo, cpu), lo), out)
    return fill


def _t(norms: list[torch.Tensor], dots: dict, count: int) -> torch.Tensor:
    """How far the average moves from the base: from the mean pairwise cosine of the offsets."""
    cos_thetas = [((dot / (norms[i] * norms[j]).clamp(min=1e-6)).clamp(-1, 1)) for (i, j), dot in dots.items()]
    cos_theta = torch.stack(cos_thetas).mean(dim=0).unsqueeze(-1)
    denominator = 1 + (count - 1) * cos_theta
    singular = denominator.abs() < 1e-6  # no finite estimate there: keep the base
    safe = torch.where(singular, torch.ones_like(denominator), denominator)
    return torch.where(singular, torch.zeros_like(cos_theta), (count * cos_theta) / safe)


class ModelStock(WholeInputs):
    name = "model_stock"
    params = (Param("filter_wise", bool, per_expert=False, default=False, expect="true or false"),)
    experts_range = (2, None)

    def kernel(self, job, dev: str, scratch):
        if dev == "cpu" and not job.params.shared["filter_wise"]:
            return JoinedTensor(job, lambda job, base, inputs, pool: joined(base, inputs, pool))
        return super().kernel(job, dev, scratch)

    def merge(self, job, base, inputs, pool):
        return model_stock(base, inputs, job.params.shared["filter_wise"], pool)


MODEL_STOCK = register(ModelStock())
