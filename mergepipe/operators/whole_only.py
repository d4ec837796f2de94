"""What the operators that need every input whole share: each expert's every block is a candidate
(a budget under 100% is refused before planning), and the kernel assembles whole tensors."""

from __future__ import annotations

import numpy as np
import torch

from . import Candidates, Operator
from .whole import WholeTensor


class WholeInputs(Operator):
    budgeted = False

    def coefficients(self, tp) -> list[float]:
        return [1.0] * len(tp.experts)  # not used to rank: every block is read

    def candidates(self, info, k, delta, tp, coef, data) -> Candidates:
        blocks = np.arange(len(delta.l2))
        return Candidates(blocks, delta.l2, delta.l2)

    def kernel(self, job, dev: str, scratch):
        return WholeTensor(job, torch.device(dev), self.merge)

    def merge(self, job, base: torch.Tensor, inputs: list, pool) -> torch.Tensor:
        raise NotImplementedError


def is_base(job, k: int) -> bool:
    """Whether expert k is the base itself (a method whose base is optional, given none)."""
    e, b = job.experts[k], job.base
    return e.file == b.file and e.start == b.start
