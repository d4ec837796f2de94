import json
import struct

import pytest
import torch
from safetensors.torch import save_file

from mergepipe.blocks import BLOCK_ELEMS, block, blocks, n_blocks, rows_per_block
from mergepipe.checkpoint import Reader, open_model, read_header
from mergepipe.errors import MergepipeError

from bench.measure import evict, resident_pages


def test_folder_sharded_and_single_file(family, tmp_path):
    m = open_model(family["base"])
    assert len(m.files) == 2
    assert "lm_head.weight" in m.tensors and m.tensors["lm_head.weight"].dtype == "BF16"
    single = tmp_path / "one.safetensors"
    save_file({"w": torch.ones(3, 4)}, str(single))
    one = open_model(single)
    assert one.tensors["w"].shape == (3, 4) and one.root == tmp_path


def test_blocks_cover_tensor_exactly(family):
    m = open_model(family["base"])
    for info in m.tensors.values():
        bs = blocks(info)
        assert bs[0].start == info.start and bs[-1].end == info.end
        assert all(a.end == b.start for a, b in zip(bs, bs[1:]))
        assert all((blk.end - blk.start) // info.itemsize <= max(BLOCK_ELEMS, info.row_elems) for blk in bs)
    assert n_blocks((10,)) == 1 and rows_per_block((4096, 1024)) == 1024 and n_blocks((4097, 1024)) == 5


def test_reader_counts_bytes(family):
    m = open_model(family["base"])
    info = m.tensors["model.embed_tokens.weight"]
    r = Reader()
    raw = r.read(info.file, block(info, 0).start, block(info, 0).end)
    assert r.bytes_read == {str(info.file): len(raw)}
    assert torch.equal(torch.from_numpy(raw).view(torch.bfloat16).reshape(-1)[:5],
                       torch.from_numpy(raw[:10].copy()).view(torch.bfloat16))
    r.close()


def test_reader_maps_ranges_privately_and_refuses_files_that_change(tmp_path):
    import os
    import time
    from mergepipe.errors import InputChangedError
    p = tmp_path / "f.bin"
    data = bytes(range(256)) * 64  # 16 KiB: ranges start off a page boundary too
    p.write_bytes(data)
    r = Reader()
    raw = r.read(p, 5000, 9000)
    assert raw.tobytes() == data[5000:9000] and r.bytes_read == {str(p): 4000}
    raw[:] = 0  # a caller's writes stay in its copy
    assert p.read_bytes() == data and r.read(p, 5000, 9000).tobytes() == data[5000:9000]
    assert r.read(p, 100, 100).size == 0
    with pytest.raises(MergepipeError, match="truncated"):
        r.read(p, 16000, 17000)
    r.check_unchanged()
    # replaced by a new file (a rename): the open one is still what is read
    q = tmp_path / "g.bin"
    q.write_bytes(b"x" * len(data))
    os.replace(q, p)
    r.check_unchanged()
    r.close()
    # written in place while open: refused before anything is published
    r = Reader()
    r.read(p, 0, 10)
    time.sleep(0.01)
    with open(p, "r+b") as f:
        f.write(b"y")
    with pytest.raises(InputChangedError, match="written while the merge read it"):
        r.check_unchanged()
    # cut short after it was opened: the range is refused, not a crash
    os.truncate(p, 4096)
    with pytest.raises(MergepipeError, match="truncated|changed while being read"):
        r.read(p, 0, 8192)
    r.close()


def _write_raw(path, header: dict, data: bytes = b"") -> None:
    js = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(js)) + js + data)


@pytest.mark.parametrize("header, data, expect", [
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 4, "truncated"),
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}, b"\0" * 8, "expected 8"),
    ({"a": {"dtype": "X9", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8, "malformed"),
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
      "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, b"\0" * 12, "overlap"),
    ([1, 2], b"", "not a JSON object"),
])
def test_bad_headers_are_refused(tmp_path, header, data, expect):
    p = tmp_path / "bad.safetensors"
    _write_raw(p, header, data)
    with pytest.raises(MergepipeError, match=expect):
        read_header(p)


