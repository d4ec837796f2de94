"""Delta sketches: a compact approximation S of each block of an expert's delta from the base, written
by the indexer (which reads every expert byte once anyway) and used to fill the blocks a budgeted
plan does not read exactly. Plain functions over float32 numpy arrays.

Encoding runs in torch, at index time (the indexer computes with it anyway); decoding in numpy, at
execution (which may run without torch), to the same bits. A block's sketch is one run of bytes, so the plan can read it as one range and check it against one
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
# decoding tables, one row per byte: its four 2-bit codes (low bits first) as values, and its eight
# sign bits (high bit first, as np.packbits writes them) as +-1
CODES = np.array([[(v >> (2 * i)) & 3 for i in range(4)] for v in range(256)], np.float32)
NORMAL_CODES = NORMAL_LEVELS[CODES.astype(np.int64)]
SIGNS = np.array([[1.0 if v >> (7 - i) & 1 else -1.0 for i in range(8)] for v in range(256)], np.float32)


# the same tables with each row as one 16-byte item: a take of whole items copies them, where a take
# along axis 0 of the 2-D table goes value by value
TABLES = {normal: t.view(np.complex128).reshape(256) for normal, t in ((False, CODES), (True, NORMAL_CODES))}


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

    def encode(self, delta) -> tuple[np.ndarray, object]:
        """(sketch bytes, the decoded sketch) of a 2-D float32 torch tensor; decode(bytes) gives the
        same values, bit for bit, in numpy (execution may run without torch)."""
        if self.kind == "sign":
            return _sign_encode(delta, self.param("rows"))
        if self.kind == "q2n":
            return _q2n_encode(delta, self.param("group"))
        return _q2_encode(delta, self.param("group"))

    def decode(self, raw: np.ndarray, rows: int, cols: int) -> np.ndarray:
        return self.decode_range(raw, rows, cols, 0, rows * cols).reshape(rows, cols)

    def decode_range(self, raw: np.ndarray, rows: int, cols: int, lo: int, hi: int) -> np.ndarray:
        """Entries [lo, hi) (flat, row-major) of the decoded rows x cols block, the same values as
        decode gives them: a merge decodes as it goes, a cache-sized range at a time."""
        if len(raw) != self.nbytes(rows, cols):
            raise MergepipeError(f"sketch block has {len(raw)} bytes, expected {self.nbytes(rows, cols)}")
        if self.kind == "sign":
            return _sign_decode(raw, rows, cols, self.param("rows"), lo, hi)
        return _q2_decode(raw, rows * cols, self.param("group"), lo, hi, self.kind == "q2n")

    def add_range(self, raw: np.ndarray, rows: int, cols: int, lo: int, hi: int, out: np.ndarray,
                  pairs: bool = False) -> np.ndarray:
        """out += entries [lo, hi) of the decoded block, value for value as decode_range gives them;
        pairs: `out` is in floats.to_f32's paired layout (even positions, then odd)."""
        values = self.decode_range(raw, rows, cols, lo, hi)
        if pairs:
            h = (hi - lo) // 2
            np.add(out[:h], values[0::2], out=out[:h])
            np.add(out[h:], values[1::2], out=out[h:])
        else:
            np.add(out, values, out=out)
        return out


def _groups(d, size: int):
    """A float32 torch tensor's entries as [groups, size] (padded with its last entry)."""
    import torch
    flat = d.reshape(-1)
    pad = -len(flat) % size
    if pad:
        flat = torch.cat([flat, flat[-1:].expand(pad)])
    return flat.view(-1, size)


