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


@pytest.mark.parametrize("case", ["slerp", "nuslerp-base", "nuslerp-rows", "model_stock", "model_stock-filter"])
def test_whole_tensor_sums_against_mergekit_on_every_core(case, wide_family, workdir):
    """mergekit's CLI runs torch on every core, and torch splits a whole-tensor sum (a norm, a dot
    product) across its threads, so mergekit's own bits depend on the machine; mergepipe keeps one
    thread, so that a replay anywhere is bit-exact. Measured: mergepipe is never farther from
    mergekit-on-every-core than mergekit-on-one-thread is, and at most 1 ulp where that is 0."""
    import os
    method, n, base, shared, per_model = DETERMINISTIC[case]
    cfg = recipe(wide_family, method, n, base, shared, **per_model)
    if method in ("slerp", "model_stock"):
        for m in cfg["models"]:
            m["parameters"].pop("weight")
    cores = max(2, os.cpu_count() or 1)
    before = torch.get_num_threads()
    torch.set_num_threads(cores)
    try:
        mp, mk, _ = both(workdir, cfg)
        torch.set_num_threads(1)
        run_mergekit(workdir / "recipe.yml", workdir / "mk1")
    finally:
        torch.set_num_threads(before)
    mk1 = load_all(workdir / "mk1")
    # mergepipe splits these passes over its compute threads (the embedding is two of slerp's 2^20
    # chunks), and still gives mergekit-on-one-thread's bits
    assert max_ulps(mp, mk1) == 0
    own = max_ulps(mk1, mk)
    worst = max_ulps(mp, mk)
    print(f"{case}: mergepipe vs mergekit on {cores} threads {worst} ulp; mergekit 1 vs {cores} threads {own} ulp")
    assert worst <= max(own, 1)


def test_passthrough_matches_mergekit(family, workdir, one_thread):
    cfg = {"merge_method": "passthrough", "models": [{"model": str(family["expert2"])}], "dtype": "float32",
           "out_dtype": "float32"}
    mp, mk, done = both(workdir, cfg)
    assert max_ulps(mp, mk) == 0
    assert done.execution.expert_bytes_read == 0  # the one model is read as the base


# --- the trimming and random methods: mergekit's pipeline with mergepipe's choice of entries --------

@pytest.fixture(scope="module")
def wide_family(tmp_path_factory):
    """Tensors of several blocks (the embedding and lm_head are 2 row blocks each), and deltas of a few bf16 ulps, so
    that many entries tie at a trim threshold, as low-learning-rate fine-tunes do."""
    from mergepipe.synth import Shape, build_family
    shape = Shape(vocab=4160, hidden=256, intermediate=64, layers=1, heads=4, kv_heads=2)
    return build_family(tmp_path_factory.mktemp("wide"), shape, experts=3, seed=3, delta_scale=3e-4)


def mergekit_with_our_choice(family, cfg: dict, rule: str, ours) -> dict[str, torch.Tensor]:
    """mergekit's own merge of every tensor (merge_tensors, float32), its sparsification rule `rule`
    replaced by `ours(delta, key, **mergekit's arguments)`, keyed as mergepipe keys (seed 0)."""
    import mergekit.sparsify as mks
    from mergekit.merge_methods import merge_tensors

    from mergepipe.operators import positional as P
    base = load_all(family["base"])
    models = [load_all(m["model"]) for m in cfg["models"]]
    out, keys = {}, []
    original = getattr(mks, rule)

    def patched(tensor, *args, **kwargs):
        return ours(tensor, keys.pop(0), *args, **kwargs)
    setattr(mks, rule, patched)
    try:
        for name, b in base.items():
            keys[:] = [P.stream_key(0, name, k, "sparsify") for k in range(len(models))]
            params = {p: [m["parameters"][p] for m in cfg["models"]] for p in cfg["models"][0]["parameters"]}
            params.update(cfg.get("parameters") or {})
            out[name] = merge_tensors([b, *(m[name] for m in models)], cfg["merge_method"], parameters=params,
                                      base_index=0, dtype=torch.float32)
    finally:
        setattr(mks, rule, original)
    return out


