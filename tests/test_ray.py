"""The Ray executor on a real Ray cluster on loopback: a head node and a second worker node, each a
separate raylet process with one CPU, shared by every test of this module. Same bytes as the local
executor, a worker SIGKILLed mid-part, placement, and the one-line failures."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

import mergepipe.ray_executor as RX
from mergepipe.config import load_config
from mergepipe.demo import demo_config
from mergepipe.errors import MergepipeError
from mergepipe.execute import execute, plan_key
from mergepipe.index import Catalog
from mergepipe.journal import read_records
from mergepipe.manifest import load_manifest
from mergepipe.options import RunOptions
from mergepipe.placement import assign
from mergepipe.plan import plan_merge
from mergepipe.publish import staging_for
from mergepipe.verify import verify
from mergepipe.worker import SLOW_ENV, build_jobs, split

from conftest import write_config

ray = pytest.importorskip("ray")
REPO = Path(__file__).resolve().parent.parent
PER_MODEL = {"task_arithmetic": {}, "ties": {"density": 0.3}, "gcwm": {}}
SHARED = {"gcwm": {"solver": "exact", "lambda": 0.5}}


@pytest.fixture(scope="module")
def cluster():
    from ray.cluster_utils import Cluster
    # the raylets and their workers inherit this environment: they import this checkout's mergepipe
    old = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join([str(REPO), *([old] if old else [])])
    # a lost node is declared dead after 1.5 s instead of Ray's 15 s default (the node-loss test waits for it)
    system = {"health_check_period_ms": 500, "health_check_failure_threshold": 3}
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False,
                                                      "_system_config": system})
    c.add_node(num_cpus=1)
    ray.init(address=c.address, log_to_driver=False, logging_level="ERROR")
    c.wait_for_nodes()
    yield c
    ray.shutdown()
    c.shutdown()
    if old is None:
        os.environ.pop("PYTHONPATH", None)
    else:
        os.environ["PYTHONPATH"] = old


def _plan(family, workdir, method, budget="60%"):
    path = write_config(workdir / f"{method}.yml", family, method, **PER_MODEL[method])
    if method in SHARED:
        path.write_text(yaml.safe_dump(demo_config(family, method, **SHARED[method]), sort_keys=False))
    cfg = load_config(path)
    return plan_merge(cfg, budget, Catalog(workdir / "c.sqlite"))


@pytest.mark.parametrize("method", ["task_arithmetic", "ties", "gcwm"])
def test_ray_output_is_the_local_executors(cluster, family, workdir, monkeypatch, method):
    m = _plan(family, workdir, method)
    local = execute(m, workdir / "local")
    # small parts: each shard is cut into several ranges of tensors that run on both nodes at once
    monkeypatch.setattr(RX, "PART_BYTES", 48 << 10)
    done = execute(m, workdir / "ray", executor="ray")
    ex = done.execution
    assert ex.root_hash == local.execution.root_hash and ex.outputs == local.execution.outputs
    diff = {(t, k) for t, d in (ex.diagnostics or {}).items() for k, v in d.items()
            if k != "seconds" and local.execution.diagnostics[t].get(k) != v}  # seconds: timings
    assert not diff, sorted(diff)[:5]
    assert ex.bytes_read == local.execution.bytes_read  # the same planned ranges, counted the same
    assert ex.executor == "ray" and local.execution.executor == "local"
    files = {j.file for j in ex.jobs}
    assert files == set(ex.outputs) and len(ex.jobs) > len(files)  # split into parts
    assert len({j.node for j in ex.jobs}) == 2, [j.node for j in ex.jobs]
    assert all(j.attempts == 1 and j.wall_s > 0 and j.bytes_read > 0 for j in ex.jobs)
    assert sum(j.bytes_read for j in ex.jobs) == ex.expert_bytes_read + ex.base_bytes_read
    for f in ("local", "ray"):  # the published files are byte-identical
        assert (workdir / f / "model-00001-of-00002.safetensors").is_file()
    for name in ex.outputs:
        assert (workdir / "local" / name).read_bytes() == (workdir / "ray" / name).read_bytes()
    assert not (workdir / "ray" / ".mergepipe-scratch").exists()
    reloaded = load_manifest(workdir / "ray" / "mergepipe.manifest.json")  # the new fields load back
    assert reloaded.execution.jobs == ex.jobs
    assert verify(reloaded, workdir / "ray").ok


def _worker_pids() -> set[int]:
    """Processes running a mergepipe part task (Ray titles a busy worker after its task)."""
    pids = set()
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                if (p / "cmdline").read_bytes().startswith(b"ray::mergepipe-part"):
                    pids.add(int(p.name))
            except OSError:
                pass
    return pids


def test_sigkilled_worker_is_retried_and_resumes_from_the_journal(cluster, family, workdir, monkeypatch):
    """One part per shard, a journal record per tensor and a pause after each: kill one worker by
    pid once its part has journaled a few tensors. The retry resumes there; the other part runs once."""
    m = _plan(family, workdir, "task_arithmetic")
    local = execute(m, workdir / "local")
    out = workdir / "ray"
    staging = staging_for(out.resolve(), plan_key(m, "cpu"))
    monkeypatch.setenv(SLOW_ENV, "150")
    result: dict = {}
    t = threading.Thread(target=lambda: result.update(done=execute(m, out, executor="ray")), daemon=True)
    t.start()
    victim, records_then = None, []
    deadline = time.monotonic() + 120
    while victim is None and time.monotonic() < deadline and t.is_alive():
        records = read_records(staging.journal, plan_key(m, "cpu"))
        first = [r for r in records if r.file == "model-00001-of-00002.safetensors"]
        if len(first) >= 4:
            pids = _worker_pids()
            if pids:  # both parts run at once, one per node: kill one of the two workers
                victim = min(pids)
                os.kill(victim, signal.SIGKILL)
                records_then = records
        time.sleep(0.05)
    assert victim is not None, "no worker was found mid-part"
    with pytest.raises(MergepipeError, match="another mergepipe execute is writing"):
        execute(m, out, executor="ray")  # a second driver on the same OUT, while the first runs
    t.join(180)
    monkeypatch.delenv(SLOW_ENV)
    ex = result["done"].execution
    assert ex.root_hash == local.execution.root_hash and ex.outputs == local.execution.outputs
    retried = [j for j in ex.jobs if j.attempts > 1]
    assert len(retried) == 1 and all(j.attempts == 1 for j in ex.jobs if j not in retried)
    (j,) = retried
    # the retry took over what its part had journaled when it was killed (the newest record aside: its
    # bytes may still have been on their way to the file) and redid only the rest
    mine = [r for r in records_then if r.file == j.file]
    assert len(mine) >= 4 and j.resumed_bytes >= sum(r.end - r.start for r in mine[:-1])
    assert j.resumed_bytes < (workdir / "local" / j.file).stat().st_size
    assert j.bytes_read < 2 * local_part_reads(local, j.file)  # the killed attempt's reads count too
    assert ex.resumed_bytes == 0  # the run itself started from nothing
    assert not staging.journal.exists() and not staging.folder.exists()


def local_part_reads(local, file: str) -> int:
    (j,) = [j for j in local.execution.jobs if j.file == file]
    return j.bytes_read


def test_rerun_after_a_failed_ray_run_resumes_on_the_local_executor(cluster, family, workdir, monkeypatch):
    """The parts a Ray run journaled are what a later run of either executor resumes from."""
    m = _plan(family, workdir, "task_arithmetic")
    local = execute(m, workdir / "local")
    monkeypatch.setattr(RX, "PART_BYTES", 48 << 10)
    monkeypatch.setattr(RX, "ATTEMPTS", 1)  # the first death fails the run
    out = workdir / "ray"
    monkeypatch.setenv(SLOW_ENV, "100")
    key = plan_key(m, "cpu")
    staging = staging_for(out.resolve(), key)
    t, box = _execute_in_thread(m, out)
    deadline = time.monotonic() + 120
    while t.is_alive() and time.monotonic() < deadline:
        if len(read_records(staging.journal, key)) >= 6 and (pids := _worker_pids()):
            os.kill(min(pids), signal.SIGKILL)
            break
        time.sleep(0.05)
    t.join(120)
    monkeypatch.delenv(SLOW_ENV)
    err = str(box["error"])
    assert "died 1 times" in err and "\n" not in err and str(staging.folder) in err
    assert not out.exists() and staging.folder.is_dir()
    kept = read_records(staging.journal, key)
    assert kept
    done = execute(m, out)  # the local executor, whole files: takes over what the parts journaled
    assert done.execution.outputs == local.execution.outputs
    assert 0 < done.execution.resumed_bytes


def test_split_parts_cover_each_file_once(family, workdir):
    m = _plan(family, workdir, "task_arithmetic", "100%")
    from mergepipe.sources import open_recorded
    jobs = build_jobs(m, open_recorded([m.base, *m.experts], None, False))
    for job in jobs:
        parts = split(job, 48 << 10)
        assert len(parts) > 1 and parts[0].start == 0 and parts[-1].end == job.layout.size
        assert all(a.end == b.start and b.first == a.first + len(a.tensors) for a, b in zip(parts, parts[1:]))
        assert [t for p in parts for t in p.tensors] == list(job.tensors)
        assert split(job, job.layout.size) == [job]


def test_assign_places_parts_where_their_inputs_are(family, workdir):
    m = _plan(family, workdir, "task_arithmetic", "100%")
    from mergepipe.sources import open_recorded
    jobs = build_jobs(m, open_recorded([m.base, *m.experts], None, False))
    staging = "/shared/out"
    every = set().union(*(RX_inputs(j) for j in jobs)) | {staging}
    # shared storage: no constraint
    assert set(assign(jobs, {"a": every, "b": every}, staging).values()) == {None}
    # node b holds copies of the first shard's inputs only: the second shard must run on a
    shard2 = RX_inputs(jobs[1])
    only_a = every - (shard2 - RX_inputs(jobs[0]))
    placed = assign(jobs, {"a": every, "b": only_a}, staging)
    assert placed[jobs[1].key] == "a" and placed[jobs[0].key] is None
    # two nodes each with a full local copy, none shared: spread by output bytes
    parts = [p for j in jobs for p in split(j, 48 << 10)]
    placed = assign(parts, {"a": every, "b": every, "c": {staging}}, staging)
    per = {n: sum(p.end - p.start for p in parts if placed[p.key] == n) for n in "ab"}
    assert set(placed.values()) == {"a", "b"} and abs(per["a"] - per["b"]) <= max(p.end - p.start for p in parts)
    # a third node did not answer the probe: nothing may go to Ray's free placement
    assert set(assign(jobs, {"a": every, "b": every}, staging, nodes=3).values()) == {"a", "b"}
    with pytest.raises(MergepipeError, match="no node of the cluster sees every file"):
        assign(jobs, {"a": {staging}}, staging)


def RX_inputs(job):
    from mergepipe.placement import inputs
    return inputs(job)


def test_path_map_prefixes():
    o = RunOptions(path_map=("/local=/shared", "/local/big=/fast"))
    assert o.worker_path("/local/m/x.safetensors") == "/shared/m/x.safetensors"
    assert o.worker_path("/local/big/y") == "/fast/y"
    assert o.worker_path("/localx/y") == "/localx/y" and o.worker_path("/local") == "/shared"
    with pytest.raises(MergepipeError, match="--path-map 'nope'"):
        RX.RayExecutor(RunOptions(executor="ray", path_map=("nope",)))


def test_path_map_reaches_the_workers(cluster, family, workdir):
    """Inputs and output seen under another name by the workers (a symlinked mount here)."""
    m = _plan(family, workdir, "task_arithmetic")
    local = execute(m, workdir / "local")
    (workdir / "mnt").symlink_to(family["base"].parent)
    (workdir / "outmnt").symlink_to(workdir)
    opts = RunOptions(executor="ray", path_map=(f"{family['base'].parent}={workdir / 'mnt'}",
                                                f"{workdir}={workdir / 'outmnt'}"))
    done = execute(m, workdir / "ray", opts)
    assert done.execution.outputs == local.execution.outputs


def test_cli_joins_the_cluster_by_address(cluster, family, workdir):
    m = _plan(family, workdir, "task_arithmetic")
    m.save(workdir / "m.json")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    r = subprocess.run([sys.executable, "-m", "mergepipe", "execute", str(workdir / "m.json"), "-o",
                        str(workdir / "out"), "--executor", "ray", "--ray-address", cluster.address, "--json"],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    ex = json.loads(r.stdout)
    assert ex["executor"] == "ray" and ex["root_hash"] == execute(m, workdir / "local").execution.root_hash
    bad = subprocess.run([sys.executable, "-m", "mergepipe", "execute", str(workdir / "m.json"), "-o",
                          str(workdir / "out2"), "--executor", "ray", "--ray-address", "127.0.0.1:1"],
                         capture_output=True, text=True, env=env, timeout=300)
    assert bad.returncode == 2 and "cannot join the cluster" in bad.stderr and "Traceback" not in bad.stderr
    assert not (workdir / "out2").exists()


def test_without_ray_the_flag_says_how_to_install(family, workdir):
    m = _plan(family, workdir, "task_arithmetic")
    m.save(workdir / "m.json")
    code = ("import sys; sys.modules['ray'] = None; from mergepipe.cli import main; sys.argv = "
            f"['mergepipe', 'execute', {str(workdir / 'm.json')!r}, '-o', {str(workdir / 'o')!r}, '--executor', 'ray']; main()")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=120)
    assert r.returncode == 2 and "pip install 'mergepipe[ray]'" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and not (workdir / "o").exists()


def test_a_node_lost_for_good_fails_in_one_line_and_a_rerun_resumes(cluster, family, workdir, monkeypatch):
    """Every part is placed on a third node (as if only it held copies of the inputs); that node is
    taken out of the cluster mid-run: the parts cannot run anywhere else, so the run fails in one line
    and keeps its staging folder; a rerun on the nodes left resumes what the lost node journaled."""
    import mergepipe.placement as P
    m = _plan(family, workdir, "task_arithmetic")
    local = execute(m, workdir / "local")
    node = cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    doomed = node.node_id
    assert doomed in {n["NodeID"] for n in ray.nodes() if n["Alive"]}
    monkeypatch.setattr(P, "assign", lambda jobs, sees, staging, nodes=None: {j.key: doomed for j in jobs})
    monkeypatch.setattr(RX, "PART_BYTES", 48 << 10)
    monkeypatch.setenv(SLOW_ENV, "100")
    out, key = workdir / "ray", plan_key(m, "cpu")
    staging = staging_for(out.resolve(), key)
    t, box = _execute_in_thread(m, out)
    deadline = time.monotonic() + 120
    while t.is_alive() and time.monotonic() < deadline and len(read_records(staging.journal, key)) < 4:
        time.sleep(0.05)
    cluster.remove_node(node, allow_graceful=False)
    t.join(180)
    monkeypatch.delenv(SLOW_ENV)
    err = str(box["error"])
    print(err)
    assert "\n" not in err and str(staging.folder) in err and ("left the cluster" in err or "died" in err), err
    assert not out.exists() and read_records(staging.journal, key)
    monkeypatch.undo()
    done = execute(m, out, executor="ray")
    assert done.execution.outputs == local.execution.outputs and done.execution.resumed_bytes > 0
    assert doomed not in {j.node for j in done.execution.jobs}


def test_the_driver_refuses_a_part_the_disk_does_not_hold(family, workdir):
    """The read-back check: a staged byte that changed after its worker hashed it stops the publish."""
    from mergepipe import execute as E
    from mergepipe.checkpoint import Reader
    from mergepipe.executor import LocalExecutor, RunEnv
    from mergepipe.journal import Journal
    from mergepipe.publish import prepare_destination
    m = _plan(family, workdir, "task_arithmetic")
    run = E._prepare(m, RunOptions())
    staging = prepare_destination(workdir / "out", False, run.key)
    parts = [p for j in run.jobs for p in split(j, 48 << 10)]
    resumes, _ = E._resume(run, staging, parts, [])
    journal = Journal(staging.journal, run.key, [])
    ran = LocalExecutor().run_all(parts, resumes, RunEnv(staging.folder, journal, Reader(), "cpu", False, None))
    journal.close()
    results = {p.key: ran[p.key].result for p in parts}
    outputs = E._outputs(run, parts, results, staging, {})
    assert {k: o.tensors for k, o in outputs.items()} == {k: o.tensors for k, o in execute(m, workdir / "ref").execution.outputs.items()}
    victim = parts[len(parts) // 2]
    path = staging.folder / victim.layout.name
    with open(path, "r+b") as f:  # one byte inside that part's first tensor
        f.seek(victim.out_tensors[0].offset)
        b = f.read(1)
        f.seek(victim.out_tensors[0].offset)
        f.write(bytes([b[0] ^ 1]))
    with pytest.raises(MergepipeError, match=f"{victim.label()} does not hold what its worker wrote"):
        E._outputs(run, parts, results, staging, {})


def test_an_attempt_whose_part_went_to_another_stops_writing(cluster, family, workdir, monkeypatch):
    """The fence against a worker its driver can no longer reach (a partition: alive, still writing).
    Once the driver gives the part to a new attempt (a new owner token), the old attempt stops at its
    next write and writes nothing more; the new one resumes from what the old one journaled, and the
    file ends as the local executor writes it."""
    from mergepipe import execute as E
    from mergepipe import sink as S
    m = _plan(family, workdir, "task_arithmetic", "100%")
    want = (execute(m, workdir / "local").execution, workdir / "local")
    run = E._prepare(m, RunOptions())
    job = max(run.jobs, key=lambda j: len(j.tensors))
    staging = workdir / "staging"
    staging.mkdir()
    monkeypatch.setattr(S, "SYNC_SECONDS", 0.05)
    monkeypatch.setenv(SLOW_ENV, "30")  # part_task sets it from its config; restored after the test
    cfg = RX.TaskConfig(str(staging), "cpu", False, 1, "30", str(staging / "stop"))
    owner = RX.owner_path(staging, job.key)
    old = RX.part_task(job, [], cfg, (str(owner), RX.claim(owner)))
    journaled = []
    for item in old:  # until a durable record: its bytes are on disk, so a new attempt can take them over
        if item[0] == "records":
            journaled += [rec for rec, _ in item[1]]
            if any(sync for _, sync in item[1]):
                break
    new_token = RX.claim(owner)  # the driver retries the part elsewhere
    with pytest.raises(RX.Stopped, match="another attempt owns this part"):
        for item in old:
            journaled += [rec for rec, _ in item[1]] if item[0] == "records" else []
    out = staging / job.layout.name
    stopped_at = out.read_bytes()
    assert len(stopped_at) < job.end  # it stopped early, where the fence said so
    time.sleep(0.3)
    assert out.read_bytes() == stopped_at  # and wrote nothing after
    items = list(RX.part_task(job, journaled, cfg, (str(owner), new_token)))
    assert items[0][0] == "start" and items[0][4] > 0  # the new attempt took over the journaled prefix
    assert items[-1][0] == "done"
    assert out.read_bytes() == (want[1] / job.layout.name).read_bytes()


def _execute_in_thread(m, out):
    """Execute on Ray in a background thread: (the thread, a dict that gets the run's error, if any)."""
    box: dict = {}

    def run():
        try:
            execute(m, out, executor="ray")
        except MergepipeError as e:
            box["error"] = e
    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, box
