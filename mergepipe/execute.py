"""Execution: stream the planned byte ranges, merge block by block in float32 on the chosen device,
write each output tensor at its final offset, and publish atomically with a completed manifest.

The unit of work is a TensorJob (what to read, the operator, where the result goes): pure enough
that a distributed engine could run the jobs of one output file elsewhere and publish once.
"""

from __future__ import annotations

import os
import queue
import resource
import shutil
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import xxhash

from . import blocks as B
from .checkpoint import COPIED_FILES, DTYPES, Model, Reader, TensorInfo, open_model
from .errors import InputChangedError, MergepipeError
from .manifest import Execution, InputModel, Manifest, OutputFile, runs_to_set
from .operators import get as get_operator, ta
from .ties_stream import ties_tensor
from .publish import OutFile, discard, layout, prepare_destination, publish

MANIFEST_NAME = "mergepipe.manifest.json"
LOOKAHEAD = 3  # jobs whose byte ranges are announced to the kernel (WILLNEED) before they are read


@dataclass(frozen=True)
class TensorJob:
    name: str
    base: TensorInfo
    experts: tuple[TensorInfo, ...]
    selected: tuple[frozenset[int], ...]  # per expert: blocks to read
    trim: tuple[tuple[int, int, int], ...] | None  # TIES: per expert (bin, above, need)
    out_dtype: str


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
    return models[0], models[1:]


def expected_hashes(rec: InputModel, model: Model) -> dict[tuple[str, str], np.ndarray]:
    out = {}
    paths = {os.path.relpath(fh.path, model.root): str(fh.path) for fh in model.files}
    for f in rec.files:
        path = paths.get(f.name, str(model.root / f.name))
        for tensor, hx in f.blocks.items():
            out[(path, tensor)] = np.frombuffer(bytes.fromhex(hx), dtype=">u8").astype(np.uint64)
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
                                  tuple(tuple(t) for t in tp.trim) if tp.trim else None, out_dtype))
        name = "model.safetensors" if single else os.path.relpath(fh.path, base.root)
        files.append((layout(name, [(j.name, j.out_dtype, j.base.shape) for j in jobs]), jobs))
    return files


class Sink:
    """Writes one output file front to back and hashes it in write order (per tensor and whole
    file), on a writer thread so that page-cache writes overlap the compute. A tensor can also be
    written unhashed, patched in place, and hashed afterwards by reading it back: what streaming
    TIES needs for its deferred entries."""

    def __init__(self, f) -> None:
        self.f = f
        self.file_hash = xxhash.xxh3_128()
        self.tensor_hashes: dict[str, str] = {}
        self._tensor = xxhash.xxh3_64()
        self._start = 0
        self._end = 0  # where the next write lands
        self._q: queue.Queue = queue.Queue(maxsize=8)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._drain, daemon=True, name="mergepipe-writer")
        self._thread.start()

    def _drain(self) -> None:
        while True:
            item = self._q.get()
            try:
                if item is None:
                    return
                data, hashed, tensor_hash = item
                if self._error is None and isinstance(data, str):  # end of a tensor: its hash is complete
                    self.tensor_hashes[data] = tensor_hash.hexdigest()
                elif self._error is None:
                    self.f.write(memoryview(data))
                    if hashed:
                        tensor_hash.update(data)
                        self.file_hash.update(data)
            except BaseException as e:  # noqa: BLE001 - re-raised on the compute thread
                self._error = e
            finally:
                self._q.task_done()

    def _check(self) -> None:
        if self._error is not None:
            raise self._error

    def begin(self) -> None:
        self._tensor = xxhash.xxh3_64()
        self._start = self._end

    def write(self, data: np.ndarray, hashed: bool = True) -> None:
        self._check()
        self._q.put((data, hashed, self._tensor))
        self._end += data.nbytes

    def flush(self) -> None:
        self._q.join()
        self._check()

    def pread(self, offset: int, n: int) -> np.ndarray:
        self.flush()
        buf = np.empty(n, np.uint8)
        got = os.preadv(self.f.fileno(), [memoryview(buf)], self._start + offset)
        assert got == n
        return buf

    def pwrite(self, offset: int, data: np.ndarray) -> None:
        self.flush()
        os.pwrite(self.f.fileno(), memoryview(data), self._start + offset)

    def end(self, name: str, rehash: bool = False) -> None:
        if rehash:
            for off in range(0, self._end - self._start, 16 << 20):
                chunk = self.pread(off, min(16 << 20, self._end - self._start - off))
                self._tensor.update(chunk)
                self.file_hash.update(chunk)
        self._q.put((name, False, self._tensor))  # digested on the writer thread, after the writes

    def close(self) -> int:
        """Finish writing; return the file's size."""
        self._q.put(None)
        self._thread.join()
        self._check()
        return self._end


def execute(m: Manifest, out: str | Path, device: str = "cpu", force: bool = False,
            root: str | Path | None = None, allow_pickle: bool = False,
            progress: Callable[[int], None] | None = None) -> Manifest:
    t0 = time.perf_counter()
    io0 = _os_read_bytes()
    dev = _device(device)
    out = Path(out)
    root = Path(root) if root else None
    base, experts = open_inputs(m, root, allow_pickle)
    if len(experts) != len(m.operator.expert_params):
        raise MergepipeError("manifest: operator.expert_params does not match the experts")
    op = get_operator(m.operator.name)
    want = expected_hashes(m.base, base)
    for rec, e in zip(m.experts, experts):
        want.update(expected_hashes(rec, e))
    files = build_jobs(m, base, experts)
    staging = prepare_destination(out, force)
    reader = Reader()
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    try:
        outputs = {}
        with B.single_threaded_torch():
            for ofile, jobs in files:
                outputs[ofile.name] = _write_file(staging, ofile, jobs, m, op, reader, want, dev, progress)
        _copy_sidecars(base.root, staging, m.out_dtype)
        done = _complete(m, outputs, base, experts, reader, dev, time.perf_counter() - t0, io0)
        done.save(staging / MANIFEST_NAME)
        publish(staging, out)
    except BaseException:
        discard(staging)
        raise
    finally:
        reader.close()
    return done


