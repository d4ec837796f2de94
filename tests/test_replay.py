"""CI replay: every manifest in manifests/ re-executes to its recorded output hashes."""

import sys
from pathlib import Path

import pytest

from mergepipe.execute import execute
from mergepipe.manifest import load_manifest
from mergepipe.verify import verify

MANIFESTS = Path(__file__).resolve().parent.parent / "manifests"
sys.path.insert(0, str(MANIFESTS))
from regenerate import replay_family  # noqa: E402


@pytest.fixture(scope="module")
def replay_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("replay")
    replay_family(root)
    return root


@pytest.mark.parametrize("path", sorted(MANIFESTS.glob("*.json")), ids=lambda p: p.stem)
def test_manifest_replays_bit_exact(path, replay_root, tmp_path):
    m = load_manifest(path)
    assert m.execution is not None
    done = execute(m, tmp_path / "out", root=replay_root)
    assert done.execution.outputs == m.execution.outputs
    assert done.execution.root_hash == m.execution.root_hash
    assert done.execution.expert_bytes_read == m.execution.expert_bytes_read
    assert verify(m, output=tmp_path / "out", root=replay_root).ok


def test_there_are_manifests():
    assert len(list(MANIFESTS.glob("*.json"))) >= 4
