"""Core benchmark: mergepipe against mergekit 0.1.5 on the same mergekit YAML.

    python -m bench.core [--shape qwen05b|demo|tiny] [--runs 3] [--out bench/out]

For each job (a `cat` reading floor, mergekit TA and TIES, mergepipe TA and TIES at several I/O
budgets) it measures, from outside the process: wall time (median of warm- and cold-page-cache runs),
peak RSS of the process tree, and the bytes the kernel actually read from disk; for mergepipe also the
bytes it counted itself (its manifest). Then it compares outputs tensor by tensor: mergepipe at 100%
against mergekit (they should agree), and mergepipe at partial budgets against mergepipe at 100%
(how much the budget costs). Writes core.md, core.json and core.png under --out.

Cold runs need root (drop_caches). Outputs of the runs go under --cache and are overwritten per run.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field, asdict
from pathlib import Path

import torch
import yaml

from bench.measure import RunResult, cached_bytes, can_drop_caches, drop_caches, run_measured
from mergepipe.checkpoint import open_model
from mergepipe.compare import compare
from mergepipe.synth import DEMO, QWEN25_05B, TINY, build_family

REPO = Path(__file__).resolve().parent.parent
SHAPES = {"qwen05b": QWEN25_05B, "demo": DEMO, "tiny": TINY}
EXPERTS = 4
SHARDS = 3
GiB = 1024 ** 3


# ----------------------------------------------------------------------------------------------------
# Jobs

@dataclass
class Job:
    name: str                      # shown in the table, e.g. "mergepipe TA"
    tool: str                      # "cat" | "mergekit" | "mergepipe"
    method: str | None = None      # "ta" | "ties"
    budget: str | None = None      # mergepipe only, e.g. "20%"
    runs: int = 3
    note: str = ""
    cmd: list[str] = field(default_factory=list)
    outdir: Path | None = None
    results: dict[str, list[RunResult]] = field(default_factory=lambda: {"cold": [], "warm": []})
    executions: list[dict] = field(default_factory=list)   # mergepipe manifests' `execution` sections
    plan: RunResult | None = None
    error: str | None = None
    error_detail: str | None = None
    warmup: list[list[str]] = field(default_factory=list)  # run after drop_caches, before a cold run

    @property
    def slug(self) -> str:
        s = f"{self.tool}-{self.method or self.name.split()[0]}"  # the read floors: cat, dd
        return s + (f"-{self.budget.rstrip('%')}" if self.budget else "")

    @property
    def budget_pct(self) -> float | None:
        return float(self.budget.rstrip("%")) if self.budget and self.budget.endswith("%") else None


def mergekit_yaml(base: Path, experts: list[Path], method: str, weight: float, density: float) -> dict:
    """The one config both tools get. Merging in float32 and writing bf16 is mergekit's recommended
    practice for bf16 inputs, and makes rounding, not accumulation order, the only source of tiny
    disagreement."""
    params = {"weight": weight}
    if method == "ties":
        params["density"] = density
    return {
        "merge_method": {"ta": "task_arithmetic", "ties": "ties"}[method],
        "base_model": str(base),
        "models": [{"model": str(e), "parameters": dict(params)} for e in experts],
        "dtype": "float32",
        "out_dtype": "bfloat16",
    }


def tool_env() -> dict:
    # mergepipe may not be pip-installed yet: make `python -m mergepipe.cli` importable from anywhere.
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env


def warm_software(cmds: list[list[str]]) -> None:
    """After drop_caches, re-read the tool's code (python, torch, transformers .so files, lazily
    imported modules: tens to hundreds of MB) so that a cold run's disk reads and wall time are about
    the model files, not the software. The best way to touch every code path is to run the same job
    on a separate tiny family, so that is what the warm-up commands do (they fall back to imports)."""
    for c in cmds:
        subprocess.run(c, env=tool_env(), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def read_execution(job: Job, r: RunResult) -> dict:
    """mergepipe's own account of the run: the saved manifest is authoritative; stdout (--json) is the
    fallback if the manifest is missing."""
    mf = job.outdir / "mergepipe.manifest.json"
    if mf.exists():
        with contextlib.suppress(ValueError, KeyError):
            return json.loads(mf.read_text())["execution"]
    for text in [r.stdout] + r.stdout.strip().splitlines()[::-1]:
        with contextlib.suppress(ValueError):
            d = json.loads(text)
            if isinstance(d, dict):
                return d.get("execution", d)
    return {}


def run_job(job: Job, *, inputs: list[Path], expert_files: list[Path], cold: bool) -> None:
    modes = (["cold"] if cold else []) + ["warm"]
    for mode in modes:
        if mode == "warm":
            # Put every input fully in page cache once; then all warm runs see the same state.
            subprocess.run(["sh", "-c", 'cat "$@" > /dev/null', "sh", *map(str, inputs)], check=True)
        for i in range(job.runs):
            if job.outdir is not None:
                shutil.rmtree(job.outdir, ignore_errors=True)
            extra = {}
            if mode == "cold":
                drop_caches()
                warm_software(job.warmup)
                extra["inputs_cached_at_start"] = cached_bytes(inputs)
            r = run_measured(job.cmd, cwd=REPO, env=tool_env())
            if mode == "cold":
                # After a cold start, the expert pages in the page cache are exactly what the kernel
                # read from the expert files for this run (readahead included).
                extra["expert_bytes_cached_after"] = cached_bytes(expert_files)
            r.extra.update(extra)
            status = "ok" if r.returncode == 0 else f"FAILED rc={r.returncode}"
            print(f"  {job.name:16s} {job.budget or '':5s} {mode} #{i + 1}: {r.wall_s:7.2f} s, "
                  f"read {r.read_bytes / GiB:6.3f} GiB, peak RSS {r.peak_rss_bytes / GiB:5.2f} GiB  {status}",
                  flush=True)
            if r.returncode != 0:
                last = (r.stderr_tail.strip().splitlines() or [""])[-1]   # usually the exception line
                job.error = f"{mode} run failed (rc={r.returncode}): {last}"
                job.error_detail = r.stderr_tail
                print(r.stderr_tail[-1500:], file=sys.stderr)
                return
            if job.tool == "mergepipe":
                job.executions.append(read_execution(job, r))
            job.results[mode].append(r)


def run_once(name: str, cmd: list[str], *, cold: bool, warmup: list[list[str]] = ()) -> RunResult:
    """A one-off step (index, plan): measured once, cold if asked."""
    if cold:
        drop_caches()
        warm_software(warmup)
    r = run_measured(cmd, cwd=REPO, env=tool_env())
    print(f"  {name}: {r.wall_s:.2f} s, read {r.read_bytes / GiB:.3f} GiB, rc={r.returncode}", flush=True)
    if r.returncode != 0:
        raise RuntimeError(f"{name} failed (rc={r.returncode}):\n{r.stderr_tail}")
    return r


# ----------------------------------------------------------------------------------------------------
# Output comparison, streaming: one tensor (or a block of its rows) in memory at a time.

def compare_exact(a_dir: Path, b_dir: Path) -> dict:
    """Element-wise agreement of two outputs (mergepipe 100% vs mergekit)."""
    c = compare(a_dir, b_dir)
    return {"a": str(a_dir), "b": str(b_dir), "elements": c.elements, "differing_elements": c.differing,
            "differing_fraction": c.fraction, "max_ulp_bf16": c.max_ulp, "max_abs_diff": c.max_abs,
            "tensors_differing": len(c.worst), "worst_tensors": c.worst[:10]}


def deviation(out_dir: Path, ref_dir: Path, base_dir: Path) -> dict:
    """||M_A - M_100||_F and that relative to the size of the merge's change, ||M_100 - base||_F."""
    c = compare(out_dir, ref_dir, base_dir)
    return {"abs_fro": c.frobenius, "ref_delta_fro": c.sq_ref_delta ** 0.5,
            "rel": c.relative if c.sq_ref_delta else float("nan")}


