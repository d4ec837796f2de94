"""Counter-based randomness and tie-breaking: a value per (key, element position), never a global RNG.

A key names one (seed, tensor, expert) stream; an element's value is a hash of the key and its flat
position in the tensor, so it is the same whichever block, chunk, device or order computes it, and a
replayed or resumed run draws exactly the same. The hash is splitmix64's finaliser in wrapping int64
arithmetic (torch has no uint64 shifts: a logical shift is an arithmetic one masked)."""

from __future__ import annotations

import torch
import xxhash

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
    return _stepped(n, torch.float32, device,
                    lambda lo, hi: _shr(mix(key, start + lo, hi - lo, device), 40).to(torch.float32).mul_(_U24))


def magnitude_key(a: torch.Tensor, key: int, start: int = 0) -> torch.Tensor:
    """|delta| (float32, >= 0) and its tie order as one int64 sort key, distinct per position: a
    larger magnitude is a larger key, equal magnitudes are ordered by the seeded hash of position."""
    bits = a.reshape(-1).view(torch.int32)

    def keys(lo: int, hi: int) -> torch.Tensor:
        return (bits[lo:hi].to(torch.int64) << 32) | order_at(
            key, torch.arange(start + lo, start + hi, dtype=torch.int64, device=a.device))
    return _stepped(a.numel(), torch.int64, a.device, keys)
