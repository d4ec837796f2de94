"""Every mergekit method mergepipe declares, against mergekit 0.1.5 on the same YAML.

    python -m bench.methods [--shape qwen05b|demo|tiny] [--methods linear,slerp,...] [--runs 1]

Per method: mergekit-yaml's wall time (median of --runs, each run kept in the JSON) and peak RSS;
mergepipe's (plan excluded: the family is indexed once first) at 100% and, for budgeted methods, at 20%; the expert bytes mergepipe counted and the bytes
the kernel read for it (/proc io, ~0 on a warm page cache); at 100% the agreement with mergekit
(differing elements, max ulp in the output dtype); at 20% the measured deviation from mergepipe at
100% against the recorded certificate. Warm page cache, except one cold run at 20% with the model
files' pages evicted (code and manifest stay cached) for the bytes the OS read, less the base's
pages, and the experts' pages it brought in (mincore). Writes methods.md and methods.json under --out.
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import statistics
import sys
from pathlib import Path

import torch
import yaml

from bench.core import SHAPES, tool_env
from bench.measure import cached_bytes, evict, read_once, run_measured
from mergepipe.compare import compare
from mergepipe.synth import build_family

EXPERTS, SHARDS = 4, 3
WEIGHTS = (0.4, 0.3, 0.2, 0.1)

# method: (experts used, base: "given" | "listed" | "none", shared parameters, per-model parameters)
RECIPES = {
    "linear": (3, "listed", {}, {}),
    "task_arithmetic": (4, "given", {}, {}),
    "ties": (4, "given", {}, {"density": 0.3}),
    "dare_ties": (4, "given", {}, {"density": 0.3}),
    "dare_linear": (4, "given", {}, {"density": 0.3}),
    "breadcrumbs": (4, "given", {}, {"density": 0.3, "gamma": 0.01}),
    "breadcrumbs_ties": (4, "given", {}, {"density": 0.3, "gamma": 0.01}),
    "della": (4, "given", {}, {"density": 0.4, "epsilon": 0.1}),
    "della_linear": (4, "given", {}, {"density": 0.4, "epsilon": 0.1}),
    "slerp": (1, "given", {"t": 0.4}, {}),
    "nuslerp": (2, "given", {}, {}),
    "model_stock": (3, "given", {}, {}),
    "passthrough": (1, "none", {}, {}),
}
NO_WEIGHT = {"slerp", "model_stock", "passthrough"}
UNBUDGETED = {"nuslerp", "model_stock", "passthrough"}


def recipe(fam: dict, method: str) -> dict:
    n, base, shared, per_model = RECIPES[method]
    models = []
    for k in range(n):
        p = {} if method in NO_WEIGHT else {"weight": WEIGHTS[k]}
        models.append({"model": str(fam[f"expert{k + 1}"]), "parameters": {**p, **per_model}})
    cfg = {"merge_method": method, "models": models, "dtype": "float32", "out_dtype": "bfloat16"}
    if base != "none":
        cfg["base_model"] = str(fam["base"])
    if base == "listed":
        models.append({"model": str(fam["base"]), "parameters": {"weight": 0.2}})
    if shared:
        cfg["parameters"] = shared
    return cfg


def _wall(cmd, env, runs: int) -> tuple[float, object, list[float], int]:
    """Median wall time, the last run, every run's wall time, and the peak RSS over the runs."""
    results = [run_measured(cmd, env=env) for _ in range(runs)]
    for r in results:
        if r.returncode:
            raise SystemExit(f"{shlex.join(cmd)} failed: {r.stderr_tail}")
    walls = [r.wall_s for r in results]
    return statistics.median(walls), results[-1], walls, max(r.peak_rss_bytes for r in results)


def warm(fam: dict) -> None:
    """Read the family once: every tool starts from a warm page cache (a cold run before evicts it)."""
    read_once(f for folder in fam.values() for f in sorted(Path(folder).glob("*.safetensors")))


