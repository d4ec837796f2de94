"""The real family's quality table: base, every expert and task arithmetic, on every task.

Builds (or reuses) the SmolLM2 family, merges it by task arithmetic W = base + w * sum_k
(expert_k - base) in float32 from the bf16 files (saved as bf16 to <cache>/smollm2/ta-<w>),
scores every folder with real_evaluate, writes <cache>/smollm2/eval.json and prints the table.

    python -m bench.quality.real_table [cache]      # default /work/quality-cache
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .real_evaluate import evaluate
from .real_family import CACHE, build_family
from .real_tasks import TASKS

WEIGHTS = (0.3,)


def task_arithmetic(paths: dict[str, Path], weight: float, out: Path) -> Path:
    """base + weight * sum of the experts' deltas, computed in float32, saved as bf16."""
    base = {k: v.float() for k, v in load_file(paths["base"] / "model.safetensors").items()}
    merged = {k: v.clone() for k, v in base.items()}
    for name, folder in paths.items():
        if name != "base":
            for k, v in load_file(folder / "model.safetensors").items():
                merged[k] += weight * (v.float() - base[k])
    out.mkdir(parents=True, exist_ok=True)
    for f in paths["base"].iterdir():  # config, generation config, tokenizer
        if f.suffix in (".json", ".jinja") and f.name != "recipe.json":
            shutil.copy(f, out / f.name)
    save_file({k: v.to(torch.bfloat16).contiguous() for k, v in merged.items()}, out / "model.safetensors",
              metadata={"format": "pt"})
    return out


def main(cache: str | Path = CACHE) -> dict:
    torch.set_num_threads(1)
    cache = Path(cache)
    paths = build_family(cache)
    folders = dict(paths)
    for w in WEIGHTS:
        folders[f"ta-{w}"] = task_arithmetic(paths, w, cache / "smollm2" / f"ta-{w}")
    table = {}
    for name, folder in folders.items():
        t0 = time.perf_counter()
        table[name] = evaluate(folder, TASKS, cache)
        table[name]["mean"] = {m: sum(table[name][t][m] for t in TASKS) / len(TASKS)
                               for m in ("nll", "nll_noeos", "exact")}
        print(f"evaluated {name} in {time.perf_counter() - t0:.0f}s", flush=True)
    (cache / "smollm2" / "eval.json").write_text(json.dumps(table, indent=1))
    print_table(table)
    return table


def print_table(table: dict) -> None:
    cols = list(TASKS) + ["mean"]
    print(f"{'nll (nll w/o eos) / exact':22s}" + "".join(f"{c:>22s}" for c in cols))
    for name, res in table.items():
        print(f"{name:22s}" + "".join(
            f"{res[c]['nll']:7.3f} ({res[c]['nll_noeos']:5.2f}) /{res[c]['exact']:5.2f}" for c in cols))


if __name__ == "__main__":
    main(*sys.argv[1:2])
