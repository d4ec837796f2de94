"""Execution: stream the planned byte ranges, merge block by block in float32 on the chosen device,
write each output tensor at its final offset, and publish atomically with a completed manifest.

The unit of work is a TensorJob (what to read, the operator, where the result goes): pure enough
that a distributed engine could run the jobs of one output file elsewhere and publish once.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import gc
import itertools
import os
import re
import resource
import shutil
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import numpy as np
import xxhash

from . import __version__
from . import blocks as B
from . import floats
from .checkpoint import COPIED_FILES, DTYPES, Model, Reader, TensorInfo, check_family, nonfinite, open_model
from .errors import InputChangedError, IOFailure, MergepipeError
from .journal import Journal, Record, read_records
from .manifest import Execution, InputModel, Manifest, OutputFile, dumps, runs_to_set
from .operators import get as get_operator, ta
from .publish import (OutFile, Staging, check_space, destination_lock, discard, layout, prepare_destination,
                      publish, staging_for)
from .sink import Resume, Sink, open_output, recover

MANIFEST_NAME = "mergepipe.manifest.json"
LOOKAHEAD = 3  # jobs whose byte ranges are announced to the kernel (WILLNEED) before they are read
# Test-only hook: sleep this many milliseconds per output tensor, so that the fault-injection tests
# can kill a run of a tiny family mid-way. Not for users.
SLOW_ENV = "MERGEPIPE_TEST_SLOW_MS"


@dataclass(frozen=True)
class TensorJob:
    name: str
    base: TensorInfo
    experts: tuple[TensorInfo, ...]
    selected: tuple[frozenset[int], ...]  # per expert: blocks to read
    trim: tuple[tuple[int, int, int], ...] | None  # TIES: per expert (bin, above, need)
    out_dtype: str
    whole: bool = False  # GCWM: merged from whole tensors, not block by block


def resolve_ref(ref: str, root: Path | None) -> str:
    p = Path(ref).expanduser()
    if not p.is_absolute() and root is not None and (root / p).exists():
        return str(root / p)
    return ref


def open_inputs(m: Manifest, root: Path | None, allow_pickle: bool) -> tuple[Model, list[Model]]:
    """Open the recorded inputs and check each file's size and header against the manifest (reads
    headers only; block contents are checked as they stream)."""
    models = []
    for rec in [m.base, *m.experts]:
        model = open_model(resolve_ref(rec.ref, root), allow_pickle)
        by_name = {os.path.relpath(fh.path, model.root): fh for fh in model.files}
        for f in rec.files:
            fh = by_name.get(f.name)
            if fh is None:
                raise InputChangedError(f"{model.root / f.name}: input file recorded in the manifest is missing")
            if fh.size != f.size or fh.header_hash != f.header_hash:
                raise InputChangedError(f"{fh.path}: changed since planning (expected {f.size} bytes, header {f.header_hash})")
        models.append(model)
    check_family(models[0], models[1:])  # a hand-edited manifest can pair models that do not fit
    return models[0], models[1:]


def expected_hashes(rec: InputModel, model: Model) -> dict[tuple[str, str], np.ndarray]:
    """(file, tensor) -> the recorded hash of each block; refuses records that do not fit the file."""
    out = {}
    headers = {os.path.relpath(fh.path, model.root): fh for fh in model.files}
    for f in rec.files:
        fh = headers.get(f.name)
        if fh is None:
            raise InputChangedError(f"{model.root / f.name}: input file recorded in the manifest is missing")
        for tensor, hx in f.blocks.items():
            info = fh.tensors.get(tensor)
            nb = B.n_blocks(info.shape) if info is not None else 0
            try:
                hashes = np.frombuffer(bytes.fromhex(hx), dtype=">u8").astype(np.uint64)
            except ValueError:
                hashes = None
            if info is None or hashes is None or len(hashes) != nb:
                raise MergepipeError(f"manifest: block hashes of tensor {tensor!r} of {fh.path} do not fit "
                                     f"the file (expected {nb} hashes of 16 hex digits)")
            out[(str(fh.path), tensor)] = hashes
    return out


def build_jobs(m: Manifest, base: Model, experts: list[Model]) -> list[tuple[OutFile, list[TensorJob]]]:
    files = []
    single = len(base.files) == 1
    for fh in base.files:
        infos = sorted(fh.tensors.values(), key=lambda i: i.start)
        jobs = []
        for info in infos:
            tp = m.plan.tensors.get(info.name)
            out_dtype = m.out_dtype if (m.out_dtype and info.is_float) else info.dtype
            if tp is None:
                if info.is_float:
                    raise MergepipeError(f"manifest: plan has no entry for floating tensor {info.name!r}")
                jobs.append(TensorJob(info.name, info, (), (), None, out_dtype))
                continue
            if tp.blocks != B.n_blocks(info.shape):
                raise MergepipeError(f"manifest: plan.tensors.{info.name} has {tp.blocks} blocks, the base tensor {B.n_blocks(info.shape)}")
            jobs.append(TensorJob(info.name, info, tuple(e.tensors[info.name] for e in experts),
                                  tuple(frozenset(runs_to_set(r)) for r in tp.selected),
                                  tuple(tuple(t) for t in tp.trim) if tp.trim else None, out_dtype,
                                  whole=m.operator.name == "gcwm" and any(tp.selected)))
        name = "model.safetensors" if single else os.path.relpath(fh.path, base.root)
        files.append((layout(name, [(j.name, j.out_dtype, j.base.shape) for j in jobs]), jobs))
    return files


def plan_key(m: Manifest, dev) -> str:
    """What fixes the output bytes: the plan, the device and the tool version. Names the staging
    folder, so that only a rerun of the same merge resumes from it."""
    doc = dataclasses.asdict(m)
    doc["execution"] = None
    h = xxhash.xxh3_128()
    h.update(dumps(doc).encode())
    h.update(f"|{dev}|{__version__}".encode())
    return h.hexdigest()[:16]


def execute(m: Manifest, out: str | Path, device: str = "cpu", force: bool = False,
            root: str | Path | None = None, allow_pickle: bool = False,
            progress: Callable[[int], None] | None = None, allow_nonfinite: bool = False) -> Manifest:
    """Run the manifest and publish OUT atomically. A run killed or failed on I/O leaves its journaled
    work in a staging folder beside OUT, and the next run of the same manifest to OUT resumes it."""
    if m.calibration is not None:
        from .featcal.stage import execute_calibrated
        return execute_calibrated(m, out, device, force, root, allow_pickle, progress, allow_nonfinite)
    t0 = time.perf_counter()
    io0 = _os_read_bytes()
    _keep_freed_memory()
    dev = _device(device)
    out = Path(out).resolve()
    root = Path(root) if root else None
    base, experts = open_inputs(m, root, allow_pickle)
    if len(experts) != len(m.operator.expert_params):
        raise MergepipeError("manifest: operator.expert_params does not match the experts")
    op = get_operator(m.operator.name)
    want = expected_hashes(m.base, base)
    for rec, e in zip(m.experts, experts):
        want.update(expected_hashes(rec, e))
    files = build_jobs(m, base, experts)
    key = plan_key(m, dev)
    with destination_lock(out):
        staging = prepare_destination(out, force, key)
        reader = Reader()
        try:
            return _run(m, out, staging, key, files, base, experts, op, reader, want, dev, progress,
                        allow_nonfinite, t0, io0)
        except (IOFailure, KeyboardInterrupt):
            if not read_records(staging.journal, key):
                discard(staging)  # nothing worth keeping
            raise
        except BaseException:
            discard(staging)  # bad input: the plan cannot complete, its partial output is no use
            raise
        finally:
            reader.close()


def _run(m: Manifest, out: Path, staging: Staging, key: str, files, base: Model, experts: list[Model], op,
         reader: Reader, want: dict, dev: str, progress, allow_nonfinite: bool, t0: float,
         io0: int | None) -> Manifest:
    if dev != "cpu":
        import torch
        torch.cuda.reset_peak_memory_stats(dev)
    try:
        resumes, kept = _resume(staging, files, read_records(staging.journal, key))
        resumed = sum(r.prefix for r in resumes.values())
        check_space(staging.folder, sum(f.size for f, _ in files) - resumed)
        journal = Journal(staging.journal, key, kept)
        try:
            outputs, diagnostics = {}, {}
            with _streaming():
                for ofile, jobs in files:
                    outputs[ofile.name], meta = _write_file(staging.folder, ofile, jobs, m, op, reader, want, dev,
                                                            progress, journal, resumes[ofile.name], allow_nonfinite)
                    diagnostics.update(meta)
        finally:
            journal.close()
        _copy_sidecars(base.root, staging.folder, m.out_dtype)
        done = _complete(m, outputs, base, experts, reader, dev, time.perf_counter() - t0, io0, resumed,
                         dict(sorted(diagnostics.items())) or None)
        done.save(staging.folder / MANIFEST_NAME)
        publish(staging, out)
    except OSError as e:
        raise IOFailure(f"{e.filename or staging.folder}: {e.strerror or e}; the work done so far is kept in "
                        f"{staging.folder} for a rerun to resume") from None
    return done


def _resume(staging: Staging, files: list[tuple[OutFile, list[TensorJob]]],
            records: list[Record]) -> tuple[dict[str, Resume], list[Record]]:
    """Per output file, the prefix a previous run journaled and the disk still holds; and the
    journal records to keep (those up to the first that fails)."""
    resumes, used, intact = {}, 0, True
    for ofile, jobs in files:
        mine = []
        while intact and used + len(mine) < len(records) and records[used + len(mine)].file == ofile.name:
            mine.append(records[used + len(mine)])
        res = recover(staging.folder / ofile.name, ofile, _cuts(ofile, jobs), mine)
        resumes[ofile.name] = res
        used += res.records
        intact = intact and res.records == len(mine)
    return resumes, records[:used]


def pending_read_bytes(m: Manifest, out: str | Path, device: str = "cpu", root: str | Path | None = None,
                       allow_pickle: bool = False) -> tuple[int, int]:
    """(input bytes a run of `m` to `out` would read now, given the work a killed run journaled; what
    a fresh run reads). Reads only headers and the journaled output prefix, writes nothing."""
    out = Path(out).resolve()
    base, experts = open_inputs(m, Path(root) if root else None, allow_pickle)
    files = build_jobs(m, base, experts)
    key = plan_key(m, _device(device))
    staging = staging_for(out, key)
    resumes, _ = _resume(staging, files, read_records(staging.journal, key))
    pending = total = 0
    for ofile, jobs in files:
        res = resumes[ofile.name]
        for job, ot in zip(jobs, ofile.tensors):
            first = len(B.blocks(job.base))  # done: nothing to read
            if ot.name not in res.tensor_hashes:
                first = 0
                if res.partial is not None and res.partial[0] == ot.name:
                    first = _block_at(ot, res.prefix)
            for b, reads in _read_plan(job):
                n = sum(blk.end - blk.start for _, _, blk in reads)
                total += n
                pending += n if b >= first else 0
    return pending, total


def _block_at(ot, offset: int) -> int:
    """The block of output tensor `ot` that starts at byte `offset`: where a cut tensor resumes."""
    return next(blk.index for blk in B.blocks(_out_info(ot, Path())) if blk.start == offset)


def _out_info(ot, path: Path) -> TensorInfo:
    return TensorInfo(ot.name, path, ot.dtype, ot.shape, ot.offset, ot.offset + ot.nbytes)


def _cuts(ofile: OutFile, jobs: list[TensorJob]) -> dict[str, set[int]]:
    """Where a journal record may end inside a tensor: block boundaries of tensors merged block by
    block; none inside a TIES tensor, whose bytes are patched after its last block, or a GCWM one,
    computed from the whole tensor."""
    return {ot.name: {blk.end for blk in B.blocks(_out_info(ot, Path(ofile.name)))}
            for ot, job in zip(ofile.tensors, jobs) if job.trim is None and not job.whole}


def _device(device: str) -> str:
    """The device's name, checked; torch is imported only for a GPU."""
    if device == "cpu":
        return device
    if not re.fullmatch(r"cuda(:\d+)?", device):
        raise MergepipeError(f"device {device!r} is not supported (expected cpu, cuda or cuda:N)")
    import torch
    if not torch.cuda.is_available():
        raise MergepipeError(f"device {device!r} requested but no CUDA GPU is available")
    if ":" in device and int(device.split(":")[1]) >= torch.cuda.device_count():
        raise MergepipeError(f"device {device!r} requested but only {torch.cuda.device_count()} CUDA GPU(s) are visible")
    return device


