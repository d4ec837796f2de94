"""FeatCal as a stage of a merge: planned with it (data hashed, layer prefixes chosen under the
calibration budget) and executed after it (merge into a private folder beside OUT, calibrate layer by
layer into a copy of it, publish OUT atomically with one manifest describing both)."""

from __future__ import annotations

import dataclasses
import os
import resource
import shutil
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
import xxhash

from ..checkpoint import Model, Reader, open_model
from ..tensors import to_bytes, torch_dtype
from ..config import CalibrateConfig
from ..errors import InputChangedError, IOFailure, MergepipeError
from .. import execute as merge_run
from ..execute import MANIFEST_NAME, _device, open_inputs, plan_key, resolve_ref, root_hash
from ..manifest import Budget, Calibration, CalibrationFile, Execution, Manifest, OutputFile, load_manifest
from ..plan import parse_budget, recorded_path
from ..publish import destination_lock, discard, prepare_destination, publish
from ..verify import file_hash, verify
from .calibrate import FeatCalParams, SafetensorsSource, calibrate, plan_prefixes, unit_costs
from .data import load_calibration
from .layers import Arch

CHUNK = 16 << 20


def _arch(base: Model) -> Arch:
    config = base.root / "config.json"
    if not config.is_file():
        raise MergepipeError(f"{config}: FeatCal needs the base's transformers config.json (none found)")
    return Arch.from_config(config, tensor_names=base.tensors)


def _data(cal_files: list[str], tasks, base: Model, arch: Arch, p: FeatCalParams, experts: int):
    if p.seq_len > arch.max_positions:
        raise MergepipeError(f"calibrate: seq_len {p.seq_len} is longer than the model's context "
                             f"({arch.max_positions} positions, max_position_embeddings in {base.root / 'config.json'})")
    return load_calibration(cal_files, experts, arch.vocab_size, p.n, p.seq_len, tokenizer_root=base.root, tasks=tasks)


def plan_calibration(cc: CalibrateConfig, base: Model, experts: list[Model],
                     relative_to: Path | None = None) -> Calibration:
    arch = _arch(base)
    p = FeatCalParams.from_dict(cc.params)
    data = _data(cc.data, cc.tasks, base, arch, p, len(experts))
    costs = unit_costs(arch, experts, data.ids, p)
    total = sum(map(sum, costs))
    budget = parse_budget(cc.budget, total)
    prefixes = plan_prefixes(costs, budget)
    layer0 = arch.layer_prefix(0)
    stats = {}
    for spec in arch.modules():
        w = base.tensors.get(f"{layer0}{spec.name}.weight")
        if w is not None:  # linear: C_ss is d_in x d_in; norm: one value per channel
            stats[spec.name] = [w.shape[1], w.shape[1]] if spec.kind == "linear" else [w.shape[0]]
    return Calibration(
        method="featcal",
        params=p.to_dict(),
        data=[CalibrationFile(recorded_path(f, relative_to), data.data_hashes[str(Path(f))]) for f in cc.data],
        tasks=cc.tasks,
        tokenizer={os.path.relpath(k, base.root): h for k, h in data.tokenizer_hashes.items()},
        sequences=[len(x) for x in data.ids],
        tokens=[sum(map(len, x)) for x in data.ids],
        budget=Budget(cc.budget, budget, total),
        prefixes=prefixes,
        statistics=stats,
    )


def calibration_problems(c: Calibration, base_root: Path, root: Path | None) -> list[str]:
    """What no longer matches the calibration inputs recorded at planning: data files and tokenizer."""
    problems = []
    files = [(Path(resolve_ref(rec.path, root)), rec.hash, "calibration data") for rec in c.data]
    files += [(base_root / rel, want, "tokenizer file") for rel, want in c.tokenizer.items()]
    for path, want, what in files:
        try:
            got = xxhash.xxh3_128_hexdigest(path.read_bytes())
        except OSError as e:
            problems.append(f"{path}: cannot read the {what} recorded in the manifest ({e.strerror})")
            continue
        if got != want:
            problems.append(f"{path}: {what} changed since planning (expected xxh3 {want})")
    return problems


def _load_checked(c: Calibration, base: Model, arch: Arch, p: FeatCalParams, root: Path | None, experts: int):
    """The calibration data as planned, or an error naming the file that changed."""
    problems = calibration_problems(c, base.root, root)
    if problems:
        raise InputChangedError(problems[0])
    data = _data([resolve_ref(rec.path, root) for rec in c.data], c.tasks, base, arch, p, experts)
    if [len(x) for x in data.ids] != c.sequences:
        raise InputChangedError(f"{c.data[0].path}: calibration data no longer gives {c.sequences} sequences per expert")
    return data


