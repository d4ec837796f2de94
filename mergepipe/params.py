"""Parameters per tensor: the resolver turns a config's parameters into one value per (tensor,
expert) at plan time, and the plan records them, so a kernel never reads the global config.

A value is a scalar today (the operator's Param rejects lists and mappings). mergekit's gradients
(a list interpolated over the layer index) and `filter:` rules resolve here, per tensor name, without
touching the planner or the kernels."""

from __future__ import annotations

from .operators import Operator, TensorParams


class Resolver:
    def __init__(self, op: Operator, shared: dict, experts: list[dict]) -> None:
        self.op = op
        self.shared = dict(shared)  # the config's, for what is decided once per merge (GCWM's targets)
        # every tensor resolves to the same scalars: one shared value, not one copy per tensor
        self._all = TensorParams(dict(shared), tuple(dict(e) for e in experts))

    def tensor(self, name: str) -> TensorParams:
        return self._all
