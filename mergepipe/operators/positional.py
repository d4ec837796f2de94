"""Counter-based randomness and tie-breaking: a value per (key, element position), never a global RNG.

A key names one (seed, tensor, expert) stream; an element's value is a hash of the key and its flat
position in the tensor, so it is the same whichever block, chunk, device or order computes it, and a
replayed or resumed run draws exactly the same. The hash is splitmix64's finaliser in wrapping int64
arithmetic (torch has no uint64 shifts: a logical shift is an arithmetic one masked)."""

from __future__ import annotations

import math

import numpy as np
import torch
import xxhash

from ..floats import LITTLE_ENDIAN

_C1 = 0xBF58476D1CE4E5B9 - (1 << 64)  # splitmix64's constants as signed int64
_C2 = 0x94D049BB133111EB - (1 << 64)
_GOLDEN = 0x9E3779B97F4A7C15 - (1 << 64)
_U24 = 2.0 ** -24


def stream_key(seed: int, tensor: str, expert: int, purpose: str) -> int:
    """The int64 key of one (seed, tensor, expert) stream; `purpose` keeps the streams of different
    uses (a tie order, a keep draw) independent."""
    h = xxhash.xxh64_intdigest(f"{purpose}\0{seed}\0{tensor}\0{expert}".encode())
    return h - (1 << 64) if h >= 1 << 63 else h


def _shr(x: torch.Tensor, s: int) -> torch.Tensor:
    return (x >> s) & ((1 << (64 - s)) - 1)


def mix(key: int, start: int, n: int, device) -> torch.Tensor:
    """int64 hashes of positions [start, start + n) under `key`."""
    x = torch.arange(start, start + n, dtype=torch.int64, device=device)
    x.mul_(_GOLDEN).add_(key)
    x ^= _shr(x, 30)
    x.mul_(_C1)
    x ^= _shr(x, 27)
    x.mul_(_C2)
    x ^= _shr(x, 31)
    return x


_M32 = 0xFFFFFFFF


def order_at(key: int, positions: torch.Tensor) -> torch.Tensor:
    """A 32-bit tie order per position (int64 tensor of flat positions): murmur3's fmix32 of
    (position + key) mod 2^32, a bijection, so distinct positions of a tensor under 2^32 entries never
    tie, and any two implementations that sort by it agree."""
    x = (positions.to(torch.int64) + (key & _M32)) & _M32
    x ^= x >> 16
    x = (x * 0x85EBCA6B) & _M32
    x ^= x >> 13
    x = (x * 0xC2B2AE35) & _M32
    x ^= x >> 16
    return x


_F1, _F2 = np.uint32(0x85EBCA6B), np.uint32(0xC2B2AE35)
_F1_INV, _F2_INV = np.uint32(pow(0x85EBCA6B, -1, 1 << 32)), np.uint32(pow(0xC2B2AE35, -1, 1 << 32))


def order_numpy(key: int, positions: np.ndarray) -> np.ndarray:
    """order_at in numpy's native uint32, whose products wrap mod 2^32 (torch's int64 ones are
    emulated on the CPU): the same tie order, as uint32."""
    x = positions.astype(np.uint32)  # positions mod 2^32
    x += np.uint32(key & _M32)
    x ^= x >> np.uint32(16)
    x *= _F1
    x ^= x >> np.uint32(13)
    x *= _F2
    x ^= x >> np.uint32(16)
    return x


def position_of(key: int, order: np.ndarray) -> np.ndarray:
    """The inverse of order_numpy: each tie order's position mod 2^32 (uint32; fmix32 is a bijection),
    so a sort of keys that end in the tie order says where each key came from."""
    x = order.astype(np.uint32)
    x ^= x >> np.uint32(16)
    x *= _F2_INV
    x ^= (x >> np.uint32(13)) ^ (x >> np.uint32(26))
    x *= _F1_INV
    x ^= x >> np.uint32(16)
    x -= np.uint32(key & _M32)
    return x


# Positions per step: a hash makes a dozen int64 passes, which stay in cache at this size (whole
# tensors took four times as long). Each value depends on its position alone, so steps change no bit.
STEP = 1 << 16


