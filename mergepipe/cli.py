"""The `mergepipe` command: a thin layer over the library. Bad input prints one line and exits 2;
a failed verification exits 1."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import os
import sys
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn
from rich.table import Table

from .errors import MergepipeError
from .options import PlanOptions, RunOptions

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Merge LLM checkpoint families under an explicit I/O budget, with replayable manifests.")
out = Console()
err = Console(stderr=True)


def fail(msg: str, code: int = 2) -> None:
    err.print(f"[bold red]error:[/] {escape(msg)}", highlight=False, soft_wrap=True)  # a message may hold [brackets]
    raise typer.Exit(code)


def command(fn):
    """Turn bad input into one line and exit code 2, never a traceback."""
    @functools.wraps(fn)
    def run(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except MergepipeError as e:
            fail(str(e))
        except FileNotFoundError as e:
            fail(f"{e.filename}: no such file or folder")
        except OSError as e:
            fail(f"{e.filename or 'I/O'}: {e.strerror or e}")
        except KeyboardInterrupt:
            fail("interrupted; nothing was published (running the same command again resumes)", 130)
    return app.command()(run)


@contextlib.contextmanager
def progress_bar(what: str, total: int, quiet: bool):
    if quiet or not sys.stderr.isatty():
        yield None
        return
    with Progress(TextColumn(f"[bold]{what}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                  TimeRemainingColumn(), console=err, transient=True) as p:
        task = p.add_task(what, total=total)
        yield lambda n: p.advance(task, n)


# Every flag that reaches the library as an options field, declared once: commands name the fields
# they take (see `flags`), so each flag has one spelling and one help text everywhere.
FLAGS = {
    "device": (str, typer.Option("cpu", "--device", help="cpu, cuda or cuda:N.")),
    "force": (bool, typer.Option(False, "--force", help="Replace an existing output folder.")),
    "root": (Optional[Path], typer.Option(None, "--root", help="Folder that relative model paths start from.")),
    "allow_pickle": (bool, typer.Option(False, "--allow-pickle",
                                        help="Load pickled .bin checkpoints (with weights_only=True).")),
    "allow_nonfinite": (bool, typer.Option(False, "--allow-nonfinite",
                                           help="Merge inputs that hold NaN or Inf (recorded in the manifest).")),
    "executor": (str, typer.Option("local", "--executor",
                                   help="local (this process) or ray (tasks on a Ray cluster; pip install 'mergepipe\\[ray]').")),
    "ray_address": (Optional[str], typer.Option(None, "--ray-address",
                                                help="Ray cluster to join: auto or HOST:PORT (default: RAY_ADDRESS, "
                                                     "else a new local one).")),
    "path_map": (Optional[List[str]], typer.Option(None, "--path-map",
                                                   help="DRIVER=WORKER: Ray workers find files under DRIVER at "
                                                        "WORKER instead (repeatable).")),
    "planner": (str, typer.Option("score", "--planner", help="score (default) or random (a control).")),
    "seed": (int, typer.Option(0, "--seed", help="Seed of the random planner.")),
    "fill": (str, typer.Option("sketch", "--fill",
                               help="What an unread expert block counts as: its sketch from the index, or zero.")),
    "sketch": (str, typer.Option("q2", "--sketch", help="Sketch kind the index keeps: q2 or sign.")),
    "relative_to": (Optional[Path], typer.Option(None, "--relative-to",
                                                 help="Record model paths relative to this folder.")),
}
JSON = typer.Option(False, "--json", help="Machine-readable output.")
CATALOG = typer.Option(None, "--catalog", help="Catalog file (default: user cache).")


def flags(options: type, *names: str, into: str = "opts"):
    """The command takes these fields of the `options` dataclass as flags (from FLAGS) and receives
    them as one value, its parameter `into`."""
    def wrap(fn):
        sig = inspect.signature(fn)
        added = [inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY, default=FLAGS[n][1], annotation=FLAGS[n][0])
                 for n in names]
        kept = [p for p in sig.parameters.values() if p.name != into]

        @functools.wraps(fn)
        def run(*args, **kwargs):
            return fn(*args, **{into: options(**{n: kwargs.pop(n) for n in names})}, **kwargs)
        run.__signature__ = sig.replace(parameters=kept + added)
        return run
    return wrap


@dataclasses.dataclass(frozen=True)
class YamlFlags:
    """mergekit-yaml's flags that scripts pass to `merge`."""
    cuda: bool = False
    copy_tokenizer: bool = True
    lazy_unpickle: bool = False
    allow_crimes: bool = False
    out_shard_size: Optional[str] = None

    def check(self) -> None:
        """Refuse, in one line, a flag whose effect mergepipe does not have; the others are accepted
        because mergepipe's own behaviour is what they ask for."""
        if not self.copy_tokenizer:
            raise MergepipeError("--no-copy-tokenizer is not supported: mergepipe always copies the tokenizer beside "
                                 "the merged tensors")
        if self.out_shard_size is not None:
            raise MergepipeError(f"--out-shard-size {self.out_shard_size} is not supported: mergepipe writes the "
                                 "base's shard layout (one file per base shard; one file for stacked layers)")


