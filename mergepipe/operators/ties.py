"""TIES: trim each delta to its top `density` fraction by magnitude, elect a sign per element from
the sum of the weighted trimmed deltas, and take the weighted mean of the entries that agree.

Trimming needs each (expert, tensor)'s k-th largest |delta|. The index holds a histogram of the top
16 bits of |delta| (float32), which pins that value to one 1/128-wide bin before anything is read:
entries above the bin are kept, entries below are dropped, and only the few inside the bin wait for
the exact k-th value, found from the bin's entries after the tensor has streamed (no sort, no second
read). A block whose max |delta| lies below the bin contributes nothing and is never read.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from . import Operator, Param

TIES = Operator(
    name="ties",
    aliases=(),
    params=(
        Param("weight", float, per_expert=True, expect="a number"),
        Param("density", float, per_expert=True, default=1.0, check=lambda v: 0 < v <= 1,
              expect="a fraction in (0, 1]"),
        Param("lambda", float, per_expert=False, default=1.0, expect="a number"),
        Param("normalize", bool, per_expert=False, default=True, expect="true or false"),
        Param("int8_mask", bool, per_expert=False, default=False, expect="true or false"),
    ),
    additive=False,
)


@dataclass(frozen=True)
class Trim:
    """Where the k-th largest |delta| lies: fine-histogram bin `bin`, with `above` entries in higher
    bins, so the `need`-th largest entry inside the bin is the threshold. bin = -1: keep everything."""
    bin: int
    above: int
    need: int

    @property
    def lo(self) -> float:
        """Smallest float32 in the bin: a block whose max |delta| is below it contributes nothing."""
        if self.bin < 0:
            return 0.0
        return float(np.array([self.bin << 16], dtype=np.int32).view(np.float32)[0])

    @property
    def hi(self) -> float:
        """Smallest float32 above the bin: entries at least this large are kept for certain."""
        if self.bin < 0:
            return 0.0
        return float(np.array([(self.bin + 1) << 16], dtype=np.int32).view(np.float32)[0])


def trim_for(fine: np.ndarray, numel: int, density: float) -> Trim:
    """mergekit keeps max(1, int(density * numel)) entries, or all of them when density >= 1."""
    if density >= 1:
        return Trim(-1, 0, 0)
    k = max(1, int(density * numel))
    from_top = np.cumsum(fine[::-1])
    j = int(np.searchsorted(from_top, k))  # first index (from the top) where the count reaches k
    b = len(fine) - 1 - j
    above = int(from_top[j - 1]) if j > 0 else 0
    return Trim(b, above, k - above)


def elect_and_mean(trimmed: torch.Tensor, weights: list[float], lam: float, normalize: bool,
                   base: torch.Tensor) -> torch.Tensor:
    """trimmed: [k, n] float32 trimmed deltas of the experts read here (an unread one is zero, which
    never agrees with a sign, so it is simply left out). Overwrites `trimmed`.

    mergekit's arithmetic, element for element, in float-only operations (torch's boolean masks
    cost about four times as much): the elected sign is +1 where the weighted sum is >= 0, and an
    entry agrees when sign(entry) * elected == 1."""
    w = torch.tensor(weights, dtype=trimmed.dtype, device=trimmed.device).view(-1, 1)
    trimmed.mul_(w)
    elected = trimmed.sum(dim=0).sign_().add_(0.5).sign_()  # -1, or +1 where the sum is >= 0
    agree = trimmed.sign().mul_(elected).clamp_(min=0)  # 1.0 where the signs agree, else 0.0
    mixed = trimmed.mul_(agree).sum(dim=0)
    if normalize:
        divisor = (w * agree).sum(dim=0)
        # 1 where 0, as mergekit's divisor[divisor == 0] = 1: adds 1 - |sign(x)|, which is 0 elsewhere
        # (x + 0 is x exactly); four float passes cost a quarter of a masked fill
        divisor.add_(divisor.sign().abs_().neg_().add_(1))
        mixed /= divisor
    if lam != 1:
        mixed *= lam
    return mixed.add_(base)  # base + mixed: addition commutes exactly
