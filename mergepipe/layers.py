"""Layer-indexed tensor names and the output a recipe's slices describe.

Decoder families (Llama, Mistral, Qwen2 and their kin) name a layer's tensors `PREFIX.layers.N.REST`.
mergekit plans an output as its architecture's pre-layer weights (the embeddings), its slices' layers
in order, renumbered from 0, then the post-layer weights (final norm, lm_head); a gradient's position
`t` is the layer's place in its slice, idx / (n - 1) (1 for a one-layer slice), and 0 outside the
layers. Pre-layer weights take the first slice's models and parameters, post-layer weights the last's.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from .errors import MergepipeError

LAYER = re.compile(r"^(?P<prefix>(?:.*\.)?(?:layers|h|blocks)\.)(?P<index>\d+)(?P<rest>\..+)$")


def layer_of(name: str) -> int | None:
    m = LAYER.match(name)
    return int(m.group("index")) if m else None


def renumber(name: str, index: int) -> str:
    m = LAYER.match(name)
    assert m is not None
    return f"{m.group('prefix')}{index}{m.group('rest')}"


def is_pre(name: str) -> bool:
    """A weight before the layers in mergekit's architecture definitions: the embeddings."""
    return "embed" in name


def num_layers(root: Path | None, tensors) -> int:
    """The model's layer count: config.json's num_hidden_layers, else from its tensor names."""
    if root is not None and (root / "config.json").is_file():
        try:
            cfg = json.loads((root / "config.json").read_text())
            n = cfg.get("num_hidden_layers", cfg.get("text_config", {}).get("num_hidden_layers"))
            if isinstance(n, int):
                return n
        except (json.JSONDecodeError, AttributeError):
            pass
    found = [layer_of(n) for n in tensors]
    return max((i for i in found if i is not None), default=-1) + 1


@dataclass(frozen=True)
class Target:
    """One output tensor: the input tensor it is merged from (in every model it reads), the slice
    whose parameters apply, its gradient position, and which of the recipe's models it reads."""
    name: str
    source: str
    slice: int
    t: float
    models: tuple[int, ...]  # indices into the recipe's model list (base first)


@dataclass(frozen=True)
class SliceRange:
    models: tuple[int, ...]  # the recipe's model indices this slice reads
    start: int
    end: int


def targets(tensor_names: dict[int, list[str]], slices: list[SliceRange]) -> list[Target]:
    """Every output tensor of the slices, in mergekit's order. `tensor_names`: per recipe model
    index, its tensor names in file order."""
    first, last = slices[0], slices[-1]
    ref = tensor_names[first.models[0]]
    outside = [n for n in ref if layer_of(n) is None]
    pre = [Target(n, n, 0, 0.0, first.models) for n in outside if is_pre(n)]
    post_names = [n for n in tensor_names[last.models[0]] if layer_of(n) is None and not is_pre(n)]
    post = [Target(n, n, len(slices) - 1, 0.0, last.models) for n in post_names]
    out, layer = [], 0
    for si, s in enumerate(slices):
        n = s.end - s.start
        by_layer: dict[int, list[str]] = {}
        for name in tensor_names[s.models[0]]:
            i = layer_of(name)
            if i is not None and s.start <= i < s.end:
                by_layer.setdefault(i, []).append(name)
        for offset in range(n):
            src = s.start + offset
            if src not in by_layer:
                raise MergepipeError(f"slices[{si}]: layer {src} is not in the model (layer_range [{s.start}, {s.end}])")
            t = offset / (n - 1) if n > 1 else 1.0
            out += [Target(renumber(name, layer), name, si, t, s.models) for name in by_layer[src]]
            layer += 1
    return pre + out + post


def output_layers(slices: list[SliceRange]) -> int:
    return sum(s.end - s.start for s in slices)
