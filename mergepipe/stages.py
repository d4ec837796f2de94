"""Stages: steps that run after the merge, into the same staging folder, before the output is
published (FeatCal). A stage is a module with:

- `parse(section, experts, where) -> section`: its config section, checked (the YAML key is its kind);
- `plan(section, base, experts, relative_to) -> record`: a dataclass the manifest keeps;
- `load(doc, where, experts) -> record`: that record from a manifest, validated;
- `input_problems(record, base_root, root) -> list[str]`: what no longer matches its recorded inputs;
- `run(record, context) -> StageResult`: the stage itself, over the merged files in the staging folder;
- `describe(record) -> str`: one line for `mergepipe explain`.

The driver calls these and nothing else; stages never call the driver.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import MergepipeError

# kind -> module. Imported on first use: FeatCal needs torch and transformers.
KINDS = {"featcal": "mergepipe.featcal.stage"}
CONFIG_KEYS = {"calibrate": "featcal"}  # the YAML key of each stage's section


def get(kind: str, where: str = "stage"):
    module = KINDS.get(kind)
    if module is None:
        raise MergepipeError(f"{where}: stage kind {kind!r} is not supported (expected one of {', '.join(sorted(KINDS))})")
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise MergepipeError(f"{where}: the {kind} stage needs {e.name} (pip install 'mergepipe[{kind}]')") from None


@dataclass
class StageContext:
    """What a stage may use: the opened inputs, the staging folder holding the merged output (whose
    files it may rewrite in place), a byte-counting reader, and the run's device and options."""
    base: Any  # checkpoint.Model
    experts: list
    folder: Path
    reader: Any  # checkpoint.Reader
    device: str
    root: Path | None


@dataclass
class StageResult:
    diagnostics: dict[str, dict] = field(default_factory=dict)  # per tensor, merged into the manifest's
