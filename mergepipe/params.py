"""Parameters per tensor: the resolver turns a recipe's parameter settings into one value per
(tensor, expert) at plan time, and the plan records them, so a kernel never reads the global config.

A setting is a scalar, a gradient (a list interpolated over the layer's position in its slice) or
`filter:` rules (mergepipe.recipe), looked up as mergekit 0.1.5 does: for a per-expert parameter,
the expert's own parameters in the tensor's slice, then the slice's, then the recipe's global ones;
for a shared parameter the slice's, then the global ones. Filters match the output tensor's name for
shared parameters and the expert's input tensor's name for its own, as in mergekit. A tensor whose
settings are all scalars shares one TensorParams with every other such tensor."""

from __future__ import annotations

from dataclasses import dataclass, field

from . import recipe
from .layers import Target
from .operators import Operator, TensorParams


@dataclass(frozen=True)
class Scopes:
    """The settings in force for one slice: per expert (its own), the slice's, and the global ones."""
    experts: tuple[dict, ...]
    slice: dict = field(default_factory=dict)
    shared: dict = field(default_factory=dict)


class Resolver:
    def __init__(self, op: Operator, shared: dict, experts: list[dict], slices: list[Scopes] | None = None,
                 where: str = "<config>") -> None:
        self.op = op
        self.where = where
        self.slices = slices or [Scopes(tuple(experts), {}, shared)]
        # what is decided once per merge (GCWM's targets): the shared defaults, and the global scalars
        self.shared = {**{p.name: p.default for p in op.params if not p.per_expert and p.default is not None},
                       **{k: v for k, v in shared.items() if recipe.is_uniform(v)}}
        self._cache: dict[tuple, TensorParams] = {}

    def tensor(self, name: str, target: Target | None = None) -> TensorParams:
        """The parameters of output tensor `name` (read from `target.source` at `target.t`)."""
        t = target.t if target else 0.0
        source = target.source if target else name
        sc = self.slices[target.slice if target else 0]
        where = f"{self.where}: tensor {name!r}"
        shared, experts = {}, []
        for p in self.op.params:
            if not p.per_expert:
                v = recipe.resolve(p, (sc.slice, sc.shared), name, t, where)
                if v is not None:
                    shared[p.name] = v
        for mine in sc.experts:
            e = {}
            for p in self.op.params:
                if p.per_expert:
                    v = recipe.resolve(p, (mine, sc.slice, sc.shared), source, t, where)
                    if v is not None:
                        e[p.name] = v
            experts.append(e)
        key = (tuple(sorted(shared.items())), tuple(tuple(sorted(e.items())) for e in experts))
        hit = self._cache.get(key)
        if hit is None:
            g, per = self.op.resolve(shared, experts, where)
            hit = self._cache[key] = TensorParams(g, tuple(per))
        return hit


def check_settings(op: Operator, shared: dict, experts: list[dict], where: str) -> tuple[dict, list[dict]]:
    """Every setting's form and scalars checked against the operator's parameters (unknown names,
    per-model use of a shared parameter, out-of-range values), before any model is opened."""
    out_shared = {}
    for key, value in shared.items():
        out_shared[key] = recipe.check_setting(value, op.known(key, where), f"{where}: parameters.{key}")
    out_experts = [{key: recipe.check_setting(value, op.known(key, where, i), f"{where}: models[{i}].parameters.{key}")
                    for key, value in given.items()} for i, given in enumerate(experts)]
    return out_shared, out_experts


def uniform(shared: dict, experts: list[dict]) -> bool:
    return all(recipe.is_uniform(v) for d in (shared, *experts) for v in d.values())
