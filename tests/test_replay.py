"""CI replay: every manifest in manifests/ re-executes to its recorded output hashes."""

import copy
import json
import sys
from pathlib import Path

import pytest

from mergepipe.execute import execute
from mergepipe.manifest import load_manifest
from mergepipe.verify import verify

MANIFESTS = Path(__file__).resolve().parent.parent / "manifests"
sys.path.insert(0, str(MANIFESTS))
from regenerate import CASES, IDENTITY, blas_bound, numeric_identity, plan_case, replay_family  # noqa: E402

RECORDED = sorted(p for p in MANIFESTS.glob("*.json") if p != IDENTITY)


def same_numerics(name: str) -> None:
    """A BLAS-bound manifest's bits are the recording CPU's: on another CPU model (or torch build)
    the comparison is meaningless, and the test says so instead of failing."""
    if blas_bound(name):
        recorded, here = json.loads(IDENTITY.read_text()), numeric_identity()
        if recorded != here:
            differ = sorted(k for k in recorded.keys() | here.keys() if recorded.get(k) != here.get(k))
            pytest.skip(f"{name} was recorded where BLAS takes other kernels ({', '.join(differ)} differ); "
                        f"rerun `python manifests/regenerate.py {' '.join(n for n in CASES if blas_bound(n))}` here")


@pytest.fixture(scope="module")
def replay_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("replay")
    replay_family(root)
    return root


def test_featcal_block_order_replans_to_the_recorded_root_hash(replay_root, tmp_path):
    """The FeatCal manifest planned again gives its recorded bytes; and a FeatCal record without
    `order` (manifests from before module order) means block order: the recorded manifest with its
    `order` taken out gives the same bytes."""
    same_numerics("ta-featcal")
    recorded = load_manifest(MANIFESTS / "ta-featcal.json")
    assert recorded.stages[0].record["params"]["order"] == "block"
    m = plan_case(replay_root, {p.name: p for p in (replay_root / "family").iterdir() if p.is_dir()}, "ta-featcal")
    assert m.stages[0].record["params"]["order"] == "block"
    done = execute(m, tmp_path / "out", root=replay_root)
    assert done.execution.root_hash == recorded.execution.root_hash
    assert done.execution.stage_bytes_read == {"featcal": m.stages[0].record["budget"]["bytes"]}
    old = copy.deepcopy(recorded)
    del old.stages[0].record["params"]["order"]
    assert execute(old, tmp_path / "old", root=replay_root).execution.root_hash == recorded.execution.root_hash


@pytest.mark.parametrize("path", RECORDED, ids=lambda p: p.stem)
def test_manifest_replays_bit_exact(path, replay_root, tmp_path):
    same_numerics(path.stem)
    m = load_manifest(path)
    assert m.execution is not None
    done = execute(m, tmp_path / "out", root=replay_root)
    assert done.execution.outputs == m.execution.outputs
    assert done.execution.root_hash == m.execution.root_hash
    assert done.execution.expert_bytes_read == m.execution.expert_bytes_read
    assert verify(m, output=tmp_path / "out", root=replay_root).ok


def test_there_are_manifests():
    assert {p.stem for p in RECORDED} == set(CASES)
    assert sum(not blas_bound(n) for n in CASES) >= 4  # replayed on every machine


@pytest.mark.parametrize("path", RECORDED, ids=lambda p: p.stem)
def test_committed_manifests_name_no_machine_paths(path):
    """bytes_read is keyed by the models and files as the manifest records them (relative to the
    family here), never by this machine's absolute paths."""
    m = load_manifest(path)
    refs = {m.base.ref, *(e.ref for e in m.experts)}
    assert set(m.execution.bytes_read) <= refs and all(r.startswith("./") for r in refs)
    recorded = {f.name for rec in [m.base, *m.experts] for f in rec.files}
    recorded |= {rec.sketch.path for rec in m.experts if rec.sketch}
    assert all(rec.sketch.path.startswith("./sketches/") for rec in m.experts if rec.sketch)
    assert all(name in recorded for files in m.execution.bytes_read.values() for name in files)
    assert "/tmp" not in path.read_text()
