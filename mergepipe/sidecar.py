"""The sketch sidecar of one expert: a safetensors file with one U8 tensor per sketched tensor, the
sketches of its blocks back to back, so block b's sketch is one byte range. Beside it, in the
catalog, each block's hash and exact residual norm ||Delta_b - S_b||_F.
"""

from __future__ import annotations

import collections
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import xxhash

from . import blocks as B
from .checkpoint import TensorInfo, read_header
from .publish import layout
from .sketch import SketchSpec


def identity(path: Path) -> str:
    """A sidecar's identity as a manifest records it: its size and header (which fixes every
    tensor's place); each block's content is checked against its own hash as it is read."""
    header = read_header(path)
    return xxhash.xxh3_128_hexdigest(f"{header.size}:{header.header_hash}".encode())


def sketched(info: TensorInfo) -> bool:
    """Tensors with a sketch: floating, at least 2-D (1-D ones are small and read exactly)."""
    return info.is_float and len(info.shape) >= 2 and info.numel > 0


def block_sizes(spec: SketchSpec, info: TensorInfo) -> np.ndarray:
    cols = info.numel // info.shape[0]
    return np.array([spec.nbytes(blk.row_end - blk.row_start, cols) for blk in B.blocks(info)], np.int64)


@dataclass
class SketchTensor:
    start: int  # absolute offset of the tensor's sketches in the sidecar
    sizes: np.ndarray  # bytes per block
    hashes: np.ndarray  # uint64 xxh3_64 per block
    residual: np.ndarray  # float64 ||Delta_b - S_b||_F per block

    def block_range(self, b: int) -> tuple[int, int]:
        start = self.start + int(self.sizes[:b].sum())
        return start, start + int(self.sizes[b])


@dataclass
class SketchIndex:
    path: Path
    spec: SketchSpec
    size: int
    hash: str  # its identity (see `identity`)
    tensors: dict[str, SketchTensor]

    def bytes(self, name: str) -> np.ndarray | None:
        t = self.tensors.get(name)
        return None if t is None else t.sizes


POOL = 2  # encoding threads (torch single-threaded in each, as everywhere in the stream)
_POOLS: list[ThreadPoolExecutor] = []


def _pool() -> ThreadPoolExecutor:
    if not _POOLS:
        _POOLS.append(ThreadPoolExecutor(POOL, thread_name_prefix="mergepipe-sketch"))
    return _POOLS[0]


class SidecarWriter:
    """Writes one expert's sidecar as its blocks are encoded (in any order), then publishes it."""

    def __init__(self, path: Path, spec: SketchSpec, tensors: dict[str, TensorInfo]) -> None:
        self.path, self.spec = path, spec
        names = [n for n, info in tensors.items() if sketched(info)]
        self.sizes = {n: block_sizes(spec, tensors[n]) for n in names}
        self.layout = layout(path.name, [(n, "U8", (int(self.sizes[n].sum()),)) for n in names])
        # where each block's sketch starts: its tensor's offset plus the sizes of the blocks before it
        starts = {t.name: t.offset for t in self.layout.tensors}
        self.starts = {n: starts[n] + np.concatenate(([0], np.cumsum(s)[:-1])) for n, s in self.sizes.items()}
        self.hashes = {n: np.zeros(len(s), np.uint64) for n, s in self.sizes.items()}
        self.residual = {n: np.zeros(len(s)) for n, s in self.sizes.items()}
        path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
        self.fd = os.open(self.tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        self._pending: collections.deque = collections.deque()
        os.ftruncate(self.fd, self.layout.size)
        os.pwrite(self.fd, self.layout.header, 0)

    def block(self, name: str, b: int, delta) -> None:
        """Encode block b of tensor `name` (its float32 delta as a torch tensor, rows first) on the
        pool: the indexer's own thread goes on reading and hashing meanwhile."""
        if len(self._pending) >= 2 * POOL:
            self._pending.popleft().result()
        self._pending.append(_pool().submit(self._encode, name, b, delta))

    def _encode(self, name: str, b: int, delta) -> None:
        import torch
        d = delta.reshape(delta.shape[0], -1)
        raw, approx = self.spec.encode(d)
        os.pwrite(self.fd, memoryview(raw), int(self.starts[name][b]))
        self.hashes[name][b] = xxhash.xxh3_64_intdigest(raw)
        self.residual[name][b] = float(torch.linalg.vector_norm(torch.sub(d, approx, out=approx), dtype=torch.float64))

    def _drain(self) -> None:
        while self._pending:
            self._pending.popleft().result()

    def finish(self, final: Path) -> SketchIndex:
        self._drain()
        os.fsync(self.fd)
        os.close(self.fd)
        os.replace(self.tmp, final)
        tensors = {n: SketchTensor(int(self.starts[n][0]), self.sizes[n], self.hashes[n], self.residual[n]) for n in self.sizes}
        return SketchIndex(final, self.spec, self.layout.size, identity(final), tensors)

    def abort(self) -> None:
        try:
            self._drain()
        except BaseException:  # noqa: BLE001 - the run already failed; its error is the one to report
            pass
        os.close(self.fd)
        self.tmp.unlink(missing_ok=True)
