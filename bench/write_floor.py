"""How much of a budgeted merge is writing its output: the same execute, with and without the disk.

    python -m bench.write_floor MANIFEST [MANIFEST ...] [--runs 5]

Each run is a fresh process timed from outside (startup included), alternating two variants:
`disk`, the real execute; `no-disk`, the same with the O_DIRECT writes of the output discarded
after the first (which holds the header; everything else, hashing and journal included, unchanged). The difference is the part of the wall
time the output's writes are not hidden behind the rest. Warm page cache (inputs read once first).
Prints medians and writes bench/results/write_floor.json.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RUN = """
import sys
from mergepipe import sink
if sys.argv[1] == "no-disk":  # the first write holds the header, which publishing reads back
    write = sink.DirectFile._write_out
    sink.DirectFile._write_out = lambda self, buf, n, off: write(self, buf, n, off) if off == 0 else None
from mergepipe.cli import main
sys.argv = ["mergepipe", "execute", sys.argv[2], "-o", sys.argv[3]]
main()
"""


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("manifests", nargs="+", type=Path)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "write_floor.json")
    args = ap.parse_args(argv)
    results = {}
    with tempfile.TemporaryDirectory(dir=REPO / "bench") as tmp:
        out = Path(tmp) / "out"
        for manifest in args.manifests:
            times: dict[str, list[float]] = {"disk": [], "no-disk": []}
            for _ in range(args.runs):
                for variant in times:
                    shutil.rmtree(out, ignore_errors=True)
                    t = time.perf_counter()
                    subprocess.run([sys.executable, "-c", RUN, variant, str(manifest), str(out)], check=True,
                                   cwd=REPO, capture_output=True)
                    times[variant].append(round(time.perf_counter() - t, 3))
            med = {k: statistics.median(v) for k, v in times.items()}
            results[manifest.name] = {"runs": times, "median_s": med, "writes_not_hidden_s": med["disk"] - med["no-disk"]}
            print(f"{manifest.name}: disk {med['disk']:.2f} s, no-disk {med['no-disk']:.2f} s "
                  f"(output writes add {med['disk'] - med['no-disk']:.2f} s)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
