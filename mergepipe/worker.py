"""One output file, or one contiguous range of its tensors, as a pure job: its layout, the operator,
and per tensor the sources to read and the resolved parameters. `run_file` streams the job into the
staging folder and returns its hashes and the bytes it read. A FileJob is picklable, so an executor
may run it elsewhere; what only the running process has (the reader, the journal, the resume point)
comes in a WorkerContext.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from . import blocks as B
from . import operators
from .checkpoint import TensorInfo
from .errors import MergepipeError
from .journal import Journal
from .manifest import Manifest, OutputFile, runs_to_set, with_late_defaults
from .operators import Blockwise, TensorParams
from .publish import OutFile, layout
from .sink import Resume, Sink, open_output
from .sources import BlockInputs, OpenedModel, TensorSources, stream

# Test-only hook: sleep this many milliseconds per output tensor, so that the fault-injection tests
# can kill a run of a tiny family mid-way. Not for users.
SLOW_ENV = "MERGEPIPE_TEST_SLOW_MS"


@dataclass(frozen=True)
class FileJob:
    layout: OutFile
    operator: str
    tensors: tuple[TensorSources, ...]  # in file order: layout.tensors[first:first + len(tensors)]
    first: int = 0  # a part of the file starts at its tensor `first`; the part at 0 also writes the header

    @property
    def out_tensors(self) -> tuple:
        return self.layout.tensors[self.first:self.first + len(self.tensors)]

    @property
    def whole(self) -> bool:
        return self.first == 0 and len(self.tensors) == len(self.layout.tensors)

    @property
    def start(self) -> int:
        """The part's byte range in the file: [start, end)."""
        return 0 if self.first == 0 else self.layout.tensors[self.first].offset

    @property
    def end(self) -> int:
        last = self.first + len(self.tensors)
        return self.layout.size if last == len(self.layout.tensors) else self.layout.tensors[last].offset

    @property
    def key(self) -> tuple[str, int]:
        return self.layout.name, self.first

    def label(self) -> str:
        n = len(self.tensors)
        return self.layout.name if self.whole else f"{self.layout.name} tensors {self.first}-{self.first + n - 1}"


@dataclass
class FileResult:
    output: OutputFile  # of a part: its size and its tensors' hashes; the file's hash only when whole
    meta: dict[str, dict]  # per tensor, what its operator reported
    bytes_read: dict[tuple[int, str], int] = field(default_factory=dict)  # (model, recorded file) -> bytes


@dataclass
class WorkerContext:
    staging: Path
    journal: Journal
    resume: Resume
    reader: object  # checkpoint.Reader
    device: str
    allow_nonfinite: bool = False
    progress: Callable[[int], None] | None = None
    threads: int | None = None  # compute threads (None: blocks.compute_pool's default)
    reads: dict[tuple[int, str], int] = field(default_factory=dict)  # counted as the job reads
    scratch: Path | None = None  # where its kernels may spill (None: the staging folder)
    fence: Callable[[], None] | None = None  # raises once another attempt owns the job (see Sink)


def split(job: FileJob, part_bytes: int) -> list[FileJob]:
    """The job as contiguous parts of about `part_bytes` of output each (a tensor is never cut): the
    cut points depend on the layout alone, so a rerun finds the parts the journal names."""
    if job.layout.size <= part_bytes or len(job.tensors) < 2:
        return [job]
    parts, first, size = [], 0, 0
    for i, t in enumerate(job.layout.tensors):
        size += t.nbytes
        if size >= part_bytes and i + 1 < len(job.tensors):
            parts.append(FileJob(job.layout, job.operator, job.tensors[first:i + 1], first))
            first, size = i + 1, 0
    parts.append(FileJob(job.layout, job.operator, job.tensors[first:], first))
    return parts