def _safetensors_accepts(path) -> bool:
    """The reference: safetensors' own (Rust) validation, as safe_open runs it."""
    from safetensors import safe_open
    try:
        with safe_open(str(path), "np"):
            return True
    except Exception:  # noqa: BLE001 - SafetensorError, or an OSError for a bad length
        return False


def _f32(start: int, end: int, n: int = 2) -> dict:
    return {"dtype": "F32", "shape": [n], "data_offsets": [start, end]}


def _write_js(path, js: bytes, data: bytes = b"") -> None:
    path.write_bytes(struct.pack("<Q", len(js)) + js + data)


# (header, data bytes, error): safetensors requires the tensors, sorted by offsets, to tile the data
# exactly: the first at offset 0, each where the previous ends, the last at the end of the file
@pytest.mark.parametrize("header, data, expect", [
    ({"a": _f32(0, 8), "b": _f32(12, 20)}, 20, r"gap before tensor 'b': its data starts at byte \d+, expected \d+ where 'a' ends"),
    ({"a": _f32(4, 12)}, 12, r"gap before tensor 'a': its data starts at byte \d+, expected \d+ where the data begins"),
    ({"b": _f32(8, 16), "a": _f32(0, 8), "z": _f32(20, 20, 0)}, 20, "gap before tensor 'z'"),
    ({"a": _f32(0, 8)}, 9, r"1 trailing bytes: expected the file to end at byte \d+ where the tensor data ends, it has \d+"),
    ({"a": _f32(0, 8), "b": _f32(8, 16)}, 4096, "4080 trailing bytes"),
    ({}, 3, "3 trailing bytes"),
], ids=["gap-between", "gap-first", "gap-before-empty", "trailing-1", "trailing-page", "no-tensors-trailing"])
def test_gaps_and_trailing_bytes_refused_as_safetensors_does(tmp_path, header, data, expect):
    p = tmp_path / "gappy.safetensors"
    _write_raw(p, header, b"\0" * data)
    assert not _safetensors_accepts(p)
    with pytest.raises(MergepipeError, match=expect) as e:
        read_header(p)
    assert str(e.value).startswith(f"{p}: ") and "\n" not in str(e.value)


@pytest.mark.parametrize("js, data", [
    (json.dumps({"a": _f32(0, 8), "b": _f32(8, 16)}).encode() + b" " * 5, 16),  # header padded with spaces
    (json.dumps({"a": _f32(0, 8)}).encode() + b" \t\r\n", 8),  # any JSON whitespace
    (json.dumps({"b": _f32(8, 16), "a": _f32(0, 8)}).encode(), 16),  # names out of offset order
    (json.dumps({"e": _f32(0, 0, 0), "a": _f32(0, 8), "m": _f32(8, 8, 0), "z": _f32(8, 8, 0)}).encode(), 8),
    (json.dumps({"__metadata__": None, "a": _f32(0, 8)}).encode(), 8),
    (b"{}", 0),
], ids=["space-padded", "whitespace", "unordered", "empty-tensors", "null-metadata", "no-tensors"])
def test_what_safetensors_accepts_is_accepted(tmp_path, js, data):
    p = tmp_path / "ok.safetensors"
    _write_js(p, js, b"\0" * data)
    assert _safetensors_accepts(p)
    fh = read_header(p)
    assert fh.data_start == 8 + len(js) and sum(t.end - t.start for t in fh.tensors.values()) == data


@pytest.mark.parametrize("js, expect", [
    (b'{"__metadata__": "", "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}', "__metadata__"),
    (b'{"__metadata__": [], "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}', "__metadata__"),
    (b'{"a": {"dtype": "F32", "shape": [2], "data_offsets": [-0, 8]}}', "not UTF-8 JSON"),
    (b'{"\\ud800": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}', "not UTF-8 JSON"),
    (b'{"__metadata__": {"k": "\\udc00"}, "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}',
     "not UTF-8 JSON"),
], ids=["metadata-string", "metadata-list", "minus-zero", "lone-surrogate-name", "lone-surrogate-metadata"])
def test_json_that_safetensors_refuses_is_refused(tmp_path, js, expect):
    """Python's json is laxer than serde_json: a falsy __metadata__, -0 and lone surrogates."""
    p = tmp_path / "lax.safetensors"
    _write_js(p, js, b"\0" * 8)
    assert not _safetensors_accepts(p)
    with pytest.raises(MergepipeError, match=expect):
        read_header(p)