def test_breadcrumbs_keeps_mergekits_k_and_differs_only_at_threshold_ties(wide_family, workdir, one_thread):
    from mergepipe.operators import sparsify as S
    density, gamma = 0.3, 0.02
    cfg = recipe(wide_family, "breadcrumbs", 3, density=density, gamma=gamma)
    mp, mk, _ = both(workdir, cfg)

    def ours(tensor, key, density, rescale_norm=None, gamma=0.01):
        return S.magnitude_outliers(tensor, density, gamma, key, rescale_norm is not None)
    assert max_ulps(mp, mergekit_with_our_choice(wide_family, cfg, "magnitude_outliers", ours)) == 0
    base = load_all(wide_family["base"])
    experts = [load_all(wide_family[f"expert{k}"]) for k in (1, 2, 3)]
    differing = tied_total = 0
    for name, b in base.items():
        tied = torch.zeros(b.shape, dtype=torch.bool)
        for k, e in enumerate(experts):
            d = e[name].float() - b.float()
            n = d.numel()
            mask = S.outliers_mask(d, density, gamma, 0)
            assert int(mask.sum()) == int(density * n)  # exactly mergekit's count
            ranked = d.abs().reshape(-1).sort().values
            bottom = max(0, n - int(density * n) - int(gamma * n))
            for edge in {bottom, bottom + int(density * n) - 1} - {-1, n}:
                tied |= d.abs() == ranked[edge]  # mergekit's sort may put either of equal entries first
        diff = ulps_map(mp[name], mk[name]) > 0
        assert not (diff & ~tied).any(), f"{name}: differs from mergekit away from a threshold tie"
        differing += int(diff.sum())
        tied_total += int(tied.sum())
    print(f"breadcrumbs vs mergekit: {differing} elements differ, all among {tied_total} threshold ties")


def ulps_map(a, b):
    def ordered(t):
        i = t.float().contiguous().view(torch.int32).to(torch.int64)
        return torch.where(i < 0, -(i & 0x7FFFFFFF), i)
    return (ordered(a) - ordered(b)).abs()


@pytest.mark.parametrize("rescale", [False, True])
def test_ties_keeps_exactly_k_and_equals_mergekit_with_the_hash_tie_order(rescale, wide_family, workdir, one_thread):
    """The streaming TIES kernel (thresholds from the index, a spill for the threshold bin), and with
    rescale the whole-tensor one (mergekit's L1 rescale of each trimmed delta), equal mergekit's TIES
    with its argsort replaced by the exact-k hash order, and away from threshold ties equal mergekit's
    own output (equal magnitudes have the same L1, so the rescale factor does not depend on the tie
    order)."""
    from mergepipe.operators import positional as P
    from mergepipe.operators import sparsify as S
    density = 0.3
    cfg = recipe(wide_family, "ties", 3, shared={"rescale": True} if rescale else None, density=density)
    mp, mk, done = both(workdir, cfg)
    base = load_all(wide_family["base"])
    for name, tp in done.plan.tensors.items():
        assert tp.data["tie"] == "hash" and tp.data["k"] == [max(1, int(density * base[name].numel()))] * 3
        assert tp.params["rescale"] is rescale

    ref = {}
    for name in base:  # TIES's tie stream is keyed "tie"
        import mergekit.sparsify as mks
        from mergekit.merge_methods import merge_tensors
        models = [load_all(m["model"]) for m in cfg["models"]]
        keys = [P.stream_key(0, name, k, "tie") for k in range(3)]
        original = mks.magnitude
        mks.magnitude = lambda t, density, rescale_norm=None: S.magnitude(t, density, keys.pop(0),
                                                                        rescale_norm is not None)
        try:
            ref[name] = merge_tensors([base[name], *(m[name] for m in models)], "ties",
                                      parameters={"weight": list(WEIGHTS[:3]), "density": [density] * 3,
                                                  "rescale": rescale},
                                      base_index=0, dtype=torch.float32)
        finally:
            mks.magnitude = original
    assert max_ulps(mp, ref) == 0
    experts = [load_all(wide_family[f"expert{k}"]) for k in (1, 2, 3)]
    differing = ties = 0
    for name, b in base.items():
        tied = torch.zeros(b.shape, dtype=torch.bool)
        for e in experts:
            d = (e[name].float() - b.float()).abs()
            tied |= d == d.reshape(-1).topk(max(1, int(density * d.numel()))).values[-1]
        diff = ulps_map(mp[name], mk[name]) > 0
        assert not (diff & ~tied).any(), f"{name}: differs from mergekit away from a threshold tie"
        differing, ties = differing + int(diff.sum()), ties + int(tied.sum())
    print(f"TIES vs mergekit: {differing} elements differ, all among {ties} threshold ties")


