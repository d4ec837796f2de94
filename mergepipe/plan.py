"""The access planner: which (expert, block) pairs to read under a byte budget.

It works from the catalog alone and reads no tensor data. Each operator offers its candidates: the
(expert, block) pairs that can change the result at all (a zero delta, a zero weight, or, for TIES,
a block wholly below the trim threshold cannot), each with a score. They are taken greedily by score
per byte, ties broken by (tensor, block, expert), while the running total stays within the budget:
budget-sound by construction, deterministic, and the exact full merge when everything fits. Below
100% the budget caps what the OS reads (mergepipe.pages): whole pages, and every expert file's header.
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
from . import pages, stages
from .budget import parse_budget
from .checkpoint import Model, open_model
from .config import MergeConfig
from .errors import MergepipeError
from .index import Catalog, FamilyIndex, TensorDelta, index_family, same_model
from .options import PlanOptions
from .manifest import (SCHEMA, Budget, InputFile, InputModel, Manifest, OperatorSpec, Plan, SketchFile, Stage,
                       TensorPlan)
from .layers import Target
from .params import Resolver
from .outputs import recipe_record
from .slicing import plan_outputs
from .paths import recorded_path
from .sketch import SketchSpec

PLANNERS = ("score", "random")
FILLS = ("sketch", "zero")


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
    sketch_bytes: np.ndarray  # 0: no sketch of this block
    sketch_share: np.ndarray  # |c_k| * ||Delta_kb - S_kb||_F: the certificate share when sketch-filled
    file: np.ndarray  # where the exact bytes lie: a file id (Files) and the absolute offset in it
    offset: np.ndarray
    sketch_file: np.ndarray  # where the sketch lies (-1: no sketch)
    sketch_offset: np.ndarray

    @staticmethod
    def concat(parts: dict[str, list]) -> Table:
        kinds = {"t": np.int64, "b": np.int64, "k": np.int64, "bytes": np.int64, "score": np.float64,
                 "share": np.float64, "sketch_bytes": np.int64, "sketch_share": np.float64, "file": np.int64,
                 "offset": np.int64, "sketch_file": np.int64, "sketch_offset": np.int64}
        return Table(**{c: np.concatenate(v).astype(kinds[c]) if v else np.zeros(0, kinds[c]) for c, v in parts.items()})


def _hex(hashes: np.ndarray) -> str:
    return hashes.astype(">u8").tobytes().hex()


def _sketch_file(sk, tensors: dict[str, TensorPlan], k: int, relative_to: Path | None) -> SketchFile | None:
    """The expert's sidecar as the manifest records it, if the plan fills any block from it."""
    used = sorted(n for n, tp in tensors.items() if tp.sketched and tp.sketched[k])
    if sk is None or not used:
        return None
    return SketchFile(recorded_path(str(sk.path), relative_to), sk.size, sk.hash, sk.spec.kind, dict(sk.spec.params),
                      {n: _hex(sk.tensors[n].hashes) for n in used})


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


class Files(dict):
    """File path -> the integer id the planner's page count knows it by."""

    def id(self, path) -> int:
        return self.setdefault(str(path), len(self))


