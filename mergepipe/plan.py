"""The access planner: which (expert, block) pairs to read under a byte budget.

It works from the catalog alone and reads no tensor data. Each operator offers its candidates: the
(expert, block) pairs that can change the result at all (a zero delta, a zero weight, or, for TIES,
a block wholly below the trim threshold cannot), each with a score. They are taken greedily by score
per byte, ties broken by (tensor, block, expert), while the running total stays within the budget:
budget-sound by construction, deterministic, and the exact full merge when everything fits.
"""

from __future__ import annotations

import dataclasses
import os
import platform
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from . import __version__
from . import blocks as B
from . import stages
from .budget import parse_budget
from .checkpoint import Model, open_model
from .config import MergeConfig
from .errors import MergepipeError
from .index import Catalog, FamilyIndex, TensorDelta, index_family
from .options import PlanOptions
from .manifest import SCHEMA, Budget, InputFile, InputModel, Manifest, OperatorSpec, Plan, Stage, TensorPlan
from .params import Resolver
from .paths import recorded_path

PLANNERS = ("score", "random")


@dataclass
class Table:
    """Every candidate (expert, block) pair as flat columns: tensor id, block (0 for a whole tensor),
    expert, bytes, score, certificate share; in (tensor, expert, block) order."""
    t: np.ndarray
    b: np.ndarray
    k: np.ndarray
    bytes: np.ndarray
    score: np.ndarray
    share: np.ndarray

    @staticmethod
    def concat(parts: dict[str, list]) -> Table:
        kinds = {"t": np.int64, "b": np.int64, "k": np.int64, "bytes": np.int64, "score": np.float64, "share": np.float64}
        return Table(**{c: np.concatenate(v).astype(kinds[c]) if v else np.zeros(0, kinds[c]) for c, v in parts.items()})


def _hex(hashes: np.ndarray) -> str:
    return hashes.astype(">u8").tobytes().hex()


def _input(model: Model, fam: FamilyIndex, relative_to: Path | None) -> InputModel:
    files = []
    for fh in model.files:
        fi = fam.files[str(fh.path)]
        name = os.path.relpath(fh.path, model.root)
        files.append(InputFile(name, fi.size, fi.header_hash,
                               {t: _hex(h) for t, h in sorted(fi.hashes.items())}, fi.content_hash))
    return InputModel(recorded_path(model.ref, relative_to), files)


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


def _candidates(op, names: list[str], readable: set[str], experts: list[Model], fam: FamilyIndex,
                resolver: Resolver, allow_nonfinite: bool) -> tuple[Table, dict[str, dict | None]]:
    """The operator's candidates for every readable tensor, and its per-tensor plan data."""
    cols: dict[str, list] = {c: [] for c in ("t", "b", "k", "bytes", "score", "share")}
    data: dict[str, dict | None] = {}
    for ti, name in enumerate(names):
        if name not in readable:
            continue  # the base's own: no candidates, no reads
        tp = resolver.tensor(name)
        coef = op.coefficients(tp)
        deltas = [_finite(fam.deltas[k][name], e, name, allow_nonfinite) for k, e in enumerate(experts)]
        info = experts[0].tensors[name]
        data[name] = op.tensor_data(info, deltas, tp)
        for k, e in enumerate(experts):
            c = op.candidates(e.tensors[name], k, deltas[k], tp, coef[k], data[name])
            if len(c.blocks) > 1 and not (np.diff(c.blocks) > 0).all():
                raise MergepipeError(f"internal: {op.name}'s candidates for {name!r} are not ascending distinct blocks")
            if op.unit == "tensor":
                nbytes = np.array([e.tensors[name].end - e.tensors[name].start])
            else:
                nbytes = B.block_bytes(e.tensors[name])
            cols["t"].append(np.full(len(c.blocks), ti))
            cols["b"].append(c.blocks)
            cols["k"].append(np.full(len(c.blocks), k))
            cols["bytes"].append(nbytes[c.blocks])
            cols["score"].append(c.score)
            cols["share"].append(c.share)
    return Table.concat(cols), data


