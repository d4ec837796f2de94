"""FeatCal as a `calibrate:` stage of a merge, through plan -> execute: what it changes, what it leaves
bit-identical, its manifest, replay, budget prefixes and bad input. The math and the loop are tested
in test_featcal.py; here the reference is the loop run directly on tensors loaded with safetensors."""

import dataclasses
import json

import pytest
import torch
import yaml
from typer.testing import CliRunner

from mergepipe.cli import app
from mergepipe.config import load_config
from mergepipe.demo import demo_config
from mergepipe.errors import InputChangedError, MergepipeError
from mergepipe.execute import MANIFEST_NAME, execute
from mergepipe.featcal.calibrate import TensorSource, calibrate
from mergepipe.featcal.layers import Arch
from mergepipe.index import Catalog
from mergepipe.manifest import load_manifest
from mergepipe.plan import plan_merge

from helpers import load_all, calibration

# 16 sequences of 12-23 tokens: at least the 176 inputs of the tiny family's down_proj per expert
PARAMS = {"samples": 16, "seq_len": 24, "batch_size": 8}


def _data(workdir, experts=4, seed=0, tasks=False):
    g = torch.Generator().manual_seed(seed)
    path = workdir / "calib.jsonl"
    with open(path, "w") as f:
        for k in range(experts):
            for _ in range(PARAMS["samples"]):
                n = int(torch.randint(12, 24, (1,), generator=g))
                rec = {"input_ids": torch.randint(0, 512, (n,), generator=g).tolist()}
                if tasks:
                    rec["task"] = f"t{k}"
                f.write(json.dumps(rec) + "\n")
    return path


def _config(family, workdir, data, name="fc.yml", budget=None, **calib):
    cfg = demo_config(family, "task_arithmetic")
    cfg["calibrate"] = {"data": str(data), "parameters": {**PARAMS, **calib.pop("parameters", {})}, **calib}
    if budget:
        cfg["calibrate"]["budget"] = budget
    path = workdir / name
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def _plan(family, workdir, **kw):
    data = kw.pop("data", None) or _data(workdir)
    return plan_merge(load_config(_config(family, workdir, data, **kw)), "100%", Catalog(workdir / "c.sqlite"))


def test_calibrated_merge_matches_the_loop_and_leaves_the_rest(family, workdir):
    m = _plan(family, workdir)
    c = calibration(m)
    assert c.prefixes == [2, 2, 2, 2] and c.sequences == [16] * 4 and len(c.data) == 1
    assert c.statistics["self_attn.q_proj"] == [64, 64] and c.statistics["input_layernorm"] == [64]
    done = execute(m, workdir / "out")
    got = load_all(workdir / "out")
    execute(dataclasses.replace(m, stages=[]), workdir / "plain")
    plain = load_all(workdir / "plain")
    # the reference: the same loop over in-memory tensors of the plain merge
    base = load_all(family["base"])
    experts = [load_all(family[f"expert{k}"]) for k in range(1, 5)]
    from mergepipe.featcal.data import load_calibration
    arch = Arch.from_config(family["base"] / "config.json", tensor_names=base)
    ids = load_calibration([workdir / "calib.jsonl"], 4, 512, 16, 24).ids
    ref = {}
    calibrate(arch, TensorSource(base), TensorSource(plain), [TensorSource(e) for e in experts], ids, c.params,
              lambda n, t: ref.__setitem__(n, t.to(plain[n].dtype)), store_dtype=torch.bfloat16)
    assert ref and all(n.startswith("model.layers.") for n in ref)
    for name, t in got.items():
        if name in ref:
            assert torch.equal(t, ref[name]), name
            assert not torch.equal(t, plain[name]), name
        else:
            assert torch.equal(t, plain[name]), name  # embeddings, final norm, lm_head: the merge's bytes
    ex = done.execution
    feat = [d["featcal"] for d in ex.diagnostics.values() if "featcal" in d]
    assert len(feat) == len(ref) and all(f["experts"] == [0, 1, 2, 3] and f["rel_change"] > 0 for f in feat)
    assert ex.expert_bytes_read > m.plan.planned_expert_bytes  # the calibration's reads are counted too
    assert not list(workdir.glob(".out.mergepipe-*"))  # the private merge copy is gone


