"""The Ray executor against the local one, at 1, 2 and 4 workers, on one machine.

    python -m bench.ray_scale [--shape qwen05b|tiny] [--workers 1,2,4] [--runs 3] [--method ta|ties]
                              [--budget 100%] [--cache DIR] [--out bench/results]

Builds (or reuses) the bench family (bench.root_hashes' for qwen05b: base + 4 bf16 experts, 3 shards;
a tiny one for a smoke run), plans one merge and then, per worker count N:

- a child process pinned to N cores (taskset; N is capped at the cores this machine has) starts a
  loopback Ray cluster of N nodes with one CPU each (the head is the first of them), which
  inherits the pinning, as does every local run it spawns: without it Ray's processes spread over
  every core and a 1-worker cluster is compared with a 1-core local run on the whole machine;
- local: `mergepipe execute` in a subprocess, so the local executor uses N compute threads, with no
  cluster up yet (an idle cluster's daemons would slow it);
- ray: the same manifest executed through the library with --executor ray from one long-lived
  driver, after one warm-up run that starts the workers' processes (their imports are not part of a
  merge). Every run starts after the inputs are read once (a warm page cache).
With N above the cores here the workers share them, and the row says so.

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
OBJECT_STORE_BYTES = 256 << 20


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


def run_local(manifest: Path, out: Path) -> dict:
    """One local execute in a subprocess (it inherits this process's core pinning)."""
    cmd = [sys.executable, "-m", "mergepipe", "execute", str(manifest), "-o", str(out), "--force", "--json"]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)}, check=True)
    wall = time.perf_counter() - t0
    ex = json.loads(r.stdout)
    shutil.rmtree(out, ignore_errors=True)
    return {"wall_s": wall, "execute_s": ex["wall_s"], "root_hash": ex["root_hash"],
            "bytes_read": ex["expert_bytes_read"] + ex["base_bytes_read"]}


def pinned_pair(manifest: Path, work: Path, workers: int, runs: int, cores: int) -> dict:
    """Local and ray runs at one worker count, from a child process pinned to `cores` cores (the
    cluster it starts and the local runs it spawns inherit the pinning)."""
    cpus = ",".join(str(c) for c in sorted(os.sched_getaffinity(0))[:cores])
    cmd = ["taskset", "-c", cpus, sys.executable, "-m", "bench.ray_scale", "--child", str(manifest), str(work),
           str(workers), str(runs)]
    r = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    if r.returncode:
        raise SystemExit(f"ray_scale child (N={workers}) failed:\n{r.stderr[-4000:]}")
    settle()
    return json.loads(r.stdout.strip().splitlines()[-1])


def settle(timeout_s: float = 60.0) -> None:
    """Wait until the last cluster's processes are gone: a stopping Ray lingers, and would load the next runs."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if subprocess.run(["pgrep", "-f", "raylet|gcs_server|ray::"], capture_output=True).returncode:
            break
        time.sleep(1)
    time.sleep(2)


def warm(manifest: Path) -> None:
    """Read every input file once, so that each run starts from the same warm page cache."""
    from bench.measure import read_once
    doc = json.loads(manifest.read_text())
    read_once(Path(model["ref"]) / f["name"] for model in [doc["base"], *doc["experts"]] for f in model["files"])


def ray_child(manifest: Path, work: Path, workers: int, runs: int) -> dict:
    """The local runs, then a cluster and the ray runs, each run after the inputs are read once (a warm
    page cache). Local runs go first, with no cluster up: an idle Ray cluster's daemons take a
    noticeable share of a small machine's cores, and would slow the local runs it is compared with.
    The ray runs follow one warm-up run that starts the workers' processes (their imports are not part
    of a merge). The object store is kept small: mergepipe moves no tensor through it, and Ray's
    default (30% of memory per node) would evict the inputs from the page cache."""
    out = work / "out"
    local = []
    for _ in range(runs):
        warm(manifest)
        local.append(run_local(manifest, out))
    import ray
    from ray.cluster_utils import Cluster
    from mergepipe.execute import execute
    from mergepipe.manifest import load_manifest
    from mergepipe.options import RunOptions
    os.environ["PYTHONPATH"] = str(REPO)
    store = OBJECT_STORE_BYTES
    # the head is the first worker node, as `ray start --head` on a cluster's first machine makes it
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False,
                                                      "object_store_memory": store})
    for _ in range(workers - 1):
        c.add_node(num_cpus=1, object_store_memory=store)
    ray.init(address=c.address, log_to_driver=False, logging_level="ERROR")
    c.wait_for_nodes()
    m = load_manifest(manifest)
    opts = RunOptions(executor="ray", force=True)
    remote = []
    try:
        for i in range(runs + 1):
            warm(manifest)
            t0 = time.perf_counter()
            done = execute(m, out, opts).execution
            wall = time.perf_counter() - t0
            shutil.rmtree(out, ignore_errors=True)
            if i == 0:
                continue
            task_s = sum(j.wall_s for j in done.jobs)
            remote.append({"wall_s": wall, "execute_s": done.wall_s, "root_hash": done.root_hash,
                           "bytes_read": done.expert_bytes_read + done.base_bytes_read, "parts": len(done.jobs),
                           "nodes": len({j.node for j in done.jobs}), "task_s": task_s,
                           "per_worker_Bps": sum(j.bytes_read for j in done.jobs) / task_s if task_s else None})
    finally:
        ray.shutdown()
        c.shutdown()
    return {"local": local, "ray": remote}


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
    ap.add_argument("--child", nargs=4, help=argparse.SUPPRESS)  # MANIFEST OUT WORKERS RUNS: the pinned ray side
    a = ap.parse_args()
    if a.child:
        print(json.dumps(ray_child(Path(a.child[0]), Path(a.child[1]), int(a.child[2]), int(a.child[3]))))
        return
    work = a.cache / a.shape / "ray-scale"
    work.mkdir(parents=True, exist_ok=True)
    manifest = plan(family(a.shape, a.cache), work, a.method, a.budget)
    cores = len(os.sched_getaffinity(0))
    rows = []
    for n in [int(x) for x in a.workers.split(",")]:
        pair = pinned_pair(manifest, work, n, a.runs, min(n, cores))
        local, remote = pair["local"], pair["ray"]
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
             "| workers | cores (local and ray) | local s | ray s | ray overhead | input bytes | parts | nodes used | MB/s per worker |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['workers']} | {r['local_cores']} | {r['local_execute_s']:.2f} | {r['ray_execute_s']:.2f} | "
                     f"{100 * r['overhead']:+.1f}% | {r['bytes_read']:,} | {r['parts']} | {r['nodes_used']} | "
                     f"{r['per_worker_MBps']:.0f} |")
    lines += ["", "Times are the manifests' execute wall time (inputs opened to output published); the ray "
              "driver had already joined the cluster and its workers had imported mergepipe (one warm-up run). "
              "Both sides are pinned to the same cores (taskset): the ray side's driver and whole cluster with it. "
              f"Load average before: {meta['load_before']:.2f}."]
    (a.out / "ray_scale.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
