"""Robustness beyond crashes: a damaged or contended catalog, NaN/Inf in weights, shard names that
escape the model folder, and manifests the planner writes for every valid configuration."""

import dataclasses
import json
import sqlite3
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from mergepipe.config import load_config
from mergepipe.errors import MergepipeError
from mergepipe.execute import execute
from mergepipe.index import Catalog
from mergepipe.manifest import load_manifest
from mergepipe.verify import verify
from mergepipe.plan import plan_merge
from mergepipe.checkpoint import open_model

from conftest import write_config
from helpers import load_all


def _plan(fam, workdir, catalog, method="task_arithmetic", **kw):
    params = {"density": kw.pop("density")} if "density" in kw else {}
    return plan_merge(load_config(write_config(workdir / "m.yml", fam, method, **params)), "100%", catalog, **kw)


@pytest.mark.parametrize("damage", ["garbage", "truncated", "bad-blob"])
def test_damaged_catalog_is_moved_aside_and_rebuilt(family, workdir, damage, caplog):
    path = workdir / "c.sqlite"
    cat = Catalog(path)
    first = _plan(family, workdir, cat)
    cat.close()  # damage strikes a catalog no process has open (an open one serves pages from its WAL)
    if damage == "garbage":
        path.write_bytes(b"this is not sqlite" * 100)
    elif damage == "truncated":
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    else:
        db = sqlite3.connect(path)
        db.execute("UPDATE files SET hashes = x'00ff'")
        db.execute("UPDATE deltas SET data = x'789c00'")
        db.commit()
        db.close()
    again = _plan(family, workdir, Catalog(path))
    assert again.to_json() == first.to_json()
    moved = list(workdir.glob("c.sqlite.corrupt-*"))
    if damage == "bad-blob":
        assert not moved  # sound database, damaged rows: re-computed in place
    else:
        assert moved and "moved it to" in caplog.text


def test_concurrent_index_processes_keep_the_catalog_sound(family, workdir):
    cat = workdir / "shared.sqlite"
    cmd = [sys.executable, "-m", "mergepipe", "index", str(family["expert1"]), str(family["expert2"]),
           "--base", str(family["base"]), "--catalog", str(cat), "--json"]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(2)]
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err.decode()
    db = sqlite3.connect(cat)
    assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    assert db.execute("SELECT COUNT(*) FROM files").fetchone()[0] == 6  # 3 models x 2 shards
    assert db.execute("SELECT COUNT(*) FROM deltas").fetchone()[0] == 2
    db.close()


def _poison(fam, which, value):
    shard = sorted(fam[which].glob("*.safetensors"))[1]
    tensors = load_file(str(shard))
    name = sorted(tensors)[0]
    tensors[name][3, 5] = value
    save_file(tensors, str(shard), metadata={"format": "pt"})
    return shard, name


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_nonfinite_weights_refused_unless_allowed(copy_family, workdir, value):
    fam = copy_family()
    shard, name = _poison(fam, "expert3", value)
    cat = Catalog(workdir / "c.sqlite")
    with pytest.raises(MergepipeError, match="NaN or Inf.*--allow-nonfinite") as e:
        _plan(fam, workdir, cat)
    assert "expert3" in str(e.value) and name in str(e.value)
    m = _plan(fam, workdir, cat, allow_nonfinite=True)
    m.save(workdir / "m.json")
    m = load_manifest(workdir / "m.json")  # the certificate stays JSON-clean
    assert m.plan.allow_nonfinite  # recorded: a replay, and verify's re-execution, need no flag
    done = execute(m, workdir / "out")
    got = load_all(workdir / "out")[name].float()
    assert not torch.isfinite(got[3, 5]) and torch.isfinite(got[0]).all()
    assert verify(done).ok
    strict = dataclasses.replace(m, plan=dataclasses.replace(m.plan, allow_nonfinite=False))
    with pytest.raises(MergepipeError, match=f"{shard.name}: block 0 of tensor '{name}' holds NaN or Inf"):
        execute(strict, workdir / "strict")
    assert not (workdir / "strict").exists() and not list(workdir.glob(".strict.*"))
    execute(strict, workdir / "strict", allow_nonfinite=True)


def test_nonfinite_flags_on_the_cli(copy_family, workdir):
    from typer.testing import CliRunner
    from mergepipe.cli import app
    fam = copy_family()
    _poison(fam, "expert1", float("nan"))
    cfg = write_config(workdir / "ta.yml", fam)
    run = lambda *a: CliRunner().invoke(app, [str(x) for x in a])  # noqa: E731
    r = run("plan", cfg, "-o", workdir / "m.json", "--catalog", workdir / "c")
    assert r.exit_code == 2 and r.output.startswith("error:") and "--allow-nonfinite" in r.output
    assert run("plan", cfg, "-o", workdir / "m.json", "--catalog", workdir / "c", "--allow-nonfinite").exit_code == 0
    assert run("execute", workdir / "m.json", "-o", workdir / "out").exit_code == 0  # the plan allowed it
    assert run("verify", workdir / "out" / "mergepipe.manifest.json").exit_code == 0  # re-executes without a flag


@pytest.mark.parametrize("shard", ["../outside.safetensors", "/etc/passwd", "sub/../../x.safetensors"])
def test_index_json_cannot_name_files_outside_the_model(copy_family, shard):
    fam = copy_family()
    index = fam["base"] / "model.safetensors.index.json"
    doc = json.loads(index.read_text())
    doc["weight_map"][next(iter(doc["weight_map"]))] = shard
    index.write_text(json.dumps(doc))
    with pytest.raises(MergepipeError, match="is not a file inside the model folder"):
        open_model(fam["base"])


def test_ties_density_one_manifest_round_trips(family, workdir):
    """Trim bin -1 (keep everything) used to be refused on load as a negative integer."""
    m = _plan(family, workdir, Catalog(workdir / "c.sqlite"), "ties", density=1.0)
    m.save(workdir / "m.json")
    assert load_manifest(workdir / "m.json").plan == m.plan
