import json

import pytest
import torch

from mergepipe.checkpoint import open_model
from mergepipe.compare import compare
from mergepipe.config import load_config
from mergepipe.errors import InputChangedError, MergepipeError
from mergepipe.execute import MANIFEST_NAME, execute
from mergepipe.index import Catalog
from mergepipe.manifest import load_manifest
from mergepipe.plan import plan_merge
from mergepipe.verify import verify

from conftest import write_config
from helpers import load_all, reference_ta


def _plan(family, workdir, budget="100%", method="task_arithmetic", **params):
    cfg = load_config(write_config(workdir / f"{method}.yml", family, method, **params))
    return plan_merge(cfg, budget, Catalog(workdir / "c.sqlite"))


def test_ta_full_equals_reference_and_loads(family, workdir):
    m = _plan(family, workdir)
    done = execute(m, workdir / "out")
    got = load_all(workdir / "out")
    ref = reference_ta(family, [0.3] * 4)
    assert set(got) == set(ref)
    for name in ref:
        assert torch.equal(got[name], ref[name]), name
    assert (workdir / "out" / "config.json").exists() and (workdir / "out" / MANIFEST_NAME).exists()
    assert json.loads((workdir / "out" / "model.safetensors.index.json").read_text())["weight_map"]
    ex = done.execution
    assert ex.expert_bytes_read == m.plan.planned_expert_bytes
    base_tensor_bytes = sum(i.end - i.start for i in open_model(family["base"]).tensors.values())
    assert ex.base_bytes_read == base_tensor_bytes  # every base block once, no header re-reads
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(workdir / "out")
    assert model.config.hidden_size == 64


@pytest.mark.parametrize("pct", [50, 20, 10])
def test_partial_budget_reads_within_budget_and_bound_holds(family, workdir, pct):
    full = execute(_plan(family, workdir), workdir / "full")
    m = _plan(family, workdir, f"{pct}%")
    done = execute(m, workdir / "part")
    assert done.execution.expert_bytes_read <= m.budget.bytes
    assert done.execution.expert_bytes_read == m.plan.planned_expert_bytes
    dev = compare(workdir / "part", workdir / "full").frobenius
    assert 0 < dev <= m.plan.certificate.bound
    assert full.execution.root_hash != done.execution.root_hash


def test_replay_identical_and_verify(family, workdir, copy_family):
    fam = copy_family()
    m = _plan(fam, workdir, "30%")
    a = execute(m, workdir / "a")
    b = execute(load_manifest(workdir / "a" / MANIFEST_NAME), workdir / "b")
    assert a.execution.root_hash == b.execution.root_hash
    assert a.execution.outputs == b.execution.outputs
    saved = load_manifest(workdir / "a" / MANIFEST_NAME)
    assert verify(saved, output=workdir / "a").ok
    assert verify(saved).ok  # re-executes
    shard = sorted((workdir / "b").glob("*.safetensors"))[0]
    data = bytearray(shard.read_bytes())
    data[-3] ^= 0x40
    shard.write_bytes(bytes(data))
    r = verify(saved, output=workdir / "b")
    assert not r.ok and any(shard.name in p for p in r.problems)
    # a changed input: same size and header, one block's bytes differ
    f = sorted(fam["expert2"].glob("*.safetensors"))[1]
    data = bytearray(f.read_bytes())
    data[-5] ^= 0x01
    f.write_bytes(bytes(data))
    r = verify(saved)
    assert not r.ok and any(str(f) in p and ("changed" in p or "does not match" in p) for p in r.problems), r.problems


def test_execute_refuses_changed_input_and_writes_nothing(family, workdir, copy_family):
    fam = copy_family()
    m = _plan(fam, workdir)
    f = sorted(fam["expert1"].glob("*.safetensors"))[0]
    data = bytearray(f.read_bytes())
    data[-7] ^= 0x01
    f.write_bytes(bytes(data))
    with pytest.raises(InputChangedError, match="changed since planning"):
        execute(m, workdir / "out")
    assert not (workdir / "out").exists()
    assert not list(workdir.glob(".out.*"))  # no staging left behind