def execute_calibrated(m: Manifest, out: str | Path, device: str = "cpu", force: bool = False,
                       root: str | Path | None = None, allow_pickle: bool = False, progress=None,
                       allow_nonfinite: bool = False) -> Manifest:
    t0 = time.perf_counter()
    c = m.calibration
    dev = torch.device(_device(device))
    out = Path(out).resolve()
    root = Path(root) if root else None
    base, experts = open_inputs(m, root, allow_pickle)
    arch = _arch(base)
    p = FeatCalParams.from_dict(c.params)
    data = _load_checked(c, base, arch, p, root, len(experts))
    merged_dir = out.parent / f".{out.name}.mergepipe-merged"
    with destination_lock(out):
        staging = prepare_destination(out, force, plan_key(m, dev))
        try:
            merge_m = dataclasses.replace(m, calibration=None)
            merge = _finished_merge(merge_m, merged_dir, dev) or merge_run.execute(
                merge_m, merged_dir, device, True, root, allow_pickle, progress, allow_nonfinite)
            merged = open_model(merged_dir)
            shutil.copytree(merged_dir, staging.folder, dirs_exist_ok=True,
                            ignore=lambda d, names: [MANIFEST_NAME] if Path(d) == merged_dir else [])
            reader = Reader()
            try:
                diag = _calibrate_into(staging.folder, arch, base, merged, experts, data.ids, p, c.prefixes,
                                       reader, dev)
            finally:
                reader.close()
            done = _complete(m, merge, staging.folder, base, experts, reader, diag, dev, time.perf_counter() - t0)
            done.save(staging.folder / MANIFEST_NAME)
            publish(staging, out)
        except OSError as e:
            discard(staging)
            raise IOFailure(f"{e.filename or staging.folder}: {e.strerror or e}") from None
        except BaseException:
            discard(staging)
            raise
        finally:
            shutil.rmtree(merged_dir, ignore_errors=True)
    return done


def _finished_merge(m: Manifest, folder: Path, dev: torch.device) -> Manifest | None:
    """The merge a killed calibration run left in its private folder, if it is this plan's and intact:
    a rerun then calibrates without merging again."""
    try:
        prev = load_manifest(folder / MANIFEST_NAME)
    except MergepipeError:
        return None
    if prev.execution is None or plan_key(prev, dev) != plan_key(m, dev):
        return None
    return prev if verify(prev, output=folder, check_input_blocks=False).ok else None


def _calibrate_into(folder: Path, arch: Arch, base: Model, merged: Model, experts: list[Model], ids, p, prefixes,
                    reader: Reader, dev: torch.device):
    """Run FeatCal; each calibrated tensor overwrites its bytes in the copied merged files as soon as
    its layer is solved, so no layer outlives its solve."""
    fds: dict[str, int] = {}
    store = {n: torch_dtype(info.dtype) for n, info in merged.tensors.items()}  # each solution as it is stored

    def emit(name: str, t: torch.Tensor) -> None:
        info = merged.tensors[name]
        data = to_bytes(t.to(torch_dtype(info.dtype)))
        assert data.nbytes == info.end - info.start, name
        path = str(folder / os.path.relpath(info.file, merged.root))
        if path not in fds:
            fds[path] = os.open(path, os.O_WRONLY)
        os.pwrite(fds[path], memoryview(data), info.start)

    try:
        return calibrate(arch, SafetensorsSource(base, reader), SafetensorsSource(merged, reader),
                         [SafetensorsSource(e, reader) for e in experts], ids, p, emit, prefixes,
                         tmp_dir=folder / ".featcal-streams", device=dev, store_dtype=store)
    finally:
        for fd in fds.values():
            os.close(fd)


def _hash_outputs(folder: Path) -> dict[str, OutputFile]:
    """File and per-tensor hashes of the published files, computed as execute's writer computes them."""
    outputs = {}
    model = open_model(folder)
    for fh in model.files:
        tensors = {}
        with open(fh.path, "rb") as f:
            for info in sorted(fh.tensors.values(), key=lambda i: i.start):
                f.seek(info.start)
                th = xxhash.xxh3_64()
                left = info.end - info.start
                while left and (chunk := f.read(min(CHUNK, left))):
                    th.update(chunk)
                    left -= len(chunk)
                tensors[info.name] = th.hexdigest()
        outputs[os.path.relpath(fh.path, folder)] = OutputFile(fh.size, file_hash(fh.path), tensors)
    return outputs


def _complete(m: Manifest, merge: Manifest, folder: Path, base: Model, experts: list[Model], reader: Reader, diag,
              dev: torch.device, wall: float) -> Manifest:
    me = merge.execution
    base_files = {str(fh.path) for fh in base.files}
    expert_files = {str(fh.path) for e in experts for fh in e.files}
    read = dict(me.bytes_read)
    for path, n in reader.bytes_read.items():  # the private merged copy is ours, not an input: not counted
        if str(path) in base_files or str(path) in expert_files:
            read[str(path)] = read.get(str(path), 0) + n
    outputs = _hash_outputs(folder)
    diagnostics = dict(me.diagnostics or {})
    for rep in diag.layers:
        for name, change in rep.rel_change.items():
            diagnostics[name] = {**diagnostics.get(name, {}), "featcal": {"experts": rep.experts,
                                                                          "rel_change": float(change)}}
    peak_dev = torch.cuda.max_memory_allocated(dev) if dev.type == "cuda" else 0
    execution = Execution(
        device=me.device,
        wall_s=round(wall, 4),
        peak_rss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        peak_device_bytes=int(max(peak_dev, me.peak_device_bytes)),
        bytes_read=dict(sorted(read.items())),
        expert_bytes_read=sum(v for k, v in read.items() if k in expert_files),
        base_bytes_read=sum(v for k, v in read.items() if k in base_files),
        os_read_bytes=None,
        outputs=outputs,
        root_hash=root_hash(outputs),
        finished_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        resumed_bytes=me.resumed_bytes,
        diagnostics=dict(sorted(diagnostics.items())) or None,
    )
    return Manifest(**{**m.__dict__, "execution": execution})
