"""Delta sketches: the codecs, the sidecar the index writes, and budgeted merges that fill unread
blocks from it (within budget, certified, exact at 100%, closer to the full merge than zero fill)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import write_config
from mergepipe import blocks as B
from pathlib import Path

from mergepipe.checkpoint import open_model, read_header
from mergepipe.compare import compare
from mergepipe.config import load_config
from mergepipe.errors import InputChangedError, MergepipeError
from mergepipe.execute import execute
from mergepipe.index import Catalog, index_family
from mergepipe.manifest import load_manifest
from mergepipe.plan import plan_merge
from mergepipe.sketch import SketchSpec
from mergepipe.sources import resolve_ref


@pytest.mark.parametrize("spec", [SketchSpec.make("sign"), SketchSpec.make("sign", rows=1), SketchSpec.make("q2"),
                                  SketchSpec.make("q2", group=256), SketchSpec.make("q2n")])
@pytest.mark.parametrize("shape", [(37, 40), (1, 7), (64, 64)])
def test_codec_round_trip_size_and_error(spec, shape):
    d = (np.random.default_rng(sum(shape)).standard_normal(shape) * 1e-3).astype(np.float32)
    raw, approx = spec.encode(torch.from_numpy(d))
    approx = approx.numpy()
    assert len(raw) == spec.nbytes(*shape)
    assert np.array_equal(spec.decode(raw, *shape), approx)  # the executor's numpy decode: the same bits
    err = np.linalg.norm(d - approx) / np.linalg.norm(d)
    assert err < {"sign": 0.75, "q2": 0.65, "q2n": 0.45}[spec.kind]  # Gaussian: sign 0.60, q2 0.46, q2n 0.34


@pytest.mark.parametrize("spec", [SketchSpec.make("sign", rows=3), SketchSpec.make("q2", group=5),
                                  SketchSpec.make("q2n", group=3), SketchSpec.make("q2")])
def test_a_range_decodes_to_the_same_values_as_the_block(spec):
    """Execution decodes a block range by range; every range must be the block's values, bit for bit,
    wherever it starts and ends (groups and bytes straddled)."""
    shape = (11, 13)
    d = (np.random.default_rng(3).standard_normal(shape) * 1e-3).astype(np.float32)
    raw, _ = spec.encode(torch.from_numpy(d))
    whole = spec.decode(raw, *shape).reshape(-1)
    rng = np.random.default_rng(4)
    for lo, hi in [(0, 143), (0, 1), (142, 143), (64, 128), *(sorted(rng.integers(0, 144, 2)) for _ in range(40))]:
        got = spec.decode_range(raw, *shape, int(lo), int(hi))
        assert got.dtype == np.float32 and np.array_equal(got.view(np.uint32), whole[lo:hi].view(np.uint32)), (lo, hi)


@pytest.mark.parametrize("spec", [SketchSpec.make("sign", rows=3), SketchSpec.make("q2", group=6),
                                  SketchSpec.make("q2n", group=4), SketchSpec.make("q2"), SketchSpec.make("q2n")])
def test_adding_a_range_in_either_layout_adds_the_decoded_values(spec):
    """add_range (what a merge calls) adds decode_range's values bit for bit, in natural order or in
    floats' paired layout (even offsets, then odd), whether the range starts on a group or not."""
    shape = (13, 150)
    d = (np.random.default_rng(5).standard_normal(shape) * 1e-3).astype(np.float32)
    raw, _ = spec.encode(torch.from_numpy(d))
    n = shape[0] * shape[1]
    rng = np.random.default_rng(6)
    ranges = [(0, n), (64, n), (128, 1280), (0, 2), *((a, a + 2 * int(rng.integers(1, 400))) for a in rng.integers(0, 1500, 30))]
    for lo, hi in ranges:
        lo, hi = int(lo), int(min(hi, n - (n - lo) % 2))
        start = rng.standard_normal(hi - lo).astype(np.float32)
        values = spec.decode_range(raw, *shape, lo, hi)
        for pairs in (False, True):
            out = np.concatenate([start[0::2], start[1::2]]) if pairs else start.copy()
            spec.add_range(raw, *shape, lo, hi, out, pairs)
            want = start + values
            want = np.concatenate([want[0::2], want[1::2]]) if pairs else want
            assert np.array_equal(out.view(np.uint32), want.view(np.uint32)), (lo, hi, pairs)


