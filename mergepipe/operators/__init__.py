"""Merge operators. Each is one declaration that owns its behaviour: its parameters, its access unit
(row blocks or whole tensors), the score the planner ranks its reads by, its plan check, its
certificate and its kernel. The planner, the manifest and the executor call these hooks and never ask
which operator they have.

Unknown parameters, parameters a method does not take, and out-of-range values are errors (mergekit
silently ignores the first two)."""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Protocol

import numpy as np

from ..errors import MergepipeError

if TYPE_CHECKING:
    from ..index import TensorDelta
    from ..sources import BlockInputs, TensorSources


@dataclass(frozen=True)
class Param:
    name: str
    type: type
    per_expert: bool  # mergekit's NON_BASE scope: set under models[].parameters (or a global default)
    default: Any = None  # None: required
    check: Callable[[Any], bool] = lambda v: True
    expect: str = ""
    since_default: bool = False  # added after manifests were written: one that omits it means the default

    def coerce(self, value: Any, where: str) -> Any:
        if self.type is bool:
            ok = isinstance(value, bool)
        elif self.type is int:
            ok = isinstance(value, int) and not isinstance(value, bool)
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
class Candidates:
    """What one (tensor, expert) offers the planner: the blocks that can change the result (for a
    whole-tensor operator, [0] stands for the tensor), each block's score (higher is read first, per
    byte) and its share of the certificate (|c_k| * ||Delta_kb||_F; unused by non-additive operators)."""
    blocks: np.ndarray
    score: np.ndarray
    share: np.ndarray


@dataclass(frozen=True)
class Certificate:
    kind: str  # "frobenius": ||M - M_A||_F <= bound; "none"
    bound: float | None
    note: str


@dataclass(frozen=True)
class TensorParams:
    """One tensor's resolved parameters: what its kernel reads, never the global config."""
    shared: dict[str, Any]
    experts: tuple[dict[str, Any], ...]

    def weights(self) -> list[float]:
        return [p["weight"] for p in self.experts]


class Kernel(Protocol):
    """Merges one output tensor from its blocks. `compute` is pure and runs on the compute pool in
    any order; `take` runs in block order on the writing thread; `finish` ends the tensor in the sink
    (sink.end) after its last block, and may use the compute pool, idle meanwhile, for a whole-tensor
    pass (`pool`; None: compute on the calling thread)."""
    journal_blocks: bool  # a journal record may end after any block (a killed run resumes inside it)
    in_place: bool  # the kernel patches its bytes in the file after writing them (no O_DIRECT)

    def compute(self, b: int, block: BlockInputs) -> Any: ...
    def take(self, b: int, result: Any, sink) -> None: ...
    def finish(self, sink, pool=None) -> None: ...


