"""--device cuda runs the same path as the CPU (skipped without a GPU)."""

import pytest
import torch

from mergepipe.config import load_config
from mergepipe.execute import execute
from mergepipe.index import Catalog
from mergepipe.plan import plan_merge

from conftest import write_config
from helpers import load_all

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")


def ulps_bf16(a: torch.Tensor, b: torch.Tensor) -> int:
    ia, ib = a.view(torch.int16).int(), b.view(torch.int16).int()
    ia = torch.where(ia < 0, -32768 - ia, ia)
    ib = torch.where(ib < 0, -32768 - ib, ib)
    return int((ia - ib).abs().max())


@pytest.mark.parametrize("method, params, budget", [("task_arithmetic", {}, "100%"), ("task_arithmetic", {}, "20%"),
                                                    ("ties", {"density": 0.2}, "100%")])
def test_cuda_matches_cpu(family, workdir, method, params, budget):
    cfg = load_config(write_config(workdir / "c.yml", family, method, **params))
    m = plan_merge(cfg, budget, Catalog(workdir / "c.sqlite"))
    cpu = execute(m, workdir / "cpu")
    gpu = execute(m, workdir / "gpu", device="cuda")
    assert gpu.execution.device.startswith("cuda")
    assert gpu.execution.expert_bytes_read == cpu.execution.expert_bytes_read
    a, b = load_all(workdir / "cpu"), load_all(workdir / "gpu")
    for name in a:
        assert ulps_bf16(a[name], b[name]) <= 1, name  # float32 reductions may associate differently
