"""Hostile inputs, generated: malformed safetensors headers and hand-edited manifests must give a
MergepipeError (the CLI: exit 2 and one line), never a crash, hang or read outside a tensor."""

import copy
import json
import struct
import sys
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st
from safetensors import safe_open
from typer.testing import CliRunner

from mergepipe import blocks as B
from mergepipe.checkpoint import DTYPES, read_header
from mergepipe.cli import app
from mergepipe.errors import MergepipeError
from mergepipe.execute import execute
from mergepipe.sources import open_recorded
from mergepipe.worker import build_jobs
from mergepipe.explain import explain_rows
from mergepipe.manifest import load_manifest

MANIFESTS = Path(__file__).resolve().parent.parent / "manifests"
sys.path.insert(0, str(MANIFESTS))
from regenerate import replay_family  # noqa: E402

def fuzz(n: int) -> settings:
    """Deterministic (derandomized, no example database), no deadline: the suite stays reproducible."""
    return settings(max_examples=n, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.filter_too_much, HealthCheck.function_scoped_fixture])
SCRATCH = Path(tempfile.mkdtemp(prefix="mergepipe-fuzz-"))

ints = st.one_of(st.integers(-3, 70), st.sampled_from([2**31, 2**32, 2**62, 2**63, 2**64, -(2**63), 10**30]),
                 st.booleans(), st.floats(allow_nan=True), st.text(max_size=3), st.none())
dims = st.one_of(st.integers(0, 9), st.sampled_from([2**31, 2**32 + 1, 2**62, 2**63 - 1, 10**20]), ints)
dtypes = st.one_of(st.sampled_from(sorted(DTYPES)), st.sampled_from(["F4", "f32", "", "BF16 ", "Q4_K"]), ints)
entries = st.one_of(
    st.fixed_dictionaries({"dtype": dtypes, "shape": st.one_of(st.lists(dims, max_size=4), ints),
                           "data_offsets": st.one_of(st.lists(ints, min_size=0, max_size=3),
                                                     st.tuples(st.integers(0, 80), st.integers(0, 80)).map(list))}),
    st.fixed_dictionaries({"dtype": st.sampled_from(["F32", "BF16", "U8"]), "shape": st.lists(st.integers(0, 6), max_size=3),
                           "data_offsets": st.tuples(st.integers(0, 64), st.integers(0, 64)).map(sorted).map(list)},
                          optional={"extra": ints}),
    ints, st.lists(ints, max_size=2))
headers = st.dictionaries(st.one_of(st.sampled_from(["a", "b", "__metadata__", ""]), st.text(max_size=4)), entries, max_size=4)


def _check_accepted(p: Path) -> None:
    """A header that passes must describe tensors of the declared size that tile the data exactly
    (sorted by offsets, each starts where the previous ends, from the header's end to the file's), and
    safetensors' own validation must accept the file too."""
    fh = read_header(p)
    spans = []
    for info in fh.tensors.values():
        assert fh.data_start <= info.start <= info.end <= fh.size
        assert info.end - info.start == info.numel * info.itemsize
        for blk in B.blocks(info):
            assert info.start <= blk.start <= blk.end <= info.end
        spans.append((info.start, info.end))
    spans.sort()
    ends = [fh.data_start] + [b for _, b in spans]
    assert [a for a, _ in spans] == ends[:-1] and ends[-1] == fh.size
    with safe_open(str(p), "np"):  # raises if safetensors refuses what mergepipe accepted
        pass


def _try(p: Path) -> None:
    try:
        _check_accepted(p)
    except MergepipeError as e:
        assert "\n" not in str(e) and str(p) in str(e)


def _file(header_bytes: bytes, data: bytes, length: int | None = None) -> Path:
    p = SCRATCH / "h.safetensors"
    p.write_bytes(struct.pack("<Q", len(header_bytes) if length is None else length) + header_bytes + data)
    return p


@fuzz(1500)
@given(header=headers, data=st.binary(max_size=96), dup=st.booleans())
def test_structured_headers(header, data, dup):
    js = json.dumps(header, allow_nan=True)
    if dup and header:  # repeat the first key: json would silently keep the last one
        first = json.dumps({next(iter(header)): "x"})[1:-1]
        js = "{" + first + "," + js[1:] if len(js) > 2 else js
    _try(_file(js.encode(), data))


VALID = json.dumps({"__metadata__": {"format": "pt"}, "a": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]},
                    "b": {"dtype": "BF16", "shape": [4], "data_offsets": [16, 24]}}).encode()


@fuzz(600)
@given(edits=st.lists(st.tuples(st.integers(0, len(VALID) - 1), st.integers(0, 255)), max_size=4),
       cut=st.integers(0, len(VALID)), length=st.one_of(st.none(), st.integers(0, 2**64 - 1)),
       data=st.one_of(st.sampled_from([24, 24, 23, 25, 32]), st.integers(0, 40)).map(bytes))
