"""Task arithmetic: W = W0 + lambda * sum_k w_k (W_k - W0) [/ sum_k w_k when normalize].

The arithmetic mirrors mergekit 0.1.5's generalized task arithmetic step for step (delta, scale,
stacked sum over experts, normalise, lambda, add base) so float32 results agree bit for bit.
"""

from __future__ import annotations

import torch

from . import Operator, Param

TA = Operator(
    name="task_arithmetic",
    aliases=("ta",),
    params=(
        Param("weight", float, per_expert=True, expect="a number"),
        Param("lambda", float, per_expert=False, default=1.0, expect="a number"),
        Param("normalize", bool, per_expert=False, default=False, expect="true or false"),
    ),
    additive=True,
)


def coefficients(weights: list[float], lam: float, normalize: bool) -> list[float]:
    """c_k in M = W0 + sum_k c_k Delta_k: what the planner scores and the certificate multiplies."""
    div = sum(weights)
    scale = lam / (div if normalize and abs(div) >= 1e-8 else 1.0)
    return [w * scale for w in weights]


CHUNK = 1 << 18  # elements per step: four experts' float32 scratch stays in the L2 cache


def merge_into(out: torch.Tensor, base: torch.Tensor, experts: list[torch.Tensor], weights: list[float],
               all_weights: list[float], lam: float, normalize: bool) -> None:
    """Merge one block into `out` (flat, output dtype). base and experts are flat, in their stored
    dtypes; `experts` holds only the experts the plan read here (an unread one is a zero delta) and
    `all_weights` every expert's weight, for the normalising divisor.

    Chunked so that each element is converted, differenced and weighted while in cache; the
    operations and their order are mergekit's, so the float32 results are identical to it."""
    w = torch.tensor(weights, dtype=torch.float32, device=out.device).view(-1, 1)
    div = torch.tensor(all_weights, dtype=torch.float32).sum()  # a float32 sum, as in mergekit
    scratch = torch.empty((len(experts), min(CHUNK, out.numel())), dtype=torch.float32, device=out.device)
    for s in range(0, out.numel(), CHUNK):
        e = min(s + CHUNK, out.numel())
        b = base[s:e].float()
        d = scratch[:, :e - s]
        for i, x in enumerate(experts):
            torch.sub(x[s:e], b, out=d[i])  # converts and subtracts in one pass
        d.mul_(w)
        mixed = d.sum(dim=0)
        if normalize:
            mixed /= div if abs(float(div)) >= 1e-8 else 1.0
        if lam != 1:
            mixed *= lam
        out[s:e] = mixed.add_(b)  # base + mixed: addition commutes exactly