def test_header_length_limit_is_safetensors(tmp_path):
    """safetensors refuses a header over 100,000,000 bytes (not 100 MiB)."""
    p = tmp_path / "big.safetensors"
    n = 100_000_001
    with open(p, "wb") as f:
        f.write(struct.pack("<Q", n) + b"{}")
        f.truncate(8 + n)  # sparse
    assert not _safetensors_accepts(p)
    with pytest.raises(MergepipeError, match="header length 100000001 exceeds"):
        read_header(p)


def test_family_files_pass_both_validations(family):
    for m in family.values():
        for f in sorted(m.glob("*.safetensors")):
            assert _safetensors_accepts(f)
            read_header(f)


def test_not_safetensors(tmp_path):
    p = tmp_path / "x.safetensors"
    p.write_bytes(b"hello world, not a tensor file")
    with pytest.raises(MergepipeError, match="not a safetensors file"):
        read_header(p)


def test_missing_path_and_pickle_refused(tmp_path):
    with pytest.raises(MergepipeError, match="no such file"):
        open_model(tmp_path / "nope")
    torch.save({"w": torch.ones(2, 2)}, tmp_path / "pytorch_model.bin")
    with pytest.raises(MergepipeError, match="pickled checkpoint refused"):
        open_model(tmp_path)


def test_pickle_allowed_loads_weights_only(tmp_path, monkeypatch):
    monkeypatch.setenv("MERGEPIPE_CACHE", str(tmp_path / "cache"))
    torch.save({"w": torch.arange(4.0).reshape(2, 2)}, tmp_path / "pytorch_model.bin")
    m = open_model(tmp_path, allow_pickle=True)
    assert m.tensors["w"].shape == (2, 2) and m.tensors["w"].file.suffix == ".safetensors"


def test_hub_id_resolves_from_offline_cache(tmp_path, monkeypatch, family):
    """A hub id resolves through huggingface_hub's cache layout with the network forbidden."""
    hub = tmp_path / "hub"
    snap = hub / "models--org--tiny" / "snapshots" / ("a" * 40)
    snap.mkdir(parents=True)
    for f in family["base"].iterdir():
        (snap / f.name).write_bytes(f.read_bytes())
    (hub / "models--org--tiny" / "refs").mkdir()
    (hub / "models--org--tiny" / "refs" / "main").write_text("a" * 40)
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import importlib
    import huggingface_hub.constants as c
    importlib.reload(c)
    try:
        m = open_model("org/tiny")
        assert len(m.files) == 2 and set(m.tensors) == set(open_model(family["base"]).tensors)
        with pytest.raises(MergepipeError, match="hub snapshot could not be resolved"):
            open_model("org/absent")
    finally:
        monkeypatch.undo()
        importlib.reload(c)


def test_a_header_read_reads_no_further_and_leaves_no_read_ahead_behind(tmp_path):
    """The page cache after reading a header and one planned range holds those pages only: a
    buffered header read would read ahead into the data and leave a read-ahead mark there, which a
    planned read then sets off (the extra cold reads of sidecars once seen at 20% budgets)."""
    import mmap
    path = tmp_path / "big.safetensors"
    save_file({"w": torch.arange(2 ** 21, dtype=torch.float32)}, str(path))  # 8 MiB, a one-page header
    if not evict([path]):
        pytest.skip("this file system keeps the file's pages cached after POSIX_FADV_DONTNEED")
    header = read_header(path)
    page = mmap.PAGESIZE
    head_pages = set(range((header.data_start + page - 1) // page))
    assert resident_pages(path) <= head_pages
    start, end = 4 * page, 2 ** 20  # a planned range soon after the header
    Reader().read(path, start, end)
    assert resident_pages(path) <= head_pages | set(range(start // page, (end + page - 1) // page))
