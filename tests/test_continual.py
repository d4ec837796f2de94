"""Continual GCWM: one published, replayable step per arriving expert, in both schedules."""

import pytest
import torch
import yaml
from typer.testing import CliRunner

from mergepipe.cli import app
from mergepipe.config import load_config
from mergepipe.continual import continual
from mergepipe.demo import demo_config
from mergepipe.errors import MergepipeError
from mergepipe.execute import MANIFEST_NAME, execute
from mergepipe.index import Catalog
from mergepipe.manifest import load_manifest

from helpers import load_all

PARAMS = {"inner_steps": 5, "inner_lr": 1e-4}


def _config(family, workdir, experts=("expert1", "expert2", "expert3"), method="gcwm", **shared):
    paths = {k: v for k, v in family.items() if k == "base" or k in experts}
    path = workdir / "c.yml"
    path.write_text(yaml.safe_dump(demo_config(paths, method, **shared), sort_keys=False))
    return load_config(path)


def test_all_history_steps_are_prefix_merges_and_replay(family, workdir):
    cat = Catalog(workdir / "c.sqlite")
    steps = continual(_config(family, workdir, **PARAMS), workdir / "out", "all_history", catalog=cat)
    assert [s.step for s in steps] == [1, 2, 3] and all(s.anchor is None for s in steps)
    for s in steps:
        assert len(s.manifest.experts) == s.step  # step t merges the first t experts
        assert (s.output / MANIFEST_NAME).exists()
        again = execute(load_manifest(s.output / MANIFEST_NAME), workdir / f"replay-{s.step}")
        assert again.execution.root_hash == s.manifest.execution.root_hash
    assert len({s.manifest.execution.root_hash for s in steps}) == 3


def test_current_anchor_chains_float32_anchors(family, workdir):
    cat = Catalog(workdir / "c.sqlite")
    cfg = _config(family, workdir, **PARAMS)
    hist = continual(cfg, workdir / "hist", "all_history", catalog=cat)
    anch = continual(cfg, workdir / "anch", "current_anchor", catalog=cat)
    assert anch[0].manifest.execution.root_hash == hist[0].manifest.execution.root_hash  # gamma * Delta_1
    assert anch[0].anchor is None and all(s.anchor is not None for s in anch[1:])
    # step 2 merges the same two tasks in both schedules (anchor_1 = expert 1): equal up to rounding
    a, h = load_all(anch[1].output), load_all(hist[1].output)
    for name in h:
        assert torch.allclose(a[name].float(), h[name].float(), rtol=0, atol=1e-2), name
    # step 3's anchor merges step 2's float32 anchor with expert 3
    a3 = anch[2].anchor
    assert a3.experts[0].ref.endswith("anchors/step-02") and a3.out_dtype == "F32"
    assert a3.operator.params["lambda"] == 1.0
    assert anch[2].manifest.operator.name == "task_arithmetic"
    assert anch[2].manifest.operator.expert_params == [{"weight": cfg.params["lambda"]}]
    again = execute(load_manifest(workdir / "anch" / "anchors" / "step-03" / MANIFEST_NAME), workdir / "re")
    assert again.execution.root_hash == a3.execution.root_hash


def test_bad_input(family, workdir):
    with pytest.raises(MergepipeError, match="at least two experts"):
        continual(_config(family, workdir, experts=("expert1",)), workdir / "o", "current_anchor")
    with pytest.raises(MergepipeError, match="gcwm"):
        continual(_config(family, workdir, method="task_arithmetic"), workdir / "o", "all_history")
    with pytest.raises(MergepipeError, match="mode"):
        continual(_config(family, workdir), workdir / "o", "sometimes")
    r = CliRunner().invoke(app, ["continual", str(workdir / "c.yml"), "-o", str(workdir / "o"), "--mode", "nope"])
    assert r.exit_code == 2 and "Traceback" not in r.output and len(r.output.strip().splitlines()) == 1