RANDOM = {  # method: (per-model parameters, the rule it replaces in mergekit, ours with mergekit's signature)
    "dare_linear": ({"density": 0.3}, "bernoulli"),
    "dare_ties": ({"density": 0.3}, "bernoulli"),
    "della": ({"density": 0.4, "epsilon": 0.1}, "della_magprune"),
    "della_linear": ({"density": 0.4, "epsilon": 0.1}, "della_magprune"),
}


def _ours(rule):
    from mergepipe.operators import sparsify as S
    if rule == "bernoulli":
        return lambda t, key, density, rescale_norm=None: S.bernoulli(t, density, key, rescale_norm is not None)
    return lambda t, key, density, epsilon, rescale_norm=None: S.della_magprune(t, density, epsilon, key,
                                                                                  rescale_norm is not None)


@pytest.mark.parametrize("method", list(RANDOM))
def test_random_methods_rescale_as_mergekit_and_replay(method, wide_family, workdir, one_thread):
    """With mergekit's torch.bernoulli replaced by mergepipe's per-position draws, mergekit's own
    pipeline (L1 rescale, consensus, normalisation) gives mergepipe's output bit for bit; executing
    the manifest again gives the same root hash; another seed draws other entries."""
    per_model, rule = RANDOM[method]
    cfg = recipe(wide_family, method, 3, **per_model)
    mp, _, done = both(workdir, cfg)
    assert max_ulps(mp, mergekit_with_our_choice(wide_family, cfg, rule, _ours(rule))) == 0
    again = execute(done, workdir / "again")
    assert again.execution.root_hash == done.execution.root_hash
    other = dict(cfg, parameters={"seed": 1})
    (workdir / "seed1.yml").write_text(yaml.safe_dump(other))
    m1 = execute(plan_merge(load_config(workdir / "seed1.yml"), "100%", Catalog(workdir / "c.sqlite")), workdir / "s1")
    assert m1.execution.root_hash != done.execution.root_hash


def test_a_whole_tensor_merge_takes_an_expert_read_only_from_its_sketch():
    """Under a budget, an expert none of whose blocks of a tensor are read exactly, but some filled
    from its sketch, enters that tensor's whole-tensor merge as base + sketch, not as the base."""
    from types import SimpleNamespace
    from mergepipe.operators.whole import WholeTensor
    job = SimpleNamespace(exact=(frozenset({0}), frozenset(), frozenset()), sketched=(frozenset(), frozenset({1}), frozenset()))
    assert WholeTensor(job, torch.device("cpu"), None).active == [0, 1]
    assert WholeTensor(SimpleNamespace(exact=job.exact, sketched=()), torch.device("cpu"), None).active == [0]


@pytest.mark.parametrize("rule", ["bernoulli", "della"])
def test_random_rules_keep_the_requested_fraction(rule, wide_family, one_thread):
    """Per (expert, tensor) of at least 2^16 entries, and over the family, the kept share is within
    1% of density (DELLA's probabilities average to density over a row's ranks)."""
    from mergepipe.operators import positional as P
    from mergepipe.operators import sparsify as S
    density = 0.3
    base = load_all(wide_family["base"])
    kept = total = 0
    for k in (1, 2, 3):
        e = load_all(wide_family[f"expert{k}"])
        for name, b in base.items():
            d = e[name].float() - b.float()
            key = P.stream_key(0, name, k, "sparsify")
            rows = d if d.dim() >= 2 else d.unsqueeze(0)
            mask = S.bernoulli_mask(d, density, key) if rule == "bernoulli" else S.della_mask(rows, density, 0.1, key)
            if d.numel() >= 1 << 16:
                assert abs(float(mask.mean()) - density) < 0.01, name
            kept, total = kept + int(mask.sum()), total + d.numel()
    assert abs(kept / total - density) < 0.01
    print(f"{rule}: kept {kept / total:.4f} of {total} entries at density {density}")


