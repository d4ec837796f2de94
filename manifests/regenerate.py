"""Rebuild the example manifests in this folder: `python manifests/regenerate.py`.

Each manifest merges the seeded test family (rebuilt bit-identically by `replay_family`), records
its model paths relative to the family's parent folder, and carries the output hashes of one
execution. CI re-executes every manifest here and checks those hashes (tests/test_replay.py).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import random
import sys
import tempfile
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from mergepipe.config import load_config  # noqa: E402
from mergepipe.demo import demo_config  # noqa: E402
from mergepipe.execute import execute  # noqa: E402
from mergepipe.checkpoint import open_model  # noqa: E402
from mergepipe.index import Catalog, index_family  # noqa: E402
from mergepipe.options import PlanOptions  # noqa: E402
from mergepipe.sketch import SketchSpec  # noqa: E402
from mergepipe.plan import plan_merge  # noqa: E402
from mergepipe.synth import TINY, build_family  # noqa: E402

# block order and the reference's defaults: the manifest predates module order (its record has no
# `order`, which means block) and its 39 tokens per expert predate the token check
CALIB = {"data": "calib.jsonl", "parameters": {"samples": 4, "seq_len": 16, "batch_size": 2, "order": "block",
                                               "allow_underdetermined": True}}
CASES = {  # name: (method, per-model parameters, shared parameters, budget, calibrate section)
    "ta-100": ("task_arithmetic", {}, {}, "100%", None),
    "ta-20": ("task_arithmetic", {}, {}, "20%", None),
    "ta-20-zero": ("task_arithmetic", {}, {}, "20%", None),  # unread blocks as zero deltas: the control
    "ties-100": ("ties", {"density": 0.2}, {}, "100%", None),
    "ties-50": ("ties", {"density": 0.2}, {}, "50%", None),
    "gcwm-100": ("gcwm", {}, {"inner_steps": 20}, "100%", None),
    "gcwm-60-exact": ("gcwm", {}, {"solver": "exact"}, "60%", None),
    "ta-featcal": ("task_arithmetic", {}, {}, "100%", CALIB),
}


def blas_bound(name: str) -> bool:
    """Whether the case's bits go through BLAS / LAPACK (GCWM's factorisations, FeatCal's solves),
    whose kernels MKL picks per CPU model: such a manifest replays bit for bit on the CPU it was
    recorded on. Task arithmetic and TIES are elementwise and replay anywhere."""
    method, _, _, _, calibrate = CASES[name]
    return method == "gcwm" or calibrate is not None


def numeric_identity() -> dict:
    """What BLAS-bound bits depend on: the CPU (vendor, family, model, vector extensions) and the
    torch build (with its MKL) and the kernels it dispatches to."""
    import hashlib
    import platform

    import torch
    info: dict[str, str] = {}
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key.strip() in ("vendor_id", "cpu family", "model", "flags") and key.strip() not in info:
                info[key.strip()] = value.strip()
    simd = sorted(f for f in info.pop("flags", "").split() if f.startswith(("avx", "amx", "sse", "fma", "f16c")))
    return {"machine": platform.machine(), **info, "simd": hashlib.sha256(" ".join(simd).encode()).hexdigest()[:16],
            "torch": torch.__version__, "cpu_capability": torch.backends.cpu.get_cpu_capability()}


IDENTITY = HERE / "blas-identity.json"  # the numeric identity the BLAS-bound cases were recorded on


def replay_family(root: Path) -> dict[str, Path]:
    """The seeded family, its index with the default sketch (the budgeted manifests read the sidecars
    under root/sketches), and the calibration data of the FeatCal manifest (token ids, seeded)."""
    rng = random.Random(7)
    lines = [json.dumps({"input_ids": [rng.randrange(TINY.vocab) for _ in range(rng.randrange(3, 20))]})
             for _ in range(4)]
    (root / "calib.jsonl").write_text("\n".join(lines) + "\n")
    paths = build_family(root / "family", TINY, experts=3, seed=7, shards=2)
    experts = [open_model(p) for name, p in sorted(paths.items()) if name != "base"]
    index_family(open_model(paths["base"]), experts, Catalog(root / "catalog.sqlite"), sketch=SketchSpec.make(PlanOptions.sketch))
    return paths


def plan_case(root: Path, paths: dict[str, Path], name: str):
    """The manifest of case `name`, planned on the family under root (not executed)."""
    method, params, shared, budget, calibrate = CASES[name]
    cfg = demo_config(paths, method, **shared)
    for m in cfg["models"]:
        m["parameters"].update(params)
    if calibrate:
        cfg["calibrate"] = {**calibrate, "data": str(root / calibrate["data"])}
    (root / f"{name}.yml").write_text(yaml.safe_dump(cfg))
    fill = "zero" if name.endswith("-zero") else "sketch"
    return plan_merge(load_config(root / f"{name}.yml"), budget, Catalog(root / "catalog.sqlite"),
                      relative_to=root, fill=fill)


def _portable(m, root: Path):
    """The manifest with its recipe's paths relative to the family's folder, as its model references are."""
    if m.recipe is None:
        return m
    text, source = (s.replace(str(root), ".") for s in (m.recipe.text, m.recipe.source))
    return dataclasses.replace(m, recipe=dataclasses.replace(m.recipe, text=text, source=source))


def main(argv: list[str]) -> None:
    """Every case, or the cases named (`python manifests/regenerate.py gcwm-100 ta-featcal`)."""
    names = argv or list(CASES)
    bound = [n for n in CASES if blas_bound(n)]
    if any(n in bound for n in names) and not set(bound) <= set(names):
        raise SystemExit(f"regenerate the BLAS-bound cases together ({', '.join(bound)}): they share {IDENTITY.name}")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        paths = replay_family(root)
        for name in names:
            done = execute(plan_case(root, paths, name), root / "out" / name, root=root)
            _portable(done, root).save(HERE / f"{name}.json")
            print(f"{name}: root hash {done.execution.root_hash}")
    if set(bound) <= set(names):
        IDENTITY.write_text(json.dumps(numeric_identity(), indent=1) + "\n")


if __name__ == "__main__":
    main(sys.argv[1:])
