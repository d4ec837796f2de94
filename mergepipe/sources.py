"""Block sources: where each (model, block) a kernel sees comes from, checked, and seen as float32.

A plan names, per (expert, block), one source: an exact byte range of the expert's file, checked
against its indexed hash as it streams, or nothing (the delta counts as zero). The base's blocks are
always exact. Kernels receive `BlockInputs`: float32 views of the sources, converted range by range
on demand so a kernel can keep its operands in cache, never raw bytes and a dtype.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import xxhash

from . import blocks as B
from . import floats
from .checkpoint import DTYPES, Model, TensorInfo, check_family, nonfinite, open_model, read_header
from .sidecar import block_sizes
from .errors import InputChangedError, MergepipeError
from .operators import TensorParams
from .sketch import SketchSpec

LOOKAHEAD = 3  # items whose byte ranges are announced to the kernel (WILLNEED) before they are read


@dataclass(frozen=True)
class StoredTensor:
    """One model's copy of a tensor: where its bytes are and what each block must hash to."""
    model: int  # -1 for the base, k for expert k
    file: str  # this machine's path of the file
    recorded: str  # the file's name as the manifest records it (relative to the model's folder)
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int
    hashes: tuple[int, ...]  # indexed xxh3_64 per block

    @property
    def info(self) -> TensorInfo:
        return TensorInfo("", Path(self.file), self.dtype, self.shape, self.start, self.end)


@dataclass(frozen=True)
class Exact:
    """Block b of one stored tensor, read byte for byte. Every source has: the model it is about,
    the file and byte range to read, the key its bytes are counted under, a hash check, and its
    float32 view."""
    tensor: StoredTensor
    block: B.Block

    @property
    def model(self) -> int:
        return self.tensor.model

    @property
    def file(self) -> str:
        return self.tensor.file

    @property
    def start(self) -> int:
        return self.block.start

    @property
    def end(self) -> int:
        return self.block.end

    @property
    def key(self) -> tuple[int, str]:
        return self.tensor.model, self.tensor.recorded

    def check(self, raw: np.ndarray, name: str) -> None:
        if xxhash.xxh3_64_intdigest(raw) != self.tensor.hashes[self.block.index]:
            raise InputChangedError(f"{self.tensor.file}: changed since planning (block {self.block.index} of "
                                    f"tensor {name!r} does not match its recorded hash)")

    def nonfinite(self, raw: np.ndarray) -> bool:
        return nonfinite(raw, self.tensor.dtype)

    def view(self, raw: np.ndarray, base: F32Block) -> F32Block:
        return F32Block(raw, self.tensor.dtype)


@dataclass(frozen=True)
class StoredSketch:
    """One expert's sketches of one tensor in its sidecar: where each block's bytes are, and their hashes."""
    model: int
    file: str
    recorded: str  # the sidecar as the manifest records it
    spec: SketchSpec
    starts: tuple[int, ...]  # per block, absolute offset in the sidecar
    ends: tuple[int, ...]
    hashes: tuple[int, ...]


@dataclass(frozen=True)
class Sketched:
    """Block b of an expert filled from its sketch: base + S_b, never the expert's own bytes."""
    sketch: StoredSketch
    block: B.Block  # the block in the tensor (its rows)
    cols: int

    @property
    def model(self) -> int:
        return self.sketch.model

    @property
    def file(self) -> str:
        return self.sketch.file

    @property
    def start(self) -> int:
        return self.sketch.starts[self.block.index]

    @property
    def end(self) -> int:
        return self.sketch.ends[self.block.index]

    @property
    def key(self) -> tuple[int, str]:
        return self.sketch.model, self.sketch.recorded

    def check(self, raw: np.ndarray, name: str) -> None:
        if xxhash.xxh3_64_intdigest(raw) != self.sketch.hashes[self.block.index]:
            raise InputChangedError(f"{self.sketch.file}: changed since planning (the sketch of block "
                                    f"{self.block.index} of tensor {name!r} does not match its recorded hash)")

    def nonfinite(self, raw: np.ndarray) -> bool:
        return False  # a sketch of a finite delta is finite; a non-finite one is never sketched

    def view(self, raw: np.ndarray, base: F32Block) -> F32Block:
        return FilledBlock(base, self.sketch.spec, raw, self.block.row_end - self.block.row_start, self.cols)


