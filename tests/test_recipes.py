"""The recipe corpus (tests/recipes/): real-world mergekit recipes, their model paths rewritten to tiny
local families of the same architecture (tests/corpus.py). Each one is merged by mergekit 0.1.5 and
by mergepipe with `dtype: float32` (and a float32 output) and the two outputs are compared by the
rule of its method:

- linear, slerp, nuslerp, task_arithmetic, passthrough, model_stock: bit for bit;
- ties, breadcrumbs, breadcrumbs_ties (magnitude trims): bit for bit except at positions whose
  keep-or-drop depends on how a tie is broken (TIES: where an expert's |delta| equals its trim
  threshold; breadcrumbs, with two thresholds: where an expert's |delta| is a value several of its
  entries share), at most 5% of a tensor's elements;
- dare_*, della* (random drops; mergekit draws from torch's global generator, mergepipe from a hash
  of seed, tensor and position): per tensor, the merged delta's norm within 25% of mergekit's and
  the share of entries that moved within four standard deviations (plus one point) of mergekit's.

Then `mergepipe merge` on the recipe as given (its own dtype) writes a folder that transformers loads
and generates from, with the model card, the recipe, and the tokenizer and chat template mergekit
writes. Recipes under tests/recipes/refused/ are real ones mergepipe refuses by design: one line
that names the file and says why, exit 2."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

import corpus
from helpers import load_all
from mergepipe import operators
from mergepipe.cli import app
from mergepipe.config import load_config
from mergepipe.execute import execute
from mergepipe.index import Catalog
from mergepipe.plan import plan_merge

mergekit = pytest.importorskip("mergekit")

BITWISE = {"linear", "slerp", "nuslerp", "task_arithmetic", "passthrough", "model_stock"}
TRIMS = {"ties", "breadcrumbs", "breadcrumbs_ties"}
RANDOM = {"dare_ties", "dare_linear", "della", "della_linear"}


def _known_gap(recipe: Path) -> str | None:
    """Why a corpus recipe cannot pass yet: its method or a parameter it sets is not in mergepipe."""
    method = corpus.method(recipe)
    if method not in operators.names():
        return f"merge_method {method} is not implemented in mergepipe yet"
    doc = yaml.safe_load(recipe.read_text().replace("@family/", "/f/"))
    given = set((doc.get("parameters") or {}))
    op = operators.get(method)
    missing = sorted(k for k in given if op.param(k) is None)
    if missing:
        return f"{method} takes no {missing[0]} yet (a mergekit 0.1.5 parameter of it)"
    return None


def _params():
    out = []
    for r in corpus.recipes():
        gap = _known_gap(r)
        marks = [pytest.mark.xfail(strict=True, reason=gap)] if gap else []
        out.append(pytest.param(r, id=r.stem, marks=marks))
    return out


@pytest.fixture()
def families(recipe_families) -> Path:
    return recipe_families


@pytest.fixture(scope="module")
def catalog(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("catalog") / "c.sqlite"


def run_mergekit(recipe: Path, out: Path) -> None:
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions
    text = recipe.read_text()
    cfg = MergeConfiguration.model_validate(yaml.safe_load(text))
    run_merge(cfg, str(out), MergeOptions(quiet=True, random_seed=0), config_source=text)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def _compare(method: str, mp: dict, mk: dict, base: dict, experts: list[dict], plan) -> list[str]:
    """What differs beyond the method's rule (empty: the outputs agree). `plan`: mergepipe's, for
    each tensor's resolved densities (the trim thresholds mergekit's tie order may split)."""
    assert set(mp) == set(mk), sorted(set(mp) ^ set(mk))
    bad = []
    for name, want in mk.items():
        got = mp[name]
        assert got.shape == want.shape and got.dtype == want.dtype, name
        differ = _bits(got) != _bits(want)
        if not differ.any():
            continue
        if method in BITWISE:
            bad.append(f"{name}: {int(differ.sum())} of {differ.numel()} elements differ")
        elif method in TRIMS:
            tied = _tied(name, base, experts, plan.tensors[name].expert_params if method == "ties" else None)
            away = int((differ & ~tied).sum())
            if differ.float().mean() > 0.05 or away:
                bad.append(f"{name}: {int(differ.sum())} of {differ.numel()} differ, {away} away from a threshold tie")
        elif method in RANDOM and name in base and base[name].numel() >= 256:
            b = base[name].float()
            dg, dw = got.float() - b, want.float() - b
            ratio = float(dg.norm() / dw.norm()) if dw.norm() > 0 else 1.0
            share = float((dw != 0).float().mean())
            moved = abs(float((dg != 0).float().mean()) - share)
            # two independent draws of the kept share: 4 standard deviations of their difference
            allowed = 4 * (2 * share * (1 - share) / dw.numel()) ** 0.5 + 0.01
            if not (0.75 <= ratio <= 1.0 / 0.75) or moved > allowed:
                bad.append(f"{name}: delta norm ratio {ratio:.3f}, moved share differs by {moved:.3f} (allowed {allowed:.3f})")
    return bad


def _tied(name: str, base: dict, experts: list[dict], densities: list[dict] | None) -> torch.Tensor:
    """The positions whose keep-or-drop depends on the order ties are broken in. With each expert's
    density (TIES: one threshold, the k-th largest |delta|, k = max(1, int(density * n)) as mergekit
    computes it): where an expert's |delta| equals its threshold. Without (breadcrumbs: two
    thresholds): where an expert's |delta| is a value several of its entries share."""
    b = base[name].float()
    tied = torch.zeros(b.shape, dtype=torch.bool)
    for k, e in enumerate(experts):
        d = (e[name].float() - b).abs()
        if densities is not None:
            density = densities[k]["density"]
            if density < 1:
                kth = d.reshape(-1).sort(descending=True).values[max(1, int(density * d.numel())) - 1]
                tied |= d == kth
            continue
        values, counts = torch.unique(d, return_counts=True)
        tied |= torch.isin(d, values[counts > 1])
    return tied


