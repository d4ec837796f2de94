"""mergekit's YAML merge configuration, read strictly: a mergekit user can bring an existing file,
and a key mergepipe would not honour is an error rather than silently ignored. Every error names the
file.

Both of mergekit's forms are read: `models:` (whole models) and `slices:` (layer ranges). The recipe
lists its models once, base first (`base_model`, or the first model where the recipe has none); each
slice reads either all of them over one layer range, or one model (layer stacking)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import yaml

from . import operators, stages
from .checkpoint import DTYPE_NAMES
from .errors import MergepipeError
from .params import Scopes, check_settings, uniform

TOP_KEYS = {"merge_method", "base_model", "models", "slices", "modules", "parameters", "dtype", "out_dtype",
            "tokenizer_source", "tokenizer", "chat_template", "name", *stages.CONFIG_KEYS}
# `name`: a stage's name in mergekit-multi's multi-document recipes; it names nothing in the merge


@dataclass(frozen=True)
class SliceSpec:
    """One slice of the recipe: the recipe's model indices it reads (base = 0) and its layer range
    (None: every layer)."""
    models: tuple[int, ...]
    layers: tuple[int, int] | None


@dataclass(frozen=True)
class Tokenizer:
    """Where the output's tokenizer comes from: 'base', 'union' or a model of the recipe; whether
    the recipe asked for it (mergekit then rebuilds the vocabulary) or it is the copy mergekit makes by
    default; and the chat template as given (a name, 'auto' or a template)."""
    source: str | None = None  # None: copy the base's files as they are
    chat_template: str | None = None


@dataclass
class MergeConfig:
    method: str  # canonical operator name
    base: str
    experts: list[str]
    params: dict  # the operator's shared parameters: resolved scalars, or the settings as given
    expert_params: list[dict] = field(default_factory=list)
    out_dtype: str | None = None  # safetensors dtype name; None: each tensor keeps the base's dtype
    source: str = "<config>"
    stages: list[tuple[str, object]] = field(default_factory=list)  # (kind, its parsed section), in order
    slices: list[Scopes] | None = None  # per slice, the settings in force (None: params/expert_params)
    ranges: list[SliceSpec] | None = None  # the recipe's slices (None: whole models)
    dtype: str | None = None  # the recipe's `dtype` (mergekit's compute dtype), as a safetensors name
    tokenizer: Tokenizer = field(default_factory=Tokenizer)
    text: str | None = None  # the recipe as given, for mergekit_config.yml

    @property
    def operator(self) -> operators.Operator:
        return operators.get(self.method)

    @property
    def models(self) -> list[str]:
        return [self.base, *self.experts]


def _dtype(value, key: str, where: str) -> str:
    name = DTYPE_NAMES.get(str(value).lower())
    if name is None:
        raise MergepipeError(f"{where}: {key} {value!r} is not supported (expected float32, float16 or bfloat16)")
    return name


def _ref(value, what: str, where: str) -> str:
    if not isinstance(value, str) or not value:
        raise MergepipeError(f"{where}: {what} must be a path or hub id, got {type(value).__name__}")
    if "+" in value:
        raise MergepipeError(f"{where}: {what} {value!r} applies a LoRA (model+lora); mergepipe does not apply "
                             "LoRAs: merge the adapter into its model first")
    return value


def _mapping(value, what: str, where: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise MergepipeError(f"{where}: {what} must be a mapping")
    return value


def _entries(doc: dict, where: str) -> list[tuple[list[tuple[str, tuple[int, int] | None, dict]], dict]]:
    """The recipe's slices as (sources, slice parameters), each source (model, layer range, its
    parameters); the models: form is one slice over every layer."""
    if ("models" in doc) == ("slices" in doc):
        raise MergepipeError(f"{where}: give exactly one of 'models' (whole models) or 'slices' (layer ranges)")
    if "models" in doc:
        models = doc["models"]
        if not isinstance(models, list) or not models:
            raise MergepipeError(f"{where}: models must be a non-empty list of {{model: PATH, parameters: ...}}")
        out = []
        for i, e in enumerate(models):
            if not isinstance(e, dict) or "model" not in e or set(e) - {"model", "parameters"}:
                raise MergepipeError(f"{where}: models[{i}] must be a mapping with 'model' (a path) and optional 'parameters'")
            out.append((_ref(e["model"], f"models[{i}].model", where), None,
                        _mapping(e.get("parameters"), f"models[{i}].parameters", where)))
        return [(out, {})]
    slices = doc["slices"]
    if not isinstance(slices, list) or not slices:
        raise MergepipeError(f"{where}: slices must be a non-empty list of {{sources: [...]}}")
    result = []
    for si, s in enumerate(slices):
        at = f"slices[{si}]"
        if not isinstance(s, dict) or "sources" not in s or set(s) - {"sources", "parameters", "base_model"}:
            raise MergepipeError(f"{where}: {at} must be a mapping with 'sources' and optional 'parameters'")
        if "base_model" in s and s["base_model"] != doc.get("base_model"):
            raise MergepipeError(f"{where}: {at}.base_model differs from the recipe's base_model; "
                                 "mergepipe merges every slice against one base")
        sources = s["sources"]
        if not isinstance(sources, list) or not sources:
            raise MergepipeError(f"{where}: {at}.sources must be a non-empty list")
        out = []
        for j, src in enumerate(sources):
            sat = f"{at}.sources[{j}]"
            if not isinstance(src, dict) or "model" not in src or set(src) - {"model", "layer_range", "parameters"}:
                raise MergepipeError(f"{where}: {sat} must be a mapping with 'model', 'layer_range' and optional 'parameters'")
            lr = src.get("layer_range")
            if not (isinstance(lr, list) and len(lr) == 2 and all(isinstance(v, int) and not isinstance(v, bool) for v in lr)
                    and 0 <= lr[0] < lr[1]):
                raise MergepipeError(f"{where}: {sat}.layer_range must be [start, end) with 0 <= start < end, got {lr!r}")
            out.append((_ref(src["model"], f"{sat}.model", where), (lr[0], lr[1]),
                        _mapping(src.get("parameters"), f"{sat}.parameters", where)))
        result.append((out, _mapping(s.get("parameters"), f"{at}.parameters", where)))
    return result


def _inputs(op, entries, base: str | None, where: str) -> tuple[str, list[str]]:
    """The model read as the base, and the experts (paths, in the order first listed): the method's
    input rules (op.inputs) applied to each slice, as mergekit checks its contract per tensor group."""
    if len(entries) == 1 and entries[0][0][0][1] is None:  # the models: form
        listed = [m for m, _, _ in entries[0][0]]
        if op.base_policy == "required" and base is not None and all(m == base for m in listed):
            raise MergepipeError(f"{where}: models lists no expert besides the base")
        chosen_base, chosen = op.inputs(base, listed, where)
        return chosen_base, list(dict.fromkeys(listed[i] for i in chosen))
    first, experts = None, []
    for si, (sources, _) in enumerate(entries):
        names = [m for m, _, _ in sources]
        if base is not None and base not in names:
            raise MergepipeError(f"{where}: slices[{si}] does not read the base_model {base!r}; mergekit merges "
                                 "every slice against it")
        b, chosen = op.inputs(base, names, f"{where}: slices[{si}]")
        first = first or b
        experts += [names[i] for i in chosen if names[i] not in experts]
    return base or first, experts


def _slice_specs(entries, base: str, experts: list[str], where: str) -> list[SliceSpec]:
    everyone = tuple(range(len(experts) + 1))
    specs = []
    for si, (sources, _) in enumerate(entries):
        idx = tuple(1 + experts.index(m) if m in experts else 0 for m, _, _ in sources)
        if len(set(idx)) != len(idx):
            raise MergepipeError(f"{where}: slices[{si}] lists a model twice")
        ranges = {lr for _, lr, _ in sources}
        if len(ranges) > 1:
            raise MergepipeError(f"{where}: slices[{si}]: its sources have different layer ranges "
                                 f"({', '.join(str(list(r)) for r in sorted(ranges))}); mergepipe merges one range "
                                 "of every model (different ranges per slice are fine)")
        if len(idx) > 1 and set(idx) | {0} != set(everyone):
            raise MergepipeError(f"{where}: slices[{si}] reads {len(idx)} of the recipe's {len(everyone)} models; "
                                 "a merging slice must read every model (a one-model slice stacks its layers)")
        specs.append(SliceSpec(everyone if len(idx) > 1 else idx, next(iter(ranges))))
    return specs


def _tokenizer(doc: dict, models: list[str], where: str) -> Tokenizer:
    if "tokenizer_source" in doc and "tokenizer" in doc:
        raise MergepipeError(f"{where}: give tokenizer_source or tokenizer, not both")
    source = doc.get("tokenizer_source")
    if "tokenizer" in doc:
        tok = _mapping(doc["tokenizer"], "tokenizer", where)
        extra = set(tok) - {"source", "tokens", "pad_to_multiple_of"}
        if extra:
            raise MergepipeError(f"{where}: tokenizer has unknown key {sorted(extra)[0]!r} (mergekit reads source, "
                                 "tokens, pad_to_multiple_of)")
        if tok.get("tokens"):
            raise MergepipeError(f"{where}: tokenizer.tokens (per-token embedding sources) is not supported")
        if tok.get("pad_to_multiple_of"):
            raise MergepipeError(f"{where}: tokenizer.pad_to_multiple_of is not supported (mergepipe keeps the "
                                 "embedding rows of the models)")
        source = tok.get("source", "union")
    if source is not None and not isinstance(source, str):
        raise MergepipeError(f"{where}: tokenizer source must be 'base', 'union' or a model of the recipe")
    if source not in (None, "base", "union") and source not in models:
        raise MergepipeError(f"{where}: tokenizer source {source!r} is not one of the recipe's models "
                             "(or 'base', 'union')")
    template = doc.get("chat_template")
    if template is not None and not isinstance(template, str):
        raise MergepipeError(f"{where}: chat_template must be a name, 'auto' or a template string")
    return Tokenizer(source, template)


def _lift_module(doc: dict, where: str) -> dict:
    """`modules: {default: {...}}`, the one-module form mergekit writes for decoder models, read as
    the same recipe at the top level."""
    if "modules" not in doc:
        return doc
    mods = doc["modules"]
    if not isinstance(mods, dict) or list(mods) != ["default"] or not isinstance(mods["default"], dict):
        raise MergepipeError(f"{where}: modules: mergepipe reads one module named 'default' (decoder models); "
                             "recipes over several modules are not supported")
    module = mods["default"]
    extra = set(module) - {"slices", "models", "parameters"}
    if extra:
        raise MergepipeError(f"{where}: modules.default has unknown key {sorted(extra)[0]!r}")
    clash = {"slices", "models"} & set(doc)
    if clash or ("parameters" in module and "parameters" in doc):
        raise MergepipeError(f"{where}: give slices, models and parameters either under modules.default or at the "
                             "top level, not both")
    lifted = {k: v for k, v in doc.items() if k != "modules"}
    lifted.update(module)
    return lifted


def parse_config(doc: object, where: str = "<config>", text: str | None = None) -> MergeConfig:
    if not isinstance(doc, dict):
        raise MergepipeError(f"{where}: expected a YAML mapping with merge_method and models (or slices)")
    doc = _lift_module(doc, where)
    unknown = sorted(set(map(str, doc)) - TOP_KEYS)
    if unknown:
        raise MergepipeError(f"{where}: unknown key {unknown[0]!r} (mergepipe reads {', '.join(sorted(TOP_KEYS))})")
    if "merge_method" not in doc:
        raise MergepipeError(f"{where}: missing required key 'merge_method'")
    try:
        op = operators.get(str(doc["merge_method"]))
    except MergepipeError as e:
        raise MergepipeError(f"{where}: {e}") from None
    base = _ref(doc["base_model"], "base_model", where) if doc.get("base_model") is not None else None
    entries = _entries(doc, where)
    base, experts = _inputs(op, entries, base, where)
    models = [base, *experts]
    ranges = _slice_specs(entries, base, experts, where) if "slices" in doc else None
    shared, _ = check_settings(op, _mapping(doc.get("parameters"), "parameters", where), [], where)
    scopes = []
    for si, (sources, slice_params) in enumerate(entries):
        at = where if ranges is None else f"{where}: slices[{si}]"
        per = {m: p for m, _, p in sources}
        sl, _ = check_settings(op, slice_params, [], at)
        _, given = check_settings(op, {}, [per.get(m, {}) for m in experts], at)
        scopes.append(Scopes(tuple(given), sl, shared))
    params, expert_params = dict(scopes[0].shared), [dict(e) for e in scopes[0].experts]
    if ranges is None and uniform(params, expert_params):
        params, expert_params = op.resolve(params, expert_params, where)
        scopes = None
    # mergekit's dtype is its compute dtype; mergepipe always computes in float32, so dtype names the
    # output when out_dtype is absent.
    dtype = _dtype(doc["dtype"], "dtype", where) if doc.get("dtype") is not None else None
    out = doc.get("out_dtype") if doc.get("out_dtype") is not None else doc.get("dtype")
    out_dtype = _dtype(out, "out_dtype" if doc.get("out_dtype") is not None else "dtype", where) if out is not None else None
    steps = [(kind, stages.get(kind).parse(doc[key], len(models) - 1, f"{where}: {key}"))
             for key, kind in stages.CONFIG_KEYS.items() if key in doc]
    return MergeConfig(op.name, base, experts, params, expert_params, out_dtype, where, steps, scopes, ranges,
                       dtype, _tokenizer(doc, models, where), text)


def load_config(path: str | Path) -> MergeConfig:
    path = Path(path)
    try:
        text = path.read_text()
        doc = yaml.safe_load(text)
    except OSError as e:
        raise MergepipeError(f"{path}: cannot read config ({e.strerror})") from None
    except UnicodeDecodeError:
        raise MergepipeError(f"{path}: not a text file (expected a mergekit YAML recipe)") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark else ""
        raise MergepipeError(f"{path}: not valid YAML{at}") from None
    return parse_config(doc, str(path), text)


def dtype_note(cfg: MergeConfig) -> str | None:
    """The one line `plan` prints when the recipe's dtype is a 16-bit type: mergekit computes in it,
    mergepipe computes in float32 and writes it, so the bits differ from mergekit's output."""
    if cfg.dtype not in ("F16", "BF16"):
        return None
    name = {"F16": "float16", "BF16": "bfloat16"}[cfg.dtype]
    written = {"F16": "float16", "BF16": "bfloat16", "F32": "float32"}.get(cfg.out_dtype or "", name)
    return (f"{cfg.source}: dtype {name} is mergekit's compute dtype; mergepipe computes in float32 and writes "
            f"{written}, so its output differs from mergekit's in the last bits. For mergekit's bits exactly, run both "
            f"tools with dtype: float32 (and out_dtype: {written})")
