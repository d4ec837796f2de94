"""Reference computations the tests compare against, written independently of mergepipe."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file


def load_all(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def reference_ta(family: dict[str, Path], weights: list[float], out_dtype=torch.bfloat16) -> dict[str, torch.Tensor]:
    base = load_all(family["base"])
    experts = [load_all(family[f"expert{k + 1}"]) for k in range(len(weights))]
    out = {}
    for name, b in base.items():
        d = torch.stack([e[name].float() - b.float() for e in experts])
        d *= torch.tensor(weights).view(-1, *([1] * b.dim()))
        out[name] = (b.float() + d.sum(0)).to(out_dtype)
    return out


def calibration(m):
    """The FeatCal stage's record of a manifest."""
    from mergepipe.featcal import stage
    (st,) = [s for s in m.stages if s.kind == "featcal"]
    return stage.load(st.record, "stage", len(m.experts))