@pytest.mark.parametrize("recipe", _params())
def test_recipe(recipe: Path, families: Path, catalog: Path, tmp_path: Path, monkeypatch):
    monkeypatch.setenv("MERGEPIPE_CACHE", str(tmp_path / "cache"))
    assert corpus.provenance(recipe), f"{recipe.name}: no '# source: URL' line"
    method = corpus.method(recipe)
    exact = corpus.materialize(recipe, families, tmp_path / recipe.name, dtype="float32", out_dtype="float32")
    run_mergekit(exact, tmp_path / "mk")
    m = plan_merge(load_config(exact), "100%", Catalog(catalog))
    execute(m, tmp_path / "mp")
    mp, mk = load_all(tmp_path / "mp"), load_all(tmp_path / "mk")
    cfg = load_config(exact)
    base = load_all(Path(cfg.base))
    experts = [load_all(Path(e)) for e in cfg.experts]
    bad = _compare(method, mp, mk, base, experts, m.plan)
    assert not bad, f"{recipe.name} differs from mergekit: " + "; ".join(bad[:4])
    # without a base_model, mergekit copies the tokenizer of the first of a set of models (an order
    # that changes from run to run); mergepipe copies the first listed model's
    _same_sidecars(tmp_path / "mp", tmp_path / "mk", tokenizer="base_model" in yaml.safe_load(exact.read_text()))

    given = corpus.materialize(recipe, families, tmp_path / f"given-{recipe.name}")
    r = CliRunner().invoke(app, ["merge", str(given), str(tmp_path / "out"), "--catalog", str(catalog)],
                           catch_exceptions=False)
    assert r.exit_code == 0, r.output
    _loads_and_generates(tmp_path / "out")
    assert (tmp_path / "out" / "mergekit_config.yml").read_text() == given.read_text()
    card = (tmp_path / "out" / "README.md").read_text()
    assert f"`{method}` merge method" in card and "root hash" in card and "```yaml" in card


def _same_sidecars(mp: Path, mk: Path, tokenizer: bool) -> None:
    """config.json's layer count and vocabulary, and (`tokenizer`) the tokenizer and chat template,
    as mergekit's."""
    import json

    from transformers import AutoTokenizer
    a, b = json.loads((mp / "config.json").read_text()), json.loads((mk / "config.json").read_text())
    for key in ("num_hidden_layers", "vocab_size", "architectures"):
        assert a.get(key) == b.get(key), key
    if not tokenizer:
        return
    ta, tb = AutoTokenizer.from_pretrained(str(mp)), AutoTokenizer.from_pretrained(str(mk))
    assert ta.get_vocab() == tb.get_vocab()
    assert (ta.chat_template or None) == (tb.chat_template or None)


def _loads_and_generates(folder: Path) -> None:
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(str(folder))
    out = model.generate(torch.tensor([[1, 5, 9, 12]]), max_new_tokens=3, do_sample=False)
    assert out.shape == (1, 7)
    assert torch.isfinite(model(torch.tensor([[1, 5, 9]])).logits).all()


def test_corpus_is_large_enough_and_sourced():
    rs = corpus.recipes()
    assert len(rs) >= 30
    assert all(corpus.provenance(r) for r in rs + sorted((corpus.RECIPES / "refused").glob("*.yml")))
    assert len({corpus.method(r) for r in rs}) >= 10


@pytest.mark.parametrize("recipe", sorted((corpus.RECIPES / "refused").glob("*.yml")), ids=lambda p: p.stem)
def test_refused_recipe_says_why_in_one_line(recipe: Path, families: Path, tmp_path: Path):
    want = next(line.split(":", 1)[1].strip() for line in recipe.read_text().splitlines()
                if line.startswith("# refused:"))
    given = corpus.materialize(recipe, families, tmp_path / recipe.name)
    r = CliRunner().invoke(app, ["merge", str(given), str(tmp_path / "out"), "--catalog", str(tmp_path / "c")],
                           catch_exceptions=False)
    assert r.exit_code == 2, r.output
    text = " ".join(r.output.split())
    assert "Traceback" not in r.output and text.startswith("error:") and str(given) in text and want in text, text
    assert not (tmp_path / "out").exists()