def test_replay_bit_exact_and_verify(family, workdir):
    m = _plan(family, workdir)
    a = execute(m, workdir / "a")
    b = execute(load_manifest(workdir / "a" / MANIFEST_NAME), workdir / "b")
    assert a.execution.root_hash == b.execution.root_hash
    r = CliRunner().invoke(app, ["verify", str(workdir / "a" / MANIFEST_NAME), "-o", str(workdir / "b")])
    assert r.exit_code == 0, r.output


def test_budget_grants_layer_prefixes(family, workdir):
    m = _plan(family, workdir, budget="50%")
    c = calibration(m)
    assert c.budget.bytes <= c.budget.expert_bytes_total // 2 + 1
    assert sorted(c.prefixes, reverse=True) != [2, 2, 2, 2] and max(c.prefixes) >= 1
    done = execute(m, workdir / "half")
    calibrated_layers = set()
    for name, d in done.execution.diagnostics.items():
        if "featcal" in d:
            layer = int(name.split(".")[2])
            calibrated_layers.add(layer)
            assert d["featcal"]["experts"] == [k for k in range(4) if c.prefixes[k] > layer], name
    assert calibrated_layers == set(range(max(c.prefixes)))


def test_task_routing_and_text_equals_ids(family, workdir):
    data = _data(workdir, tasks=True)
    m = _plan(family, workdir, data=data, tasks=["t0", "t1", "t2", "t3"])
    assert calibration(m).tasks == ["t0", "t1", "t2", "t3"]
    with pytest.raises(MergepipeError, match="task"):
        _plan(family, workdir, data=data, tasks=["t0", "t1", "t2", "zz"], name="bad.yml")


def test_bad_input_one_line(family, workdir, tmp_path):
    with pytest.raises(MergepipeError, match="missing.jsonl"):
        _plan(family, workdir, data=tmp_path / "missing.jsonl")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(MergepipeError, match="empty.jsonl"):
        _plan(family, workdir, data=empty)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"input_ids": [1, 2]}\n{"input_ids": [1, 99999]}\n')
    with pytest.raises(MergepipeError, match="bad.jsonl:2"):
        _plan(family, workdir, data=bad)
    with pytest.raises(MergepipeError, match="context"):
        _plan(family, workdir, parameters={"seq_len": 4096})
    with pytest.raises(MergepipeError, match="tasks"):
        _plan(family, workdir, tasks=["a"])
    with pytest.raises(MergepipeError, match="lambda"):
        _plan(family, workdir, parameters={"lambda": -1.0})
    with pytest.raises(MergepipeError, match="unknown"):
        _plan(family, workdir, parameters={"sharpness": 1.0})


def test_unsupported_architecture_and_changed_data(family, workdir, copy_family):
    fam = copy_family()
    cfg = json.loads((fam["base"] / "config.json").read_text())
    m = _plan(fam, workdir)
    (fam["base"] / "config.json").write_text(json.dumps({**cfg, "model_type": "gpt2"}))
    with pytest.raises(MergepipeError, match="gpt2"):
        _plan(fam, workdir, name="gpt2.yml")
    (fam["base"] / "config.json").unlink()
    with pytest.raises(MergepipeError, match="config.json"):
        _plan(fam, workdir, name="noconfig.yml")
    (fam["base"] / "config.json").write_text(json.dumps(cfg))
    with open(workdir / "calib.jsonl", "a") as f:
        f.write('{"input_ids": [3]}\n')
    with pytest.raises(InputChangedError, match="calib.jsonl"):
        execute(m, workdir / "changed")
    assert not (workdir / "changed").exists()


def test_cli_one_line_error(family, workdir, tmp_path):
    path = _config(family, workdir, tmp_path / "nope.jsonl")
    r = CliRunner().invoke(app, ["plan", str(path), "-o", str(workdir / "m.json")])
    assert r.exit_code == 2 and "nope.jsonl" in r.output and "Traceback" not in r.output
    assert len(r.output.strip().splitlines()) == 1


def test_verify_and_explain_see_the_calibration(family, workdir):
    m = _plan(family, workdir)
    execute(m, workdir / "out")
    manifest = str(workdir / "out" / MANIFEST_NAME)
    r = CliRunner().invoke(app, ["explain", manifest, "--json"])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert [s["kind"] for s in doc["stages"]] == ["featcal"] and doc["stages"][0]["record"]["prefixes"] == [2, 2, 2, 2]
    assert any(row["diagnostics"] and "featcal" in row["diagnostics"] for row in doc["tensors"])
    r = CliRunner().invoke(app, ["explain", manifest])
    assert r.exit_code == 0 and "layer prefixes per expert [2, 2, 2, 2]" in r.stdout.replace("\n", " ")
    assert CliRunner().invoke(app, ["verify", manifest, "-o", str(workdir / "out")]).exit_code == 0
    with open(workdir / "calib.jsonl", "a") as f:
        f.write('{"input_ids": [5]}\n')
    r = CliRunner().invoke(app, ["verify", manifest, "-o", str(workdir / "out")])
    assert r.exit_code == 1 and "calib.jsonl" in r.output and "changed since planning" in r.output


