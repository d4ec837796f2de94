"""Does the certificate hold? Task arithmetic on the 0.5B bench family at every budget and fill,
the measured deviation from the full merge against the bound the plan recorded.

    python -m bench.certificate --cache DIR [--budgets 50,20,10,5] [--fills sketch,zero]

The family and TA recipe are bench.root_hashes' (base + 4 experts, weight 0.3), with the output in
float32: the bound holds in exact arithmetic before rounding to the output dtype, so a float32
output checks it to float32 rounding instead of hiding it under bfloat16's. Each budgeted output is
compared with the 100% output (||M_A - M_100||_F over every float tensor) and deleted. Writes
certificate.md and certificate.json under --out.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import yaml

from mergepipe.compare import compare
from mergepipe.config import load_config
from mergepipe.execute import execute
from mergepipe.index import Catalog
from mergepipe.plan import plan_merge

from bench.root_hashes import configs_for, family_for

REPO = Path(__file__).resolve().parent.parent
SLACK = 1e-5  # float32 rounding of the two outputs, relative to the bound


def run(cache: Path, budgets: list[str], fills: list[str], out_dir: Path) -> list[dict]:
    fam = family_for(cache)
    work = cache / "qwen05b" / "certificate"
    work.mkdir(parents=True, exist_ok=True)
    recipe = yaml.safe_load(configs_for(cache, fam)["ta"].read_text())
    recipe["out_dtype"] = "float32"
    cfg = work / "ta-f32.yml"
    cfg.write_text(yaml.safe_dump(recipe, sort_keys=False))
    config, catalog = load_config(cfg), Catalog(cache / "qwen05b" / "catalog.sqlite")
    full = work / "full"
    execute(plan_merge(config, "100%", catalog), full, force=True)
    rows = []
    for fill in fills:
        for budget in budgets:
            m = plan_merge(config, budget, catalog, fill=fill)
            out = work / "out"
            t0 = time.perf_counter()
            done = execute(m, out, force=True)
            wall = time.perf_counter() - t0
            dev = compare(out, full).frobenius
            bound = m.plan.certificate.bound
            rows.append({"budget": budget, "fill": fill, "deviation": dev, "bound": bound,
                         "holds": dev <= bound * (1 + SLACK), "expert_bytes_read": done.execution.expert_bytes_read,
                         "execute_s": round(wall, 2)})
            print(rows[-1], flush=True)
            shutil.rmtree(out)
    shutil.rmtree(full)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "certificate.json").write_text(json.dumps(rows, indent=2))
    lines = ["# Certificate on the 0.5B bench family", "",
             "`python -m bench.certificate`: task arithmetic (4 experts, weight 0.3), float32 output; deviation = "
             "||M_A - M_100%||_F over every float tensor, bound = the plan's recorded certificate.", "",
             "| fill | budget | deviation | bound | deviation / bound | holds | expert bytes read |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['fill']} | {r['budget']} | {r['deviation']:.4f} | {r['bound']:.4f} | "
              f"{r['deviation'] / r['bound']:.3f} | {'yes' if r['holds'] else '**no**'} | "
              f"{r['expert_bytes_read'] / 2**20:.1f} MiB |" for r in rows]
    (out_dir / "certificate.md").write_text("\n".join(lines) + "\n")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cache", type=Path, required=True)
    ap.add_argument("--budgets", default="50,20,10,5")
    ap.add_argument("--fills", default="sketch,zero")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    args = ap.parse_args()
    rows = run(args.cache, [f"{b}%" for b in args.budgets.split(",")], args.fills.split(","), args.out)
    raise SystemExit(0 if all(r["holds"] for r in rows) else 1)


if __name__ == "__main__":
    main()
