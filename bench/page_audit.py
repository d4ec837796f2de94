"""Cold-cache page audit of budgeted executions: which pages of the expert files (sidecars
included) one run brings into the page cache, against the pages its own planned reads touch.

    python -m bench.page_audit MANIFEST [MANIFEST ...] [--out bench/results/page-audit]

For each manifest: drop the page cache (needs root), execute it in this process with every
Reader.read logged, then read the page cache's residency of each expert file (mincore). "cached"
is the OS's count of what the run read of the experts; "touched" the pages its logged reads span
(the plan rounded to pages); "counted" the bytes the manifest's execution reports. Pages cached
but not touched are reads outside the plan (headers, read-ahead). Writes page-audit.md/json.
"""

from __future__ import annotations

import argparse
import json
import mmap
import tempfile
from collections import defaultdict
from pathlib import Path

from bench.measure import can_drop_caches, drop_caches, resident_pages

PAGE = mmap.PAGESIZE


def audit(manifest: Path, out: Path) -> dict:
    from mergepipe import checkpoint
    from mergepipe.execute import execute
    from mergepipe.manifest import load_manifest
    m = load_manifest(manifest)
    log: dict[str, list[tuple[int, int]]] = defaultdict(list)
    read = checkpoint.Reader.read

    def logged(self, path, start, end):
        log[str(path)].append((start, end))
        return read(self, path, start, end)
    checkpoint.Reader.read = logged
    try:
        drop_caches()
        done = execute(m, out, force=True)
    finally:
        checkpoint.Reader.read = read
    files = []
    for e in m.experts:
        if e.ref == m.base.ref:  # the base listed among the models (linear): not expert bytes
            continue
        files += [str(Path(e.ref) / f.name) for f in e.files] + ([e.sketch.path] if e.sketch else [])
    cached = touched = outside = 0
    for f in files:
        res = resident_pages(f)
        want = {p for s, e in log.get(f, []) for p in range(s // PAGE, (e + PAGE - 1) // PAGE)}
        cached, touched, outside = cached + len(res), touched + len(want), outside + len(res - want)
    total = m.budget.expert_bytes_total
    return {"manifest": str(manifest), "method": m.operator.name, "expert_bytes_total": total,
            "budget_bytes": m.budget.bytes, "counted": done.execution.expert_bytes_read,
            "cached": cached * PAGE, "touched": touched * PAGE, "outside_plan": outside * PAGE}


def write(rows: list[dict], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "page-audit.json").write_text(json.dumps(rows, indent=1))
    pct = (lambda r, k: f"{r[k] / r['expert_bytes_total']:.2%}")
    lines = ["# Cold-cache page audit of budgeted executions (expert files and their sidecars)", "",
             "`python -m bench.page_audit MANIFEST ...`: page cache dropped before each run; shares of the "
             "experts' bytes. cached: pages the run brought into the cache (the OS's count); touched: pages "
             "its planned reads span; outside the plan: cached and not touched (the files' headers).", "",
             "| manifest | method | budget | counted | touched | cached | outside the plan |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {Path(r['manifest']).name} | {r['method']} | {pct(r, 'budget_bytes')} | {pct(r, 'counted')} | "
                     f"{pct(r, 'touched')} | {pct(r, 'cached')} | {r['outside_plan'] / 2**10:.0f} KiB |")
    (out / "page-audit.md").write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("manifests", nargs="+", type=Path)
    ap.add_argument("--out", type=Path, default=Path("bench/results/page-audit"))
    ap.add_argument("--keep", action="store_true", help="keep the rows of an earlier run, audit only new manifests")
    args = ap.parse_args(argv)
    if not can_drop_caches():
        raise SystemExit("the page audit drops the page cache: run it as root")
    old = args.out / "page-audit.json"
    rows = json.loads(old.read_text()) if args.keep and old.exists() else []
    done = {r["manifest"] for r in rows}
    with tempfile.TemporaryDirectory() as tmp:
        for man in args.manifests:
            if str(man) in done:
                continue
            rows.append(audit(man, Path(tmp) / "out"))
            r = rows[-1]
            print(f"{man.name}: cached {r['cached'] / r['expert_bytes_total']:.2%}, touched "
                  f"{r['touched'] / r['expert_bytes_total']:.2%}, counted {r['counted'] / r['expert_bytes_total']:.2%}",
                  flush=True)
            write(rows, args.out)  # after every manifest: a run cut short keeps what it measured


if __name__ == "__main__":
    main()