class Operator:
    """The defaults of every hook; a declaration overrides what differs."""
    name: str = ""
    aliases: tuple[str, ...] = ()
    params: tuple[Param, ...] = ()
    unit = "block"  # "block": row blocks are read independently; "tensor": whole (expert, tensor) pairs
    additive = False  # M = W0 + sum_k c_k Delta_k: the Frobenius certificate applies
    continual = False  # `mergepipe continual` may merge with it, one expert at a time
    budgeted = True  # False: the merge needs every input whole; a budget under 100% is refused
    # "required": the base is read as W0 and its parameters are not the method's; "optional": as
    # required when given, else the first model is read as the base and is also expert 0 (nuslerp);
    # "input": the base, if given, is one of the merged models, listed with its own parameters
    # (linear, passthrough), and without one the first model is read as the base
    base_policy = "required"
    experts_range: tuple[int, int | None] = (1, None)  # how many experts it merges (min, max)
    index_stats: tuple[str, ...] = ()  # optional index statistics its plan reads (index.OPTIONAL_STATS)

    def inputs(self, base: str | None, models: list[str], where: str) -> tuple[str, list[int]]:
        """The model read as the base, and which of `models` are the experts (indices, in order)."""
        if base is None and self.base_policy == "required":
            raise MergepipeError(f"{where}: missing required key 'base_model' ({self.name} needs a base)")
        if self.base_policy == "required" or (self.base_policy == "optional" and base is not None):
            experts = [i for i, m in enumerate(models) if m != base]
        else:
            if base is not None and base not in models:
                raise MergepipeError(f"{where}: base_model {base!r} must also be listed under models, with its "
                                     f"parameters ({self.name} merges the base as one of its inputs, as mergekit does)")
            experts = list(range(len(models)))
        lo, hi = self.experts_range
        n = len(experts)
        if n < lo or (hi is not None and n > hi):
            what = "models besides the base" if self.base_policy != "input" and base is not None else "models"
            want = f"exactly {lo}" if lo == hi else f"at least {lo}" if hi is None else f"{lo} to {hi}"
            raise MergepipeError(f"{where}: {self.name} merges {want} {what}, the config lists {n}")
        return (base if base is not None else models[0]), experts

    def param(self, name: str) -> Param | None:
        return next((p for p in self.params if p.name == name), None)

    def known(self, key: str, where: str, expert: int | None = None) -> Param:
        """The parameter `key` (a per-model one when `expert` is given), or the one-line refusal."""
        p = self.param(key)
        if expert is not None and (p is None or not p.per_expert):
            raise MergepipeError(f"{where}: models[{expert}]: {self.name} takes no per-model parameter {key!r}")
        if p is None:
            raise MergepipeError(f"{where}: {self.name} takes no parameter {key!r} "
                                 f"(it takes {', '.join(q.name for q in self.params) or 'none'})")
        return p

    def validate(self, shared: dict) -> None:
        """Rules across shared parameters that one Param cannot see; raises MergepipeError."""

    def resolve(self, shared: dict, per_expert: list[dict], where: str) -> tuple[dict, list[dict]]:
        """Validate and fill defaults: (global parameters, one dict per expert)."""
        g: dict = {}
        for key, value in shared.items():
            g[key] = self.known(key, where).coerce(value, where)
        experts = []
        for i, given in enumerate(per_expert):
            e = {key: self.known(key, where, i).coerce(value, f"{where}: models[{i}]") for key, value in given.items()}
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
        missing = [k for k, v in shared_out.items() if v is None]
        if missing:
            raise MergepipeError(f"{where}: parameter {missing[0]!r} is required for {self.name}")
        try:
            self.validate(shared_out)
        except MergepipeError as e:
            raise MergepipeError(f"{where}: {e}") from None
        return shared_out, experts

    # --- planning -------------------------------------------------------------------------------

    def readable(self, tensors: dict, shared: dict, where: str) -> set[str]:
        """Names of the floating tensors whose expert bytes this operator may read (the rest are the
        base's). `tensors`: the base's TensorInfo by name."""
        return {n for n, info in tensors.items() if info.is_float}

    def coefficients(self, tp: TensorParams) -> list[float]:
        """c_k in M = W0 + sum_k c_k Delta_k: what the scores and the certificate multiply."""
        lam = tp.shared.get("lambda", 1.0)
        return [w * lam for w in tp.weights()]

    def candidates(self, info, k: int, delta: TensorDelta, tp: TensorParams, coef: float,
                   data: dict | None) -> Candidates:
        """Every block whose delta is non-zero, scored by |c_k| * ||Delta_kb||_F."""
        share = abs(coef) * delta.l2
        idx = np.nonzero((delta.l2 > 0) & (coef != 0))[0]
        return Candidates(idx, share[idx], share[idx])

    def tensor_data(self, info, deltas: list[TensorDelta], tp: TensorParams) -> dict | None:
        """What the kernel needs about the whole tensor before it reads a block (from the index), kept
        in the plan; None if nothing."""
        return None

    def settle(self, data: dict | None, whole: bool) -> dict | None:
        """The tensor's plan data once the plan is chosen; `whole`: every candidate block is read."""
        return data

    def certificate(self, bound: float | None, data: dict | None = None) -> Certificate:
        """The plan's certificate from its bound; `data`: each tensor's settled plan data."""
        if not self.additive:
            return Certificate("none", None, f"{self.name} is not additive: only the measured deviation is reported")
        if bound is None:
            return Certificate("none", None, "the inputs hold NaN or Inf (allowed by --allow-nonfinite): no bound")
        return Certificate("frobenius", bound, "||M - M_A||_F <= sqrt(sum over blocks b of (sum over omitted "
                           "experts k of |c_k| * ||Delta_kb||_F)^2), in exact arithmetic before rounding to "
                           "the output dtype")

    def check_plan(self, name: str, tp, experts: int) -> None:
        """Refuse a (hand-edited) plan entry this operator cannot execute; raises MergepipeError."""
        if tp.data is not None:
            raise MergepipeError(f"plan.tensors.{name}.data: {self.name} keeps no per-tensor data")

    # --- execution ------------------------------------------------------------------------------

    def kernel(self, job: TensorSources, dev: str, scratch: Path) -> Kernel:
        """The kernel of one output tensor on device `dev`; `scratch`: a folder for its spill files."""
        raise NotImplementedError

    def passthrough(self, block: BlockInputs) -> np.ndarray:
        """Output bytes of a block no expert is read for: base + 0, as mergekit computes it (so a
        stored -0.0 becomes +0.0). An operator that copies the base bit for bit overrides this."""
        return block.base_plus_zero()


