"""Per-tensor parameters as mergekit 0.1.5 resolves them: scalars, gradients over the layer's place
in its slice, filter rules, per-model, per-slice and global settings. Compared value for value with
the parameters mergekit's own planner gives each output tensor, on the tiny families of the recipe
corpus; and the recipe-level refusals, each one line naming the file."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

import corpus
from mergepipe.config import dtype_note, load_config, parse_config
from mergepipe.errors import MergepipeError
from mergepipe.index import Catalog
from mergepipe.plan import plan_merge

mergekit = pytest.importorskip("mergekit")

# slices with their own parameters, a gradient that restarts in each slice, filter rules per model,
# a YAML 1.1 string number and a filter list that matches nothing for some tensors
TWO_SLICES = """
merge_method: task_arithmetic
base_model: "@family/llama/base"
parameters:
  lambda: [1.0, 0.5]
  weight: 0.1
slices:
  - sources:
      - {model: "@family/llama/base", layer_range: [0, 4]}
      - model: "@family/llama/e1"
        layer_range: [0, 4]
        parameters: {weight: [0, 0.25, 1]}
      - model: "@family/llama/e2"
        layer_range: [0, 4]
    parameters:
      weight: [{filter: mlp, value: 2e-1}]
  - sources:
      - {model: "@family/llama/base", layer_range: [4, 8]}
      - model: "@family/llama/e1"
        layer_range: [4, 8]
        parameters:
          weight: [{filter: self_attn, value: [1, 0]}, {filter: down_proj, value: 0.3}]
      - {model: "@family/llama/e2", layer_range: [4, 8]}
"""


@pytest.fixture()
def families(recipe_families) -> Path:
    return recipe_families


def mergekit_params(recipe: Path) -> dict[str, tuple[dict, dict[str, dict]]]:
    """Per output tensor, the shared and per-model (by path) parameters mergekit's planner binds."""
    from mergekit.architecture import get_architecture_info
    from mergekit.config import MergeConfiguration
    from mergekit.io.tasks import LoaderCache
    from mergekit.merge import _model_out_config
    from mergekit.options import MergeOptions
    from mergekit.plan import MergePlanner
    cfg = MergeConfiguration.model_validate(yaml.safe_load(recipe.read_text()))
    opts = MergeOptions(quiet=True)
    arch = get_architecture_info(cfg, opts)
    LoaderCache().setup(options=opts)
    planner = MergePlanner(cfg, arch, opts, _model_out_config(cfg, arch))
    planner._plan()
    return {w.name: (dict(task.parameters), {ref.model.path: dict(p) for ref, p in task.input_parameters.items()})
            for w, task in planner._tensors}


def assert_same_params(recipe: Path, tmp_path: Path) -> int:
    want = mergekit_params(recipe)
    cfg = load_config(recipe)
    m = plan_merge(cfg, "100%", Catalog(tmp_path / "c.sqlite"))
    assert set(m.plan.tensors) == set(want)
    op = cfg.operator
    compared = 0
    for name, tp in m.plan.tensors.items():
        shared, per = want[name]
        for p in op.params:
            if p.per_expert:
                for k, path in enumerate(cfg.experts):
                    if path in per and p.name in per[path]:
                        value = per[path][p.name]  # None: mergekit's unset, which mergepipe's default stands for
                        assert tp.expert_params[k][p.name] == (p.default if value is None else value), (name, path, p.name)
                        compared += 1
            elif p.name in shared:
                assert tp.params[p.name] == shared[p.name], (name, p.name)
                compared += 1
    return compared


@pytest.mark.parametrize("name", ["mk-ties-gradients", "mk-gradient-slerp", "card-neuralhermes-slerp",
                                  "card-holland-ta-slices", "card-llama31-della-modules", "mk-test-passthrough-scale",
                                  "mk-orcamini-platy-passthrough", "card-llama3-13b-selfstack", "mk-linear"])
def test_corpus_parameters_are_mergekits(name, families, tmp_path):
    recipe = corpus.materialize(corpus.RECIPES / f"{name}.yml", families, tmp_path / "r.yml")
    assert assert_same_params(recipe, tmp_path) > 0


def test_slice_scopes_gradients_and_filters_are_mergekits(families, tmp_path):
    (tmp_path / "two.yml").write_text(TWO_SLICES)
    recipe = corpus.materialize(tmp_path / "two.yml", families, tmp_path / "r.yml")
    n = assert_same_params(recipe, tmp_path)
    m = plan_merge(load_config(recipe), "100%", Catalog(tmp_path / "c.sqlite"))
    weights = {tp.expert_params[0]["weight"] for tp in m.plan.tensors.values()}
    assert len(weights) > 4 and n > 100  # the settings do vary over the tensors


