"""The best deviation any planner could reach on the quality family: a lower bound, to judge planners by.

    python -m bench.quality.oracle [--budgets 50,20,10] [--weight 0.3]

Task arithmetic's deviation from the full merge is sqrt(sum over blocks b of ||sum over unread experts
k of c_k Delta_kb||^2): blocks have disjoint supports. Choosing, per block, which experts to read under
a byte budget is a multiple-choice knapsack; its LP relaxation (per block the lower convex hull of
(bytes, residual) over the 2^K subsets, filled greedily by slope) bounds the optimum from below. No
planner, however clever, deviates less than this bound at that budget. Prints it next to the score
and random planners' measured deviations from bench/results/quality.json.
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from mergepipe import blocks as B

REPO = Path(__file__).resolve().parents[2]


def _load(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def block_options(family: Path, weight: float) -> tuple[list[list[tuple[int, float]]], int, float]:
    """Per block: (bytes read, squared residual) for every subset of experts read; total expert bytes;
    squared norm of the full merge's delta."""
    base = _load(family / "base")
    experts = [_load(p) for p in sorted(family.glob("expert_*"))]
    options, total, full = [], 0, 0.0
    for name, b in base.items():
        if not b.is_floating_point():
            continue
        rows = B.rows_per_block(tuple(b.shape))
        flat = [(weight * (e[name].double() - b.double())).reshape(b.shape[0] if b.dim() > 1 else 1, -1) for e in experts]
        full += float(sum(flat).norm() ** 2)
        for r0 in range(0, flat[0].shape[0], rows):
            d = [x[r0:r0 + rows] for x in flat]
            nbytes = d[0].numel() * b.element_size()
            total += nbytes * len(d)
            opts = []
            for read in itertools.product((0, 1), repeat=len(d)):
                unread = [x for x, r in zip(d, read) if not r]
                opts.append((nbytes * sum(read), float(sum(unread).norm() ** 2) if unread else 0.0))
            options.append(opts)
    return options, total, full


def lower_bound(options: list[list[tuple[int, float]]], budget: float) -> float:
    """LP-relaxation bound on the smallest total squared residual within `budget` bytes."""
    residual, moves = 0.0, []
    for opts in options:
        hull: list[tuple[int, float]] = []
        for p in sorted(set(opts)):
            if hull and p[1] >= hull[-1][1]:
                continue  # costs more, leaves no less
            while len(hull) >= 2 and ((hull[-1][1] - hull[-2][1]) * (p[0] - hull[-2][0])
                                      >= (p[1] - hull[-2][1]) * (hull[-1][0] - hull[-2][0])):
                hull.pop()  # not on the lower convex hull
            hull.append(p)
        residual += hull[0][1]
        moves += [((a[1] - b[1]) / (b[0] - a[0]), b[0] - a[0], a[1] - b[1]) for a, b in zip(hull, hull[1:])]
    left = budget
    for _, cost, gain in sorted(moves, key=lambda m: -m[0]):
        if left <= 0:
            break
        take = min(1.0, left / cost)
        residual -= gain * take
        left -= cost * take
    return max(residual, 0.0)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--family", type=Path, default=REPO / "bench" / "cache" / "quality")
    ap.add_argument("--budgets", default="50,20,10")
    ap.add_argument("--weight", type=float, default=0.3)
    ap.add_argument("--results", type=Path, default=REPO / "bench" / "results" / "quality.json")
    args = ap.parse_args(argv)
    options, total, full = block_options(args.family, args.weight)
    measured = {}
    if args.results.exists():
        for r in json.loads(args.results.read_text())["rows"]:
            if r["op"] == "ta" and r["budget"] is not None:
                measured[(r["budget"], r["planner"])] = r["relative_deviation"]
    print("| budget | lower bound, any planner | score planner | random planner |")
    print("|---|---|---|---|")
    for pct in (int(b) for b in args.budgets.split(",")):
        lb = (lower_bound(options, total * pct / 100) / full) ** 0.5
        cells = [f"{measured[(pct, p)]:.3f}" if (pct, p) in measured else "—" for p in ("score", "random")]
        print(f"| {pct}% | {lb:.3f} | {cells[0]} | {cells[1]} |")


if __name__ == "__main__":
    main()
