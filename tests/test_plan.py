import pytest

from mergepipe.config import load_config, parse_config
from mergepipe.errors import MergepipeError
from mergepipe.index import Catalog
from mergepipe.manifest import runs_to_set
from mergepipe.plan import parse_budget, plan_merge

from conftest import write_config


@pytest.mark.parametrize("spec, total, want", [
    ("20%", 1000, 200), ("100%", 1000, 1000), ("0%", 1000, 0), ("3GiB", 0, 3 * 2**30),
    ("500MB", 0, 500 * 10**6), ("1.5KiB", 0, 1536), ("12345B", 0, 12345)])
def test_parse_budget(spec, total, want):
    assert parse_budget(spec, total) == want


@pytest.mark.parametrize("spec", ["abc", "150%", "-1", "5 parsecs", ""])
def test_bad_budgets(spec):
    with pytest.raises(MergepipeError, match="budget"):
        parse_budget(spec, 1000)


@pytest.mark.parametrize("spec", ["20", "0.5", "100"])
def test_bare_number_budget_is_refused_not_bytes(spec):
    """`-b 20` meant 20 bytes once; a number without a unit is now refused, and the message offers
    both readings."""
    with pytest.raises(MergepipeError, match=rf"no unit: .*{spec}%.*{spec}GiB"):
        parse_budget(spec, 1000)


def test_budget_sound_deterministic_and_exact_at_full(family, workdir):
    cfg = load_config(write_config(workdir / "ta.yml", family))
    cat = Catalog(workdir / "c.sqlite")
    full = plan_merge(cfg, "100%", cat)
    assert full.plan.certificate.bound == 0.0
    for tp in full.plan.tensors.values():
        assert tp.selected == tp.candidates
    bounds = []
    for pct in (50, 20, 10, 5):
        a = plan_merge(cfg, f"{pct}%", cat)
        b = plan_merge(cfg, f"{pct}%", cat)
        assert a.to_json() == b.to_json()  # deterministic
        assert a.plan.planned_expert_bytes <= a.budget.bytes == int(a.budget.expert_bytes_total * pct / 100)
        assert sum(tp.planned_bytes for tp in a.plan.tensors.values()) == a.plan.planned_expert_bytes
        bounds.append(a.plan.certificate.bound)
    assert bounds == sorted(bounds) and bounds[0] > 0  # less budget, larger bound


def test_score_planner_beats_random_on_bound(family, workdir):
    cfg = load_config(write_config(workdir / "ta.yml", family))
    cat = Catalog(workdir / "c.sqlite")
    score = plan_merge(cfg, "20%", cat)
    rand = plan_merge(cfg, "20%", cat, planner="random", seed=1)
    assert rand.plan.planned_expert_bytes <= rand.budget.bytes
    assert score.plan.certificate.bound < rand.plan.certificate.bound
    assert plan_merge(cfg, "20%", cat, planner="random", seed=1).to_json() == rand.to_json()


def test_ties_skips_blocks_below_threshold(family, workdir):
    cfg = load_config(write_config(workdir / "ties.yml", family, "ties", density=0.05))
    m = plan_merge(cfg, "100%", Catalog(workdir / "c.sqlite"))
    assert m.plan.certificate.kind == "none"
    cand = sum(len(runs_to_set(r)) for tp in m.plan.tensors.values() for r in tp.candidates)
    total = sum(tp.blocks for tp in m.plan.tensors.values()) * len(m.experts)
    assert cand < total  # some blocks wholly below the trim threshold are never read


def test_index_reuses_catalog(family, workdir, monkeypatch):
    cfg = load_config(write_config(workdir / "ta.yml", family))
    cat = Catalog(workdir / "c.sqlite")
    plan_merge(cfg, "100%", cat)
    import mergepipe.index as index
    monkeypatch.setattr(index, "_scan", lambda *a, **k: pytest.fail("re-read an unchanged file"))
    plan_merge(cfg, "50%", Catalog(workdir / "c.sqlite"))


