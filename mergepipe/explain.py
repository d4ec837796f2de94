"""What a plan reads and why, per tensor: the rows behind `mergepipe explain`. For an executed
manifest of a non-additive operator, each row also carries what the operator reported (GCWM: the
active experts, conflict score, gate value and union rank)."""

from __future__ import annotations

from .manifest import Manifest, run_count


def explain_rows(m: Manifest) -> list[dict]:
    diagnostics = (m.execution.diagnostics if m.execution else None) or {}
    rows = []
    for name, tp in m.plan.tensors.items():
        rows.append({
            "tensor": name,
            "blocks": tp.blocks,
            "selected": [run_count(r) for r in tp.selected],
            "candidates": [run_count(r) for r in tp.candidates],
            "planned_bytes": tp.planned_bytes,
            "bound": tp.bound,
            "diagnostics": diagnostics.get(name),
        })
    return rows
