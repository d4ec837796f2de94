import json
import struct

import pytest
import torch
from safetensors.torch import save_file

from mergepipe.blocks import BLOCK_ELEMS, block, blocks, n_blocks, rows_per_block
from mergepipe.checkpoint import Reader, open_model, read_header
from mergepipe.errors import MergepipeError


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