def _sign_encode(d, rows: int):
    import torch
    r, c = d.shape
    groups = -(-r // rows)
    sums = torch.zeros(groups * rows, dtype=torch.float64)
    sums[:r] = d.abs().sum(dim=1)  # float32 per row is plenty: the scale is stored in float16
    counts = torch.full((groups,), float(rows * c), dtype=torch.float64)
    counts[-1] = (r - (groups - 1) * rows) * c
    scale = (sums.view(groups, rows).sum(dim=1) / counts).to(torch.float16)
    pos = d >= 0
    bits = np.packbits(pos.reshape(-1).numpy())
    per_row = scale.float().repeat_interleave(rows)[:r].unsqueeze(1)
    approx = torch.where(pos, per_row, -per_row)
    return np.concatenate([bits, scale.numpy().view(np.uint8)]), approx


def _sign_decode(raw: np.ndarray, r: int, c: int, rows: int, lo: int, hi: int) -> np.ndarray:
    nb = -(-r * c // 8)
    b0, b1 = lo // 8, -(-hi // 8)
    signs = np.empty((b1 - b0) * 8, np.float32)
    np.take(SIGNS, raw[b0:b1], axis=0, out=signs.reshape(-1, 8))
    out = signs[lo - 8 * b0:hi - 8 * b0]
    r0, r1 = lo // c, -(-hi // c)
    per_row = np.repeat(raw[nb:].view(np.float16).astype(np.float32), rows)[r0:r1]
    np.multiply(out, np.repeat(per_row, c)[lo - r0 * c:hi - r0 * c], out=out)
    return out


def _q2_encode(d, group: int):
    r, c = d.shape
    n = r * c
    g = _groups(d, group)
    # torch reduces short rows far faster than numpy; the rest is numpy, whose calls cost less than
    # torch's on arrays this small
    lo16 = g.amin(dim=1).numpy().astype(np.float16)
    hi16 = g.amax(dim=1).numpy().astype(np.float16)
    lo = lo16.astype(np.float32)[:, None]
    step = (hi16.astype(np.float32)[:, None] - lo) / np.float32(3)
    inv = np.divide(np.float32(1), step, out=np.zeros_like(step), where=step > 0)
    # a non-finite delta (merged only with --allow-nonfinite) codes as whatever the cast gives, as
    # torch's did: deterministic, and the planner reads such blocks exactly before any other
    with np.errstate(invalid="ignore", over="ignore"):
        q = np.subtract(g.numpy(), lo)
        np.multiply(q, inv, out=q)
        np.rint(q, out=q)
        np.clip(q, 0, 3, out=q)
        codes = q.reshape(-1)[:n].astype(np.uint8)
        np.multiply(q, step, out=q)  # the decoded sketch, as _q2_decode computes it
        np.add(q, lo, out=q)
    raw = np.concatenate([_pack2(codes), np.stack([lo16, hi16], axis=1).reshape(-1).view(np.uint8)])
    return raw, _torch(q.reshape(-1)[:n].reshape(r, c))


def _torch(a: np.ndarray):
    import torch
    return torch.from_numpy(a)


def _q2_decode(raw: np.ndarray, n: int, group: int, lo: int, hi: int, normal: bool) -> np.ndarray:
    """q2 (lo + step * code per group) or q2n (a Gaussian level per code times the group's RMS)."""
    g0, g1 = lo // group, -(-hi // group)
    e0, e1 = g0 * group, min(g1 * group, n)  # the whole groups that hold [lo, hi)
    b0, b1 = e0 // 4, -(-e1 // 4)
    # one table lookup per byte, not a shift, mask and cast per entry; the last group's padding is zero
    q = np.empty((g1 - g0) * group, np.float32)
    aligned = group % 4 == 0  # groups start on a byte: the codes land in place
    codes = q[:(b1 - b0) * 4] if aligned else np.empty((b1 - b0) * 4, np.float32)
    np.take(TABLES[normal], raw[b0:b1], out=codes.view(np.complex128))
    if aligned:
        q[len(codes):] = 0
    else:
        q[:e1 - e0] = codes[e0 - 4 * b0:e1 - 4 * b0]
        q[e1 - e0:] = 0
    q = q.reshape(-1, group)
    scales = raw[-(-n // 4):].view(np.float16).astype(np.float32)
    if normal:
        np.multiply(q, scales[g0:g1, None], out=q)
    else:
        lohi = scales.reshape(-1, 2)[g0:g1]
        base, step = lohi[:, :1], (lohi[:, 1:] - lohi[:, :1]) / np.float32(3)
        np.multiply(q, step, out=q)
        np.add(q, base, out=q)
    return q.reshape(-1)[lo - e0:hi - e0]


def _pack2(q: np.ndarray) -> np.ndarray:
    """uint8 codes 0..3, four to a byte, the first in the low bits: four codes read as one
    little-endian uint32 are folded into its low byte."""
    q = np.concatenate([q.astype(np.uint8, copy=False), np.zeros(-len(q) % 4, np.uint8)])
    v = q.view("<u4")
    return ((v | (v >> 6) | (v >> 12) | (v >> 18)) & 0xFF).astype(np.uint8)


def _q2n_encode(d, group: int):
    import torch
    r, c = d.shape
    n = r * c
    g = _groups(d, group)
    counts = torch.full((g.shape[0],), float(group), dtype=torch.float64)
    counts[-1] = n - (g.shape[0] - 1) * group
    if n % group:  # padding must not count in the RMS
        g = g.clone()
        g[-1, n % group:] = 0
    rms = torch.sqrt(g.square().sum(dim=1, dtype=torch.float64) / counts).to(torch.float16)
    scale = rms.float().unsqueeze(1)
    inv = torch.where(scale > 0, 1 / scale, torch.zeros_like(scale))
    q = torch.bucketize(g * inv, torch.from_numpy(NORMAL_CUTS), right=True)
    approx = (torch.from_numpy(NORMAL_LEVELS)[q] * scale).reshape(-1)[:n].view(r, c)
    raw = np.concatenate([_pack2(q.reshape(-1)[:n].numpy().astype(np.uint8)), rms.numpy().view(np.uint8)])
    return raw, approx
