"""FeatCal in the quality tables: TA, TIES and GCWM, each without and with FeatCal (module order) at
8 / 32 / 128 calibration sequences per task, and the validation sweep that fixed module order's
lambda and alpha.

    python -m bench.quality.featcal_rows sweep --family DIR [--out bench/results]
    python -m bench.quality.featcal_rows rows --family DIR [--ops ta,ties,gcwm] [--samples 8,32,128]
    python -m bench.quality.featcal_rows rows --scale real [--ops ta] [--samples 128]

`sweep` (trained family): the TA merge calibrated in memory for each (lambda, alpha) of a grid,
scored on the VALIDATION split (tasks.val_set, disjoint from test); writes featcal-sweep.md/json.
`rows`: every merge through the real command line (`mergepipe plan` + `execute`), scored on the
test split; writes featcal-quality[-real].md/json after each row, so a cut-short run keeps what it
measured. "Gap closed": (NLL of the operator alone - NLL with FeatCal) / (NLL of the operator alone
- the experts' mean NLL on their own tasks). Families are used as they are, never rebuilt here.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import statistics
import time
from pathlib import Path

import torch

from . import table
from .family import STAMP
from .tasks import BOS, EOS, TASKS, encode, train_set

REPO = Path(__file__).resolve().parents[2]
REAL = Path("/work/quality-cache")
CLI_THREADS = torch.get_num_threads()  # what `mergepipe execute` computes with (main() lowers it for scoring)


def mean(scores: dict, key: str) -> float:
    return statistics.fmean(s[key] for s in scores.values())


def trained_paths(folder: Path) -> dict[str, Path]:
    if not (folder / STAMP).exists():
        raise SystemExit(f"{folder}: no {STAMP}: the family is not (yet) complete")
    paths = {"base": folder / "base", **{f"expert_{t}": folder / f"expert_{t}" for t in TASKS}}
    missing = [str(p) for p in paths.values() if not (p / "model.safetensors").exists()]
    if missing:
        raise SystemExit(f"{missing[0]}: missing model.safetensors")
    return paths


def real_paths(cache: Path) -> dict[str, Path]:
    from .real_tasks import TASKS as REAL_TASKS
    paths = {"base": cache / "smollm2" / "base", **{f"expert-{t}": cache / "smollm2" / f"expert-{t}" for t in REAL_TASKS}}
    missing = [str(p) for p in paths.values() if not (p / "model.safetensors").exists()]
    if missing:
        raise SystemExit(f"{missing[0]}: missing model.safetensors")
    return paths


def real_calibration_file(work: Path, tasks: list[str], n: int) -> Path:
    """The first n train-split items per task as token ids: prompt, answer, <eos>, tokenized as the
    evaluation does."""
    from transformers import AutoTokenizer

    from .real_tasks import split
    base = REAL / "smollm2" / "base"
    tok = AutoTokenizer.from_pretrained(base)
    path = work / f"calib-real-{n}.jsonl"
    with open(path, "w") as f:
        for t in tasks:
            for p, a in split(t, "train", REAL, base)[:n]:
                ids = tok(p)["input_ids"] + tok(a, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
                f.write(json.dumps({"task": t, "input_ids": ids}) + "\n")
    return path


# ---------------------------------------------------------------------------------------------
# Validation sweep


def sweep(folder: Path, out: Path, lams=(1e-5, 1e-3, 1e-2, 0.05), alphas=(0.5, 1.0), samples: int = 128,
          log=print) -> dict:
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mergepipe.featcal.calibrate import TensorSource, calibrate
    from mergepipe.featcal.layers import Arch

    from .evaluate import evaluate_model
    paths = trained_paths(folder)
    sd = {n: load_file(p / "model.safetensors") for n, p in paths.items()}
    base = sd["base"]
    experts = [n for n in sd if n != "base"]
    merged = {k: v + sum(0.3 * (sd[n][k] - v) for n in experts) for k, v in base.items()}  # TA, weight 0.3
    ids = [[[BOS] + encode(p) + encode(a) + [EOS] for p, a in train_set(n.removeprefix("expert_"), samples,
                                                                        seed=table.CALIB_SEED)] for n in experts]
    tok = AutoTokenizer.from_pretrained(paths["base"])
    model = AutoModelForCausalLM.from_pretrained(paths["base"], dtype=torch.float32)
    arch = Arch.from_config(paths["base"] / "config.json", tensor_names=base)

    def val(weights) -> dict:
        model.load_state_dict(weights)
        return evaluate_model(model, tok, TASKS, n=200, split="val")

    def calibrated(params) -> dict:
        w = dict(merged)
        calibrate(arch, TensorSource(base), TensorSource(merged), [TensorSource(sd[n]) for n in experts], ids,
                  {"samples": samples, "seq_len": 64, "batch_size": 16, **params}, w.__setitem__)
        return w
    rows = [{"variant": "TA", "params": None, "scores": val(merged)}]
    rows.append({"variant": "block order, reference defaults", "params": {"order": "block"},
                 "scores": val(calibrated({"order": "block"}))})
    log(f"TA val {mean(rows[0]['scores'], 'nll'):.3f}, block {mean(rows[1]['scores'], 'nll'):.3f}")
    for lam in lams:
        for alpha in alphas:
            t0 = time.perf_counter()
            params = {"order": "module", "lambda": lam, "alpha": alpha}
            rows.append({"variant": "module order", "params": params, "scores": val(calibrated(params))})
            log(f"lambda {lam} alpha {alpha}: val NLL {mean(rows[-1]['scores'], 'nll'):.3f} "
                f"({time.perf_counter() - t0:.0f} s)")
    best = min(rows[2:], key=lambda r: mean(r["scores"], "nll"))
    doc = {"samples": samples, "split": "val", "rows": rows, "best": best["params"]}
    out.mkdir(parents=True, exist_ok=True)
    (out / "featcal-sweep.json").write_text(json.dumps(doc, indent=1))
    lines = [f"# FeatCal module order: lambda and alpha on the validation split ({samples} sequences per task)", "",
             "TA (weight 0.3) of the trained family, calibrated in memory; 200 validation items per task "
             "(tasks.val_set, disjoint from the test pool). rho 2.2 throughout.", "",
             "| variant | lambda | alpha | val mean NLL | val token acc | val exact |", "|---|---|---|---|---|---|"]
    for r in rows:
        p = r["params"] or {}
        lines.append(f"| {r['variant']} | {p.get('lambda', '—')} | {p.get('alpha', '—')} | "
                     f"{mean(r['scores'], 'nll'):.3f} | {mean(r['scores'], 'token_acc'):.3f} | "
                     f"{mean(r['scores'], 'exact'):.3f} |")
    lines += ["", f"Chosen (lowest validation NLL): lambda {best['params']['lambda']}, alpha {best['params']['alpha']}."]
    (out / "featcal-sweep.md").write_text("\n".join(lines) + "\n")
    return doc


# ---------------------------------------------------------------------------------------------
# Rows


def own_task_nll(rows: list[dict], tasks: list[str]) -> float:
    """The experts' mean NLL, each on its own task."""
    by = {r["model"]: r["scores"] for r in rows if r["op"] is None}
    return statistics.fmean(by[n][t]["nll"] for n in by for t in tasks if n.endswith(f"_{t}") or n.endswith(f"-{t}"))


