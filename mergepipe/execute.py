"""The driver of an execution: open and check the recorded inputs, take the destination's lock,
prepare the staging folder (resuming what a killed run journaled), run the file jobs on an executor,
run each stage over the merged files, complete the manifest and publish atomically."""

from __future__ import annotations

import dataclasses
import os
import re
import resource
import shutil
import time
from datetime import datetime, timezone
from pathlib import Path

import xxhash

from . import __version__, stages
from .checkpoint import Reader
from .errors import InputChangedError, IOFailure, MergepipeError
from .executor import LocalExecutor, RunEnv
from .journal import Journal, Record, read_records
from .manifest import Execution, Manifest, OutputFile, dumps
from .options import RunOptions
from .outputs import write_card, write_sidecars
from .publish import Staging, check_space, destination_lock, discard, prepare_destination, publish, staging_for
from .sink import Resume, hash_file, recover
from .sources import OpenedModel, open_recorded
from .worker import FileJob, FileResult, build_jobs, cuts, first_block, kernels

MANIFEST_NAME = "mergepipe.manifest.json"
SCRATCH = ".mergepipe-scratch"  # in the staging folder: spill files of parts that run in parallel


def check_device(device: str) -> str:
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


def plan_key(m: Manifest, dev) -> str:
    """What fixes the output bytes: the plan, the device and the tool version. Names the staging
    folder, so that only a rerun of the same merge resumes from it."""
    doc = dataclasses.asdict(m)
    doc["execution"] = None
    h = xxhash.xxh3_128()
    h.update(dumps(doc).encode())
    h.update(f"|{dev}|{__version__}".encode())
    return h.hexdigest()[:16]


@dataclasses.dataclass
class _Run:
    """One execution's state, from the opened inputs to the completed manifest."""
    m: Manifest
    opts: RunOptions
    dev: str
    opened: list[OpenedModel]
    jobs: list[FileJob]
    key: str
    t0: float
    io0: int | None


def _prepare(m: Manifest, opts: RunOptions) -> _Run:
    t0, io0 = time.perf_counter(), _os_read_bytes()
    dev = check_device(opts.device)
    opened = open_recorded([m.base, *m.experts], opts.root_path, opts.allow_pickle)
    if len(opened) - 1 != len(m.operator.expert_params):
        raise MergepipeError("manifest: operator.expert_params does not match the experts")
    for st in m.stages:  # a changed calibration file stops the run before anything is written
        problems = stages.get(st.kind).input_problems(_record(st, len(opened) - 1), opened[0].model.root,
                                                      opts.root_path)
        if problems:
            raise InputChangedError(problems[0])
    return _Run(m, opts, dev, opened, build_jobs(m, opened), plan_key(m, dev), t0, io0)


def _record(st, experts: int):
    return stages.get(st.kind).load(st.record, f"manifest: stage {st.kind}", experts)


def execute(m: Manifest, out: str | Path, options: RunOptions | None = None, **flags) -> Manifest:
    """Run the manifest and publish OUT atomically. Options come as a RunOptions or as its fields by
    keyword. A run killed or failed on I/O (or interrupted) leaves its journaled work in a staging
    folder beside OUT, and the next run of the same manifest to OUT resumes it."""
    run = _prepare(m, options or RunOptions(**flags))
    out = Path(out).resolve()
    with destination_lock(out):
        staging = prepare_destination(out, run.opts.force, run.key)
        reader = Reader()
        try:
            done = _merge_and_stages(run, staging, reader)
            reader.check_unchanged(own=staging.folder)
            write_card(done, staging.folder, out)
            done.save(staging.folder / MANIFEST_NAME)
            publish(staging, out)
            return done
        except OSError as e:
            raise IOFailure(f"{e.filename or staging.folder}: {e.strerror or e}; the work done so far is kept in "
                            f"{staging.folder} for a rerun to resume") from None
        except (IOFailure, KeyboardInterrupt):
            if not read_records(staging.journal, run.key):
                discard(staging)  # nothing worth keeping
            raise
        except BaseException:
            discard(staging)  # bad input: the plan cannot complete, its partial output is no use
            raise
        finally:
            reader.close()


def make_executor(opts: RunOptions):
    if opts.executor == "local":
        return LocalExecutor()
    if opts.executor == "ray":
        from .ray_executor import RayExecutor
        return RayExecutor(opts)
    raise MergepipeError(f"executor {opts.executor!r} is not supported (expected local or ray)")


