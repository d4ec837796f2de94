"""Sketch costs on the 0.5B bench family (the family bench.core and bench.root_hashes build):
index time with and without sketches, sketch size, and task arithmetic at 20% with sketch fill
against TA at 100%, each through the command line, in the same run.

    python -m bench.sketch --cache DIR [--runs 3] [--kinds q2,sign]

Index: a fresh catalog per run, cold page cache where caches can be dropped (root). Merges: warm
medians of --runs, then one cold run each for the bytes the kernel read. Writes sketch.md and
sketch.json under --out.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
from pathlib import Path

from bench.measure import can_drop_caches, drop_caches, run_measured
from bench.root_hashes import configs_for, family_for

REPO = Path(__file__).resolve().parent.parent


def cli(*args) -> list[str]:
    return [sys.executable, "-m", "mergepipe", *map(str, args)]


def index_runs(fam: dict, work: Path, sketch: str, runs: int) -> list[float]:
    walls = []
    for i in range(runs):
        cat = work / f"index-{sketch}-{i}.sqlite"
        shutil.rmtree(work / "sketches", ignore_errors=True)
        cat.unlink(missing_ok=True)
        if can_drop_caches():
            drop_caches()
        experts = [fam[k] for k in sorted(fam) if k != "base"]
        r = run_measured(cli("index", *experts, "--base", fam["base"], "--catalog", cat, "--sketch", sketch), cwd=REPO)
        assert r.returncode == 0, r.stderr_tail
        walls.append(r.wall_s)
    return walls


def merge_runs(config: Path, work: Path, budget: str, fill: str, sketch: str, runs: int) -> dict:
    manifest = work / f"ta-{budget.rstrip('%')}-{fill}-{sketch}.json"
    p = run_measured(cli("plan", config, "-b", budget, "--fill", fill, "--sketch", sketch, "-o", manifest,
                         "--catalog", work / f"plan-{sketch}.sqlite"), cwd=REPO)
    assert p.returncode == 0, p.stderr_tail
    out = work / "out"
    warm = []
    for _ in range(runs):
        r = run_measured(cli("execute", manifest, "-o", out, "--force", "--json"), cwd=REPO)
        assert r.returncode == 0, r.stderr_tail
        warm.append(r.wall_s)
    cold = None
    if can_drop_caches():
        drop_caches()
        cold = run_measured(cli("execute", manifest, "-o", out, "--force", "--json"), cwd=REPO)
    ex = json.loads((out / "mergepipe.manifest.json").read_text())
    return {"budget": budget, "fill": fill, "warm_s": statistics.median(warm), "warm_runs": warm,
            "cold_s": cold.wall_s if cold else None, "os_read_bytes_cold": cold.read_bytes if cold else None,
            "expert_bytes_read": ex["execution"]["expert_bytes_read"], "base_bytes_read": ex["execution"]["base_bytes_read"],
            "expert_bytes_total": ex["budget"]["expert_bytes_total"], "budget_bytes": ex["budget"]["bytes"]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cache", type=Path, required=True)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--kinds", default="q2,sign")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    args = ap.parse_args()
    fam = family_for(args.cache)
    work = args.cache / "sketch-bench"
    work.mkdir(parents=True, exist_ok=True)
    config = configs_for(args.cache, fam)["ta"]
    result = {"index": {"none": index_runs(fam, work, "none", args.runs)}, "merges": []}
    for kind in args.kinds.split(","):
        result["index"][kind] = index_runs(fam, work, kind, args.runs)
        sizes = [p.stat().st_size for p in (work / "sketches").glob("*.safetensors")]
        result.setdefault("sketch_bytes", {})[kind] = sum(sizes)
        result["merges"].append(merge_runs(config, work, "100%", "sketch", kind, args.runs))
        result["merges"].append(merge_runs(config, work, "20%", "sketch", kind, args.runs))
    result["merges"].append(merge_runs(config, work, "20%", "zero", "q2", args.runs))
    expert_bytes = result["merges"][0]["expert_bytes_total"]
    lines = ["# Sketch costs on the 0.5B bench family", "",
             f"`python -m bench.sketch --runs {args.runs}`; cold runs drop the page cache: {can_drop_caches()}.", "",
             "| index | median wall (s) | vs no sketch | sketch size (of expert bytes) |", "|---|---|---|---|"]
    none = statistics.median(result["index"]["none"])
    for kind, walls in result["index"].items():
        size = result.get("sketch_bytes", {}).get(kind)
        lines.append(f"| {kind} | {statistics.median(walls):.2f} | {statistics.median(walls) / none:.2f}x | "
                     + (f"{size / 2**20:.1f} MiB ({size / expert_bytes:.1%})" if size else "—") + " |")
    lines += ["", "| merge | fill | warm median (s) | cold (s) | expert bytes read (counted) | OS read, cold | budget |",
              "|---|---|---|---|---|---|---|"]
    for m in result["merges"]:
        os_read = f"{m['os_read_bytes_cold'] / 2**20:.1f} MiB" if m["os_read_bytes_cold"] is not None else "—"
        lines.append(f"| TA {m['budget']} | {m['fill']} | {m['warm_s']:.2f} | {m['cold_s'] or '—'} | "
                     f"{m['expert_bytes_read'] / 2**20:.1f} MiB ({m['expert_bytes_read'] / m['expert_bytes_total']:.1%}) | "
                     f"{os_read} | {m['budget_bytes'] / 2**20:.1f} MiB |")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "sketch.json").write_text(json.dumps(result, indent=2))
    (args.out / "sketch.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