def _candidates(op, targets: list[Target], readable: set[str], experts: list[Model], fam: FamilyIndex,
                resolver: Resolver, allow_nonfinite: bool, own: set[int]) -> tuple[Table, dict[str, dict | None], Files]:
    """The operator's candidates for every readable tensor, its per-tensor plan data, and the ids of
    the files the candidates lie in. A target reads its source tensor of every model (a stacked one,
    of one model, has no candidates). Experts in `own` are the base itself (a method that merges the
    base as an input): nothing to read."""
    cols: dict[str, list] = {c: [] for c in Table.__dataclass_fields__}
    files = Files()
    data: dict[str, dict | None] = {}
    for ti, target in enumerate(targets):
        name, src = target.name, target.source
        if src not in readable or len(target.models) == 1:
            continue  # the base's own (or one model's, copied): no candidates, no planned reads
        tp = resolver.tensor(name, target)
        coef = op.coefficients(tp)
        deltas = [_finite(fam.deltas[k][src], e, src, allow_nonfinite) for k, e in enumerate(experts)]
        info = experts[0].tensors[src]
        data[name] = op.tensor_data(info, deltas, tp)
        for k, e in enumerate(experts):
            if k in own:
                continue
            c = op.candidates(e.tensors[src], k, deltas[k], tp, coef[k], data[name])
            if len(c.blocks) > 1 and not (np.diff(c.blocks) > 0).all():
                raise MergepipeError(f"internal: {op.name}'s candidates for {name!r} are not ascending distinct blocks")
            at = e.tensors[src]
            nbytes = np.array([at.end - at.start]) if op.unit == "tensor" else B.block_bytes(at)
            n = len(c.blocks)
            cols["t"].append(np.full(n, ti))
            cols["b"].append(c.blocks)
            cols["k"].append(np.full(n, k))
            cols["bytes"].append(nbytes[c.blocks])
            cols["score"].append(c.score)
            cols["share"].append(c.share)
            cols["file"].append(np.full(n, files.id(at.file)))
            cols["offset"].append(at.start + (np.cumsum(nbytes) - nbytes)[c.blocks])
            sidecar = fam.sketches[k] if fam.sketches and fam.sketches[k] else None
            sk = sidecar.tensors.get(src) if sidecar else None
            if sk is None or op.unit == "tensor":
                cols["sketch_bytes"].append(np.zeros(n, np.int64))
                cols["sketch_share"].append(c.share)
                cols["sketch_file"].append(np.full(n, -1))
                cols["sketch_offset"].append(np.zeros(n, np.int64))
            else:
                cols["sketch_bytes"].append(sk.sizes[c.blocks])
                cols["sketch_share"].append(np.minimum(c.share, abs(coef[k]) * sk.residual[c.blocks]))
                cols["sketch_file"].append(np.full(n, files.id(sidecar.path)))
                cols["sketch_offset"].append(sk.start + (np.cumsum(sk.sizes) - sk.sizes)[c.blocks])
    return Table.concat(cols), data, files


OMIT, SKETCH, EXACT = 0, 1, 2


def _greedy(cost: np.ndarray, order: np.ndarray, budget: int, needs: np.ndarray | None = None) -> np.ndarray:
    """Steps taken when walking `order` and taking each that still fits (and whose prerequisite
    step `needs[i]`, if >= 0, is taken). Vectorised: the longest prefix that fits is taken at once,
    then only steps small enough for what is left are looked at."""
    taken = np.zeros(len(cost), dtype=bool)
    sizes = cost[order]
    fits = int(np.searchsorted(np.cumsum(sizes), budget, side="right"))
    taken[order[:fits]] = True  # a prerequisite always comes first in `order`
    left = budget - int(sizes[:fits].sum())
    rest = np.arange(fits + 1, len(cost))
    while len(rest):
        rest = rest[sizes[rest] <= left]
        if not len(rest):
            break
        i, rest = rest[0], rest[1:]
        step = order[i]
        if needs is not None and needs[step] >= 0 and not taken[needs[step]]:
            continue
        taken[step] = True
        left -= int(sizes[i])
    return taken


def choose(c: Table, budget: int, planner: str, seed: int) -> np.ndarray:
    """Each candidate's source: OMIT, SKETCH or EXACT. Greedily by score per byte (or in a seeded
    random order), each step that still fits. With sketches a candidate has two steps: its sketch
    (the score it recovers, sketch bytes) and then its exact bytes (the score the sketch misses, the
    rest of the bytes); where the second step is denser than the first, one exact step instead."""
    n = len(c.t)
    state = np.full(n, OMIT, dtype=np.int8)
    if c.bytes.sum() <= budget:
        state[:] = EXACT
        return state
    kk, bb = int(c.k.max()) + 1, int(c.b.max()) + 1
    ties = (c.t * bb + c.b) * kk + c.k  # (tensor, block, expert) as one key
    rho = np.divide(c.sketch_share, c.share, out=np.ones(n), where=c.share > 0)  # share the sketch misses
    two = (c.sketch_bytes > 0) & (c.sketch_bytes < c.bytes)
    dens_a = np.divide(c.score * (1 - rho), c.sketch_bytes, out=np.zeros(n), where=two)
    dens_b = np.divide(c.score * rho, c.bytes - c.sketch_bytes, out=np.zeros(n), where=two)
    two &= dens_a >= dens_b
    # steps: one per candidate (its exact bytes, or its sketch), and a second for candidates with two
    second = np.nonzero(two)[0]
    cand = np.concatenate([np.arange(n), second])
    kind = np.concatenate([np.where(two, SKETCH, EXACT), np.full(len(second), EXACT)]).astype(np.int8)
    cost = np.concatenate([np.where(two, c.sketch_bytes, c.bytes), c.bytes[second] - c.sketch_bytes[second]])
    density = np.concatenate([np.where(two, dens_a, c.score / np.maximum(c.bytes, 1)), dens_b[second]])
    needs = np.concatenate([np.full(n, -1), second])  # a second step needs its candidate's first
    if planner == "score":
        order = np.lexsort((kind, ties[cand], -density))  # last key is the primary one
    else:
        perm = np.random.Generator(np.random.PCG64(seed)).permutation(n)
        rank = np.empty(n, np.int64)
        rank[perm] = np.arange(n)
        order = np.lexsort((kind, rank[cand]))  # a random order of candidates, each one's steps in turn
    taken = _greedy(cost, order, budget, needs)
    np.maximum.at(state, cand[taken], kind[taken])
    return state


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


