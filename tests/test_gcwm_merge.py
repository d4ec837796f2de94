"""GCWM through plan -> execute: target selection, whole-tensor budgets, active sets, diagnostics,
replay. The operator's math is tested in test_gcwm.py; here the reference is gcwm_delta itself, fed
by tensors loaded independently with safetensors."""

import json

import pytest
import torch
import yaml
from typer.testing import CliRunner

from mergepipe.cli import app
from mergepipe.config import load_config
from mergepipe.demo import demo_config
from mergepipe.errors import MergepipeError
from mergepipe.execute import MANIFEST_NAME, execute
from mergepipe.operators.gcwm import tensor_delta
from mergepipe.index import Catalog
from mergepipe.manifest import load_manifest
from mergepipe.operators import gcwm
from mergepipe.plan import plan_merge

from helpers import load_all

FAST = {"solver": "exact", "lambda": 0.5}


def _config(family, workdir, name="gcwm.yml", experts=None, **shared):
    paths = {k: v for k, v in family.items() if k == "base" or experts is None or k in experts}
    cfg = demo_config(paths, "gcwm", **{**FAST, **shared})
    path = workdir / name
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return load_config(path)


def _plan(family, workdir, budget="100%", **kw):
    return plan_merge(_config(family, workdir, **kw), budget, Catalog(workdir / "c.sqlite"))


def _reference(family, experts: list[str], params: dict, active: dict[str, list[int]] | None = None):
    """Base + lambda * gcwm_delta over each target tensor's active experts, cast to bf16."""
    base = load_all(family["base"])
    ws = [load_all(family[e]) for e in experts]
    out = {}
    for name, b in base.items():
        if not gcwm.is_target(name, tuple(b.shape), b.is_floating_point(), params["targets"]):
            out[name] = b.to(torch.bfloat16)
            continue
        ks = active[name] if active is not None else range(len(ws))
        deltas = [ws[k][name].float() - b.float() for k in ks]
        if not deltas:
            out[name] = b.to(torch.bfloat16)
            continue
        d, _ = tensor_delta(deltas, [gcwm_weight] * len(deltas), params, torch.device("cpu"))
        out[name] = (b.float() + params["lambda"] * d).to(torch.bfloat16)
    return out


gcwm_weight = 0.3  # demo_config's per-model weight


def test_full_merge_matches_reference_and_copies_non_targets(family, workdir):
    m = _plan(family, workdir)
    done = execute(m, workdir / "out")
    got = load_all(workdir / "out")
    ref = _reference(family, ["expert1", "expert2", "expert3", "expert4"], m.operator.params)
    base = load_all(family["base"])
    targets = [n for n in base if gcwm.is_target(n, tuple(base[n].shape), True, m.operator.params["targets"])]
    assert targets and len(targets) < len(base)
    for name in ref:
        assert torch.equal(got[name], ref[name]), name
        if name not in targets:
            assert torch.equal(got[name], base[name].to(torch.bfloat16)), name
    # no expert byte of a non-target tensor is read: exactly the targets' bytes, every expert
    target_bytes = sum(m.plan.tensors[n].planned_bytes for n in targets)
    assert done.execution.expert_bytes_read == target_bytes == m.budget.expert_bytes_total
    diag = done.execution.diagnostics
    assert set(diag) == set(targets)
    for d in diag.values():
        assert d["experts"] == [0, 1, 2, 3] and 0 <= d["conflict"] < 1 and 0 < d["gate"] < 1
        assert d["union_rank"] >= 1 and d["form"] == "exact"


def test_budget_drops_whole_expert_tensors_and_equals_gcwm_without_them(family, workdir):
    m = _plan(family, workdir, "40%")
    assert m.plan.planned_expert_bytes <= m.budget.bytes
    active = {}
    for name, tp in m.plan.tensors.items():
        for runs in tp.selected:
            assert runs in ([], [[0, tp.blocks]])  # whole tensors or nothing
        if any(tp.candidates):
            active[name] = [k for k, r in enumerate(tp.selected) if r]
    assert any(0 < len(a) < 4 for a in active.values())  # the budget really left experts out
    done = execute(m, workdir / "part")
    assert done.execution.expert_bytes_read == m.plan.planned_expert_bytes
    assert {n: d["experts"] for n, d in done.execution.diagnostics.items()} == \
        {n: a for n, a in active.items() if a}
    ref = _reference(family, ["expert1", "expert2", "expert3", "expert4"], m.operator.params, active)
    got = load_all(workdir / "part")
    for name in ref:
        assert torch.equal(got[name], ref[name]), name


def test_zero_budget_is_the_base_and_full_budget_equals_unbudgeted(family, workdir):
    m0 = _plan(family, workdir, "0%")
    execute(m0, workdir / "zero")
    base = load_all(family["base"])
    for name, t in load_all(workdir / "zero").items():
        assert torch.equal(t, base[name].to(torch.bfloat16)), name
    a = execute(_plan(family, workdir, "100%"), workdir / "a")
    b = execute(_plan(family, workdir, "1TiB"), workdir / "b")
    assert a.execution.root_hash == b.execution.root_hash


def test_adam_replay_is_bit_exact_and_explain_shows_diagnostics(family, workdir):
    m = _plan(family, workdir, "60%", solver="adam", inner_steps=5, inner_lr=1e-4)
    a = execute(m, workdir / "a")
    b = execute(load_manifest(workdir / "a" / MANIFEST_NAME), workdir / "b")
    assert a.execution.root_hash == b.execution.root_hash
    untimed = [{n: {k: v for k, v in d.items() if k != "seconds"} for n, d in x.execution.diagnostics.items()}
               for x in (a, b)]
    assert untimed[0] == untimed[1]
    assert {d["form"] for d in a.execution.diagnostics.values()} <= {"direct", "task_gram", "aggregated", "shortcut"}
    r = CliRunner().invoke(app, ["explain", str(workdir / "a" / MANIFEST_NAME), "--json"])
    assert r.exit_code == 0, r.output
    rows = {row["tensor"]: row for row in json.loads(r.stdout)["tensors"]}
    for name, d in a.execution.diagnostics.items():
        assert rows[name]["diagnostics"]["conflict"] == d["conflict"]
    r = CliRunner().invoke(app, ["explain", str(workdir / "a" / MANIFEST_NAME)])  # the table renders
    assert r.exit_code == 0 and "gcwm at budget 60%" in r.stdout


def test_bad_input_one_line(family, workdir, copy_family):
    with pytest.raises(MergepipeError, match="gate_min"):
        _config(family, workdir, gate_min=0.9, gate_max=0.2)
    with pytest.raises(MergepipeError, match="rank"):
        _config(family, workdir, rank=0)
    with pytest.raises(MergepipeError, match="no tensor .* matches"):
        _plan(family, workdir, targets="nothing_like_this")
    with pytest.raises(MergepipeError, match="2-D"):
        _plan(family, workdir, targets="input_layernorm.weight")
    fam = copy_family()
    from safetensors.torch import load_file, save_file
    shard = sorted(fam["expert2"].glob("*.safetensors"))[0]
    tensors = load_file(str(shard))
    name = next(n for n in tensors if "q_proj.weight" in n)
    tensors[name][0, 0] = float("nan")
    save_file(tensors, str(shard), metadata={"format": "pt"})
    m = plan_merge(_config(fam, workdir, "nan.yml"), "100%", Catalog(workdir / "c2.sqlite"), allow_nonfinite=True)
    with pytest.raises(MergepipeError, match="NaN"):
        execute(m, workdir / "nan")
    assert not (workdir / "nan").exists()
