"""mergekit's YAML merge configuration, read strictly: a mergekit user can bring an existing file,
and a key mergepipe would not honour is an error rather than silently ignored."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import yaml

from . import operators, stages
from .checkpoint import DTYPE_NAMES
from .errors import MergepipeError

TOP_KEYS = {"merge_method", "base_model", "models", "parameters", "dtype", "out_dtype", "tokenizer_source",
            *stages.CONFIG_KEYS}


@dataclass
class MergeConfig:
    method: str  # canonical operator name
    base: str
    experts: list[str]
    params: dict  # the operator's shared parameters, defaults filled
    expert_params: list[dict] = field(default_factory=list)
    out_dtype: str | None = None  # safetensors dtype name; None: each tensor keeps the base's dtype
    source: str = "<config>"
    stages: list[tuple[str, object]] = field(default_factory=list)  # (kind, its parsed section), in order

    @property
    def operator(self) -> operators.Operator:
        return operators.get(self.method)


def _dtype(value, key: str, where: str) -> str:
    name = DTYPE_NAMES.get(str(value).lower())
    if name is None:
        raise MergepipeError(f"{where}: {key} {value!r} is not supported (expected float32, float16 or bfloat16)")
    return name


def parse_config(doc: object, where: str = "<config>") -> MergeConfig:
    if not isinstance(doc, dict):
        raise MergepipeError(f"{where}: expected a YAML mapping with merge_method, base_model and models")
    unknown = sorted(set(doc) - TOP_KEYS)
    if unknown:
        raise MergepipeError(f"{where}: unknown key {unknown[0]!r} (mergepipe reads {', '.join(sorted(TOP_KEYS))})")
    for key in ("merge_method", "models"):
        if key not in doc:
            raise MergepipeError(f"{where}: missing required key {key!r}")
    op = operators.get(str(doc["merge_method"]))
    base = doc.get("base_model")
    if base is not None and not isinstance(base, str):
        raise MergepipeError(f"{where}: base_model must be a path or hub id, got {type(base).__name__}")
    if doc.get("tokenizer_source", "base") != "base":
        raise MergepipeError(f"{where}: tokenizer_source {doc['tokenizer_source']!r} is not supported "
                             "(mergepipe copies the base's tokenizer)")
    models = doc["models"]
    if not isinstance(models, list) or not models:
        raise MergepipeError(f"{where}: models must be a non-empty list of {{model: PATH, parameters: ...}}")
    listed, listed_params = [], []
    for i, entry in enumerate(models):
        if not isinstance(entry, dict) or not isinstance(entry.get("model"), str) or set(entry) - {"model", "parameters"}:
            raise MergepipeError(f"{where}: models[{i}] must be a mapping with 'model' (a path) and optional 'parameters'")
        params = entry.get("parameters") or {}
        if not isinstance(params, dict):
            raise MergepipeError(f"{where}: models[{i}].parameters must be a mapping")
        listed.append(entry["model"])
        listed_params.append(params)
    if op.base_policy == "required" and base is not None and all(m == base for m in listed):
        raise MergepipeError(f"{where}: models lists no expert besides the base")
    # mergekit lets the base appear among the models; unless the method merges it as an input, it
    # is the base, not an expert
    base, chosen = op.inputs(base, listed, where)
    experts, given = [listed[i] for i in chosen], [listed_params[i] for i in chosen]
    shared = doc.get("parameters") or {}
    if not isinstance(shared, dict):
        raise MergepipeError(f"{where}: parameters must be a mapping")
    params, expert_params = op.resolve(shared, given, where)
    # mergekit's dtype is its compute dtype; mergepipe always computes in float32, so dtype names the
    # output when out_dtype is absent.
    out = doc.get("out_dtype", doc.get("dtype"))
    out_dtype = _dtype(out, "out_dtype" if "out_dtype" in doc else "dtype", where) if out is not None else None
    if "dtype" in doc:
        _dtype(doc["dtype"], "dtype", where)
    steps = [(kind, stages.get(kind).parse(doc[key], len(experts), f"{where}: {key}"))
             for key, kind in stages.CONFIG_KEYS.items() if key in doc]
    return MergeConfig(op.name, base, experts, params, expert_params, out_dtype, where, steps)


def load_config(path: str | Path) -> MergeConfig:
    path = Path(path)
    try:
        doc = yaml.safe_load(path.read_text())
    except OSError as e:
        raise MergepipeError(f"{path}: cannot read config ({e.strerror})") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark else ""
        raise MergepipeError(f"{path}: not valid YAML{at}") from None
    return parse_config(doc, str(path))