def _stepped(n: int, dtype, device, fill) -> torch.Tensor:
    if torch.device(device).type != "cpu":  # a GPU keeps whole tensors in flight: one launch each
        return fill(0, n)
    out = torch.empty(n, dtype=dtype, device=device)
    for lo in range(0, n, STEP):
        hi = min(lo + STEP, n)
        out[lo:hi] = fill(lo, hi)
    return out


def order(key: int, start: int, n: int, device) -> torch.Tensor:
    return _stepped(n, torch.int64, device, lambda lo, hi: order_at(
        key, torch.arange(start + lo, start + hi, dtype=torch.int64, device=device)))


def uniform(key: int, start: int, n: int, device) -> torch.Tensor:
    """float32 uniforms in [0, 1) per position, in steps of 2^-24 (exact in float32)."""
    if torch.device(device).type == "cpu":
        return torch.from_numpy(_uniform_numpy(key, start, n))
    return _shr(mix(key, start, n, device), 40).to(torch.float32).mul_(_U24)


_U64 = [np.uint64(c % (1 << 64)) for c in (_GOLDEN, _C1, _C2)]
_SHIFTS = [np.uint64(s) for s in (30, 27, 31, 40)]


def _uniform_numpy(key: int, start: int, n: int) -> np.ndarray:
    """uniform's values on the CPU: the same splitmix64 in numpy's native uint64 (wrapping products,
    logical shifts), a cache-sized step at a time, which torch's int64 kernels take several times
    longer over (their 64-bit products are emulated)."""
    out = np.empty(n, np.float32)
    s40 = _SHIFTS[3]
    for lo, xv in _mixed_numpy(key, start, n):
        np.right_shift(xv, s40, out=xv)  # 24 bits: the low word of each value, exact as int32
        o = out[lo:lo + len(xv)]
        o[...] = xv.view(np.int32)[::2] if LITTLE_ENDIAN else xv.view(np.int32)[1::2]
        o *= np.float32(_U24)
    return out


def below(key: int, start: int, n: int, p: float) -> np.ndarray:
    """float32 1.0 where uniform(key, start, n) < p (compared in float32, as torch compares a float32
    tensor with a number), else 0.0, on the CPU. A uniform is k * 2^-24 for the top 24 bits k of the
    hash, so the test is hash < ceil(p * 2^24) * 2^40, one comparison of the uint64s."""
    cut = math.ceil(float(np.float32(p)) * (1 << 24))
    out = np.empty(n, np.float32)
    if cut <= 0 or cut >= 1 << 24:
        out[...] = 0.0 if cut <= 0 else 1.0
        return out
    limit = np.uint64(cut << 40)
    for lo, xv in _mixed_numpy(key, start, n):
        np.less(xv, limit, out=out[lo:lo + len(xv)], casting="unsafe")
    return out


def _mixed_numpy(key: int, start: int, n: int):
    """(lo, the splitmix64 of positions start + lo ... as uint64) per step of [0, n); each step's
    array is reused by the next."""
    golden, c1, c2 = _U64
    s30, s27, s31, _ = _SHIFTS
    step = min(STEP, n)
    offsets = np.arange(step, dtype=np.uint64)
    x, y = np.empty(step, np.uint64), np.empty(step, np.uint64)
    k = np.uint64(key % (1 << 64))
    for lo in range(0, n, step):
        m = min(step, n - lo)
        xv, yv = x[:m], y[:m]
        np.add(offsets[:m], np.uint64(start + lo), out=xv)
        np.multiply(xv, golden, out=xv)
        np.add(xv, k, out=xv)
        for shift, c in ((s30, c1), (s27, c2), (s31, None)):
            np.right_shift(xv, shift, out=yv)
            np.bitwise_xor(xv, yv, out=xv)
            if c is not None:
                np.multiply(xv, c, out=xv)
        yield lo, xv


def magnitude_key(a: torch.Tensor, key: int, start: int = 0) -> torch.Tensor:
    """|delta| (float32, >= 0) and its tie order as one int64 sort key, distinct per position: a
    larger magnitude is a larger key, equal magnitudes are ordered by the seeded hash of position."""
    bits = a.reshape(-1).view(torch.int32)

    def keys(lo: int, hi: int) -> torch.Tensor:
        return (bits[lo:hi].to(torch.int64) << 32) | order_at(
            key, torch.arange(start + lo, start + hi, dtype=torch.int64, device=a.device))
    return _stepped(a.numel(), torch.int64, a.device, keys)

