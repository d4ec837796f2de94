"""Runs a plan's file jobs as tasks on a Ray cluster. Each task runs the same pure worker as the local
executor on one file or one part of a file: it reads its planned byte ranges of the shared inputs,
checks their hashes, merges, and writes its bytes into the staging folder on the shared output file
system. It streams back each journal record as its sink makes it; the driver alone appends them to the
journal, checks what every part wrote, and publishes.

A task whose worker dies is submitted again by the driver, with every record journaled for its part
so far, and the new attempt resumes from what those records prove is on disk. (Ray's own retries run a
task again with its first arguments: it would start over.) Ray is imported only here, and only when
a run asks for it."""

from __future__ import annotations

import collections
import contextlib
import functools
import os
import queue
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterator

import xxhash

from . import __version__
from .checkpoint import Reader
from .errors import IOFailure, MergepipeError
from .executor import LocalExecutor, Ran, RunEnv
from .journal import Record
from .manifest import JobRun, OutputFile
from .options import RunOptions
from .sink import FileHasher, Resume, chunks, recover
from .worker import SLOW_ENV, FileJob, FileResult, WorkerContext, cuts, kernels, run_file, split

SCRATCH = ".mergepipe-scratch"  # as execute.SCRATCH, which removes it before publishing
# Output files larger than this run as parts of about this size (whole tensors each), so that one large
# shard spreads over several workers and a lost worker costs at most one part.
PART_BYTES = 128 << 20
ATTEMPTS = 4  # per part: a part whose worker died this many times fails the run
CPUS_PER_TASK = 1  # and as many compute threads
STOP_WAIT_S = 120  # a failed run waits this long for its running parts to stop
READ_BACK_THREADS = 4  # files the driver reads back at once
INSTALL = "--executor ray needs Ray, which is not installed: pip install 'mergepipe[ray]' (or pip install 'ray>=2.40')"


@functools.lru_cache(maxsize=1)
def code_id() -> str:
    """This process's mergepipe: its version and a hash of its source files."""
    h = xxhash.xxh3_64()
    root = Path(__file__).resolve().parent
    for path in sorted(root.rglob("*.py")):
        h.update(f"{path.relative_to(root)}\0".encode())
        h.update(path.read_bytes())
    return f"{__version__} ({h.hexdigest()})"


def _ray():
    try:
        import ray
    except ImportError:
        raise MergepipeError(INSTALL) from None
    return ray


@dataclass(frozen=True)
class TaskConfig:
    """What a task needs besides its job: where the worker finds the staging folder, and how to run."""
    staging: str
    device: str
    allow_nonfinite: bool
    threads: int
    slow_ms: str | None  # the test hook of worker.SLOW_ENV, passed on to the worker's process
    stop: str  # a file the driver creates when the run fails: its tasks end where they are


class _ReadBack:
    """The driver's check of what the parts wrote: each output file hashed from the shared file system
    in file order, a part as soon as it and every part before it in its file are done, while later
    parts run. Files are read on up to READ_BACK_THREADS threads at once (one at a time each: a
    file's hash is one stream), so one stream's latency does not bind the driver. Only the bytes of
    finished parts are read, and when the last part ends only its own range is left to read."""

    def __init__(self, staging: Path, jobs: list[FileJob]) -> None:
        self._staging = staging
        self._parts: dict[str, list[FileJob]] = collections.defaultdict(list)
        for job in sorted(jobs, key=lambda j: (j.layout.name, j.start)):
            self._parts[job.layout.name].append(job)
        self._hashers = {name: FileHasher(parts[0].layout) for name, parts in self._parts.items()}
        self._locks = {name: threading.Lock() for name in self._parts}
        self._finished: set = set()
        self._pool = ThreadPoolExecutor(READ_BACK_THREADS, thread_name_prefix="mergepipe-read-back")
        self._reads: list = []
        self.files: dict[str, OutputFile] = {}

    def done(self, key: tuple[str, int]) -> None:
        self._finished.add(key)
        self._reads.append(self._pool.submit(self._advance, key[0]))

    def _advance(self, name: str) -> None:
        with self._locks[name]:
            parts, h, path = self._parts[name], self._hashers[name], self._staging / name
            while parts and parts[0].key in self._finished:
                part = parts.pop(0)
                for chunk in chunks(path, part.start, part.end, direct=True):  # written direct: not cached
                    h.feed(chunk)
                if not parts:
                    self.files[name] = OutputFile(os.path.getsize(path), *h.digests())

    def stop(self) -> None:
        """Let the reads queued so far end."""
        self._pool.shutdown(wait=True)

    def close(self) -> dict[str, OutputFile]:
        """The files read back whole, once the reads queued so far are done."""
        self.stop()
        for read in self._reads:
            read.result()
        return self.files


