"""The access planner: which (expert, block) pairs to read under a byte budget.

It works from the catalog alone and reads no tensor data. Candidates are the pairs that can change
the result at all (a zero delta, a zero weight, or, for TIES, a block wholly below the trim
threshold cannot). They are taken greedily by score per byte (the score of an additive operator is
|c_k| * ||Delta_kb||_F, so this order greedily shrinks the error certificate), ties broken by (tensor,
block, expert), while the running total stays within the budget: budget-sound by construction,
deterministic, and the exact full merge when everything fits.
"""

from __future__ import annotations

import dataclasses
import os
import platform
import re
from pathlib import Path

import numpy as np
import torch

from . import __version__
from . import blocks as B
from .checkpoint import Model, open_model
from .config import MergeConfig
from .errors import MergepipeError
from .index import Catalog, FamilyIndex, TensorDelta, index_family, EXP_LO
from .manifest import (SCHEMA, Budget, Certificate, InputFile, InputModel, Manifest, OperatorSpec, Plan,
                       TensorPlan, set_to_runs)
from .operators import gcwm, ta, ties

UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
         "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40,
         "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
PLANNERS = ("score", "random")


def parse_budget(spec: str, total: int) -> int:
    """'20%' of the experts' tensor bytes, or an absolute size such as '3GiB' or '500MB'."""
    s = str(spec).strip().lower()
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*(%|[kmgt]?i?b?)", s)
    if not m:
        raise MergepipeError(f"budget {spec!r} is not a percentage (e.g. 20%) or a size (e.g. 3GiB, 500MB)")
    value, unit = float(m.group(1)), m.group(2)
    if unit == "%":
        if value > 100:
            raise MergepipeError(f"budget {spec!r} is over 100% of the expert bytes")
        return int(total * value / 100)
    if unit not in UNITS:
        raise MergepipeError(f"budget {spec!r}: unknown unit {unit!r} (use B, KB, MB, GB, KiB, MiB, GiB)")
    return int(value * UNITS[unit])


def _hex(hashes: np.ndarray) -> str:
    return hashes.astype(">u8").tobytes().hex()


def recorded_path(ref: str, relative_to: Path | None) -> str:
    """How a manifest records a local path: absolute, or relative to `relative_to`; other refs (hub
    ids) as given."""
    local = Path(ref).expanduser()
    if not local.exists():
        return ref
    local = local.resolve()
    # "./" keeps a relative path from reading as a hub id (org/name)
    return os.path.join(".", os.path.relpath(local, relative_to)) if relative_to else str(local)


def _input(model: Model, fam: FamilyIndex, relative_to: Path | None) -> InputModel:
    ref = recorded_path(model.ref, relative_to)
    files = []
    for fh in model.files:
        fi = fam.files[str(fh.path)]
        name = os.path.relpath(fh.path, model.root)
        files.append(InputFile(name, fi.size, fi.header_hash,
                               {t: _hex(h) for t, h in sorted(fi.hashes.items())}, fi.content_hash))
    return InputModel(ref, files)


def _ties_score(td: TensorDelta, lo: float) -> np.ndarray:
    """Estimated ||trim(Delta_b)||_F per block from the coarse histogram: whole bins above the
    threshold's power of two, and the threshold's own bin pro rata."""
    if lo <= 0:
        return td.l2
    e = int(np.floor(np.log2(lo))) - EXP_LO
    e = min(max(e, 0), td.coarse_sumsq.shape[1] - 1)
    above = td.coarse_sumsq[:, e + 1:].sum(axis=1)
    frac = 1.0 - (lo / 2.0 ** (e + EXP_LO) - 1.0)  # share of [2^e, 2^(e+1)) above lo
    return np.sqrt(above + td.coarse_sumsq[:, e] * max(0.0, min(1.0, frac)))


def _finite(td: TensorDelta, expert: Model, name: str, allow: bool) -> TensorDelta:
    """Refuse NaN/Inf deltas, or with `allow` make them plain large candidates (read first, as they
    change the result most) so that the planner's arithmetic stays finite."""
    bad = ~(np.isfinite(td.l2) & np.isfinite(td.maxabs))
    if not bad.any():
        return td
    if not allow:
        raise MergepipeError(f"{expert.ref}: tensor {name!r} block {int(np.argmax(bad))} holds NaN or Inf (or its "
                             "delta from the base does); pass --allow-nonfinite to merge it anyway")
    big = np.finfo(np.float32).max
    return dataclasses.replace(td, l2=np.where(bad, big, td.l2), maxabs=np.where(bad, big, td.maxabs).astype(np.float32))


