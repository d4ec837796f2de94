"""The torch-free CPU path: numpy float conversions and the numpy task-arithmetic kernel are bit for
bit torch's; a CPU task-arithmetic execute never imports torch; O_DIRECT output files resume and
fall back like page-cache ones."""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from mergepipe import floats, sink as S
from mergepipe.errors import MergepipeError
from mergepipe.operators import get
from mergepipe.sources import BlockInputs
from mergepipe.operators.ta import merge_into, merge_numpy

TORCH = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}


def raw(t: torch.Tensor) -> np.ndarray:
    return t.contiguous().view(torch.uint8).numpy()


def bits(n: int, seed: int) -> np.ndarray:
    """float32 values with uniformly random bit patterns: every exponent, NaN and Inf included."""
    return np.random.default_rng(seed).integers(0, 2**32, n, dtype=np.uint64).astype(np.uint32).view(np.float32)


@pytest.mark.parametrize("dtype", ["BF16", "F16"])
def test_widening_every_16_bit_pattern(dtype):
    allp = np.arange(1 << 16, dtype=np.uint16)
    ours = floats.to_f32(allp.view(np.uint8), dtype, np.empty(1 << 16, np.float32))
    ref = torch.from_numpy(allp.view(np.int16).copy()).view(TORCH[dtype]).float().numpy()
    nan = np.isnan(ref)
    assert np.array_equal(ours.view(np.uint32)[~nan], ref.view(np.uint32)[~nan])
    assert np.isnan(ours[nan]).all()
    if dtype == "BF16":  # the paired layout: even positions first, then odd ones
        paired = floats.to_f32(allp.view(np.uint8), dtype, np.empty(1 << 16, np.float32), pairs=True)
        assert np.array_equal(paired.view(np.uint32), np.concatenate([ours[0::2], ours[1::2]]).view(np.uint32))


@pytest.mark.parametrize("dtype,pairs", [("BF16", False), ("BF16", True), ("F16", False), ("F32", False)])
def test_rounding_matches_torch_and_reports_nonfinite(dtype, pairs):
    x = bits(1 << 18, 1)
    ref = torch.from_numpy(x.copy()).to(TORCH[dtype])
    src = np.concatenate([x[0::2], x[1::2]]) if pairs else x
    out = np.empty(x.size * floats.ITEMSIZE[dtype], np.uint8)
    with np.errstate(all="ignore"):
        finite = floats.from_f32(src, dtype, out, np.empty(x.size, np.uint32), pairs)
    assert not finite  # random bit patterns hold NaN and Inf
    nan = np.isnan(x)
    word = np.uint16 if dtype != "F32" else np.uint32
    assert np.array_equal(out.view(word)[~nan], raw(ref).view(word)[~nan])
    back = torch.from_numpy(out.view(np.int16 if dtype != "F32" else np.int32)).view(TORCH[dtype]).float().numpy()
    assert np.isnan(back[nan]).all()


def test_finite_flag_at_the_bfloat16_overflow_edge():
    """A finite float32 at or above 0x7F7F8000 rounds to bfloat16 Inf; one just below stays finite."""
    for pattern, finite in [(0x7F7F7FFF, True), (0x7F7F8000, False), (0xFF7F8000, False), (0x7F800000, False)]:
        x = np.array([1.0, pattern], np.uint32).view(np.float32)
        x[0] = 1.0
        out = np.empty(4, np.uint8)
        assert floats.from_f32(x, "BF16", out, np.empty(2, np.uint32)) is finite
        assert np.array_equal(out, raw(torch.from_numpy(x.copy()).bfloat16()))


@pytest.mark.parametrize("K,base,expert,out,normalize,lam", [
    (4, "BF16", "BF16", "BF16", False, 1.0),
    (5, "BF16", "BF16", "BF16", True, 0.7),
    (1, "BF16", "BF16", "F32", False, 2.0),
    (3, "F32", "BF16", "F16", False, 0.5),
    (17, "F16", "F16", "BF16", False, 1.0),  # past torch's 16-row summation runs
    (40, "BF16", "BF16", "BF16", True, 1.0),
    (0, "BF16", "BF16", "BF16", False, 1.0),
])
@pytest.mark.parametrize("n", [65_537, 1 << 19])  # odd: the last step leaves the paired layout
def test_numpy_kernel_is_the_torch_kernel_bit_for_bit(K, base, expert, out, normalize, lam, n):
    g = torch.Generator().manual_seed(K * 7 + n % 5)
    b = (torch.randn(n, generator=g) * 0.02).to(TORCH[base])
    experts = [(b.float() + torch.randn(n, generator=g) * 0.003).to(TORCH[expert]) for _ in range(K)]
    weights = (torch.rand(K, generator=g) * 2 - 1).tolist()
    all_weights = weights + [0.25]  # an expert the plan did not read here still counts in the divisor
    ref = torch.empty(n, dtype=TORCH[out])
    block = BlockInputs.of((raw(b), base), [(raw(e), expert) for e in experts], out)
    merge_into(ref, block.base, [x for _, x in block.experts], weights, all_weights, lam, normalize, torch.device("cpu"))
    ours, finite = merge_numpy(block, weights, all_weights, lam, normalize)
    assert finite
    assert np.array_equal(ours, raw(ref))


