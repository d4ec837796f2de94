"""One value for the run flags, from the CLI down to the workers: nothing passes them one by one."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable


@dataclass(frozen=True)
class RunOptions:
    device: str = "cpu"  # cpu, cuda or cuda:N
    force: bool = False  # replace an existing output folder
    root: str | Path | None = None  # folder that relative model paths in a manifest start from
    allow_pickle: bool = False  # load pickled .bin checkpoints (with weights_only)
    allow_nonfinite: bool = False  # merge inputs that hold NaN or Inf (a plan that allowed them always does)
    progress: Callable[[int], None] | None = None  # bytes just read

    @property
    def root_path(self) -> Path | None:
        return Path(self.root) if self.root else None


@dataclass(frozen=True)
class PlanOptions:
    planner: str = "score"  # or "random", a control with the same budget
    seed: int = 0  # of the random planner
    relative_to: str | Path | None = None  # record local model paths relative to this folder
    allow_pickle: bool = False
    allow_nonfinite: bool = False  # merge inputs that hold NaN or Inf (recorded in the plan)
    progress: Callable[[int], None] | None = None  # bytes indexed
    source: str = "<config>"  # where the config came from, for error messages
    fill: str = "sketch"  # what an unread expert block counts as: its sketch from the index, or "zero"
    sketch: str = "q2"  # the sketch kind (mergepipe.sketch.KINDS), at its default parameters