class _Relay:
    """The journal a task's sink writes to: each record goes to the driver instead of a file."""

    def __init__(self, q: queue.Queue) -> None:
        self.q = q

    def append(self, rec: Record, sync: bool = True) -> None:
        self.q.put(("record", rec, sync))


def _part_name(key: tuple[str, int]) -> str:
    """Part `key` (file, first tensor) as one file name in the scratch folder."""
    return f"{key[0].replace('/', '_')}-{key[1]}"


def owner_path(staging: Path, key: tuple[str, int]) -> Path:
    """The file that names the attempt owning part `key`: the driver writes it before each attempt."""
    return staging / SCRATCH / "owners" / _part_name(key)


def claim(path: Path) -> str:
    """Make a new attempt the part's owner (atomically, by rename); returns its token."""
    token = uuid.uuid4().hex
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{token}")
    tmp.write_text(token)
    os.replace(tmp, path)
    return token


def fence(path: str, token: str):
    """The worker's fence (see Sink): raises Stopped once `path` no longer names this attempt, that
    is once the driver has given the part to another attempt, or the run has ended (publishing
    removes the owners with the scratch folder). A worker its driver can no longer reach (a network
    partition, not a death) then writes nothing more, save a write already past the check."""
    def check() -> None:
        try:
            with open(path) as f:
                held = f.read()
        except FileNotFoundError:
            held = None
        if held != token:
            raise Stopped(f"{path}: another attempt owns this part now")
    return check


def part_task(job: FileJob, records: list[Record], cfg: TaskConfig, owner: tuple[str, str]) -> Iterator[tuple]:
    """The body of one Ray task (a generator: each item reaches the driver as it is yielded); `owner`:
    the path of its part's owner file as the worker sees it, and this attempt's token."""
    import ray
    if cfg.slow_ms is None:
        os.environ.pop(SLOW_ENV, None)
    else:
        os.environ[SLOW_ENV] = cfg.slow_ms
    staging = Path(cfg.staging)
    if os.path.exists(cfg.stop):
        return
    resume = recover(staging / job.layout.name, job.layout, cuts(job, kernels(job, cfg.device, staging)), records,
                     (job.start, job.end))
    yield ("start", ray.get_runtime_context().get_node_id(), os.getpid(), code_id(), resume.done)
    q: queue.Queue = queue.Queue()
    progress = [0]
    reader = Reader()
    scratch = staging / SCRATCH / _part_name(job.key)
    scratch.mkdir(parents=True, exist_ok=True)
    ctx = WorkerContext(staging, _Relay(q), resume, reader, cfg.device, cfg.allow_nonfinite,
                        _stopper(cfg.stop, progress), cfg.threads, scratch=scratch, fence=fence(*owner))

    def work() -> None:
        try:
            with LocalExecutor().session():
                done = run_file(job, ctx)
                reader.check_unchanged()
                q.put(("done", done))
        except BaseException as e:  # noqa: BLE001 - raised again in the task, which reports it
            q.put(("error", e))

    threading.Thread(target=work, daemon=True, name="mergepipe-part").start()
    try:
        while True:
            items = [q.get()]
            while items[-1][0] == "record" and not q.empty():  # what queued up meanwhile: one reply, not one each
                items.append(q.get())
            records = [(it[1], it[2]) for it in items if it[0] == "record"]
            n, progress[0] = progress[0], 0
            if records:
                yield ("records", records, n, dict(ctx.reads))
                n = 0
            last = items[-1]
            if last[0] == "error":
                raise last[1]
            if last[0] == "done":
                yield ("done", last[1], n)
                return
    finally:
        reader.close()


@dataclass
class _Part:
    """The driver's view of one part while it runs."""
    job: FileJob
    records: list[Record]  # journaled for it: the kept ones, then what its attempts sent
    attempts: int = 0
    node: str = ""
    started: float = 0.0  # when the running attempt reported its start
    ran_s: float = 0.0  # how long its ended attempts ran
    resumed: int | None = None  # what its latest attempt found done
    reads: dict | None = None  # of the running attempt, as last reported
    read_before: dict | None = None  # of the attempts that died