def _merge_and_stages(run: _Run, staging: Staging, reader: Reader) -> Manifest:
    executor = make_executor(run.opts)
    parts = executor.parts(run.jobs)
    resumes, kept = _resume(run, staging, parts, read_records(staging.journal, run.key))
    resumed = sum(r.done for r in resumes.values())
    check_space(staging.folder, sum(j.layout.size for j in run.jobs) - resumed)
    allow = run.opts.allow_nonfinite or run.m.plan.allow_nonfinite
    if run.dev != "cpu":
        import torch
        torch.cuda.reset_peak_memory_stats(run.dev)
    with executor.session():
        journal = Journal(staging.journal, run.key, kept)
        try:
            ran = executor.run_all(parts, resumes, RunEnv(staging.folder, journal, reader, run.dev, allow,
                                                          run.opts.progress))
        finally:
            journal.close()
    shutil.rmtree(staging.folder / SCRATCH, ignore_errors=True)  # a killed part's spill files: not output
    results = {p.key: ran[p.key].result for p in parts}
    outputs = _outputs(run, parts, results, staging, executor.read_back) if executor.shared else {
        k[0]: r.output for k, r in results.items()}
    write_sidecars(run.m, [o.model.root for o in run.opened], staging.folder)
    if len(run.jobs) > 1 or any("/" in j.layout.name for j in run.jobs):
        _write_index(staging.folder, [j.layout for j in run.jobs])
    diagnostics = {k: v for r in results.values() for k, v in r.meta.items()}
    before = dict(reader.bytes_read)
    stage_reads = run_stages(run.m, run.opened, staging.folder, reader, run.dev, run.opts.root_path, diagnostics)
    if run.m.stages:  # the stages rewrote tensors in place
        outputs = {j.layout.name: OutputFile(j.layout.size, *hash_file(staging.folder / j.layout.name, j.layout))
                   for j in run.jobs}
    read = _bytes_read(run, results, reader, before)
    done = _complete(run, outputs, read, resumed, dict(sorted(diagnostics.items())) or None)
    if stage_reads:
        done.execution.stage_bytes_read = stage_reads
    done.execution.executor, done.execution.jobs = executor.name, [ran[p.key].run for p in parts]
    return done


def run_stages(m: Manifest, opened: list[OpenedModel], folder: Path, reader: Reader, dev: str,
               root: Path | None, diagnostics: dict) -> dict[str, int]:
    """Run the manifest's stages over the merged files in `folder`, in order; their per-tensor
    diagnostics merged into `diagnostics`. Returns the expert bytes each stage kind read."""
    experts = [o.model for o in opened[1:]]
    names = {str(fh.path) for e in experts for fh in e.files}
    stage_reads: dict[str, int] = {}
    for st in m.stages:
        ctx = stages.StageContext(opened[0].model, experts, folder, reader, dev, root)
        snap = dict(reader.bytes_read)
        for name, d in stages.get(st.kind).run(_record(st, len(experts)), ctx).diagnostics.items():
            diagnostics[name] = {**diagnostics.get(name, {}), **d}
        stage_reads[st.kind] = stage_reads.get(st.kind, 0) + sum(
            n - snap.get(path, 0) for path, n in reader.bytes_read.items() if path in names)
    return stage_reads


def _outputs(run: _Run, parts: list[FileJob], results: dict[tuple[str, int], FileResult], staging: Staging,
             read_back: dict[str, OutputFile]) -> dict[str, OutputFile]:
    """The output files as the disk holds them, each part checked against what its worker reported:
    workers elsewhere wrote them through a shared file system, and only what is on disk is published.
    `read_back`: files the executor has already read back (elsewhere, in parallel); the others are
    read here."""
    outputs = {}
    for job in run.jobs:
        path = staging.folder / job.layout.name
        disk = read_back.get(job.layout.name)
        size, (file_hash, tensors) = (disk.size, (disk.hash, disk.tensors)) if disk else (
            path.stat().st_size, hash_file(path, job.layout))
        for part in (p for p in parts if p.layout.name == job.layout.name):
            reported = results[part.key].output.tensors
            bad = next((t for t in part.out_tensors if reported.get(t.name) != tensors[t.name]), None)
            if size != job.layout.size or bad is not None:
                raise IOFailure(f"{path}: {part.label()} does not hold what its worker wrote"
                                f" ({'tensor ' + repr(bad.name) if bad else f'{size} bytes, expected {job.layout.size}'});"
                                f" the shared file system lost or changed it; the staging folder {staging.folder} is kept")
        outputs[job.layout.name] = OutputFile(size, file_hash, tensors)
    return outputs