# ----------------------------------------------------------------------------------------------------
# Reporting

def med(rs: list[RunResult], key: str) -> float | None:
    return statistics.median(getattr(r, key) for r in rs) if rs else None


CONTENDED = 0.10   # other processes used more than this share of all CPUs during a job's runs


def fmt_s(x: float | None, n: int, contended: bool = False) -> str:
    if x is None:
        return "—"
    return f"{x:.2f} s" + (f" (n={n})" if n == 1 else "") + (" †" if contended else "")


def fmt_b(x: float | None) -> str:
    if x is None:
        return "—"
    return f"{x / GiB:.2f} GiB" if x >= 0.1 * GiB else f"{x / 2**20:.1f} MiB"


def summarize(job: Job) -> dict:
    cold, warm = job.results["cold"], job.results["warm"]
    allr = cold + warm
    ex = job.executions[-1] if job.executions else {}
    return {
        "wall_warm_median_s": med(warm, "wall_s"), "wall_cold_median_s": med(cold, "wall_s"),
        "n_warm": len(warm), "n_cold": len(cold),
        "read_bytes_cold_median": med(cold, "read_bytes"), "read_bytes_warm_median": med(warm, "read_bytes"),
        "peak_rss_bytes_max": max((r.peak_rss_bytes for r in allr), default=None),
        "peak_rss_anon_bytes_max": max((r.peak_rss_anon_bytes for r in allr), default=None),
        # Share of the machine's CPU that other processes used during the runs (the box is shared).
        # (/proc/stat ticks are 10 ms, so very short runs are noisy: clamp to 1.)
        "other_cpu_frac_median": (statistics.median(min(1.0, r.other_cpu_s / (r.wall_s * (os.cpu_count() or 1)))
                                                    for r in allr) if allr else None),
        "counted_expert_bytes": ex.get("expert_bytes_read"),
        "os_expert_bytes_cold_median": (statistics.median(r.extra["expert_bytes_cached_after"] for r in cold)
                                        if cold and all(r.extra.get("expert_bytes_cached_after") is not None for r in cold)
                                        else None),
        "counted_base_bytes": ex.get("base_bytes_read"),
        "counted_total_bytes": sum(ex["bytes_read"].values()) if isinstance(ex.get("bytes_read"), dict) else None,
        "self_reported_wall_s_median": (statistics.median(e["wall_s"] for e in job.executions if "wall_s" in e)
                                        if any("wall_s" in e for e in job.executions) else None),
    }


