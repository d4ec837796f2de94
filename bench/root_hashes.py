"""Output root hashes of the 0.5B bench family: proof that a change left every output byte as it was.

    python -m bench.root_hashes --cache DIR [--record FILE | --check FILE]

Builds (or reuses) the family bench/core.py builds for `--shape qwen05b` (base + 4 experts, bf16,
3 shards, seed 0) under DIR/qwen05b/family, writes the same mergekit YAML that core.py writes for TA
and TIES (weight 0.3 each, TIES density 0.2, dtype float32, out_dtype bfloat16), indexes the family
into a fresh catalog DIR/qwen05b/catalog.sqlite, then plans and executes on CPU, through the library
API only, three jobs: TA at 100%, TA at 20%, TIES at 100%. Each output's root hash (a hash of every
output file's hash) is read from the completed manifest and the output folder deleted (~1.2 GiB each).

--record FILE writes {job: root_hash} as JSON; --check FILE compares against such a file, prints each
job's hash and whether it matches, and exits 1 on any difference. With neither, it only prints.
Run it from the checkout to be tested (cwd and PYTHONPATH), so that `mergepipe` is that checkout's.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import torch
import yaml

import mergepipe
from mergepipe.config import load_config
from mergepipe.execute import execute
from mergepipe.index import Catalog
from mergepipe.plan import plan_merge
from mergepipe.synth import QWEN25_05B, build_family

from bench.core import mergekit_yaml

EXPERTS, SHARDS, WEIGHT, DENSITY = 4, 3, 0.3, 0.2   # bench/core.py's EXPERTS, SHARDS and defaults

JOBS = {"ta-100": ("ta", "100%"), "ta-20": ("ta", "20%"), "ties-100": ("ties", "100%")}


def family_for(cache: Path) -> dict[str, Path]:
    """The 0.5B bench family under CACHE/qwen05b/family (the layout of `bench.core --cache DIR`)."""
    t0 = time.perf_counter()
    fam = build_family(cache / "qwen05b" / "family", QWEN25_05B, experts=EXPERTS, seed=0, dtype=torch.bfloat16,
                       shards=SHARDS)
    print(f"family at {cache / 'qwen05b' / 'family'}: {time.perf_counter() - t0:.1f} s", flush=True)
    return fam


def configs_for(cache: Path, fam: dict[str, Path]) -> dict[str, Path]:
    """bench.core's TA and TIES configs for the family."""
    base, experts = fam["base"], [fam[f"expert{k}"] for k in range(1, EXPERTS + 1)]
    configs = {}
    for method in ("ta", "ties"):
        configs[method] = cache / "qwen05b" / "root-hashes" / f"{method}.yml"
        configs[method].parent.mkdir(parents=True, exist_ok=True)
        configs[method].write_text(yaml.safe_dump(mergekit_yaml(base, experts, method, WEIGHT, DENSITY), sort_keys=False))
    return configs


def root_hashes(cache: Path) -> dict[str, str]:
    work = cache / "qwen05b"
    configs = configs_for(cache, family_for(cache))

    # A fresh catalog, so that indexing is part of what is checked (the first plan indexes the family).
    cat_path = work / "catalog.sqlite"
    for suffix in ("", "-wal", "-shm"):
        Path(f"{cat_path}{suffix}").unlink(missing_ok=True)
    catalog = Catalog(cat_path)

    hashes = {}
    for job, (method, budget) in JOBS.items():
        out = work / "root-hashes" / f"out-{job}"
        shutil.rmtree(out, ignore_errors=True)     # left over from an interrupted run
        t0 = time.perf_counter()
        manifest = plan_merge(load_config(configs[method]), budget, catalog, fill="zero")  # as before sketches
        t1 = time.perf_counter()
        done = execute(manifest, out)              # CPU is execute's default device
        hashes[job] = done.execution.root_hash
        shutil.rmtree(out)
        print(f"{job}: {hashes[job]}  (plan {t1 - t0:.1f} s, execute {time.perf_counter() - t1:.1f} s)",
              flush=True)
    return hashes


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cache", type=Path, required=True, help="family, catalog and (transient) outputs")
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--record", type=Path, help="write {job: root_hash} to this JSON file")
    mode.add_argument("--check", type=Path, help="compare with this JSON file; exit 1 on any difference")
    ap.add_argument("--keep-negative-zero", action="store_true",
                    help="copy unread base blocks bit for bit, as before the fix that gives mergekit's base + 0 "
                         "(-0.0 becomes +0.0): isolates that fix from any other change of output bytes")
    args = ap.parse_args(argv)

    expected = json.loads(args.check.read_text()) if args.check else None   # fail early if unreadable
    print(f"mergepipe from {Path(mergepipe.__file__).parent}", flush=True)
    if args.keep_negative_zero:
        from mergepipe import operators
        operators.Operator.passthrough = lambda self, block: block.base_copy()
    hashes = root_hashes(args.cache)

    if args.record:
        args.record.parent.mkdir(parents=True, exist_ok=True)
        args.record.write_text(json.dumps(hashes, indent=2) + "\n")
        print(f"recorded {args.record}")
    if expected is None:
        return 0
    ok = True
    for job in sorted(set(hashes) | set(expected)):
        got, want = hashes.get(job), expected.get(job)
        same = got == want
        ok &= same
        verdict = "matches" if same else f"DIFFERS (recorded {want})" if want else "DIFFERS (not recorded)"
        print(f"{job:9s} {got or '(not run)'}  {verdict}")
    print("all match" if ok else "MISMATCH")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
