"""What an output folder holds besides its tensors, as mergekit writes it: config.json (with the
layer count of stacked slices), the tokenizer (copied from the base or the recipe's tokenizer
source, with the chat template the recipe sets), the recipe as given (mergekit_config.yml) and a
model card (README.md) that also says what mergepipe read and the certificate.

mergekit rebuilds the embeddings for an explicit tokenizer source (`base`, a model, `union`): a
vocabulary of the source's tokens, each model's rows permuted into it. Where every model has the
same vocabulary and it fills the embedding rows, that is the identity and the output is the merge
as it stands; anything else is refused in one line at plan time."""

from __future__ import annotations

import json
import os
import shutil
from collections import Counter
from pathlib import Path

import yaml

from . import __version__
from .checkpoint import COPIED_FILES, DTYPES, Model
from .config import MergeConfig
from .errors import MergepipeError
from .manifest import Manifest, Recipe

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json")
CARD = "README.md"
RECIPE = "mergekit_config.yml"


def recipe_record(config: MergeConfig, models: list[Model], config_updates: dict | None) -> Recipe:
    tok = config.tokenizer
    donor = None
    if tok.source is not None:
        _check_vocabularies(config, models)
        donor = None if tok.source in ("base", "union") else config.models.index(tok.source) - 1
    template = _chat_template(tok.chat_template, models, config.source)
    return Recipe(config.source, config.text or "", config.method, donor, template, config_updates, config.dtype)


def _vocab(model: Model) -> dict[str, int] | None:
    """The model's token -> id, from its tokenizer files; None if it has none."""
    path = model.root / "tokenizer.json"
    if path.is_file():
        import tokenizers
        try:
            return tokenizers.Tokenizer.from_file(str(path)).get_vocab(with_added_tokens=True)
        except Exception:  # noqa: BLE001 - a tokenizer file that does not parse is reported below
            return None
    if (model.root / "tokenizer.model").is_file() or (model.root / "vocab.json").is_file():
        import transformers
        try:
            return dict(transformers.AutoTokenizer.from_pretrained(str(model.root)).get_vocab())
        except Exception:  # noqa: BLE001
            return None
    return None


def _rows(model: Model) -> int | None:
    for name in ("model.embed_tokens.weight", "transformer.wte.weight", "embed_tokens.weight"):
        if name in model.tensors:
            return model.tensors[name].shape[0]
    return None


def _check_vocabularies(config: MergeConfig, models: list[Model]) -> None:
    src = config.tokenizer.source
    donor = models[0] if src in ("base", "union") else models[config.models.index(src)]
    vocab = _vocab(donor)
    if vocab is None:
        raise MergepipeError(f"{config.source}: tokenizer source {src!r}: {donor.ref} has no tokenizer files mergepipe "
                             "can read (tokenizer.json, tokenizer.model)")
    rows = _rows(donor)
    if rows is not None and len(vocab) != rows:
        raise MergepipeError(f"{config.source}: tokenizer source {src!r}: its {len(vocab)} tokens do not fill the "
                             f"{rows} embedding rows, and mergekit resizes the embeddings to the tokenizer; mergepipe "
                             "keeps the rows: leave tokenizer_source out to keep the base's vocabulary and tensors")
    for m in models:
        if m is not donor and _vocab(m) not in (None, vocab):
            raise MergepipeError(f"{config.source}: tokenizer source {src!r}: {m.ref}'s vocabulary differs from "
                                 f"{donor.ref}'s, and mergekit would permute its embedding rows into a new vocabulary; "
                                 "mergepipe merges models that share one vocabulary")


def _chat_template(given: str | None, models: list[Model], where: str) -> str | None:
    """The template to set, as mergekit resolves it: 'auto' (the most common among the models), a
    name of one of mergekit's built-in templates, or a template itself."""
    if not given:
        return None
    if given == "auto":
        found = [t.strip() for t in (_template_of(m) for m in models) if t]
        return Counter(found).most_common(1)[0][0] if found else None
    if len(given) < 256 and "\n" not in given and "{" not in given:
        try:
            from importlib.resources import files
            path = files("mergekit._data.chat_templates").joinpath(given + ".jinja")
            if path.is_file():
                return path.read_text()
        except ModuleNotFoundError:
            raise MergepipeError(f"{where}: chat_template {given!r} names one of mergekit's built-in templates, which "
                                 "are read from an installed mergekit; install it or give the template itself") from None
    if len(given) < 20 or "{" not in given:
        raise MergepipeError(f"{where}: chat_template {given!r} is not 'auto', a built-in template name "
                             "(alpaca, chatml, llama3, mistral, exaone) or a Jinja template")
    return given


