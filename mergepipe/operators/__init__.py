"""Merge operators: each a small pure function over one block of a tensor group, with a declarative
spec of its parameters. Unknown parameters, parameters a method does not take, and out-of-range
values are errors (mergekit silently ignores the first two)."""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Callable

from ..errors import MergepipeError


@dataclass(frozen=True)
class Param:
    name: str
    type: type
    per_expert: bool  # mergekit's NON_BASE scope: set under models[].parameters (or a global default)
    default: Any = None  # None: required
    check: Callable[[Any], bool] = lambda v: True
    expect: str = ""

    def coerce(self, value: Any, where: str) -> Any:
        if self.type is bool:
            ok = isinstance(value, bool)
        elif self.type is float:
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
            value = float(value) if ok else value
        else:
            ok = isinstance(value, self.type)
        if isinstance(value, (list, dict)):
            raise MergepipeError(f"{where}: parameter {self.name!r} is a {type(value).__name__}; "
                                 "per-tensor gradients and filters are not supported, give a scalar")
        if not ok or not self.check(value):
            raise MergepipeError(f"{where}: parameter {self.name!r} = {value!r}, expected {self.expect or self.type.__name__}")
        return value


@dataclass(frozen=True)
class Operator:
    name: str
    aliases: tuple[str, ...]
    params: tuple[Param, ...]
    additive: bool  # M = W0 + sum_k c_k Delta_k: the Frobenius error certificate applies
    validate: Callable[[dict], None] | None = None  # rules across shared parameters; raises MergepipeError

    def param(self, name: str) -> Param | None:
        return next((p for p in self.params if p.name == name), None)

    def resolve(self, shared: dict, per_expert: list[dict], where: str) -> tuple[dict, list[dict]]:
        """Validate and fill defaults: (global parameters, one dict per expert)."""
        g: dict = {}
        for key, value in shared.items():
            p = self.param(key)
            if p is None:
                raise MergepipeError(f"{where}: {self.name} takes no parameter {key!r} "
                                     f"(it takes {', '.join(q.name for q in self.params)})")
            g[key] = p.coerce(value, where)
        experts = []
        for i, given in enumerate(per_expert):
            e = {}
            for key, value in given.items():
                p = self.param(key)
                if p is None or not p.per_expert:
                    raise MergepipeError(f"{where}: models[{i}]: {self.name} takes no per-model parameter {key!r}")
                e[key] = p.coerce(value, f"{where}: models[{i}]")
            for p in self.params:
                if p.per_expert and p.name not in e:
                    if p.name in g:
                        e[p.name] = g[p.name]
                    elif p.default is not None:
                        e[p.name] = p.default
                    else:
                        raise MergepipeError(f"{where}: models[{i}]: parameter {p.name!r} is required for {self.name}")
            experts.append(e)
        shared_out = {p.name: g.get(p.name, p.default) for p in self.params if not p.per_expert}
        if self.validate is not None:
            try:
                self.validate(shared_out)
            except MergepipeError as e:
                raise MergepipeError(f"{where}: {e}") from None
        return shared_out, experts


# name or alias -> (module, attribute). Imported on first use: TIES and GCWM compute with torch,
# and a CPU task-arithmetic run should not pay for importing it.
OPERATORS: dict[str, tuple[str, str]] = {
    "task_arithmetic": ("ta", "TA"), "ta": ("ta", "TA"),
    "ties": ("ties", "TIES"),
    "gcwm": ("gcwm", "GCWM"),
}


def get(name: str) -> Operator:
    where = OPERATORS.get(name)
    if where is None:
        raise MergepipeError(f"merge_method {name!r} is not supported (expected one of {', '.join(sorted(OPERATORS))})")
    return getattr(importlib.import_module(f".{where[0]}", __name__), where[1])
