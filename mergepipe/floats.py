"""bfloat16, float16 and float32 in numpy, converted bit for bit as torch converts them (NaN
stays a NaN, though not always torch's NaN pattern, which itself differs between its vector and
scalar loops).

The CPU merge runs on these instead of torch: importing torch takes 1.3 s, a third of a whole
task-arithmetic merge of a 0.5B family. Other dtypes (float64, float8) take the torch path.
"""

from __future__ import annotations

import sys

import numpy as np

from .checkpoint import nonfinite

LITTLE_ENDIAN = sys.byteorder == "little"  # the paired layout reads two bfloat16 as one word

ITEMSIZE = {"BF16": 2, "F16": 2, "F32": 4}  # the stored dtypes this module converts
_BF16_NAN = np.uint16(0x7FC0)


def paired(dtypes, n: int) -> bool:
    """Whether n values of these dtypes can take the paired bfloat16 layout (see to_f32)."""
    return n % 2 == 0 and LITTLE_ENDIAN and all(d == "BF16" for d in dtypes)


def to_f32(raw: np.ndarray, dtype: str, out: np.ndarray, pairs: bool = False) -> np.ndarray:
    """Stored values (raw bytes, or their 16-bit view for BF16/F16) widened into float32 `out`; exact.

    pairs (bfloat16, an even count): `out` holds the values at even positions, then those at odd
    positions. Both halves come from one 32-bit view of the input by a shift and a mask, where the
    plain layout needs numpy's uint16->uint32 cast, a slow scalar loop (11% of a merge's CPU time).
    Elementwise arithmetic does not care about the order, and from_f32(pairs=True) restores it."""
    if pairs:
        words, bits = raw.view(np.uint32), out.view(np.uint32)
        h = len(words)
        np.left_shift(words, 16, out=bits[:h])
        np.bitwise_and(words, 0xFFFF0000, out=bits[h:])
    elif dtype == "BF16":
        bits = out.view(np.uint32)
        bits[...] = raw.view(np.uint16)
        bits <<= 16
    elif dtype == "F16":
        out[...] = raw.view(np.float16)
    else:
        out[...] = raw.view(np.float32)
    return out


def cast(raw: np.ndarray, src: str, dst: str) -> np.ndarray:
    """Raw bytes of `src` values as raw bytes of `dst`, rounded as torch's .to() rounds."""
    n = raw.nbytes // ITEMSIZE[src]
    out = np.empty(n * ITEMSIZE[dst], np.uint8)
    from_f32(to_f32(raw, src, np.empty(n, np.float32)), dst, out, np.empty(n, np.uint32))
    return out


def from_f32(x: np.ndarray, dtype: str, out: np.ndarray, scratch: np.ndarray, pairs: bool = False) -> bool:
    """float32 `x` rounded to nearest-even into `out` (uint8 bytes of `dtype`); `scratch`: a uint32
    array of x's size; pairs: x is in to_f32's paired layout. Returns whether every value came out
    finite (no NaN or Inf in, no overflow)."""
    if dtype == "BF16":
        bits = x.view(np.uint32)
        np.bitwise_and(bits, 0x7FFFFFFF, out=scratch)
        # |x| at or above 0x7F7F8000 is NaN or Inf, or finite but rounds up to Inf
        finite = bool(scratch.max(initial=0) < 0x7F7F8000)
        np.right_shift(bits, 16, out=scratch)
        np.bitwise_and(scratch, 1, out=scratch)
        scratch += 0x7FFF
        scratch += bits  # rounded in the top 16 bits; wraps only for NaN patterns, fixed below
        o16 = out.view(np.uint16)
        if pairs:
            h = len(scratch) // 2
            np.right_shift(scratch[:h], 16, out=scratch[:h])
            np.bitwise_and(scratch[h:], 0xFFFF0000, out=scratch[h:])
            np.bitwise_or(scratch[:h], scratch[h:], out=out.view(np.uint32))
            if not finite:
                o16[0::2][np.isnan(x[:h])] = _BF16_NAN
                o16[1::2][np.isnan(x[h:])] = _BF16_NAN
            return finite
        np.right_shift(scratch, 16, out=scratch)
        o16[...] = scratch
        if not finite:
            o16[np.isnan(x)] = _BF16_NAN
        return finite
    if dtype == "F16":
        out.view(np.float16)[...] = x
    else:
        out.view(np.float32)[...] = x
    return not nonfinite(out, dtype)