def bench_method(method: str, fam: dict, work: Path, args, env) -> dict:
    mp = [sys.executable, "-m", "mergepipe.cli"]
    warm(fam)
    cfg_path = work / f"{method}.yml"
    cfg_path.write_text(yaml.safe_dump(recipe(fam, method), sort_keys=False))
    row: dict = {"method": method}
    mk_out = work / "out-mergekit"
    mk_exe = shutil.which("mergekit-yaml") or str(Path(sys.executable).with_name("mergekit-yaml"))
    if not args.no_peer:
        shutil.rmtree(mk_out, ignore_errors=True)
        row["mergekit_s"], _, row["mergekit_runs_s"], row["mergekit_peak_rss"] = _wall(
            [mk_exe, str(cfg_path), str(mk_out), "--no-copy-tokenizer"], env, args.runs)
    catalog = ["--catalog", str(work / "catalog.sqlite")]
    for budget in ("100%",) if method in UNBUDGETED else ("100%", "20%"):
        tag = budget.rstrip("%")
        manifest, out = work / f"{method}-{tag}.json", work / f"out-mergepipe-{tag}"
        r = run_measured(mp + ["plan", str(cfg_path), "--budget", budget, "-o", str(manifest), *catalog], env=env)
        if r.returncode:
            raise SystemExit(f"plan {method} {budget} failed: {r.stderr_tail}")
        wall, res, row[f"mergepipe_{tag}_runs_s"], row[f"mergepipe_{tag}_peak_rss"] = _wall(
            mp + ["execute", str(manifest), "-o", str(out), "--force", "--json"], env, args.runs)
        done = json.loads((out / "mergepipe.manifest.json").read_text())
        row[f"mergepipe_{tag}_s"] = wall
        row[f"expert_bytes_{tag}"] = done["execution"]["expert_bytes_read"]
        row[f"os_read_bytes_{tag}"] = res.read_bytes
        row["expert_bytes_total"] = done["budget"]["expert_bytes_total"]
        if tag == "100":
            if not args.no_peer:
                c = compare(out, mk_out)
                row.update(differing=c.differing, elements=c.elements, max_ulp=c.max_ulp)
        else:
            # a cold run for the model files alone: their pages evicted, the code and the manifest kept
            doc = json.loads(manifest.read_text())
            expert_files = [f for k in range(RECIPES[method][0]) for f in Path(fam[f"expert{k + 1}"]).glob("*.safetensors")]
            expert_files += [Path(e["sketch"]["path"]) for e in doc["experts"] if e.get("sketch")]
            base_files = sorted(Path(fam["base"]).glob("*.safetensors"))
            if evict(expert_files + base_files):
                cold = run_measured(mp + ["execute", str(manifest), "-o", str(out), "--force", "--json"], env=env)
                row["os_read_cold_20"] = cold.read_bytes  # everything the process read from disk
                # the pages the cold run brought in: the OS's own count of what it read of each file
                row["expert_files_cached_cold_20"] = cached_bytes(expert_files)
                row["base_files_cached_cold_20"] = cached_bytes(base_files)
            cert = done["plan"]["certificate"]
            row["deviation_20"] = compare(out, work / "out-mergepipe-100").frobenius
            row["bound_20"] = cert["bound"]
    if not args.no_peer:
        row["speedup_100"] = row["mergekit_s"] / row["mergepipe_100_s"]
    return row


def table(rows: list[dict]) -> str:
    lines = ["| method | mergekit s | mergepipe 100% s | ratio | differ (max ulp) | peak RSS GiB, mergekit / mergepipe 100% | "
             "20% s | expert bytes read at 20% | OS read at 20%, cold, less the base's pages | expert files' pages cached by that "
             "cold run | deviation at 20% / certificate |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        share = f"{r['expert_bytes_20'] / r['expert_bytes_total']:.2%}" if "expert_bytes_20" in r else "n/a"
        cert = (f"{r['deviation_20']:.3g} / {r['bound_20']:.3g}" if r.get("bound_20") is not None
                else f"{r['deviation_20']:.3g} / none" if "deviation_20" in r else "n/a")
        cold = (f"{(r['os_read_cold_20'] - r['base_files_cached_cold_20']) / r['expert_bytes_total']:.2%}"
                if "os_read_cold_20" in r else "n/a")
        cached = r.get("expert_files_cached_cold_20")
        cold += f" | {cached / r['expert_bytes_total']:.2%}" if cached is not None else " | n/a"
        peer = (f"{r['mergekit_s']:.2f} | {r['mergepipe_100_s']:.2f} | {r['mergepipe_100_s'] / r['mergekit_s']:.2f}x | "
                f"{r['differing'] / r['elements']:.3%} ({r['max_ulp']})" if "mergekit_s" in r
                else f"not run | {r['mergepipe_100_s']:.2f} | n/a | n/a")
        rss = " / ".join(f"{r[k] / 2**30:.2f}" if r.get(k) else "n/a" for k in ("mergekit_peak_rss", "mergepipe_100_peak_rss"))
        lines.append(f"| {r['method']} | {peer} | {rss} | {r.get('mergepipe_20_s', float('nan')):.2f} | {share} | {cold} | {cert} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="qwen05b")
    ap.add_argument("--methods", default=",".join(RECIPES))
    ap.add_argument("--runs", type=int, default=1)
    ap.add_argument("--no-peer", action="store_true", help="skip mergekit: mergepipe's reads, times and deviations only")
    ap.add_argument("--cache", type=Path, default=Path("/work/bench-cache"))
    ap.add_argument("--out", type=Path, default=Path("bench/out"))
    args = ap.parse_args(argv)
    torch.set_num_threads(1)  # this harness only compares; the tools run in their own processes
    fam = build_family(args.cache / args.shape / "family", SHAPES[args.shape], experts=EXPERTS, seed=0,
                       dtype=torch.bfloat16, shards=SHARDS)
    work = args.cache / args.shape / "methods"
    work.mkdir(parents=True, exist_ok=True)
    env = tool_env()
    rows = []
    args.out.mkdir(parents=True, exist_ok=True)
    for method in args.methods.split(","):
        rows.append(bench_method(method.strip(), fam, work, args, env))
        print(json.dumps(rows[-1]), flush=True)
        # after every method, so that a run cut short keeps what it measured
        (args.out / "methods.json").write_text(json.dumps({"shape": args.shape, "rows": rows}, indent=1))
        (args.out / "methods.md").write_text(f"# methods vs mergekit 0.1.5 ({args.shape}, warm cache)\n\n{table(rows)}\n")
    print(table(rows))


if __name__ == "__main__":
    main()
