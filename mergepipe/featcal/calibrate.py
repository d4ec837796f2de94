"""FeatCal's forward-order loop (spec §3.1, §8) with layer streaming, and the budget planner (§6).

For each decoder layer ℓ the merged layer (uncalibrated) runs on every active expert's student stream
and expert i's layer on its own stream; hooks capture each Linear and norm input, one expert's
statistics are folded into running sums and dropped, then every module of the layer is solved at once,
emitted, and the student streams advance through the calibrated layer.

Held at once: one layer of the merged model (fp32; its solved tensors replace it as they are
emitted), the base's calibrated tensors of that layer, one expert's layer, one expert's statistics
and the running sums (per Linear group two C_ss-sized fp64 matrices, per module a W-sized fp64
right-hand side), one batch of hooked inputs, and the activation streams: fp32, real tokens only,
student + expert for each expert still active, in RAM up to `ram_limit` bytes and memory-mapped in a
temporary folder past it. Nothing is kept across layers but the streams.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable, Collection, Iterable, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor

from ..checkpoint import Model, Reader
from ..tensors import raw_view
from ..errors import MergepipeError
from . import solve as S
from .data import batches

CPU = torch.device("cpu")


# ---------------------------------------------------------------------------------------------
# Hyperparameters and diagnostics


ORDERS = ("module", "block")
# lambda, rho, alpha when not given, per order. block: the reference's (egangu/featcal, tuned on CLIP
# under its all-at-once solve, which needs heavy damping). module: chosen on the validation split of
# the trained quality family (bench/results/featcal-quality.md); each module then sees inputs its
# calibrated upstream already corrected, so little damping is needed.
DEFAULTS = {"block": {"lam": 0.05, "rho": 2.2, "alpha": 0.25},
            "module": {"lam": 1e-5, "rho": 2.2, "alpha": 1.0}}


@dataclass(frozen=True)
class FeatCalParams:
    """Spec §4 hyperparameters. `order`: how a layer's modules are solved: `module` (default) each
    group on the inputs its already-calibrated upstream groups produce, `block` all of a layer's
    groups at once from statistics behind the uncalibrated layer (the reference's). `lam` is the
    relative ridge λ, `rho` the anchor extrapolation, `alpha` the teacher mix x_t = αx_e + (1−α)x_s
    (these three default per order, see DEFAULTS), `eps` the ε_c floor; n, seq_len, batch_size shape
    the data; `allow_underdetermined` lets planning accept fewer calibration tokens per expert than
    the widest calibrated input has features (λ alone then holds the solve)."""
    lam: float | None = None
    rho: float | None = None
    alpha: float | None = None
    eps: float = 1e-8
    calibrate_bias: bool = True
    calibrate_norms: bool = True
    n: int = 256
    seq_len: int = 512
    batch_size: int = 16
    order: str = "module"
    allow_underdetermined: bool = False

    # user-facing names (manifest, config) -> field names
    ALIASES = {"lambda": "lam", "samples": "n", "S": "seq_len"}

    def __post_init__(self) -> None:
        for name, value in DEFAULTS.get(self.order, DEFAULTS["module"]).items():
            if getattr(self, name) is None:
                object.__setattr__(self, name, value)

    @classmethod
    def from_dict(cls, d: dict | None) -> "FeatCalParams":
        """Validated params from a user dict; unknown keys and bad values are one-line errors."""
        names = {f.name for f in fields(cls)}
        kw = {}
        for key, value in (d or {}).items():
            name = cls.ALIASES.get(key, key)
            if name not in names:
                raise MergepipeError(f"featcal: unknown parameter {key!r} (expected one of "
                                     f"{sorted(set(names) - set(cls.ALIASES.values()) | set(cls.ALIASES))})")
            kw[name] = value
        p = cls(**kw)
        p.check()
        return p

    def check(self) -> None:
        def fail(what: str) -> None:
            raise MergepipeError(f"featcal: {what}")
        if self.order not in ORDERS:
            fail(f"order must be one of {', '.join(ORDERS)} (got {self.order!r})")
        for name in ("lam", "rho", "alpha", "eps"):
            v = getattr(self, name)
            if type(v) not in (int, float) or v != v or abs(v) == float("inf"):
                fail(f"{name} must be a finite number (got {v!r})")
        if self.lam < 0 or self.eps <= 0:
            fail(f"lambda must be >= 0 and eps > 0 (got {self.lam}, {self.eps})")
        if not 0 <= self.alpha <= 1:
            fail(f"alpha must lie in [0, 1] (got {self.alpha})")
        for name in ("calibrate_bias", "calibrate_norms", "allow_underdetermined"):
            if type(getattr(self, name)) is not bool:
                fail(f"{name} must be true or false")
        for name in ("n", "seq_len", "batch_size"):
            v = getattr(self, name)
            if type(v) is not int or v < 1:
                fail(f"{name} must be a positive integer (got {v!r})")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class LayerReport:
    layer: int
    experts: list[int]  # active experts (prefix covers this layer)
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)  # module -> C_ss [d, d] or per-channel [k]
    scales: dict[str, list[float]] = field(default_factory=dict)  # Linear group -> s_i per active expert
    rel_change: dict[str, float] = field(default_factory=dict)  # calibrated tensor -> ‖new−θ_m‖/‖θ_m‖


@dataclass
class Diagnostics:
    prefixes: list[int]
    tokens: list[int]  # real tokens per expert
    layers: list[LayerReport] = field(default_factory=list)
    spilled_bytes: int = 0  # activation bytes memory-mapped to disk


# ---------------------------------------------------------------------------------------------
# Tensor sources


class Source(Protocol):
    def names(self) -> Iterable[str]: ...
    def get(self, name: str) -> Tensor: ...
    def rows(self, name: str, ids: Tensor) -> Tensor: ...


class SafetensorsSource:
    """fp32 tensors of a checkpoint, read through a counting Reader: a whole tensor, or only the rows
    of an embedding matrix that the calibration tokens use (one read per run of consecutive ids)."""

    def __init__(self, model: Model, reader: Reader) -> None:
        self.model, self.reader = model, reader

    def names(self) -> list[str]:
        return list(self.model.tensors)

    def get(self, name: str) -> Tensor:
        info = self.model.tensors[name]
        return raw_view(self.reader.read(info.file, info.start, info.end), info.dtype, info.shape, CPU).float()

    def rows(self, name: str, ids: Tensor) -> Tensor:
        info = self.model.tensors[name]
        ids = ids.tolist()
        if any(b <= a for a, b in zip(ids, ids[1:])) or (ids and not 0 <= ids[0] <= ids[-1] < info.shape[0]):
            raise ValueError(f"{name}: row ids must be sorted, unique and in [0, {info.shape[0]})")
        row = info.row_elems * info.itemsize
        parts, j = [], 0
        while j < len(ids):
            k = j
            while k + 1 < len(ids) and ids[k + 1] == ids[k] + 1:
                k += 1
            raw = self.reader.read(info.file, info.start + ids[j] * row, info.start + (ids[k] + 1) * row)
            parts.append(raw_view(raw, info.dtype, (k - j + 1, *info.shape[1:]), CPU).float())
            j = k + 1
        return torch.cat(parts) if parts else torch.zeros((0, *info.shape[1:]))


class TensorSource:
    """fp32 tensors from a dict: a merge made in memory, or tests."""

    def __init__(self, tensors: dict[str, Tensor]) -> None:
        self.tensors = tensors

    def names(self) -> list[str]:
        return list(self.tensors)

    def get(self, name: str) -> Tensor:
        return self.tensors[name].float()

    def rows(self, name: str, ids: Tensor) -> Tensor:
        return self.tensors[name][ids].float()


class _StemCache:
    """The stem's reads for one source: embedding rows for the union of the calibration ids, read once
    (a row used by several batches is read and charged once), and whole small tensors, read once."""

    def __init__(self, source: Source, ids: Tensor) -> None:
        self.source, self.ids, self.row_cache, self.full_cache = source, ids, {}, {}

    def rows(self, name: str, ids: Tensor) -> Tensor:
        if name not in self.row_cache:
            self.row_cache[name] = self.source.rows(name, self.ids)
        pos = torch.searchsorted(self.ids, ids).clamp(max=max(len(self.ids) - 1, 0))
        if not torch.equal(self.ids[pos], ids):
            raise ValueError(f"{name}: rows requested outside the calibration tokens")
        return self.row_cache[name][pos]

    def full(self, name: str) -> Tensor:
        if name not in self.full_cache:
            self.full_cache[name] = self.source.get(name)
        return self.full_cache[name]


def _unique_ids(seqs: Iterable[Sequence[int]]) -> Tensor:
    return torch.tensor(sorted({t for s in seqs for t in s}), dtype=torch.long)


# ---------------------------------------------------------------------------------------------
# Activation streams


class Stream:
    """One expert's hidden states at the current layer, real tokens only: [tokens, d] fp32, in RAM or
    memory-mapped. A batch is read into a right-padded [B, width, d] block (zeros at padding) and
    its output written back in place: each layer reads a batch before it overwrites it."""

    def __init__(self, lengths: Sequence[int], d: int, path: Path | None) -> None:
        self.offsets = np.concatenate([[0], np.cumsum(lengths)]).tolist()
        self.lengths = list(lengths)
        shape = (self.offsets[-1], d)
        self.path = path
        if path is None:
            self.flat = torch.zeros(shape)
        else:
            self._mm = np.memmap(path, dtype=np.float32, mode="w+", shape=shape)
            self.flat = torch.from_numpy(self._mm)

    def read(self, j0: int, j1: int, width: int) -> Tensor:
        out = torch.zeros((j1 - j0, width, self.flat.shape[1]))
        for b, j in enumerate(range(j0, j1)):
            out[b, :self.lengths[j]] = self.flat[self.offsets[j]:self.offsets[j + 1]]
        return out

    def write(self, j0: int, h: Tensor) -> None:
        h = h.to(CPU, torch.float32)
        for b in range(h.shape[0]):
            j = j0 + b
            self.flat[self.offsets[j]:self.offsets[j + 1]] = h[b, :self.lengths[j]]

    def close(self) -> None:
        self.flat = None
        if self.path is not None:
            del self._mm
            self.path.unlink(missing_ok=True)


class _StreamPool:
    """Allocates streams in RAM until `ram_limit` bytes, then memory-mapped in a private temp folder."""

    def __init__(self, ram_limit: int, tmp_dir: str | Path | None) -> None:
        self.ram_limit, self.tmp_parent, self.ram, self.spilled = ram_limit, tmp_dir, 0, 0
        self.dir: Path | None = None

    def new(self, lengths: Sequence[int], d: int, tag: str) -> Stream:
        nbytes = sum(lengths) * d * 4
        if self.ram + nbytes <= self.ram_limit:
            self.ram += nbytes
            return Stream(lengths, d, None)
        if self.dir is None:
            if self.tmp_parent is not None:
                Path(self.tmp_parent).mkdir(parents=True, exist_ok=True)
            self.dir = Path(tempfile.mkdtemp(prefix="featcal-", dir=self.tmp_parent))
        self.spilled += nbytes
        return Stream(lengths, d, self.dir / f"{tag}.f32")

    def free(self, stream: Stream) -> None:
        """Close a stream and give its RAM back to the limit."""
        if stream.path is None:
            self.ram -= stream.flat.numel() * 4
        stream.close()

    def cleanup(self) -> None:
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# Budget


def plan_prefixes(layer_cost: Sequence[Sequence[int]], budget: int) -> list[int]:
    """Per expert, how many leading layers to calibrate with it. layer_cost[i][ℓ] is the bytes of
    unit (expert i, layer ℓ), stem rows folded into ℓ = 0. Units are granted layer-major, ties by
    expert index, while the total stays within budget; an expert refused a layer stops growing (its
    stream needs every earlier layer), the others go on."""
    if any(c < 0 for row in layer_cost for c in row):
        raise MergepipeError("featcal: layer costs must be non-negative")
    prefix = [0] * len(layer_cost)
    growing = [True] * len(layer_cost)
    spent = 0
    for layer in range(max((len(r) for r in layer_cost), default=0)):
        for i, row in enumerate(layer_cost):
            if not growing[i] or layer >= len(row):
                continue
            if spent + row[layer] <= budget:
                spent += row[layer]
                prefix[i] = layer + 1
            else:
                growing[i] = False
    return prefix


def stem_reads(arch, model: Model) -> tuple[list[str], list[str]]:
    """(names the stem reads by rows, names it reads whole), found by running `embed` on one token
    with recording callbacks: the architecture, not a naming guess, decides."""
    by_rows, whole = [], []

    def rows(name, ids):
        by_rows.append(name)
        return torch.zeros((len(ids), *model.tensors[name].shape[1:]))

    def full(name):
        whole.append(name)
        return torch.zeros(model.tensors[name].shape)
    with torch.no_grad():
        arch.embed(torch.zeros((1, 1), dtype=torch.long), rows, full)
    return list(dict.fromkeys(by_rows)), list(dict.fromkeys(whole))


def unit_costs(arch, experts: Sequence[Model], ids: Sequence[Sequence[Sequence[int]]],
               params: FeatCalParams | dict | None = None) -> list[list[int]]:
    """Bytes `calibrate` reads per (expert, layer) through a SafetensorsSource, for `plan_prefixes`:
    every tensor of the layer (α = 0: only the calibrated ones, as the expert layer is not run), plus
    at layer 0 the stem: the embedding rows of the expert's token ids and any whole stem tensor
    (α = 0: none, there is no expert stream)."""
    p = params if isinstance(params, FeatCalParams) else FeatCalParams.from_dict(params)
    plan = _plan(arch, p)
    out = []
    for model, seqs in zip(experts, ids):
        row = []
        for layer in range(arch.n_layers):
            pre = arch.layer_prefix(layer)
            names = _layer_names(arch, layer, model.tensors)
            if p.alpha == 0:
                names = [pre + k for k in _targets(plan, {n[len(pre):] for n in names}, p)]
            row.append(sum(model.tensors[n].end - model.tensors[n].start for n in names))
        if p.alpha > 0 and row:
            used = len({t for s in seqs[:p.n] for t in s[:p.seq_len]})
            by_rows, whole = stem_reads(arch, model)
            row[0] += sum(used * model.tensors[n].row_elems * model.tensors[n].itemsize for n in by_rows)
            row[0] += sum(model.tensors[n].end - model.tensors[n].start for n in whole)
        out.append(row)
    return out


# ---------------------------------------------------------------------------------------------
# The loop


class _Stop(Exception):
    """Raised by a hook once the input it waits for is captured: the rest of the layer need not run."""


@contextmanager
def _hooks(layer: torch.nn.Module, names: Sequence[str], stop: bool = False):
    """Forward pre-hooks storing each named submodule's input in the yielded dict (per call), removed
    on exit; with `stop`, the forward ends (_Stop) once the last of `names` has its input."""
    seen: dict[str, Tensor] = {}
    handles = []
    for name in names:
        def grab(_mod, args, kwargs, name=name):
            seen[name] = args[0] if args else next(iter(kwargs.values()))
            if stop and len(seen) == len(names):
                raise _Stop
        handles.append(layer.get_submodule(name).register_forward_pre_hook(grab, with_kwargs=True))
    try:
        yield seen
    finally:
        for h in handles:
            h.remove()


def _forward(arch, layer: torch.nn.Module, hidden: Tensor, mask: Tensor) -> Tensor | None:
    """The layer's output, or None where a hook stopped it early."""
    try:
        return arch.forward_layer(layer, hidden, mask)
    except _Stop:
        return None


@dataclass
class _Plan:
    """Which modules the layer calibrates and how: Linear groups share one input (hooked once).
    `steps` is the data-flow order of the groups and norms, what module order solves one by one."""
    groups: dict[str, list]  # group -> Linear ModuleSpecs
    norms: list
    steps: list = field(default_factory=list)  # _Plan of one group or one norm each, in data-flow order

    def hooked(self) -> list[str]:
        return [specs[0].name for specs in self.groups.values()] + [n.name for n in self.norms]


@dataclass(frozen=True)
class CalibrateOptions:
    """`calibrate`'s keyword options, beside what it calibrates: `prefixes` (expert i calibrates
    layers < prefixes[i]; None: all), the `device` layers, statistics and solves run on, the host
    bytes of activation streams held in RAM (`ram_limit`) and the folder the rest is memory-mapped
    in (`tmp_dir`), and `store_dtype`, the dtype (or one per tensor name) solutions are rounded to."""
    prefixes: Sequence[int] | None = None
    ram_limit: int = 4 << 30
    tmp_dir: str | Path | None = None
    device: str | torch.device = "cpu"
    store_dtype: torch.dtype | dict[str, torch.dtype] | None = None
    journal: Any = None  # a LayerJournal: resume after the layers it kept, keep each finished one


@dataclass(frozen=True)
class _Run:
    """What every layer of one `calibrate` call shares, checked and fixed for the call: the
    architecture, the three checkpoints read, the calibration sequences (cut to n × seq_len) and the
    layer prefix of each expert, the hyperparameters and module plan, the device, the dtype(s)
    solutions are stored in, and the sink they are emitted to."""
    arch: Any
    base: Source
    merged: Source
    experts: Sequence[Source]
    seqs: list[list[list[int]]]
    prefixes: list[int]
    p: FeatCalParams
    plan: _Plan
    dev: torch.device
    store_dtype: torch.dtype | dict[str, torch.dtype] | None
    emit: Callable[[str, Tensor], None]
    pool: _StreamPool


def _plan(arch, params: FeatCalParams) -> _Plan:
    groups: dict[str, list] = {}
    norms, steps = [], []
    for spec in arch.modules():
        if spec.kind == "linear":
            if spec.group not in groups:  # a group's members are adjacent: its step is its first
                groups[spec.group] = []
                steps.append(_Plan({spec.group: groups[spec.group]}, []))  # the same list
            groups[spec.group].append(spec)
        elif spec.kind in ("rmsnorm", "layernorm"):
            if params.calibrate_norms:
                norms.append(spec)
                steps.append(_Plan({}, [spec]))
        else:
            raise MergepipeError(f"featcal: module {spec.name} has unknown kind {spec.kind!r}")
    return _Plan(groups, norms, steps)


def _targets(plan: _Plan, layer_tensors: Collection[str], params: FeatCalParams) -> list[str]:
    """Relative names of the tensors this layer calibrates, in module order."""
    out = []
    for specs in plan.groups.values():
        for spec in specs:
            out.append(f"{spec.name}.weight")
            if params.calibrate_bias and f"{spec.name}.bias" in layer_tensors:
                out.append(f"{spec.name}.bias")
    for spec in plan.norms:
        out.append(f"{spec.name}.weight")
        if spec.kind == "layernorm" and f"{spec.name}.bias" in layer_tensors:
            out.append(f"{spec.name}.bias")
    missing = [t for t in out if t not in layer_tensors and not t.endswith(".bias")]
    if missing:
        raise MergepipeError(f"featcal: layer has no tensor {missing[0]!r}")
    return out


def _layer_names(arch, layer: int, names: Iterable[str]) -> list[str]:
    """Full names of a layer's tensors; the adapter may drop derived ones (rotary inv_freq)."""
    if hasattr(arch, "layer_tensor_names"):
        return list(arch.layer_tensor_names(layer, names))
    return [n for n in names if n.startswith(arch.layer_prefix(layer))]


def _layer_tensors(arch, layer: int, src: Source, dev: torch.device,
                   only: Iterable[str] | None = None) -> dict[str, Tensor]:
    """fp32 tensors of a layer on `dev` (all, or only the relative names given), keyed relative to
    its prefix."""
    prefix = arch.layer_prefix(layer)
    if only is None:
        only = [n[len(prefix):] for n in _layer_names(arch, layer, src.names())]
    else:
        have = set(src.names())
        missing = [k for k in only if prefix + k not in have]
        if missing:
            raise MergepipeError(f"featcal: a checkpoint lacks {prefix + missing[0]!r}")
    return {k: src.get(prefix + k).to(dev, torch.float32) for k in only}


class LayerJournal(Protocol):
    """Where a run keeps each finished layer so that a killed one continues after it (the stage's
    journal in the staging folder). Streams are named student<i> / expert<i>."""
    def resumed(self) -> list[LayerReport]: ...  # layers 0.. an earlier run finished, in order
    def restore(self, streams: dict[str, Stream]) -> None: ...  # the streams as the last of them left them
    def finished(self, rep: LayerReport, streams: dict[str, Stream]) -> None: ...  # after its tensors are emitted


@torch.no_grad()  # forwards only: no autograd graph behind the hooked inputs
def calibrate(arch, base: Source, merged: Source, experts: Sequence[Source],
              ids: Sequence[Sequence[Sequence[int]]], params: FeatCalParams | dict | None,
              emit: Callable[[str, Tensor], None], **options: Any) -> Diagnostics:
    """Run FeatCal and `emit(name, fp32 CPU tensor)` each calibrated tensor once, right after it is
    solved. `options` are the keywords of `CalibrateOptions`: prefixes=None, ram_limit=4 << 30,
    tmp_dir=None, device="cpu", store_dtype=None, journal=None. Expert i calibrates layers <
    prefixes[i] (default: all); a layer no expert reaches keeps θ_m and is not emitted, nor is any
    tensor outside the layers or not calibratable.

    Layers, statistics and solves run on `device`; sources, the stem and the activation streams stay
    on the host (streams past `ram_limit` bytes are memory-mapped under `tmp_dir`). With `store_dtype`
    (the output dtype, or one per tensor name) each solution is rounded to it before it is emitted and
    before anything downstream runs through it, so later modules are calibrated against the weights as
    stored. With a `journal`, layers it reports finished are skipped (not read, not emitted) and the
    streams restored from it."""
    opt = CalibrateOptions(**options)
    p = params if isinstance(params, FeatCalParams) else FeatCalParams.from_dict(params)
    p.check()
    if len(ids) != len(experts):
        raise MergepipeError(f"featcal: calibration data for {len(ids)} experts, {len(experts)} experts given")
    L = arch.n_layers
    prefixes = [L] * len(experts) if opt.prefixes is None else [min(int(x), L) for x in opt.prefixes]
    if len(prefixes) != len(experts) or any(x < 0 for x in prefixes):
        raise MergepipeError("featcal: one non-negative layer prefix per expert is needed")
    seqs = [[list(s[:p.seq_len]) for s in x[:p.n]] for x in ids]
    for i, x in enumerate(seqs):
        if prefixes[i] and (not x or not all(x)):
            raise MergepipeError(f"featcal: expert {i} has no calibration sequence (or an empty one)")
        if any(not 0 <= t < arch.vocab_size for s in x for t in s):
            raise MergepipeError(f"featcal: expert {i}'s calibration ids leave [0, {arch.vocab_size})")
    diag = Diagnostics(list(prefixes), [sum(map(len, x)) for x in seqs])
    done = opt.journal.resumed() if opt.journal is not None else []
    diag.layers = list(done)
    pool = _StreamPool(opt.ram_limit, opt.tmp_dir)
    try:
        if done:
            student, teacher = _streams(arch, seqs, prefixes, p, pool, len(done))
            opt.journal.restore(_named(student, teacher))
        else:
            student, teacher = _stem(arch, merged, experts, seqs, prefixes, p, pool)
        diag.spilled_bytes = pool.spilled
        run = _Run(arch, base, merged, experts, seqs, prefixes, p, _plan(arch, p), torch.device(opt.device),
                   opt.store_dtype, emit, pool)
        for layer in range(len(done), L):
            active = [i for i in range(len(experts)) if prefixes[i] > layer]
            if not active:
                break
            diag.layers.append(_layer(run, layer, active, student, teacher))
            for i in active:
                if prefixes[i] == layer + 1:  # its last layer: free its streams now
                    for st in (student.pop(i), teacher.pop(i, None)):
                        if st is not None:
                            st.close()
            if opt.journal is not None:
                opt.journal.finished(diag.layers[-1], _named(student, teacher))
    finally:
        pool.cleanup()
    return diag


def _named(student: dict[int, Stream], teacher: dict[int, Stream]) -> dict[str, Stream]:
    out = {}
    for i in sorted(student):
        out[f"student{i}"] = student[i]
        if i in teacher:
            out[f"expert{i}"] = teacher[i]
    return out


def _streams(arch, seqs, prefixes, p: FeatCalParams, pool: _StreamPool,
             layer: int) -> tuple[dict[int, Stream], dict[int, Stream]]:
    """Empty streams of the experts still active at `layer`, for a journal to fill."""
    student, teacher = {}, {}
    for i in (i for i in range(len(seqs)) if prefixes[i] > layer):
        lengths = [len(s) for s in seqs[i]]
        student[i] = pool.new(lengths, arch.hidden_size, f"student{i}")
        if p.alpha > 0:
            teacher[i] = pool.new(lengths, arch.hidden_size, f"expert{i}")
    return student, teacher


def _stem(arch, merged: Source, experts: Sequence[Source], seqs, prefixes, p: FeatCalParams,
          pool: _StreamPool) -> tuple[dict[int, Stream], dict[int, Stream]]:
    """Student streams start from the merged model's embedding rows, expert streams from the
    expert's own (none when α = 0: x_t = x_s needs no expert forward)."""
    active = [i for i in range(len(experts)) if prefixes[i] > 0]
    merged_stem = _StemCache(merged, _unique_ids(s for i in active for s in seqs[i]))
    student, teacher = {}, {}
    for i in active:
        lengths = [len(s) for s in seqs[i]]
        student[i] = pool.new(lengths, arch.hidden_size, f"student{i}")
        _fill(student[i], seqs[i], p.batch_size, lambda x: arch.embed(x, merged_stem.rows, merged_stem.full))
        if p.alpha > 0:
            stem = _StemCache(experts[i], _unique_ids(seqs[i]))
            teacher[i] = pool.new(lengths, arch.hidden_size, f"expert{i}")
            _fill(teacher[i], seqs[i], p.batch_size, lambda x: arch.embed(x, stem.rows, stem.full))
    return student, teacher


def _fill(stream: Stream, seqs, batch_size: int, embed: Callable[[Tensor], Tensor]) -> None:
    j = 0
    for x, mask in batches(seqs, batch_size):
        # padding takes a real id of the batch, so no embedding row beyond the data's is read
        x = torch.where(mask.bool(), x, x[0, 0])
        stream.write(j, embed(x).float())
        j += x.shape[0]


@dataclass
class _LayerState:
    """One layer in progress: its index and active experts, the merged tensors (replaced by their
    solutions as they are stored), the base's calibrated tensors and the report."""
    layer: int
    active: list[int]
    m_t: dict[str, Tensor]
    b_t: dict[str, Tensor]
    rep: LayerReport


def _layer(run: _Run, layer: int, active: list[int], student: dict[int, Stream],
           teacher: dict[int, Stream]) -> LayerReport:
    """One layer: statistics per active expert folded into running sums, solved and emitted (all
    groups at once, or group by group in module order), then the student streams advance."""
    arch, plan, p = run.arch, run.plan, run.p
    m_t = _layer_tensors(arch, layer, run.merged, run.dev)
    st = _LayerState(layer, active, m_t, _layer_tensors(arch, layer, run.base, run.dev, _targets(plan, m_t, p)),
                     LayerReport(layer, list(active)))
    for g, specs in plan.groups.items():
        for spec in specs:
            d = m_t[f"{spec.name}.weight"].shape[1]
            st.rep.shapes[spec.name] = (d, d)
    for spec in plan.norms:
        st.rep.shapes[spec.name] = tuple(m_t[f"{spec.name}.weight"].shape)
    (_by_block if p.order == "block" else _by_module)(run, st, student, teacher)
    nxt = [i for i in active if run.prefixes[i] > layer + 1]
    if nxt:
        lc = arch.build_layer(layer, st.m_t)
        for i in nxt:
            _advance(arch, lc, student[i], run.seqs[i], p.batch_size, run.dev)
    return st.rep


def _expert_tensors(run: _Run, st: _LayerState, i: int) -> dict[str, Tensor]:
    """Expert i's layer: every tensor where its layer runs (α > 0), else only the calibrated ones."""
    whole = run.p.alpha > 0
    return _layer_tensors(run.arch, st.layer, run.experts[i], run.dev,
                          None if whole else _targets(run.plan, st.m_t, run.p))


def _by_block(run: _Run, st: _LayerState, student: dict[int, Stream], teacher: dict[int, Stream]) -> None:
    """The reference's order: every module's statistics behind the uncalibrated merged layer, one
    expert at a time (its stream advancing on the way), then every module solved at once."""
    arch, plan, p = run.arch, run.plan, run.p
    lm = arch.build_layer(st.layer, st.m_t)
    lin, nrm = _sums(plan, st.m_t, run.dev)
    for i in st.active:
        e_t = _expert_tensors(run, st, i)
        le = arch.build_layer(st.layer, e_t) if p.alpha > 0 else None
        stats = _collect(run, plan, lm, le, student[i], teacher.get(i), run.seqs[i],
                         run.prefixes[i] > st.layer + 1)
        _fold(plan, lin, nrm, stats, e_t, st.rep, p.eps)
        del e_t, le, stats
    del lm
    _store(run, st, _solve(plan, lin, nrm, st.m_t, st.b_t, p), _targets(plan, st.m_t, p))


def _by_module(run: _Run, st: _LayerState, student: dict[int, Stream], teacher: dict[int, Stream]) -> None:
    """Module order: each group (or norm) solved on the inputs that the merged layer, its upstream
    groups already calibrated, gives it: one forward of the layer per group and expert, stopped at
    the group's input. The expert layers do not change: each runs once, its Linear inputs kept as
    streams for the layer's duration, and its calibrated tensors are held until the layer is solved
    (each expert layer is read once)."""
    arch, p = run.arch, run.p
    e_t = {i: _expert_tensors(run, st, i) for i in st.active}
    linear = [specs[0].name for specs in run.plan.groups.values()]
    xe = {i: _teacher_inputs(run, st, i, arch.build_layer(st.layer, e_t[i]), teacher[i], linear)
          for i in st.active} if p.alpha > 0 else {}
    for step in run.plan.steps:
        lm = arch.build_layer(st.layer, st.m_t)
        lin, nrm = _sums(step, st.m_t, run.dev)
        name = step.hooked()[0]
        for i in st.active:
            stats = _step_stats(run, step, lm, student[i], xe[i][name] if i in xe and step.groups else None,
                                run.seqs[i])
            _fold(step, lin, nrm, stats, e_t[i], st.rep, p.eps)
        del lm
        _store(run, st, _solve(step, lin, nrm, st.m_t, st.b_t, p), _targets(step, st.m_t, p))
    for streams in xe.values():
        for s in streams.values():
            run.pool.free(s)


def _teacher_inputs(run: _Run, st: _LayerState, i: int, le, he: Stream, names: list[str]) -> dict[str, Stream]:
    """Expert i's layer over its stream, once: the input of each named module, as streams; the
    expert stream advances in place when the expert goes on to the next layer."""
    arch, dev = run.arch, run.dev
    lengths = [len(s) for s in run.seqs[i]]
    out: dict[str, Stream] = {}
    with _hooks(le, names) as seen:
        j = 0
        for _ids, mask in batches(run.seqs[i], run.p.batch_size):
            b, width = mask.shape
            y = _forward(arch, le, he.read(j, j + b, width).to(dev), mask.to(dev))
            for name in names:
                x = seen[name].float()
                _check_rows(x, b, width, name)
                if name not in out:
                    out[name] = run.pool.new(lengths, x.shape[-1], f"expert{i}-{name}")
                out[name].write(j, x)
            if run.prefixes[i] > st.layer + 1:
                he.write(j, y)
            j += b
    return out


def _step_stats(run: _Run, step: _Plan, lm, hs: Stream, xe: Stream | None, seqs) -> tuple[dict, dict]:
    """One expert's statistics for one step: the student forward stopped at the step's input, paired
    with the expert's kept input (None: x_t = x_s, or a norm, which needs no teacher)."""
    arch, p, dev = run.arch, run.p, run.dev
    name = step.hooked()[0]
    lin = {g: None for g in step.groups}
    nrm = {spec.name: None for spec in step.norms}
    with _hooks(lm, [name], stop=True) as seen:
        j = 0
        for _ids, mask in batches(seqs, p.batch_size):
            b, width = mask.shape
            mask = mask.to(dev)
            omega = mask.to(torch.float32)
            _forward(arch, lm, hs.read(j, j + b, width).to(dev), mask)
            x = seen[name].float()
            _check_rows(x, b, width, name)
            for g in step.groups:
                xt = None if xe is None else p.alpha * xe.read(j, j + b, width).to(dev) + (1 - p.alpha) * x
                _add_linear(lin, g, x, xt, omega, xe is None, dev)
            for spec in step.norms:
                _add_norm(nrm, spec, x, omega, dev)
            j += b
    return lin, nrm


def _sums(plan: _Plan, m_t: dict[str, Tensor], dev) -> tuple[dict, dict]:
    lin = {g: S.LinearSums.zeros(m_t[f"{specs[0].name}.weight"].shape[1], dev) for g, specs in plan.groups.items()}
    nrm = {spec.name: S.NormSums.zeros(m_t[f"{spec.name}.weight"].shape[-1], dev) for spec in plan.norms}
    return lin, nrm


def _fold(plan: _Plan, lin: dict, nrm: dict, stats: tuple[dict, dict], e_t: dict[str, Tensor],
          rep: LayerReport, eps: float) -> None:
    """One expert's statistics and weights into the running sums of the plan's modules."""
    lin_stats, nrm_stats = stats
    for g, specs in plan.groups.items():
        s = S.fold_linear(lin[g], lin_stats[g].moments(),
                          {sp.name: (e_t[f"{sp.name}.weight"], e_t.get(f"{sp.name}.bias")) for sp in specs}, eps)
        rep.scales.setdefault(g, []).append(s)
    for spec in plan.norms:
        m, e = nrm_stats[spec.name].moments()
        S.fold_norm(nrm[spec.name], m, e, e_t[f"{spec.name}.weight"],
                    e_t.get(f"{spec.name}.bias") if spec.kind == "layernorm" else None)


def _store(run: _Run, st: _LayerState, solved: dict[str, Tensor], targets: list[str]) -> None:
    """Round each solution to its stored dtype, emit it, and put it in the layer in place of θ_m."""
    pre = run.arch.layer_prefix(st.layer)
    for k in targets:
        new, old = solved.pop(k), st.m_t[k]
        dtype = run.store_dtype.get(pre + k) if isinstance(run.store_dtype, dict) else run.store_dtype
        if dtype is not None:
            new = new.to(dtype).float()
        st.rep.rel_change[pre + k] = float((new.double() - old.double()).norm()
                                           / max(float(old.double().norm()), 1e-30))
        run.emit(pre + k, new.to(CPU, copy=True))  # a copy: the caller may convert it in place
        st.m_t[k] = new


def _collect(run: _Run, plan: _Plan, lm, le, hs: Stream, he: Stream | None, seqs,
             write_teacher: bool) -> tuple[dict, dict]:
    """One expert's statistics for every module of the layer (block order); advances its expert
    stream in place when asked."""
    arch, p, dev = run.arch, run.p, run.dev
    same = le is None
    names = plan.hooked()
    lin = {g: None for g in plan.groups}
    nrm = {spec.name: None for spec in plan.norms}
    with _hooks(lm, names) as lm_in, _hooks(le, names) if le is not None else nullcontext() as le_in:
        j = 0
        for _ids, mask in batches(seqs, p.batch_size):
            b, width = mask.shape
            mask = mask.to(dev)
            omega = mask.to(torch.float32)
            _forward(arch, lm, hs.read(j, j + b, width).to(dev), mask)
            if le is not None:
                out = _forward(arch, le, he.read(j, j + b, width).to(dev), mask)
                if write_teacher:
                    he.write(j, out)
            for g, specs in plan.groups.items():
                xs = lm_in[specs[0].name].float()
                _check_rows(xs, b, width, specs[0].name)
                xt = None if same else p.alpha * le_in[specs[0].name].float() + (1 - p.alpha) * xs
                _add_linear(lin, g, xs, xt, omega, same, dev)
            for spec in plan.norms:
                x = lm_in[spec.name].float()
                _check_rows(x, b, width, spec.name)
                _add_norm(nrm, spec, x, omega, dev)
            j += b
    return lin, nrm


def _add_linear(lin: dict, g: str, x: Tensor, xt: Tensor | None, omega: Tensor, same: bool, dev) -> None:
    """One batch into group g's statistics, created at the first batch (its width is the input's)."""
    if lin[g] is None:
        lin[g] = S.LinearStats.zeros(x.shape[-1], same=same, device=dev)
    lin[g].add(x, xt, omega)


def _add_norm(nrm: dict, spec, x: Tensor, omega: Tensor, dev) -> None:
    if nrm[spec.name] is None:
        nrm[spec.name] = S.NormStats.zeros(x.shape[-1], device=dev)
    nrm[spec.name].add(x, omega, spec.kind, spec.eps)


def _check_rows(x: Tensor, b: int, width: int, name: str) -> None:
    if x.dim() < 3 or tuple(x.shape[:2]) != (b, width):
        raise MergepipeError(f"featcal: input of {name} has shape {tuple(x.shape)}, expected [{b}, {width}, ...]")


def _advance(arch, layer_module, stream: Stream, seqs, batch_size: int, dev: torch.device) -> None:
    """The student stream through the calibrated layer, in place."""
    j = 0
    for _ids, mask in batches(seqs, batch_size):
        b, width = mask.shape
        stream.write(j, arch.forward_layer(layer_module, stream.read(j, j + b, width).to(dev), mask.to(dev)))
        j += b


def _solve(plan: _Plan, lin: dict[str, S.LinearSums], nrm: dict[str, S.NormSums], m_t: dict[str, Tensor],
           b_t: dict[str, Tensor], p: FeatCalParams) -> dict[str, Tensor]:
    """Every calibrated tensor of the layer (relative name -> fp32), anchors ρθ_m + (1−ρ)θ₀. Each
    group's sums are dropped once solved, and each solution is cast to fp32 at once: the fp64 peak
    is one group, not the layer."""
    def anchor(k: str) -> Tensor:
        return S.anchor(m_t[k], b_t[k], p.rho)
    out: dict[str, Tensor] = {}
    for g, specs in plan.groups.items():
        anchors = {}
        for spec in specs:
            wk, bk = f"{spec.name}.weight", f"{spec.name}.bias"
            anchors[spec.name] = (anchor(wk), anchor(bk) if bk in b_t else None)
        for name, (w, b) in S.solve_linear(lin.pop(g), anchors, p.lam, p.eps).items():
            out[f"{name}.weight"] = w.float()
            if b is not None:
                out[f"{name}.bias"] = b.float()
    for spec in plan.norms:
        wk, bk = f"{spec.name}.weight", f"{spec.name}.bias"
        shape = m_t[wk].shape
        sums = nrm.pop(spec.name)
        if spec.kind == "layernorm" and bk in b_t:
            g, b = S.solve_layernorm(sums, anchor(wk), anchor(bk), p.lam, p.eps)
            out[wk], out[bk] = g.reshape(shape).float(), b.reshape(shape).float()
        else:  # RMSNorm, or a LayerNorm without bias: γ* is the same weighted mean
            out[wk] = S.solve_rmsnorm(sums, anchor(wk), p.lam, p.eps).reshape(shape).float()
    return out
