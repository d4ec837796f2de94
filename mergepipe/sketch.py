"""Delta sketches: a compact approximation S of each block of an expert's delta from the base, written
by the indexer (which reads every expert byte once anyway) and used to fill the blocks a budgeted
plan does not read exactly. Plain functions over float32 numpy arrays.

A block's sketch is one run of bytes, so the plan can read it as one range and check it against one
hash. Kinds (the byte counts are per element of a 2-D block):
- `sign`: one bit per entry (the sign of the delta) and one float16 scale per `rows` rows, the mean
  |delta| there (the scale that minimises ||Delta - s * sign(Delta)|| for that group). 1/8 byte.
- `q2`: two bits per entry, levels lo + (hi - lo) * {0, 1/3, 2/3, 1} with float16 lo and hi per
  `group` consecutive entries. 1/4 byte + 4 / group.
- `q2n`: two bits per entry, the Gaussian least-squares levels scaled by one float16 RMS per `group`
  consecutive entries. 1/4 byte + 2 / group.
1-D tensors (norms, biases) are not sketched: they are small, and the planner reads them exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import MergepipeError

KINDS = {"sign": {"rows": 16}, "q2": {"group": 64}, "q2n": {"group": 64}}
# Lloyd-Max levels of a unit Gaussian for 2 bits, and the thresholds between them: the least-squares
# 2-bit code of normally distributed entries, in units of their group's RMS
NORMAL_LEVELS = np.array([-1.5104, -0.4528, 0.4528, 1.5104], np.float32)
NORMAL_CUTS = np.array([-0.9816, 0.0, 0.9816], np.float32)


@dataclass(frozen=True)
class SketchSpec:
    kind: str
    params: tuple[tuple[str, int], ...]  # sorted (name, value): hashable, recorded in the manifest

    @staticmethod
    def make(kind: str, **params) -> SketchSpec:
        if kind not in KINDS:
            raise MergepipeError(f"sketch kind {kind!r} is not known (expected one of {', '.join(KINDS)})")
        unknown = set(params) - set(KINDS[kind])
        if unknown:
            raise MergepipeError(f"sketch {kind!r} takes no parameter {sorted(unknown)[0]!r}")
        full = {**KINDS[kind], **params}
        if any(not isinstance(v, int) or isinstance(v, bool) or v < 1 for v in full.values()):
            raise MergepipeError(f"sketch {kind!r} parameters must be integers >= 1 (got {full})")
        return SketchSpec(kind, tuple(sorted(full.items())))

    @property
    def key(self) -> str:
        return self.kind + "".join(f"-{k}{v}" for k, v in self.params)

    def param(self, name: str) -> int:
        return dict(self.params)[name]

    def nbytes(self, rows: int, cols: int) -> int:
        """Bytes of the sketch of a rows x cols block."""
        n = rows * cols
        if self.kind == "sign":
            return -(-n // 8) + 2 * -(-rows // self.param("rows"))
        groups = -(-n // self.param("group"))
        return -(-n // 4) + (4 if self.kind == "q2" else 2) * groups

    def encode(self, delta: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(sketch bytes, decoded sketch) of a 2-D float32 block."""
        if self.kind == "sign":
            return _sign_encode(delta, self.param("rows"))
        if self.kind == "q2n":
            return _q2n_encode(delta, self.param("group"))
        return _q2_encode(delta, self.param("group"))

    def decode(self, raw: np.ndarray, rows: int, cols: int) -> np.ndarray:
        if len(raw) != self.nbytes(rows, cols):
            raise MergepipeError(f"sketch block has {len(raw)} bytes, expected {self.nbytes(rows, cols)}")
        if self.kind == "sign":
            return _sign_decode(raw, rows, cols, self.param("rows"))
        if self.kind == "q2n":
            return _q2n_decode(raw, rows, cols, self.param("group"))
        return _q2_decode(raw, rows, cols, self.param("group"))