def build_jobs(m: Manifest, opened: list[OpenedModel]) -> list[FileJob]:
    """The file jobs of a manifest: its plan's layout, or the base's (one file per base shard)."""
    base, experts = opened[0], opened[1:]
    if m.plan.layout is not None:
        return [_laid_out(m, f, opened) for f in m.plan.layout]
    files = []
    single = len(base.model.files) == 1
    for fh in base.model.files:
        tensors = []
        for info in sorted(fh.tensors.values(), key=lambda i: i.start):
            tensors.append(_tensor_sources(m, info, base, experts))
        name = "model.safetensors" if single else os.path.relpath(fh.path, base.model.root)
        files.append(FileJob(layout(name, [(t.name, t.out_dtype, t.shape) for t in tensors]), m.operator.name,
                             tuple(tensors)))
    return files


def _laid_out(m: Manifest, f, opened: list[OpenedModel]) -> FileJob:
    """One file of a plan's own layout: each tensor merged from its source tensor of every model, or
    (a stacked layer) copied from the one model it names, through its operator's kernel with no
    expert (the model's tensor stands as the base)."""
    tensors = []
    for e in f.tensors:
        if e.model is None:
            info = opened[0].model.tensors.get(e.source)
            if info is None:
                raise MergepipeError(f"manifest: plan.layout: the base has no tensor {e.source!r}")
            tensors.append(_tensor_sources(m, info, opened[0], opened[1:], e.name))
            continue
        src = opened[e.model + 1]
        info = src.model.tensors.get(e.source)
        if info is None:
            raise MergepipeError(f"manifest: plan.layout: {src.ref} has no tensor {e.source!r}")
        tensors.append(_tensor_sources(m, info, src, [], e.name, e.model))
    return FileJob(layout(f.name, [(t.name, t.out_dtype, t.shape) for t in tensors]), m.operator.name, tuple(tensors))


def _tensor_sources(m: Manifest, info, base: OpenedModel, experts: list[OpenedModel], name: str | None = None,
                    model: int = -1) -> TensorSources:
    """`info`: the input tensor, `name`: the output's (default: the same). `model`: whose tensor
    `base` holds (-1: the base's)."""
    name = name or info.name
    tp = m.plan.tensors.get(name)
    stored = base.stored(model, info.name)
    if tp is None:
        if info.is_float:
            raise MergepipeError(f"manifest: plan has no entry for floating tensor {name!r}")
        return TensorSources(name, info.shape, info.dtype, stored, (), (), None)
    def params(per_expert) -> TensorParams:
        shared, per = with_late_defaults(operators.get(m.operator.name), tp.params, list(per_expert))
        return TensorParams(shared, tuple(per))

    if tp.blocks != B.n_blocks(info.shape):
        raise MergepipeError(f"manifest: plan.tensors.{name} has {tp.blocks} blocks, the base tensor {B.n_blocks(info.shape)}")
    if model >= 0:  # a stacked layer of expert `model`: it stands as the base and as its one expert, unread
        return TensorSources(name, info.shape, m.out_dtype or info.dtype, stored, (stored,), (frozenset(),),
                             params([tp.expert_params[model]]), tp.data)
    if not experts:  # a stacked layer of the base: the operator's merge of the base alone
        return TensorSources(name, info.shape, m.out_dtype or info.dtype, stored, (), (),
                             params([]), tp.data)
    sketched = tuple(frozenset(runs_to_set(r)) for r in tp.sketched) if tp.sketched else ()
    sketches = tuple((e.sketch or {}).get(info.name) for e in experts) if sketched else ()
    if any(sel and sk is None for sel, sk in zip(sketched, sketches)):
        raise MergepipeError(f"manifest: plan.tensors.{name} fills blocks from a sketch its expert does not record")
    return TensorSources(name, info.shape, m.out_dtype or info.dtype, stored,
                         tuple(e.stored(k, info.name) for k, e in enumerate(experts)),
                         tuple(frozenset(runs_to_set(r)) for r in tp.selected),
                         params(tp.expert_params), tp.data, sketched, sketches)


def kernels(job: FileJob, dev: str, scratch: Path) -> list:
    """Each tensor's kernel: its operator's, or for a tensor it does not merge a copy of the base."""
    op = operators.get(job.operator)
    return [op.kernel(t, dev, scratch) if t.params is not None else Blockwise(t.name, BlockInputs.base_copy)
            for t in job.tensors]


