"""warm: what a whole-tensor merge allocates first is faulted in while torch loads. The buffers come
back zeroed and sized; each method takes every buffer operators.WHOLE_BUFFERS warms for it (so the
table never warms memory a merge does not use); and a merge on warmed buffers writes the same bytes."""

from __future__ import annotations

import pytest
import yaml

from mergepipe import warm
from mergepipe.config import load_config
from mergepipe.execute import execute
from mergepipe.index import Catalog
from mergepipe.operators import WHOLE_BUFFERS
from mergepipe.plan import plan_merge


def test_warmed_buffers_come_back_zeroed_and_sized():
    warm.start(3 * 4096 + 5, 2)
    a, b = warm.take(3 * 4096), warm.take(1)
    assert a.nbytes == b.nbytes == 3 * 4096 + 5 and not a.any() and not b.any()
    assert warm.take(1) is None
    a[:] = 1  # writable
    warm.clear()
    assert warm.take(1) is None


@pytest.mark.parametrize("method", sorted(WHOLE_BUFFERS))
def test_each_method_takes_every_buffer_warmed_for_it(method, family, tmp_path, monkeypatch):
    experts = 2 if method == "nuslerp" else 3
    params = {"density": 0.5} if method not in ("nuslerp", "model_stock") else {}
    if method.startswith("breadcrumbs"):
        params["gamma"] = 0.01
    if method.startswith("della"):
        params["epsilon"] = 0.1
    cfg = {"merge_method": method, "base_model": str(family["base"]), "dtype": "float32",
           "models": [{"model": str(family[f"expert{k + 1}"]),
                       "parameters": {**({} if method == "model_stock" else {"weight": 0.5}), **params}}
                      for k in range(experts)]}
    (tmp_path / "r.yml").write_text(yaml.safe_dump(cfg))
    m = plan_merge(load_config(tmp_path / "r.yml"), "100%", Catalog(tmp_path / "c.sqlite"))
    m.save(tmp_path / "plan.json")
    plain = execute(m, tmp_path / "plain")

    taken = []
    real = warm.take
    monkeypatch.setattr(warm, "take", lambda n: taken.append(real(n)) or taken[-1])
    warm.for_manifest(tmp_path / "plan.json")
    warm._THREAD.join()
    warmed = len(warm._READY)
    assert warmed == experts + WHOLE_BUFFERS[method]
    done = execute(m, tmp_path / "warm")
    assert sum(t is not None for t in taken) == warmed  # every one went to the merge
    assert done.execution.root_hash == plain.execution.root_hash