def test_cpu_task_arithmetic_runs_without_torch(family, workdir):
    """Importing torch is 1.3 s; a CPU task-arithmetic plan and execute must not pay it."""
    code = f"""
import sys
from mergepipe.config import load_config
from mergepipe.index import Catalog
from mergepipe.plan import plan_merge
sys.path.insert(0, {os.path.dirname(__file__)!r})
from conftest import write_config
from pathlib import Path
w = Path({str(workdir)!r})
m = plan_merge(load_config(write_config(w / "ta.yml", {{k: Path(v) for k, v in {dict((k, str(v)) for k, v in family.items())!r}.items()}})), "50%", Catalog(w / "c.sqlite"))
for name in [n for n in sys.modules if n == "torch" or n.startswith("torch.")]:
    del sys.modules[name]
sys.modules["torch"] = None  # any import of torch from here on fails
from mergepipe.execute import execute
done = execute(m, w / "out")
print(done.execution.root_hash)
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ})
    assert r.returncode == 0, r.stderr[-2000:]
    from mergepipe.manifest import load_manifest
    from mergepipe.execute import MANIFEST_NAME, execute
    m = load_manifest(workdir / "out" / MANIFEST_NAME)
    assert execute(m, workdir / "again").execution.root_hash == r.stdout.strip()


def test_direct_output_resumes_at_an_unaligned_prefix_and_matches_page_cache(tmp_path):
    data = np.random.default_rng(0).integers(0, 256, 3 * S.STAGE + 12_345, dtype=np.uint8)
    buffered = tmp_path / "buffered"
    with S.open_output(buffered, 0, direct=False) as f:
        f.write(memoryview(data))
    direct = tmp_path / "direct"
    f = S.open_output(direct, 0, direct=True)
    view, cut = memoryview(data), 2 * S.STAGE + 5_000  # a kill after a sync mid-file
    while view.nbytes > data.nbytes - cut:
        view = view[f.write(view[: view.nbytes - (data.nbytes - cut)]):]
    f.sync()
    f.close(write=False)
    assert direct.stat().st_size >= cut  # the padded last block is on disk
    with S.open_output(direct, cut, direct=True) as f:  # resume: cut back to the prefix, go on
        view = memoryview(data)[cut:]
        while view:
            view = view[f.write(view):]
    assert direct.read_bytes() == buffered.read_bytes() == data.tobytes()


def test_parts_of_one_file_write_their_own_pages_direct_and_share_the_edge_pages(tmp_path, monkeypatch):
    """Parts cut at unaligned offsets, written at once from threads: each writes O_DIRECT only whole
    pages inside its own range (a direct write of a shared page would overwrite the neighbour's
    bytes), and a part resumed mid-range, in its interior or in its first page, ends the same."""
    import fcntl
    import threading
    monkeypatch.setattr(S, "STAGE", 64 << 10)  # several staged buffers per part
    data = np.random.default_rng(1).integers(0, 256, 1_000_003, dtype=np.uint8)
    cuts = [0, 5, 4096 + 17, 300_001, 300_001 + 2000, 700_000, data.nbytes]  # one part inside a page
    path, direct = tmp_path / "out", []
    real = os.pwrite

    def pwrite(fd, buf, off):
        if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT:
            direct.append((off, off + len(buf)))
        return real(fd, buf, off)
    monkeypatch.setattr(S.os, "pwrite", pwrite)

    def write(lo, hi, prefix, stop=None):
        with S.open_output(path, prefix, direct=True, part=(lo, hi)) as f:
            view = memoryview(data)[prefix:stop or hi]
            while view:
                view = view[f.write(view[:7777]):]  # writes of odd sizes, as blocks come
            if stop is not None:
                f.sync()
    threads = [threading.Thread(target=write, args=(lo, hi, lo)) for lo, hi in zip(cuts, cuts[1:])]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert path.read_bytes() == data.tobytes()
    ranges = list(zip(cuts, cuts[1:]))
    for a, b in direct:
        assert a % S.ALIGN == 0 and b % S.ALIGN == 0
        lo, hi = next((lo, hi) for lo, hi in ranges if lo <= a < hi)
        assert lo <= a and b <= hi, (a, b, lo, hi)  # inside the part that wrote it
    assert sum(b - a for a, b in direct) > data.nbytes // 2
    # resumes: a part cut short after a sync, at an unaligned prefix in its interior and in its first page
    for lo, hi, cut in ((300_001 + 2000, 700_000, 500_123), (4096 + 17, 300_001, 4096 + 17 + 3)):
        path.write_bytes(data.tobytes())
        with open(path, "r+b") as f:  # what the dead attempt had not written yet
            f.seek(cut)
            f.write(bytes(hi - cut))
        write(lo, hi, cut)
        assert path.read_bytes() == data.tobytes()


def test_a_file_read_in_ranges_direct_or_through_the_page_cache_gives_its_bytes(tmp_path, monkeypatch):
    monkeypatch.setattr(S, "CHUNK", 1 << 16)
    data = np.random.default_rng(2).integers(0, 256, 300_001, dtype=np.uint8).tobytes()
    path = tmp_path / "f"
    path.write_bytes(data)
    for direct in (False, True):
        for lo, hi in ((0, None), (0, 4096), (17, 65_536 * 2 + 5), (4095, 300_001), (299_999, 300_001), (5, 5)):
            got = b"".join(bytes(c) for c in S.chunks(path, lo, hi, direct=direct))
            assert got == data[lo:hi], (direct, lo, hi)


def test_direct_output_falls_back_where_o_direct_is_refused(tmp_path, monkeypatch):
    data = np.arange(S.STAGE + 777, dtype=np.uint8)
    calls = []
    real = os.pwrite

    def pwrite(fd, buf, off):
        import fcntl
        if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT:
            calls.append(off)
            raise OSError(22, "Invalid argument")
        return real(fd, buf, off)
    monkeypatch.setattr(S.os, "pwrite", pwrite)
    with S.open_output(tmp_path / "out", 0, direct=True) as f:
        view = memoryview(data)
        while view:
            view = view[f.write(view):]
    assert calls and (tmp_path / "out").read_bytes() == data.tobytes()


def test_operators_load_on_first_use():
    assert get("ta") is get("task_arithmetic")
    assert get("ties").name == "ties" and get("gcwm").name == "gcwm"
    assert get("slerp").name == "slerp" and get("dare_ties").name == "dare_ties"
    with pytest.raises(MergepipeError, match="not supported"):
        get("sce")


def test_divisor_of_up_to_four_weights_is_torch_sum():
    from mergepipe.operators.ta import _divisor
    rng = np.random.default_rng(3)
    for _ in range(2000):
        w = tuple((rng.random(int(rng.integers(1, 5))) * 2 - 1).astype(np.float32).tolist())
        _divisor.cache_clear()
        assert _divisor(w) == np.float32(torch.tensor(w, dtype=torch.float32).sum().item())


def _dirty_pages(path) -> int | None:
    """The file's dirty pages in the page cache (Linux cachestat, 6.5 on), or None without it."""
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    rng, st = (ctypes.c_uint64 * 2)(0, 0), (ctypes.c_uint64 * 5)()
    fd = os.open(path, os.O_RDONLY)
    try:
        if libc.syscall(451, fd, rng, st, 0) != 0:  # 451: cachestat on x86_64 and arm64
            return None
    finally:
        os.close(fd)
    return int(st[1])


