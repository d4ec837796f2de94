"""`mergepipe merge` (plan and execute in one step, as mergekit-yaml does) and what it writes beside
the tensors; mergekit-yaml's flags; tokenizer sources and chat templates; `verify` given a plan, a
completed manifest or an output folder; and the one-line notes and refusals."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

import corpus
from mergepipe.cli import app

runner = CliRunner()

TA = """
merge_method: task_arithmetic
base_model: "@family/llama/base"
models:
  - {model: "@family/llama/e1", parameters: {weight: 0.5}}
  - {model: "@family/llama/e2", parameters: {weight: 0.3}}
dtype: bfloat16
"""


def cli(*args):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


def one_line_error(r, *needles):
    assert r.exit_code == 2, r.output
    text = " ".join(r.output.split())
    assert text.startswith("error:") and "Traceback" not in r.output, r.output
    for n in needles:
        assert n in text, (n, text)


def recipe(tmp_path: Path, families: Path, text: str = TA, name: str = "r.yml", **overrides) -> Path:
    (tmp_path / "src.yml").write_text(text)
    return corpus.materialize(tmp_path / "src.yml", families, tmp_path / name, **overrides)


def test_merge_writes_card_recipe_tokenizer_and_manifest(recipe_families, tmp_path):
    r_path = recipe(tmp_path, recipe_families)
    r = cli("merge", r_path, tmp_path / "out", "--catalog", tmp_path / "c")
    assert r.exit_code == 0, r.output
    out = tmp_path / "out"
    assert "note:" in r.output and "dtype bfloat16" in r.output and "dtype: float32" in r.output
    m = json.loads((out / "mergepipe.manifest.json").read_text())
    assert m["execution"]["root_hash"] and m["recipe"]["text"] == r_path.read_text()
    assert (out / "mergekit_config.yml").read_text() == r_path.read_text()
    card = (out / "README.md").read_text()
    for needle in ("`task_arithmetic` merge method", f"`{recipe_families}/llama/base`", f"`{recipe_families}/llama/e2`",
                   "budget: 100%", "certificate (frobenius)", "mergepipe version", m["execution"]["root_hash"]):
        assert needle in card, needle
    assert yaml.safe_load(card.split("---")[1])["tags"] == ["mergekit", "merge", "mergepipe"]
    for name in ("tokenizer.json", "tokenizer_config.json", "config.json"):
        assert (out / name).read_bytes() == (recipe_families / "llama" / "base" / name).read_bytes() or name == "config.json"
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"


def test_mergekit_yaml_flags(recipe_families, tmp_path):
    r_path = recipe(tmp_path, recipe_families)
    ok = cli("merge", r_path, tmp_path / "a", "--catalog", tmp_path / "c", "--allow-crimes", "--lazy-unpickle",
             "--copy-tokenizer")
    assert ok.exit_code == 0, ok.output
    one_line_error(cli("merge", r_path, tmp_path / "b", "--out-shard-size", "1B"), "--out-shard-size 1B", "not supported")
    one_line_error(cli("merge", r_path, tmp_path / "b", "--no-copy-tokenizer"), "--no-copy-tokenizer")
    if not torch.cuda.is_available():
        one_line_error(cli("merge", r_path, tmp_path / "b", "--cuda"), "cuda", "no CUDA GPU")
    one_line_error(cli("merge", r_path, tmp_path / "b", "-b", "20"), "budget '20' has no unit", "20%")
    assert not (tmp_path / "b").exists()


def test_merge_takes_the_planning_flags_of_plan(recipe_families, tmp_path):
    """`merge` is `plan` then `execute`: the planner, its seed, the fill and the sketch kind reach the plan,
    and the same flags given to `plan` then `execute` give the same bytes."""
    r_path = recipe(tmp_path, recipe_families)
    flags = ["-b", "30%", "--planner", "random", "--seed", "5", "--fill", "zero", "--sketch", "sign"]
    r = cli("merge", r_path, tmp_path / "m", "--catalog", tmp_path / "c", *flags)
    assert r.exit_code == 0, r.output
    m = json.loads((tmp_path / "m" / "mergepipe.manifest.json").read_text())
    assert (m["plan"]["planner"], m["plan"]["seed"], m["plan"]["fill"]) == ("random", 5, "zero")
    assert cli("plan", r_path, "-o", tmp_path / "p.json", "--catalog", tmp_path / "c", *flags).exit_code == 0
    assert cli("execute", tmp_path / "p.json", "-o", tmp_path / "e").exit_code == 0
    e = json.loads((tmp_path / "e" / "mergepipe.manifest.json").read_text())
    assert e["execution"]["root_hash"] == m["execution"]["root_hash"]
    default = cli("merge", r_path, tmp_path / "d", "--catalog", tmp_path / "c", "-b", "30%")
    assert default.exit_code == 0, default.output
    d = json.loads((tmp_path / "d" / "mergepipe.manifest.json").read_text())
    assert (d["plan"]["planner"], d["plan"]["fill"]) == ("score", "sketch")
    one_line_error(cli("merge", r_path, tmp_path / "x", "--fill", "half"), "fill")


def test_verify_takes_a_plan_a_manifest_or_a_folder(recipe_families, tmp_path):
    r_path = recipe(tmp_path, recipe_families)
    assert cli("plan", r_path, "-o", tmp_path / "plan.json", "--catalog", tmp_path / "c").exit_code == 0
    assert cli("execute", tmp_path / "plan.json", "-o", tmp_path / "out").exit_code == 0
    for args in (["verify", tmp_path / "plan.json", "--output", tmp_path / "out"], ["verify", tmp_path / "out"],
                 ["verify", tmp_path / "out" / "mergepipe.manifest.json", "--output", tmp_path / "out"]):
        r = cli(*args)
        assert r.exit_code == 0 and "verified" in r.output, (args, r.output)
    one_line_error(cli("verify", tmp_path / "plan.json"), "plan.json", "give --output OUT")
    other = recipe(tmp_path, recipe_families, TA.replace("0.3", "0.4"), "other.yml")
    assert cli("plan", other, "-o", tmp_path / "other.json", "--catalog", tmp_path / "c").exit_code == 0
    one_line_error(cli("verify", tmp_path / "other.json", "--output", tmp_path / "out"), "was not executed from the plan")
    shard = next((tmp_path / "out").glob("*.safetensors"))
    data = bytearray(shard.read_bytes())
    data[-3] ^= 0xFF
    shard.write_bytes(bytes(data))
    r = cli("verify", tmp_path / "out")
    assert r.exit_code == 1 and "mismatch" in r.output


def _retokenized(src: Path, dst: Path, extra: int) -> Path:
    """A copy of `src` whose tokenizer has `extra` more tokens (a different vocabulary)."""
    import tokenizers
    shutil.copytree(src, dst)
    tok = tokenizers.Tokenizer.from_file(str(dst / "tokenizer.json"))
    if extra > 0:
        tok.add_tokens([f"<new{i}>" for i in range(extra)])
    else:
        doc = json.loads(tok.to_str())
        doc["model"]["vocab"] = {k: v for k, v in doc["model"]["vocab"].items() if v < len(doc["model"]["vocab"]) + extra}
        tok = tokenizers.Tokenizer.from_str(json.dumps(doc))
    tok.save(str(dst / "tokenizer.json"))
    return dst


@pytest.mark.parametrize("source", ["union", "base", "@family/llama/e1"])
def test_tokenizer_source_needs_one_vocabulary_filling_the_rows(recipe_families, tmp_path, source):
    fam = tmp_path / "fam"
    shutil.copytree(recipe_families / "llama", fam / "llama")
    text = TA + f"tokenizer_source: {json.dumps(source)}\n"
    ok = recipe(tmp_path, fam, text)
    assert cli("merge", ok, tmp_path / "ok", "--catalog", tmp_path / "c").exit_code == 0
    shutil.rmtree(fam / "llama" / "e2")
    _retokenized(recipe_families / "llama" / "e2", fam / "llama" / "e2", 2)
    one_line_error(cli("merge", ok, tmp_path / "bad", "--catalog", tmp_path / "c"), str(ok), "vocabulary differs")
    shutil.rmtree(fam / "llama" / "e2")
    shutil.copytree(recipe_families / "llama" / "e2", fam / "llama" / "e2")
    for m in ("base", "e1"):
        shutil.rmtree(fam / "llama" / m)
        _retokenized(recipe_families / "llama" / m, fam / "llama" / m, -8)
    one_line_error(cli("merge", ok, tmp_path / "bad", "--catalog", tmp_path / "c"), str(ok), "do not fill the 96 embedding rows")
    assert not (tmp_path / "bad").exists()


@pytest.mark.parametrize("template", ["chatml", "auto", "{% for m in messages %}[{{ m['content'] }}]{% endfor %}"])
def test_chat_template_as_mergekit_sets_it(recipe_families, tmp_path, template):
    from transformers import AutoTokenizer
    r_path = recipe(tmp_path, recipe_families, TA + f"chat_template: {json.dumps(template)}\n")
    assert cli("merge", r_path, tmp_path / "out", "--catalog", tmp_path / "c").exit_code == 0
    got = AutoTokenizer.from_pretrained(str(tmp_path / "out")).chat_template
    if template == "chatml":
        from importlib.resources import files
        assert got == files("mergekit._data.chat_templates").joinpath("chatml.jinja").read_text()
    elif template == "auto":  # the base has none; the experts' template is the most common
        assert got == corpus.TEMPLATE
    else:
        assert got == template
    bad = recipe(tmp_path, recipe_families, TA + "chat_template: nonsense\n", "bad.yml")
    one_line_error(cli("merge", bad, tmp_path / "bad", "--catalog", tmp_path / "c"), "bad.yml", "chat_template 'nonsense'")


def test_stacked_merge_replays_and_verifies(recipe_families, tmp_path):
    r_path = corpus.materialize(corpus.RECIPES / "card-llama3-13b-selfstack.yml", recipe_families, tmp_path / "r.yml")
    assert cli("merge", r_path, tmp_path / "out", "--catalog", tmp_path / "c").exit_code == 0
    assert json.loads((tmp_path / "out" / "config.json").read_text())["num_hidden_layers"] == 13
    r = cli("verify", tmp_path / "out" / "mergepipe.manifest.json")  # re-executes the layout
    assert r.exit_code == 0 and "re-executed" in r.output, r.output


@pytest.mark.parametrize("arch", ["qwen2", "gemma2"])
def test_stacked_layers_keep_their_attention_kinds(recipe_families, tmp_path, arch):
    """Qwen2 and Gemma2 configs list each layer's attention kind; a stacked output lists its layers'
    (mergekit 0.1.5 leaves the old list, which transformers 5 refuses to save)."""
    from transformers import AutoModelForCausalLM
    text = (f"merge_method: passthrough\nslices:\n  - sources: [{{model: '@family/{arch}/e1', layer_range: [0, 5]}}]\n"
            f"  - sources: [{{model: '@family/{arch}/e2', layer_range: [2, 8]}}]\ndtype: bfloat16\n")
    r_path = recipe(tmp_path, recipe_families, text)
    assert cli("merge", r_path, tmp_path / "out", "--catalog", tmp_path / "c").exit_code == 0
    kinds = json.loads((recipe_families / arch / "e1" / "config.json").read_text())["layer_types"]
    got = json.loads((tmp_path / "out" / "config.json").read_text())
    assert got["num_hidden_layers"] == 11 and got["layer_types"] == kinds[0:5] + kinds[2:8]
    model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "out"))
    assert model.generate(torch.tensor([[1, 4, 5]]), max_new_tokens=2, do_sample=False).shape == (1, 5)