FLAGS.update({
    "cuda": (bool, typer.Option(False, "--cuda", help="mergekit-yaml's flag: the same as --device cuda.")),
    "copy_tokenizer": (bool, typer.Option(True, "--copy-tokenizer/--no-copy-tokenizer",
                                          help="mergekit-yaml's flag: mergepipe always copies the tokenizer.")),
    "lazy_unpickle": (bool, typer.Option(False, "--lazy-unpickle", help="mergekit-yaml's flag: accepted; mergepipe "
                                         "reads lazily (pickled inputs still need --allow-pickle).")),
    "allow_crimes": (bool, typer.Option(False, "--allow-crimes", help="mergekit-yaml's flag: accepted; mergepipe "
                                        "checks tensor names and shapes, not architecture names.")),
    "out_shard_size": (Optional[str], typer.Option(None, "--out-shard-size", help="mergekit-yaml's flag: refused "
                                                   "(mergepipe keeps the base's shard layout).")),
})


def _catalog(path: Optional[Path]):
    from .index import Catalog
    return Catalog(path)


@command
def index(models: List[str] = typer.Argument(..., help="Expert models: HF folders, .safetensors files or hub ids."),
          base: Optional[str] = typer.Option(None, "--base", help="Base model; without it MODELs are only hashed."),
          catalog: Optional[Path] = CATALOG, allow_pickle: bool = FLAGS["allow_pickle"][1],
          sketch: str = typer.Option("q2", "--sketch", help="Sketch kind to keep of each expert's delta (q2, q2n, sign), or none."),
          export: bool = typer.Option(False, "--export", help="Also write each expert's index and sketch beside it, "
                                      "so plans elsewhere need not read the expert."),
          as_json: bool = JSON):
    """Hash every block and record expert delta statistics in the catalog."""
    import time
    from .checkpoint import open_model
    from .index import index_family
    t0 = time.perf_counter()
    cat = _catalog(catalog)
    opened = [open_model(m, allow_pickle) for m in models]
    base_m = open_model(base, allow_pickle) if base else None
    total = sum(fh.size for m in opened + ([base_m] if base_m else []) for fh in m.files)
    with progress_bar("index", total, as_json) as cb:
        if base_m is not None:
            from .index import export_family
            from .sketch import SketchSpec
            fam = index_family(base_m, opened, cat, cb, None if sketch == "none" else SketchSpec.make(sketch))
            exported = [str(p) for p in export_family(base_m, opened, fam)] if export else []
        elif export:
            raise MergepipeError("--export needs --base: the sidecar holds the experts' deltas from it")
        else:
            for m in opened:
                index_family(m, [], cat, cb)
    info = {"catalog": str(cat.path), "models": len(opened) + (1 if base_m else 0), "seconds": round(time.perf_counter() - t0, 3),
            "exported": exported if base_m is not None else []}
    out.print_json(data=info) if as_json else out.print(f"indexed {info['models']} models into {info['catalog']} in {info['seconds']} s")


