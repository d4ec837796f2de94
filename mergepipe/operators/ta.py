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


def weighted_deltas(base: torch.Tensor, experts: torch.Tensor, weights: list[float]) -> torch.Tensor:
    """experts: [k, *block] float32, overwritten in place with w_k * (W_k - W0)."""
    experts.sub_(base)
    w = torch.tensor(weights, dtype=experts.dtype, device=experts.device)
    return experts.mul_(w.view(-1, *([1] * base.dim())))


def merge_block(base: torch.Tensor, experts: torch.Tensor, weights: list[float], all_weights: list[float],
                lam: float, normalize: bool) -> torch.Tensor:
    """One block. `experts` holds only the experts the plan read here (an unread one is a zero
    delta); `all_weights` are every expert's weights, for the normalising divisor."""
    mixed = weighted_deltas(base, experts, weights).sum(dim=0)
    if normalize:  # the divisor is a float32 sum, as in mergekit, so rounding matches
        div = torch.tensor(all_weights, dtype=torch.float32).sum()
        mixed /= div if abs(float(div)) >= 1e-8 else 1.0
    if lam != 1:
        mixed *= lam
    return base + mixed
