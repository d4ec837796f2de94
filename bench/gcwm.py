"""GCWM cost on the 0.5B-shaped bench family (base + 4 bf16 experts, Qwen2.5-0.5B tensor shapes).

    python -m bench.gcwm [--shape qwen05b] [--device cpu] [--adam-layers 0] [--full-adam] [--out bench/results]

Runs the real command line (`mergepipe plan` then `mergepipe execute`) and reads the per-tensor compute
seconds that execute records in the manifest's diagnostics:
  exact       solver=exact over every target tensor (168 at 0.5B), full budget;
  adam        the reference solver (Adam, 100 steps, lr 1e-5) on the target tensors of --adam-layers
              only (a CPU needs hours for all of them: spec section 6); --full-adam runs every layer
              (what bench/gpu.py does on a GPU).
Reports per tensor kind the median seconds and shape, the totals, the wall time, peak RSS and the
expert bytes read. Writes gcwm.md and gcwm.json (gcwm-<device>.* for a GPU) under --out.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch
import yaml

from bench.measure import run_measured
from mergepipe.checkpoint import open_model
from mergepipe.synth import DEMO, QWEN25_05B, TINY, build_family

REPO = Path(__file__).resolve().parent.parent
SHAPES = {"qwen05b": QWEN25_05B, "demo": DEMO, "tiny": TINY}
KINDS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _run(args: list[str], work: Path) -> dict:
    r = run_measured([sys.executable, "-m", "mergepipe", *args], cwd=REPO)
    if r.returncode != 0:
        raise SystemExit(f"mergepipe {' '.join(args)} failed: {r.stderr_tail}")
    return {"wall_s": r.wall_s, "peak_rss_bytes": r.peak_rss_bytes}


def merge(fam: dict[str, Path], work: Path, name: str, shared: dict, device: str) -> dict:
    cfg = {"merge_method": "gcwm", "base_model": str(fam["base"]),
           "models": [{"model": str(fam[k])} for k in fam if k != "base"], "parameters": shared}
    cfg_path = work / f"{name}.yml"
    cfg_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    manifest, out = work / f"{name}.json", work / "out" / name
    plan = _run(["plan", str(cfg_path), "-o", str(manifest), "--catalog", str(work / "catalog.sqlite")], work)
    run = _run(["execute", str(manifest), "-o", str(out), "--force", "--device", device], work)
    done = json.loads((out / "mergepipe.manifest.json").read_text())
    ex = done["execution"]
    base = open_model(fam["base"])
    rows = {}
    for tensor, d in ex["diagnostics"].items():
        kind = next(k for k in KINDS if f".{k}." in f".{tensor}.")
        rows.setdefault(kind, {"shape": list(base.tensors[tensor].shape), "seconds": []})["seconds"].append(d["seconds"])
    kinds = {k: {"shape": v["shape"], "tensors": len(v["seconds"]), "median_s": statistics.median(v["seconds"]),
                 "total_s": sum(v["seconds"])} for k, v in rows.items()}
    return {"name": name, "params": shared, "device": ex["device"], "kinds": kinds,
            "tensors": sum(v["tensors"] for v in kinds.values()), "compute_s": sum(v["total_s"] for v in kinds.values()),
            "wall_s": run["wall_s"], "plan_wall_s": plan["wall_s"], "peak_rss_bytes": run["peak_rss_bytes"],
            "expert_bytes_read": ex["expert_bytes_read"], "gates": [d["gate"] for d in ex["diagnostics"].values()],
            "conflicts": [d["conflict"] for d in ex["diagnostics"].values()]}


def table(results: list[dict], shape: str, layers: int) -> str:
    lines = [f"# GCWM cost on the {shape}-shaped bench family", "",
             f"Base + 4 bf16 experts ({layers} layers, 7 target tensors per layer); "
             "seconds are the per-tensor compute that execute records in the manifest (SVDs, barycenter, "
             "inner solves, blend), wall is the whole `mergepipe execute` process.", ""]
    for r in results:
        params = {k: v for k, v in r["params"].items() if k != "targets"}
        lines += [f"## {r['name']}: {params or 'defaults'} on {r['device']}", "",
                  "| tensor | shape | tensors | median s | total s |", "|---|---|---|---|---|"]
        for k in KINDS:
            if k in r["kinds"]:
                v = r["kinds"][k]
                lines.append(f"| {k} | {v['shape'][0]}x{v['shape'][1]} | {v['tensors']} | {v['median_s']:.3f} | {v['total_s']:.1f} |")
        per_layer = sum(v["median_s"] for v in r["kinds"].values())
        lines += ["", f"{r['tensors']} tensors: compute {r['compute_s']:.1f} s, execute wall {r['wall_s']:.1f} s, "
                  f"peak RSS {r['peak_rss_bytes'] / 2**30:.2f} GiB, expert bytes read {r['expert_bytes_read'] / 2**30:.2f} GiB; "
                  f"one layer {per_layer:.1f} s, so all {layers} layers ~{per_layer * layers / 60:.1f} min "
                  f"(extrapolated from the medians). Gate range {min(r['gates'], default=0):.3f}-"
                  f"{max(r['gates'], default=0):.3f}, conflict range {min(r['conflicts'], default=0):.3f}-"
                  f"{max(r['conflicts'], default=0):.3f}.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", choices=SHAPES, default="qwen05b")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--adam-layers", default="0", help="comma-separated layer indices for the Adam subset")
    ap.add_argument("--full-adam", action="store_true", help="Adam on every layer (hours on a CPU)")
    ap.add_argument("--skip-exact", action="store_true")
    ap.add_argument("--cache", type=Path, default=REPO / "bench" / "cache")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    args = ap.parse_args(argv)
    shape = SHAPES[args.shape]
    work = args.cache / args.shape
    fam = build_family(work / "family", shape, experts=4, seed=0, dtype=torch.bfloat16, shards=3)
    gwork = work / "gcwm"
    (gwork / "out").mkdir(parents=True, exist_ok=True)
    results = []
    if not args.skip_exact:
        results.append(merge(fam, gwork, "exact", {"solver": "exact"}, args.device))
        print(f"exact: {results[-1]['compute_s']:.1f} s compute, {results[-1]['wall_s']:.1f} s wall", flush=True)
    if args.full_adam:
        results.append(merge(fam, gwork, "adam", {}, args.device))
    else:
        layers = [int(x) for x in args.adam_layers.split(",")]
        targets = ",".join(f"layers.{i}.{part}.{k}.weight" for i in layers
                           for part, ks in (("self_attn", KINDS[:4]), ("mlp", KINDS[4:])) for k in ks)
        results.append(merge(fam, gwork, f"adam-layers-{args.adam_layers}", {"targets": targets}, args.device))
    print(f"{results[-1]['name']}: {results[-1]['compute_s']:.1f} s compute, {results[-1]['wall_s']:.1f} s wall", flush=True)
    suffix = "" if args.device == "cpu" else f"-{args.device.split(':')[0]}"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"gcwm{suffix}.json").write_text(json.dumps(results, indent=2))
    (args.out / f"gcwm{suffix}.md").write_text(table(results, args.shape, shape.layers))
    print(f"wrote {args.out / f'gcwm{suffix}.md'}")


if __name__ == "__main__":
    main()
