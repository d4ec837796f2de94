"""FeatCal as a stage of a merge: planned with it (data hashed, enough tokens checked, layer prefixes
chosen under the calibration budget) and run after it, over the merged files in the staging folder:
each decoder layer is calibrated in forward order and journaled (resume.py), and once every layer is
solved the solutions overwrite their bytes in place.

Its reads of the experts are a second read, after the merge's: the merge's plan does not cover them,
`calibrate.budget` does (the record's `budget`), and the manifest's execution counts them in
`bytes_read` and apart in `stage_bytes_read`."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional

import torch
import xxhash

from ..budget import parse_budget
from ..checkpoint import Model, open_model
from ..errors import InputChangedError, MergepipeError
from ..manifest import Budget, load_record
from ..paths import recorded_path
from ..sources import resolve_ref
from ..stages import StageContext, StageResult
from ..tensors import to_bytes, torch_dtype
from .calibrate import FeatCalParams, SafetensorsSource, calibrate, plan_prefixes, unit_costs
from .data import load_calibration
from .layers import Arch
from .resume import StageJournal

RESUME_DIR = ".featcal-resume"  # in the staging folder; removed before the output is published

KEYS = {"method", "data", "tasks", "budget", "parameters"}


@dataclass
class Section:
    """A `calibrate:` section, checked (mergepipe's own key, not mergekit's)."""
    data: list[str]  # one JSONL file shared by all experts, or one per expert in models order
    tasks: list[str] | None  # per expert: the `task` value of its records in a shared file
    budget: str  # expert bytes FeatCal may read, as for --budget
    params: dict  # FeatCalParams fields, validated


@dataclass
class CalibrationFile:
    path: str
    hash: str  # xxh3_128 of its bytes


@dataclass
class Calibration:
    """The stage's record: the data it reads (with hashes, so a replay refuses changed data), its
    parameters, and which layers each expert calibrates under the calibration budget."""
    params: dict[str, Any]
    data: list[CalibrationFile]  # one shared by the experts, or one per expert in order
    tasks: Optional[list[str]]
    tokenizer: dict[str, str]  # tokenizer file -> xxh3_128 (only when text records were tokenized)
    sequences: list[int]  # per expert: calibration sequences used
    tokens: list[int]  # per expert: real tokens in them
    budget: Budget
    prefixes: list[int]  # per expert: layers 0 .. prefix-1 are calibrated with it
    statistics: dict[str, list[int]]  # module (relative to a layer) -> shape of its statistics


def parse(doc: object, experts: int, where: str) -> Section:
    if not isinstance(doc, dict):
        raise MergepipeError(f"{where} must be a mapping with data and optional tasks, budget, parameters")
    unknown = sorted(set(doc) - KEYS)
    if unknown:
        raise MergepipeError(f"{where}: unknown key {unknown[0]!r} (expected {', '.join(sorted(KEYS))})")
    if doc.get("method", "featcal") != "featcal":
        raise MergepipeError(f"{where}: method {doc['method']!r} is not supported (expected featcal)")
    data = doc.get("data")
    data = [data] if isinstance(data, str) else data
    if not isinstance(data, list) or not data or not all(isinstance(d, str) for d in data) or len(data) not in (1, experts):
        raise MergepipeError(f"{where}: data must be one JSONL path shared by the experts or a list of "
                             f"{experts} paths, one per expert")
    tasks = doc.get("tasks")
    if tasks is not None and (not isinstance(tasks, list) or len(tasks) != experts
                              or not all(isinstance(t, str) for t in tasks)):
        raise MergepipeError(f"{where}: tasks must list one task name per expert ({experts})")
    params = doc.get("parameters") or {}
    if not isinstance(params, dict):
        raise MergepipeError(f"{where}: parameters must be a mapping")
    try:
        checked = FeatCalParams.from_dict(params).to_dict()
    except TypeError as e:  # a wrongly typed value the dataclass refuses
        raise MergepipeError(f"{where}: {e}") from None
    except MergepipeError as e:
        raise MergepipeError(f"{where}: {e}") from None
    return Section(data, tasks, str(doc.get("budget", "100%")), checked)


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


def plan(cc: Section, base: Model, experts: list[Model], relative_to: Path | None = None) -> Calibration:
    arch = _arch(base)
    p = FeatCalParams.from_dict(cc.params)
    data = _data(cc.data, cc.tasks, base, arch, p, len(experts))
    costs = unit_costs(arch, experts, data.ids, p)
    total = sum(map(sum, costs))
    budget = parse_budget(cc.budget, total)
    prefixes = plan_prefixes(costs, budget)
    if not p.allow_underdetermined:
        _check_tokens(cc, base, arch, data.ids, prefixes)
    layer0 = arch.layer_prefix(0)
    stats = {}
    for spec in arch.modules():
        w = base.tensors.get(f"{layer0}{spec.name}.weight")
        if w is not None:  # linear: C_ss is d_in x d_in; norm: one value per channel
            stats[spec.name] = [w.shape[1], w.shape[1]] if spec.kind == "linear" else [w.shape[0]]
    return Calibration(
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


def _check_tokens(cc: Section, base: Model, arch: Arch, ids, prefixes: list[int]) -> None:
    """Each calibrating expert needs at least as many tokens as the widest calibrated Linear has
    inputs (down_proj's intermediate size): with fewer, C_ss is singular and λ alone holds the solve."""
    layer0 = arch.layer_prefix(0)
    widths = {spec.name: base.tensors[f"{layer0}{spec.name}.weight"].shape[1] for spec in arch.modules()
              if spec.kind == "linear" and f"{layer0}{spec.name}.weight" in base.tensors}
    if not widths:
        return
    widest = max(widths, key=widths.get)
    for i, seqs in enumerate(ids):
        tokens = sum(map(len, seqs))
        if prefixes[i] and tokens < widths[widest]:
            who = f"task {cc.tasks[i]!r}" if cc.tasks else f"expert {i + 1}"
            raise MergepipeError(
                f"{cc.data[i if len(cc.data) > 1 else 0]}: {tokens} calibration tokens for {who}, fewer than the "
                f"{widths[widest]} inputs of {widest} (the solve would be underdetermined): give more or longer "
                f"sequences, or set parameters.allow_underdetermined: true")


def _upgraded(params: dict) -> dict:
    """Parameters as recorded by a version without `order` (which solved in block order) or
    `allow_underdetermined` (which planned without the token check), completed."""
    return {"order": "block", "allow_underdetermined": False, **params}


def load(doc: dict, where: str, experts: int | None) -> Calibration:
    """The record from a manifest, validated; `experts`: how many the manifest merges."""
    c = load_record(Calibration, doc, where)
    if isinstance(c.params, dict):
        c.params = _upgraded(c.params)
    if FeatCalParams.from_dict(c.params).to_dict() != c.params:
        raise MergepipeError(f"{where}.params must list exactly FeatCal's parameters")
    k = experts if experts is not None else len(c.prefixes)
    if len(c.data) not in (1, k) or (c.tasks is not None and len(c.tasks) != k):
        raise MergepipeError(f"{where}.data needs one shared file or {k}, and tasks one per expert")
    for field_name in ("sequences", "tokens", "prefixes"):
        if len(getattr(c, field_name)) != k:
            raise MergepipeError(f"{where}.{field_name} must have one entry per expert ({k})")
    return c


def input_problems(c: Calibration, base_root: Path, root: Path | None) -> list[str]:
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


def run(c: Calibration, ctx: StageContext) -> StageResult:
    """Calibrate the merged model in ctx.folder, layer by layer, each finished layer journaled so a
    killed run continues after it; then write the solutions over their merged bytes."""
    arch = _arch(ctx.base)
    p = FeatCalParams.from_dict(c.params)
    data = _data([resolve_ref(rec.path, ctx.root) for rec in c.data], c.tasks, ctx.base, arch, p, len(ctx.experts))
    if [len(x) for x in data.ids] != c.sequences:
        raise InputChangedError(f"{c.data[0].path}: calibration data no longer gives {c.sequences} sequences per expert")
    merged = open_model(ctx.folder)
    store = {n: torch_dtype(info.dtype) for n, info in merged.tensors.items()}  # each solution as it is stored
    key = xxhash.xxh3_128_hexdigest(json.dumps([asdict(c), str(ctx.device)], sort_keys=True).encode())
    journal = StageJournal(ctx.folder / RESUME_DIR, key)

    def emit(name: str, t: torch.Tensor) -> None:
        info = merged.tensors[name]
        raw = to_bytes(t.to(torch_dtype(info.dtype)))
        assert raw.nbytes == info.end - info.start, name
        journal.emit(name, raw)

    try:
        diag = calibrate(arch, SafetensorsSource(ctx.base, ctx.reader), SafetensorsSource(merged, ctx.reader),
                         [SafetensorsSource(e, ctx.reader) for e in ctx.experts], data.ids, p, emit,
                         prefixes=c.prefixes, tmp_dir=journal.stream_dir, device=torch.device(ctx.device),
                         store_dtype=store, journal=journal)
        _patch(journal, merged)
    except BaseException:
        journal.close()  # kept for the rerun
        raise
    journal.close(remove=True)  # the merged files hold every solution now
    report = {}
    for rep in diag.layers:
        for name, change in rep.rel_change.items():
            report[name] = {"featcal": {"experts": rep.experts, "rel_change": float(change)}}
    return StageResult(report)


def _patch(journal: StageJournal, merged: Model) -> None:
    fds: dict[str, int] = {}

    def write(name: str, raw: bytes) -> None:
        info = merged.tensors[name]
        path = str(info.file)
        if path not in fds:
            fds[path] = os.open(path, os.O_WRONLY)
        view, done = memoryview(raw), 0
        while done < len(view):
            done += os.pwrite(fds[path], view[done:], info.start + done)
    try:
        journal.patch(write)
    finally:
        for fd in fds.values():
            os.close(fd)


def describe(c: Calibration) -> str:
    return (f"{c.params['order']} order; layer prefixes per expert {c.prefixes}, {c.budget.bytes} of "
            f"{c.budget.expert_bytes_total} expert bytes; sequences {c.sequences}, tokens {c.tokens}; "
            f"data {', '.join(f.path for f in c.data)}")
