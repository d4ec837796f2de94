import json

import pytest

from mergepipe.errors import MergepipeError
from mergepipe.manifest import load_manifest, runs_to_set, set_to_runs

from test_replay import MANIFESTS


def example() -> dict:
    return json.loads(sorted(MANIFESTS.glob("ta-20.json"))[0].read_text())


def test_round_trip_is_canonical(tmp_path):
    src = MANIFESTS / "ta-20.json"
    m = load_manifest(src)
    m.save(tmp_path / "again.json")
    assert (tmp_path / "again.json").read_text() == src.read_text()
    text = src.read_text()
    assert json.dumps(json.loads(text), sort_keys=True, separators=(",", ":"), ensure_ascii=False) + "\n" == text


def _mutate(doc, path, value):
    cur = doc
    for key in path[:-1]:
        cur = cur[key]
    if value is KeyError:
        del cur[path[-1]]
    else:
        cur[path[-1]] = value
    return doc


def _first_tensor(doc):
    return sorted(doc["plan"]["tensors"])[0]


@pytest.mark.parametrize("edit, expect", [
    (lambda d: _mutate(d, ["schema"], "mergepipe.manifest/99"), "schema"),
    (lambda d: _mutate(d, ["budget", "bytes"], -5), "budget.bytes"),
    (lambda d: _mutate(d, ["budget"], KeyError), "budget is missing"),
    (lambda d: _mutate(d, ["extra"], 1), "unknown field"),
    (lambda d: _mutate(d, ["plan", "tensors", _first_tensor(d), "selected", 0], [[0, 10**6]]), "outside"),
    (lambda d: _mutate(d, ["plan", "tensors", _first_tensor(d), "selected"], []), "one entry per expert"),
    (lambda d: _mutate(d, ["operator", "expert_params"], []), "expert_params"),
    (lambda d: _mutate(d, ["experts", 0, "files"], "x"), "must be a list"),
])
def test_edited_manifests_are_refused(tmp_path, edit, expect):
    p = tmp_path / "m.json"
    p.write_text(json.dumps(edit(example())))
    with pytest.raises(MergepipeError, match=expect):
        load_manifest(p)


def test_nan_refused(tmp_path):
    p = tmp_path / "m.json"
    p.write_text(MANIFESTS.joinpath("ta-20.json").read_text().replace('"wall_s":', '"wall_s":NaN,"x":', 1))
    with pytest.raises(MergepipeError):
        load_manifest(p)


def test_runs():
    assert set_to_runs([5, 1, 2, 3, 7]) == [[1, 4], [5, 6], [7, 8]]
    assert runs_to_set([[1, 4], [7, 8]]) == {1, 2, 3, 7}
