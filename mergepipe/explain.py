"""What a plan reads and why, per tensor: the rows behind `mergepipe explain`."""

from __future__ import annotations

from .manifest import Manifest, run_count


def explain_rows(m: Manifest) -> list[dict]:
    rows = []
    for name, tp in m.plan.tensors.items():
        rows.append({
            "tensor": name,
            "blocks": tp.blocks,
            "selected": [run_count(r) for r in tp.selected],
            "candidates": [run_count(r) for r in tp.candidates],
            "planned_bytes": tp.planned_bytes,
            "bound": tp.bound,
        })
    return rows