def _keep_freed_memory() -> None:
    """Ask glibc to keep freed memory for reuse instead of returning it to the kernel (for the rest of
    the process: a library caller keeps that memory mapped, and reuses it). Every block
    allocates and frees a few MiB on several threads; returned and faulted in again, those pages cost
    a quarter of a task-arithmetic run on this project's VMs (0.5B family: 4.3 s without, 3.3 s with)."""
    try:
        import ctypes
        libc = ctypes.CDLL(None)
        libc.mallopt(-1, 1 << 30)  # M_TRIM_THRESHOLD
        libc.mallopt(-3, 64 << 20)  # M_MMAP_THRESHOLD: block buffers come from the heap
    except (OSError, AttributeError):  # not glibc: nothing to tune
        pass


@contextlib.contextmanager
def _streaming():
    """How the stream runs best: torch (where a path imported it) single-threaded, see
    tensors.single_threaded_torch; and no cyclic garbage collection, since the stream allocates many
    short-lived containers per block and each collection walks every object the imports left (0.3 s
    a run with torch loaded), while the stream makes no cycles worth collecting before it ends."""
    gc_was = gc.isenabled()
    gc.disable()
    try:
        if "torch" in sys.modules:
            from .tensors import single_threaded_torch
            with single_threaded_torch():
                yield
        else:
            yield
    finally:
        if gc_was:
            gc.enable()