# --- budgets --------------------------------------------------------------------------------------

BUDGETED = {  # id: (method, experts, base, shared, per-model, whether the certificate is recorded)
    "linear-base": ("linear", 3, "listed", None, {}, True),
    "linear-nobase": ("linear", 3, "none", None, {}, True),
    "dare_linear": ("dare_linear", 3, "given", None, {"density": 0.5}, False),
    "dare_ties": ("dare_ties", 3, "given", None, {"density": 0.5}, False),
    "breadcrumbs": ("breadcrumbs", 3, "given", None, {"density": 0.5}, False),
    "breadcrumbs_ties": ("breadcrumbs_ties", 3, "given", None, {"density": 0.5}, False),
    "della": ("della", 3, "given", None, {"density": 0.5}, False),
    "della_linear": ("della_linear", 3, "given", None, {"density": 0.5}, False),
    "slerp": ("slerp", 1, "given", {"t": 0.4}, {}, False),  # the embedding interpolates spherically
    "slerp-linear": ("slerp", 1, "given", {"t": 0.4}, {}, True),  # every tensor in the linear regime
}


@pytest.fixture(scope="module")
def close_family(tmp_path_factory):
    """wide_family's shapes with deltas a third as large: every tensor's cosine to the base is above
    slerp's threshold by more than the certificate's margin, as in a low-learning-rate fine-tune."""
    from mergepipe.synth import Shape, build_family
    shape = Shape(vocab=4160, hidden=256, intermediate=64, layers=1, heads=4, kv_heads=2)
    return build_family(tmp_path_factory.mktemp("close"), shape, experts=1, seed=3, delta_scale=1e-4)


@pytest.mark.parametrize("out_dtype", ["float32", "bfloat16"])
def test_slerp_read_whole_streams_in_the_linear_regime_with_mergekits_bits(out_dtype, close_family, workdir,
                                                                          one_thread, monkeypatch):
    """At 100% a tensor the index puts in the linear regime is merged block by block, never assembled
    whole: mergekit's coefficients there are (1 - t, t) whatever its float32 norms come to."""
    from mergepipe.operators.whole_only import WholeInputs

    def assembled(*a, **k):
        raise AssertionError("a linear-regime slerp tensor was assembled whole")
    cfg = recipe(close_family, "slerp", 1, "given", {"t": 0.4})
    cfg["models"][0]["parameters"].pop("weight")
    cfg["out_dtype"] = out_dtype
    monkeypatch.setattr(WholeInputs, "kernel", assembled)
    mp, mk, done = both(workdir, cfg)
    data = [t.data for t in done.plan.tensors.values() if t.data]
    assert data and all(d["whole"] for d in data)
    assert all(torch.equal(mp[n].view(torch.int16 if out_dtype == "bfloat16" else torch.int32),
                           mk[n].view(torch.int16 if out_dtype == "bfloat16" else torch.int32)) for n in mk)


@pytest.mark.parametrize("case", list(BUDGETED))
def test_budgeted_methods_read_within_budget(case, family, wide_family, close_family, workdir, one_thread):
    from mergepipe.compare import compare
    method, n, base, shared, per_model, certified = BUDGETED[case]
    if method in ("breadcrumbs", "breadcrumbs_ties", "della_linear"):
        wide_family = family  # one block per tensor: whole tensors omitted (the suite's time)
    if case == "slerp-linear":
        wide_family = close_family
    path = workdir / "recipe.yml"
    doc = recipe(wide_family, method, n, base, shared, **per_model)
    if method == "slerp":
        doc["models"][0]["parameters"].pop("weight")
    path.write_text(yaml.safe_dump(doc))
    cfg, catalog = load_config(path), Catalog(workdir / "c.sqlite")
    full = execute(plan_merge(cfg, "100%", catalog), workdir / "full")
    m = plan_merge(cfg, "20%", catalog)
    done = execute(m, workdir / "part")
    assert 0 < done.execution.expert_bytes_read == m.plan.planned_expert_bytes <= m.budget.bytes
    assert m.budget.bytes <= 0.2 * m.budget.expert_bytes_total
    assert done.execution.root_hash != full.execution.root_hash
    if certified:
        assert m.plan.certificate.kind == "frobenius"
        assert 0 < compare(workdir / "part", workdir / "full").frobenius <= m.plan.certificate.bound
    else:
        assert m.plan.certificate.kind == "none" and method in m.plan.certificate.note
    if method == "slerp" and not certified:
        assert "model.embed_tokens.weight" in m.plan.certificate.note and "spherically" in m.plan.certificate.note