def _template_of(model: Model) -> str | None:
    jinja = model.root / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text()
    cfg = model.root / "tokenizer_config.json"
    try:
        t = json.loads(cfg.read_text()).get("chat_template") if cfg.is_file() else None
    except (json.JSONDecodeError, AttributeError):
        return None
    if isinstance(t, list):  # named templates: mergekit takes the default one
        t = next((e.get("template") for e in t if isinstance(e, dict) and e.get("name") == "default"), None)
    return t if isinstance(t, str) else None


# --- execution: the files beside the tensors -----------------------------------------------------

def write_sidecars(m: Manifest, roots: list[Path], staging: Path) -> None:
    """config.json and the tokenizer into the staging folder. `roots`: the folders of the base and
    experts, in the manifest's order."""
    rec = m.recipe
    donor = roots[0] if rec is None or rec.tokenizer is None else roots[rec.tokenizer + 1]
    for name in COPIED_FILES:
        src = (donor if name in TOKENIZER_FILES else roots[0]) / name
        if src.is_file():
            shutil.copyfile(src, staging / name)
    _write_config(staging / "config.json", m)
    if rec is not None and rec.chat_template is not None:
        _set_chat_template(staging, rec.chat_template)


def _write_config(path: Path, m: Manifest) -> None:
    updates = dict((m.recipe.config if m.recipe else None) or {})
    if m.out_dtype:
        updates.update({k: DTYPES[m.out_dtype][0] for k in ("torch_dtype", "dtype")})
    if not updates or not path.is_file():
        return
    try:
        cfg = json.loads(path.read_text())
    except json.JSONDecodeError:
        return  # copied as it is
    for key, value in updates.items():
        if key in cfg or key == "num_hidden_layers":
            cfg[key] = value
    path.write_text(json.dumps(cfg, indent=2))


def _set_chat_template(folder: Path, template: str) -> None:
    """The template in chat_template.jinja, where transformers reads it first; a copied
    tokenizer_config.json or chat_template.json keeps no other."""
    cfg = folder / "tokenizer_config.json"
    if cfg.is_file():
        try:
            doc = json.loads(cfg.read_text())
            if "chat_template" in doc:
                del doc["chat_template"]
                cfg.write_text(json.dumps(doc, indent=2))
        except json.JSONDecodeError:
            pass
    (folder / "chat_template.json").unlink(missing_ok=True)
    (folder / "chat_template.jinja").write_text(template)


def write_card(m: Manifest, staging: Path, out: Path) -> None:
    """README.md and mergekit_config.yml, for a manifest planned from a recipe."""
    rec = m.recipe
    if rec is None:
        return
    (staging / RECIPE).write_text(rec.text)
    (staging / CARD).write_text(card(m, out.name))


def _hub(ref: str) -> bool:
    return ref.count("/") == 1 and not ref.startswith((".", "/", "~")) and not os.path.exists(ref)


def card(m: Manifest, name: str) -> str:
    rec = m.recipe
    assert rec is not None
    refs = [m.base.ref, *(e.ref for e in m.experts)]
    meta = {"base_model": [r.partition("@")[0] for r in refs if _hub(r)], "tags": ["mergekit", "merge", "mergepipe"],
            "library_name": "transformers"}
    link = lambda r: f"[{r}](https://huggingface.co/{r.partition('@')[0]})" if _hub(r) else f"`{r}`"  # noqa: E731
    c = m.plan.certificate
    ex = m.execution
    lines = ["---", yaml.safe_dump(meta, sort_keys=False).rstrip(), "---", f"# {name}", "",
             f"This is a merge of pre-trained language models made with mergepipe {__version__} from a mergekit "
             "recipe.", "", "## Merge Details", "### Merge Method", "",
             f"This model was merged using the `{rec.method}` merge method using {link(refs[0])} as a base.", "",
             "### Models Merged", "", "The following models were included in the merge:",
             *(f"* {link(r)}" for r in refs[1:]), "", "### Configuration", "",
             "The following YAML configuration was used to produce this model:", "", "```yaml", rec.text.rstrip(),
             "```", "", "### What mergepipe read", "",
             f"* budget: {m.budget.spec} ({m.plan.planned_expert_bytes} of {m.budget.expert_bytes_total} expert bytes "
             "planned)",
             f"* certificate ({c.kind}): {'n/a' if c.bound is None else format(c.bound, '.6g')}: {c.note}"]
    if ex is not None:
        lines += [f"* read: {ex.expert_bytes_read} expert and {ex.base_bytes_read} base bytes",
                  f"* output root hash: `{ex.root_hash}` (`mergepipe verify {name}` checks it)"]
    lines += [f"* mergepipe version: {__version__}", ""]
    return "\n".join(lines)
