"""Process measurement for the benchmarks: wall time, peak RSS of a process tree, disk bytes read.

Linux only (reads /proc). Everything is measured from outside the measured process, so mergekit and
mergepipe are observed the same way and neither has to cooperate.
"""

from __future__ import annotations

import functools
import os
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil


@dataclass
class RunResult:
    cmd: list[str]
    returncode: int
    wall_s: float
    # Sum over the process tree of VmRSS, sampled every `poll_s`; the max over samples, or the largest
    # single process's VmHWM if that is higher (the kernel's high-water mark can't miss a spike between
    # two samples). Includes file-backed pages a process has mmap'ed (safetensors loaders mmap their
    # inputs), so we also keep the anonymous part separately: the memory the job really owns.
    peak_rss_bytes: int
    peak_rss_anon_bytes: int
    peak_hwm_bytes: int
    # wait4's ru_maxrss. Kept for reference only: Linux folds the *parent's* RSS (this harness, with
    # torch loaded) into it at exec, so it overstates small children.
    ru_maxrss_bytes: int
    # Bytes the block layer fetched for the tree (/proc/<pid>/io read_bytes read from the zombie, which
    # already includes the children it reaped). Page-cache hits are not counted, so ~0 when warm.
    read_bytes: int
    write_bytes: int
    user_s: float
    sys_s: float
    samples: int
    # CPU seconds the whole machine spent busy during the run, minus the run's own user+sys and this
    # harness's polling: other people's work. Nonzero means the timing was contended (the box is shared), so say so.
    other_cpu_s: float = 0.0
    loadavg_1m_end: float = 0.0
    stdout: str = ""
    stderr_tail: str = ""
    extra: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        d = dict(self.__dict__)
        d["stdout"] = self.stdout[-2000:]
        return d


def _busy_cpu_s() -> float:
    """Busy CPU time of the whole machine so far (all CPUs), from /proc/stat."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")   # user..steal; guest is inside user


def drop_caches() -> None:
    """Make the next run read its inputs from disk: write dirty pages back first (drop_caches only
    discards clean pages), then drop page cache, dentries and inodes. Needs root."""
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


def evict(paths) -> bool:
    """Drop these files' pages from the page cache (written back first), and only theirs: a cold
    run for the model files whose code, libraries and manifest stay cached. No root needed. False
    where the file system keeps the pages (tmpfs, some network file systems)."""
    paths = list(paths)
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    return not any(resident_pages(p) for p in paths)


def read_once(paths) -> None:
    """Read each file to the end: a warm page cache for the next run (bench runs are warm unless cold)."""
    for path in paths:
        with open(path, "rb") as f:
            while f.read(64 << 20):
                pass


def can_drop_caches() -> bool:
    return os.access("/proc/sys/vm/drop_caches", os.W_OK)


def _read_status(pid: int) -> tuple[int, int, int]:
    """(VmRSS, RssAnon, VmHWM) in bytes from /proc/<pid>/status; cheaper than psutil.memory_full_info."""
    vals = {"VmRSS:": 0, "RssAnon:": 0, "VmHWM:": 0}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key = line.split(None, 1)[0] if line.strip() else ""
                if key in vals:
                    vals[key] = int(line.split()[1]) * 1024
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        pass
    return vals["VmRSS:"], vals["RssAnon:"], vals["VmHWM:"]


def _read_io(pid: int) -> dict[str, int]:
    try:
        with open(f"/proc/{pid}/io") as f:
            return {k: int(v) for k, v in (line.split(": ") for line in f if ": " in line)}
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return {}


def run_measured(cmd: list[str], *, cwd: str | Path | None = None, env: dict | None = None,
                 poll_s: float = 0.025, timeout_s: float | None = None) -> RunResult:
    """Run `cmd` to completion and measure it. stdout is captured (mergepipe's --json output);
    stderr is kept only as a tail, for error messages."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        busy0, self0 = _busy_cpu_s(), time.process_time()   # this poller's own CPU isn't "other"
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=out, stderr=err, start_new_session=True)
        root = psutil.Process(proc.pid)
        peak_rss = peak_anon = peak_hwm = samples = 0
        while True:
            # WNOWAIT: learn that it exited but leave it a zombie, so its /proc/<pid>/io is still there.
            if os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None:
                break
            if timeout_s is not None and time.perf_counter() - t0 > timeout_s:
                os.killpg(proc.pid, signal.SIGKILL)
            pids = [proc.pid]
            try:
                pids += [c.pid for c in root.children(recursive=True)]
            except psutil.Error:
                pass
            rss = anon = 0
            for pid in pids:
                r, a, h = _read_status(pid)
                rss += r
                anon += a
                peak_hwm = max(peak_hwm, h)
            peak_rss, peak_anon = max(peak_rss, rss), max(peak_anon, anon)
            samples += 1
            time.sleep(poll_s)
        wall = time.perf_counter() - t0
        busy = _busy_cpu_s() - busy0 - (time.process_time() - self0)
        io = _read_io(proc.pid)
        _, status, ru = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)  # we reaped it; tell Popen so
        out.seek(0)
        err.seek(0)
        stdout = out.read().decode(errors="replace")
        stderr = err.read().decode(errors="replace")
    # ru_inblock is the same counter in 512-byte units; fall back to it if /proc/<pid>/io was unreadable.
    read_bytes = io.get("read_bytes", ru.ru_inblock * 512)
    return RunResult(cmd=list(map(str, cmd)), returncode=proc.returncode, wall_s=wall,
                     peak_rss_bytes=max(peak_rss, peak_hwm), peak_rss_anon_bytes=peak_anon,
                     peak_hwm_bytes=peak_hwm,
                     ru_maxrss_bytes=ru.ru_maxrss * 1024, read_bytes=read_bytes,
                     write_bytes=io.get("write_bytes", ru.ru_oublock * 512),
                     user_s=ru.ru_utime, sys_s=ru.ru_stime, samples=samples,
                     other_cpu_s=max(0.0, busy - ru.ru_utime - ru.ru_stime),
                     loadavg_1m_end=os.getloadavg()[0],
                     stdout=stdout, stderr_tail=stderr[-4000:])


def cached_bytes(paths: list[Path]) -> int | None:
    """How much of `paths` is in the page cache now, in whole pages (as util-linux fincore counts),
    to check that a cold run really starts cold. None where mincore is unavailable."""
    import mmap
    try:
        return sum(len(resident_pages(p)) for p in paths) * mmap.PAGESIZE
    except (OSError, AttributeError):
        return None


@functools.lru_cache(maxsize=1)
def _libc():
    """libc with mmap, mincore and munmap typed (found once: find_library runs ldconfig)."""
    import ctypes
    import ctypes.util
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    return libc


def resident_pages(path) -> set[int]:
    """The indices of the file's pages that are in the page cache now (mincore over a read-only
    shared mapping; mapping reads nothing)."""
    import ctypes
    import mmap
    libc = _libc()
    size, page = os.path.getsize(path), mmap.PAGESIZE
    if not size:
        return set()
    fd = os.open(path, os.O_RDONLY)
    try:
        addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        vec = (ctypes.c_ubyte * ((size + page - 1) // page))()
        try:
            if libc.mincore(addr, size, vec) != 0:
                raise OSError(ctypes.get_errno(), f"mincore {path}")
        finally:
            libc.munmap(addr, size)
    finally:
        os.close(fd)
    return {i for i, v in enumerate(vec) if v & 1}
