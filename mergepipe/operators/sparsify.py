"""Sparsification rules of the generalized task arithmetic, as mergekit 0.1.5 defines them, with
its keep counts exactly; where mergekit leaves a choice to an unstable sort (which of several equal
magnitudes to keep) or to torch's global RNG (which entries a Bernoulli mask keeps), mergepipe
decides by the seeded per-position hash of `positional`, so the result is deterministic and a replay
is bit-exact. Every function takes a float32 delta and one stream key, and returns the sparsified
delta (rescaled where asked); it writes into `out` when given (which may be the delta itself), else
into a new tensor, and never modifies the delta otherwise.

Each rule runs over the delta a step at a time (a CPU step's temporaries are reused memory; a whole
tensor's are fresh pages, which cost more than the arithmetic), and ranks by a histogram, not a
sort: every per-entry value depends on the entry's position alone, so the steps change no bit."""

from __future__ import annotations

import functools
from typing import Callable

import numpy as np
import torch

from . import positional as P

STEP = 1 << 17  # entries per step on the CPU: a step's temporaries stay in cache


def _steps(n: int, device: torch.device, step: int = STEP) -> list[tuple[int, int]]:
    if device.type != "cpu":  # a GPU keeps whole tensors in flight
        step = max(n, 1)
    return [(lo, min(lo + step, n)) for lo in range(0, n, step)]


def keep_count(density: float, numel: int) -> int:
    """mergekit's magnitude rule: max(1, int(density * numel)) entries of a non-empty tensor."""
    return max(1, int(density * numel))