def _torch_device(dev: str):
    import torch
    return torch.device(dev)


def _write_file(staging: Path, ofile: OutFile, jobs: list[TensorJob], m: Manifest, op, reader: Reader,
                want: dict, dev: str, progress, journal: Journal, resume: Resume,
                allow_nonfinite: bool) -> OutputFile:
    path = staging / ofile.name
    path.parent.mkdir(parents=True, exist_ok=True)
    slow = float(os.environ.get(SLOW_ENV) or 0) / 1000
    inputs = _Inputs(reader, want, allow_nonfinite)
    # truncated to the resumed prefix: drops whatever the previous run wrote past its last good record
    # direct unless a TIES tensor too large to patch in memory needs patching in the file
    direct = all(j.trim is None or _ties_in_memory(j) for j in jobs)
    with open_output(path, resume.prefix, direct=direct) as f:
        sink = Sink(f, ofile.name, journal, resume)

        def done(job: TensorJob, ot) -> None:
            if sink._end != ot.offset + ot.nbytes:
                raise RuntimeError(f"internal: {job.name} ends at {sink._end}, expected {ot.offset + ot.nbytes}")
            if slow:
                sink.flush()
                time.sleep(slow)

        try:
            if not resume.prefix:
                sink.write(np.frombuffer(ofile.header, np.uint8))
                sink.checkpoint("")
            todo = []  # (job, output tensor, first block) still to write, in file order
            for job, ot in zip(jobs, ofile.tensors):
                if op.name == "ties" and job.trim is None and job.experts:
                    raise MergepipeError(f"manifest: plan.tensors.{job.name} lacks the trim thresholds {op.name} needs")
                if ot.name in resume.tensor_hashes:
                    continue
                first = 0
                if resume.partial is not None and resume.partial[0] == ot.name:
                    first = _block_at(ot, resume.prefix)
                todo.append((job, ot, first))
            for blockwise, group in itertools.groupby(todo, key=lambda t: t[0].trim is None and not t[0].whole):
                if blockwise:  # one pipeline across tensors: no drain at each (mostly one-block) tensor
                    _write_blocks(list(group), m, op is ta.TA, dev, inputs, sink, progress, done)
                    continue
                for job, ot, first in group:
                    sink.begin(ot.name, ot.offset)
                    stream = inputs.stream(_read_plan(job, first), verify=True)
                    guard = functools.partial(inputs.guard, job)
                    if job.trim is not None:
                        from .ties_stream import ties_tensor
                        ties_tensor(job, m.operator, stream, _torch_device(dev), sink, staging / ".deferred",
                                    progress, guard)
                    else:
                        from .gcwm_stream import gcwm_tensor
                        gcwm_tensor(job, m.operator, stream, _torch_device(dev), sink, progress, guard)
                    done(job, ot)
        finally:
            size = sink.close()
    assert size == ofile.size
    out = OutputFile(ofile.size, sink.file_hash.hexdigest(), {t.name: sink.tensor_hashes[t.name] for t in ofile.tensors})
    return out, sink.meta