def _sign_encode(d: np.ndarray, rows: int) -> tuple[np.ndarray, np.ndarray]:
    r, c = d.shape
    groups = -(-r // rows)
    padded = np.zeros((groups * rows, c), np.float32)
    padded[:r] = np.abs(d)
    counts = np.full(groups, rows * c, np.float64)
    counts[-1] = (r - (groups - 1) * rows) * c
    scale = (padded.reshape(groups, -1).sum(axis=1, dtype=np.float64) / counts).astype(np.float16)
    bits = np.packbits(d.reshape(-1) >= 0)
    raw = np.concatenate([bits, scale.view(np.uint8)])
    return raw, _sign_decode(raw, r, c, rows)


def _sign_decode(raw: np.ndarray, r: int, c: int, rows: int) -> np.ndarray:
    n = r * c
    nb = -(-n // 8)
    signs = np.unpackbits(raw[:nb], count=n).astype(np.float32) * 2 - 1
    scale = raw[nb:].view(np.float16).astype(np.float32)
    per_row = np.repeat(scale, rows)[:r]
    return (signs.reshape(r, c) * per_row[:, None]).astype(np.float32)


def _q2_encode(d: np.ndarray, group: int) -> tuple[np.ndarray, np.ndarray]:
    r, c = d.shape
    flat = d.reshape(-1)
    n = len(flat)
    groups = -(-n // group)
    padded = np.zeros(groups * group, np.float32)
    padded[:n] = flat
    if n % group:  # the last group's padding must not widen its range
        padded[n:] = flat[(groups - 1) * group]
    g = padded.reshape(groups, group)
    lo = g.min(axis=1).astype(np.float16)
    hi = g.max(axis=1).astype(np.float16)
    lo32, hi32 = lo.astype(np.float32), hi.astype(np.float32)
    step = (hi32 - lo32) / 3
    q = np.where(step[:, None] > 0, np.rint((g - lo32[:, None]) / np.where(step > 0, step, 1)[:, None]), 0)
    q = np.clip(q, 0, 3).astype(np.uint8).reshape(-1)[:n]
    raw = np.concatenate([_pack2(q), np.stack([lo, hi], axis=1).reshape(-1).view(np.uint8)])
    return raw, _q2_decode(raw, r, c, group)


def _q2_decode(raw: np.ndarray, r: int, c: int, group: int) -> np.ndarray:
    n = r * c
    nc = -(-n // 4)
    q = _unpack2(raw[:nc], n)
    lohi = raw[nc:].view(np.float16).astype(np.float32).reshape(-1, 2)
    idx = np.arange(n) // group
    lo, hi = lohi[idx, 0], lohi[idx, 1]
    return (lo + (hi - lo) / 3 * q.astype(np.float32)).reshape(r, c).astype(np.float32)


def _pack2(q: np.ndarray) -> np.ndarray:
    q = np.concatenate([q.astype(np.uint8), np.zeros(-len(q) % 4, np.uint8)]).reshape(-1, 4)
    return (q[:, 0] | (q[:, 1] << 2) | (q[:, 2] << 4) | (q[:, 3] << 6)).astype(np.uint8)


def _unpack2(codes: np.ndarray, n: int) -> np.ndarray:
    return np.stack([codes & 3, (codes >> 2) & 3, (codes >> 4) & 3, codes >> 6], axis=1).reshape(-1)[:n]


def _q2n_encode(d: np.ndarray, group: int) -> tuple[np.ndarray, np.ndarray]:
    r, c = d.shape
    flat = d.reshape(-1)
    n = len(flat)
    groups = -(-n // group)
    padded = np.zeros(groups * group, np.float32)
    padded[:n] = flat
    counts = np.full(groups, group, np.float64)
    counts[-1] = n - (groups - 1) * group
    rms = np.sqrt((padded.astype(np.float64) ** 2).reshape(groups, group).sum(axis=1) / counts).astype(np.float16)
    scale = np.repeat(rms.astype(np.float32), group)[:n]
    q = np.searchsorted(NORMAL_CUTS, np.divide(flat, scale, out=np.zeros(n, np.float32), where=scale > 0))
    raw = np.concatenate([_pack2(q), rms.view(np.uint8)])
    return raw, _q2n_decode(raw, r, c, group)


def _q2n_decode(raw: np.ndarray, r: int, c: int, group: int) -> np.ndarray:
    n = r * c
    nc = -(-n // 4)
    q = _unpack2(raw[:nc], n)
    scale = np.repeat(raw[nc:].view(np.float16).astype(np.float32), group)[:n]
    return (NORMAL_LEVELS[q] * scale).reshape(r, c).astype(np.float32)
