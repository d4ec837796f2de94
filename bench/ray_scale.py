"""The Ray executor against the local one, at 1, 2 and 4 workers, on one machine.

    python -m bench.ray_scale [--shape qwen05b|tiny] [--workers 1,2,4] [--runs 3] [--method ta|ties]
                              [--budget 100%] [--cache DIR] [--out bench/results]

Builds (or reuses) the bench family (bench.root_hashes' for qwen05b: base + 4 bf16 experts, 3 shards;
a tiny one for a smoke run), plans one merge and then, per worker count N:

- local: `mergepipe execute` in a subprocess pinned to N cores (taskset; N is capped at the cores
  this machine has), so the local executor uses N compute threads;
- ray: a loopback Ray cluster of N worker nodes with one CPU each (and a head that runs nothing),
  the same manifest executed through the library with --executor ray from one long-lived driver, after
  one warm-up run that starts the workers' processes (their imports are not part of a merge).

Every run's root hash must equal the local one's. Reported per N: median wall time of --runs runs
(warm page cache), input bytes read, the overhead of ray against local at the same N, and the
per-worker throughput (input bytes per second of task time, from the manifest's job records). Writes
ray_scale.md and ray_scale.json under --out.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml

REPO = Path(__file__).resolve().parent.parent


def family(shape: str, cache: Path) -> dict[str, Path]:
    from mergepipe.synth import TINY, build_family
    if shape == "qwen05b":
        from bench.root_hashes import family_for
        return family_for(cache)
    return build_family(cache / "tiny" / "family", TINY, experts=4, seed=0, dtype=torch.bfloat16, shards=3)


def plan(fam: dict[str, Path], work: Path, method: str, budget: str) -> Path:
    from bench.core import mergekit_yaml
    from bench.root_hashes import DENSITY, EXPERTS, WEIGHT
    from mergepipe.config import load_config
    from mergepipe.index import Catalog
    from mergepipe.plan import plan_merge
    cfg = work / f"{method}.yml"
    experts = [fam[f"expert{k}"] for k in range(1, EXPERTS + 1)]
    cfg.write_text(yaml.safe_dump(mergekit_yaml(fam["base"], experts, method, WEIGHT, DENSITY), sort_keys=False))
    m = plan_merge(load_config(cfg), budget, Catalog(work / "catalog.sqlite"), fill="zero")
    path = work / f"{method}-{budget.rstrip('%')}.json"
    m.save(path)
    return path


def run_local(manifest: Path, out: Path, cores: int) -> dict:
    cpus = ",".join(str(c) for c in sorted(os.sched_getaffinity(0))[:cores])
    cmd = ["taskset", "-c", cpus, sys.executable, "-m", "mergepipe", "execute", str(manifest), "-o", str(out),
           "--force", "--json"]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)}, check=True)
    wall = time.perf_counter() - t0
    ex = json.loads(r.stdout)
    shutil.rmtree(out, ignore_errors=True)
    return {"wall_s": wall, "execute_s": ex["wall_s"], "root_hash": ex["root_hash"],
            "bytes_read": ex["expert_bytes_read"] + ex["base_bytes_read"]}


def run_ray(manifest: Path, out: Path, workers: int, runs: int) -> list[dict]:
    import ray
    from ray.cluster_utils import Cluster
    from mergepipe.execute import execute
    from mergepipe.manifest import load_manifest
    from mergepipe.options import RunOptions
    os.environ["PYTHONPATH"] = str(REPO)
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    for _ in range(workers):
        c.add_node(num_cpus=1)
    ray.init(address=c.address, log_to_driver=False, logging_level="ERROR")
    c.wait_for_nodes()
    m = load_manifest(manifest)
    opts = RunOptions(executor="ray", force=True)
    results = []
    try:
        for i in range(runs + 1):
            t0 = time.perf_counter()
            done = execute(m, out, opts).execution
            wall = time.perf_counter() - t0
            shutil.rmtree(out, ignore_errors=True)
            if i == 0:
                continue  # warm-up: the workers' processes start and import
            task_s = sum(j.wall_s for j in done.jobs)
            results.append({"wall_s": wall, "execute_s": done.wall_s, "root_hash": done.root_hash,
                            "bytes_read": done.expert_bytes_read + done.base_bytes_read, "parts": len(done.jobs),
                            "nodes": len({j.node for j in done.jobs}), "task_s": task_s,
                            "per_worker_Bps": sum(j.bytes_read for j in done.jobs) / task_s if task_s else None})
    finally:
        ray.shutdown()
        c.shutdown()
    return results


def median(rows: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="qwen05b", choices=["qwen05b", "tiny"])
    ap.add_argument("--workers", default="1,2,4")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--method", default="ta", choices=["ta", "ties"])
    ap.add_argument("--budget", default="100%")
    ap.add_argument("--cache", type=Path, default=Path("/work/bench-cache"))
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    a = ap.parse_args()
    work = a.cache / a.shape / "ray-scale"
    work.mkdir(parents=True, exist_ok=True)
    manifest = plan(family(a.shape, a.cache), work, a.method, a.budget)
    cores = len(os.sched_getaffinity(0))
    rows = []
    for n in [int(x) for x in a.workers.split(",")]:
        local = [run_local(manifest, work / "out-local", min(n, cores)) for _ in range(a.runs)]
        remote = run_ray(manifest, work / "out-ray", n, a.runs)
        assert {r["root_hash"] for r in local + remote} == {local[0]["root_hash"]}, "outputs differ"
        row = {"workers": n, "local_cores": min(n, cores), "local_wall_s": median(local, "wall_s"),
               "local_execute_s": median(local, "execute_s"), "ray_wall_s": median(remote, "wall_s"),
               "ray_execute_s": median(remote, "execute_s"), "bytes_read": local[0]["bytes_read"],
               "ray_bytes_read": remote[0]["bytes_read"], "parts": remote[0]["parts"], "nodes_used": remote[0]["nodes"],
               "per_worker_MBps": median(remote, "per_worker_Bps") / 1e6, "runs": {"local": local, "ray": remote}}
        row["overhead"] = row["ray_execute_s"] / row["local_execute_s"] - 1
        rows.append(row)
        print(f"N={n}: local {row['local_execute_s']:.2f} s, ray {row['ray_execute_s']:.2f} s "
              f"({100 * row['overhead']:+.1f}%), {row['parts']} parts on {row['nodes_used']} nodes, "
              f"{row['per_worker_MBps']:.0f} MB/s per worker", flush=True)
    a.out.mkdir(parents=True, exist_ok=True)
    meta = {"shape": a.shape, "method": a.method, "budget": a.budget, "runs": a.runs, "cores": cores,
            "load_before": os.getloadavg()[0], "root_hash": rows[0]["runs"]["local"][0]["root_hash"]}
    (a.out / "ray_scale.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    lines = [f"# Ray executor scaling: {a.shape} family, {a.method} at {a.budget}, median of {a.runs} warm runs, "
             f"{cores} cores", "",
             "| workers | local cores | local s | ray s | ray overhead | input bytes | parts | nodes used | MB/s per worker |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['workers']} | {r['local_cores']} | {r['local_execute_s']:.2f} | {r['ray_execute_s']:.2f} | "
                     f"{100 * r['overhead']:+.1f}% | {r['bytes_read']:,} | {r['parts']} | {r['nodes_used']} | "
                     f"{r['per_worker_MBps']:.0f} |")
    lines += ["", "Times are the manifests' execute wall time (inputs opened to output published); the ray "
              "driver had already joined the cluster and its workers had imported mergepipe (one warm-up run). "
              f"Load average before: {meta['load_before']:.2f}."]
    (a.out / "ray_scale.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
