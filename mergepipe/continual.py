"""Continual GCWM: experts arrive one at a time and every step publishes a merged checkpoint with its
own replayable manifest, in OUT/step-01, OUT/step-02, ...

The two schedules of the reference implementation (wyy-code/GCWM, step decay 1), with
M_t the unscaled merge after step t and gamma the config's lambda:
- all_history:    M_t = GCWM(Delta_1 .. Delta_t); step t is W0 + gamma * M_t, one GCWM manifest.
- current_anchor: M_1 = Delta_1 (GCWM of one task); M_t = GCWM(M_{t-1}, Delta_t) with weights
                  (anchor_weight, w_t). M_t must stay unscaled and precise (a bf16 W0 + gamma * M_t
                  would lose most of it), so it is published as a float32 anchor checkpoint
                  W0 + M_t in OUT/anchors/step-t (a GCWM manifest with lambda 1), and step t is the
                  task-arithmetic manifest W0 + gamma * (anchor_t - W0) in the config's dtype.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable

from .config import MergeConfig
from .errors import MergepipeError
from .execute import execute
from .index import Catalog
from .manifest import Manifest
from .options import RunOptions
from .plan import plan_merge

MODES = ("all_history", "current_anchor")


@dataclasses.dataclass
class Step:
    step: int
    output: Path
    manifest: Manifest
    anchor: Manifest | None = None  # current_anchor: the float32 GCWM merge this step's output scales


def continual(config: MergeConfig, out: str | Path, mode: str = "all_history", budget: str = "100%",
              catalog: Catalog | None = None, anchor_weight: float = 1.0, options: RunOptions | None = None,
              log: Callable[[str], None] | None = None) -> list[Step]:
    """Options (device, force) as a RunOptions; each step is executed with force."""
    opts = options or RunOptions()
    if not config.operator.continual:
        raise MergepipeError(f"{config.source}: continual mode merges with gcwm (merge_method is {config.method!r})")
    if mode not in MODES:
        raise MergepipeError(f"continual mode {mode!r} is not known (expected {' or '.join(MODES)})")
    if mode == "current_anchor" and len(config.experts) < 2:
        raise MergepipeError(f"{config.source}: current_anchor mode needs at least two experts (got "
                             f"{len(config.experts)}): from step 2 on, each step merges the previous anchor with a new expert")
    if not (anchor_weight >= 0 and anchor_weight != float("inf")):
        raise MergepipeError(f"anchor weight {anchor_weight!r} must be a finite number >= 0")
    out = Path(out).resolve()
    if out.exists() and not opts.force:
        raise MergepipeError(f"{out}: output folder exists (pass --force to replace it)")
    catalog = catalog or Catalog()
    run = dataclasses.replace(opts, force=True)
    say = log or (lambda _: None)
    steps = []
    for t in range(1, len(config.experts) + 1):
        folder = out / f"step-{t:02d}"
        if mode == "all_history" or t == 1:
            # step 1 of current_anchor is the same one-task merge: gamma * Delta_1
            cfg = dataclasses.replace(config, experts=config.experts[:t], expert_params=config.expert_params[:t])
            done = execute(plan_merge(cfg, budget, catalog), folder, run)
            steps.append(Step(t, folder, done))
        else:
            prev = config.experts[0] if t == 2 else str(out / "anchors" / f"step-{t - 1:02d}")
            anchor_cfg = dataclasses.replace(
                config, experts=[prev, config.experts[t - 1]], out_dtype="F32",
                params={**config.params, "lambda": 1.0},
                expert_params=[{"weight": anchor_weight}, config.expert_params[t - 1]])
            anchor_dir = out / "anchors" / f"step-{t:02d}"
            anchor = execute(plan_merge(anchor_cfg, budget, catalog), anchor_dir, run)
            scale_cfg = MergeConfig("task_arithmetic", config.base, [str(anchor_dir)], {"lambda": 1.0, "normalize": False},
                                    [{"weight": config.params["lambda"]}], config.out_dtype, config.source)
            done = execute(plan_merge(scale_cfg, "100%", catalog), folder, run)
            steps.append(Step(t, folder, done, anchor))
        say(f"step {t}: {folder} (root hash {steps[-1].manifest.execution.root_hash})")
    return steps