def _resumed_share(manifest: dict) -> float:
    """The share of a completed manifest's output that a killed earlier run had written."""
    ex = manifest["execution"]
    return (ex.get("resumed_bytes") or 0) / max(1, sum(o["size"] for o in ex["outputs"].values()))


def _tokens(manifest: dict) -> list[int] | None:
    stages = manifest.get("stages") or []
    return stages[0]["record"]["tokens"] if stages else None


def merge_part(m) -> dict:
    """A manifest's merge: what its file jobs write (its stages, recipe text and execution apart)."""
    doc = dataclasses.asdict(m)
    for key in ("stages", "execution", "recipe"):
        doc.pop(key)
    return doc


def calibrate_plain(plain: Path, manifest: Path, out: Path) -> tuple[Path, dict]:
    """A FeatCal row from its op's plain merge: the row is planned with `mergepipe plan` as usual, its
    merge part is checked to be the plain row's plan, and its FeatCal stage (the code `execute` runs
    after the merge) calibrates a copy of the plain row's published output. Executing the merge again
    would write the same bytes (replay is bit-exact), so only the merge's time is saved; the output
    folder is not published through execute's staging and carries no completed manifest. Checked: TIES +
    FeatCal 8 on the real family made this way has the model.safetensors bytes of the CLI's row."""
    from mergepipe.checkpoint import Reader
    from mergepipe.execute import run_stages
    from mergepipe.manifest import load_manifest
    from mergepipe.sources import open_recorded
    m, done = load_manifest(manifest), load_manifest(plain / "mergepipe.manifest.json")
    if merge_part(m) != merge_part(done):
        raise SystemExit(f"{manifest}: its merge is not the plan of {plain}; cannot reuse that output")
    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(plain, out, ignore=shutil.ignore_patterns("mergepipe.manifest.json"))
    reader, threads = Reader(), torch.get_num_threads()
    torch.set_num_threads(CLI_THREADS)  # the stage's matmuls round by thread count: compute as execute does
    try:
        t0 = time.perf_counter()
        reads = run_stages(m, open_recorded([m.base, *m.experts], None, False), out, reader, "cpu", None, {})
        seconds = time.perf_counter() - t0
    finally:
        reader.close()
        torch.set_num_threads(threads)
    (st,) = m.stages
    return out, {"calibration_seconds": round(seconds, 1), "stage_bytes_read": reads.get("featcal", 0),
                 "merge_reused": str(plain), "statistics": st.record["statistics"], "tokens": st.record["tokens"]}