def test_stacked_output_has_its_own_layers_and_config(families, tmp_path):
    recipe = corpus.materialize(corpus.RECIPES / "mk-orcamini-platy-passthrough.yml", families, tmp_path / "r.yml")
    m = plan_merge(load_config(recipe), "100%", Catalog(tmp_path / "c.sqlite"))
    (f,) = m.plan.layout
    by_name = {e.name: e for e in f.tensors}
    assert by_name["model.layers.4.mlp.up_proj.weight"].source == "model.layers.4.mlp.up_proj.weight"
    assert by_name["model.layers.5.mlp.up_proj.weight"].source == "model.layers.4.mlp.up_proj.weight"
    assert by_name["model.layers.8.mlp.up_proj.weight"].model == 1  # the second slice's model, expert 1
    assert "model.layers.9.mlp.up_proj.weight" not in by_name
    assert by_name["lm_head.weight"].model == 1 and by_name["model.embed_tokens.weight"].model == 0
    assert m.recipe.config == {"num_hidden_layers": 9}
    assert m.plan.planned_expert_bytes == m.budget.expert_bytes_total > 0
    with pytest.raises(MergepipeError, match=r"r\.yml: .*stack layers.*--budget 100%"):
        plan_merge(load_config(recipe), "50%", Catalog(tmp_path / "c.sqlite"))


@pytest.mark.parametrize("doc, expect", [
    ({"merge_method": "ties", "base_model": "b", "modules": {"default": {}, "vision": {}}}, "one module named 'default'"),
    ({"merge_method": "ties", "base_model": "b", "slices": [{"sources": [
        {"model": "b", "layer_range": [0, 4]}, {"model": "e", "layer_range": [2, 6]}]}]}, "different layer ranges"),
    ({"merge_method": "ties", "base_model": "b", "slices": [{"sources": [{"model": "e", "layer_range": [0, 4]}]}]},
     "does not read the base_model"),
    ({"merge_method": "ties", "base_model": "b", "slices": [{"sources": [{"model": "b", "layer_range": [4, 2]}]}]},
     "layer_range"),
    ({"merge_method": "ties", "base_model": "b", "models": [{"model": "e"}], "parameters": {"weight": 1},
      "tokenizer_source": "x"}, "not one of the recipe's models"),
    ({"merge_method": "ties", "base_model": "b", "models": [{"model": "e"}], "parameters": {"weight": 1},
      "tokenizer": {"source": "base", "tokens": {"<x>": {}}}}, "tokenizer.tokens"),
    ({"merge_method": "ties", "base_model": "b", "models": [{"model": "e+lora"}]}, "LoRA"),
    ({"merge_method": "ties", "base_model": "b", "models": [{"model": "e"}], "modelz": []}, "unknown key 'modelz'"),
    ({"merge_method": "slerp", "base_model": "b", "models": [{"model": "e"}], "parameters": {"t": {"filtr": "x"}}},
     "conditional parameter"),
    # parameters mergekit declares for task arithmetic but ignores there: taken only where they change nothing
    ({"merge_method": "task_arithmetic", "base_model": "b", "models": [{"model": "e", "parameters": {
        "weight": 1, "density": 0.5}}]}, "'density' = 0.5, expected 1 .*dare_linear"),
    ({"merge_method": "task_arithmetic", "base_model": "b", "models": [{"model": "e", "parameters": {"weight": 1}}],
      "parameters": {"rescale": True}}, "'rescale' = True, expected false"),
])
def test_recipe_refusals_name_the_file(doc, expect):
    with pytest.raises(MergepipeError, match=expect) as e:
        parse_config(doc, "recipe.yml")
    assert str(e.value).startswith("recipe.yml: ") and "\n" not in str(e.value)


def test_task_arithmetic_takes_mergekits_no_op_parameters():
    cfg = parse_config({"merge_method": "task_arithmetic", "base_model": "b", "models": [{"model": "e", "parameters": {
        "weight": 1, "density": 1}}], "parameters": {"int8_mask": True, "rescale": False}}, "r.yml")
    assert cfg.params["int8_mask"] is True and cfg.expert_params[0]["density"] == 1.0


def test_numbers_mergekit_reads_from_strings_and_flags_from_numbers():
    cfg = parse_config({"merge_method": "della", "base_model": "b", "models": [{"model": "e", "parameters": {
        "weight": 1, "density": 0.5, "epsilon": "1e-1"}}], "parameters": {"normalize": 1.0, "lambda": "9e-1"}})
    assert cfg.expert_params[0]["epsilon"] == 0.1 and cfg.params["normalize"] is True and cfg.params["lambda"] == 0.9


def test_dtype_note_says_how_to_get_mergekits_bits():
    doc = {"merge_method": "task_arithmetic", "base_model": "b", "models": [{"model": "e", "parameters": {"weight": 1}}]}
    assert dtype_note(parse_config({**doc, "dtype": "float32"}, "r.yml")) is None
    note = dtype_note(parse_config({**doc, "dtype": "bfloat16"}, "r.yml"))
    assert note.startswith("r.yml: dtype bfloat16") and "dtype: float32" in note and "\n" not in note
