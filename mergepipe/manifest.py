"""The manifest: one versioned JSON document that describes a merge completely, written by `plan`
and completed by `execute`. Canonical (sorted keys, UTF-8, no NaN) and validated field by field on
load, like safetensors' header: anything off the schema is refused with the path of the bad field.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from . import operators, stages
from .errors import MergepipeError
from .operators import Certificate

SCHEMA = "mergepipe.manifest/2"
Int = typing.NewType("Int", int)  # any integer; a plain int field must be non-negative


@dataclass
class InputFile:
    name: str  # relative to the model's folder
    size: int
    header_hash: str
    blocks: dict[str, str]  # tensor -> concatenated 16-hex-digit xxh3_64 of each block
    content_hash: str


@dataclass
class SketchFile:
    """An expert's sketch sidecar: where it is, what it is, and each block's hash."""
    path: str
    size: int
    hash: str  # its identity: xxh3_128 of its size and header (each block has its own hash)
    kind: str
    params: dict[str, Int]
    blocks: dict[str, str]  # tensor -> concatenated 16-hex-digit xxh3_64 of each block's sketch


@dataclass
class InputModel:
    ref: str
    files: list[InputFile]
    sketch: Optional[SketchFile] = None


@dataclass
class OperatorSpec:
    name: str
    params: dict[str, Any]
    expert_params: list[dict[str, Any]]


@dataclass
class Budget:
    spec: str
    bytes: int
    expert_bytes_total: int


@dataclass
class TensorPlan:
    blocks: int
    rows_per_block: int
    selected: list[list[list[int]]]  # per expert: [start, end) block runs to read
    candidates: list[list[list[int]]]  # per expert: block runs that can contribute at all
    planned_bytes: int
    bound: Optional[float]  # certificate share for additive operators
    params: dict[str, Any]  # the operator's shared parameters, resolved for this tensor
    expert_params: list[dict[str, Any]]  # and per expert
    data: Optional[dict[str, Any]] = None  # what the operator's kernel needs to know beforehand (TIES: trims)
    sketched: Optional[list[list[list[int]]]] = None  # per expert: [start, end) block runs filled from its sketch


@dataclass
class OutputEntry:
    """One tensor of an output file the plan lays out itself (slices): the input tensor it is merged
    from, and the one model it reads where its slice stacks a single model's layers (-1: the base,
    k: expert k; None: the merge of every model)."""
    name: str
    source: str
    model: Optional[Int] = None


@dataclass
class OutputLayout:
    name: str  # the file, relative to the output folder
    tensors: list[OutputEntry]


@dataclass
class Plan:
    planner: str
    seed: int
    planned_expert_bytes: int
    tensors: dict[str, TensorPlan]
    certificate: Certificate
    allow_nonfinite: bool = False  # NaN/Inf inputs were allowed at planning: execution allows them too
    fill: str = "zero"  # what an unread expert block counts as: "zero" (no delta) or "sketch"
    layout: Optional[list[OutputLayout]] = None  # output files and tensors (None: the base's files and names)


@dataclass
class Stage:
    """A step after the merge, run into the same output (FeatCal): its kind and the record its own
    module planned, validated by that module on load."""
    kind: str
    record: dict[str, Any]


@dataclass
class OutputFile:
    size: int
    hash: str
    tensors: dict[str, str]


@dataclass
class JobRun:
    """How one file job (or part of a file) ran: where, how long, what it read. Not part of what the
    output depends on."""
    file: str
    first: int  # its first tensor in the file's layout
    tensors: int  # how many
    node: str  # the Ray node id, or "local"
    host: str  # the node's address (Ray) or this machine's name
    wall_s: float  # how long it ran on its workers (from each attempt's start to its end), every attempt included
    bytes_read: int  # input bytes, every attempt included (a killed one: up to its last journal record)
    attempts: int = 1
    resumed_bytes: int = 0  # output bytes its last attempt took over, journaled and on disk (not rewritten)


@dataclass
class Execution:
    device: str
    wall_s: float
    peak_rss_bytes: int
    peak_device_bytes: int
    bytes_read: dict[str, dict[str, int]]  # model ref as recorded -> file as recorded -> bytes
    expert_bytes_read: int
    base_bytes_read: int
    os_read_bytes: Optional[int]
    outputs: dict[str, OutputFile]
    root_hash: str
    finished_at: str
    resumed_bytes: int = 0  # output bytes taken over from a killed run (verified, not recomputed)
    # per tensor, what a non-additive operator reports (GCWM: active experts, ranks, conflict, gate, ...)
    diagnostics: Optional[dict[str, dict[str, Any]]] = None
    # per stage kind: the expert bytes it read, a second read after the merge's, charged to its own
    # budget (FeatCal: calibrate.budget) and counted in bytes_read and expert_bytes_read too
    stage_bytes_read: Optional[dict[str, int]] = None
    executor: Optional[str] = None  # local or ray
    jobs: Optional[list[JobRun]] = None  # in file order


@dataclass
class Recipe:
    """What the output folder gets besides the tensors: the recipe as given (mergekit_config.yml and
    the model card), the model whose tokenizer files are copied (-1: the base, k: expert k), the chat
    template to set, and config.json keys the plan changes (num_hidden_layers of stacked slices)."""
    source: str  # the recipe's file as given on the command line
    text: str
    method: str  # as the recipe names it
    tokenizer: Optional[Int] = None  # None: the base's, as copied by default
    chat_template: Optional[str] = None
    config: Optional[dict[str, Any]] = None
    dtype: Optional[str] = None  # the recipe's dtype (mergekit's compute dtype)


@dataclass
class Manifest:
    schema: str
    tool: dict[str, str]
    base: InputModel
    experts: list[InputModel]
    out_dtype: Optional[str]
    operator: OperatorSpec
    budget: Budget
    plan: Plan
    stages: list[Stage] = dataclasses.field(default_factory=list)
    execution: Optional[Execution] = None
    recipe: Optional[Recipe] = None

    def to_json(self) -> str:
        doc = dataclasses.asdict(self)
        for key, empty in (("resumed_bytes", 0), ("diagnostics", None), ("stage_bytes_read", None), ("executor", None),
                           ("jobs", None)):
            if doc["execution"] and doc["execution"][key] == empty:
                del doc["execution"][key]  # absent unless used: older manifests stay canonical
        if doc["recipe"] is None:
            del doc["recipe"]
        if doc["plan"]["layout"] is None:
            del doc["plan"]["layout"]
        return dumps(doc)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json() + "\n", encoding="utf-8")


def dumps(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, ensure_ascii=False, allow_nan=False, separators=(",", ":"))


@functools.lru_cache(maxsize=None)
def _schema(tp: type) -> tuple[dict, dict]:
    """A dataclass's resolved field types and fields (resolving string annotations is slow: done
    once per class, not once per object of a manifest that has thousands)."""
    return typing.get_type_hints(tp), {f.name: f for f in dataclasses.fields(tp)}


def _load(tp: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        return _load(next(a for a in args if a is not type(None)), value, where)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise MergepipeError(f"manifest: {where} must be an object")
        hints, fields = _schema(tp)
        extra = set(value) - set(fields)
        if extra:
            raise MergepipeError(f"manifest: {where} has unknown field {sorted(extra)[0]!r}")
        kwargs = {}
        for name, f in fields.items():
            if name not in value:
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                    raise MergepipeError(f"manifest: {where}.{name} is missing")
                continue
            kwargs[name] = _load(hints[name], value[name], f"{where}.{name}")
        return tp(**kwargs)
    if origin is list:
        if not isinstance(value, list):
            raise MergepipeError(f"manifest: {where} must be a list")
        return [_load(args[0], v, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise MergepipeError(f"manifest: {where} must be an object")
        return {k: _load(args[1], v, f"{where}.{k}") for k, v in value.items()}
    if tp is Any:
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise MergepipeError(f"manifest: {where} must be true or false")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise MergepipeError(f"manifest: {where} must be a finite number")
        return float(value)
    if tp is Int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise MergepipeError(f"manifest: {where} must be an integer")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise MergepipeError(f"manifest: {where} must be a non-negative integer")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise MergepipeError(f"manifest: {where} must be a string")
        return value
    raise TypeError(tp)  # a schema bug, not bad input


def load_record(tp: type, value: Any, where: str) -> Any:
    """A value of dataclass `tp` from its JSON form, validated field by field (for records that
    modules outside this one define, such as a stage's)."""
    return _load(tp, value, where)


def _check(m: Manifest) -> None:
    """Cross-field rules the types cannot express."""
    if m.schema != SCHEMA:
        raise MergepipeError(f"manifest: schema {m.schema!r} is not supported (expected {SCHEMA!r})")
    k = len(m.experts)
    op = operators.get(m.operator.name)
    if len(m.operator.expert_params) != k:
        raise MergepipeError(f"manifest: operator.expert_params has {len(m.operator.expert_params)} entries for {k} experts")
    _check_params(op, m.operator.params, m.operator.expert_params, "operator")
    if m.plan.fill not in ("zero", "sketch"):
        raise MergepipeError(f"manifest: plan.fill {m.plan.fill!r} is not 'zero' or 'sketch'")
    for name, tp in m.plan.tensors.items():
        for field_name in ("selected", "candidates", "sketched"):
            runs_per_expert = getattr(tp, field_name)
            if runs_per_expert is None:
                continue
            if len(runs_per_expert) != k:
                raise MergepipeError(f"manifest: plan.tensors.{name}.{field_name} must have one entry per expert ({k})")
            for e, runs in enumerate(runs_per_expert):
                end = 0
                for run in runs:  # sorted and disjoint, so counting them is cheap
                    if len(run) != 2 or not end <= run[0] < run[1] <= tp.blocks:
                        raise MergepipeError(f"manifest: plan.tensors.{name}.{field_name}[{e}] has run {run} "
                                             f"outside the tensor's {tp.blocks} blocks or out of order")
                    end = run[1]
        _check_sketched(m, name, tp)
        if len(tp.expert_params) != k:
            raise MergepipeError(f"manifest: plan.tensors.{name}.expert_params must have one entry per expert ({k})")
        _check_params(op, tp.params, tp.expert_params, f"plan.tensors.{name}")
        try:
            op.check_plan(name, tp, k)
        except MergepipeError as e:
            raise MergepipeError(f"manifest: {e}") from None
    _check_layout(m, k)
    for i, st in enumerate(m.stages):
        stages.get(st.kind, f"manifest: stages[{i}]").load(st.record, f"manifest: stages[{i}].record", k)
    for rec in [m.base, *m.experts]:
        recorded = [(f.name, f.blocks) for f in rec.files] + ([(rec.sketch.path, rec.sketch.blocks)] if rec.sketch else [])
        for where, blocks in recorded:
            for tensor, hx in blocks.items():
                if len(hx) % 16 or not all(c in "0123456789abcdef" for c in hx):
                    raise MergepipeError(f"manifest: block hashes of {tensor!r} in {where} must be 16 hex digits each")


def _check_layout(m: Manifest, k: int) -> None:
    """A laid-out output: each tensor once, each read from a model the manifest records."""
    seen: set[str] = set()
    for f in m.plan.layout or ():
        for e in f.tensors:
            if e.name in seen:
                raise MergepipeError(f"manifest: plan.layout lists tensor {e.name!r} twice")
            seen.add(e.name)
            if e.model is not None and not -1 <= e.model < k:
                raise MergepipeError(f"manifest: plan.layout: {e.name!r} reads model {e.model}, expected -1 "
                                     f"(the base) to {k - 1}")
    if m.recipe and m.recipe.tokenizer is not None and not -1 <= m.recipe.tokenizer < k:
        raise MergepipeError(f"manifest: recipe.tokenizer is {m.recipe.tokenizer}, expected -1 (the base) to {k - 1}")


def _check_sketched(m: Manifest, name: str, tp: TensorPlan) -> None:
    """Sketch-filled blocks: not also read exactly, and backed by a recorded sketch."""
    for k, runs in enumerate(tp.sketched or ()):
        if not runs:
            continue
        sk = m.experts[k].sketch
        if m.plan.fill != "sketch" or sk is None or name not in sk.blocks:
            raise MergepipeError(f"manifest: plan.tensors.{name}.sketched[{k}] names blocks, but experts[{k}] "
                                 "records no sketch of that tensor (or plan.fill is not 'sketch')")
        if len(sk.blocks[name]) != 16 * tp.blocks or runs_to_set(runs) & runs_to_set(tp.selected[k]):
            raise MergepipeError(f"manifest: plan.tensors.{name}.sketched[{k}] overlaps its selected blocks "
                                 f"or its sketch has not {tp.blocks} block hashes")


def with_late_defaults(op, shared: dict, per_expert: list[dict]) -> tuple[dict, list[dict]]:
    """Copies of recorded parameters with the defaults of those the operator gained after the
    manifest was written (`Param.since_default`) filled in: what a kernel is given."""
    late = [p for p in op.params if p.since_default]
    return ({**{p.name: p.default for p in late if not p.per_expert}, **shared},
            [{**{p.name: p.default for p in late if p.per_expert}, **e} for e in per_expert])


def _check_params(op, shared: dict, per_expert: list[dict], where: str) -> None:
    """Parameters as the planner wrote them: complete, known and in range. A parameter an operator
    gained after manifests were written (`Param.since_default`) may be absent: it then had its default."""
    params, experts = op.resolve(shared, per_expert, f"manifest: {where}")
    shared, per_expert = with_late_defaults(op, shared, per_expert)
    if params != shared or experts != per_expert:
        raise MergepipeError(f"manifest: {where}: params and expert_params must list exactly the parameters "
                             f"{op.name} takes, per expert and shared")


def run_count(runs: list[list[int]]) -> int:
    return sum(z - a for a, z in runs)


def load_manifest(path: str | Path) -> Manifest:
    path = Path(path)
    try:
        doc = json.loads(path.read_text(encoding="utf-8"), parse_constant=_no_constants)
    except OSError as e:
        raise MergepipeError(f"{path}: cannot read manifest ({e.strerror})") from None
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise MergepipeError(f"{path}: not a mergepipe manifest (invalid JSON)") from None
    try:
        m = _load(Manifest, doc, "manifest")
        _check(m)
    except MergepipeError as e:
        raise MergepipeError(f"{path}: {e}") from None
    return m


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not allowed")


def runs_to_set(runs: list[list[int]]) -> set[int]:
    return {b for a, z in runs for b in range(a, z)}


def set_to_runs(selected: typing.Iterable[int]) -> list[list[int]]:
    runs: list[list[int]] = []
    for b in sorted(selected):
        if runs and runs[-1][1] == b:
            runs[-1][1] = b + 1
        else:
            runs.append([b, b + 1])
    return runs