def _device(device: str) -> torch.device:
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise MergepipeError(f"device {device!r} is not valid (expected cpu, cuda or cuda:N)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise MergepipeError(f"device {device!r} requested but no CUDA GPU is available")
    if dev.type not in ("cpu", "cuda"):
        raise MergepipeError(f"device {device!r} is not supported (expected cpu, cuda or cuda:N)")
    return dev


def _write_file(staging: Path, ofile: OutFile, jobs: list[TensorJob], m: Manifest, op, reader: Reader,
                want: dict, dev: torch.device, progress) -> OutputFile:
    path = staging / ofile.name
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w+b", buffering=0) as f:
        sink = Sink(f)
        try:
            sink.write(np.frombuffer(ofile.header, np.uint8))
            for job, ot in zip(jobs, ofile.tensors):
                sink.begin()
                _run_job(job, m, op, reader, want, dev, sink, staging, progress)
                if sink._end != ot.offset + ot.nbytes:
                    raise RuntimeError(f"internal: {job.name} ends at {sink._end}, expected {ot.offset + ot.nbytes}")
        finally:
            size = sink.close()
    assert size == ofile.size
    return OutputFile(ofile.size, sink.file_hash.hexdigest(), sink.tensor_hashes)


def _read_plan(job: TensorJob) -> list[tuple[int, list[tuple[int, TensorInfo, B.Block]]]]:
    """Per block: the ranges to read, base first (-1), then the selected experts in order."""
    plan = []
    for b in range(B.n_blocks(job.base.shape)):
        reads = [(-1, job.base, B.block(job.base, b))]
        reads += [(k, info, B.block(info, b)) for k, info in enumerate(job.experts) if b in job.selected[k]]
        plan.append((b, reads))
    return plan


def _run_job(job: TensorJob, m: Manifest, op, reader: Reader, want: dict, dev: torch.device,
             sink: Sink, staging: Path, progress) -> None:
    plan = _read_plan(job)

    def hint(i: int) -> None:
        if i < len(plan):
            for _, info, blk in plan[i][1]:
                reader.prefetch(info.file, blk.start, blk.end)

    for i in range(min(LOOKAHEAD, len(plan))):
        hint(i)

    def load(item):
        b, reads = item
        hint(b + LOOKAHEAD)
        raws = []
        for k, info, blk in reads:
            raw = reader.read(info.file, blk.start, blk.end)
            exp = want.get((str(info.file), info.name))
            if exp is None or xxhash.xxh3_64_intdigest(raw) != int(exp[b]):
                raise InputChangedError(f"{info.file}: changed since planning (block {b} of tensor {info.name!r} "
                                        "does not match its recorded hash)")
            raws.append(raw)
        return raws

    stream = B.read_ahead(plan, load, depth=4)
    if op is not ta.TA and job.trim is None and job.experts:
        raise MergepipeError(f"manifest: plan.tensors.{job.name} lacks the trim thresholds {op.name} needs")
    if job.trim is not None:
        ties_tensor(job, m.operator, stream, dev, sink, staging / ".deferred", progress)
        return
    params = m.operator.params
    weights = [p["weight"] for p in m.operator.expert_params]
    out_t = DTYPES[job.out_dtype][0]
    for (b, reads), raws in stream:
        base_raw = raws[0]
        if len(raws) == 1 and job.out_dtype == job.base.dtype:  # no expert here: the base block
            sink.write(base_raw)
        else:
            base_v = raw_view(base_raw, job.base.dtype, (-1,), dev)
            out = torch.empty(base_v.numel(), dtype=out_t, device=dev)
            experts = [raw_view(raw, info.dtype, (-1,), dev) for (_, info, _), raw in zip(reads[1:], raws[1:])]
            ta.merge_into(out, base_v, experts, [weights[k] for k, _, _ in reads[1:]], weights,
                          params["lambda"], params["normalize"])
            sink.write(to_bytes(out))
        if progress:
            progress(sum(len(r) for r in raws))
    sink.end(job.name)


def raw_view(raw: np.ndarray, dtype: str, shape, dev: torch.device) -> torch.Tensor:
    t = torch.from_numpy(raw).view(DTYPES[dtype][0]).reshape(shape)
    return t.to(dev) if dev.type != "cpu" else t


def to_bytes(t: torch.Tensor) -> np.ndarray:
    t = t.contiguous().cpu().reshape(-1)
    return t.view(torch.uint8).numpy() if t.numel() else np.zeros(0, np.uint8)


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
                torch_name = str(DTYPES[out_dtype][0]).split(".")[-1]
                for key in ("torch_dtype", "dtype"):
                    if key in cfg:
                        cfg[key] = torch_name
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
              reader: Reader, dev: torch.device, wall: float, io0: int | None) -> Manifest:
    base_files = {str(fh.path) for fh in base.files}
    read = dict(sorted(reader.bytes_read.items()))
    io1 = _os_read_bytes()
    peak_dev = torch.cuda.max_memory_allocated(dev) if dev.type == "cuda" else 0
    execution = Execution(
        device=str(dev) if dev.type == "cpu" else f"{dev} ({torch.cuda.get_device_name(dev)})",
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
    )
    done = Manifest(**{**m.__dict__, "execution": execution})
    return done
