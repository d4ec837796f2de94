"""Probe: which coverage rule keeps a 5% merge of the trained family better than the base?

    python -m bench.quality.low_budget ta:5:score ties:5:aligned-block ta:5:no-1d:sign ...

Each argument is OP:BUDGET:RULE[:KIND]. Below the size of the sketch of every expert (q2 is 15.6% of
the expert bytes), a plan can fill only part of the model, and on the trained family every such
plan came out worse than the base. This probe plans with a replaced `plan.choose` (the library's
own planner otherwise), executes through the command line and scores the merge on the held-out sets:

- score: the planner as shipped;
- aligned-block / aligned-tensor / aligned-layer: a (block | tensor | layer) is filled for every
  expert or for none, greedily by the summed recovered score per sketch byte, then exact upgrades;
- no-1d: the planner, then the 1-D tensors (norms, biases; never sketched, read exactly) left out;
- only-1d: the 1-D tensors read exactly and nothing else.

A probe, not a planner: it writes nothing but its merges under --work and one line per merge.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import yaml

import mergepipe.plan as P
from mergepipe.checkpoint import open_model
from mergepipe.config import load_config
from mergepipe.index import Catalog

from .table import cached, family, mean, recipe

REPO = Path(__file__).resolve().parents[2]
SHIPPED = P.choose


def rule(name: str, names: list[str]):
    """A replacement for plan.choose(c, budget, planner, seed) implementing one coverage rule."""
    def no_1d(c, budget, planner, seed):
        state = SHIPPED(c, budget, planner, seed)
        state[c.sketch_bytes == 0] = P.OMIT
        return state

    def only_1d(c, budget, planner, seed):
        state = np.full(len(c.t), P.OMIT, np.int8)
        state[c.sketch_bytes == 0] = P.EXACT
        return state

    def aligned(c, budget, planner, seed):
        n = len(c.t)
        state = np.full(n, P.OMIT, np.int8)
        if c.bytes.sum() <= budget:
            state[:] = P.EXACT
            return state
        rho = np.divide(c.sketch_share, c.share, out=np.ones(n), where=c.share > 0)
        sk = c.sketch_bytes > 0
        unit = name.removeprefix("aligned-")
        if unit == "block":
            key = c.t * (int(c.b.max()) + 1) + c.b
        elif unit == "tensor":
            key = c.t.copy()
        else:
            layer = np.array([int(m.group(1)) if (m := re.search(r"layers\.(\d+)\.", x)) else -1 for x in names])
            key = np.where(layer[c.t] >= 0, layer[c.t], 1000 + c.t)
        key = np.where(sk, key, -1 - np.arange(n))  # a candidate without a sketch is its own group, read exactly
        groups, inv = np.unique(key, return_inverse=True)
        gain = np.bincount(inv, weights=np.where(sk, c.score * (1 - rho), c.score))
        cost = np.bincount(inv, weights=np.where(sk, c.sketch_bytes, c.bytes))
        taken, left = np.zeros(len(groups), bool), budget
        for g in np.argsort(-gain / np.maximum(cost, 1), kind="stable"):
            if cost[g] <= left:
                taken[g], left = True, left - cost[g]
        t = taken[inv]
        state[t & sk], state[t & ~sk] = P.SKETCH, P.EXACT
        up = np.nonzero(state == P.SKETCH)[0]  # what is left buys exact blocks where the sketch misses most
        for i in up[np.argsort(-(c.score[up] * rho[up]) / np.maximum(c.bytes[up] - c.sketch_bytes[up], 1), kind="stable")]:
            if c.bytes[i] - c.sketch_bytes[i] <= left:
                state[i], left = P.EXACT, left - (c.bytes[i] - c.sketch_bytes[i])
        return state

    rules = {"score": SHIPPED, "no-1d": no_1d, "only-1d": only_1d, "aligned-block": aligned,
             "aligned-tensor": aligned, "aligned-layer": aligned}
    if name not in rules:
        raise SystemExit(f"rule {name!r}: expected one of {', '.join(rules)}")
    return rules[name]


def probe(spec: str, paths: dict, tasks: list[str], evaluate, work: Path) -> dict:
    op, budget, name, *kind = spec.split(":")
    kind = kind[0] if kind else "q2"
    cfg_path = work / f"{op}.yml"
    cfg_path.write_text(yaml.safe_dump(recipe(paths, op), sort_keys=False))
    config = load_config(cfg_path)
    floating = [n for n, i in open_model(config.base).tensors.items() if i.is_float]  # the plan's targets, in order
    P.choose = rule(name, floating)
    try:
        m = P.plan_merge(config, f"{budget}%", Catalog(work / "catalog.sqlite"), fill="sketch", sketch=kind)
    finally:
        P.choose = SHIPPED
    tag = f"{op}-{budget}-{name}-{kind}"
    manifest, out = work / f"{tag}.json", work / "merged" / tag
    m.save(manifest)
    r = subprocess.run([sys.executable, "-m", "mergepipe", "execute", str(manifest), "-o", str(out), "--force", "--json"],
                       capture_output=True, text=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    if r.returncode:
        raise SystemExit(r.stderr.strip())
    scores = evaluate(out, tasks)
    return {"probe": tag, "mean_nll": mean(scores, "nll"), "expert_bytes_read": json.loads(r.stdout)["expert_bytes_read"],
            "nll": {t: s["nll"] for t, s in scores.items()}}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("probes", nargs="+", help="OP:BUDGET:RULE[:KIND]")
    ap.add_argument("--work", type=Path, default=REPO / "bench" / "cache" / "low-budget")
    a = ap.parse_args(argv)
    a.work.mkdir(parents=True, exist_ok=True)
    paths, tasks, evaluate, _ = family("full", REPO / "bench" / "cache" / "quality")
    evaluate = cached(evaluate, REPO / "bench" / "cache" / "quality-run")
    base = mean(evaluate(paths["base"], tasks), "nll")
    print(f"base: mean NLL {base:.3f}")
    for spec in a.probes:
        row = probe(spec, paths, tasks, evaluate, a.work)
        print(json.dumps({**row, "better_than_base": row["mean_nll"] < base}), flush=True)


if __name__ == "__main__":
    main()
