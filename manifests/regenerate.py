"""Rebuild the example manifests in this folder: `python manifests/regenerate.py`.

Each manifest merges the seeded test family (rebuilt bit-identically by `replay_family`), records
its model paths relative to the family's parent folder, and carries the output hashes of one
execution. CI re-executes every manifest here and checks those hashes (tests/test_replay.py).
"""

from __future__ import annotations

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


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        paths = replay_family(root)
        for name in CASES:
            done = execute(plan_case(root, paths, name), root / "out" / name, root=root)
            done.save(HERE / f"{name}.json")
            print(f"{name}: root hash {done.execution.root_hash}")


if __name__ == "__main__":
    main()
