"""Passthrough (unsliced): the one listed model's tensors, each times its optional `scale`, as mergekit
0.1.5 writes them. The model is read as the base, so no expert byte is read; layer stacking with
`slices` is the recipe's business, not this operator's."""

from __future__ import annotations

import numpy as np

from . import Blockwise, Candidates, Operator, Param, register


class Passthrough(Operator):
    name = "passthrough"
    # mergekit's default is None (no scaling); x * 1.0 is x bit for bit, so 1.0 stands for it
    params = (Param("scale", float, per_expert=True, default=1.0, expect="a number"),)
    base_policy = "input"
    experts_range = (1, 1)

    def coefficients(self, tp) -> list[float]:
        return [0.0]  # its one expert is the base: nothing to weigh

    def candidates(self, info, k, delta, tp, coef, data):
        empty = np.zeros(0, np.int64)  # the expert is the base itself: nothing to read
        return Candidates(empty, np.zeros(0), np.zeros(0))

    def kernel(self, job, dev: str, scratch) -> Blockwise:
        scale = job.params.experts[0]["scale"]

        def merge(block) -> np.ndarray:
            if scale == 1.0:
                return block.base_copy()
            import torch
            from ..tensors import all_finite, to_bytes, torch_dtype
            out = block.base.tensor(torch.device(dev)) * scale
            block.check_finite(all_finite(out))
            return to_bytes(out.to(torch_dtype(block.job.out_dtype)))
        return Blockwise(job.name, merge)


PASSTHROUGH = register(Passthrough())