def choose(c: Table, budget: int, planner: str, seed: int) -> np.ndarray:
    """Which candidates to read: greedily by score per byte (or in a seeded random order), each one
    that still fits. Vectorised: the longest prefix that fits is taken at once, then only candidates
    small enough for what is left are looked at."""
    n = len(c.t)
    chosen = np.zeros(n, dtype=bool)
    if c.bytes.sum() <= budget:
        chosen[:] = True
        return chosen
    if planner == "score":
        density = c.score / np.maximum(c.bytes, 1)
        k, b = int(c.k.max()) + 1, int(c.b.max()) + 1
        ties = (c.t * b + c.b) * k + c.k  # (tensor, block, expert) as one key
        order = np.lexsort((ties, -density))  # last key is the primary one
    else:
        order = np.random.Generator(np.random.PCG64(seed)).permutation(n)
    sizes = c.bytes[order]
    fits = int(np.searchsorted(np.cumsum(sizes), budget, side="right"))
    chosen[order[:fits]] = True
    left = budget - int(sizes[:fits].sum())
    rest = np.arange(fits + 1, n)
    while len(rest):
        rest = rest[sizes[rest] <= left]
        if not len(rest):
            break
        i = rest[0]
        chosen[order[i]] = True
        left -= int(sizes[i])
        rest = rest[1:]
    return chosen


def _grouped_runs(group: np.ndarray, blocks: np.ndarray, n_groups: int) -> list[list[list[int]]]:
    """Per group id, the [start, end) runs of its blocks; rows sorted by (group, block), all at once."""
    out: list[list[list[int]]] = [[] for _ in range(n_groups)]
    if not len(blocks):
        return out
    brk = np.nonzero((np.diff(blocks) != 1) | (np.diff(group) != 0))[0] + 1
    first = np.concatenate(([0], brk))
    last = np.concatenate((brk, [len(blocks)])) - 1
    runs = np.stack([blocks[first], blocks[last] + 1], axis=1)
    run_group = group[first]
    cuts = np.nonzero(np.diff(run_group))[0] + 1
    for g, part in zip(run_group[np.concatenate(([0], cuts))], np.split(runs, cuts)):
        out[int(g)] = part.tolist()
    return out


