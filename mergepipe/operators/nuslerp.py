"""NuSLERP, as mergekit 0.1.5 computes it: two models' spherical interpolation at t = w_1 / (w_0 + w_1),
over the flattened tensor (default), each row, or each column; with a base, of the two deltas, added
to it. Without a base_model the first model is read as the base and is also expert 0."""

from __future__ import annotations

import torch

from . import Param, register
from .whole import SPARES, JoinedTensor, deltas, each_job, each_step, scratch, shares
from .whole_only import WholeInputs, is_base


def nuslerp(t: float, v0: torch.Tensor, v1: torch.Tensor, dim: int = -1, eps: float = 1e-8,
            flatten: bool = False, pool=None, out: torch.Tensor | None = None) -> torch.Tensor:
    """mergekit's nuslerp; flattened, into `out` when given."""
    out_shape = v0.shape

    def normalize(x: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
        return x / torch.norm(x, dim=-1, keepdim=True).clamp(min=eps)

    if flatten:
        flat_out = None if out is None else out.reshape(-1)
        return _flat(t, v0.reshape(-1), v1.reshape(-1), eps, pool, flat_out).reshape(out_shape)
    if dim != -1:
        v0, v1 = v0.transpose(dim, -1), v1.transpose(dim, -1)
    v0_u, v1_u = normalize(v0), normalize(v1)
    cos_theta = torch.sum(v0_u * v1_u, dim=-1, keepdim=True).clamp(-1, 1)
    colinear = (1 - cos_theta.square()) <= eps ** 2
    theta = torch.acos(torch.where(colinear, 0, cos_theta))
    sin_theta = torch.sin(theta)
    result = (torch.sin((1 - t) * theta) * v0 + torch.sin(t * theta) * v1) / sin_theta
    result = torch.where(colinear, (1 - t) * v0 + t * v1, result)
    if dim != -1:
        result = result.transpose(dim, -1)
    return result.reshape(out_shape)


def _flat(t: float, v0: torch.Tensor, v1: torch.Tensor, eps: float, pool,
          out: torch.Tensor | None = None) -> torch.Tensor:
    """nuslerp over flat tensors, into `out` when given (v0 or v1 included)."""
    n = v0.numel()
    mix = _flat_mix(t, v0, v1, eps, pool)
    out = SPARES.take(n, v0.device) if out is None else out
    each_step(pool, n, lambda lo, hi: mix(lo, hi, out[lo:hi]))
    return out


def _flat_mix(t: float, v0: torch.Tensor, v1: torch.Tensor, eps: float, pool):
    """mergekit's flat nuslerp up to its coefficients; then mix(lo, hi, out), its result's entries
    [lo, hi) into `out` (which may be v0's or v1's own). Each norm and the dot product stay one torch
    sum over the whole tensor (its bits), the two norms side by side; the elementwise passes are split
    over the pool."""
    n = v0.numel()
    (c0, c1), _ = each_job(pool, [lambda s: torch.norm(v0, dim=-1, keepdim=True).clamp(min=1e-7),
                                  lambda s: torch.norm(v1, dim=-1, keepdim=True).clamp(min=1e-7)], 0, v0.device)
    product = SPARES.take(n, v0.device)
    each_step(pool, n, lambda lo, hi: torch.mul(v0[lo:hi] / c0, v1[lo:hi] / c1, out=product[lo:hi]))
    cos_theta = torch.sum(product, dim=-1, keepdim=True).clamp(-1, 1)
    SPARES.release(product)  # the output may reuse it
    colinear = bool((1 - cos_theta.square()) <= eps ** 2)
    theta = torch.acos(torch.where(torch.tensor(colinear), 0, cos_theta))
    sin_theta = torch.sin(theta)
    s0, s1 = torch.sin((1 - t) * theta), torch.sin(t * theta)

    def mix(lo: int, hi: int, out: torch.Tensor) -> None:
        a, b = v0[lo:hi], v1[lo:hi]
        out[...] = (1 - t) * a + t * b if colinear else (s0 * a + s1 * b) / sin_theta
    return mix


class NuSlerp(WholeInputs):
    name = "nuslerp"
    params = (
        Param("weight", float, per_expert=True, expect="a number"),
        Param("nuslerp_row_wise", bool, per_expert=False, default=False, expect="true or false"),
        Param("nuslerp_flatten", bool, per_expert=False, default=True, expect="true or false"),
    )
    base_policy = "optional"
    experts_range = (2, 2)

    def _t(self, job) -> float:
        weights = job.params.weights()
        total = sum(weights)
        return 0.5 if abs(total) < 1e-6 else weights[1] / total

    def kernel(self, job, dev: str, scratch):
        # flattened with a base (the usual recipe) on the CPU: the base is never copied to float32; the
        # deltas are made from the blocks as read, and the base is added back as the output is written
        if dev == "cpu" and job.params.shared["nuslerp_flatten"] and not is_base(job, 0):
            return JoinedTensor(job, self._deltas_plan)
        return super().kernel(job, dev, scratch)

    def _deltas_plan(self, job, base, inputs, pool):
        cpu = torch.device("cpu")
        d0, d1 = deltas(base, inputs, pool)
        mix = _flat_mix(self._t(job), d0, d1, 1e-8, pool)

        def fill(lo: int, hi: int, out: torch.Tensor) -> None:
            mix(lo, hi, out)
            torch.add(base.into(scratch(0, hi - lo, cpu), lo), out, out=out)
        return fill

    def merge(self, job, base, inputs, pool):
        shared, t = job.params.shared, self._t(job)
        dim, flatten = (0 if shared["nuslerp_row_wise"] else -1), shared["nuslerp_flatten"]
        if is_base(job, 0):  # no base_model: the two models themselves
            return nuslerp(t, inputs[0], inputs[1], dim=dim, flatten=flatten, pool=pool)
        b, n = base.reshape(-1), base.numel()
        # each delta in its model's buffer (one of its own where the model is the base itself), and the
        # result in the first delta's
        diffs = [x.reshape(-1) if not shares(x, base) else SPARES.take(n, b.device) for x in inputs]
        sources = [x.reshape(-1) for x in inputs]
        inputs.clear()

        def diff(lo: int, hi: int) -> None:
            for d, x in zip(diffs, sources):
                torch.sub(x[lo:hi], b[lo:hi], out=d[lo:hi])
        each_step(pool, n, diff)
        sources.clear()
        out = nuslerp(t, *(d.view(base.shape) for d in diffs), dim=dim, flatten=flatten, pool=pool,
                      out=diffs[0].view(base.shape) if flatten else None).reshape(-1)
        diffs.clear()
        each_step(pool, n, lambda lo, hi: torch.add(b[lo:hi], out[lo:hi], out=out[lo:hi]))
        return out.view(base.shape)


NUSLERP = register(NuSlerp())