def rows(scale: str, paths: dict[str, Path], tasks: list[str], evaluate, ops: list[str], samples: list[int],
         work: Path, out: Path, cached: dict | None = None, keep: bool = False, reuse: bool = False,
         log=print) -> list[dict]:
    stem = "featcal-quality" + ("-real" if scale == "real" else "")
    result: list[dict] = []
    if keep and (out / f"{stem}.json").exists():  # rows measured before: kept, not measured again
        result = json.loads((out / f"{stem}.json").read_text())["rows"]
    done = {r["model"] for r in result}
    for name, path in paths.items():
        if name in done or name == "base":  # the base is in the quality tables; the gap needs only the experts
            continue
        own = [t for t in tasks if name.endswith((f"_{t}", f"-{t}"))]  # each expert on its own task only
        scores = (cached or {}).get(name) or evaluate(path, own)
        result.append({"model": name, "op": None, "scores": {t: scores[t] for t in own}})
        log(f"{name}: own-task NLL {mean(result[-1]['scores'], 'nll'):.3f}")
    calib = real_calibration_file if scale == "real" else table.calibration_file
    for op in ops:
        for n in [None, *samples]:
            name = op if n is None else f"{op}+featcal{n}"
            if name in done:
                continue
            if reuse and n:
                manifest = table.plan(paths, name, 100, "score", work, calibration=calib)
                folder, row = calibrate_plain(table.merged_folder(work, op, 100, "score"), manifest,
                                              work / "calibrated" / name)
                stats, tokens = row.pop("statistics"), row.pop("tokens")
                seconds = row["calibration_seconds"]
            else:
                t0 = time.perf_counter()
                folder, ex = table.merge(paths, name, 100, "score", work, calibration=calib)
                seconds = time.perf_counter() - t0
                manifest = json.loads((folder / "mergepipe.manifest.json").read_text())
                stats, tokens = (manifest["stages"][0]["record"]["statistics"] if n else None), _tokens(manifest)
                row = {"merge_seconds": round(seconds, 1), "expert_bytes_read": ex["expert_bytes_read"],
                       "resumed_share": _resumed_share(manifest),
                       "stage_bytes_read": (ex.get("stage_bytes_read") or {}).get("featcal", 0),
                       "peak_rss_bytes": ex["peak_rss_bytes"]}
            widest = max(stats["mlp.down_proj"]) if n else None
            result.append({"model": name, "op": op, "featcal": n, "scores": evaluate(folder, tasks), "tokens": tokens,
                           "underdetermined": bool(tokens and min(tokens) < widest), **row})
            log(f"{name}: mean NLL {mean(result[-1]['scores'], 'nll'):.3f} ({seconds:.0f} s)")
            write(result, tasks, scale, out, stem)
    return result


