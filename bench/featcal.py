"""FeatCal memory and time on the quality family: peak RSS against the bound the README states.

    python -m bench.featcal [--samples 8,32,128] [--out bench/results]

For each number of calibration sequences per task it runs, through the real command line, the plain
TA merge and the same merge with a `calibrate:` section (module order, its defaults), and measures
both processes from outside (peak RSS of the process tree, wall time). The README's bound for the
calibrated run is

    peak RSS <= RSS of the same merge without calibration (imports, merge, writer)
              + what importing FeatCal's modules and transformers' layer classes adds
              + (2 + experts) x one decoder layer in float32 (merged, base, every active expert's:
                module order holds the experts' layers while it solves the layer group by group)
              + one layer's statistics in float64 (per Linear group C_ss and C_st, per module a W-sized sum)
              + the activation streams: 2 x experts x real tokens x hidden x 4 bytes
              + the experts' Linear inputs of the current layer: experts x real tokens x (sum of the
                Linear groups' input widths) x 4 bytes (module order; past 4 GiB of streams they spill)
              + 64 MiB (one batch of hooked inputs, the stem's embedding rows, allocator slack)

Writes featcal.md and featcal.json under --out.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import yaml

from bench.measure import run_measured
from bench.quality.family import build_family
from bench.quality.table import calibration_file
from mergepipe.checkpoint import open_model
from mergepipe.featcal.layers import Arch

REPO = Path(__file__).resolve().parent.parent
SLACK = 64 << 20


def bound_parts(base_dir: Path, tokens: int, experts: int) -> dict[str, int]:
    base = open_model(base_dir)
    arch = Arch.from_config(base_dir / "config.json", tensor_names=base.tensors)
    layer = [base.tensors[n] for n in arch.layer_tensor_names(0, base.tensors)]
    layer_f32 = sum(i.numel for i in layer) * 4
    stats, widths = 0, {}
    for spec in arch.modules():
        w = base.tensors.get(f"{arch.layer_prefix(0)}{spec.name}.weight")
        if w is not None and spec.kind == "linear":
            stats += 2 * w.shape[1] ** 2 * 8 + w.numel * 8  # C_ss, C_st per input (an upper bound), W-sized sum
            widths[spec.group] = w.shape[1]
    streams = 2 * experts * tokens * arch.hidden_size * 4
    inputs = experts * tokens * sum(widths.values()) * 4
    return {"layers": (2 + experts) * layer_f32, "statistics": stats, "streams": streams, "expert_inputs": inputs,
            "slack": SLACK}


IMPORTS = "import mergepipe.cli, mergepipe.execute"
FEATCAL_IMPORTS = IMPORTS + ", mergepipe.featcal.stage, transformers.models.{t}.modeling_{t}"


def import_cost(model_type: str) -> int:
    """RSS that importing FeatCal and the model's transformers classes adds to a plain merge's imports."""
    rss = []
    for code in (IMPORTS, FEATCAL_IMPORTS.format(t=model_type)):
        rss.append(min(run_measured([sys.executable, "-c", code], cwd=REPO).peak_rss_bytes for _ in range(3)))
    return max(0, rss[1] - rss[0])


def execute(cfg: dict, work: Path, name: str) -> dict:
    path = work / f"{name}.yml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    manifest, out = work / f"{name}.json", work / "out" / name
    for args in (["plan", str(path), "-o", str(manifest), "--catalog", str(work / "catalog.sqlite")],
                 ["execute", str(manifest), "-o", str(out), "--force", "--json"]):
        r = run_measured([sys.executable, "-m", "mergepipe", *args], cwd=REPO)
        if r.returncode != 0:
            raise SystemExit(f"mergepipe {args[0]} failed: {r.stderr_tail}")
    done = json.loads((out / "mergepipe.manifest.json").read_text())
    stages = done.get("stages") or []
    return {"wall_s": r.wall_s, "peak_rss_bytes": r.peak_rss_bytes, "calibration": stages[0]["record"] if stages else None}


def timing(fam: dict[str, Path], work: Path, device: str, samples: int = 32, seq_len: int = 256,
           vocab: int | None = None, seed: int = 0) -> dict:
    """Wall time of TA + FeatCal on a family of any size, with seeded random token ids: what bench/gpu.py
    reports for the largest family it builds."""
    import random

    from mergepipe.config import load_config
    from mergepipe.demo import demo_config
    from mergepipe.execute import execute as run
    from mergepipe.index import Catalog
    from mergepipe.plan import plan_merge
    vocab = vocab or json.loads((fam["base"] / "config.json").read_text())["vocab_size"]
    rng = random.Random(seed)
    work.mkdir(parents=True, exist_ok=True)
    data = work / "calib-random.jsonl"
    data.write_text("".join(json.dumps({"input_ids": [rng.randrange(vocab) for _ in range(seq_len)]}) + "\n"
                            for _ in range(samples)))
    cfg = demo_config(fam, "task_arithmetic")
    cfg["calibrate"] = {"data": str(data), "parameters": {"samples": samples, "seq_len": seq_len, "batch_size": 16}}
    (work / "featcal.yml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    m = plan_merge(load_config(work / "featcal.yml"), "100%", Catalog(work / "catalog.sqlite"))
    done = run(m, work / "out-featcal", device=device, force=True)
    ex = done.execution
    return {"device": ex.device, "wall_s": ex.wall_s, "experts": len(m.experts), "samples": samples,
            "seq_len": seq_len, "layers": max(m.stages[0].record["prefixes"]),
            "peak_rss_bytes": ex.peak_rss_bytes, "peak_device_bytes": ex.peak_device_bytes,
            "expert_bytes_read": ex.expert_bytes_read}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--samples", default="8,32,128")
    ap.add_argument("--family", type=Path, default=REPO / "bench" / "cache" / "quality")
    ap.add_argument("--work", type=Path, default=REPO / "bench" / "cache" / "featcal-run")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    args = ap.parse_args(argv)
    paths = build_family(args.family, "full")
    args.work.mkdir(parents=True, exist_ok=True)
    experts = [n for n in paths if n != "base"]
    tasks = [n.removeprefix("expert_") for n in experts]
    cfg = {"merge_method": "task_arithmetic", "base_model": str(paths["base"]),
           "models": [{"model": str(paths[n]), "parameters": {"weight": 0.3}} for n in experts], "dtype": "float32"}
    plain = execute(cfg, args.work, "ta")
    imports = import_cost(json.loads((paths["base"] / "config.json").read_text())["model_type"])
    rows = []
    for n in (int(x) for x in args.samples.split(",")):
        calib = {"data": str(calibration_file(args.work, tasks, n)), "tasks": tasks,
                 "parameters": {"samples": n, "seq_len": 64, "allow_underdetermined": True}}
        r = execute({**cfg, "calibrate": calib}, args.work, f"ta-featcal{n}")
        parts = {"imports": imports, **bound_parts(paths["base"], max(r["calibration"]["tokens"]), len(experts))}
        bound = plain["peak_rss_bytes"] + sum(parts.values())
        rows.append({"samples": n, "tokens_per_expert": r["calibration"]["tokens"], "wall_s": r["wall_s"],
                     "peak_rss_bytes": r["peak_rss_bytes"], "plain_peak_rss_bytes": plain["peak_rss_bytes"],
                     "plain_wall_s": plain["wall_s"], "bound_bytes": bound, "bound_parts": parts,
                     "within": r["peak_rss_bytes"] <= bound})
        print(f"samples {n}: peak RSS {r['peak_rss_bytes'] / 2**20:.0f} MiB <= bound {bound / 2**20:.0f} MiB: "
              f"{rows[-1]['within']}", flush=True)
    mib = 2 ** 20
    lines = ["# FeatCal memory and time on the quality family", "",
             "TA (weight 0.3) over the 4 experts of the quality family, then FeatCal in module order with its "
             "defaults, sequences of at most 64 tokens. Peak RSS of the whole "
             "`mergepipe execute` process tree, sampled from outside; bound as stated in the README "
             "(plain merge's RSS + FeatCal's imports + (2 + experts) float32 layers + float64 statistics + "
             "activation streams + the experts' Linear inputs of one layer + 64 MiB).", "",
             "| sequences per task | tokens per expert | wall s | peak RSS | plain TA peak RSS | bound | within |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['samples']} | {max(r['tokens_per_expert'])} | {r['wall_s']:.1f} (plain {r['plain_wall_s']:.1f}) | "
                     f"{r['peak_rss_bytes'] / mib:.0f} MiB | {r['plain_peak_rss_bytes'] / mib:.0f} MiB | "
                     f"{r['bound_bytes'] / mib:.0f} MiB | {'yes' if r['within'] else 'NO'} |")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "featcal.json").write_text(json.dumps(rows, indent=2))
    (args.out / "featcal.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out / 'featcal.md'}")


if __name__ == "__main__":
    main()