class RayExecutor:
    name = "ray"
    shared = True  # the driver checks on disk what the workers wrote

    def __init__(self, opts: RunOptions) -> None:
        for entry in opts.path_map or ():
            here, sep, there = entry.partition("=")
            if not sep or not here.startswith("/") or not there.startswith("/"):
                raise MergepipeError(f"--path-map {entry!r}: expected DRIVER_PATH=WORKER_PATH, both absolute")
        self.opts = opts
        self._ray = _ray()
        # per output file, its size and hashes read back from the shared file system as its parts
        # finished: what the driver checks against the workers' reports
        self.read_back: dict[str, OutputFile] = {}

    def parts(self, jobs: list[FileJob]) -> list[FileJob]:
        return [p for j in jobs for p in split(j, PART_BYTES)]

    @contextlib.contextmanager
    def session(self) -> Iterator[None]:
        """Joined to the cluster (a caller that already called ray.init keeps its connection)."""
        ray = self._ray
        started = not ray.is_initialized()
        if started:
            _reachable(self.opts.ray_address)
            try:
                ray.init(address=self.opts.ray_address, log_to_driver=False, logging_level="ERROR",
                         include_dashboard=False if self.opts.ray_address is None else None)
            except (ConnectionError, RuntimeError, ValueError) as e:
                raise MergepipeError(f"ray: cannot join the cluster at {self.opts.ray_address or 'RAY_ADDRESS'} "
                                     f"({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
        try:
            yield
        finally:
            if started:
                ray.shutdown()

    def run_all(self, jobs: list[FileJob], resumes: dict[tuple[str, int], Resume], env: RunEnv) -> dict[tuple[str, int], Ran]:
        """Every part to the end, a cluster's worth of them running at a time (the rest wait here, not
        in Ray's queue: on a failure, nothing of this run starts later). When the run fails, the
        running parts are asked to stop and are waited for: when this returns or raises, no task of
        the run still writes (ray.cancel is not used: Ray 2.40 can crash the driver when a cancel
        races a task's end)."""
        from .placement import place
        ray = self._ray
        mapped = {job.key: _mapped(job, self.opts) for job in jobs}
        staging = self.opts.worker_path(env.staging)
        try:
            strategies = place(ray, list(mapped.values()), staging)
        except ray.exceptions.RayTaskError as e:
            raise _cause(e) from None
        stop = env.staging / SCRATCH / f"stop-{uuid.uuid4().hex[:12]}"
        cfg = TaskConfig(staging, "cuda" if env.device.startswith("cuda") else "cpu", env.allow_nonfinite,
                         CPUS_PER_TASK, os.environ.get(SLOW_ENV), self.opts.worker_path(stop))
        task = ray.remote(part_task)
        base = {"num_cpus": CPUS_PER_TASK, "num_gpus": 0 if cfg.device == "cpu" else 1, "max_retries": 0,
                "num_returns": "streaming", "name": "mergepipe-part"}
        hosts = {n["NodeID"]: n["NodeManagerAddress"] for n in ray.nodes()}
        window = 1 + int(ray.cluster_resources().get("GPU" if cfg.device != "cpu" else "CPU", 1) // max(1, CPUS_PER_TASK))
        state = {job.key: _Part(job, list(resumes[job.key].kept)) for job in jobs}
        todo, running = collections.deque(job.key for job in jobs), {}
        retry = (ray.exceptions.WorkerCrashedError, ray.exceptions.NodeDiedError, ray.exceptions.LocalRayletDiedError,
                 ray.exceptions.ObjectLostError)  # the worker or its node died: the part runs again

        def submit(key) -> None:
            state[key].attempts += 1
            opts = {**base, "scheduling_strategy": strategies[key]} if strategies.get(key) else base
            path = owner_path(env.staging, key)
            owner = (self.opts.worker_path(path), claim(path))  # an earlier attempt still writing stops
            running[task.options(**opts).remote(mapped[key], state[key].records, cfg, owner)] = key

        done: dict[tuple[str, int], Ran] = {}
        back = _ReadBack(env.staging, jobs)
        try:
            while todo or running:
                while todo and len(running) < window:
                    submit(todo.popleft())
                gen = ray.wait(list(running), num_returns=1)[0][0]
                key = running[gen]
                try:
                    item = ray.get(next(gen))
                except StopIteration:
                    del running[gen]
                    if key not in done:
                        raise RuntimeError(f"internal: the task of {state[key].job.label()} ended without its result")
                    continue
                except retry as e:
                    del running[gen]
                    self._died(state[key], e, env)
                    todo.appendleft(key)
                    continue
                if self._take(state[key], item, env):
                    done[key] = _ran(state[key], item[1], hosts)
                    back.done(key)
            self.read_back = back.close()
        except ray.exceptions.RayTaskError as e:
            raise self._failed(running, stop, _cause(e), env) from None
        except ray.exceptions.TaskUnschedulableError:
            raise self._failed(running, stop, IOFailure(
                f"ray: {state[key].job.label()} can run only on a node that holds its inputs, and that node has "
                f"left the cluster; the work done so far is kept in {env.staging} for a rerun to resume"), env) from None
        except BaseException as e:
            raise self._failed(running, stop, e, env) from None
        finally:
            back.stop()
        return done

    def _failed(self, running: dict, stop: Path, error: BaseException, env: RunEnv) -> BaseException:
        """Stop the running parts and wait for them to end, journaling what they still report (a rerun
        resumes from it); then `error` is the run's."""
        ray = self._ray
        stop.parent.mkdir(parents=True, exist_ok=True)
        stop.touch()
        deadline = time.monotonic() + STOP_WAIT_S
        while running and time.monotonic() < deadline:
            ready, _ = ray.wait(list(running), num_returns=1, timeout=max(0.0, deadline - time.monotonic()))
            for gen in ready:
                try:
                    item = ray.get(next(gen))
                    for rec, sync in item[1] if item[0] == "records" else ():
                        env.journal.append(rec, sync)
                except BaseException:  # noqa: BLE001 - StopIteration, the stop itself, or its death
                    del running[gen]
        for gen in running:  # hung past the wait: the only case left for a cancel
            ray.cancel(gen, force=True)
        stop.unlink(missing_ok=True)
        return error

    def _take(self, part: _Part, item: tuple, env: RunEnv) -> bool:
        """Act on one item a task sent; True once its part is done."""
        kind = item[0]
        if kind == "start":
            _, node, _pid, code, resumed = item
            if code != code_id():
                raise MergepipeError(f"ray: node {node} runs mergepipe {code}, this driver {code_id()}: install "
                                     "the same mergepipe on every node (the output bytes depend on its code)")
            part.node, part.started = node, time.perf_counter()
            part.resumed = resumed
            return False
        n = item[2]  # input bytes read since the last item
        if env.progress and n:
            env.progress(n)
        if kind == "records":
            _, records, _n, part.reads = item
            for rec, sync in records:
                env.journal.append(rec, sync)
                part.records.append(rec)
            return False
        return True

    def _died(self, part: _Part, e: Exception, env: RunEnv) -> None:
        """A part's worker died: count what it read, and give up after ATTEMPTS."""
        part.read_before = _add(part.read_before or {}, part.reads or {})
        part.reads = None
        part.ran_s += time.perf_counter() - part.started if part.started else 0.0
        part.started = 0.0
        if part.attempts >= ATTEMPTS:
            first = (str(e).splitlines() or [type(e).__name__])[0]
            raise IOFailure(f"ray: the worker of {part.job.label()} died {part.attempts} times (last on node "
                            f"{part.node or '?'}: {first}); the work done so far is kept in {env.staging} "
                            "for a rerun to resume")


def _reachable(address: str | None) -> None:
    """A HOST:PORT that nothing listens on fails now, in one line (ray.init would retry for minutes)."""
    import socket
    host, sep, port = (address or "").rpartition(":")
    if not sep or not port.isdigit() or "://" in address:
        return
    try:
        socket.create_connection((host, int(port)), timeout=10).close()
    except OSError as e:
        raise MergepipeError(f"ray: cannot join the cluster at {address} ({e.strerror or e})") from None


class Stopped(Exception):
    """A task ended early: its run failed elsewhere, or another attempt owns its part now."""


def _stopper(path: str, progress: list):
    """The worker's progress callback: counts bytes, and ends the task once `path` exists (looked at
    no more than twice a second)."""
    last = [0.0]

    def seen(n: int) -> None:
        progress[0] += n
        now = time.monotonic()
        if now - last[0] >= 0.5:
            last[0] = now
            if os.path.exists(path):
                raise Stopped(path)
    return seen


def _ran(part: _Part, result: FileResult, hosts: dict[str, str]) -> Ran:
    reads = _add(part.read_before or {}, result.bytes_read)
    result = replace(result, bytes_read=reads)
    run = JobRun(part.job.layout.name, part.job.first, len(part.job.tensors), part.node, hosts.get(part.node, "?"),
                 round(part.ran_s + time.perf_counter() - part.started, 4), sum(reads.values()), part.attempts,
                 part.resumed or 0)
    return Ran(result, run)


def _add(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, n in b.items():
        out[k] = out.get(k, 0) + n
    return out


def _cause(e) -> BaseException:
    """The exception a task raised, as the worker raised it (bad input stays one line); a worker that
    cannot import mergepipe is a setup problem, said in one line too."""
    cause = getattr(e, "cause", None)
    if isinstance(cause, ImportError) or "No module named 'mergepipe" in str(e):
        return MergepipeError("ray: a worker cannot import mergepipe's Ray executor: install the same mergepipe "
                              "on every node (or pass the checkout on PYTHONPATH to the raylets)")
    return cause if isinstance(cause, BaseException) else RuntimeError(str(e).splitlines()[0])


def _mapped(job: FileJob, opts: RunOptions) -> FileJob:
    """The job with every input path as the workers see it."""
    if not opts.path_map:
        return job

    def tensor(t):
        return replace(t, base=replace(t.base, file=opts.worker_path(t.base.file)),
                       experts=tuple(replace(e, file=opts.worker_path(e.file)) for e in t.experts),
                       sketches=tuple(s and replace(s, file=opts.worker_path(s.file)) for s in t.sketches))
    return replace(job, tensors=tuple(tensor(t) for t in job.tensors))
