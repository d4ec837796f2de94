"""The command line: the happy path, and bad input that must give one line, exit 2, no traceback,
and nothing written."""

import json
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from mergepipe.cli import app

from conftest import write_config

runner = CliRunner()


def cli(*args):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


def assert_clean_error(result, *needles):
    assert result.exit_code == 2, result.output
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    text = " ".join(result.output.split())
    assert "Traceback" not in result.output
    assert text.startswith("error:"), result.output
    assert len(lines) <= 3  # one logical line (rich may wrap it on a narrow terminal)
    for n in needles:
        assert n in text, (n, text)


def test_plan_execute_verify_explain(family, workdir):
    cfg = write_config(workdir / "ta.yml", family)
    cat = workdir / "c.sqlite"
    r = cli("index", family["expert1"], family["expert2"], "--base", family["base"], "--catalog", cat, "--json")
    assert r.exit_code == 0 and json.loads(r.output)["models"] == 3
    assert cli("plan", cfg, "--budget", "20%", "-o", workdir / "m.json", "--catalog", cat).exit_code == 0
    r = cli("execute", workdir / "m.json", "-o", workdir / "out", "--json")
    assert r.exit_code == 0, r.output
    ex = json.loads(r.output)
    assert 0 < ex["expert_bytes_read"] <= json.loads((workdir / "m.json").read_text())["budget"]["bytes"]
    assert cli("verify", workdir / "out" / "mergepipe.manifest.json", "--output", workdir / "out").exit_code == 0
    r = cli("explain", workdir / "m.json", "--json")
    rows = json.loads(r.output)["tensors"]
    assert r.exit_code == 0 and any(sum(t["selected"]) for t in rows)
    assert cli("explain", workdir / "m.json").exit_code == 0


def test_verify_exit_code_on_mismatch(family, workdir):
    cfg = write_config(workdir / "ta.yml", family)
    cli("plan", cfg, "-o", workdir / "m.json", "--catalog", workdir / "c.sqlite")
    cli("execute", workdir / "m.json", "-o", workdir / "out")
    shard = sorted((workdir / "out").glob("*.safetensors"))[0]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    r = cli("verify", workdir / "out" / "mergepipe.manifest.json", "--output", workdir / "out")
    assert r.exit_code == 1 and "mismatch" in r.output


@pytest.mark.parametrize("budget", ["abc", "150%", "-1"])
def test_bad_budget(family, workdir, budget):
    cfg = write_config(workdir / "ta.yml", family)
    assert_clean_error(cli("plan", cfg, "--budget", budget, "-o", workdir / "m.json", "--catalog", workdir / "c"), "budget", budget)
    assert not (workdir / "m.json").exists()


def _break(copy_family, which, how):
    fam = copy_family()
    shard = sorted(fam[which].glob("*.safetensors"))[0]
    if how == "garbage":
        shard.write_bytes(b"definitely not safetensors" * 10)
    elif how == "truncate":
        shard.write_bytes(shard.read_bytes()[:-1000])
    else:
        tensors = load_file(str(shard))
        name = "model.layers.0.mlp.up_proj.weight"
        if how == "missing":
            del tensors[name]
        else:
            tensors[name] = torch.zeros(3, 3, dtype=torch.bfloat16)
        save_file(tensors, str(shard), metadata={"format": "pt"})
        index = fam[which] / "model.safetensors.index.json"
        idx = json.loads(index.read_text())
        if how == "missing":
            idx["weight_map"].pop(name)
        index.write_text(json.dumps(idx))
    return fam, shard


@pytest.mark.parametrize("how, needles", [
    ("garbage", ["not a safetensors file"]),
    ("truncate", ["truncated"]),
    ("missing", ["expert2", "model.layers.0.mlp.up_proj.weight", "missing"]),
    ("shape", ["expert2", "model.layers.0.mlp.up_proj.weight", "shape [3, 3]", "expected [176, 64]"]),
])
def test_broken_expert(copy_family, workdir, how, needles):
    fam, shard = _break(copy_family, "expert2", how)
    cfg = write_config(workdir / "ta.yml", fam)
    r = cli("plan", cfg, "-o", workdir / "m.json", "--catalog", workdir / "c")
    assert_clean_error(r, *needles)
    if how in ("garbage", "truncate"):
        assert shard.name in " ".join(r.output.split())
    assert not (workdir / "m.json").exists()


def test_missing_path(family, workdir):
    paths = dict(family, expert3=workdir / "no-such-model")
    cfg = write_config(workdir / "ta.yml", paths)
    assert_clean_error(cli("plan", cfg, "-o", workdir / "m.json", "--catalog", workdir / "c"), "no-such-model", "no such file")
    assert_clean_error(cli("plan", workdir / "absent.yml", "-o", workdir / "m.json"), "absent.yml")
    assert_clean_error(cli("execute", workdir / "absent.json", "-o", workdir / "o"), "absent.json")
    assert not (workdir / "o").exists()


def test_existing_output_without_force(family, workdir):
    cfg = write_config(workdir / "ta.yml", family)
    cli("plan", cfg, "-o", workdir / "m.json", "--catalog", workdir / "c")
    (workdir / "out").mkdir()
    assert_clean_error(cli("execute", workdir / "m.json", "-o", workdir / "out"), "exists", "--force")
    assert list((workdir / "out").iterdir()) == []


def test_pickle_refused_unless_allowed(family, workdir):
    pt = workdir / "pickled"
    pt.mkdir()
    shutil.copy(family["expert1"] / "config.json", pt)
    tensors = {}
    for f in sorted(family["expert1"].glob("*.safetensors")):
        tensors.update(load_file(str(f)))
    torch.save(tensors, pt / "pytorch_model.bin")
    cfg = write_config(workdir / "ta.yml", dict(family, expert1=pt))
    assert_clean_error(cli("plan", cfg, "-o", workdir / "m.json", "--catalog", workdir / "c"), "pickled", "--allow-pickle")
    assert cli("plan", cfg, "-o", workdir / "m.json", "--catalog", workdir / "c", "--allow-pickle").exit_code == 0
    r = cli("execute", workdir / "m.json", "-o", workdir / "out", "--allow-pickle")
    assert r.exit_code == 0, r.output


def test_bad_manifest(workdir):
    (workdir / "m.json").write_text(json.dumps({"schema": "mergepipe.manifest/1", "tool": {}}))
    assert_clean_error(cli("execute", workdir / "m.json", "-o", workdir / "o"), "m.json", "missing")
    (workdir / "m.json").write_text("{not json")
    assert_clean_error(cli("explain", workdir / "m.json"), "invalid JSON")


def test_real_process_exit_code_and_no_traceback(workdir):
    """The installed entry point, as a user runs it."""
    p = subprocess.run([sys.executable, "-m", "mergepipe", "plan", str(workdir / "nope.yml"), "-o", str(workdir / "m.json")],
                       capture_output=True, text=True)
    assert p.returncode == 2 and "Traceback" not in p.stderr and p.stderr.startswith("error:")
    assert len(p.stderr.strip().splitlines()) == 1