def cuts(job: FileJob, ks: list) -> dict[str, set[int]]:
    """Where a journal record may end inside each tensor: its block boundaries where its kernel
    writes block by block; none inside one it patches or computes whole."""
    return {ot.name: {blk.end for blk in B.blocks(_out_info(ot))}
            for ot, k in zip(job.out_tensors, ks) if k.journal_blocks}


def first_block(job: FileJob, resume: Resume, i: int) -> int:
    """The first block of the job's tensor i still to write after `resume` (n_blocks if it is done)."""
    ot, t = job.out_tensors[i], job.tensors[i]
    if ot.name in resume.tensor_hashes:
        return t.n_blocks
    if resume.partial is not None and resume.partial[0] == ot.name:
        return next(blk.index for blk in B.blocks(_out_info(ot)) if blk.start == resume.prefix)
    return 0


def _out_info(ot) -> TensorInfo:
    return TensorInfo(ot.name, Path(), ot.dtype, ot.shape, ot.offset, ot.offset + ot.nbytes)


def run_file(job: FileJob, ctx: WorkerContext) -> FileResult:
    """Write the job's bytes of its output file, from ctx.resume on. A part of a file leaves the rest
    of the file as it is (other parts may be writing it at the same time)."""
    path = ctx.staging / job.layout.name
    path.parent.mkdir(parents=True, exist_ok=True)
    ks = kernels(job, ctx.device, ctx.scratch or ctx.staging)
    slow = float(os.environ.get(SLOW_ENV) or 0) / 1000
    read, outs = ctx.reads, job.out_tensors
    # truncated to the resumed prefix: drops whatever the previous run wrote past its last good record
    with open_output(path, ctx.resume.prefix, direct=not any(k.in_place for k in ks),
                     part=None if job.whole else (job.start, job.end)) as f:
        sink = Sink(f, job.layout.name, ctx.journal, ctx.resume, ctx.fence)
        try:
            if job.first == 0 and not ctx.resume.prefix:
                sink.write(np.frombuffer(job.layout.header, np.uint8))
                sink.checkpoint("")
            items = [(i, b, t.reads(b)) for i, t in enumerate(job.tensors)
                     for b in range(first_block(job, ctx.resume, i), t.n_blocks)]

            def compute(i: int, b: int, reads, raws):
                name = job.tensors[i].name
                for r, raw in zip(reads, raws):  # here, not in the reader: the pool's threads share the hashing
                    r.check(raw, name)
                return ks[i].compute(b, BlockInputs(job.tensors[i], b, reads, raws, ctx.allow_nonfinite))

            current = -1
            pool = B.compute_pool(ctx.device, ctx.threads)[0]  # in_order's: idle while a tensor finishes
            for ((i, b, reads), raws), result in B.in_order(ctx.device, compute, stream(items, ctx.reader), ctx.threads):
                if i != current:
                    if current >= 0:
                        _finish(ks[current], outs[current], sink, slow, pool)
                    sink.begin(outs[i].name, outs[i].offset)
                    current = i
                ks[i].take(b, result, sink)
                for r in reads:
                    read[r.key] = read.get(r.key, 0) + r.end - r.start
                if ctx.progress:
                    ctx.progress(sum(len(raw) for raw in raws))
            if current >= 0:
                _finish(ks[current], outs[current], sink, slow, pool)
        finally:
            size = sink.close()
    if size != job.end:
        raise RuntimeError(f"internal: {path} ends at {size} bytes, its layout at {job.end}")
    return FileResult(OutputFile(job.end - job.start, sink.file_hash.hexdigest() if job.whole else "",
                                 {t.name: sink.tensor_hashes[t.name] for t in outs}), sink.meta, dict(read))


def _finish(kernel, ot, sink: Sink, slow: float, pool) -> None:
    kernel.finish(sink, pool)
    if sink.position != ot.offset + ot.nbytes:
        raise RuntimeError(f"internal: {ot.name} ends at {sink.position}, expected {ot.offset + ot.nbytes}")
    if slow:
        sink.flush()
        time.sleep(slow)