def _ties_in_memory(job: TensorJob) -> bool:
    from .ties_stream import patched_in_memory
    return patched_in_memory(job)


def _read_plan(job: TensorJob, first: int = 0) -> list[tuple[int, list[tuple[int, TensorInfo, B.Block]]]]:
    """Per block from `first`: the ranges to read, base first (-1), then the selected experts in order."""
    plan = []
    for b in range(first, B.n_blocks(job.base.shape)):
        reads = [(-1, job.base, B.block(job.base, b))]
        reads += [(k, info, B.block(info, b)) for k, info in enumerate(job.experts) if b in job.selected[k]]
        plan.append((b, reads))
    return plan


class _Inputs:
    """The planned input blocks: read ahead of use, checked against the manifest's hashes, and the
    guard that turns a non-finite result into a clear error."""

    def __init__(self, reader: Reader, want: dict, allow_nonfinite: bool) -> None:
        self.reader, self.want, self.allow_nonfinite = reader, want, allow_nonfinite

    def check(self, b: int, reads, raws) -> None:
        for (_, info, _), raw in zip(reads, raws):
            exp = self.want.get((str(info.file), info.name))
            if exp is None or xxhash.xxh3_64_intdigest(raw) != int(exp[b]):
                raise InputChangedError(f"{info.file}: changed since planning (block {b} of tensor {info.name!r} "
                                        "does not match its recorded hash)")

    def stream(self, plan: list, verify: bool):
        """read_ahead over plan items (..., b, reads), hinting the kernel LOOKAHEAD items ahead;
        verify: check hashes on the reader thread (else the consumer calls check)."""
        def hint(i: int) -> None:
            if i < len(plan):
                for _, info, blk in plan[i][-1]:
                    self.reader.prefetch(info.file, blk.start, blk.end)

        for i in range(min(LOOKAHEAD, len(plan))):
            hint(i)

        def load(i: int):
            *_, b, reads = plan[i]
            hint(i + LOOKAHEAD)
            raws = [self.reader.read(info.file, blk.start, blk.end) for _, info, blk in reads]
            if verify:
                self.check(b, reads, raws)
            return raws

        for i, raws in B.read_ahead(range(len(plan)), load):
            yield plan[i], raws

    def guard(self, job: TensorJob, b: int, reads, raws, finite: bool) -> None:
        """A NaN or Inf in any input of a merged block reaches the result, so one check of the result
        replaces a scan of every input; only a hit looks at the inputs."""
        if self.allow_nonfinite or finite:
            return
        for (_, info, _), raw in zip(reads, raws):
            if info.is_float and nonfinite(raw, info.dtype):
                raise MergepipeError(f"{info.file}: block {b} of tensor {info.name!r} holds NaN or Inf "
                                     "(pass --allow-nonfinite to merge it anyway)")
        raise MergepipeError(f"tensor {job.name!r}: block {b} of the merge overflows {job.out_dtype} "
                             "(check the weights; pass --allow-nonfinite to write it anyway)")


