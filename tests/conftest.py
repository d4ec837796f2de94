"""Small seeded checkpoint families built once per test session in a temporary folder."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
import yaml

from mergepipe.demo import demo_config
from mergepipe.synth import TINY, build_family


@pytest.fixture(scope="session")
def family(tmp_path_factory) -> dict[str, Path]:
    """Base + 4 bf16 experts, Qwen2 tensor names, 2 shards each."""
    return build_family(tmp_path_factory.mktemp("family"), TINY, experts=4, seed=0, shards=2)


@pytest.fixture(scope="session")
def recipe_families(tmp_path_factory) -> Path:
    """The tiny Llama, Mistral, Qwen2 and Gemma2 families the recipe corpus merges (tests/corpus.py)."""
    import corpus
    return corpus.build(tmp_path_factory.mktemp("recipe-families"))


@pytest.fixture()
def workdir(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("MERGEPIPE_CACHE", str(tmp_path / "cache"))
    return tmp_path


def write_config(path: Path, paths: dict[str, Path], method: str = "task_arithmetic", **per_model) -> Path:
    cfg = demo_config(paths, method)
    for m in cfg["models"]:
        m["parameters"].update(per_model)
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


@pytest.fixture()
def copy_family(family, tmp_path):
    """A private copy of the family, for tests that corrupt or change inputs."""
    def make() -> dict[str, Path]:
        dst = tmp_path / "family-copy"
        if not dst.exists():
            shutil.copytree(family["base"].parent, dst)
        return {k: dst / v.name for k, v in family.items()}
    return make


@pytest.fixture(scope="module")
def one_thread():
    """For modules of tiny tensor ops: OpenMP threads cost more than they give there, and far more on
    a shared busy machine (measured 15 ms against 3 us per op)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
