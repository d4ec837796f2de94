"""The output tensors of a recipe: its targets (which input tensor each is merged from, with which
slice's parameters at which gradient position) and, where the slices rename or stack layers, the
output layout and the config.json keys that change with it. A recipe that keeps every tensor under
its own name keeps the base's files (and so the same bytes as before slices were read)."""

from __future__ import annotations

from .checkpoint import Model
from .config import MergeConfig
from .errors import MergepipeError
from .layers import SliceRange, Target, layer_of, num_layers, output_layers, targets
from .manifest import OutputEntry, OutputLayout


def _t(name: str, n: int) -> float:
    i = layer_of(name)
    if i is None or i >= n:
        return 0.0
    return i / (n - 1) if n > 1 else 1.0


def plan_outputs(config: MergeConfig, models: list[Model]) -> tuple[list[Target], list[OutputLayout] | None, dict | None]:
    """(targets, layout or None for the base's files, config.json updates or None)."""
    base = models[0]
    n = num_layers(base.root, base.tensors)
    everyone = tuple(range(len(models)))
    if config.ranges is None:
        return [Target(name, name, 0, _t(name, n), everyone) for name in base.tensors], None, None
    specs = []
    for si, s in enumerate(config.ranges):
        start, end = s.layers
        for i in s.models:
            have = num_layers(models[i].root, models[i].tensors)
            if end > have:
                raise MergepipeError(f"{config.source}: slices[{si}]: layer_range [{start}, {end}] is past the "
                                     f"{have} layers of {models[i].ref}")
        specs.append(SliceRange(s.models, start, end))
    ts = targets({i: list(m.tensors) for i, m in enumerate(models)}, specs)
    for t in ts:
        for i in t.models:
            got = models[i].tensors.get(t.source)
            want = models[t.models[0]].tensors[t.source]
            if got is None or got.shape != want.shape:
                raise MergepipeError(f"{config.source}: {models[i].ref} has no tensor {t.source!r} of shape "
                                     f"{list(want.shape)} (needed for output {t.name!r})")
    identity = all(t.name == t.source and t.models == everyone for t in ts) and {t.name for t in ts} == set(base.tensors)
    if identity:
        return ts, None, None
    layout = [OutputLayout("model.safetensors", [OutputEntry(t.name, t.source, None if len(t.models) > 1 else t.models[0] - 1)
                                                 for t in ts])]
    layers = output_layers(specs)
    if layers == n and all(s.start == 0 for s in specs[:1]) and len(specs) == 1:
        return ts, layout, None
    updates: dict = {"num_hidden_layers": layers}
    kinds = _layer_types(base)
    if kinds is not None and len(kinds) == n:  # per-layer attention kinds follow their layers
        updates["layer_types"] = [kinds[s.start + i] for s in specs for i in range(s.end - s.start)]
    return ts, layout, updates


def _layer_types(model: Model) -> list | None:
    """config.json's per-layer attention kinds (Qwen2, Gemma2 in transformers 5), if it has them."""
    import json
    path = model.root / "config.json"
    try:
        kinds = json.loads(path.read_text()).get("layer_types") if path.is_file() else None
    except (json.JSONDecodeError, AttributeError):
        return None
    return kinds if isinstance(kinds, list) else None