def _selections(c: Table, masks: list[np.ndarray], n_tensors: int, n_experts: int, whole: dict[int, int] | None):
    """Per (tensor, expert): its candidate runs, then its runs under each mask, from the table's own
    (tensor, expert, block) order, not one scan of all candidates per tensor and expert. `whole`:
    tensor id -> block count, for whole-tensor operators, whose candidate [0] stands for every block."""
    group = c.t * n_experts + c.k
    blocks = np.zeros_like(c.b) if whole is not None else c.b
    n = n_tensors * n_experts
    out = []
    for mask in [np.ones(len(group), bool), *masks]:
        runs = _grouped_runs(group[mask], blocks[mask], n)
        if whole is not None:  # [0] stands for the tensor
            runs = [[[0, whole[g // n_experts]]] if r else [] for g, r in enumerate(runs)]
        out.append([runs[t * n_experts:(t + 1) * n_experts] for t in range(n_tensors)])
    return out


@dataclass(frozen=True)
class Outputs:
    """The plan's output tensors: each one's target, shape, and the bytes read whole to copy it (a
    stacked tensor of an expert; 0 otherwise)."""
    targets: list[Target]
    shapes: list[tuple]
    copied: list[int]


def _tensor_plans(op, outs: Outputs, n_experts: int, c: Table, state: np.ndarray,
                  data: dict, resolver: Resolver) -> tuple[dict[str, TensorPlan], float]:
    """Each tensor's plan entry, and the certificate's bound. Blocks have disjoint supports, so the
    parts of different blocks the plan does not read exactly are orthogonal: the squared deviation is
    the sum over blocks of ||sum_k c_k E_kb||^2, with E_kb = Delta_kb where omitted and
    Delta_kb - S_kb where sketch-filled, and inside one block the triangle inequality bounds that by
    (sum_k |c_k| ||E_kb||)^2."""
    targets, shapes = outs.targets, outs.shapes
    names = [t.name for t in targets]
    share = np.select([state == OMIT, state == SKETCH], [c.share, c.sketch_share], 0.0)
    nb_max = int(c.b.max()) + 1 if len(c.b) else 1
    per_block = np.bincount(c.t * nb_max + c.b, weights=share, minlength=len(names) * nb_max)
    tensor_sq = (per_block.reshape(len(names), nb_max) ** 2).sum(axis=1) if names else np.zeros(0)
    spent = np.select([state == EXACT, state == SKETCH], [c.bytes, c.sketch_bytes], 0)
    planned = np.bincount(c.t, weights=spent, minlength=len(names)) + np.asarray(outs.copied, dtype=np.float64)
    whole = {ti: B.n_blocks(s) for ti, s in enumerate(shapes)} if op.unit == "tensor" else None
    cand, sel, sketched = _selections(c, [state == EXACT, state == SKETCH], len(names), n_experts, whole)
    tensors = {}
    for ti, name in enumerate(names):
        bound = float(np.sqrt(tensor_sq[ti])) if op.additive else None
        tp = resolver.tensor(name, targets[ti])
        tensors[name] = TensorPlan(B.n_blocks(shapes[ti]), B.rows_per_block(shapes[ti]), sel[ti], cand[ti],
                                   int(planned[ti]), bound if bound is None or np.isfinite(bound) else None,
                                   tp.shared, list(tp.experts), data.get(name),
                                   sketched[ti] if any(sketched[ti]) else None)
    return tensors, float(np.sqrt(tensor_sq.sum()))


@dataclass
class Selection:
    tensors: dict[str, TensorPlan]
    total: int  # expert bytes the operator may read
    budget: int
    planned: int
    certificate: object  # operators.Certificate


def select(op, resolver: Resolver, base: Model, experts: list[Model], fam: FamilyIndex, budget: str,
           opts: PlanOptions, targets: list[Target] | None = None) -> Selection:
    """The plan proper, from the catalog's statistics alone (no file is opened). `targets`: the
    output tensors (default: every floating tensor of the base, under its own name)."""
    models = [base, *experts]
    floating = {n: info for n, info in base.tensors.items() if info.is_float}
    if targets is None:
        everyone = tuple(range(len(models)))
        targets = [Target(n, n, 0, 0.0, everyone) for n in floating]
    else:
        targets = [t for t in targets if models[t.models[0]].tensors[t.source].is_float]
    readable = op.readable(floating, resolver.shared, opts.source)
    own = {k for k, e in enumerate(experts) if same_model(e, base)}
    merged = [t for t in targets if len(t.models) > 1 and t.source in readable]
    total = sum(e.tensors[t.source].end - e.tensors[t.source].start for t in merged
                for k, e in enumerate(experts) if k not in own)
    # a stacked tensor of an expert is read whole, whatever the budget
    copied = [_size(models[t.models[0]], t.source) if len(t.models) == 1 and t.models[0] - 1 not in own | {-1} else 0
              for t in targets]
    total += sum(copied)
    budget_bytes = parse_budget(budget, total)
    if budget_bytes < sum(copied):
        raise MergepipeError(f"{opts.source}: its slices stack layers of a model other than the base, and a "
                             f"stacked tensor is copied whole: this plan needs its full {_pct(sum(copied), total)} "
                             f"of the expert bytes (use --budget 100%)")
    if not op.budgeted and budget_bytes < total:
        raise MergepipeError(f"{opts.source}: {op.name} cannot be budgeted (it needs every input tensor whole); "
                             f"plan it with --budget 100%")
    table, data, files = _candidates(op, targets, readable, experts, fam, resolver, opts.allow_nonfinite, own)
    state = choose(table, budget_bytes - sum(copied), opts.planner, opts.seed)
    if budget_bytes < total:  # the budget caps the pages the OS reads: partly read pages and headers count
        fixed, sidecars = _fixed_reads(models, experts, own, targets, copied, files), _sidecar_headers(fam, files)
        state = _within_pages(lambda limit: choose(table, limit, opts.planner, opts.seed),
                              lambda st: _pages(table, st, fixed, sidecars), state, budget_bytes - sum(copied),
                              budget_bytes)
    whole = np.ones(len(targets), bool)
    np.logical_and.at(whole, table.t, state == EXACT)
    tid = {t.name: i for i, t in enumerate(targets)}
    data = {n: op.settle(d, bool(whole[tid[n]])) for n, d in data.items()}
    shapes = [models[t.models[0]].tensors[t.source].shape for t in targets]
    tensors, bound = _tensor_plans(op, Outputs(targets, shapes, copied), len(experts), table, state, data, resolver)
    return Selection(tensors, total, budget_bytes, sum(tp.planned_bytes for tp in tensors.values()),
                     op.certificate(bound if np.isfinite(bound) else None, data))


def _within_pages(plan, cost, state: np.ndarray, limit: int, budget: int) -> np.ndarray:
    """The plan for the largest byte limit found whose pages fit the budget (none, when the headers
    alone do not). Lowering the limit by the pages over it converges at once where blocks span many
    pages; where they are smaller than a page that undershoots, and bisection between the last limits
    over and within wins the rest back. `state`: the plan at `limit`."""
    over_at = None
    while (over := cost(state) - budget) > 0 and limit > 0:
        over_at, limit = limit, max(limit - over, 0)
        state = plan(limit)
    while over_at is not None and over_at - limit > pages.PAGE:
        mid = (limit + over_at) // 2
        trial = plan(mid)
        if cost(trial) <= budget:
            limit, state = mid, trial
        else:
            over_at = mid
    return state


def _fixed_reads(models: list[Model], experts: list[Model], own: set[int], targets: list[Target], copied: list[int],
                 files: Files) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(file, start, end) of what execute reads of the experts whatever the plan chooses: every file's
    header (it checks them all) and the stacked tensors it copies whole."""
    spans = [(files.id(fh.path), 0, fh.data_start) for k, e in enumerate(experts) if k not in own for fh in e.files]
    for t, n in zip(targets, copied):
        if n:
            at = models[t.models[0]].tensors[t.source]
            spans.append((files.id(at.file), at.start, at.end))
    return tuple(np.array(c, np.int64) for c in zip(*spans)) if spans else (np.zeros(0, np.int64),) * 3


def _sidecar_headers(fam: FamilyIndex, files: Files) -> dict[int, int]:
    """Sidecar file id -> the end of its header, read when the plan fills any block from it."""
    return {files.id(sk.path): min(t.start for t in sk.tensors.values())
            for sk in fam.sketches or [] if sk is not None and sk.tensors}


def _pages(c: Table, state: np.ndarray, fixed: tuple[np.ndarray, ...], sidecars: dict[int, int]) -> int:
    """The bytes of the pages the OS reads for the plan `state`: exact blocks, sketches, the fixed reads
    and the header of each sidecar in use."""
    exact, sketch = state == EXACT, state == SKETCH
    used = np.unique(c.sketch_file[sketch])
    f = np.concatenate([c.file[exact], c.sketch_file[sketch], fixed[0], used])
    s = np.concatenate([c.offset[exact], c.sketch_offset[sketch], fixed[1], np.zeros(len(used), np.int64)])
    e = np.concatenate([(c.offset + c.bytes)[exact], (c.sketch_offset + c.sketch_bytes)[sketch], fixed[2],
                        np.array([sidecars[int(i)] for i in used], np.int64)])
    return pages.touched(f, s, e)


def _size(model: Model, name: str) -> int:
    info = model.tensors[name]
    return info.end - info.start


def _pct(part: int, total: int) -> str:
    return f"{100 * part / max(total, 1):.0f}%"


def plan_merge(config: MergeConfig, budget: str = "100%", catalog: Catalog | None = None,
               options: PlanOptions | None = None, **flags) -> Manifest:
    """Plan `config` under `budget`. Options come as a PlanOptions or as its fields by keyword."""
    opts = dataclasses.replace(options or PlanOptions(**flags), source=config.source)
    if opts.planner not in PLANNERS:
        raise MergepipeError(f"planner {opts.planner!r} is not known (expected one of {', '.join(PLANNERS)})")
    if opts.fill not in FILLS:
        raise MergepipeError(f"fill {opts.fill!r} is not known (expected one of {', '.join(FILLS)})")
    base = open_model(config.base, opts.allow_pickle)
    experts = [open_model(e, opts.allow_pickle) for e in config.experts]
    op = config.operator
    # the index sketches each expert as it reads it, also for a plan at 100%: a later budgeted plan
    # of the family then needs no second read
    sketch = SketchSpec.make(opts.sketch) if opts.fill == "sketch" and op.unit == "block" else None
    targets, layout, config_updates = plan_outputs(config, [base, *experts])
    fam = index_family(base, experts, catalog or Catalog(), opts.progress, sketch, op.index_stats)
    resolver = Resolver(op, config.params, config.expert_params, config.slices, config.source)
    sel = select(op, resolver, base, experts, fam, budget, opts, targets)
    rel = Path(opts.relative_to).resolve() if opts.relative_to else None
    inputs = [_input(e, fam, rel) for e in experts]
    for k, rec in enumerate(inputs):
        rec.sketch = _sketch_file(fam.sketches[k] if fam.sketches else None, sel.tensors, k, rel)
    return Manifest(
        schema=SCHEMA,
        tool={"name": "mergepipe", "version": __version__, "python": platform.python_version(),
              "torch": torch.__version__},
        base=_input(base, fam, rel),
        experts=inputs,
        out_dtype=config.out_dtype,
        operator=_operator_spec(op, config, sel),
        budget=Budget(str(budget), sel.budget, sel.total),
        plan=Plan(opts.planner, opts.seed, sel.planned, sel.tensors, sel.certificate, opts.allow_nonfinite,
                  "sketch" if any(rec.sketch for rec in inputs) else "zero", layout),
        stages=[Stage(kind, dataclasses.asdict(stages.get(kind).plan(section, base, experts, rel)))
                for kind, section in config.stages],
        recipe=recipe_record(config, [base, *experts], config_updates),
    )


def _operator_spec(op, config: MergeConfig, sel: Selection) -> OperatorSpec:
    """The merge's parameters: the recipe's own where they are the same for every tensor; where
    gradients, filters or slices make them vary, those of the first tensor (each tensor's plan entry
    holds its own)."""
    if config.slices is None:
        return OperatorSpec(op.name, dict(config.params), [dict(p) for p in config.expert_params])
    first = next(iter(sel.tensors.values()), None)
    if first is None:
        raise MergepipeError(f"{config.source}: the recipe's output has no floating tensor to merge")
    return OperatorSpec(op.name, dict(first.params), [dict(p) for p in first.expert_params])