def test_existing_output_needs_force(family, workdir):
    m = _plan(family, workdir)
    (workdir / "out").mkdir()
    (workdir / "out" / "keep.txt").write_text("x")
    with pytest.raises(MergepipeError, match="--force"):
        execute(m, workdir / "out")
    assert (workdir / "out" / "keep.txt").exists()
    execute(m, workdir / "out", force=True)
    assert not (workdir / "out" / "keep.txt").exists() and (workdir / "out" / MANIFEST_NAME).exists()


def test_ties_threshold_bin_and_skips(family, workdir):
    """TIES at 100% against an independent dense implementation of the trim rule."""
    m = _plan(family, workdir, "100%", "ties", density=0.2)
    execute(m, workdir / "ties")
    got = load_all(workdir / "ties")
    base = load_all(family["base"])
    experts = [load_all(family[f"expert{k}"]) for k in range(1, 5)]
    for name, b in base.items():
        d = torch.stack([e[name].float() - b.float() for e in experts])
        flat = d.reshape(4, -1).abs()
        k = max(1, int(0.2 * flat.shape[1]))
        kth = flat.topk(k, dim=1).values[:, -1:]
        # exactly k per expert: of the entries equal to the k-th value, those whose positions' seeded
        # hash order is largest (the tie rule is the hash, so it is the one thing taken from mergepipe)
        from mergepipe.operators.positional import order_at, stream_key
        keep = flat > kth
        for j in range(4):
            tied = (flat[j] == kth[j]).nonzero().squeeze(1)
            order = order_at(stream_key(0, name, j, "tie"), tied)
            keep[j, tied[order.argsort(descending=True)[:k - int(keep[j].sum())]]] = True
        assert (keep.sum(1) == k).all()
        d = d * keep.reshape(d.shape)
        d *= 0.3
        sign = (d.sum(0) >= 0).float() * 2 - 1
        mask = d.sign() == sign
        div = (torch.full_like(d, 0.3) * mask).sum(0)
        div[div == 0] = 1
        ref = (b.float() + (d * mask).sum(0) / div).to(torch.bfloat16)
        assert torch.equal(got[name], ref), name


def test_ties_patched_in_the_file_equals_patched_in_memory(family, workdir, monkeypatch):
    """Tensors too large to hold take the page-cache file path, patched in place: same bytes."""
    import mergepipe.operators.ties_stream as T
    m = _plan(family, workdir, "100%", "ties", density=0.2)
    in_memory = execute(m, workdir / "memory")
    monkeypatch.setattr(T, "IN_MEMORY_BYTES", 0)
    in_file = execute(m, workdir / "file")
    assert in_file.execution.outputs == in_memory.execution.outputs


def test_hash_file_in_one_pass_equals_hashing_each_range(tmp_path, monkeypatch):
    """The one-pass file hash feeds each chunk to the tensors it overlaps: the same digests as hashing
    the file and every tensor's range on their own, with tensors across chunk edges, empty tensors
    and a file cut short."""
    import random

    import xxhash

    from mergepipe import sink
    from mergepipe.publish import layout
    monkeypatch.setattr(sink, "CHUNK", 1000)  # many chunk edges inside tensors
    rnd = random.Random(3)
    lay = layout("m.safetensors", [(f"t{i}", "BF16", (rnd.choice([0, 1, 7, 600, 1500]),)) for i in range(12)])
    path = tmp_path / "m.safetensors"
    body = bytes(rnd.getrandbits(8) for _ in range(lay.size - len(lay.header)))

    def naive(data: bytes) -> tuple[str, dict[str, str]]:
        return (xxhash.xxh3_128(data).hexdigest(),
                {t.name: xxhash.xxh3_64(data[t.offset:t.offset + t.nbytes]).hexdigest() for t in lay.tensors})

    for data in (lay.header + body, (lay.header + body)[:lay.size - 1234]):
        path.write_bytes(data)
        assert sink.hash_file(path, lay) == naive(data)
    assert sink.hash_file(path) == (xxhash.xxh3_128(path.read_bytes()).hexdigest(), {})
