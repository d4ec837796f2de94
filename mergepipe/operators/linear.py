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
            base = block.base.tensor(tdev)
            read = dict(block.experts)
            w = torch.tensor([weights], dtype=torch.float32, device=tdev)  # [1, inputs], as mergekit batches it
            result = torch.zeros_like(base)
            for k, coef in enumerate(w.unbind(1)):
                result.addcmul_(read[k].tensor(tdev) if k in read else base, coef)
            if normalize:
                result.div_(w.sum(dim=1))
            block.check_finite(all_finite(result))
            return to_bytes(result.to(torch_dtype(block.job.out_dtype)))
        return Blockwise(job.name, merge)


LINEAR = register(Linear())
