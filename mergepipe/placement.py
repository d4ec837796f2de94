"""Where each part of a Ray run may run: on any node when every node sees its inputs and the staging
folder (shared storage, the usual case), else only on the nodes that do (local copies of some shards),
spread by output bytes. Nodes are asked what they see by a probe task on each."""

from __future__ import annotations

import contextlib
import os

from .errors import MergepipeError

PROBE_S = 60  # how long the nodes have to say what they see


def inputs(job) -> set[str]:
    """The files a job reads (paths as its workers see them)."""
    files = set()
    for t in job.tensors:
        files.add(t.base.file)
        files |= {e.file for k, e in enumerate(t.experts) if t.exact[k] or (t.sketched and t.sketched[k])}
        files |= {s.file for s in t.sketches if s is not None}
    return files


def assign(jobs: list, sees: dict[str, set[str]], staging: str, nodes: int | None = None) -> dict[tuple[str, int], str | None]:
    """Per job, the node it must run on, or None where any node may: `sees` lists, per node that
    answered, the paths it can open (the staging folder included); `nodes`: how many nodes the
    cluster has (default: as many as answered), so any node may run a job only when all did and see
    its files."""
    load = {node: 0 for node in sees}
    out: dict[tuple[str, int], str | None] = {}
    for job in jobs:
        need = inputs(job) | {staging}
        able = sorted(node for node, seen in sees.items() if need <= seen)
        if not able:
            missing = sorted(need - set.union(set(), *sees.values())) or sorted(need)
            raise MergepipeError(f"ray: no node of the cluster sees every file {job.label()} needs "
                                 f"(for example {missing[0]}): share it, or map paths with --path-map")
        if len(able) == (nodes or len(sees)):
            out[job.key] = None
            continue
        node = min(able, key=lambda n: (load[n], n))
        load[node] += job.end - job.start
        out[job.key] = node
    return out


def visible(paths: list[str]) -> list[str]:
    """The probe's body, on one node: those of `paths` that it can open."""
    return [p for p in paths if os.access(p, os.R_OK)]


def place(ray, jobs: list, staging: str) -> dict:
    """Per job key, a Ray scheduling strategy (None: Ray's default)."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
    nodes = [n["NodeID"] for n in ray.nodes() if n["Alive"] and n["Resources"].get("CPU", 0) > 0]
    if not nodes:
        raise MergepipeError("ray: the cluster has no node with a CPU to run on")
    paths = sorted(set().union(*(inputs(j) for j in jobs)) | {staging})
    probe = ray.remote(visible)  # no CPU: it never waits behind a busy node's tasks
    refs = {probe.options(num_cpus=0, scheduling_strategy=NodeAffinitySchedulingStrategy(n, soft=False)).remote(paths): n
            for n in nodes}
    ready, _ = ray.wait(list(refs), num_returns=len(refs), timeout=PROBE_S)
    sees = {}
    for ref in ready:  # a node that does not answer in time gets no part
        with contextlib.suppress(ray.exceptions.RayError):
            sees[refs[ref]] = set(ray.get(ref))
    if not sees:
        raise MergepipeError(f"ray: no node of the cluster answered within {PROBE_S} s")
    return {key: node and NodeAffinitySchedulingStrategy(node, soft=False)
            for key, node in assign(jobs, sees, staging, len(nodes)).items()}