def test_byte_mutated_headers(edits, cut, length, data):
    """VALID's tensors need 24 bytes of data: mostly that many, so that edits reach the checks past
    the JSON (offsets, sizes, gaps, trailing bytes); the bytes' values do not matter to the header."""
    raw = bytearray(VALID[:cut] if cut < 8 else VALID)
    for i, v in edits:
        if i < len(raw):
            raw[i] = v  # may make it non-UTF-8, non-JSON, or change a number
    _try(_file(bytes(raw), data, length))


def test_pathological_headers():
    for js in [b"[" * 200_000 + b"]" * 200_000, b'{"a": ' + b"9" * 5000 + b"}", b"\xff\xfe{}", b'{"a":{"dtype":"F32",'
               b'"shape":[4294967296,4294967296,4294967296],"data_offsets":[0,16]}}']:
        _try(_file(js, b"\0" * 16))
    _try(_file(b"{}", b"", length=2**63))


# --- manifests -------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def replay_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz-replay")
    replay_family(root)
    return root


def _paths(doc, prefix=()):
    yield prefix
    if isinstance(doc, dict):
        for k, v in doc.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            yield from _paths(v, prefix + (i,))


DOCS = {name: json.loads((MANIFESTS / f"{name}.json").read_text()) for name in ("ta-20", "ties-50")}
PATHS = {name: [p for p in _paths(doc) if p] for name, doc in DOCS.items()}
values = st.one_of(st.none(), st.booleans(), st.integers(-2, 3), st.sampled_from([2**40, 2**63, -(2**31), 10**30]),
                   st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=6),
                   st.sampled_from(["../../etc/passwd", "/etc/passwd", "ffff", "0" * 16, "zz" * 8, "F32", "ties"]),
                   st.lists(st.integers(-1, 5), max_size=3), st.just({}), st.just([[0, 1]]), st.just([[0, 2**40]]))


# The manifest fields execute reads; the rest (schema, tool, budget, execution) it only checks or rewrites.
EXECUTED = ("plan", "operator", "base", "experts", "out_dtype")


def _mutate(data, name: str, fields: tuple[str, ...] | None = None) -> tuple[dict, tuple]:
    """Up to three edits (set, delete, duplicate) at paths of the manifest, all under `fields` if given."""
    doc = copy.deepcopy(DOCS[name])
    pool = PATHS[name] if fields is None else [p for p in PATHS[name] if p[0] in fields]
    n = data.draw(st.integers(1, 3))
    first = None
    for _ in range(n):
        path = data.draw(st.sampled_from(pool))
        first = first or path
        cur = doc
        try:
            for k in path[:-1]:
                cur = cur[k]
            action = data.draw(st.sampled_from(["set", "set", "delete", "dup"]))
            if action == "set":
                cur[path[-1]] = data.draw(values)
            elif action == "delete":
                del cur[path[-1]]
            elif isinstance(cur, list):
                cur.append(copy.deepcopy(cur[path[-1]]))
            else:
                cur[str(path[-1]) + "_"] = copy.deepcopy(cur[path[-1]])
        except (KeyError, IndexError, TypeError):
            pass  # an earlier edit removed this path
    return doc, first


def _write(doc, tmp: Path) -> Path:
    p = tmp / "m.json"
    p.write_text(json.dumps(doc))
    return p


@fuzz(500)
@given(data=st.data(), name=st.sampled_from(sorted(DOCS)))
def test_mutated_manifests_load_or_refuse(replay_root, data, name):
    doc, _ = _mutate(data, name)
    p = _write(doc, SCRATCH)
    try:
        m = load_manifest(p)
        explain_rows(m)
        opened = open_recorded([m.base, *m.experts], replay_root, False)  # execute's pre-flight, without merging
        build_jobs(m, opened)
    except MergepipeError as e:
        assert "\n" not in str(e)


@fuzz(40)
@given(data=st.data())
def test_mutated_plans_execute_or_refuse(replay_root, tmp_path_factory, data):
    """Edits to what execute uses, run to the end: a clean refusal or a published output."""
    doc, _ = _mutate(data, "ta-20", EXECUTED)
    tmp = tmp_path_factory.mktemp("exec")
    try:
        execute(load_manifest(_write(doc, tmp)), tmp / "out", root=replay_root)
        assert (tmp / "out" / "mergepipe.manifest.json").exists()
    except MergepipeError as e:
        assert "\n" not in str(e) and not (tmp / "out").exists()


@fuzz(60)
@given(data=st.data())
def test_mutated_manifests_through_the_cli(data):
    doc, _ = _mutate(data, "ties-50")
    p = _write(doc, SCRATCH)
    r = CliRunner().invoke(app, ["explain", str(p), "--json"])
    assert r.exit_code in (0, 2), r.output
    assert "Traceback" not in r.output
    if r.exit_code == 2:
        assert r.output.startswith("error:") and len(r.output.strip().splitlines()) <= 3  # rich may wrap one line
