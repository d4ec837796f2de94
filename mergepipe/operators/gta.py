"""The generalized task arithmetic of mergekit 0.1.5: each delta sparsified by one rule (DARE's
random drop, breadcrumbs' outlier-and-tail cut, DELLA's rank-weighted drop), weighted, combined with
or without TIES's sign consensus, normalised, scaled by lambda and added to the base. One declaration
per mergekit method name, each (sparsifier, consensus, defaults) as mergekit registers it; task
arithmetic and TIES have their own streaming declarations (ta.py, ties.py).

The sparsifiers rank or rescale over the whole (expert, tensor), so the kernel assembles whole
tensors (whole.py). A budget omits blocks: an omitted block is a zero delta, exactly as for task
arithmetic, and the trim and rescale then see the blocks read."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ..errors import MergepipeError
from . import Certificate, Operator, Param, register
from . import positional as P
from . import sparsify as S
from .ties_stream import elect_and_mean
from .whole import SPARES, WholeTensor, each_step, shares

CHUNK = 1 << 18  # elements per step after sparsification: the consensus's temporaries stay in cache


@dataclass(frozen=True)
class Rule:
    """A sparsification rule: its mergekit parameters beyond density, and how it applies."""
    extra: tuple[Param, ...]
    apply: Callable  # (delta, expert params, key, rescale) -> the delta, sparsified in place
    random: bool  # draws per entry: the seed parameter applies


RANDOM = Rule((), lambda d, p, key, rescale: S.bernoulli(d, p["density"], key, rescale, out=d), True)
OUTLIERS = Rule((Param("gamma", float, per_expert=True, default=0.01, check=lambda v: 0 <= v <= 1,
                       expect="a fraction in [0, 1]"),),
                lambda d, p, key, rescale: S.magnitude_outliers(d, p["density"], p["gamma"], key, rescale, out=d),
                False)
MAGNITUDE = Rule((), lambda d, p, key, rescale: S.magnitude(d, p["density"], key, rescale, out=d), False)
DELLA = Rule((Param("epsilon", float, per_expert=True, default=0.15, check=lambda v: 0 <= v < 1,
                    expect="a fraction in [0, 1)"),),
             lambda d, p, key, rescale: S.della_magprune(d, p["density"], p["epsilon"], key, rescale, out=d), True)


def _flag(name: str, default: bool) -> Param:
    return Param(name, bool, per_expert=False, default=default, expect="true or false")


class GeneralizedTaskArithmetic(Operator):
    additive = False

    def __init__(self, name: str, rule: Rule, consensus: bool, normalize: bool, rescale: bool,
                 stream: str = "sparsify") -> None:
        self.name, self.rule, self.consensus, self.stream = name, rule, consensus, stream
        self.params = (
            Param("weight", float, per_expert=True, expect="a number"),
            Param("density", float, per_expert=True, default=1.0, check=lambda v: 0 <= v <= 1,
                  expect="a fraction in [0, 1]"),
            *rule.extra,
            Param("lambda", float, per_expert=False, default=1.0, expect="a number"),
            _flag("normalize", normalize), _flag("rescale", rescale), _flag("int8_mask", False),
            # mergepipe's: the per-entry draws are a hash of (seed, tensor, expert, position)
            *((Param("seed", int, per_expert=False, default=0, expect="an integer"),) if rule.random else ()),
        )

    def resolve(self, shared: dict, per_expert: list[dict], where: str):
        g, experts = super().resolve(shared, per_expert, where)
        for i, p in enumerate(experts):
            eps = p.get("epsilon")
            if eps is not None and 0 < p["density"] < 1 and not (0 < p["density"] - eps and p["density"] + eps < 1):
                raise MergepipeError(f"{where}: models[{i}]: epsilon {eps} must keep density +/- epsilon "
                                     f"inside (0, 1) (density {p['density']})")
        return g, experts

    def certificate(self, bound, data=None) -> Certificate:
        return Certificate("none", None, f"{self.name} is not additive: its sparsification"
                           f"{' and sign election are' if self.consensus else ' is'} non-linear, so only the "
                           "measured deviation is reported")

    def kernel(self, job, dev: str, scratch):
        return WholeTensor(job, torch.device(dev), self.merge)

    def merge(self, job, base: torch.Tensor, inputs: list, pool=None) -> torch.Tensor:
        """mergekit's merge_group, operation for operation (float32): each delta sparsified whole,
        then the weighting, consensus and mean in chunks of elements (every operation after the
        sparsification is per element, or a sum over the experts, so chunking changes no bit)."""
        tp, shared = job.params, job.params.shared
        seed = shared.get("seed", 0)
        n = len(inputs)
        # each expert's buffer becomes its delta, and the base's the result; an expert read nowhere
        # (the base itself) gets a buffer of its own, taken here (a loan belongs to the taking thread)
        deltas = [SPARES.take(base.numel(), base.device).view(base.shape) if shares(x, base) else x for x in inputs]
        sources = list(inputs)
        inputs.clear()

        def sparsify(k: int) -> None:
            torch.sub(sources[k], base, out=deltas[k])
            self.rule.apply(deltas[k], tp.experts[k], P.stream_key(seed, job.name, k, self.stream), shared["rescale"])
        # one expert per compute thread: each rule is single-threaded torch over its own delta, so the
        # bits do not depend on which thread runs it
        if pool is None or n < 2 or base.device.type != "cpu":
            for k in range(n):
                sparsify(k)
        else:
            for f in [pool.submit(sparsify, k) for k in range(n)]:
                f.result()
        sources.clear()
        flat, b = [d.reshape(-1) for d in deltas], base.reshape(-1)
        mix, weights = (self._consensus if self.consensus else self._sum), tp.weights()
        each_step(pool, b.numel(), lambda lo, hi: mix(torch.stack([x[lo:hi] for x in flat]), b[lo:hi], weights,
                                                      shared), CHUNK)
        return base

    @staticmethod
    def _consensus(d: torch.Tensor, b: torch.Tensor, weights: list[float], shared: dict) -> None:
        """b += the sign-consensus mean of the deltas d [experts, m] (TIES's, element for element)."""
        b.copy_(elect_and_mean(d, weights, shared["lambda"], shared["normalize"], b))

    @staticmethod
    def _sum(d: torch.Tensor, b: torch.Tensor, weights: list[float], shared: dict) -> None:
        """b += lambda * sum_k w_k d_k [/ sum_k w_k]."""
        w = torch.tensor(weights, dtype=d.dtype, device=d.device).view(-1, 1)
        mixed = d.mul_(w).sum(dim=0)
        if shared["normalize"]:
            divisor = w.sum(dim=0)
            divisor[divisor.abs() < 1e-8] = 1
            mixed /= divisor
        if shared["lambda"] != 1:
            mixed *= shared["lambda"]
        torch.add(b, mixed, out=b)


# (name, rule, sign consensus, normalize default, rescale default), as mergekit 0.1.5 registers them
for _spec in (("dare_ties", RANDOM, True, False, True), ("dare_linear", RANDOM, False, False, True),
              ("breadcrumbs", OUTLIERS, False, False, False), ("breadcrumbs_ties", OUTLIERS, True, False, False),
              ("della", DELLA, True, True, True), ("della_linear", DELLA, False, False, True)):
    register(GeneralizedTaskArithmetic(*_spec))
