"""The manifest: one versioned JSON document that describes a merge completely, written by `plan`
and completed by `execute`. Canonical (sorted keys, UTF-8, no NaN) and validated field by field on
load, like safetensors' header: anything off the schema is refused with the path of the bad field.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from .errors import MergepipeError

SCHEMA = "mergepipe.manifest/1"
Int = typing.NewType("Int", int)  # any integer; a plain int field must be non-negative
FINITE_BINS = 0x7F80  # fine-histogram bins of finite |delta| (top 16 bits of a float32 below Inf)


@dataclass
class InputFile:
    name: str  # relative to the model's folder
    size: int
    header_hash: str
    blocks: dict[str, str]  # tensor -> concatenated 16-hex-digit xxh3_64 of each block
    content_hash: str


@dataclass
class InputModel:
    ref: str
    files: list[InputFile]


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
    trim: Optional[list[list[Int]]] = None  # TIES: per expert [bin, above, need]; bin -1 keeps all


@dataclass
class Certificate:
    kind: str  # "frobenius": ||M - M_A||_F <= bound; "none": not available for this operator
    bound: Optional[float]
    note: str


@dataclass
class Plan:
    planner: str
    seed: int
    planned_expert_bytes: int
    tensors: dict[str, TensorPlan]
    certificate: Certificate


@dataclass
class CalibrationFile:
    path: str
    hash: str  # xxh3_128 of its bytes


@dataclass
class Calibration:
    """FeatCal after the merge: the data it reads (with hashes, so a replay refuses changed data), its
    parameters, and which layers each expert calibrates under the calibration budget."""
    method: str  # "featcal"
    params: dict[str, Any]
    data: list[CalibrationFile]  # one shared by the experts, or one per expert in order
    tasks: Optional[list[str]]
    tokenizer: dict[str, str]  # tokenizer file -> xxh3_128 (only when text records were tokenized)
    sequences: list[int]  # per expert: calibration sequences used
    tokens: list[int]  # per expert: real tokens in them
    budget: Budget
    prefixes: list[int]  # per expert: layers 0 .. prefix-1 are calibrated with it
    statistics: dict[str, list[int]]  # module (relative to a layer) -> shape of its statistics


@dataclass
class OutputFile:
    size: int
    hash: str
    tensors: dict[str, str]


@dataclass
class Execution:
    device: str
    wall_s: float
    peak_rss_bytes: int
    peak_device_bytes: int
    bytes_read: dict[str, int]
    expert_bytes_read: int
    base_bytes_read: int
    os_read_bytes: Optional[int]
    outputs: dict[str, OutputFile]
    root_hash: str
    finished_at: str
    resumed_bytes: int = 0  # output bytes taken over from a killed run (verified, not recomputed)
    # per tensor, what a non-additive operator reports (GCWM: active experts, ranks, conflict, gate, ...)
    diagnostics: Optional[dict[str, dict[str, Any]]] = None


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
    execution: Optional[Execution] = None
    calibration: Optional[Calibration] = None

    def to_json(self) -> str:
        doc = dataclasses.asdict(self)
        if doc["calibration"] is None:
            del doc["calibration"]
        for key, empty in (("resumed_bytes", 0), ("diagnostics", None)):
            if doc["execution"] and doc["execution"][key] == empty:
                del doc["execution"][key]  # absent unless used: older manifests stay canonical
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
    if origin is typing.Union:
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


def _check(m: Manifest) -> None:
    """Cross-field rules the types cannot express."""
    if m.schema != SCHEMA:
        raise MergepipeError(f"manifest: schema {m.schema!r} is not supported (expected {SCHEMA!r})")
    k = len(m.experts)
    if len(m.operator.expert_params) != k:
        raise MergepipeError(f"manifest: operator.expert_params has {len(m.operator.expert_params)} entries for {k} experts")
    _check_operator(m)
    for name, tp in m.plan.tensors.items():
        for field_name in ("selected", "candidates"):
            runs_per_expert = getattr(tp, field_name)
            if len(runs_per_expert) != k:
                raise MergepipeError(f"manifest: plan.tensors.{name}.{field_name} must have one entry per expert ({k})")
            for e, runs in enumerate(runs_per_expert):
                end = 0
                for run in runs:  # sorted and disjoint, so counting them is cheap
                    if len(run) != 2 or not end <= run[0] < run[1] <= tp.blocks:
                        raise MergepipeError(f"manifest: plan.tensors.{name}.{field_name}[{e}] has run {run} "
                                             f"outside the tensor's {tp.blocks} blocks or out of order")
                    end = run[1]
        if m.operator.name == "gcwm" and any(r not in ([], [[0, tp.blocks]]) for r in tp.selected + tp.candidates):
            raise MergepipeError(f"manifest: plan.tensors.{name}: gcwm reads whole tensors, so each expert's "
                                 f"runs must be [] or [[0, {tp.blocks}]]")
        if tp.trim is not None and (len(tp.trim) != k or any(len(t) != 3 for t in tp.trim)):
            raise MergepipeError(f"manifest: plan.tensors.{name}.trim must be one [bin, above, need] per expert")
        for t in tp.trim or ():
            if not (-1 <= t[0] < FINITE_BINS and t[1] >= 0 and t[2] >= 0) or (t[0] < 0 and t[1:] != [0, 0]):
                raise MergepipeError(f"manifest: plan.tensors.{name}.trim has {t}, expected [bin, above, need] "
                                     f"with -1 <= bin < {FINITE_BINS} (-1: keep all, with above = need = 0)")
    if m.calibration is not None:
        _check_calibration(m.calibration, k)
    for rec in [m.base, *m.experts]:
        for f in rec.files:
            for tensor, hx in f.blocks.items():
                if len(hx) % 16 or not all(c in "0123456789abcdef" for c in hx):
                    raise MergepipeError(f"manifest: block hashes of {tensor!r} in {f.name} must be 16 hex digits each")


def _check_operator(m: Manifest) -> None:
    """The operator and its parameters as the planner wrote them: complete, known and in range."""
    from .operators import get
    op = get(m.operator.name)
    params, per_expert = op.resolve(m.operator.params, m.operator.expert_params, "manifest: operator")
    if params != m.operator.params or per_expert != m.operator.expert_params:
        raise MergepipeError("manifest: operator.params and operator.expert_params must list exactly the "
                             f"parameters {op.name} takes, per expert and shared")


def _check_calibration(c: Calibration, k: int) -> None:
    from .featcal.calibrate import FeatCalParams
    if c.method != "featcal":
        raise MergepipeError(f"manifest: calibration.method {c.method!r} is not supported (expected 'featcal')")
    if FeatCalParams.from_dict(c.params).to_dict() != c.params:
        raise MergepipeError("manifest: calibration.params must list exactly FeatCal's parameters")
    if len(c.data) not in (1, k) or (c.tasks is not None and len(c.tasks) != k):
        raise MergepipeError(f"manifest: calibration.data needs one shared file or {k}, and tasks one per expert")
    for field_name in ("sequences", "tokens", "prefixes"):
        if len(getattr(c, field_name)) != k:
            raise MergepipeError(f"manifest: calibration.{field_name} must have one entry per expert ({k})")


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


