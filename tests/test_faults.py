"""Crash safety and resume: killed runs (real processes, SIGKILL), disk failures mid-run, a full
disk, and two runs racing for one destination."""

import errno
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import mergepipe.blocks as B
import mergepipe.sink as S
from mergepipe.config import load_config
from mergepipe.errors import IOFailure, MergepipeError
from mergepipe.execute import execute, pending_read_bytes, plan_key
from mergepipe.index import Catalog
from mergepipe.plan import plan_merge
from mergepipe.publish import staging_for

from conftest import write_config

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.faults import run_trials, table  # noqa: E402


def _plan(family, workdir, method="task_arithmetic", budget="60%"):
    params = {"density": 0.3} if method == "ties" else {}
    cfg = load_config(write_config(workdir / f"{method}.yml", family, method, **params))
    return plan_merge(cfg, budget, Catalog(workdir / "c.sqlite"))


def test_sigkill_at_random_points_resumes_bit_identical(workdir):
    trials = run_trials(workdir, kills=8, seed=1, slow_ms=20)
    print(table(trials))
    assert sum(t.kills for t in trials) == 8
    for t in trials:
        assert not t.visible_partial and t.identical
        assert t.reread_bytes <= t.remaining_bytes <= t.total_bytes
    resumed = [t for t in trials if not t.finished_first]
    assert resumed and any(t.resumed_output_bytes > 0 and t.reread_bytes < t.total_bytes for t in resumed)


def _fail_after(limit: int, err: int):
    """A Sink._put that fails with `err` once `limit` bytes have been written (after a short write)."""
    orig, written = S.Sink._put, [0]

    def put(sink, view):
        written[0] += len(view)
        if written[0] > limit:
            orig(sink, view[: max(0, len(view) - (written[0] - limit))])
            raise IOFailure(f"{sink.f.name}: write failed ({os.strerror(err)})")
        orig(sink, view)
    return put


@pytest.mark.parametrize("method", ["task_arithmetic", "ties"])
def test_io_failure_mid_tensor_keeps_work_and_resumes_exactly(family, workdir, monkeypatch, method):
    """Small blocks and a journal record per block: resume re-reads exactly the blocks after the
    last record, also inside a tensor (TIES tensors restart whole)."""
    monkeypatch.setattr(B, "BLOCK_ELEMS", 4096)
    monkeypatch.setattr(S, "GROUP_BYTES", 1)
    m = _plan(family, workdir, method)
    ref = execute(m, workdir / "ref")
    for limit in (100, 40_000, 300_000):
        out = workdir / f"out-{limit}"
        monkeypatch.setattr(S.Sink, "_put", _fail_after(limit, errno.EIO))
        with pytest.raises(MergepipeError, match="write failed .Input/output error.") as e:
            execute(m, out)
        assert "\n" not in str(e.value) and ".mergepipe-staging-" in str(e.value)
        monkeypatch.undo()
        monkeypatch.setattr(B, "BLOCK_ELEMS", 4096)
        monkeypatch.setattr(S, "GROUP_BYTES", 1)
        assert not out.exists()
        remaining, total = pending_read_bytes(m, out)
        done = execute(m, out)
        assert done.execution.outputs == ref.execution.outputs
        assert done.execution.expert_bytes_read + done.execution.base_bytes_read == remaining <= total
        if limit > 100:  # the failure came after a record (mid-tensor for TA; TIES restarts the tensor)
            assert done.execution.resumed_bytes > 0
        if limit > 100 and (method != "ties" or limit > 100_000):
            assert remaining < total
    assert not list(workdir.glob(".out-*"))  # staging and journals gone after publishing


def test_damaged_journal_or_data_resumes_from_what_verifies(family, workdir, monkeypatch):
    m = _plan(family, workdir)
    ref = execute(m, workdir / "ref")
    out = workdir / "out"
    monkeypatch.setattr(S.Sink, "_put", _fail_after(250_000, errno.ENOSPC))
    with pytest.raises(IOFailure, match="No space left"):
        execute(m, out)
    monkeypatch.undo()
    st = staging_for(out.resolve(), plan_key(m, "cpu"))
    shard = sorted(st.folder.glob("*.safetensors"))[0]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF  # a journaled range no longer matches its hash
    shard.write_bytes(bytes(data))
    with open(st.journal, "ab") as f:
        f.write(b"0123 {torn")  # a torn last line
    remaining, total = pending_read_bytes(m, out)
    done = execute(m, out)
    assert done.execution.outputs == ref.execution.outputs
    assert done.execution.expert_bytes_read + done.execution.base_bytes_read == remaining
    assert 0 < done.execution.resumed_bytes < len(data)


def test_other_plans_staging_is_cleaned(family, workdir):
    stale = workdir / ".out.mergepipe-staging-0123456789abcdef"
    stale.mkdir()
    (workdir / ".out.mergepipe-staging-0123456789abcdef.journal").write_text("x")
    execute(_plan(family, workdir), workdir / "out")
    assert sorted(p.name for p in workdir.glob(".out*")) == []


def test_second_concurrent_execute_is_refused(family, workdir):
    m = _plan(family, workdir)
    lock = workdir / ".out.mergepipe-lock"
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, sys, time; f = open(sys.argv[1], 'w'); "
                               "fcntl.flock(f, fcntl.LOCK_EX); print('held', flush=True); time.sleep(30)", str(lock)],
                              stdout=subprocess.PIPE)
    try:
        assert holder.stdout.readline().strip() == b"held"
        with pytest.raises(MergepipeError, match="another mergepipe execute is writing") as e:
            execute(m, workdir / "out")
        assert "\n" not in str(e.value)
    finally:
        holder.kill()
        holder.wait()
    assert not (workdir / "out").exists()
    execute(m, workdir / "out")  # the kernel dropped the dead holder's lock
    assert (workdir / "out").is_dir() and not lock.exists()


def test_free_space_checked_before_writing(family, workdir, monkeypatch):
    m = _plan(family, workdir)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**6, 10**6 - 1000, 1000))
    with pytest.raises(IOFailure, match="not enough free space.*needs \\d+ more bytes, 1000 available"):
        execute(m, workdir / "out")
    assert sorted(p.name for p in workdir.iterdir() if p.name.startswith((".out", "out"))) == []


@pytest.fixture()
def tiny_disk(tmp_path):
    d = tmp_path / "disk"
    d.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(d)],
                                           capture_output=True).returncode != 0:
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    yield d
    subprocess.run(["umount", "-l", str(d)], check=False)


def test_real_full_disk_gives_one_line_and_no_output(family, workdir, tiny_disk, monkeypatch):
    """A 256 KiB tmpfs: the ~330 KB output does not fit. The space check is bypassed so that
    the failure happens mid-write (ENOSPC from the kernel)."""
    m = _plan(family, workdir)
    monkeypatch.setattr("mergepipe.execute.check_space", lambda folder, need: None)
    out = tiny_disk / "out"
    with pytest.raises(IOFailure, match="No space left on device") as e:
        execute(m, out)
    assert str(tiny_disk) in str(e.value) and "\n" not in str(e.value)
    assert not out.exists()
    monkeypatch.undo()
    with pytest.raises(IOFailure, match="not enough free space"):  # and the check catches it up front
        execute(m, tiny_disk / "other")
    assert not (tiny_disk / "other").exists()
