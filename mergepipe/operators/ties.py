"""TIES: trim each delta to its top `density` fraction by magnitude, elect a sign per element from
the sum of the weighted trimmed deltas, and take the weighted mean of the entries that agree.

Trimming needs each (expert, tensor)'s k-th largest |delta|. The index holds a histogram of the top
16 bits of |delta| (float32), which pins that value to one 1/128-wide bin before anything is read:
entries above the bin are kept, entries below are dropped, and only the few inside the bin wait for
the exact k-th value, found from the bin's entries after the tensor has streamed (no sort, no second
read). A block whose max |delta| lies below the bin contributes nothing and is never read.

With `rescale: true` (mergekit's L1 rescale of each trimmed delta, |Delta|_1 / |trim(Delta)|_1) the
factor needs every entry of the (expert, tensor) before the sign election, so that variant reads
every non-zero block and merges whole tensors: the generalized task arithmetic's kernel with the
same exact-k trim and the same tie stream, so its kept entries are the streaming kernel's.
"""

from __future__ import annotations

import numpy as np
import torch

from ..errors import MergepipeError
from ..index import EXP_LO, FINITE_BINS
from . import Candidates, Certificate, Operator, Param, TensorParams, register
from .gta import MAGNITUDE, GeneralizedTaskArithmetic
from .ties_stream import Trim, TiesTensor, trim_for
from .whole import WholeTensor



def trimmed_score(td, lo: float) -> np.ndarray:
    """Estimated ||trim(Delta_b)||_F per block from the coarse histogram: whole bins above the
    threshold's power of two, and the threshold's own bin pro rata."""
    if lo <= 0:
        return td.l2
    e = int(np.floor(np.log2(lo))) - EXP_LO
    e = min(max(e, 0), td.coarse_sumsq.shape[1] - 1)
    above = td.coarse_sumsq[:, e + 1:].sum(axis=1)
    frac = 1.0 - (lo / 2.0 ** (e + EXP_LO) - 1.0)  # share of [2^e, 2^(e+1)) above lo
    return np.sqrt(above + td.coarse_sumsq[:, e] * max(0.0, min(1.0, frac)))


class Ties(Operator):
    name = "ties"
    params = (
        Param("weight", float, per_expert=True, expect="a number"),
        Param("density", float, per_expert=True, default=1.0, check=lambda v: 0 < v <= 1,
              expect="a fraction in (0, 1]"),
        Param("lambda", float, per_expert=False, default=1.0, expect="a number"),
        Param("normalize", bool, per_expert=False, default=True, expect="true or false"),
        Param("int8_mask", bool, per_expert=False, default=False, expect="true or false"),
        Param("rescale", bool, per_expert=False, default=False, expect="true or false", since_default=True),
    )

    def tensor_data(self, info, deltas, tp: TensorParams) -> dict:
        """Each expert's trim threshold pinned to a fine-histogram bin, [bin, above, need]; the count
        k it keeps (mergekit's); and the tie rule: "hash", exactly k, equal magnitudes taken in the
        order of a hash of (tie_seed, tensor, expert, position). A plan without "tie" (one made before
        exact k) keeps or drops each group of equal magnitudes whole, and replays that way."""
        trims = [trim_for(td.fine, info.numel, p["density"]) for td, p in zip(deltas, tp.experts)]
        return {"trim": [[t.bin, t.above, t.need] for t in trims],
                "k": [t.above + t.need if t.bin >= 0 else info.numel for t in trims],
                "tie": "hash", "tie_seed": 0}

    def candidates(self, info, k, delta, tp, coef, data) -> Candidates:
        """A block whose max |delta| lies below the trim bin contributes nothing and is never read
        (with rescale, every non-zero block counts towards the L1 factor)."""
        if tp.shared["rescale"]:
            return super().candidates(info, k, delta, tp, coef, data)
        trim = Trim(*data["trim"][k])
        share = abs(coef) * delta.l2
        score = abs(coef) * trimmed_score(delta, trim.lo)
        idx = np.nonzero((delta.maxabs >= trim.lo) & (delta.l2 > 0) & (coef != 0))[0]
        return Candidates(idx, score[idx], share[idx])

    def certificate(self, bound, data=None) -> Certificate:
        return Certificate("none", None, "ties is not additive: trimming and sign election are non-linear, so "
                           "only the measured deviation is reported")

    def check_plan(self, name: str, tp, experts: int) -> None:
        data = tp.data or {}
        trim = data.get("trim")
        exact = {"trim", "k", "tie", "tie_seed"}
        if set(data) not in ({"trim"}, exact) or not isinstance(trim, list) or len(trim) != experts:
            raise MergepipeError(f"plan.tensors.{name}.data must be {{\"trim\": one [bin, above, need] per expert, "
                                 "\"k\": one count per expert, \"tie\": \"hash\", \"tie_seed\": an integer}")
        for t in trim:
            ok = isinstance(t, list) and len(t) == 3 and all(_is_int(v) for v in t)
            if not ok or not (-1 <= t[0] < FINITE_BINS and t[1] >= 0 and t[2] >= 0) or (t[0] < 0 and t[1:] != [0, 0]):
                raise MergepipeError(f"plan.tensors.{name}.data.trim has {t}, expected [bin, above, need] "
                                     f"with -1 <= bin < {FINITE_BINS} (-1: keep all, with above = need = 0)")
        if set(data) == exact:
            ks = data["k"]
            if data["tie"] != "hash" or not _is_int(data["tie_seed"]) or not isinstance(ks, list) or len(ks) != experts \
                    or not all(_is_int(k) and (t[0] < 0 or k == t[1] + t[2]) for k, t in zip(ks, trim)):
                raise MergepipeError(f"plan.tensors.{name}.data: tie must be \"hash\", tie_seed an integer, and k "
                                     "one count per expert equal to above + need where it trims")

    def kernel(self, job, dev: str, scratch):
        if job.params.shared["rescale"]:
            return WholeTensor(job, torch.device(dev), _RESCALED.merge)
        return TiesTensor(self, job, torch.device(dev), scratch)


TIES = register(Ties())
# TIES's own parameters and defaults resolve the job; this only merges (its keys: the "tie" stream)
_RESCALED = GeneralizedTaskArithmetic("ties", MAGNITUDE, consensus=True, normalize=True, rescale=True, stream="tie")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)
