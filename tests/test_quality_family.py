"""The merge-quality bench's family builder and evaluator, on the seconds-long "mini" family."""

import hashlib
import json

import pytest

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from bench.quality.evaluate import evaluate  # noqa: E402
from bench.quality.family import STAMP, build_family  # noqa: E402
from bench.quality.tasks import GENERATORS, TASKS, encode, make_tokenizer  # noqa: E402
from bench.quality import tasks as T  # noqa: E402  (module: pytest would collect test_set)


def _hashes(paths):
    return {n: hashlib.sha256((p / "model.safetensors").read_bytes()).hexdigest() for n, p in paths.items()}


@pytest.fixture(scope="module")
def mini(tmp_path_factory):
    root = tmp_path_factory.mktemp("quality")
    return root, build_family(root / "a", scale="mini", seed=0)


def test_splits_are_seeded_and_disjoint():
    for t in GENERATORS:
        test = T.test_set(t, 200)
        assert test == T.test_set(t, 200) and len({p for p, _ in test}) == 200
        train = T.train_set(t, 2000)
        assert not {p for p, _ in train} & {p for p, _ in T.test_set(t)}


def test_tokenizer_roundtrip(tmp_path):
    from transformers import AutoTokenizer

    make_tokenizer().save_pretrained(tmp_path)
    tok = AutoTokenizer.from_pretrained(tmp_path)
    for t in GENERATORS:
        p, a = T.test_set(t, 1)[0]
        assert tok(p + a)["input_ids"] == [tok.bos_token_id] + encode(p + a)
        assert tok.decode(encode(a)) == a


def test_family_is_deterministic_and_cached(mini):
    root, paths = mini
    assert set(paths) == {"base"} | {f"expert_{t}" for t in TASKS}
    for p in paths.values():
        assert {"config.json", "model.safetensors", "tokenizer.json"} <= {f.name for f in p.iterdir()}
    first = _hashes(paths)
    assert len(set(first.values())) == len(first)  # experts really moved away from the base
    assert _hashes(build_family(root / "b", scale="mini", seed=0)) == first
    other = _hashes(build_family(root / "c", scale="mini", seed=1))
    assert other != first
    # Reuse: a second call with the same recipe must not rebuild (the stamp's build time stays).
    before = (root / "a" / STAMP).read_text()
    mtime = (paths["base"] / "model.safetensors").stat().st_mtime_ns
    build_family(root / "a", scale="mini", seed=0)
    assert (root / "a" / STAMP).read_text() == before
    assert (paths["base"] / "model.safetensors").stat().st_mtime_ns == mtime
    # A changed recipe (here the seed) rebuilds in place.
    assert _hashes(build_family(root / "b", scale="mini", seed=1)) == other
    assert json.loads((root / "b" / STAMP).read_text())["recipe_stamp"]["seed"] == 1


def test_evaluate_ranges_and_specialisation(mini):
    _, paths = mini
    base = evaluate(paths["base"], n=200)
    assert set(base) == set(TASKS)
    for m in base.values():
        assert 0 < m["nll"] < 10 and 0 <= m["token_acc"] <= 1 and 0 <= m["exact"] <= 1
    assert evaluate(paths["base"], n=200) == base  # deterministic
    for t in TASKS:
        # Fine-tuning on a task must lower that task's answer NLL even on the tiny family.
        assert evaluate(paths[f"expert_{t}"], tasks=(t,), n=200)[t]["nll"] < base[t]["nll"] - 0.05


def test_quality_table_end_to_end(mini, tmp_path):
    """The harness on the mini family: real CLI merges, evaluation, table, plot. At 50%: the budget
    counts the pages the OS reads, and at 20% of this toy family (under ten pages) the headers and
    a few blocks take them all, leaving none for a sidecar's pages."""
    from bench.quality.table import run

    root, paths = mini
    rows = run("mini", ["ta"], [100, 50], root / "a", tmp_path / "work", tmp_path / "out", log=lambda _: None,
               sketches=("q2", "sign"), controls=(50,))
    names = [r["model"] for r in rows]
    assert names == ["base", *[n for n in paths if n != "base"], "ta 100%", "ta 50%, sketch fill (q2)",
                     "ta 50%, zero fill", "ta 50%, sketch fill (sign)", "ta 50%, sketch fill (q2) (random planner)"]
    full, part, zero, sign, rand = rows[-5:]
    assert full["relative_deviation"] == 0.0 and part["relative_deviation"] > 0
    assert [r["fill"] for r in (part, zero, sign, rand)] == ["sketch", "zero", "sketch", "sketch"]
    assert [r["sketch"] for r in (part, sign)] == ["q2", "sign"]
    # both kinds read (how much of each is the pages' say on a family this small) and zero fill none
    assert part["sketch_bytes_read"] > 0 and sign["sketch_bytes_read"] > 0 and zero["sketch_bytes_read"] == 0
    for r in (part, zero, sign, rand):
        assert r["expert_bytes_read"] <= full["expert_bytes_read"] * 0.5 + 1
    assert part["relative_deviation"] < zero["relative_deviation"]
    md = (tmp_path / "out" / "quality.md").read_text()
    assert "ta 50%, sketch fill (q2) (random planner)" in md and (tmp_path / "out" / "quality.png").stat().st_size > 0
    assert json.loads((tmp_path / "out" / "quality.json").read_text())["rows"][0]["model"] == "base"


def test_scores_are_remembered_by_the_weights(mini, tmp_path):
    """The table's evaluation cache scores a folder once, and again when its weights change."""
    import shutil

    from bench.quality.table import cached

    root, paths = mini
    calls = []
    score = cached(lambda folder, tasks: calls.append(folder) or {"n": len(calls)}, tmp_path / "work")
    copy = tmp_path / "copy"
    shutil.copytree(paths["base"], copy)
    assert score(copy, ["add"]) == score(copy, ["add"]) == {"n": 1}
    assert cached(lambda f, t: 1 / 0, tmp_path / "work")(copy, ["add"]) == {"n": 1}  # kept on disk
    assert score(copy, ["sub"]) == {"n": 2}  # another task set is another score
    raw = bytearray((copy / "model.safetensors").read_bytes())
    raw[-1] ^= 1
    (copy / "model.safetensors").write_bytes(bytes(raw))
    assert score(copy, ["add"]) == {"n": 3}


def test_oracle_bound_is_below_every_feasible_choice():
    """The LP bound of bench.quality.oracle never exceeds the best choice found by brute force."""
    import itertools
    import random

    from bench.quality.oracle import lower_bound
    rng = random.Random(0)
    for _ in range(50):
        options = [[(rng.randrange(1, 5) * sum(s), rng.random() * (3 - sum(s))) for s in itertools.product((0, 1), repeat=2)]
                   for _ in range(3)]
        options = [[(0, max(r for _, r in o))] + o[1:] for o in options]  # reading nothing leaves the most
        budget = rng.randrange(0, 20)
        best = min(sum(r for _, r in pick) for pick in itertools.product(*options)
                   if sum(c for c, _ in pick) <= budget)
        assert lower_bound(options, budget) <= best + 1e-12