@pytest.mark.parametrize("method", ["nuslerp", "model_stock"])
def test_unbudgetable_methods_refuse_a_partial_budget_in_one_line(method, family, workdir):
    from mergepipe.errors import MergepipeError
    shared = {"t": 0.5} if method == "slerp" else None
    cfg = recipe(family, method, 1 if method == "slerp" else 2, "given", shared)
    if method != "nuslerp":
        for m in cfg["models"]:
            m["parameters"].pop("weight")
    path = workdir / "recipe.yml"
    path.write_text(yaml.safe_dump(cfg))
    with pytest.raises(MergepipeError) as e:
        plan_merge(load_config(path), "20%", Catalog(workdir / "c.sqlite"))
    msg = str(e.value)
    assert "\n" not in msg and str(path) in msg and f"{method} cannot be budgeted" in msg


# --- recipes as mergekit reads them ----------------------------------------------------------------

def _parse(cfg, workdir):
    path = workdir / "r.yml"
    path.write_text(yaml.safe_dump(cfg))
    return load_config(path), path


def test_recipe_shapes(family, workdir):
    from mergepipe.errors import MergepipeError
    lin, _ = _parse(recipe(family, "linear", 2, "none"), workdir)
    assert lin.base == str(family["expert1"]) and lin.experts == [str(family["expert1"]), str(family["expert2"])]
    listed, _ = _parse(recipe(family, "linear", 2, "listed"), workdir)
    assert listed.base == str(family["base"]) and listed.experts[1] == str(family["base"])
    assert [p["weight"] for p in listed.expert_params] == [0.6, 0.4, 0.3]
    ta, _ = _parse(recipe(family, "dare_ties", 2), workdir)
    assert ta.params == {"lambda": 1.0, "normalize": False, "rescale": True, "int8_mask": False, "seed": 0}
    assert ta.expert_params[0] == {"weight": 0.6, "density": 1.0}
    della, _ = _parse(recipe(family, "della", 2), workdir)
    assert della.params["normalize"] is True and della.expert_params[0]["epsilon"] == 0.15
    bad = {
        "linear base not listed": (recipe(family, "linear", 2, "given"), "must also be listed under models"),
        "slerp two models": (recipe(family, "slerp", 2, "given", {"t": 0.5}), "exactly 1"),
        "slerp without t": (recipe(family, "slerp", 1, "given"), "parameter 't'"),
        "unknown parameter": (recipe(family, "dare_ties", 2, "given", {"densty": 0.5}), "takes no parameter 'densty'"),
        "della epsilon": (recipe(family, "della", 2, density=0.1, epsilon=0.15), "epsilon"),
        "ties without base": (recipe(family, "ties", 2, "none"), "missing required key 'base_model'"),
        "passthrough two": ({"merge_method": "passthrough", "models": [{"model": str(family["expert1"])},
                                                                     {"model": str(family["expert2"])}]}, "exactly 1"),
    }
    for what, (cfg, expect) in bad.items():
        if what.startswith("slerp"):
            for m in cfg["models"]:
                m["parameters"].pop("weight")
        with pytest.raises(MergepipeError, match=None) as e:
            _parse(cfg, workdir)
            pytest.fail(f"{what}: accepted")
        assert expect in str(e.value) and "\n" not in str(e.value) and "r.yml" in str(e.value), (what, str(e.value))