def test_sign_scale_is_the_mean_magnitude():
    d = np.array([[1.0, -3.0], [2.0, -2.0]], np.float32)
    _, approx = SketchSpec.make("sign", rows=2).encode(torch.from_numpy(d))
    assert np.allclose(approx.numpy(), [[2, -2], [2, -2]])


def test_specs_refuse_what_they_do_not_take():
    with pytest.raises(MergepipeError, match="not known"):
        SketchSpec.make("rank4")
    with pytest.raises(MergepipeError, match="no parameter 'group'"):
        SketchSpec.make("sign", group=8)
    with pytest.raises(MergepipeError, match=">= 1"):
        SketchSpec.make("q2", group=0)


def test_index_writes_a_sidecar_whose_residuals_are_exact(family, workdir):
    base, expert = open_model(family["base"]), open_model(family["expert1"])
    spec = SketchSpec.make("sign")
    fam = index_family(base, [expert], Catalog(workdir / "c.sqlite"), sketch=spec)
    sk = fam.sketches[0]
    expert_bytes = sum(fh.size for fh in expert.files)
    assert sk.size < 0.1 * expert_bytes and sk.path.is_file()
    from safetensors.numpy import load_file
    from helpers import load_all
    stored, b, e = load_file(str(sk.path)), load_all(family["base"]), load_all(family["expert1"])
    name = "model.layers.0.mlp.down_proj.weight"
    t = sk.tensors[name]
    blk = B.block(base.tensors[name], 0)
    delta = (e[name].float() - b[name].float()).numpy()[blk.row_start:blk.row_end]
    approx = spec.decode(stored[name][:int(t.sizes[0])], *delta.shape)
    assert np.isclose(np.linalg.norm(delta - approx), t.residual[0], rtol=1e-6)
    assert t.residual[0] < fam.deltas[0][name].l2[0]
    again = index_family(base, [expert], Catalog(workdir / "c.sqlite"), sketch=spec)  # reused, not rebuilt
    assert again.sketches[0].hash == sk.hash


def _plan(family, workdir, budget, method="task_arithmetic", **opts):
    cfg = load_config(write_config(workdir / f"{method}.yml", family, method, **({"density": 0.3} if method == "ties" else {})))
    return plan_merge(cfg, budget, Catalog(workdir / "c.sqlite"), **opts)


def test_sketch_fill_stays_in_budget_is_certified_and_beats_zero_fill(family, workdir):
    full = execute(_plan(family, workdir, "100%"), workdir / "full")
    for pct in (10, 20, 50):
        devs = {}
        for fill in ("zero", "sketch"):
            m = _plan(family, workdir, f"{pct}%", fill=fill)
            assert m.plan.planned_expert_bytes <= m.budget.bytes
            sketched = sum(len(r) for tp in m.plan.tensors.values() for r in (tp.sketched or ()))
            assert (fill == "sketch") == (sketched > 0) == (m.plan.fill == "sketch")
            out = workdir / f"{fill}-{pct}"
            done = execute(m, out)
            assert done.execution.expert_bytes_read == m.plan.planned_expert_bytes
            devs[fill] = compare(out, workdir / "full").frobenius
            assert devs[fill] <= m.plan.certificate.bound * (1 + 1e-4) + 1e-3  # bf16 output rounding
        assert devs["sketch"] < devs["zero"], (pct, devs)
    sketch_100 = execute(_plan(family, workdir, "100%", fill="sketch"), workdir / "s100")
    assert sketch_100.execution.root_hash == full.execution.root_hash