def _selections(c: Table, chosen: np.ndarray, n_tensors: int, n_experts: int, whole: dict[int, int] | None):
    """Per (tensor, expert): candidate runs and chosen runs, from one sort of the candidates (not one
    scan of all candidates per tensor and expert). `whole`: tensor id -> block count, for whole-tensor
    operators, whose candidate [0] stands for every block."""
    group, blocks, picked = c.t * n_experts + c.k, c.b, chosen  # the table is in this order already
    n = n_tensors * n_experts
    if whole is not None:
        blocks = np.zeros_like(blocks)  # [0] stands for the tensor: widened below
    cand = _grouped_runs(group, blocks, n)
    sel = _grouped_runs(group[picked], blocks[picked], n)
    if whole is not None:
        cand = [[[0, whole[g // n_experts]]] if r else [] for g, r in enumerate(cand)]
        sel = [[[0, whole[g // n_experts]]] if r else [] for g, r in enumerate(sel)]
    return ([cand[t * n_experts:(t + 1) * n_experts] for t in range(n_tensors)],
            [sel[t * n_experts:(t + 1) * n_experts] for t in range(n_tensors)])


def _tensor_plans(op, names: list[str], base: Model, n_experts: int, c: Table, chosen: np.ndarray,
                  data: dict, resolver: Resolver) -> tuple[dict[str, TensorPlan], float]:
    """Each tensor's plan entry, and the certificate's bound. Blocks have disjoint supports, so the
    omitted parts of different blocks are orthogonal: the squared deviation is the sum over blocks of
    ||sum_k c_k Delta_kb||^2, and inside one block the triangle inequality bounds that by
    (sum_k |c_k| ||Delta_kb||)^2."""
    omitted = ~chosen
    nb_max = int(c.b.max()) + 1 if len(c.b) else 1
    per_block = np.bincount(c.t[omitted] * nb_max + c.b[omitted], weights=c.share[omitted],
                            minlength=len(names) * nb_max)
    tensor_sq = (per_block.reshape(len(names), nb_max) ** 2).sum(axis=1) if names else np.zeros(0)
    planned = np.bincount(c.t[chosen], weights=c.bytes[chosen], minlength=len(names))
    shapes = [base.tensors[n].shape for n in names]
    whole = {ti: B.n_blocks(s) for ti, s in enumerate(shapes)} if op.unit == "tensor" else None
    cand, sel = _selections(c, chosen, len(names), n_experts, whole)
    tensors = {}
    for ti, name in enumerate(names):
        share = float(np.sqrt(tensor_sq[ti])) if op.additive else None
        tp = resolver.tensor(name)
        tensors[name] = TensorPlan(B.n_blocks(shapes[ti]), B.rows_per_block(shapes[ti]), sel[ti], cand[ti],
                                   int(planned[ti]), share if share is None or np.isfinite(share) else None,
                                   tp.shared, list(tp.experts), data.get(name))
    return tensors, float(np.sqrt(tensor_sq.sum()))


@dataclass
class Selection:
    tensors: dict[str, TensorPlan]
    total: int  # expert bytes the operator may read
    budget: int
    planned: int
    certificate: object  # operators.Certificate


def select(op, resolver: Resolver, base: Model, experts: list[Model], fam: FamilyIndex, budget: str,
           opts: PlanOptions) -> Selection:
    """The plan proper, from the catalog's statistics alone (no file is opened)."""
    floating = {n: info for n, info in base.tensors.items() if info.is_float}
    names = list(floating)
    readable = op.readable(floating, resolver.shared, opts.source)
    total = sum(e.tensors[n].end - e.tensors[n].start for n in readable for e in experts)
    budget_bytes = parse_budget(budget, total)
    table, data = _candidates(op, names, readable, experts, fam, resolver, opts.allow_nonfinite)
    chosen = choose(table, budget_bytes, opts.planner, opts.seed)
    tensors, bound = _tensor_plans(op, names, base, len(experts), table, chosen, data, resolver)
    return Selection(tensors, total, budget_bytes, int(table.bytes[chosen].sum()),
                     op.certificate(bound if np.isfinite(bound) else None))


def plan_merge(config: MergeConfig, budget: str = "100%", catalog: Catalog | None = None,
               options: PlanOptions | None = None, **flags) -> Manifest:
    """Plan `config` under `budget`. Options come as a PlanOptions or as its fields by keyword."""
    opts = dataclasses.replace(options or PlanOptions(**flags), source=config.source)
    if opts.planner not in PLANNERS:
        raise MergepipeError(f"planner {opts.planner!r} is not known (expected one of {', '.join(PLANNERS)})")
    base = open_model(config.base, opts.allow_pickle)
    experts = [open_model(e, opts.allow_pickle) for e in config.experts]
    fam = index_family(base, experts, catalog or Catalog(), opts.progress)
    op = config.operator
    sel = select(op, Resolver(op, config.params, config.expert_params), base, experts, fam, budget, opts)
    rel = Path(opts.relative_to).resolve() if opts.relative_to else None
    return Manifest(
        schema=SCHEMA,
        tool={"name": "mergepipe", "version": __version__, "python": platform.python_version(),
              "torch": torch.__version__},
        base=_input(base, fam, rel),
        experts=[_input(e, fam, rel) for e in experts],
        out_dtype=config.out_dtype,
        operator=OperatorSpec(op.name, dict(config.params), [dict(p) for p in config.expert_params]),
        budget=Budget(str(budget), sel.budget, sel.total),
        plan=Plan(opts.planner, opts.seed, sel.planned, sel.tensors, sel.certificate, opts.allow_nonfinite),
        stages=[Stage(kind, dataclasses.asdict(stages.get(kind).plan(section, base, experts, rel)))
                for kind, section in config.stages],
    )
