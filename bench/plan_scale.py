"""Planner time at scale: a synthetic 70B-shaped (Llama-3-70B) catalog with 20 experts, built
directly as catalog rows (statistics only, no tensor data), planned at several budgets.

    python -m bench.plan_scale [--experts 20] [--runs 3]

Prints the median planner seconds per operator and budget, and the candidate count."""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np

from mergepipe import blocks as B
from mergepipe import operators
from mergepipe.checkpoint import Model, TensorInfo
from mergepipe.index import COARSE_BINS, FINE_BINS, FamilyIndex, TensorDelta
from mergepipe.options import PlanOptions
from mergepipe.params import Resolver
from mergepipe.plan import select

HIDDEN, INTER, KV, VOCAB, LAYERS = 8192, 28672, 1024, 128256, 80


def shapes() -> dict[str, tuple[int, ...]]:
    out = {"model.embed_tokens.weight": (VOCAB, HIDDEN)}
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        out.update({p + "self_attn.q_proj.weight": (HIDDEN, HIDDEN), p + "self_attn.k_proj.weight": (KV, HIDDEN),
                    p + "self_attn.v_proj.weight": (KV, HIDDEN), p + "self_attn.o_proj.weight": (HIDDEN, HIDDEN),
                    p + "mlp.gate_proj.weight": (INTER, HIDDEN), p + "mlp.up_proj.weight": (INTER, HIDDEN),
                    p + "mlp.down_proj.weight": (HIDDEN, INTER), p + "input_layernorm.weight": (HIDDEN,),
                    p + "post_attention_layernorm.weight": (HIDDEN,)})
    out.update({"model.norm.weight": (HIDDEN,), "lm_head.weight": (VOCAB, HIDDEN)})
    return out


def catalog(experts: int, seed: int = 0) -> tuple[Model, list[Model], FamilyIndex]:
    """Models whose tensors point nowhere (only their layout matters) and per-expert statistics."""
    rng = np.random.default_rng(seed)
    tensors, offset = {}, 0
    for name, shape in shapes().items():
        n = int(np.prod(shape)) * 2
        tensors[name] = TensorInfo(name, Path("/nonexistent.safetensors"), "BF16", shape, offset, offset + n)
        offset += n
    model = Model("synthetic-70b", Path("/"), (), tensors)
    fine = np.zeros(FINE_BINS, np.int64)  # unused by task arithmetic: one array shared by every row
    deltas = []
    for _ in range(experts):
        rows = {}
        for name, info in tensors.items():
            nb = B.n_blocks(info.shape)
            coarse = np.zeros((nb, COARSE_BINS))
            l2 = rng.gamma(2.0, 1.0, nb)
            rows[name] = TensorDelta(l2, l2.astype(np.float32), coarse.astype(np.int64), coarse, fine)
        deltas.append(rows)
    return model, [model] * experts, FamilyIndex({}, deltas)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--experts", type=int, default=20)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    t0 = time.perf_counter()
    base, experts, fam = catalog(args.experts)
    print(f"catalog: {len(base.tensors)} tensors, {sum(len(d.l2) for d in fam.deltas[0].values())} blocks per "
          f"expert, {args.experts} experts, built in {time.perf_counter() - t0:.1f} s")
    op = operators.get("task_arithmetic")
    resolver = Resolver(op, {"lambda": 1.0, "normalize": False}, [{"weight": 0.3}] * args.experts)
    for budget in ("100%", "20%", "5%"):
        times = []
        for _ in range(args.runs):
            t = time.perf_counter()
            sel = select(op, resolver, base, experts, fam, budget, PlanOptions())
            times.append(time.perf_counter() - t)
        print(f"task_arithmetic {budget:>4}: planner {statistics.median(times):.2f} s (median of {args.runs}), "
              f"planned {sel.planned / sel.total:.1%} of {sel.total / 2**40:.2f} TiB")


if __name__ == "__main__":
    main()
