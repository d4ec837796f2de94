"""FeatCal resumes per layer: a `mergepipe execute` process SIGKILLed between calibrated layers leaves
its finished layers journaled; the rerun takes the merge over whole, solves only the layers after
them, and publishes the same bytes (and the same per-tensor diagnostics) as an uninterrupted run."""

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

import mergepipe.featcal.calibrate as C
from mergepipe.config import load_config
from mergepipe.demo import demo_config
from mergepipe.execute import MANIFEST_NAME, execute, plan_key
from mergepipe.featcal.resume import SLOW_ENV, _lines
from mergepipe.featcal.stage import RESUME_DIR
from mergepipe.index import Catalog
from mergepipe.plan import plan_merge
from mergepipe.publish import staging_for
from mergepipe.synth import TINY, build_family

REPO = Path(__file__).resolve().parent.parent
LAYERS = 4


@pytest.fixture()
def four_layers(tmp_path, monkeypatch):
    """A 4-layer tiny family, its calibrated TA manifest, and one thread in this process (as in the
    child below): the resumed run mixes both processes' layers, so both must sum alike."""
    monkeypatch.setenv("MERGEPIPE_CACHE", str(tmp_path / "cache"))
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    fam = build_family(tmp_path / "family", dataclasses.replace(TINY, layers=LAYERS), experts=2, seed=3)
    g = torch.Generator().manual_seed(5)
    with open(tmp_path / "calib.jsonl", "w") as f:
        for _ in range(2 * 12):
            f.write(json.dumps({"input_ids": torch.randint(0, 512, (20,), generator=g).tolist()}) + "\n")
    cfg = demo_config(fam, "task_arithmetic")
    cfg["calibrate"] = {"data": str(tmp_path / "calib.jsonl"),
                        "parameters": {"samples": 12, "seq_len": 20, "batch_size": 4}}
    (tmp_path / "m.yml").write_text(yaml.safe_dump(cfg))
    m = plan_merge(load_config(tmp_path / "m.yml"), "100%", Catalog(tmp_path / "c.sqlite"))
    m.save(tmp_path / "m.json")
    yield tmp_path, m
    torch.set_num_threads(n)


def _kill_after_layers(manifest: Path, out: Path, journal: Path, layers: int) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]), **{SLOW_ENV: "2000"})
    p = subprocess.Popen([sys.executable, "-m", "mergepipe", "execute", str(manifest), "-o", str(out)],
                         env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while p.poll() is None and time.monotonic() < deadline and len(_lines(journal)) < 1 + layers:
        time.sleep(0.01)
    assert p.poll() is None, p.stderr.read().decode()[-2000:]
    p.send_signal(signal.SIGKILL)
    p.wait()


def test_sigkill_between_layers_resumes_after_the_last_finished_one(four_layers, monkeypatch):
    root, m = four_layers
    ref = execute(m, root / "ref")
    out = root / "out"
    journal = staging_for(out.resolve(), plan_key(m, "cpu")).folder / RESUME_DIR / "journal"
    _kill_after_layers(root / "m.json", out, journal, layers=2)
    assert not out.exists()  # nothing half-written is visible
    kept = len(_lines(journal)) - 1
    assert 2 <= kept < LAYERS  # it slept after layer 1's record: killed before the last layer

    solved = []
    real = C._layer

    def counting(run, layer, *args):
        solved.append(layer)
        return real(run, layer, *args)
    monkeypatch.setattr(C, "_layer", counting)
    done = execute(m, out)
    assert solved == list(range(kept, LAYERS))  # the finished layers were not redone
    assert done.execution.outputs == ref.execution.outputs and done.execution.root_hash == ref.execution.root_hash
    assert done.execution.diagnostics == ref.execution.diagnostics
    assert done.execution.resumed_bytes == sum(f.size for f in ref.execution.outputs.values())  # merge taken over
    assert done.execution.expert_bytes_read == done.execution.stage_bytes_read["featcal"]  # only later layers
    assert 0 < done.execution.stage_bytes_read["featcal"] < ref.execution.stage_bytes_read["featcal"]
    assert not journal.parent.exists() and not (out / RESUME_DIR).exists()
    assert json.loads((out / MANIFEST_NAME).read_text())["execution"]["root_hash"] == ref.execution.root_hash


def test_a_torn_journal_line_redoes_only_that_layer(four_layers, monkeypatch):
    """Layer records whose bytes no longer match are dropped from the first bad one on."""
    root, m = four_layers
    ref = execute(m, root / "ref")
    out = root / "out"
    journal = staging_for(out.resolve(), plan_key(m, "cpu")).folder / RESUME_DIR / "journal"
    _kill_after_layers(root / "m.json", out, journal, layers=2)
    data = journal.read_bytes()
    journal.write_bytes(data[:-5])  # the last line torn
    kept = len(_lines(journal)) - 1
    solved = []
    real = C._layer
    monkeypatch.setattr(C, "_layer", lambda run, layer, *a: solved.append(layer) or real(run, layer, *a))
    done = execute(m, out)
    assert solved[0] == kept and done.execution.root_hash == ref.execution.root_hash
