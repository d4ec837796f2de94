"""Tiny decoder families of the three architectures public recipes merge most (Llama, Mistral, Qwen2, and Gemma2 for the recipes made on Gemma),
built with transformers' own classes and random weights, saved as bf16 safetensors with a small
word-level tokenizer, for the recipe corpus in tests/recipes/.

Each family is `<arch>/base` and `<arch>/e1` .. `<arch>/e5` (experts: the base plus seeded noise of a
few bf16 ulps, like low-learning-rate fine-tunes), 8 layers each. Recipes name models as
`@family/<arch>/<model>`; `materialize` rewrites that prefix to the folder the family was built in."""

from __future__ import annotations

import re
from pathlib import Path

import torch
import yaml

RECIPES = Path(__file__).parent / "recipes"
LAYERS = 8
VOCAB = 96
EXPERTS = 5
ARCHS = ("llama", "mistral", "qwen2", "gemma2")
TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def _config(arch: str):
    import transformers
    common = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=LAYERS,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                  tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    if arch == "gemma2":  # ties its embeddings, as Gemma does: the checkpoint has no lm_head
        return transformers.Gemma2Config(**{**common, "tie_word_embeddings": True}, head_dim=8)
    cls = {"llama": transformers.LlamaConfig, "mistral": transformers.MistralConfig,
           "qwen2": transformers.Qwen2Config}[arch]
    return cls(**common)


def _tokenizer(template: str | None):
    import tokenizers
    from tokenizers import models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, VOCAB)}}
    tok = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    if template:
        fast.chat_template = template
    return fast


def build(root: Path, seed: int = 0) -> Path:
    """Build every family under `root`; returns `root`."""
    import transformers
    gen = torch.Generator().manual_seed(seed)
    for a, arch in enumerate(ARCHS):
        cfg = _config(arch)
        torch.manual_seed(seed + a)  # transformers' initialisers draw from the global generator
        base = transformers.AutoModelForCausalLM.from_config(cfg).to(torch.bfloat16)
        state = {k: v.detach().clone() for k, v in base.state_dict().items()}
        for i, name in enumerate(["base"] + [f"e{k}" for k in range(1, EXPERTS + 1)]):
            folder = root / arch / name
            if i:
                for k, v in base.state_dict().items():
                    noise = torch.randn(v.shape, generator=gen) * (v.float().std() * 0.05 + 1e-3)
                    v.copy_((state[k].float() + noise).to(v.dtype))
            base.save_pretrained(folder, safe_serialization=True)
            _tokenizer(TEMPLATE if i else None).save_pretrained(folder)
        base.load_state_dict(state)
    return root


def recipes() -> list[Path]:
    return sorted(RECIPES.glob("*.yml"))


def materialize(recipe: Path, family: Path, out: Path, **overrides) -> Path:
    """The recipe with its `@family/` model paths pointing into `family`, top-level keys replaced
    by `overrides` (a None value removes the key); written to `out`."""
    text = recipe.read_text().replace("@family/", f"{family}/")
    if overrides:
        doc = yaml.safe_load(text)
        for k, v in overrides.items():
            if v is None:
                doc.pop(k, None)
            else:
                doc[k] = v
        text = yaml.safe_dump(doc, sort_keys=False)
    out.write_text(text)
    return out


def provenance(recipe: Path) -> str | None:
    m = re.search(r"^# source: (\S+)", recipe.read_text(), re.M)
    return m.group(1) if m else None


def method(recipe: Path) -> str:
    return yaml.safe_load(recipe.read_text().replace("@family/", "/f/"))["merge_method"]
