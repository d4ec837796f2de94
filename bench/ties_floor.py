"""How far any TIES can agree with mergekit's on bfloat16 data without replaying torch's sort.

    python -m bench.ties_floor [--family bench/cache/qwen05b/family] [--density 0.2]

mergekit keeps the k = int(density * n) largest |delta| of each (expert, tensor) through
torch.argsort, which is unstable: among the G entries equal to the k-th largest value it keeps some
m of them, and which ones depends on the whole sort. The script checks on one tensor that the kept ties spread evenly over
positions (its `argsort_keep_rate_by_decile`), as a uniformly random subset would. A merge that does not replay that sort keeps some fixed subset of
size j of the tie group; against a uniformly random m-subset its expected number of mask
disagreements is j + m - 2jm/G, smallest at j = 0 or j = G: min(m, G - m). That is mergepipe's rule
(keep or drop the group whole), so this script's figure is both mergepipe's expected disagreement
and the floor for any order-oblivious rule. It reports, per the whole model:

- the expected fraction of (expert, element) mask decisions that differ, summed over experts;
- the expected fraction of output elements where at least one expert's decision differs (experts
  independent), which is what the agreement check counts when a flipped decision changes the value.

Writes bench/results/ties_floor.json.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from safetensors import safe_open

from mergepipe.checkpoint import open_model


def tie_stats(d: torch.Tensor, density: float) -> tuple[int, int, int]:
    """(k, G, m): entries kept, entries equal to the k-th largest |d|, and how many of those are kept."""
    n = d.numel()
    k = max(1, int(density * n))
    t = torch.kthvalue(d, n - k + 1).values
    above = int((d > t).sum())
    ties = int((d == t).sum())
    return k, ties, k - above


def keep_rate_by_decile(d: torch.Tensor, density: float) -> list[float]:
    """mergekit's own selection (argsort, descending, first k): the fraction of tied entries it keeps
    in each tenth of the tensor."""
    k = max(1, int(density * d.numel()))
    kept = torch.zeros(d.numel(), dtype=torch.bool)
    kept[torch.argsort(d, descending=True)[:k]] = True
    t = torch.kthvalue(d, d.numel() - k + 1).values
    pos = (d == t).nonzero().squeeze(1)
    tenth = pos * 10 // d.numel()
    return [round(float(kept[pos[tenth == i]].float().mean()), 3) for i in range(10)]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--family", type=Path, default=Path("bench/cache/qwen05b/family"))
    ap.add_argument("--density", type=float, default=0.2)
    ap.add_argument("--out", type=Path, default=Path("bench/results/ties_floor.json"))
    args = ap.parse_args(argv)
    base = open_model(args.family / "base")
    experts = [open_model(p) for p in sorted(args.family.glob("expert*"))]
    torch.set_num_threads(1)
    elements = decisions_differ = outputs_differ = 0.0
    tensors = 0
    deciles = None
    for name, info in base.tensors.items():
        if not info.is_float:
            continue
        with safe_open(str(info.file), "pt") as f:
            b = f.get_tensor(name).float().reshape(-1)
        p_same = torch.ones_like(b)  # P(no expert's decision differs), per element
        for e in experts:
            ei = e.tensors[name]
            with safe_open(str(ei.file), "pt") as f:
                d = (f.get_tensor(name).float().reshape(-1) - b).abs_()
            k, G, m = tie_stats(d, args.density)
            if deciles is None and d.numel() >= 1 << 22:
                deciles = {"tensor": name, "expert": str(ei.file.parent.name), "ties": G, "kept": m,
                           "rates": keep_rate_by_decile(d, args.density)}
            flip = min(m, G - m) / G if G else 0.0  # per tie position, under the best fixed rule
            decisions_differ += G * flip
            if flip:
                t = torch.kthvalue(d, d.numel() - k + 1).values
                p_same.mul_(torch.where(d == t, 1.0 - flip, 1.0))
            del d
        outputs_differ += float((1.0 - p_same).sum(dtype=torch.float64))
        elements += b.numel()
        tensors += 1
    res = {"family": str(args.family), "density": args.density, "experts": len(experts), "tensors": tensors,
           "elements": int(elements),
           "expected_decisions_differing_fraction": decisions_differ / elements,
           "expected_output_elements_differing_fraction": outputs_differ / elements,
           "argsort_keep_rate_by_decile": deciles}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=2) + "\n")
    print(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