@command
@flags(PlanOptions, "planner", "seed", "fill", "sketch", "relative_to", "allow_pickle", "allow_nonfinite")
def plan(config: Path = typer.Argument(..., help="mergekit YAML recipe."),
         budget: str = typer.Option("100%", "--budget", "-b", help="Expert bytes to read: 20% or 3GiB or 500MB."),
         output: Path = typer.Option(..., "-o", "--output", help="Manifest to write."),
         catalog: Optional[Path] = CATALOG, as_json: bool = JSON, opts: PlanOptions = None):
    """Choose what to read under the budget; write a replayable manifest."""
    from .config import load_config
    from .plan import plan_merge
    cfg = load_config(config)
    with progress_bar("index", _unindexed_bytes(cfg), as_json) as cb:
        m = plan_merge(cfg, budget, _catalog(catalog), dataclasses.replace(opts, progress=cb))
    _notes(cfg)  # once the plan stands: a refused recipe gets its one error line alone
    output.parent.mkdir(parents=True, exist_ok=True)
    m.save(output)
    summary = {"manifest": str(output), "operator": m.operator.name, "budget_bytes": m.budget.bytes,
               "expert_bytes_total": m.budget.expert_bytes_total, "planned_expert_bytes": m.plan.planned_expert_bytes,
               "certificate": m.plan.certificate.bound}
    if as_json:
        out.print_json(data=summary)
    else:
        pct = 100 * m.plan.planned_expert_bytes / max(m.budget.expert_bytes_total, 1)
        bound = "n/a" if m.plan.certificate.bound is None else f"{m.plan.certificate.bound:.4g}"
        out.print(f"planned {m.operator.name}: reads {_size(m.plan.planned_expert_bytes)} of "
                  f"{_size(m.budget.expert_bytes_total)} expert bytes ({pct:.1f}%), error bound {bound} -> {output}")


@command
@flags(RunOptions, "device", "force", "root", "allow_pickle", "allow_nonfinite", "executor", "ray_address", "path_map")
def execute(manifest: Path = typer.Argument(...),
            output: Path = typer.Option(..., "-o", "--output", "--out", help="Output folder (published atomically)."),
            as_json: bool = JSON, opts: RunOptions = None):
    """Stream the planned blocks, merge, and publish OUT with its completed manifest. A run that was
    killed or hit a disk error resumes from its journaled work when run again."""
    from . import warm
    from .execute import execute as run
    from .manifest import load_manifest
    warm.for_manifest(manifest)  # while torch loads
    m = load_manifest(manifest)
    total = m.plan.planned_expert_bytes + sum(f.size for f in m.base.files)
    with progress_bar("merge", total, as_json) as cb:
        done = run(m, output, dataclasses.replace(opts, progress=cb))
    ex = done.execution
    if as_json:
        out.print_json(data=dataclasses.asdict(ex))
    else:
        out.print(f"merged into {output} in {ex.wall_s:.2f} s: read {_size(ex.expert_bytes_read)} expert + "
                  f"{_size(ex.base_bytes_read)} base bytes, peak RSS {_size(ex.peak_rss_bytes)}, root hash {ex.root_hash}"
                  + (f" (resumed {_size(ex.resumed_bytes)} of output from an interrupted run)" if ex.resumed_bytes else ""))


@command
@flags(YamlFlags, "cuda", "copy_tokenizer", "lazy_unpickle", "allow_crimes", "out_shard_size", into="mk")
@flags(PlanOptions, "planner", "seed", "fill", "sketch", into="plan_opts")
@flags(RunOptions, "device", "force", "allow_pickle", "allow_nonfinite", "executor", "ray_address", "path_map")
def merge(config: Path = typer.Argument(..., help="mergekit YAML recipe."),
          out_path: Path = typer.Argument(..., metavar="OUT", help="Output folder (published atomically)."),
          budget: str = typer.Option("100%", "--budget", "-b", help="Expert bytes to read: 20% or 3GiB or 500MB."),
          catalog: Optional[Path] = CATALOG, as_json: bool = JSON, opts: RunOptions = None, mk: YamlFlags = None,
          plan_opts: PlanOptions = None):
    """Plan and execute a mergekit recipe in one step, as mergekit-yaml does; the manifest is kept in OUT."""
    from .config import load_config
    from .execute import check_device, execute as run
    from .plan import plan_merge
    mk.check()
    if mk.cuda and not opts.device.startswith("cuda"):
        if opts.device != "cpu":
            raise MergepipeError(f"--cuda and --device {opts.device} disagree: give one")
        opts = dataclasses.replace(opts, device="cuda")
    check_device(opts.device)  # before planning: a missing GPU is known without reading anything
    cfg = load_config(config)
    plan_opts = dataclasses.replace(plan_opts, allow_pickle=opts.allow_pickle, allow_nonfinite=opts.allow_nonfinite)
    with progress_bar("index", _unindexed_bytes(cfg), as_json) as cb:
        m = plan_merge(cfg, budget, _catalog(catalog), dataclasses.replace(plan_opts, progress=cb))
    _notes(cfg)
    total = m.plan.planned_expert_bytes + sum(f.size for f in m.base.files)
    with progress_bar("merge", total, as_json) as cb:
        done = run(m, out_path, dataclasses.replace(opts, progress=cb))
    ex, bound = done.execution, done.plan.certificate.bound
    if as_json:
        out.print_json(data={"output": str(out_path), "operator": done.operator.name, "budget_bytes": done.budget.bytes,
                             "expert_bytes_read": ex.expert_bytes_read, "certificate": bound,
                             "root_hash": ex.root_hash})
    else:
        out.print(f"merged {done.operator.name} into {out_path} in {ex.wall_s:.2f} s: read "
                  f"{_size(ex.expert_bytes_read)} of {_size(done.budget.expert_bytes_total)} expert bytes, error bound "
                  f"{'n/a' if bound is None else format(bound, '.4g')}, root hash {ex.root_hash}")