@pytest.mark.skipif(sys.platform != "linux" or os.uname().machine not in ("x86_64", "aarch64"), reason="cachestat")
def test_a_page_cache_output_starts_its_writeback_at_each_durable_record(tmp_path, monkeypatch):
    """A part of a file (or an in-place output) goes through the page cache; without writeback started
    as records become durable, the publish's fsync writes the whole file while the run waits."""
    from mergepipe.journal import Journal
    monkeypatch.setattr(S, "GROUP_BYTES", 1 << 20)
    chunk = np.random.default_rng(0).integers(0, 256, 1 << 20, dtype=np.uint8)

    def write(path) -> int | None:
        f = S.open_output(path, 0, direct=False, part=(0, 16 << 20))
        sink = S.Sink(f, path.name, Journal(tmp_path / f"{path.name}.journal", "plan", []))
        sink.begin("t", 0)
        for _ in range(16):
            sink.write(chunk)
            sink.block_done("t")
        sink.end("t")
        sink.close()
        f.close()
        return _dirty_pages(path)

    dirty = write(tmp_path / "with")
    monkeypatch.setattr(S, "start_writeback", lambda *a: None)
    control = write(tmp_path / "without")
    if dirty is None or control is None or control < 3000:
        pytest.skip("no cachestat here, or this file system writes back on its own (tmpfs, memory pressure)")
    assert (tmp_path / "with").read_bytes() == chunk.tobytes() * 16
    assert dirty < control // 4  # 16 MiB = 4096 pages: all but the last record's are on their way out