def _write_blocks(group: list, m: Manifest, merge: bool, dev: str, inputs: _Inputs, sink: Sink, progress,
                  done: Callable) -> None:
    """Tensors merged block by block, (job, output tensor, first block) in file order: blocks are
    independent, so they are computed on a small pool and written in order."""
    kernels = [_block_kernel(job, m, merge, dev, functools.partial(inputs.guard, job)) for job, _, _ in group]

    def compute(i: int, b: int, reads, raws) -> np.ndarray:
        inputs.check(b, reads, raws)  # here, not in the reader: the pool's threads share the hashing
        job = group[i][0]
        if len(raws) == 1 and job.out_dtype == job.base.dtype:  # no expert here: the base block as is
            return raws[0]
        return kernels[i](b, reads, raws)

    plan = [(i, b, reads) for i, (job, _, first) in enumerate(group) for b, reads in _read_plan(job, first)]
    current = -1
    for ((i, _, _), raws), data in B.in_order(dev, compute, inputs.stream(plan, verify=False)):
        job, ot, _ = group[i]
        if i != current:
            if current >= 0:
                sink.end(group[current][0].name)
                done(*group[current][:2])
            sink.begin(ot.name, ot.offset)
            current = i
        sink.write(data)
        sink.block_done(job.name)
        if progress:
            progress(sum(len(r) for r in raws))
    if current >= 0:
        sink.end(group[current][0].name)
        done(*group[current][:2])