def _notes(cfg) -> None:
    """One line on stderr for what mergepipe reads differently from mergekit (never an error)."""
    from .config import dtype_note
    note = dtype_note(cfg)
    if note:
        err.print(f"[yellow]note:[/] {note}", highlight=False, soft_wrap=True)


@command
@flags(RunOptions, "device", "force", "executor", "ray_address", "path_map")
def continual(config: Path = typer.Argument(..., help="mergekit YAML with merge_method gcwm; models in arrival order."),
              output: Path = typer.Option(..., "-o", "--output", help="Folder for step-01, step-02, ... (and anchors/)."),
              mode: str = typer.Option("all_history", "--mode", help="all_history or current_anchor."),
              budget: str = typer.Option("100%", "--budget", "-b", help="Expert bytes each step may read."),
              anchor_weight: float = typer.Option(1.0, "--anchor-weight", help="current_anchor: the previous merge's weight."),
              catalog: Optional[Path] = CATALOG, as_json: bool = JSON, opts: RunOptions = None):
    """Merge experts one at a time with GCWM; publish every step with its own manifest."""
    from .config import load_config
    from .continual import continual as run
    steps = run(load_config(config), output, mode, budget, _catalog(catalog), anchor_weight, opts,
                log=None if as_json else out.print)
    if as_json:
        out.print_json(data=[{"step": s.step, "output": str(s.output), "root_hash": s.manifest.execution.root_hash,
                              "anchor_root_hash": s.anchor.execution.root_hash if s.anchor else None}
                             for s in steps])


@command
@flags(RunOptions, "device", "root", "allow_pickle")
def verify(manifest: Path = typer.Argument(..., help="A plan manifest (with --output), a completed manifest, "
                                                     "or an output folder."),
           output: Optional[Path] = typer.Option(None, "--output", "-o", help="Check this folder instead of re-executing."),
           as_json: bool = JSON, opts: RunOptions = None):
    """Re-check input hashes and the output (given, or re-executed); exit 1 on any mismatch."""
    from .verify import target, verify as run
    m, output = target(manifest, output)
    r = run(m, output, opts)
    if as_json:
        out.print_json(data={"ok": r.ok, "problems": r.problems, "inputs_checked": r.inputs_checked,
                             "outputs_checked": r.outputs_checked, "reexecuted": r.reexecuted})
    else:
        for p in r.problems:
            err.print(f"[red]mismatch:[/] {p}", highlight=False, soft_wrap=True)
        if r.ok:
            how = "re-executed and" if r.reexecuted else "checked"
            out.print(f"verified: {r.inputs_checked} input files match; {how} {r.outputs_checked} output files match")
    if not r.ok:
        raise typer.Exit(1)