# name -> (module, attribute): declarations imported on first use, so that a CPU task-arithmetic
# run does not pay for importing torch (TIES and GCWM compute with it).
_LAZY: dict[str, str] = {
    "task_arithmetic": "ta", "ta": "ta", "ties": "ties", "gcwm": "gcwm", "linear": "linear",
    "slerp": "slerp", "nuslerp": "nuslerp", "model_stock": "model_stock", "passthrough": "passthrough",
    **{n: "gta" for n in ("dare_ties", "dare_linear", "breadcrumbs", "breadcrumbs_ties", "della", "della_linear")},
}
_REGISTERED: dict[str, Operator] = {}
# Per method whose CPU merge assembles whole float32 tensors: how many buffers of the largest tensor
# it takes beyond one per expert (warm.for_manifest faults them in while torch loads, so this must
# stay torch-free; test_warm checks it against what each merge takes)
WHOLE_BUFFERS: dict[str, int] = {
    "nuslerp": 1, "model_stock": 2,
    **{n: 1 for n in ("dare_ties", "dare_linear", "breadcrumbs", "breadcrumbs_ties", "della", "della_linear")},
}


def register(op: Operator) -> Operator:
    """Add an operator (and its aliases) to the registry; returns it, so a module can declare
    `NAME = register(MyOperator())`."""
    for name in (op.name, *op.aliases):
        _REGISTERED[name] = op
    return op


def names() -> list[str]:
    return sorted({*_LAZY, *_REGISTERED})


def get(name: str) -> Operator:
    op = _REGISTERED.get(name)
    if op is not None:
        return op
    where = _LAZY.get(name)
    if where is None:
        raise MergepipeError(f"merge_method {name!r} is not supported (expected one of {', '.join(names())})")
    importlib.import_module(f".{where}", __name__)  # registers its declarations
    return _REGISTERED[name]


class Blockwise:
    """The kernel of a block-separable operator: `merge(block) -> output bytes` per block, written as
    it comes, with a journal record possible after each block."""
    journal_blocks = True
    in_place = False

    def __init__(self, name: str, merge: Callable[[BlockInputs], np.ndarray]) -> None:
        self.name, self._merge = name, merge

    def compute(self, b: int, block: BlockInputs) -> np.ndarray:
        return self._merge(block)

    def take(self, b: int, result: np.ndarray, sink) -> None:
        sink.write(result)
        sink.block_done(self.name)

    def finish(self, sink, pool=None) -> None:
        sink.end(self.name)