def test_sketch_fill_reads_sidecar_bytes_and_names_them(family, workdir):
    m = _plan(family, workdir, "20%")
    done = execute(m, workdir / "out")
    sidecars = {rec.sketch.path for rec in m.experts if rec.sketch}
    assert sidecars
    counted = {name for files in done.execution.bytes_read.values() for name in files}
    assert sidecars <= counted  # the sketch bytes are read, counted, and charged to the budget
    m.save(workdir / "m.json")
    assert [e.sketch for e in load_manifest(workdir / "m.json").experts] == [e.sketch for e in m.experts]


def test_a_changed_sidecar_stops_the_run(family, workdir):
    m = _plan(family, workdir, "20%")
    rec = next(rec.sketch for rec in m.experts if rec.sketch)
    path = resolve_ref(rec.path, None)
    start = read_header(Path(path)).data_start
    data = np.fromfile(path, np.uint8)
    data[start:] ^= 0xFF  # every sketch byte changed, the size and layout kept
    data.tofile(path)
    with pytest.raises(InputChangedError, match="sketch of block .* does not match its recorded hash"):
        execute(m, workdir / "out")
    assert not (workdir / "out").exists()


def test_ties_with_sketch_fill(family, workdir):
    m = _plan(family, workdir, "20%", method="ties")
    assert m.plan.fill == "sketch" and m.plan.planned_expert_bytes <= m.budget.bytes
    done = execute(m, workdir / "out")
    assert done.execution.expert_bytes_read == m.plan.planned_expert_bytes


def test_a_plan_from_exported_sidecars_never_reads_the_experts(family, workdir, monkeypatch):
    """Export on one copy of the family; on another copy, with a fresh catalog, plan without reading a
    byte of any expert file: the same plan as from a full index, and the same output."""
    import shutil

    from typer.testing import CliRunner

    import mergepipe.checkpoint as C
    from mergepipe.cli import app
    for name in ("a", "b"):
        shutil.copytree(family["base"].parent, workdir / name)
    fam_a = {k: workdir / "a" / v.name for k, v in family.items()}
    fam_b = {k: workdir / "b" / v.name for k, v in family.items()}
    experts = [str(p) for k, p in sorted(fam_a.items()) if k != "base"]
    r = CliRunner().invoke(app, ["index", *experts, "--base", str(fam_a["base"]), "--catalog",
                                 str(workdir / "a.sqlite"), "--export", "--json"])
    assert r.exit_code == 0, r.output
    for k, p in fam_a.items():
        for side in p.glob("mergepipe-index-*.safetensors"):
            shutil.copy(side, fam_b[k] / side.name)  # the sidecars travel with the model
    full = plan_merge(load_config(write_config(workdir / "a.yml", fam_a)), "20%", Catalog(workdir / "full.sqlite"))
    reads = []
    real = C.Reader.read
    monkeypatch.setattr(C.Reader, "read", lambda self, path, s, e: reads.append(str(path)) or real(self, path, s, e))
    m = plan_merge(load_config(write_config(workdir / "b.yml", fam_b)), "20%", Catalog(workdir / "fresh.sqlite"))
    assert reads and not [p for p in reads if "/expert" in p]  # the base was hashed, no expert byte read
    monkeypatch.undo()
    assert m.plan.tensors == full.plan.tensors and m.plan.certificate == full.plan.certificate
    assert all(rec.sketch.path.startswith(str(fam_b[f"expert{k + 1}"])) for k, rec in enumerate(m.experts) if rec.sketch)
    assert execute(m, workdir / "out-b").execution.root_hash == execute(full, workdir / "out-a").execution.root_hash


def test_verify_checks_the_sketch_blocks(family, workdir):
    from mergepipe.verify import verify
    m = _plan(family, workdir, "20%")
    done = execute(m, workdir / "out")
    assert verify(done, output=workdir / "out").ok
    rec = next(rec.sketch for rec in m.experts if rec.sketch)
    path = resolve_ref(rec.path, None)
    data = np.fromfile(path, np.uint8)
    data[read_header(Path(path)).data_start:] ^= 0xFF
    data.tofile(path)
    problems = verify(done, output=workdir / "out").problems
    assert problems and all("sketch of block" in p for p in problems)