@dataclass(frozen=True)
class TensorSources:
    """Everything the kernel of one output tensor reads: the base, and per expert the blocks the plan
    reads exactly (the others are omitted). Picklable: a worker elsewhere can run it."""
    name: str
    shape: tuple[int, ...]
    out_dtype: str
    base: StoredTensor
    experts: tuple[StoredTensor, ...]
    exact: tuple[frozenset[int], ...]  # per expert
    params: TensorParams | None  # None: not merged (a non-float tensor, copied)
    data: dict | None = None  # the operator's per-tensor plan data
    sketched: tuple[frozenset[int], ...] = ()  # per expert: blocks filled from its sketch
    sketches: tuple[StoredSketch | None, ...] = ()

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def n_blocks(self) -> int:
        return B.n_blocks(self.shape)

    def reads(self, b: int) -> list[Exact | Sketched]:
        """Block b's sources, base first, then each expert read here (exactly or from its sketch), in
        order; an expert omitted here has none."""
        out: list[Exact | Sketched] = [Exact(self.base, B.block(self.base.info, b))]
        for k, (e, sel) in enumerate(zip(self.experts, self.exact)):
            if b in sel:
                out.append(Exact(e, B.block(e.info, b)))
            elif self.sketched and b in self.sketched[k]:
                out.append(Sketched(self.sketches[k], B.block(e.info, b), self.numel // self.shape[0]))
        return out


class F32Block:
    """A stored block seen as float32 (bit-exact widening)."""

    def __init__(self, raw: np.ndarray, dtype: str) -> None:
        self._raw, self._dtype = raw, dtype
        self._dev = None

    @property
    def numel(self) -> int:
        return self._raw.nbytes // DTYPES[self._dtype][1]

    @property
    def numpy_ok(self) -> bool:
        return self._dtype in floats.ITEMSIZE

    @property
    def pairable(self) -> bool:
        return self._dtype == "BF16"

    def values(self, lo: int, hi: int, out: np.ndarray, pairs: bool = False) -> np.ndarray:
        """Entries [lo, hi) into float32 `out` (pairs: floats.to_f32's paired layout)."""
        isz = floats.ITEMSIZE[self._dtype]
        return floats.to_f32(self._raw[lo * isz:hi * isz], self._dtype, out, pairs)

    def tensor(self, dev, lo: int = 0, hi: int | None = None):
        """Entries [lo, hi) as a float32 torch tensor on `dev`; the stored bytes move to a GPU once,
        before widening."""
        if self._dev is None:
            from .tensors import raw_view
            self._dev = raw_view(self._raw, self._dtype, (-1,), dev)
        return self._dev[lo:hi].float()

    def into(self, dst, lo: int = 0) -> None:
        """Entries [lo, lo + len(dst)) widened into float32 tensor `dst` (one pass, no temporary)."""
        from .tensors import raw_view
        if self._dev is None or self._dev.device != dst.device:
            self._dev = raw_view(self._raw, self._dtype, (-1,), dst.device)
        dst.copy_(self._dev[lo:lo + dst.numel()])


class FilledBlock(F32Block):
    """An expert block filled from its sketch: base + S, decoded and added range by range as the
    kernel asks (so a range's operands stay in cache and the base is widened once per range)."""

    def __init__(self, base: F32Block, spec: SketchSpec, raw: np.ndarray, rows: int, cols: int) -> None:
        self._base, self._spec, self._raw, self._shape = base, spec, raw, (rows, cols)
        self._dev = None

    @property
    def numel(self) -> int:
        return self._shape[0] * self._shape[1]

    @property
    def numpy_ok(self) -> bool:
        return True

    @property
    def pairable(self) -> bool:
        return self._base.pairable

    def values(self, lo: int, hi: int, out: np.ndarray, pairs: bool = False) -> np.ndarray:
        self._base.values(lo, hi, out, pairs)
        return self._spec.add_range(self._raw, *self._shape, lo, hi, out, pairs)

    def tensor(self, dev, lo: int = 0, hi: int | None = None):
        import torch
        hi = self.numel if hi is None else hi
        sketch = torch.from_numpy(self._spec.decode_range(self._raw, *self._shape, lo, hi))
        return self._base.tensor(dev, lo, hi) + sketch.to(dev)

    def into(self, dst, lo: int = 0) -> None:
        dst.copy_(self.tensor(dst.device, lo, lo + dst.numel()))


class BlockInputs:
    """One block's sources as float32 views: the base and the experts read here, with the guard that
    turns a non-finite result into an error naming the input."""

    def __init__(self, job: TensorSources, b: int, reads: list[Exact], raws: list[np.ndarray],
                 allow_nonfinite: bool) -> None:
        self.job, self.b, self._reads, self._raws = job, b, reads, raws
        self._allow = allow_nonfinite
        self.base = F32Block(raws[0], reads[0].tensor.dtype)
        self.experts = [(r.model, r.view(raw, self.base)) for r, raw in zip(reads[1:], raws[1:])]
        self.row_start = reads[0].block.row_start
        self.row_end = reads[0].block.row_end
        self.first = (reads[0].block.start - reads[0].tensor.start) // DTYPES[reads[0].tensor.dtype][1]

    @classmethod
    def of(cls, base: tuple[np.ndarray, str], experts: list[tuple[np.ndarray, str]], out_dtype: str) -> BlockInputs:
        """A one-block input from raw arrays (raw bytes, dtype): for calling kernels directly."""
        n = base[0].nbytes // DTYPES[base[1]][1]

        def stored(k: int, dtype: str) -> Exact:
            t = StoredTensor(k, "<array>", "<array>", dtype, (n,), 0, n * DTYPES[dtype][1], (0,))
            return Exact(t, B.block(t.info, 0))
        reads = [stored(-1, base[1])] + [stored(k, d) for k, (_, d) in enumerate(experts)]
        job = TensorSources("<array>", (n,), out_dtype, reads[0].tensor, tuple(r.tensor for r in reads[1:]),
                            tuple(frozenset({0}) for _ in experts), None)
        return cls(job, 0, reads, [base[0], *(raw for raw, _ in experts)], allow_nonfinite=True)

    @property
    def read_bytes(self) -> int:
        return sum(len(r) for r in self._raws)

    def numpy_ok(self) -> bool:
        return self.job.out_dtype in floats.ITEMSIZE and self.base.numpy_ok and all(x.numpy_ok for _, x in self.experts)

    def paired(self, n: int) -> bool:
        """Whether n entries of every input and the output can take floats' paired bfloat16 layout."""
        return (n % 2 == 0 and floats.LITTLE_ENDIAN and self.job.out_dtype == "BF16" and self.base.pairable
                and all(x.pairable for _, x in self.experts))

    def check_finite(self, finite: bool) -> None:
        """A NaN or Inf in any input of a merged block reaches the result, so one check of the result
        replaces a scan of every input; only a hit looks at the inputs."""
        if self._allow or finite:
            return
        for r, raw in zip(self._reads, self._raws):
            if r.nonfinite(raw):
                raise MergepipeError(f"{r.file}: block {self.b} of tensor {self.job.name!r} holds NaN or Inf "
                                     "(pass --allow-nonfinite to merge it anyway)")
        raise MergepipeError(f"tensor {self.job.name!r}: block {self.b} of the merge overflows {self.job.out_dtype} "
                             "(check the weights; pass --allow-nonfinite to write it anyway)")

    def base_copy(self) -> np.ndarray:
        """The base block in the output dtype, bit for bit where the dtypes agree."""
        raw, dtype = self._raws[0], self._reads[0].tensor.dtype
        if dtype == self.job.out_dtype:
            return raw
        if self.numpy_ok():
            return floats.cast(raw, dtype, self.job.out_dtype)
        import torch
        from .tensors import raw_view, to_bytes, torch_dtype
        return to_bytes(raw_view(raw, dtype, (-1,), torch.device("cpu")).to(torch_dtype(self.job.out_dtype)))

    def base_plus_zero(self) -> np.ndarray:
        """base + 0.0 in the output dtype: the base, with each -0.0 as +0.0."""
        out = self.base_copy()
        width = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}[DTYPES[self.job.out_dtype][1]]
        bits = out.view(width)
        neg_zero = width(1 << (8 * bits.itemsize - 1))
        hits = bits == neg_zero
        if hits.any():
            out = out.copy()
            out.view(width)[hits] = 0
        return out


# --- the recorded inputs ---------------------------------------------------------------------------

def resolve_ref(ref: str, root: Path | None) -> str:
    p = Path(ref).expanduser()
    if not p.is_absolute() and root is not None and (root / p).exists():
        return str(root / p)
    return ref


@dataclass(frozen=True)
class OpenedModel:
    """A model opened from its manifest record, its files checked against it."""
    model: Model
    ref: str  # as recorded
    hashes: dict[tuple[str, str], tuple[int, ...]]  # (recorded file name, tensor) -> block hashes
    sketch: dict[str, StoredSketch] | None = None  # tensor -> its sketches, where the plan uses them

    def stored(self, index: int, tensor: str) -> StoredTensor:
        info = self.model.tensors[tensor]
        recorded = os.path.relpath(info.file, self.model.root)
        hashes = self.hashes.get((recorded, tensor))
        if hashes is None:
            raise MergepipeError(f"manifest: no block hashes recorded for tensor {tensor!r} of {info.file}")
        return StoredTensor(index, str(info.file), recorded, info.dtype, info.shape, info.start, info.end, hashes)


def open_recorded(records, root: Path | None, allow_pickle: bool) -> list[OpenedModel]:
    """Open the base and experts a manifest records (base first) and check each file's size, header
    and block-hash records against it. Reads headers only; block contents are checked as they stream."""
    opened = []
    for rec in records:
        model = open_model(resolve_ref(rec.ref, root), allow_pickle)
        by_name = {os.path.relpath(fh.path, model.root): fh for fh in model.files}
        hashes = {}
        for f in rec.files:
            fh = by_name.get(f.name)
            if fh is None:
                raise InputChangedError(f"{model.root / f.name}: input file recorded in the manifest is missing")
            if fh.size != f.size or fh.header_hash != f.header_hash:
                raise InputChangedError(f"{fh.path}: changed since planning (expected {f.size} bytes, header {f.header_hash})")
            for tensor, hx in f.blocks.items():
                info = fh.tensors.get(tensor)
                nb = B.n_blocks(info.shape) if info is not None else 0
                values = _hashes(hx, nb)
                if info is None or values is None:
                    raise MergepipeError(f"manifest: block hashes of tensor {tensor!r} of {fh.path} do not fit "
                                         f"the file (expected {nb} hashes of 16 hex digits)")
                hashes[(f.name, tensor)] = values
        sketches = _open_sketch(rec.sketch, len(opened) - 1, model, root) if rec.sketch else None
        opened.append(OpenedModel(model, rec.ref, hashes, sketches))
    check_family(opened[0].model, [o.model for o in opened[1:]])  # a hand-edited manifest can pair models that do not fit
    return opened


def _hashes(hx: str, n: int) -> tuple[int, ...] | None:
    """n block hashes from their concatenated 16-hex-digit form; None if it is not that."""
    try:
        values = tuple(int(v) for v in np.frombuffer(bytes.fromhex(hx), dtype=">u8"))
    except ValueError:
        return None
    return values if len(values) == n else None


def _open_sketch(rec, index: int, model: Model, root: Path | None) -> dict[str, StoredSketch]:
    """An expert's sidecar as recorded: its size and layout checked (headers only; each block's
    sketch is checked against its hash as it streams)."""
    path = Path(resolve_ref(rec.path, root))
    try:
        spec = SketchSpec.make(rec.kind, **rec.params)
    except MergepipeError as e:
        raise MergepipeError(f"manifest: sketch of {rec.path}: {e}") from None
    if not path.is_file() or path.stat().st_size != rec.size:
        raise InputChangedError(f"{path}: sketch sidecar recorded in the manifest is missing or changed "
                                f"(expected {rec.size} bytes); index the expert again with the same sketch")
    header = read_header(path)
    out = {}
    for name, hx in rec.blocks.items():
        info, t = model.tensors.get(name), header.tensors.get(name)
        sizes = block_sizes(spec, info) if info is not None else None
        if t is None or sizes is None or t.end - t.start != int(sizes.sum()):
            raise InputChangedError(f"{path}: the sketch of tensor {name!r} does not fit the model")
        ends = t.start + np.cumsum(sizes)
        hashes = _hashes(hx, len(sizes))
        if hashes is None:
            raise MergepipeError(f"manifest: sketch blocks of {name!r} need {len(sizes)} hashes of 16 hex digits")
        out[name] = StoredSketch(index, str(path), rec.path, spec, tuple(int(e) for e in ends - sizes),
                                 tuple(int(e) for e in ends), hashes)
    return out


def stream(items: list, reader, depth: int = 4):
    """(item, raws) for items (..., reads) in order, read ahead on a background thread; the kernel is
    hinted LOOKAHEAD items ahead. Hashes are checked by the consumer (on the compute pool)."""
    def hint(i: int) -> None:
        if i < len(items):
            for r in items[i][-1]:
                reader.prefetch(r.file, r.start, r.end)

    for i in range(min(LOOKAHEAD, len(items))):
        hint(i)

    def load(i: int):
        hint(i + LOOKAHEAD)
        return [reader.read(r.file, r.start, r.end) for r in items[i][-1]]

    for i, raws in B.read_ahead(range(len(items)), load, depth):
        yield items[i], raws
