"""The package's shape, checked from its source: no import cycles, no module outside operators/ that
asks which operator it has, small functions, and an operator that plugs in from outside the package."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import numpy as np
import pytest
import yaml
import torch
from helpers import load_all

from mergepipe import operators
from mergepipe.config import load_config
from mergepipe.demo import demo_config
from mergepipe.execute import execute
from mergepipe.index import Catalog
from mergepipe.manifest import load_manifest
from mergepipe.plan import plan_merge
from mergepipe.verify import verify

PACKAGE = Path(__file__).resolve().parent.parent / "mergepipe"


def _module(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def _imports(path: Path, module: str) -> set[str]:
    """Modules of the package that `path` imports anywhere (functions included), except under
    `if TYPE_CHECKING:`, which never runs."""
    tree = ast.parse(path.read_text())
    skip = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If)
            and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING" for n in ast.walk(node)}
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("mergepipe")}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.startswith("mergepipe"):
                found.add(target)
                found |= {f"{target}.{a.name}" for a in node.names}  # `from . import x` may name a module
    return found


def import_graph() -> dict[str, set[str]]:
    files = {_module(p): p for p in PACKAGE.rglob("*.py")}
    return {m: {t for t in _imports(p, m) if t in files and t != m} for m, p in files.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for t in sorted(graph[m]):
            if state.get(t) == 1:
                return stack[stack.index(t):] + [t]
            if t not in state and (cycle := visit(t)):
                return cycle
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (cycle := visit(m)):
            return cycle
    return None


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_the_package_has_no_import_cycle():
    graph = import_graph()
    assert "mergepipe.execute" in graph and graph["mergepipe.execute"]  # the walk sees the imports
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_no_module_outside_operators_asks_which_operator_it_has():
    pattern = re.compile(r"is (ta|ties|gcwm)\.|\.name ?== ?\"(ta|ties|gcwm|task_arithmetic)\"")
    hits = [f"{p}:{i}" for p in PACKAGE.rglob("*.py") if "operators" not in p.parts
            for i, line in enumerate(p.read_text().splitlines(), 1) if pattern.search(line)]
    assert hits == []


def _oversized(path: Path) -> list[str]:
    out = []
    for n in ast.walk(ast.parse(path.read_text())):
        if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)):
            a = n.args
            params = len(a.posonlyargs) + len(a.args) + len(a.kwonlyargs) + bool(a.vararg) + bool(a.kwarg)
            params -= bool(a.args and a.args[0].arg in ("self", "cls"))
            if n.end_lineno - n.lineno + 1 > 80 or params > 8:
                out.append(f"{path.name}:{n.lineno} {n.name}")
    return out


def test_functions_are_small():
    assert _oversized(Path(__file__)) == []
    assert [f for p in sorted(PACKAGE.rglob("*.py")) for f in _oversized(p)] == []


class BaseCopy(operators.Operator):
    """A test-only operator: the output is the base, whatever the experts say; it reads one block of
    one expert per tensor (and ignores it), so the plan, the reads and the kernel are all exercised."""
    name = "base_copy"
    params = (operators.Param("weight", float, per_expert=True, default=1.0),)

    def candidates(self, info, k, delta, tp, coef, data):
        idx = np.array([0] if k == 0 else [], dtype=np.int64)
        return operators.Candidates(idx, np.ones(len(idx)), np.zeros(len(idx)))

    def kernel(self, job, dev, scratch):
        return operators.Blockwise(job.name, lambda block: block.base_copy())


def test_an_operator_registered_from_outside_plans_and_executes(family, workdir):
    operators.register(BaseCopy())
    cfg = demo_config(family, "task_arithmetic")
    cfg["merge_method"] = "base_copy"
    for m in cfg["models"]:
        m["parameters"] = {}
    path = workdir / "copy.yml"
    path.write_text(yaml.safe_dump(cfg))
    m = plan_merge(load_config(path), "100%", Catalog(workdir / "c.sqlite"))
    assert m.operator.name == "base_copy" and m.plan.certificate.kind == "none"
    assert all(tp.selected[0] == [[0, 1]] and not any(tp.selected[1:]) for tp in m.plan.tensors.values())
    done = execute(m, workdir / "out")
    assert done.execution.expert_bytes_read == m.plan.planned_expert_bytes > 0
    got, base = load_all(workdir / "out"), load_all(family["base"])
    assert got.keys() == base.keys()
    assert all(torch.equal(got[k].view(torch.uint8), base[k].view(torch.uint8)) for k in base)
    assert verify(load_manifest(workdir / "out" / "mergepipe.manifest.json"), output=workdir / "out").ok


def test_an_unknown_operator_names_the_registered_ones():
    with pytest.raises(Exception, match="base_copy|ties"):
        operators.get("no_such_method")