def _block_kernel(job: TensorJob, m: Manifest, merge: bool, dev: str, guard) -> Callable:
    """compute(b, reads, raws) -> output bytes of one block that holds a read expert or needs a cast:
    task arithmetic, or with merge False (GCWM's non-target tensors) a cast of the base. numpy on the CPU; torch on a GPU or for dtypes
    numpy lacks (float64, float8)."""
    weights = [p["weight"] for p in m.operator.expert_params]
    lam, normalize = m.operator.params.get("lambda", 1.0), m.operator.params.get("normalize", False)
    dtypes = {job.base.dtype, job.out_dtype, *(e.dtype for e in job.experts)}
    if dev == "cpu" and dtypes <= floats.ITEMSIZE.keys():
        def compute(b: int, reads, raws) -> np.ndarray:
            if not merge:
                return floats.cast(raws[0], job.base.dtype, job.out_dtype)
            out, finite = ta.merge_numpy(raws[0], job.base.dtype,
                                         [(raw, info.dtype) for (_, info, _), raw in zip(reads[1:], raws[1:])],
                                         [weights[k] for k, _, _ in reads[1:]], weights, lam, normalize, job.out_dtype)
            guard(b, reads, raws, finite)
            return out
        return compute

    import torch
    from .tensors import all_finite, raw_view, to_bytes, torch_dtype
    tdev, out_t = _torch_device(dev), torch_dtype(job.out_dtype)

    def compute_torch(b: int, reads, raws) -> np.ndarray:
        base_v = raw_view(raws[0], job.base.dtype, (-1,), tdev)
        if not merge:
            return to_bytes(base_v.to(out_t))
        out = torch.empty(base_v.numel(), dtype=out_t, device=tdev)
        experts = [raw_view(raw, info.dtype, (-1,), tdev) for (_, info, _), raw in zip(reads[1:], raws[1:])]
        ta.merge_into(out, base_v, experts, [weights[k] for k, _, _ in reads[1:]], weights, lam, normalize)
        guard(b, reads, raws, all_finite(out))
        return to_bytes(out)
    return compute_torch


def _copy_sidecars(src: Path, staging: Path, out_dtype: str | None) -> None:
    """config and tokenizer files, so the output loads with transformers' from_pretrained."""
    import json
    for name in COPIED_FILES:
        p = src / name
        if not p.is_file():
            continue
        if name == "config.json" and out_dtype:
            try:
                cfg = json.loads(p.read_text())
                for key in ("torch_dtype", "dtype"):
                    if key in cfg:
                        cfg[key] = DTYPES[out_dtype][0]
                (staging / name).write_text(json.dumps(cfg, indent=2))
                continue
            except (json.JSONDecodeError, AttributeError):
                pass
        shutil.copyfile(p, staging / name)
    if any(staging.glob("*/*.safetensors")) or len(list(staging.glob("*.safetensors"))) > 1:
        _write_index(staging)


def _write_index(staging: Path) -> None:
    import json
    from .checkpoint import read_header
    weight_map, total = {}, 0
    for p in sorted(staging.rglob("*.safetensors")):
        fh = read_header(p)
        for name, info in fh.tensors.items():
            weight_map[name] = os.path.relpath(p, staging)
            total += info.end - info.start
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (staging / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def _os_read_bytes() -> int | None:
    try:
        with open("/proc/self/io") as f:
            for line in f:
                if line.startswith("read_bytes:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def root_hash(outputs: dict[str, OutputFile]) -> str:
    h = xxhash.xxh3_128()
    for name in sorted(outputs):
        h.update(f"{name}:{outputs[name].hash}\n".encode())
    return h.hexdigest()


def _complete(m: Manifest, outputs: dict[str, OutputFile], base: Model, experts: list[Model],
              reader: Reader, dev: str, wall: float, io0: int | None, resumed: int = 0,
              diagnostics: dict | None = None) -> Manifest:
    base_files = {str(fh.path) for fh in base.files}
    read = dict(sorted(reader.bytes_read.items()))
    io1 = _os_read_bytes()
    peak_dev, device = 0, dev
    if dev != "cpu":
        import torch
        peak_dev, device = torch.cuda.max_memory_allocated(dev), f"{dev} ({torch.cuda.get_device_name(dev)})"
    execution = Execution(
        device=device,
        wall_s=round(wall, 4),
        peak_rss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        peak_device_bytes=int(peak_dev),
        bytes_read=read,
        expert_bytes_read=sum(v for k, v in read.items() if k not in base_files),
        base_bytes_read=sum(v for k, v in read.items() if k in base_files),
        os_read_bytes=(io1 - io0) if io0 is not None and io1 is not None else None,
        outputs=outputs,
        root_hash=root_hash(outputs),
        finished_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        resumed_bytes=resumed,
        diagnostics=diagnostics,
    )
    done = Manifest(**{**m.__dict__, "execution": execution})
    return done
