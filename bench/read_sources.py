"""Where a cold budgeted execute's disk reads come from: the process's /proc read_bytes, set against
the pages each file gained in the page cache during the run (mincore before and after).

    python -m bench.read_sources MANIFEST [MANIFEST ...] [--roots DIR ...] [--out bench/results/read-sources]

Per manifest: evict the model files the manifest names (experts, sidecars, base: fsync and
FADV_DONTNEED, as bench.methods' cold run does), snapshot the residency of every file under the
roots (the model folders, this checkout, the Python environment, by default), execute it in a child
process, snapshot again. A file that gained pages was read by the run (or by read-ahead for it); the
output folder is left out (its pages are written, not read). Writes read-sources.md/json.
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import sys
import sysconfig
from collections import defaultdict
from pathlib import Path

from bench.measure import evict, resident_pages, run_measured

PAGE = mmap.PAGESIZE


def snapshot(roots: list[Path]) -> dict[str, int]:
    """Resident pages per regular file under the roots."""
    out = {}
    for root in roots:
        for dirpath, _, names in os.walk(root):
            for name in names:
                p = os.path.join(dirpath, name)
                if os.path.isfile(p) and not os.path.islink(p):
                    try:
                        out[p] = len(resident_pages(p))
                    except OSError:
                        pass
    return out


def model_files(doc: dict) -> list[Path]:
    files = [Path(m["ref"]) / f["name"] for m in [doc["base"], *doc["experts"]] for f in m["files"]]
    return files + [Path(e["sketch"]["path"]) for e in doc["experts"] if e.get("sketch")]


def group(path: str, doc: dict) -> str:
    # the base first: a recipe that lists the base among its models (linear) reads it as an input too
    if path.startswith(str(Path(doc["base"]["ref"])) + "/"):
        return "base files"
    if any(path.startswith(str(Path(e["ref"])) + "/") for e in doc["experts"]) or path in {
            e["sketch"]["path"] for e in doc["experts"] if e.get("sketch")}:
        return "expert files and sidecars"
    if "site-packages/" in path:
        return "python packages (" + path.split("site-packages/")[-1].split("/")[0] + ")"
    if path.startswith(sysconfig.get_paths()["stdlib"]):
        return "python standard library"
    return "other: " + path


def audit(manifest: Path, out: Path, roots: list[Path]) -> dict:
    doc = json.loads(manifest.read_text())
    models = model_files(doc)
    scan = roots + sorted({p.parent for p in models})
    if not evict(models):
        raise SystemExit("the model files' pages could not be evicted (mapped by another process?)")
    before = snapshot(scan)
    r = run_measured([sys.executable, "-m", "mergepipe.cli", "execute", str(manifest), "-o", str(out), "--force"])
    if r.returncode:
        raise SystemExit(f"execute failed: {r.stderr_tail}")
    after = snapshot(scan)
    gained: dict[str, int] = defaultdict(int)
    files: dict[str, int] = {}
    for p, n in after.items():
        extra = (n - before.get(p, 0)) * PAGE
        if extra > 0 and not p.startswith(str(out)):
            gained[group(p, doc)] += extra
            files[p] = extra
    done = json.loads((out / "mergepipe.manifest.json").read_text())
    return {"manifest": str(manifest), "read_bytes": r.read_bytes, "gained": dict(gained),
            "gained_total": sum(gained.values()), "expert_bytes_total": done["budget"]["expert_bytes_total"],
            "expert_bytes_counted": done["execution"]["expert_bytes_read"],
            "largest": sorted(files.items(), key=lambda kv: -kv[1])[:15]}


def table(rows: list[dict]) -> str:
    lines = ["| manifest | /proc read_bytes | pages gained, all files | not attributed | by source (bytes, % of the expert bytes) |",
             "|---|---|---|---|---|"]
    for r in rows:
        total = r["expert_bytes_total"]
        parts = "; ".join(f"{k} {v:,} ({100 * v / total:.3f}%)" for k, v in sorted(r["gained"].items(), key=lambda kv: -kv[1]))
        rest = r["read_bytes"] - r["gained_total"]
        lines.append(f"| {Path(r['manifest']).name} | {r['read_bytes']:,} | {r['gained_total']:,} | {rest:,} "
                     f"({100 * rest / total:.3f}%) | {parts} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("manifests", nargs="+", type=Path)
    ap.add_argument("--roots", nargs="*", type=Path,
                    default=[Path(__file__).resolve().parents[1] / "mergepipe", Path(sysconfig.get_paths()["purelib"]),
                             Path(sysconfig.get_paths()["stdlib"])])
    ap.add_argument("--work", type=Path, default=Path("/tmp/read-sources"))
    ap.add_argument("--out", type=Path, default=Path("bench/results/read-sources"))
    args = ap.parse_args(argv)
    rows = []
    for m in args.manifests:
        rows.append(audit(m, args.work / m.stem, args.roots))
        print(json.dumps(rows[-1]), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "read-sources.json").write_text(json.dumps(rows, indent=1))
    (args.out / "read-sources.md").write_text("# Where a cold 20% execute's disk reads come from\n\n" + table(rows) + "\n")
    print(table(rows))


if __name__ == "__main__":
    main()