def table(jobs: list[Job], summaries: dict[str, dict], dev_text: dict[str, str], index_run: RunResult | None) -> str:
    ref = {j.method: summaries[j.slug] for j in jobs if j.tool == "mergekit" and not j.error}
    head = ["job", "budget", "wall warm (median)", "wall cold (median)", "vs mergekit (warm / cold)",
            "OS bytes read, cold", "OS expert bytes, cold", "counted expert bytes", "peak RSS (anon)", "deviation"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for j in jobs:
        s = summaries[j.slug]
        if j.error:
            msg = j.error.splitlines()[0][:120].replace("|", "/")
            lines.append(f"| {j.name} | {j.budget or '—'} | FAILED | | | | | | | {msg} |")
            continue
        ratio = "—"
        mk = ref.get(j.method)
        if j.tool == "mergepipe" and mk:
            def r(a, b):
                return f"{a / b:.2f}×" if a and b else "—"
            ratio = (f"{r(s['wall_warm_median_s'], mk['wall_warm_median_s'])} / "
                     f"{r(s['wall_cold_median_s'], mk['wall_cold_median_s'])}")
        rss = (f"{fmt_b(s['peak_rss_bytes_max'])} ({fmt_b(s['peak_rss_anon_bytes_max'])})"
               if j.tool != "cat" else "—")
        name = j.name + (f" [{j.note}]" if j.note else "")
        busy = (s["other_cpu_frac_median"] or 0) > CONTENDED
        lines.append(
            f"| {name} | {j.budget or '—'} | {fmt_s(s['wall_warm_median_s'], s['n_warm'], busy)} | "
            f"{fmt_s(s['wall_cold_median_s'], s['n_cold'], busy)} | {ratio} | {fmt_b(s['read_bytes_cold_median'])} | "
            f"{fmt_b(s['os_expert_bytes_cold_median'])} | "
            f"{fmt_b(s['counted_expert_bytes'])} | {rss} | {dev_text.get(j.slug, '—')} |")
    if index_run is not None:
        lines.append(f"| mergepipe index (one-time) | — | — | {fmt_s(index_run.wall_s, 1)} | — | "
                     f"{fmt_b(index_run.read_bytes)} | — | — | {fmt_b(index_run.peak_rss_bytes)} "
                     f"({fmt_b(index_run.peak_rss_anon_bytes)}) | — |")
    return "\n".join(lines)


def criteria(jobs: list[Job], summaries: dict[str, dict]) -> list[str]:
    """Speed ratios against mergekit, from this run's medians."""
    def find(tool, method=None, budget=None, name=None):
        for j in jobs:
            if j.tool == tool and j.method == method and j.budget == budget and (name is None or j.name.startswith(name)) \
                    and not j.error:
                return summaries[j.slug]
        return None
    out = ["", "Ratios against mergekit (this run's medians, warm / cold):", ""]
    ta100, ta20 = find("mergepipe", "ta", "100%"), find("mergepipe", "ta", "20%")
    ties100 = find("mergepipe", "ties", "100%")
    pairs = [("TA 100% / mergekit TA (<= 0.25)", ta100, find("mergekit", "ta")),
             ("TA 100% / dd read once (<= 2)", ta100, find("cat", name="dd")),
             ("TA 100% / cat read once", ta100, find("cat", name="cat")),
             ("TIES 100% / mergekit TIES (<= 0.1)", ties100, find("mergekit", "ties")),
             ("TA 20% / TA 100% (<= 0.5)", ta20, ta100)]
    for label, a, b in pairs:
        if a and b:
            w = [a[f"wall_{m}_median_s"] / b[f"wall_{m}_median_s"] if a[f"wall_{m}_median_s"] and b[f"wall_{m}_median_s"]
                 else None for m in ("warm", "cold")]
            out.append(f"- {label}: " + " / ".join(f"{x:.3f}" if x is not None else "—" for x in w))
    return out


def plot(path: Path, jobs: list[Job], summaries: dict, devs: dict, floor_bytes: float) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    colors = {"ta": "tab:blue", "ties": "tab:orange"}
    for method, label in (("ta", "TA"), ("ties", "TIES")):
        mp = sorted((j for j in jobs if j.tool == "mergepipe" and j.method == method and not j.error),
                    key=lambda j: j.budget_pct or 0)
        if mp:
            x = [j.budget_pct for j in mp]
            os_b = [summaries[j.slug]["read_bytes_cold_median"] for j in mp]
            if all(v is not None for v in os_b):
                ax1.plot(x, [v / GiB for v in os_b], "o-", color=colors[method], label=f"mergepipe {label}: OS read (cold)")
            cnt = [summaries[j.slug]["counted_total_bytes"] for j in mp]
            if all(v is not None for v in cnt):
                ax1.plot(x, [v / GiB for v in cnt], "x--", color=colors[method], label=f"mergepipe {label}: counted by mergepipe (all inputs)")
            pts = [(j.budget_pct, devs[j.slug]["rel"]) for j in mp if j.slug in devs]
            if pts:
                ax2.plot(*zip(*pts), "o-", color=colors[method], label=f"mergepipe {label}")
        mk = next((j for j in jobs if j.tool == "mergekit" and j.method == method and not j.error), None)
        if mk and summaries[mk.slug]["read_bytes_cold_median"] is not None:
            ax1.axhline(summaries[mk.slug]["read_bytes_cold_median"] / GiB, color=colors[method], ls=":",
                        label=f"mergekit {label}: OS read (cold)")
    ax1.axhline(floor_bytes / GiB, color="gray", ls="-.", label="all 5 models (cat floor)")
    ax1.set(xlabel="I/O budget (% of expert bytes)", ylabel="GiB read", title="Bytes read vs budget")
    ax1.set_ylim(bottom=0)
    ax1.legend(fontsize=7)
    ax2.set(xlabel="I/O budget (%)", ylabel="||M_A − M_100|| / ||M_100 − base||",
            title="Deviation from the 100% merge")
    ax2.set_ylim(bottom=0)
    if ax2.get_legend_handles_labels()[0]:
        ax2.legend(fontsize=8)
    for ax in (ax1, ax2):
        ax.invert_xaxis()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def environment() -> dict:
    def ver(mod):
        with contextlib.suppress(Exception):
            return __import__(mod).__version__
        return None
    cpu = next((l.split(":", 1)[1].strip() for l in Path("/proc/cpuinfo").read_text().splitlines()
                if l.startswith("model name")), platform.processor())
    git = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
    import psutil
    from importlib.metadata import version, PackageNotFoundError
    try:
        mk = version("mergekit")
    except PackageNotFoundError:
        mk = None
    return {"python": platform.python_version(), "torch": torch.__version__, "mergekit": mk,
            "safetensors": ver("safetensors"), "cpu": cpu, "cpus": os.cpu_count(),
            "ram_bytes": psutil.virtual_memory().total, "kernel": platform.release(),
            "git_head": git.stdout.strip() or None, "torch_threads": torch.get_num_threads()}


# ----------------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=SHAPES, default="qwen05b")
    ap.add_argument("--runs", type=int, default=3, help="runs per job, each warm and cold (median reported)")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "out")
    ap.add_argument("--cache", type=Path, default=REPO / "bench" / "cache",
                    help="family and run outputs (large) live here")
    ap.add_argument("--weight", type=float, default=0.3)
    ap.add_argument("--density", type=float, default=0.2)
    ap.add_argument("--ta-budgets", default="100,50,20,10")
    ap.add_argument("--ties-budgets", default="100,50,20")
    ap.add_argument("--planner", default="score")
    ap.add_argument("--device", default="cpu", help="mergepipe execute --device")
    ap.add_argument("--skip-mergekit-ties", action="store_true",
                    help="mergekit TIES takes ~6 min per run on qwen05b")
    ap.add_argument("--mergekit-ties-runs", type=int, default=None,
                    help="runs (each warm and cold) of mergekit TIES; default 1 on qwen05b, else --runs")
    ap.add_argument("--skip-mergekit", action="store_true")
    ap.add_argument("--skip-mergepipe", action="store_true")
    ap.add_argument("--no-cold", action="store_true", help="skip cold-cache runs (needed when not root)")
    ap.add_argument("--mergepipe-cmd", default=f"{shlex.quote(sys.executable)} -m mergepipe.cli",
                    help="how to invoke mergepipe (for testing the harness against a stand-in)")
    ap.add_argument("--mergekit-shard-size", default="input",
                    help="mergekit --out-shard-size; 'input' = the inputs' shard size (params), "
                         "'default' = mergekit's default (5B, i.e. one shard held in RAM)")
    args = ap.parse_args(argv)

    cold = not args.no_cold
    if cold and not can_drop_caches():
        ap.error("cold runs need write access to /proc/sys/vm/drop_caches (run as root, or pass --no-cold)")
    shape = SHAPES[args.shape]
    mp_cmd = shlex.split(args.mergepipe_cmd)
    suffix = "" if args.shape == "qwen05b" else f"-{args.shape}"
    work = args.cache / args.shape
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "configs").mkdir(exist_ok=True)

    # --- family -------------------------------------------------------------------------------------
    t0 = time.perf_counter()
    fam = build_family(work / "family", shape, experts=EXPERTS, seed=0, dtype=torch.bfloat16, shards=SHARDS)
    print(f"family {args.shape} at {work / 'family'} ({time.perf_counter() - t0:.1f} s)")
    base, experts = fam["base"], [fam[f"expert{k}"] for k in range(1, EXPERTS + 1)]
    inputs = sorted(p for m in [base, *experts] for p in m.iterdir() if p.is_file())
    expert_files = sorted(p for m in experts for p in m.glob("*.safetensors"))
    floor_bytes = sum(p.stat().st_size for p in inputs)
    expert_bytes = sum(p.stat().st_size for m in experts for p in m.glob("*.safetensors"))
    n_params = sum(info.numel for info in open_model(base).tensors.values())

    configs = {}
    for method in ("ta", "ties"):
        configs[method] = args.out / "configs" / f"{method}{suffix}.yml"
        configs[method].write_text(yaml.safe_dump(
            mergekit_yaml(base, experts, method, args.weight, args.density), sort_keys=False))

    # A separate tiny family that cold runs are preceded by a run on (see warm_software).
    wdir = args.cache / "warmup-tiny"
    wfam = build_family(wdir / "family", TINY, experts=EXPERTS, seed=1, dtype=torch.bfloat16, shards=SHARDS)
    wbase, wexperts = wfam["base"], [wfam[f"expert{k}"] for k in range(1, EXPERTS + 1)]
    wconfigs = {}
    for method in ("ta", "ties"):
        wconfigs[method] = wdir / f"{method}.yml"
        wconfigs[method].write_text(yaml.safe_dump(
            mergekit_yaml(wbase, wexperts, method, args.weight, args.density), sort_keys=False))
    py_imports = {"mergekit": [sys.executable, "-c", "import torch, transformers, mergekit.merge"],
                  "mergepipe": [sys.executable, "-c", "import torch, safetensors, numpy, yaml"]}

    # --- jobs ---------------------------------------------------------------------------------------
    runs_dir = work / "runs"
    # Two ways of reading the inputs once: cat (which may hand the bytes to /dev/null without copying
    # them out of the kernel) and dd with 4 MiB reads into its own buffer, as a merge must.
    jobs: list[Job] = [Job("cat (read floor)", "cat", runs=args.runs,
                           cmd=["sh", "-c", 'cat "$@" > /dev/null', "sh", *map(str, inputs)]),
                       Job("dd 4 MiB reads (read floor)", "cat", runs=args.runs,
                           cmd=["sh", "-c", 'for f; do dd if="$f" of=/dev/null bs=4M status=none; done', "sh",
                                *map(str, inputs)])]
    mk_exe = Path(sys.executable).with_name("mergekit-yaml")  # not the pyenv shim: one process, no bash
    mk_exe = str(mk_exe) if mk_exe.exists() else shutil.which("mergekit-yaml")
    if args.mergekit_shard_size == "input":
        shard_args = ["--out-shard-size", str(math.ceil(n_params / SHARDS))]
    elif args.mergekit_shard_size == "default":
        shard_args = []
    else:
        shard_args = ["--out-shard-size", args.mergekit_shard_size]
    if not args.skip_mergekit:
        for method in ("ta",) + (() if args.skip_mergekit_ties else ("ties",)):
            runs = args.runs
            if method == "ties":
                runs = args.mergekit_ties_runs or (1 if args.shape == "qwen05b" else args.runs)
            out = runs_dir / f"mergekit-{method}"
            # --no-copy-tokenizer: the synthetic family has no tokenizer; everything else default (CPU).
            jobs.append(Job(f"mergekit {method.upper()}", "mergekit", method, runs=runs,
                            note=f"n={runs}" if runs < args.runs else "", outdir=out,
                            cmd=[mk_exe, str(configs[method]), str(out), "--no-copy-tokenizer", *shard_args],
                            warmup=[py_imports["mergekit"],
                                    [mk_exe, str(wconfigs[method]), str(wdir / f"out-mergekit-{method}"),
                                     "--no-copy-tokenizer", *shard_args]]))
    mp_jobs: list[Job] = []
    if not args.skip_mergepipe:
        for method, budgets in (("ta", args.ta_budgets), ("ties", args.ties_budgets)):
            for b in budgets.split(","):
                j = Job(f"mergepipe {method.upper()}", "mergepipe", method, budget=b.strip() + "%", runs=args.runs)
                j.outdir = runs_dir / j.slug
                manifest = args.out / "manifests" / f"{j.slug}{suffix}.json"
                j.cmd = mp_cmd + ["execute", str(manifest), "-o", str(j.outdir), "--force",
                                  "--device", args.device, "--json"]
                j.warmup = [py_imports["mergepipe"],
                            mp_cmd + ["execute", str(wdir / f"mergepipe-{method}.json"),
                                      "-o", str(wdir / f"out-mergepipe-{method}"), "--force",
                                      "--device", args.device, "--json"]]
                mp_jobs.append(j)
        jobs += mp_jobs

    # --- run ----------------------------------------------------------------------------------------
    index_run = None
    catalog = work / "catalog.sqlite"
    for j in jobs:
        if j.tool == "mergepipe" and index_run is None:
            # Warm-up family: index it and plan its 100% jobs, for the cold runs' warm-ups. Not measured.
            wcat = wdir / "catalog.sqlite"
            wcat.unlink(missing_ok=True)
            windex = mp_cmd + ["index", *map(str, wexperts), "--base", str(wbase), "--catalog", str(wcat)]
            wscratch = wdir / "catalog-scratch.sqlite"   # so the index warm-up indexes from scratch
            windex_scratch = ["sh", "-c", 'rm -f "$0" && exec "$@"', str(wscratch),
                              *windex[:-1], str(wscratch)]
            for c in [windex] + [mp_cmd + ["plan", str(wconfigs[m]), "--budget", "100%", "-o",
                                           str(wdir / f"mergepipe-{m}.json"), "--catalog", str(wcat)]
                                 for m in ("ta", "ties")]:
                if subprocess.run(c, env=tool_env(), cwd=REPO, capture_output=True).returncode != 0:
                    print(f"warning: warm-up step failed, cold runs warm imports only: {shlex.join(c)}",
                          file=sys.stderr)
            # Index once into a fresh catalog (one-time cost, measured cold), then plan each job.
            catalog.unlink(missing_ok=True)
            print("mergepipe index")
            try:
                index_run = run_once("index", mp_cmd + ["index", *map(str, experts), "--base", str(base),
                                                        "--catalog", str(catalog)],
                                     cold=cold, warmup=[py_imports["mergepipe"], windex_scratch])
            except RuntimeError as e:
                print(e, file=sys.stderr)
                for m in mp_jobs:
                    m.error = "index failed: " + str(e).splitlines()[0]
                index_run = False
        if j.error:
            continue
        print(f"{j.name} {j.budget or ''}".strip())
        if j.tool == "mergepipe":
            manifest = Path(j.cmd[j.cmd.index("execute") + 1])
            manifest.parent.mkdir(parents=True, exist_ok=True)
            try:
                j.plan = run_once("plan", mp_cmd + ["plan", str(configs[j.method]), "--budget", j.budget,
                                                    "-o", str(manifest), "--catalog", str(catalog),
                                                    "--planner", args.planner], cold=False)
            except RuntimeError as e:
                j.error = "plan failed: " + str(e)
                print(j.error, file=sys.stderr)
                continue
        run_job(j, inputs=inputs, expert_files=expert_files, cold=cold)
    index_run = index_run or None

    # --- compare outputs ----------------------------------------------------------------------------
    print("comparing outputs")
    ok = {j.slug: j for j in jobs if not j.error and j.outdir is not None and j.outdir.exists()}
    agreement, devs, dev_text = {}, {}, {}
    for method in ("ta", "ties"):
        mk, full = ok.get(f"mergekit-{method}"), ok.get(f"mergepipe-{method}-100")
        if mk and full:
            a = compare_exact(full.outdir, mk.outdir)
            agreement[method] = a
            if method == "ta":
                dev_text[full.slug] = (f"vs mergekit: {a['differing_elements']:,} of {a['elements']:,} elems "
                                       f"differ, max {a['max_ulp_bf16']} ulp")
            else:
                dev_text[full.slug] = f"vs mergekit: {100 * a['differing_fraction']:.4f}% elems differ"
        for j in ok.values():
            if j.tool == "mergepipe" and j.method == method and full and j is not full:
                d = deviation(j.outdir, full.outdir, base)
                devs[j.slug] = d
                dev_text[j.slug] = f"rel {d['rel']:.2e} (abs {d['abs_fro']:.3g})"
        if full:
            devs[full.slug] = {"abs_fro": 0.0, "rel": 0.0}

    # --- report -------------------------------------------------------------------------------------
    summaries = {j.slug: summarize(j) for j in jobs}
    md_table = table(jobs, summaries, dev_text, index_run)
    env = environment()
    notes = [
        f"# mergepipe vs mergekit {env['mergekit']} — shape `{args.shape}`",
        "",
        f"Family: base + {EXPERTS} experts, {n_params / 1e6:.0f}M params each, bf16, {SHARDS} shards; "
        f"{floor_bytes / GiB:.2f} GiB on disk in all ({expert_bytes / GiB:.2f} GiB of experts). "
        f"Config: `dtype: float32`, `out_dtype: bfloat16`, weight {args.weight} each"
        f" (TIES density {args.density}); same YAML to both tools (`{configs['ta'].name}`, `{configs['ties'].name}`).",
        f"Machine: {env['cpu']}, {env['cpus']} CPUs, {env['ram_bytes'] / GiB:.0f} GiB RAM, torch {env['torch']}, "
        f"python {env['python']}, git {env['git_head']}.",
        "",
        md_table,
        "",
        f"- Wall: median of {args.runs} runs unless marked n=1, measured outside the process (startup included). "
        "Warm: inputs fully in page cache. Cold: `sync; drop_caches` before each run, then the same tool run "
        "once on a separate tiny family so its code (python, torch, lazy imports) is cached again: the cold "
        "figure is about model files, not libraries (`inputs_cached_at_start` in the JSON checks they were out).",
        f"- †: contended — other processes used over {CONTENDED:.0%} of the machine's CPUs (median over "
        "the job's runs; `other_cpu_frac_median` in the JSON), so that wall time is inflated.",
        "- OS bytes read: `/proc/<pid>/io` read_bytes of the child (includes its reaped children), cold runs. "
        "Counted expert bytes: mergepipe's manifest `execution.expert_bytes_read`.",
        "- Peak RSS: max over runs of the process tree's summed VmRSS sampled every 25 ms (or the largest "
        "process's VmHWM if higher); in parentheses the anonymous part (RSS also counts mmap'ed page-cache pages of inputs).",
        "- Deviation: at 100%, element-wise agreement with mergekit's output; below 100%, "
        "||M_A − M_100||_F / ||M_100 − base||_F against mergepipe's own 100% output (abs = ||M_A − M_100||_F), "
        "streamed tensor by tensor in float64 sums.",
        f"- mergekit run as `mergekit-yaml CONFIG OUT --no-copy-tokenizer {' '.join(shard_args)}` "
        "(out shard size = the inputs' shard size, in parameters), CPU, otherwise defaults.",
    ]
    notes += criteria(jobs, summaries)
    fracs = [s["other_cpu_frac_median"] for s in summaries.values() if s["other_cpu_frac_median"] is not None]
    if fracs:
        notes.append(f"- Contention: other processes used a median {statistics.median(fracs):.0%} "
                     f"(worst job {max(fracs):.0%}) of the machine's {os.cpu_count()} CPUs during the runs.")
    if args.skip_mergekit_ties:
        notes.append("- mergekit TIES skipped (--skip-mergekit-ties).")
    md = "\n".join(notes) + "\n"
    md_path, json_path, png_path = (args.out / f"core{suffix}.{e}" for e in ("md", "json", "png"))
    md_path.write_text(md)
    json_path.write_text(json.dumps({
        "shape": args.shape, "shape_dims": asdict(shape), "experts": EXPERTS, "shards": SHARDS,
        "params_per_model": n_params, "input_bytes": floor_bytes, "expert_bytes": expert_bytes,
        "args": {k: str(v) for k, v in vars(args).items()}, "env": env,
        "configs": {m: str(p) for m, p in configs.items()},
        "index": index_run.to_json() if index_run else None,
        "jobs": [{"name": j.name, "slug": j.slug, "tool": j.tool, "method": j.method, "budget": j.budget,
                  "cmd": j.cmd, "error": j.error, "error_detail": j.error_detail, "summary": summaries[j.slug],
                  "plan": j.plan.to_json() if j.plan else None, "executions": j.executions,
                  "runs": {m: [r.to_json() for r in rs] for m, rs in j.results.items()}} for j in jobs],
        "agreement_100": agreement, "deviation": devs,
    }, indent=2, default=str))
    plot(png_path, jobs, summaries, devs, floor_bytes)
    print()
    print(md_table)
    print(f"\nwrote {md_path}, {json_path}, {png_path}")
    return 1 if any(j.error for j in jobs) else 0


if __name__ == "__main__":
    sys.exit(main())
