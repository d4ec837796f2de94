"""Sparsification rules of the generalized task arithmetic, as mergekit 0.1.5 defines them, with
its keep counts exactly; where mergekit leaves a choice to an unstable sort (which of several equal
magnitudes to keep) or to torch's global RNG (which entries a Bernoulli mask keeps), mergepipe
decides by the seeded per-position hash of `positional`, so the result is deterministic and a replay
is bit-exact. Every function takes a float32 delta and one stream key, and returns the sparsified
delta (rescaled where asked) without modifying its input."""

from __future__ import annotations

import torch

from . import positional as P


def rescaled(delta: torch.Tensor, mask: torch.Tensor, rescale: bool, eps: float = 1e-7) -> torch.Tensor:
    """mergekit's rescaled_masked_tensor with the L1 norm: masked * (|delta|_1 / |masked|_1)."""
    masked = delta * mask
    if not rescale:
        return masked
    before, after = delta.abs().sum(), masked.abs().sum()
    if before < eps or after < eps:
        return masked
    return masked * (before / after)


def keep_count(density: float, numel: int) -> int:
    """mergekit's magnitude rule: max(1, int(density * numel)) entries of a non-empty tensor."""
    return max(1, int(density * numel))


def magnitude_mask(delta: torch.Tensor, density: float, key: int) -> torch.Tensor:
    """TIES trimming: 1.0 at exactly keep_count entries of largest |delta|, equal magnitudes taken in
    the order of their positions' seeded hash."""
    k = keep_count(density, delta.numel())
    mask = torch.zeros(delta.numel(), dtype=delta.dtype, device=delta.device)
    mask[torch.topk(P.magnitude_key(delta.abs(), key), k, sorted=False).indices] = 1
    return mask.reshape_as(delta)


def magnitude(delta: torch.Tensor, density: float, key: int, rescale: bool = False) -> torch.Tensor:
    if density >= 1:
        return delta
    if delta.numel() == 0:
        return torch.zeros_like(delta)
    return rescaled(delta, magnitude_mask(delta, density, key), rescale)


def outliers_mask(delta: torch.Tensor, density: float, gamma: float, key: int) -> torch.Tensor:
    """Breadcrumbs: drop the int(gamma * n) largest |delta| and enough of the smallest that exactly
    int(density * n) remain (fewer outliers dropped when both cannot hold)."""
    n = delta.numel()
    target, top = int(density * n), int(gamma * n)
    bottom = max(0, n - target - top)
    ranked = torch.argsort(P.magnitude_key(delta.abs(), key))  # ascending; the keys are distinct
    mask = torch.zeros(n, dtype=delta.dtype, device=delta.device)
    mask[ranked[bottom:bottom + target]] = 1
    return mask.reshape_as(delta)


def magnitude_outliers(delta: torch.Tensor, density: float, gamma: float, key: int,
                       rescale: bool = False) -> torch.Tensor:
    if density >= 1:
        return delta
    return rescaled(delta, outliers_mask(delta, density, gamma, key), rescale)


def bernoulli_mask(delta: torch.Tensor, density: float, key: int) -> torch.Tensor:
    """DARE: 1.0 where the entry's own uniform draw is below `density`."""
    return (P.uniform(key, 0, delta.numel(), delta.device) < density).to(delta.dtype).reshape_as(delta)


def bernoulli(delta: torch.Tensor, density: float, key: int, rescale: bool = True) -> torch.Tensor:
    if density >= 1:
        return delta
    return rescaled(delta, bernoulli_mask(delta, density, key), rescale)


def della_mask(rows: torch.Tensor, density: float, epsilon: float, key: int) -> torch.Tensor:
    """DELLA: keep probabilities rising linearly with the |delta| rank inside each row (dim 1), from
    density - epsilon to density + epsilon, then a draw per entry. `rows`: at least 2-D."""
    # rank by (|delta|, tie order) along dim 1, as mergekit's argsort of an argsort does
    sorted_idx = torch.argsort(P.magnitude_key(rows.abs(), key).reshape(rows.shape), dim=1)
    pos = torch.arange(rows.shape[1], device=rows.device).view(1, -1, *([1] * (rows.dim() - 2)))
    ranks = torch.empty_like(sorted_idx).scatter_(1, sorted_idx, pos.expand_as(sorted_idx).contiguous())
    ranks = ranks.to(torch.float32) + 1
    lo, hi = ranks.min(dim=1, keepdim=True).values, ranks.max(dim=1, keepdim=True).values
    rank_norm = ((ranks - lo) / (hi - lo)).clamp(0, 1)
    probs = (density - epsilon) + rank_norm * 2 * epsilon
    return (P.uniform(key, 0, rows.numel(), rows.device).reshape(rows.shape) < probs).to(torch.float32)


def della_magprune(delta: torch.Tensor, density: float, epsilon: float, key: int,
                   rescale: bool = True) -> torch.Tensor:
    if density >= 1:
        return delta
    if density <= 0:
        return torch.zeros_like(delta)
    rows = delta if delta.dim() >= 2 else delta.unsqueeze(0)
    return rescaled(rows, della_mask(rows, density, epsilon, key), rescale).reshape(delta.shape)
