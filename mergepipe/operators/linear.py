"""Linear: M = sum_i w_i W_i [/ sum_i w_i when normalize], over the listed models in order, the base
among them when one is given (mergekit weighs it like any input; without a base_model the first
model is read as the base).

With W_i = W0 + Delta_i this is a W0 + sum_k c_k Delta_k with per-tensor scalars (a = 1 when
normalised): additive, so the planner and the Frobenius certificate apply, and a block the plan does
not read for a model is that model's copy of the base. The arithmetic is mergekit 0.1.5's, operation
for operation: a float32 running addcmul from zero in model order, then one division by the float32
sum of the weights."""

from __future__ import annotations

import torch

from . import Blockwise, Operator, Param, TensorParams, register
from .ta import CHUNK


class Linear(Operator):
    name = "linear"
    params = (
        Param("weight", float, per_expert=True, expect="a number"),
        Param("normalize", bool, per_expert=False, default=True, expect="true or false"),
    )
    additive = True
    base_policy = "input"

    def coefficients(self, tp: TensorParams) -> list[float]:
        w = tp.weights()
        div = sum(w) if tp.shared["normalize"] else 1.0
        return [x / div if div else 0.0 for x in w]

    def kernel(self, job, dev: str, scratch) -> Blockwise:
        weights = job.params.weights()
        normalize = job.params.shared["normalize"]
        tdev = torch.device(dev)
        from ..tensors import all_finite, to_bytes, torch_dtype

        def merge(block):
            read = dict(block.experts)
            inputs = [read.get(k, block.base) for k in range(len(weights))]
            w = torch.tensor([weights], dtype=torch.float32, device=tdev)  # [1, inputs], as mergekit batches it
            coefs, total = w.unbind(1), w.sum(dim=1)
            n = block.base.numel
            out = torch.empty(n, dtype=torch_dtype(block.job.out_dtype), device=tdev)
            # torch, not numpy: mergekit's addcmul_ is one fused multiply-add, which numpy lacks. On
            # the CPU a cache-sized step at a time, so that each input is widened and added in cache.
            step = min(CHUNK if tdev.type == "cpu" else n, n)
            acc, x = (torch.empty(step, dtype=torch.float32, device=tdev) for _ in range(2))
            for s in range(0, n, step):
                m = min(step, n - s)
                a, xv = acc[:m], x[:m]
                a.zero_()
                for src, coef in zip(inputs, coefs):
                    src.into(xv, s)
                    a.addcmul_(xv, coef)
                if normalize:
                    a.div_(total)
                out[s:s + m] = a
            block.check_finite(all_finite(out))
            return to_bytes(out)
        return Blockwise(job.name, merge)


LINEAR = register(Linear())