@command
def explain(manifest: Path = typer.Argument(...), as_json: bool = JSON,
            top: int = typer.Option(0, "--top", help="Show only the N tensors with the most bytes planned.")):
    """What the plan reads and why: per tensor, blocks selected per expert, bytes, omitted-norm bound;
    for an executed GCWM manifest also the active experts, conflict, gate and union rank."""
    import dataclasses
    from .explain import explain_rows
    from .manifest import load_manifest
    m = load_manifest(manifest)
    rows = explain_rows(m)
    if top:
        rows = sorted(rows, key=lambda r: -r["planned_bytes"])[:top]
    if as_json:
        out.print_json(data={"operator": m.operator.name, "budget": m.budget.spec, "planner": m.plan.planner,
                             "certificate": m.plan.certificate.bound, "tensors": rows,
                             "stages": [dataclasses.asdict(st) for st in m.stages]})
        return
    t = Table(title=f"{m.operator.name} at budget {m.budget.spec} ({m.plan.planner} planner): "
                    f"{_size(m.plan.planned_expert_bytes)} of {_size(m.budget.expert_bytes_total)} expert bytes")
    gcwm_cols = any((r["diagnostics"] or {}).get("form") for r in rows)
    featcal_col = any("featcal" in (r["diagnostics"] or {}) for r in rows)
    cols = ["tensor", "blocks", "selected per expert (of candidates)", "bytes", "omitted bound"]
    cols += ["active experts", "conflict", "gate", "union rank", "solver"] if gcwm_cols else []
    cols += ["featcal: experts, rel. change"] if featcal_col else []
    for col in cols:
        t.add_column(col, justify="left" if col == "tensor" else "right")
    for r in rows:
        sel = " ".join(f"{s}/{c}" for s, c in zip(r["selected"], r["candidates"]))
        bound = "-" if r["bound"] is None else f"{r['bound']:.3g}"
        cells = [r["tensor"], str(r["blocks"]), sel, _size(r["planned_bytes"]), bound]
        d = r["diagnostics"] or {}
        if gcwm_cols:
            cells += [",".join(map(str, d.get("experts", []))) or "-",
                      *(f"{d[k]:.3f}" if d.get(k) is not None else "-" for k in ("conflict", "gate")),
                      str(d.get("union_rank", "-")), str(d.get("form", "-"))]
        if featcal_col:
            f = d.get("featcal")
            cells.append(f"{','.join(map(str, f['experts']))}: {f['rel_change']:.3g}" if f else "-")
        t.add_row(*cells)
    out.print(t)
    c = m.plan.certificate
    out.print(f"certificate ({c.kind}): {'n/a' if c.bound is None else format(c.bound, '.4g')}: {c.note}")
    from . import stages
    for st in m.stages:
        module = stages.get(st.kind)
        out.print(f"stage {st.kind}: {module.describe(module.load(st.record, st.kind, len(m.experts)))}")


@command
def demo(folder: Optional[Path] = typer.Option(None, "--dir", help="Where to build the demo family (default: cache)."),
         budgets: str = typer.Option("100,50,20,10,5", "--budgets", help="Comma-separated budget percentages."),
         device: str = FLAGS["device"][1], as_json: bool = JSON):
    """Build a small family, then plan -> execute -> verify at several budgets and print a table."""
    from .demo import run_demo
    rows = run_demo(folder, [float(b) for b in budgets.split(",")], device, log=None if as_json else out.print)
    if as_json:
        out.print_json(data=rows)
        return
    t = Table(title="mergepipe demo: task arithmetic on a 4-expert family, budget sweep")
    for col in ("budget", "expert bytes read", "% of expert bytes", "deviation ||M_A - M||_F", "bound", "verify", "time"):
        t.add_column(col, justify="right")
    for r in rows:
        t.add_row(r["budget"], _size(r["expert_bytes_read"]), f"{r['read_pct']:.1f}%", f"{r['deviation']:.4g}",
                  f"{r['bound']:.4g}", "ok" if r["verified"] else "FAILED", f"{r['seconds']:.2f} s")
    out.print(t)


def _unindexed_bytes(cfg) -> int:
    """An upper bound for the progress bar: what indexing would read if nothing were cached."""
    from .checkpoint import open_model
    try:
        return sum(fh.size for ref in [cfg.base, *cfg.experts] for fh in open_model(ref).files)
    except MergepipeError:
        return 0  # plan_merge reports the problem


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def main() -> None:
    """Run one command and leave. What a command writes is closed and published before it returns,
    and tearing down the interpreter (torch, thread pools, freed memory) costs a visible share of a
    short merge, so a finished command exits at once; Ray's driver is left to shut down its own way."""
    try:
        app()
    except SystemExit as e:
        if "ray" in sys.modules:
            raise
        code = e.code
        if isinstance(code, str):
            print(code, file=sys.stderr)
            code = 1
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code or 0)


if __name__ == "__main__":
    main()
