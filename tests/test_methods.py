"""Every mergekit 0.1.5 method mergepipe declares, against mergekit itself on the small family, with
dtype float32 and float32 output (so no rounding to bf16 hides a difference): the deterministic
methods bit for bit (or at most MAX_ULP where noted), the trimming ones at exactly mergekit's keep
counts, the random ones by their own invariants (density 1, kept fraction, rescale, replay)."""

from __future__ import annotations

import pytest
import torch
import yaml

from mergepipe.config import load_config
from mergepipe.execute import execute
from mergepipe.index import Catalog
from mergepipe.plan import plan_merge

from helpers import load_all

mergekit = pytest.importorskip("mergekit")


def run_mergekit(config_path, out):
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions
    cfg = MergeConfiguration.model_validate(yaml.safe_load(config_path.read_text()))
    run_merge(cfg, str(out), MergeOptions(copy_tokenizer=False, quiet=True, write_model_card=False))


WEIGHTS = (0.6, 0.3, 0.5, 0.2)


def recipe(family, method: str, experts: int, base: str = "given", shared: dict | None = None, **per_model) -> dict:
    """A mergekit recipe over the family's first `experts` experts. base: "given" (base_model, not
    listed), "listed" (base_model, also listed with a weight) or "none"."""
    models = [{"model": str(family[f"expert{k + 1}"]), "parameters": {"weight": WEIGHTS[k], **per_model}}
              for k in range(experts)]
    cfg = {"merge_method": method, "models": models, "dtype": "float32", "out_dtype": "float32"}
    if base != "none":
        cfg["base_model"] = str(family["base"])
    if base == "listed":
        models.insert(1, {"model": str(family["base"]), "parameters": {"weight": 0.4}})
    if shared:
        cfg["parameters"] = shared
    return cfg


def both(workdir, cfg: dict, budget: str = "100%"):
    path = workdir / "recipe.yml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    run_mergekit(path, workdir / "mk")
    m = plan_merge(load_config(path), budget, Catalog(workdir / "c.sqlite"))
    done = execute(m, workdir / "mp")
    return load_all(workdir / "mp"), load_all(workdir / "mk"), done


def ulps(a: torch.Tensor, b: torch.Tensor) -> int:
    """Largest distance in float32 units in the last place between two tensors (finite values)."""
    def ordered(t):
        i = t.float().contiguous().view(torch.int32).to(torch.int64)
        return torch.where(i < 0, -(i & 0x7FFFFFFF), i)
    return int((ordered(a) - ordered(b)).abs().max()) if a.numel() else 0


def max_ulps(mp, mk) -> int:
    assert set(mp) == set(mk)
    for name in mk:
        assert mp[name].dtype == mk[name].dtype == torch.float32, name
    return max(ulps(mp[n], mk[n]) for n in mk)


DETERMINISTIC = {  # id: (method, experts, base, shared, per-model), each bit-identical to mergekit
    "linear-base": ("linear", 3, "listed", None, {}),
    "linear-nobase": ("linear", 3, "none", None, {}),
    "linear-unnormalized": ("linear", 2, "none", {"normalize": False}, {}),
    "slerp": ("slerp", 1, "given", {"t": 0.3}, {}),
    "nuslerp-base": ("nuslerp", 2, "given", None, {}),
    "nuslerp-nobase": ("nuslerp", 2, "none", None, {}),
    "nuslerp-rows": ("nuslerp", 2, "given", {"nuslerp_flatten": False, "nuslerp_row_wise": True}, {}),
    "model_stock": ("model_stock", 3, "given", None, {}),
    "model_stock-filter": ("model_stock", 3, "given", {"filter_wise": True}, {}),
    "dare_linear-d1": ("dare_linear", 3, "given", None, {}),
    "dare_ties-d1": ("dare_ties", 3, "given", None, {}),
    "della-d1": ("della", 3, "given", None, {}),
    "della_linear-d1": ("della_linear", 3, "given", None, {}),
    "breadcrumbs-d1": ("breadcrumbs", 3, "given", None, {}),
    "breadcrumbs_ties-d1": ("breadcrumbs_ties", 3, "given", {"normalize": True}, {}),
}


@pytest.mark.parametrize("case", list(DETERMINISTIC), ids=str)
def test_deterministic_methods_match_mergekit(case, family, workdir, one_thread):
    method, n, base, shared, per_model = DETERMINISTIC[case]
    cfg = recipe(family, method, n, base, shared, **per_model)
    if method in ("slerp", "model_stock"):
        for m in cfg["models"]:
            m["parameters"].pop("weight")
    mp, mk, _ = both(workdir, cfg)
    assert max_ulps(mp, mk) == 0