def _resume(run: _Run, staging: Staging, parts: list[FileJob],
            records: list[Record]) -> tuple[dict[tuple[str, int], Resume], list[Record]]:
    """Per part of an output file, the bytes a previous run journaled and the disk still holds; and
    the journal records to keep (those verified), in journal order."""
    by_file: dict[str, list[Record]] = {}
    for rec in records:
        by_file.setdefault(rec.file, []).append(rec)
    resumes, kept = {}, set()
    for job in parts:
        mine = [r for r in by_file.get(job.layout.name, ()) if job.start <= r.start < job.end]
        res = recover(staging.folder / job.layout.name, job.layout, cuts(job, kernels(job, run.dev, staging.folder)),
                      mine, (job.start, job.end))
        resumes[job.key] = res
        kept |= {id(r) for r in res.kept}
    return resumes, [r for r in records if id(r) in kept]


def pending_read_bytes(m: Manifest, out: str | Path, options: RunOptions | None = None, **flags) -> tuple[int, int]:
    """(input bytes a run of `m` to `out` would read now, given the work a killed run journaled; what
    a fresh run reads). Reads only headers and the journaled output prefix, writes nothing."""
    run = _prepare(m, options or RunOptions(**flags))
    staging = staging_for(Path(out).resolve(), run.key)
    parts = make_executor(run.opts).parts(run.jobs)
    resumes, _ = _resume(run, staging, parts, read_records(staging.journal, run.key))
    pending = total = 0
    for job in parts:
        for i, t in enumerate(job.tensors):
            first = first_block(job, resumes[job.key], i)
            for b in range(t.n_blocks):
                n = sum(r.end - r.start for r in t.reads(b))
                total += n
                pending += n if b >= first else 0
    return pending, total


def _bytes_read(run: _Run, results: dict[str, FileResult], reader: Reader, before: dict) -> dict[str, dict[str, int]]:
    """Bytes read per (model, file) as the manifest records them: the merge's counts, and what the
    stages read of the inputs through the reader (their reads of the merged output are not inputs)."""
    refs = [o.ref for o in run.opened]
    read: dict[str, dict[str, int]] = {}
    for r in results.values():
        for (model, name), n in r.bytes_read.items():
            per = read.setdefault(refs[model + 1], {})
            per[name] = per.get(name, 0) + n
    paths = {str(fh.path): (o.ref, os.path.relpath(fh.path, o.model.root)) for o in run.opened for fh in o.model.files}
    for path, n in reader.bytes_read.items():
        extra = n - before.get(path, 0)
        if extra and path in paths:
            ref, name = paths[path]
            read.setdefault(ref, {})[name] = read.get(ref, {}).get(name, 0) + extra
    return {ref: dict(sorted(files.items())) for ref, files in sorted(read.items())}


def _write_index(staging: Path, files: list) -> None:
    """model.safetensors.index.json from the plan's layouts (the files' headers, just written, are not
    read back: their pages are not in the page cache after direct I/O)."""
    import json
    weight_map = {t.name: f.name for f in files for t in f.tensors}
    index = {"metadata": {"total_size": sum(t.nbytes for f in files for t in f.tensors)},
             "weight_map": dict(sorted(weight_map.items()))}
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


def _complete(run: _Run, outputs: dict[str, OutputFile], read: dict[str, dict[str, int]], resumed: int,
              diagnostics: dict | None) -> Manifest:
    base_ref = run.opened[0].ref
    io1 = _os_read_bytes()
    peak_dev, device = 0, run.dev
    if run.dev != "cpu":
        import torch
        peak_dev, device = torch.cuda.max_memory_allocated(run.dev), f"{run.dev} ({torch.cuda.get_device_name(run.dev)})"
    execution = Execution(
        device=device,
        wall_s=round(time.perf_counter() - run.t0, 4),
        peak_rss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        peak_device_bytes=int(peak_dev),
        bytes_read=read,
        expert_bytes_read=sum(n for ref, files in read.items() if ref != base_ref for n in files.values()),
        base_bytes_read=sum(read.get(base_ref, {}).values()),
        os_read_bytes=(io1 - run.io0) if run.io0 is not None and io1 is not None else None,
        outputs=outputs,
        root_hash=root_hash(outputs),
        finished_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        resumed_bytes=resumed,
        diagnostics=diagnostics,
    )
    return dataclasses.replace(run.m, execution=execution)
