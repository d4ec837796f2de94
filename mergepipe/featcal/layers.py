"""Architecture adapter for FeatCal: one transformer layer, built from config + tensors and run alone.

FeatCal (specs/featcal.md §3.1, §6) walks a model layer by layer and never holds a whole model; this
module is the only place that knows an architecture. How a layer is run in isolation:

* The embedding stem is computed from just the embedding rows of the token ids present (`embed` asks a
  `rows` callback for them), so a caller reads only those byte ranges of the checkpoint.
* A layer is transformers' own layer class (`Qwen2DecoderLayer`, `BertLayer`, ...), constructed on the
  meta device from the config and then handed the checkpoint's tensors with `assign=True`: no random
  init, no full model, and the same numerics as the real model.
* What the full model computes once above its layers is recomputed per call of `forward_layer`: rotary
  (cos, sin) from the model's own rotary class (built once per `Arch`; it has no checkpoint weights) with
  position ids 0..S-1, and a 4-D additive mask (causal, sliding window where the layer has one, key
  padding; bidirectional padding only for BERT). Batches are right-padded, so no query row is fully
  masked.

Supported: llama, mistral, qwen2, qwen3 (pre-norm decoders with RMSNorm) and bert (post-LN encoder).
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers

from mergepipe.errors import MergepipeError

# model_type -> transformers class-name prefix (LlamaConfig, LlamaDecoderLayer, LlamaRotaryEmbedding, ...)
_CLASS_PREFIX = {"bert": "Bert", "llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2", "qwen3": "Qwen3"}
SUPPORTED = tuple(sorted(_CLASS_PREFIX))

# Old Llama conversions store the rotary inverse frequencies under each layer; they are derived from
# the config, so they are neither read nor expected.
_DERIVED_SUFFIX = "rotary_emb.inv_freq"


@dataclass(frozen=True)
class ModuleSpec:
    """One calibratable module of a layer, named relative to the layer."""

    name: str  # e.g. "self_attn.q_proj"
    kind: str  # "linear" | "rmsnorm" | "layernorm"
    group: str  # modules fed the same input tensor share a group
    per_head: bool = False  # rows are (token, head) pairs, normalised over head_dim (Qwen3 q_norm/k_norm)
    eps: float = 1e-6


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _read_config(src) -> tuple[dict, str]:
    """(config dict, where it came from) from a path (file or checkpoint folder), dict or config."""
    if isinstance(src, transformers.PretrainedConfig):
        return src.to_dict(), "config"
    if isinstance(src, dict):
        return dict(src), "config"
    path = Path(src)
    if path.is_dir():
        path = path / "config.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise MergepipeError(f"{path}: config.json not found") from None
    except (OSError, ValueError) as e:
        raise MergepipeError(f"{path}: not a valid config.json ({_one_line(e)})") from None
    if not isinstance(data, dict):
        raise MergepipeError(f"{path}: not a valid config.json (expected a JSON object)")
    return data, str(path)


class Arch:
    """What FeatCal needs to know about one architecture; build it with `Arch.from_config`."""

    model_type: str
    config: transformers.PretrainedConfig
    n_layers: int
    hidden_size: int
    max_positions: int
    vocab_size: int

    # set by subclasses
    _roots: tuple[str, ...]  # where the model sits in checkpoint names, most common first
    _layers_path: str  # below the root

    def __init__(self, config: transformers.PretrainedConfig):
        self.model_type = config.model_type
        self.config = config
        self.n_layers = config.num_hidden_layers
        self.hidden_size = config.hidden_size
        self.max_positions = config.max_position_embeddings
        self.vocab_size = config.vocab_size
        self._cls_prefix = _CLASS_PREFIX[self.model_type]
        self._modeling = importlib.import_module(
            f"transformers.models.{self.model_type}.modeling_{self.model_type}")
        # A bare base model (e.g. saved from BertModel) has no "bert."/"model." root; bind() overrides.
        bare = f"{self._cls_prefix}Model" in (getattr(config, "architectures", None) or [])
        self._root = self._roots[-1] if bare else self._roots[0]

    @classmethod
    def from_config(cls, config, tensor_names: Iterable[str] | None = None,
                    attn_implementation: str = "sdpa") -> Arch:
        """An Arch from a config.json path (or checkpoint folder), a dict or a transformers config.

        `tensor_names` (the checkpoint's tensor names) pins the name root, as `bind` does. Any
        attention implementation transformers' layers accept works; "sdpa" and "eager" agree to fp32
        rounding, and "sdpa" does not materialise the [B, H, S, S] scores."""
        data, where = _read_config(config)
        model_type = data.get("model_type")
        if model_type not in SUPPORTED:
            raise MergepipeError(
                f"{where}: featcal does not support model_type {model_type!r} "
                f"(supported: {', '.join(SUPPORTED)})")
        config_cls = getattr(transformers, f"{_CLASS_PREFIX[model_type]}Config")
        try:
            cfg = config_cls.from_dict(data)
        except Exception as e:  # transformers validates in many places, with many error types
            raise MergepipeError(f"{where}: invalid {model_type} config ({_one_line(e)})") from None
        cfg._attn_implementation = attn_implementation
        arch = (_Bert if model_type == "bert" else _Decoder)(cfg)
        if tensor_names is not None:
            arch.bind(tensor_names)
        return arch

    # --- checkpoint names -------------------------------------------------------------------------

    def bind(self, names: Iterable[str]) -> Arch:
        """Detect the name root ("model." / "bert." or none) from the checkpoint's tensor names."""
        names = set(names)
        for root in self._roots:
            first = f"{root}{self._layers_path}0."
            if any(n.startswith(first) for n in names):
                self._root = root
                return self
        tried = " or ".join(f"{r}{self._layers_path}0.*" for r in self._roots)
        raise MergepipeError(f"{self.model_type} checkpoint has no tensor named {tried}")

    def layer_prefix(self, l: int) -> str:
        return f"{self._root}{self._layers_path}{l}."

    def layer_tensor_names(self, l: int, all_names: Iterable[str]) -> list[str]:
        """Full names of layer l's tensors (the ones `build_layer` expects, with the prefix)."""
        prefix = self.layer_prefix(l)
        return sorted(n for n in all_names if n.startswith(prefix) and not n.endswith(_DERIVED_SUFFIX))

    def stem_tensor_names(self) -> list[str]:
        raise NotImplementedError

    # --- layers -----------------------------------------------------------------------------------

    def _new_layer(self, l: int) -> torch.nn.Module:
        raise NotImplementedError

    def build_layer(self, l: int, tensors: dict[str, torch.Tensor]) -> torch.nn.Module:
        """Layer l from its tensors, keyed relative to `layer_prefix(l)`; fp32, eval mode, frozen, on the
        tensors' device. fp32 inputs are used as they are, not copied: the module aliases them."""
        if not 0 <= l < self.n_layers:
            raise MergepipeError(f"{self.model_type}: layer {l} out of range 0..{self.n_layers - 1}")
        with torch.device("meta"):  # shapes only: real storage comes from `tensors`
            layer = self._new_layer(l)
        tensors = {k: v for k, v in tensors.items() if not k.endswith(_DERIVED_SUFFIX)}
        expected = layer.state_dict()
        where = f"{self.model_type} layer {l} ({self.layer_prefix(l)}*)"
        missing = sorted(expected.keys() - tensors.keys())
        if missing:
            raise MergepipeError(f"{where}: missing tensor {', '.join(missing)}")
        unexpected = sorted(tensors.keys() - expected.keys())
        if unexpected:
            raise MergepipeError(f"{where}: unexpected tensor {', '.join(unexpected)}")
        for key, value in tensors.items():
            if tuple(value.shape) != tuple(expected[key].shape):
                raise MergepipeError(f"{where}: tensor {key} has shape {tuple(value.shape)}, "
                                     f"config implies {tuple(expected[key].shape)}")
        layer.load_state_dict({k: v.float() for k, v in tensors.items()}, strict=True, assign=True)
        return layer.eval().requires_grad_(False)

    def forward_layer(self, layer: torch.nn.Module, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """hidden [B,S,d] fp32 through `layer`; mask [B,S] is 1 on real tokens, 0 on right padding."""
        keep = mask.bool()
        if keep.shape != hidden.shape[:2]:
            raise MergepipeError(f"mask shape {tuple(mask.shape)} does not match hidden {tuple(hidden.shape)}")
        # Left padding or an empty row would leave query rows with nothing to attend to (NaN).
        if not bool(keep[:, 0].all() & (keep[:, :-1] >= keep[:, 1:]).all()):
            raise MergepipeError("featcal batches must be right-padded with at least one real token per row")
        with torch.no_grad():
            out = self._forward(layer, hidden, keep)
        return out[0] if isinstance(out, tuple) else out  # transformers 4.x layers returned tuples

    def _forward(self, layer, hidden, keep):
        raise NotImplementedError

    def modules(self) -> list[ModuleSpec]:
        """Calibratable modules of one layer in data-flow order (a module follows the ones producing its
        input); members of a group are adjacent."""
        raise NotImplementedError

    # --- stem -------------------------------------------------------------------------------------

    def embed(self, ids: torch.LongTensor, rows: Callable[[str, torch.LongTensor], torch.Tensor],
              full: Callable[[str], torch.Tensor]) -> torch.Tensor:
        """Stem output [B,S,d] fp32 for ids [B,S]. rows(name, unique sorted ids) gives just those rows
        of an embedding matrix; full(name) a small whole tensor."""
        raise NotImplementedError

    def _word_rows(self, ids, rows, name):
        unique, inverse = torch.unique(ids, sorted=True, return_inverse=True)
        table = rows(name, unique).float()
        if tuple(table.shape) != (len(unique), self.hidden_size):
            raise MergepipeError(f"{name}: rows callback returned shape {tuple(table.shape)}, "
                                 f"expected {(len(unique), self.hidden_size)}")
        return table[inverse.to(table.device)]


def _additive(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Bool "may attend" -> the 0 / dtype-min additive form transformers' eager masks use."""
    zero = torch.zeros((), dtype=dtype, device=allowed.device)
    return torch.where(allowed, zero, torch.finfo(dtype).min)


class _Decoder(Arch):
    """Pre-norm RMSNorm decoders: llama, mistral, qwen2, qwen3."""

    _roots = ("model.", "")
    _layers_path = "layers."

    def __init__(self, config):
        super().__init__(config)
        self._layer_cls = getattr(self._modeling, f"{self._cls_prefix}DecoderLayer")
        self._rotary = getattr(self._modeling, f"{self._cls_prefix}RotaryEmbedding")(config=config)

    def stem_tensor_names(self) -> list[str]:
        return [f"{self._root}embed_tokens.weight"]

    def embed(self, ids, rows, full):
        return self._word_rows(ids, rows, f"{self._root}embed_tokens.weight")

    def _new_layer(self, l):
        return self._layer_cls(self.config, layer_idx=l)

    def _window(self, l: int) -> int | None:
        # Mistral slides on every layer when sliding_window is set; Qwen2/3 only on layers whose
        # layer_types entry says so (their configs null sliding_window when it is off).
        types = getattr(self.config, "layer_types", None)
        if types is not None and types[l] != "sliding_attention":
            return None
        return getattr(self.config, "sliding_window", None)

    def _forward(self, layer, hidden, keep):
        seq = hidden.shape[1]
        positions = torch.arange(seq, device=hidden.device)
        q, k = positions[:, None], positions[None, :]
        allowed = k <= q
        window = self._window(layer.self_attn.layer_idx)
        if window is not None:
            allowed = allowed & (k > q - window)
        mask = _additive(allowed[None, None] & keep[:, None, None, :], hidden.dtype)
        cos_sin = self._rotary(hidden, positions[None])
        return layer(hidden, attention_mask=mask, position_ids=positions[None], position_embeddings=cos_sin)

    def modules(self):
        eps = self.config.rms_norm_eps
        specs = [ModuleSpec("input_layernorm", "rmsnorm", "input_layernorm", eps=eps)]
        specs += [ModuleSpec(f"self_attn.{p}_proj", "linear", "attn_in") for p in "qkv"]
        if self.model_type == "qwen3":
            specs += [ModuleSpec(f"self_attn.{p}_norm", "rmsnorm", f"{p}_norm", per_head=True, eps=eps)
                      for p in "qk"]
        specs += [
            ModuleSpec("self_attn.o_proj", "linear", "attn_out"),
            ModuleSpec("post_attention_layernorm", "rmsnorm", "post_attention_layernorm", eps=eps),
            ModuleSpec("mlp.gate_proj", "linear", "mlp_in"),
            ModuleSpec("mlp.up_proj", "linear", "mlp_in"),
            ModuleSpec("mlp.down_proj", "linear", "mlp_down"),
        ]
        return specs


class _Bert(Arch):
    """Post-LN BERT encoder; absolute positions, token type 0 everywhere."""

    _roots = ("bert.", "")
    _layers_path = "encoder.layer."

    def __init__(self, config):
        if config.is_decoder or config.add_cross_attention:
            raise MergepipeError("featcal supports bert encoders only (is_decoder/add_cross_attention set)")
        kind = getattr(config, "position_embedding_type", "absolute")
        if kind != "absolute":
            raise MergepipeError(f"featcal supports bert with absolute positions only, not {kind!r}")
        super().__init__(config)
        self._layer_cls = self._modeling.BertLayer

    def _emb_name(self, what: str) -> str:
        return f"{self._root}embeddings.{what}"

    def stem_tensor_names(self) -> list[str]:
        return [self._emb_name(w) for w in (
            "word_embeddings.weight", "position_embeddings.weight", "token_type_embeddings.weight",
            "LayerNorm.weight", "LayerNorm.bias")]

    def embed(self, ids, rows, full):
        seq = ids.shape[1]
        if seq > self.max_positions:
            raise MergepipeError(f"bert: {seq} tokens exceed max_position_embeddings {self.max_positions}")
        words = self._word_rows(ids, rows, self._emb_name("word_embeddings.weight"))
        token_type = full(self._emb_name("token_type_embeddings.weight"))[0].float().to(words.device)
        position = full(self._emb_name("position_embeddings.weight"))[:seq].float().to(words.device)
        norm_w, norm_b = (full(self._emb_name(f"LayerNorm.{p}")).float().to(words.device)
                          for p in ("weight", "bias"))
        # same summation order as BertEmbeddings
        return torch.nn.functional.layer_norm(
            (words + token_type) + position, (self.hidden_size,), norm_w, norm_b, self.config.layer_norm_eps)

    def _new_layer(self, l):
        return self._layer_cls(self.config, layer_idx=l)

    def _forward(self, layer, hidden, keep):
        seq = hidden.shape[1]
        mask = _additive(keep[:, None, None, :].expand(-1, 1, seq, -1), hidden.dtype)
        return layer(hidden, attention_mask=mask)

    def modules(self):
        eps = self.config.layer_norm_eps
        return [
            *(ModuleSpec(f"attention.self.{p}", "linear", "attn_in") for p in ("query", "key", "value")),
            ModuleSpec("attention.output.dense", "linear", "attn_out"),
            ModuleSpec("attention.output.LayerNorm", "layernorm", "attention.output.LayerNorm", eps=eps),
            ModuleSpec("intermediate.dense", "linear", "mlp_in"),
            ModuleSpec("output.dense", "linear", "mlp_down"),
            ModuleSpec("output.LayerNorm", "layernorm", "output.LayerNorm", eps=eps),
        ]