def test_calibrates_a_gcwm_merge(family, workdir):
    """The stage follows any operator: here GCWM, whose diagnostics and FeatCal's share the manifest."""
    cfg = demo_config(family, "gcwm", solver="adam", inner_steps=5)
    cfg["calibrate"] = {"data": str(_data(workdir)), "parameters": PARAMS}
    (workdir / "g.yml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    m = plan_merge(load_config(workdir / "g.yml"), "100%", Catalog(workdir / "c.sqlite"))
    done = execute(m, workdir / "out")
    diag = done.execution.diagnostics
    both = [n for n, d in diag.items() if "featcal" in d and "conflict" in d]
    assert both and all(n.endswith("_proj.weight") for n in both)  # GCWM targets, then calibrated
    assert any("featcal" in d and "conflict" not in d for d in diag.values())  # norms and biases: FeatCal only
    plain = execute(dataclasses.replace(m, stages=[]), workdir / "plain")
    got, ref = load_all(workdir / "out"), load_all(workdir / "plain")
    for name in ref:
        assert torch.equal(got[name], ref[name]) == (name not in diag or "featcal" not in diag[name]), name
    assert plain.execution.diagnostics.keys() <= diag.keys()


def test_interrupted_calibration_keeps_the_merge_for_the_rerun(family, workdir, monkeypatch):
    """Ctrl-C during the calibration publishes nothing and deletes nothing: the merge stays journaled
    in the staging folder, and the rerun takes all of it over and calibrates."""
    import mergepipe.featcal.stage as stage
    m = _plan(family, workdir)
    real = stage.calibrate

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(stage, "calibrate", interrupted)
    with pytest.raises(KeyboardInterrupt):
        execute(m, workdir / "out")
    assert not (workdir / "out").exists()
    monkeypatch.setattr(stage, "calibrate", real)
    done = execute(m, workdir / "out")
    fresh = execute(m, workdir / "fresh")
    assert done.execution.root_hash == fresh.execution.root_hash
    assert done.execution.resumed_bytes == sum(f.size for f in fresh.execution.outputs.values())

def test_too_few_tokens_is_one_line_naming_the_file(family, workdir, tmp_path):
    """Fewer calibration tokens per expert than down_proj has inputs (176 here): refused at
    planning, unless the user allows the underdetermined solve."""
    short = tmp_path / "short.jsonl"
    short.write_text("".join(json.dumps({"input_ids": list(range(1, 21))}) + "\n" for _ in range(8)))  # 160 tokens
    path = _config(family, workdir, short)
    r = CliRunner().invoke(app, ["plan", str(path), "-o", str(workdir / "m.json")])
    assert r.exit_code == 2 and "Traceback" not in r.output and len(r.output.strip().splitlines()) == 1
    assert "short.jsonl" in r.output and "160 calibration tokens" in r.output and "176 inputs of mlp.down_proj" in r.output
    assert not (workdir / "m.json").exists()
    m = _plan(family, workdir, data=short, parameters={"allow_underdetermined": True}, name="ok.yml")
    assert calibration(m).tokens == [160] * 4 and calibration(m).params["allow_underdetermined"] is True


def test_reads_are_charged_to_the_calibration_budget(family, workdir):
    """The calibration's expert reads are a second read: exactly what calibrate.budget granted,
    recorded apart, and the merge's own reads are what its plan granted."""
    m = _plan(family, workdir)
    c = calibration(m)
    assert c.params["order"] == "module"
    ex = execute(m, workdir / "out").execution
    assert ex.stage_bytes_read == {"featcal": c.budget.bytes}
    assert ex.expert_bytes_read == m.plan.planned_expert_bytes + c.budget.bytes
    saved = json.loads((workdir / "out" / MANIFEST_NAME).read_text())
    assert saved["execution"]["stage_bytes_read"] == {"featcal": c.budget.bytes}
    assert saved["stages"][0]["record"]["params"]["order"] == "module"