@pytest.mark.parametrize("doc, expect", [
    ({"merge_method": "sce", "base_model": "b", "models": [{"model": "e"}]}, "<config>: merge_method 'sce' is not supported"),
    ({"merge_method": "ties", "base_model": "b", "models": [{"model": "e", "parameters": {"weight": 1, "densty": 0.2}}]}, "densty"),
    ({"merge_method": "task_arithmetic", "base_model": "b", "models": [{"model": "e", "parameters": {"weight": 1, "density": 0.2}}]}, "density"),
    ({"merge_method": "task_arithmetic", "base_model": "b", "models": [{"model": "e"}]}, "weight"),
    ({"merge_method": "task_arithmetic", "base_model": "b", "models": [{"model": "e", "parameters": {"weight": "x"}}]}, "weight"),
    ({"merge_method": "ties", "base_model": "b", "models": [{"model": "e", "parameters": {"weight": 1, "density": 1.5}}]}, "density"),
    ({"merge_method": "task_arithmetic", "base_model": "b", "models": [{"model": "e", "parameters": {"weight": 1}}], "slices": []}, "slices"),
    ({"merge_method": "task_arithmetic", "base_model": "b", "models": [{"model": "e", "parameters": {"weight": [0, {"value": 1}]}}]}, "not a mix"),
    ({"merge_method": "task_arithmetic", "base_model": "b", "models": [{"model": "e", "parameters": {"weight": {"filter": "mlp"}}}]}, "value"),
    ({"merge_method": "task_arithmetic", "base_model": "b", "models": [{"model": "e", "parameters": {"weight": ["x", 1]}}]}, "weight"),
    ({"merge_method": "task_arithmetic", "base_model": "b", "models": [{"model": "e", "parameters": {"weight": 1}}], "dtype": "int4"}, "dtype"),
])
def test_config_is_strict(doc, expect):
    with pytest.raises(MergepipeError, match=expect):
        parse_config(doc)


def test_config_defaults_and_dtype():
    cfg = parse_config({"merge_method": "ties", "base_model": "b", "dtype": "bfloat16",
                        "parameters": {"density": 0.3, "lambda": 0.5},
                        "models": [{"model": "b"}, {"model": "e", "parameters": {"weight": 1}}]})
    assert cfg.experts == ["e"] and cfg.expert_params == [{"weight": 1.0, "density": 0.3}]
    assert cfg.params["normalize"] is True and cfg.params["lambda"] == 0.5
    assert cfg.out_dtype == "BF16"


def test_changed_file_is_reindexed(copy_family, workdir):
    fam = copy_family()
    cfg = load_config(write_config(workdir / "ta.yml", fam))
    cat = Catalog(workdir / "c.sqlite")
    before = plan_merge(cfg, "100%", cat)
    shard = sorted(fam["expert1"].glob("*.safetensors"))[0]
    data = bytearray(shard.read_bytes())
    data[-11] ^= 0x10
    shard.write_bytes(bytes(data))
    after = plan_merge(cfg, "100%", cat)
    old = {f.name: f.content_hash for f in before.experts[0].files}
    new = {f.name: f.content_hash for f in after.experts[0].files}
    assert old[shard.name] != new[shard.name]
    assert [f.content_hash for f in before.experts[1].files] == [f.content_hash for f in after.experts[1].files]


@pytest.mark.parametrize("budget", ["20%", "45%"])
def test_the_os_reads_no_more_of_the_experts_than_the_budget(workdir, budget):
    """Below 100% the budget caps what the kernel reads of the experts, counted from the page cache
    (mincore) after a cold execute: blocks end mid-page, and every file's header is read. On this
    family most blocks are smaller than a page, so charging bytes alone would read well over it."""
    import mmap
    from pathlib import Path
    from bench.measure import evict, resident_pages
    from mergepipe.checkpoint import open_model
    from mergepipe.execute import execute
    from mergepipe.synth import TINY, build_family
    # a family of its own: pages another test still maps (the shared family's) cannot be evicted
    family = build_family(workdir / "family", TINY, experts=4, seed=0, shards=2)
    m = plan_merge(load_config(write_config(workdir / "ta.yml", family)), budget, Catalog(workdir / "c.sqlite"))
    experts = [f.path for k in range(1, 5) for f in open_model(str(family[f"expert{k}"])).files]
    sidecars = [Path(rec.sketch.path) for rec in m.experts if rec.sketch]
    assert sidecars, "the plan fills from the sketches: their pages count too"
    if not evict(experts + sidecars):
        pytest.skip("this file system keeps the files' pages cached after POSIX_FADV_DONTNEED")
    done = execute(m, workdir / "out")
    read = sum(len(resident_pages(p)) for p in experts + sidecars) * mmap.PAGESIZE
    assert 0 < done.execution.expert_bytes_read <= read <= m.budget.bytes
