"""`mergepipe demo`: a small seeded family, then plan -> execute -> verify at several budgets."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

import yaml

from .compare import compare
from .config import load_config
from .execute import execute
from .index import Catalog
from .paths import cache_dir
from .plan import plan_merge
from .synth import DEMO, build_family
from .verify import verify

WEIGHT = 0.3


def demo_config(paths: dict[str, Path], method: str = "task_arithmetic", **shared) -> dict:
    experts = [k for k in paths if k != "base"]
    cfg = {"merge_method": method, "base_model": str(paths["base"]),
           "models": [{"model": str(paths[k]), "parameters": {"weight": WEIGHT}} for k in experts],
           "dtype": "float32", "out_dtype": "bfloat16"}
    if shared:
        cfg["parameters"] = shared
    return cfg


def run_demo(folder: Path | None, budgets: list[float], device: str = "cpu",
             log: Callable[[str], None] | None = None) -> list[dict]:
    root = Path(folder) if folder else cache_dir() / "demo"
    say = log or (lambda _: None)
    say(f"building the demo family (base + 4 experts, {DEMO.layers}-layer Qwen2 shape) in {root / 'family'}")
    paths = build_family(root / "family", DEMO, experts=4, seed=0, shards=2)
    cfg_path = root / "ta.yml"
    cfg_path.write_text(yaml.safe_dump(demo_config(paths), sort_keys=False))
    catalog = Catalog(root / "catalog.sqlite")
    cfg = load_config(cfg_path)
    rows, full = [], None
    for pct in sorted(budgets, reverse=True):
        t0 = time.perf_counter()
        m = plan_merge(cfg, f"{pct:g}%", catalog)
        manifest = root / "manifests" / f"ta-{pct:g}.json"
        manifest.parent.mkdir(parents=True, exist_ok=True)
        m.save(manifest)
        out = root / "outputs" / f"ta-{pct:g}"
        done = execute(m, out, device=device, force=True)
        ok = verify(done, output=out).ok
        seconds = time.perf_counter() - t0
        if full is None:
            full = out
        dev = compare(out, full).frobenius
        ex = done.execution
        rows.append({"budget": f"{pct:g}%", "expert_bytes_read": ex.expert_bytes_read,
                     "read_pct": 100 * ex.expert_bytes_read / m.budget.expert_bytes_total,
                     "deviation": dev, "bound": m.plan.certificate.bound, "verified": ok,
                     "seconds": seconds, "manifest": str(manifest), "output": str(out)})
        say(f"  {pct:g}%: read {ex.expert_bytes_read} expert bytes, deviation {dev:.4g} <= bound "
            f"{m.plan.certificate.bound:.4g}, verify {'ok' if ok else 'FAILED'}")
    return rows
