"""Seeded synthetic checkpoint families: a base and experts with Qwen2's tensor names.

Used by `mergepipe demo`, the tests, the replay manifests and the benchmarks. Bytes depend only on
(shape, seed), so a family rebuilt on another machine hashes the same.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, asdict
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file


@dataclass(frozen=True)
class Shape:
    vocab: int
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads


TINY = Shape(vocab=512, hidden=64, intermediate=176, layers=2, heads=4, kv_heads=2)
DEMO = Shape(vocab=8192, hidden=256, intermediate=704, layers=4, heads=4, kv_heads=2)
QWEN25_05B = Shape(vocab=151936, hidden=896, intermediate=4864, layers=24, heads=14, kv_heads=2)


def tensor_shapes(s: Shape) -> dict[str, tuple[int, ...]]:
    kv = s.kv_heads * s.head_dim
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (s.vocab, s.hidden)}
    for i in range(s.layers):
        p = f"model.layers.{i}."
        shapes.update({
            p + "input_layernorm.weight": (s.hidden,),
            p + "self_attn.q_proj.weight": (s.hidden, s.hidden),
            p + "self_attn.q_proj.bias": (s.hidden,),
            p + "self_attn.k_proj.weight": (kv, s.hidden),
            p + "self_attn.k_proj.bias": (kv,),
            p + "self_attn.v_proj.weight": (kv, s.hidden),
            p + "self_attn.v_proj.bias": (kv,),
            p + "self_attn.o_proj.weight": (s.hidden, s.hidden),
            p + "post_attention_layernorm.weight": (s.hidden,),
            p + "mlp.gate_proj.weight": (s.intermediate, s.hidden),
            p + "mlp.up_proj.weight": (s.intermediate, s.hidden),
            p + "mlp.down_proj.weight": (s.hidden, s.intermediate),
        })
    shapes["model.norm.weight"] = (s.hidden,)
    shapes["lm_head.weight"] = (s.vocab, s.hidden)
    return shapes


def qwen2_config(s: Shape, dtype: str) -> dict:
    return {
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "vocab_size": s.vocab,
        "hidden_size": s.hidden,
        "intermediate_size": s.intermediate,
        "num_hidden_layers": s.layers,
        "num_attention_heads": s.heads,
        "num_key_value_heads": s.kv_heads,
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0,
        "tie_word_embeddings": False,
        "hidden_act": "silu",
        "torch_dtype": dtype,
        "use_sliding_window": False,
    }


def _rng(seed: int, *keys: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64([seed, *keys]))


def _normal(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    return rng.standard_normal(shape, dtype=np.float32)


def _base_tensor(name: str, shape: tuple[int, ...], seed: int, idx: int) -> np.ndarray:
    if name.endswith("norm.weight"):
        return np.ones(shape, dtype=np.float32)
    return _normal(_rng(seed, 0, idx), shape) * np.float32(0.02)


BAND = 512  # rows that change together


def _delta(name: str, shape: tuple[int, ...], seed: int, expert: int, idx: int, scale: float) -> np.ndarray:
    """A fine-tuning-like delta: dense noise whose strength varies by tensor (some layers move more)
    and by bands of rows, with a third of the vocabulary rows of embeddings untouched (tokens the
    fine-tuning data never used). Only exactly rounded arithmetic (no exp or log), so the bytes match
    on any CPU."""
    rng = _rng(seed, expert + 1, idx)
    d = _normal(rng, shape)
    two = np.float32(2.0)
    tensor_scale = two ** np.float32(rng.integers(-1, 2)) * np.float32(scale)
    if len(shape) < 2:
        return d * tensor_scale
    bands = -(-shape[0] // BAND)
    band_scale = two ** rng.integers(-2, 3, bands).astype(np.float32) * (np.float32(0.5) + rng.random(bands, dtype=np.float32))
    if "embed" in name or "lm_head" in name:
        band_scale *= rng.random(bands, dtype=np.float32) >= np.float32(1 / 3)
    row_scale = np.repeat(band_scale, BAND)[: shape[0]] * tensor_scale
    return d * row_scale[:, None]


def _write_model(folder: Path, tensors: dict[str, np.ndarray], s: Shape, dtype: torch.dtype,
                 shards: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    names = list(tensors)
    (folder / "config.json").write_text(json.dumps(qwen2_config(s, str(dtype).split(".")[-1]), indent=2))
    torch_tensors = {n: torch.from_numpy(tensors[n]).to(dtype) for n in names}
    if shards <= 1:
        save_file(torch_tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
        return
    sizes = [t.numel() * t.element_size() for t in torch_tensors.values()]
    target = sum(sizes) / shards
    groups: list[list[str]] = [[]]
    acc = 0
    for n, size in zip(names, sizes):
        if acc >= target * len(groups) and len(groups) < shards:
            groups.append([])
        groups[-1].append(n)
        acc += size
    weight_map = {}
    for i, group in enumerate(groups):
        fname = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        save_file({n: torch_tensors[n] for n in group}, str(folder / fname), metadata={"format": "pt"})
        weight_map.update({n: fname for n in group})
    index = {"metadata": {"total_size": sum(sizes)}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def build_family(root: Path | str, shape: Shape = TINY, experts: int = 3, seed: int = 0,
                 dtype: torch.dtype = torch.bfloat16, shards: int = 1,
                 delta_scale: float = 4e-3) -> dict[str, Path]:
    """Write `base/` and `expert1/`..`expertK/` under root; return their paths. Idempotent: a family
    already built with the same parameters is reused (a stamp file records them)."""
    root = Path(root)
    stamp = {"shape": asdict(shape), "experts": experts, "seed": seed, "dtype": str(dtype),
             "shards": shards, "delta_scale": delta_scale, "version": 3}
    paths = {"base": root / "base", **{f"expert{k}": root / f"expert{k}" for k in range(1, experts + 1)}}
    stamp_file = root / "family.json"
    if stamp_file.exists() and json.loads(stamp_file.read_text()) == stamp:
        return paths
    shapes = tensor_shapes(shape)
    base = {n: _base_tensor(n, sh, seed, i) for i, (n, sh) in enumerate(shapes.items())}
    _write_model(paths["base"], base, shape, dtype, shards)
    for k in range(1, experts + 1):
        expert = {n: base[n] + _delta(n, sh, seed, k, i, delta_scale)
                  for i, (n, sh) in enumerate(shapes.items())}
        _write_model(paths[f"expert{k}"], expert, shape, dtype, shards)
        del expert
    stamp_file.write_text(json.dumps(stamp, sort_keys=True))
    return paths
