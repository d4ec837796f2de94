"""GPU run of the core bench: `python -m bench.gpu --out DIR` on a machine with CUDA.

Builds the Qwen2.5-0.5B-shaped family, then merges it with --device cuda (and once on the CPU of the
same machine, for comparison) at several budgets, in-process, and writes gpu.md and gpu.json; then
times TA + FeatCal on the same family and GCWM's full Adam run (gcwm-cuda.md).
Wall times are the median of --runs executions on a warm page cache.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import yaml

from mergepipe.compare import compare
from mergepipe.config import load_config
from mergepipe.demo import demo_config
from mergepipe.execute import execute
from mergepipe.index import Catalog
from mergepipe.plan import plan_merge
from mergepipe.synth import QWEN25_05B, build_family


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", type=Path, default=Path("/tmp/mergepipe-gpu"))
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    fam = build_family(args.work / "family", QWEN25_05B, experts=4, seed=0, shards=3)
    build_s = time.perf_counter() - t0
    cat = Catalog(args.work / "catalog.sqlite")
    rows = []
    jobs = [("task_arithmetic", {}, b) for b in ("100%", "50%", "20%", "10%")]
    jobs += [("ties", {"density": 0.2}, b) for b in ("100%", "50%", "20%")]
    index_s = None
    for method, params, budget in jobs:
        cfg = demo_config(fam, method)
        for m in cfg["models"]:
            m["parameters"].update(params)
        cfg_path = args.work / f"{method}.yml"
        cfg_path.write_text(yaml.safe_dump(cfg))
        t = time.perf_counter()
        plan = plan_merge(load_config(cfg_path), budget, cat)
        if index_s is None:
            index_s = time.perf_counter() - t
        walls, done = [], None
        for _ in range(args.runs):
            done = execute(plan, args.work / "out" / f"{method}-{budget[:-1]}-cuda", device="cuda", force=True)
            walls.append(done.execution.wall_s)
        row = {"method": method, "budget": budget, "device": done.execution.device,
               "wall_median_s": statistics.median(walls), "walls": walls,
               "expert_bytes_read": done.execution.expert_bytes_read,
               "peak_device_bytes": done.execution.peak_device_bytes, "bound": plan.plan.certificate.bound}
        if budget == "100%":
            cpu = execute(plan, args.work / "out" / f"{method}-cpu", device="cpu", force=True)
            c = compare(args.work / "out" / f"{method}-{budget[:-1]}-cuda", args.work / "out" / f"{method}-cpu")
            row.update(cpu_wall_s=cpu.execution.wall_s, vs_cpu_differing=c.differing, vs_cpu_max_ulp=c.max_ulp,
                       elements=c.elements)
        else:
            full = args.work / "out" / f"{method}-100-cuda"
            c = compare(args.work / "out" / f"{method}-{budget[:-1]}-cuda", full, fam["base"])
            row.update(deviation=c.frobenius, relative_deviation=c.relative)
        rows.append(row)
        print(json.dumps(row), flush=True)
    info = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, "family_build_s": build_s,
            "index_s": index_s, "rows": rows}
    (args.out / "gpu.json").write_text(json.dumps(info, indent=2))
    lines = [f"# mergepipe on {info['gpu']} (torch {info['torch']})", "",
             f"Family: Qwen2.5-0.5B shape, base + 4 bf16 experts, 3 shards (built in {build_s:.0f} s; "
             f"index {index_s:.1f} s on the host CPU). Wall: median of {args.runs} in-process executions, warm page cache.", "",
             "| op | budget | wall (cuda) | wall (cpu, same host) | expert bytes read | peak GPU memory | vs CPU output | deviation / bound |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        vs = f"{r['vs_cpu_differing']} elems differ, max {r['vs_cpu_max_ulp']} ulp" if "vs_cpu_differing" in r else "—"
        dev = (f"{r['deviation']:.4g} / {r['bound']:.4g}" if r.get("bound") is not None else f"{r['deviation']:.4g} / n/a") if "deviation" in r else "—"
        cpu = f"{r['cpu_wall_s']:.2f} s" if "cpu_wall_s" in r else "—"
        lines.append(f"| {r['method']} | {r['budget']} | {r['wall_median_s']:.2f} s | {cpu} | {r['expert_bytes_read'] / 2**30:.2f} GiB | "
                     f"{r['peak_device_bytes'] / 2**20:.0f} MiB | {vs} | {dev} |")
    # FeatCal after TA on the same family, random token ids (the spec's worked example: n 256, S 512 per
    # expert; here 64 x 256 to fit the device minutes), then GCWM's full Adam run (bench.gcwm).
    from bench import featcal, gcwm
    fc = featcal.timing(fam, args.work / "featcal", "cuda", samples=64, seq_len=256)
    info["featcal"] = fc
    lines += ["", f"TA + FeatCal on cuda, 4 experts x {fc['samples']} random sequences of {fc['seq_len']} tokens, "
              f"{fc['layers']} layers: {fc['wall_s']:.1f} s, peak GPU memory {fc['peak_device_bytes'] / 2**20:.0f} MiB, "
              f"peak RSS {fc['peak_rss_bytes'] / 2**30:.2f} GiB."]
    (args.out / "gpu.json").write_text(json.dumps(info, indent=2))
    (args.out / "gpu.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines), flush=True)
    gcwm.main(["--device", "cuda", "--full-adam", "--skip-exact", "--cache", str(args.work / "gcwm"), "--out", str(args.out)])


if __name__ == "__main__":
    main()