def _out(delta: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
    return torch.empty_like(delta) if out is None else out


def _kept(delta: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
    """The delta itself, every entry kept (density 1), where the rule was asked to write it."""
    return delta if out is None else out.copy_(delta)


def _masked(delta: torch.Tensor, mask: Callable[[int, int], torch.Tensor], out: torch.Tensor | None,
            l1: bool = False, step: int = STEP) -> tuple[torch.Tensor, float, float]:
    """delta * mask(lo, hi) a step at a time into out; with l1 also sum |delta| and sum |masked|
    (float64 over fixed steps, so the same on any thread count)."""
    res = _out(delta, out)
    d, r = delta.reshape(-1), res.reshape(-1)
    before = after = 0.0
    for lo, hi in _steps(d.numel(), d.device, step):
        if l1:
            before += float(d[lo:hi].abs().sum(dtype=torch.float64))
        torch.mul(d[lo:hi], mask(lo, hi), out=r[lo:hi])
        if l1:
            after += float(r[lo:hi].abs().sum(dtype=torch.float64))
    return res, before, after


def _rescale_l1(res: torch.Tensor, before: float, after: float, eps: float = 1e-7) -> torch.Tensor:
    """mergekit's L1 rescale, masked * (|delta|_1 / |masked|_1), from sums already taken."""
    if before < eps or after < eps:
        return res
    flat = res.reshape(-1)
    factor = (torch.tensor(before, dtype=torch.float32) / torch.tensor(after, dtype=torch.float32)).to(flat.device)
    for lo, hi in _steps(flat.numel(), flat.device):
        flat[lo:hi].mul_(factor)
    return res


def _rescale_exact(res: torch.Tensor, before: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """mergekit's rescaled_masked_tensor with its own float32 sums over whole tensors (their order
    fixes the factor's bits, so the trimming rules equal mergekit's output away from ties)."""
    after = res.abs().sum()
    if before < eps or after < eps:
        return res
    return res.mul_(before / after)


class Ranking:
    """The entries of one delta ranked by magnitude_key of |delta| without sorting them: a histogram of
    the top 16 bits of each magnitude finds the bin that holds the k-th largest, and only the entries
    in that bin are ranked by their full key. cut(k) is exactly the k largest keys a sort would give."""

    BINS = 1 << 15  # the top 16 bits of a float32 magnitude (its sign bit is 0)

    def __init__(self, delta: torch.Tensor, key: int) -> None:
        self.bits = delta.reshape(-1).view(torch.int32)
        self.key = key
        hist = torch.zeros(self.BINS, dtype=torch.int64, device=delta.device)
        for lo, hi in _steps(self.bits.numel(), delta.device, 1 << 19):
            hist += torch.bincount(self.high(lo, hi), minlength=self.BINS)
        self.from_top = hist.flip(0).cumsum(0)  # entries in the top j + 1 bins

    def high(self, lo: int, hi: int) -> torch.Tensor:
        return (self.bits[lo:hi] >> 16) & 0x7FFF

    def cut(self, k: int) -> tuple[int, torch.Tensor]:
        """(bin b, positions): the k largest are every entry above bin b and those positions in it."""
        n = self.bits.numel()
        if k <= 0 or k >= n:
            return (self.BINS if k <= 0 else -1), torch.zeros(0, dtype=torch.int64, device=self.bits.device)
        j = int(torch.searchsorted(self.from_top, k))  # first bin from the top where the count reaches k
        b = self.BINS - 1 - j
        need = k - (int(self.from_top[j - 1]) if j else 0)
        idx = torch.cat([torch.nonzero(self.high(lo, hi) == b).view(-1) + lo
                         for lo, hi in _steps(n, self.bits.device, 1 << 19)])
        keys = ((self.bits[idx] & 0x7FFFFFFF).to(torch.int64) << 32) | P.order_at(self.key, idx)
        return b, torch.sort(idx[torch.topk(keys, need, sorted=False).indices]).values

    def mask(self, cut: tuple[int, torch.Tensor], lo: int, hi: int) -> torch.Tensor:
        """float32 mask over [lo, hi): 1.0 at the entries of cut."""
        b, chosen = cut
        m = (self.high(lo, hi) > b).to(torch.float32)
        inside = chosen[torch.searchsorted(chosen, lo):torch.searchsorted(chosen, hi)]
        m[inside - lo] = 1
        return m

    def top(self, k: int) -> torch.Tensor:
        """float32 mask, 1.0 at the k entries of largest key (the whole tensor at once)."""
        return self.mask(self.cut(k), 0, self.bits.numel())


def magnitude_mask(delta: torch.Tensor, density: float, key: int) -> torch.Tensor:
    """TIES trimming: 1.0 at exactly keep_count entries of largest |delta|, equal magnitudes taken in
    the order of their positions' seeded hash."""
    return Ranking(delta, key).top(keep_count(density, delta.numel())).reshape_as(delta)


def magnitude(delta: torch.Tensor, density: float, key: int, rescale: bool = False,
              out: torch.Tensor | None = None) -> torch.Tensor:
    if density >= 1:
        return _kept(delta, out)
    if delta.numel() == 0:
        return torch.zeros_like(delta)
    ranking = Ranking(delta, key)
    cut = ranking.cut(keep_count(density, delta.numel()))
    before = delta.abs().sum() if rescale else None
    res, _, _ = _masked(delta, lambda lo, hi: ranking.mask(cut, lo, hi), out)
    return _rescale_exact(res, before) if rescale else res


def _band(delta: torch.Tensor, density: float, gamma: float, key: int):
    """Breadcrumbs' keep set as (ranking, larger cut, smaller cut): ascending ranks [bottom, bottom +
    target) are the n - bottom largest less the n - bottom - target largest."""
    n = delta.numel()
    target, top = int(density * n), int(gamma * n)
    bottom = max(0, n - target - top)
    ranking = Ranking(delta, key)
    return ranking, ranking.cut(n - bottom), ranking.cut(n - bottom - target)


def outliers_mask(delta: torch.Tensor, density: float, gamma: float, key: int) -> torch.Tensor:
    """Breadcrumbs: drop the int(gamma * n) largest |delta| and enough of the smallest that exactly
    int(density * n) remain (fewer outliers dropped when both cannot hold)."""
    ranking, keep, drop = _band(delta, density, gamma, key)
    n = delta.numel()
    return (ranking.mask(keep, 0, n) - ranking.mask(drop, 0, n)).reshape_as(delta)


def magnitude_outliers(delta: torch.Tensor, density: float, gamma: float, key: int,
                       rescale: bool = False, out: torch.Tensor | None = None) -> torch.Tensor:
    if density >= 1:
        return _kept(delta, out)
    ranking, keep, drop = _band(delta, density, gamma, key)
    before = delta.abs().sum() if rescale else None
    res, _, _ = _masked(delta, lambda lo, hi: ranking.mask(keep, lo, hi) - ranking.mask(drop, lo, hi), out)
    return _rescale_exact(res, before) if rescale else res


def bernoulli_mask(delta: torch.Tensor, density: float, key: int, start: int = 0, n: int | None = None) -> torch.Tensor:
    """DARE: 1.0 where the entry's own uniform draw is below `density` (entries [start, start + n))."""
    count = delta.numel() if n is None else n
    if delta.device.type == "cpu":
        mask = torch.from_numpy(P.below(key, start, count, density))
    else:
        mask = (P.uniform(key, start, count, delta.device) < density).to(torch.float32)
    return mask.reshape_as(delta) if n is None else mask


def bernoulli(delta: torch.Tensor, density: float, key: int, rescale: bool = True,
              out: torch.Tensor | None = None) -> torch.Tensor:
    if density >= 1:
        return _kept(delta, out)
    res, before, after = _masked(delta, lambda lo, hi: bernoulli_mask(delta, density, key, lo, hi - lo), out,
                                 l1=rescale)
    return _rescale_l1(res, before, after) if rescale else res


def della_mask(rows: torch.Tensor, density: float, epsilon: float, key: int, start: int = 0) -> torch.Tensor:
    """DELLA: keep probabilities rising linearly with the |delta| rank inside each row (dim 1), from
    density - epsilon to density + epsilon, then a draw per entry. `rows`: at least 2-D, whose first
    entry is entry `start` of its tensor."""
    # rank by (|delta|, tie order) along dim 1, as mergekit's argsort of an argsort does
    sorted_idx = (_row_order_numpy(rows, key, start) if rows.device.type == "cpu" and rows.dim() == 2
                  else torch.argsort(P.magnitude_key(rows.abs(), key, start).reshape(rows.shape), dim=1))
    # an entry's probability depends on its rank alone (each row's ranks are 1..m), so it is looked up
    # in one row of probabilities by rank, made by the same float32 operations, and scattered
    by_rank = _della_probs(rows.shape[1], density, epsilon, rows.device)
    probs = torch.empty(rows.shape, dtype=torch.float32, device=rows.device).scatter_(
        1, sorted_idx, by_rank.view(1, -1, *([1] * (rows.dim() - 2))).expand_as(sorted_idx).contiguous())
    return (P.uniform(key, start, rows.numel(), rows.device).reshape(rows.shape) < probs).to(torch.float32)


def _row_order_numpy(rows: torch.Tensor, key: int, start: int) -> torch.Tensor:
    """Each row's entries in ascending (|delta|, tie order): argsort of magnitude_key's distinct keys,
    by numpy's sort of the keys themselves (about half an argsort's time) and the position each
    sorted key's tie order inverts to (positional.position_of)."""
    r, m = rows.shape
    bits = rows.abs().numpy().view(np.int32).astype(np.int64)
    positions = np.arange(start, start + r * m, dtype=np.int64).reshape(r, m)
    keys = np.left_shift(bits, 32, out=bits)
    keys |= P.order_numpy(key, positions)
    keys.sort(axis=1)
    first = (positions[:, :1] & 0xFFFFFFFF).astype(np.uint32)
    return torch.from_numpy((P.position_of(key, keys & 0xFFFFFFFF) - first).astype(np.int64))


@functools.lru_cache(maxsize=64)
def _della_probs(m: int, density: float, epsilon: float, device) -> torch.Tensor:
    """The keep probability by rank 1..m, as mergekit computes it from a row's ranks."""
    ranks = torch.arange(m, device=device).view(1, -1).to(torch.float32) + 1
    lo, hi = ranks.min(dim=1, keepdim=True).values, ranks.max(dim=1, keepdim=True).values
    rank_norm = ((ranks - lo) / (hi - lo)).clamp(0, 1)
    return ((density - epsilon) + rank_norm * 2 * epsilon).view(-1)


def della_magprune(delta: torch.Tensor, density: float, epsilon: float, key: int,
                   rescale: bool = True, out: torch.Tensor | None = None) -> torch.Tensor:
    if density >= 1:
        return _kept(delta, out)
    if density <= 0:
        return torch.zeros_like(delta) if out is None else out.zero_()
    rows = delta if delta.dim() >= 2 else delta.unsqueeze(0)
    per_row = rows[0].numel()
    step = max(1, STEP // max(per_row, 1)) * per_row  # whole rows: a row's ranks are its own

    def mask(lo: int, hi: int) -> torch.Tensor:
        part = rows.reshape(-1)[lo:hi].view(-1, *rows.shape[1:])
        return della_mask(part, density, epsilon, key, lo).reshape(-1)
    res, before, after = _masked(delta, mask, out, l1=rescale, step=step)
    return _rescale_l1(res, before, after) if rescale else res