def plan_merge(config: MergeConfig, budget: str = "100%", catalog: Catalog | None = None,
               planner: str = "score", seed: int = 0, allow_pickle: bool = False,
               relative_to: str | Path | None = None, progress=None, allow_nonfinite: bool = False) -> Manifest:
    if planner not in PLANNERS:
        raise MergepipeError(f"planner {planner!r} is not known (expected one of {', '.join(PLANNERS)})")
    base = open_model(config.base, allow_pickle)
    experts = [open_model(e, allow_pickle) for e in config.experts]
    catalog = catalog or Catalog()
    fam = index_family(base, experts, catalog, progress)
    op = config.operator
    weights = [p["weight"] for p in config.expert_params]
    if op is ta.TA:
        coef = ta.coefficients(weights, config.params["lambda"], config.params["normalize"])
    else:
        coef = [w * config.params["lambda"] for w in weights]

    names = [n for n, info in base.tensors.items() if info.is_float]
    readable = set(names)  # tensors whose expert bytes the operator may read
    whole = op is gcwm.GCWM  # GCWM reads whole (expert, tensor) pairs: its SVD is not block-separable
    if whole:
        targets = config.params["targets"]
        flat = next((n for n, info in base.tensors.items() if gcwm.matches(n, targets)
                     and not gcwm.is_target(n, info.shape, info.is_float, targets)), None)
        if flat is not None:
            raise MergepipeError(f"{config.source}: tensor {flat!r} {list(base.tensors[flat].shape)} "
                                 f"({base.tensors[flat].dtype}) matches the gcwm targets {targets!r}, but gcwm "
                                 "merges 2-D floating matrices only")
        readable = {n for n in names if gcwm.is_target(n, base.tensors[n].shape, True, targets)}
        if not readable:
            raise MergepipeError(f"{config.source}: no tensor of {base.ref} matches the gcwm targets "
                                 f"{config.params['targets']!r} (2-D floating tensors, not embed or lm_head)")
    total = sum(e.tensors[n].end - e.tensors[n].start for n in readable for e in experts)
    budget_bytes = parse_budget(budget, total)
    # Candidate pairs as flat arrays: tensor id, block (gcwm: 0 for the whole tensor), expert, bytes, score, bound share.
    cols: dict[str, list] = {"t": [], "b": [], "k": [], "bytes": [], "score": [], "share": []}
    trims: dict[str, list[list[int]]] = {}
    for ti, name in enumerate(names):
        if name not in readable:
            continue  # gcwm copies it from the base: no candidates, no reads
        for k, e in enumerate(experts):
            td = _finite(fam.deltas[k][name], e, name, allow_nonfinite)
            info = e.tensors[name]
            if whole:
                # every expert is a candidate: at 100% all are active (a zero delta still shapes the basis)
                cols["t"].append([ti])
                cols["b"].append([0])  # stands for every block
                cols["k"].append([k])
                cols["bytes"].append([info.end - info.start])
                cols["score"].append([weights[k] * float(np.sqrt(np.sum(td.l2.astype(np.float64) ** 2)))])
                cols["share"].append([0.0])
                continue
            nbytes = np.array([blk.end - blk.start for blk in B.blocks(info)])
            share = abs(coef[k]) * td.l2
            if op is ties.TIES:
                trim = ties.trim_for(td.fine, info.numel, config.expert_params[k]["density"])
                trims.setdefault(name, []).append([trim.bin, trim.above, trim.need])
                score = abs(coef[k]) * _ties_score(td, trim.lo)
                useful = (td.maxabs >= trim.lo) & (td.l2 > 0)
            else:
                score = share
                useful = td.l2 > 0
            useful &= coef[k] != 0
            idx = np.nonzero(useful)[0]
            cols["t"].append(np.full(len(idx), ti))
            cols["b"].append(idx)
            cols["k"].append(np.full(len(idx), k))
            cols["bytes"].append(nbytes[idx])
            cols["score"].append(score[idx])
            cols["share"].append(share[idx])
    c = {key: np.concatenate(v) if v else np.zeros(0) for key, v in cols.items()}
    n = len(c["t"])
    if planner == "score":
        density = c["score"] / np.maximum(c["bytes"], 1)
        order = np.lexsort((c["k"], c["b"], c["t"], -density))  # last key is the primary one
    else:
        order = np.random.Generator(np.random.PCG64(seed)).permutation(n)
    chosen = np.zeros(n, dtype=bool)
    if c["bytes"].sum() <= budget_bytes:
        chosen[:] = True
    else:
        running = 0
        for i in order:
            if running + c["bytes"][i] <= budget_bytes:
                running += int(c["bytes"][i])
                chosen[i] = True

    additive = op.additive
    # Blocks have disjoint supports, so the omitted parts of different blocks are orthogonal: the
    # squared deviation is the sum over blocks of ||sum_k c_k Delta_kb||^2, and inside one block the
    # triangle inequality bounds that by (sum_k |c_k| ||Delta_kb||)^2.
    omitted = ~chosen
    nb_max = int(c["b"].max()) + 1 if n else 1
    per_block = np.bincount((c["t"][omitted] * nb_max + c["b"][omitted]).astype(np.int64),
                            weights=c["share"][omitted], minlength=len(names) * nb_max)
    tensor_sq = (per_block.reshape(len(names), nb_max) ** 2).sum(axis=1) if names else np.zeros(0)
    tensors: dict[str, TensorPlan] = {}
    for ti, name in enumerate(names):
        shape = base.tensors[name].shape
        mask = c["t"] == ti
        sel, cand = [], []
        for k in range(len(experts)):
            mk = mask & (c["k"] == k)
            if whole:
                cand.append([[0, B.n_blocks(shape)]] if mk.any() else [])
                sel.append([[0, B.n_blocks(shape)]] if (mk & chosen).any() else [])
                continue
            cand.append(set_to_runs(c["b"][mk].astype(int).tolist()))
            sel.append(set_to_runs(c["b"][mk & chosen].astype(int).tolist()))
        share = float(np.sqrt(tensor_sq[ti])) if additive else None
        share = share if share is None or np.isfinite(share) else None
        tensors[name] = TensorPlan(B.n_blocks(shape), B.rows_per_block(shape), sel, cand,
                                   int(c["bytes"][mask & chosen].sum()), share, trims.get(name))
    bound = float(np.sqrt(tensor_sq.sum()))
    if additive and not np.isfinite(bound):
        cert = Certificate("none", None, "the inputs hold NaN or Inf (allowed by --allow-nonfinite): no bound")
    elif additive:
        cert = Certificate("frobenius", bound, "||M - M_A||_F <= sqrt(sum over blocks b of (sum over omitted "
                           "experts k of |c_k| * ||Delta_kb||_F)^2), in exact arithmetic before rounding to the "
                           "output dtype")
    elif whole:
        cert = Certificate("none", None, "gcwm is not additive (SVD, barycenter and the inner solve are "
                           "non-linear): an unread expert tensor leaves that tensor's active set, and only "
                           "the measured deviation is reported")
    else:
        cert = Certificate("none", None, f"{op.name} is not additive: trimming and sign election are "
                           "non-linear, so only the measured deviation is reported")
    rel = Path(relative_to).resolve() if relative_to else None
    calibration = None
    if config.calibrate is not None:
        from .featcal.stage import plan_calibration
        calibration = plan_calibration(config.calibrate, base, experts, rel)
    return Manifest(
        schema=SCHEMA,
        tool={"name": "mergepipe", "version": __version__, "python": platform.python_version(),
              "torch": torch.__version__},
        base=_input(base, fam, rel),
        experts=[_input(e, fam, rel) for e in experts],
        out_dtype=config.out_dtype,
        operator=OperatorSpec(op.name, dict(config.params), [dict(p) for p in config.expert_params]),
        budget=Budget(str(budget), budget_bytes, total),
        plan=Plan(planner, seed, int(c["bytes"][chosen].sum()), tensors, cert),
        calibration=calibration,
    )