def write(result: list[dict], tasks: list[str], scale: str, out: Path, stem: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    own = own_task_nll(result, tasks)
    plain = {r["op"]: mean(r["scores"], "nll") for r in result if r["op"] and not r.get("featcal")}
    for r in result:
        if r.get("featcal") and r["op"] in plain and plain[r["op"]] > own:
            r["gap_closed"] = (plain[r["op"]] - mean(r["scores"], "nll")) / (plain[r["op"]] - own)
    (out / f"{stem}.json").write_text(json.dumps({"scale": scale, "tasks": tasks, "experts_own_task_nll": own,
                                                  "ops": {r["model"]: table.OPS[r["model"]] for r in result if r["op"]},
                                                  "rows": result}, indent=1))
    head = ["model", *(f"{t} NLL / acc / exact" for t in tasks), "mean NLL", "mean token acc", "mean exact",
            "gap closed", "min tokens / expert", "merge s", "calibration reads MiB"]
    lines = [f"# TA, TIES and GCWM with and without FeatCal (module order), {'real SmolLM2' if scale == 'real' else 'trained'} family",
             "", f"Test split; experts scored on their own task only (their mean columns: that task). Experts' mean "
             f"NLL on their own tasks: {own:.3f}. Gap closed: (operator alone - with "
             "FeatCal) / (operator alone - experts on their own tasks), in mean answer NLL. `*`: fewer calibration "
             "tokens per expert than down_proj has inputs (allowed here with allow_underdetermined). `†`: the FeatCal "
             "stage alone, run on a copy of the op's plain merge (`--reuse-merge`; the row's merge part is that "
             "row's plan, checked). `‡ N%`: the merge resumed a killed run's staging folder, N% of its output "
             "already written; its time is the rest's.", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in result:
        s = r["scores"]
        cells = [r["model"] + (" *" if r.get("underdetermined") else "")]
        cells += [f"{s[t]['nll']:.3f} / {s[t]['token_acc']:.3f} / {s[t]['exact']:.2f}" if t in s else "—" for t in tasks]
        cells += [f"{mean(s, 'nll'):.3f}", f"{mean(s, 'token_acc'):.3f}", f"{mean(s, 'exact'):.3f}",
                  f"{r['gap_closed']:.0%}" if "gap_closed" in r else "—",
                  str(min(r["tokens"])) if r.get("tokens") else "—",
                  f"{r['merge_seconds']:.0f}" + (f" ‡ {r['resumed_share']:.0%}" if r.get("resumed_share") else "")
                  if "merge_seconds" in r else
                  f"{r['calibration_seconds']:.0f} †" if "calibration_seconds" in r else "—",
                  f"{r['stage_bytes_read'] / 2**20:.1f}" if r.get("stage_bytes_read") else "—"]
        lines.append("| " + " | ".join(cells) + " |")
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("what", choices=["sweep", "rows"])
    ap.add_argument("--scale", choices=["full", "real"], default="full")
    ap.add_argument("--family", type=Path, default=REPO / "bench" / "cache" / "quality")
    ap.add_argument("--ops", default="ta,ties,gcwm")
    ap.add_argument("--samples", default="8,32,128")
    ap.add_argument("--work", type=Path, default=REPO / "bench" / "cache" / "featcal-rows")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    ap.add_argument("--keep", action="store_true", help="keep the rows of an earlier run, measure only new ones")
    ap.add_argument("--reuse-merge", action="store_true",
                    help="FeatCal rows calibrate a copy of their op's plain merge instead of merging again")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    if args.what == "sweep":
        sweep(args.family, args.out)
        return
    samples = [int(n) for n in args.samples.split(",") if n]
    if args.scale == "real":
        from .real_evaluate import evaluate
        from .real_tasks import TASKS as REAL_TASKS
        paths, tasks = real_paths(REAL), list(REAL_TASKS)
        cache = REAL / "smollm2" / "eval.json"
        cached = json.loads(cache.read_text()) if cache.exists() else None  # base and experts, scored before
    else:
        from .evaluate import evaluate
        paths, tasks, cached = trained_paths(args.family), list(TASKS), None
    rows(args.scale, paths, tasks, evaluate, args.ops.split(","), samples, args.work / args.scale, args.out, cached,
         args.keep, args.reuse_merge)


if __name__ == "__main__":
    main()
