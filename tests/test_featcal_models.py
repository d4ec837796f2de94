"""FeatCal's `calibrate:` stage end to end (plan -> execute -> load -> replay) on tiny real transformers
families other than the synthetic Qwen2 one of test_featcal_stage.py: Llama, Qwen3, BERT (a bare
BertModel, names embeddings.* / encoder.layer.N.*) and BertForMaskedLM (names bert.*, cls.*).

Each family is built here from a seeded tiny config: a base with every parameter jittered, and two
experts that are the base plus small seeded noise on every floating parameter, saved with
save_pretrained(safe_serialization=True)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
import transformers
import yaml

from mergepipe.config import load_config
from mergepipe.demo import demo_config
from mergepipe.execute import MANIFEST_NAME, execute
from mergepipe.featcal.calibrate import TensorSource, calibrate
from mergepipe.featcal.data import load_calibration
from mergepipe.featcal.layers import Arch
from mergepipe.index import Catalog
from mergepipe.manifest import load_manifest
from mergepipe.plan import plan_merge
from mergepipe.verify import verify

from safetensors.torch import save_file

from helpers import load_all, calibration

VOCAB = 128
EXPERTS = 2
PARAMS = {"samples": 6, "seq_len": 16, "batch_size": 2}  # >= 60 tokens: down_proj has 48 inputs

DECODER = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
BERT = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=64)

# case -> (config, model class the family is saved from, class the merged output is loaded with)
CASES = {
    "llama": (lambda: transformers.LlamaConfig(**DECODER, tie_word_embeddings=False),
              transformers.LlamaForCausalLM, transformers.AutoModelForCausalLM),
    # head_dim 16 != hidden / heads: q_norm/k_norm widths come from the config
    "qwen3": (lambda: transformers.Qwen3Config(**DECODER, head_dim=16, tie_word_embeddings=False),
              transformers.Qwen3ForCausalLM, transformers.AutoModelForCausalLM),
    "bert": (lambda: transformers.BertConfig(**BERT), transformers.BertModel, transformers.AutoModel),
    "bert_mlm": (lambda: transformers.BertConfig(**BERT), transformers.BertForMaskedLM,
                 transformers.AutoModelForMaskedLM),
}
# the name root each checkpoint uses, as Arch must detect it
ROOTS = {"llama": "model.layers.", "qwen3": "model.layers.", "bert": "encoder.layer.",
         "bert_mlm": "bert.encoder.layer."}


pytestmark = pytest.mark.usefixtures("one_thread")


def _jitter(model: torch.nn.Module, scale: float, seed: int) -> None:
    """Add seeded noise to every floating parameter (tied ones once: parameters() deduplicates)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.is_floating_point():
                p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * scale)


def build_family(root: Path, case: str) -> dict[str, Path]:
    make_config, model_cls, _ = CASES[case]
    torch.manual_seed(0)
    base = model_cls(make_config()).eval()
    _jitter(base, 0.2, seed=1)  # norms and biases off their 1 / 0 init
    paths = {"base": root / "base"}
    base.save_pretrained(paths["base"], safe_serialization=True)
    state = {k: v.clone() for k, v in base.state_dict().items()}
    for k in range(1, EXPERTS + 1):
        base.load_state_dict(state)
        _jitter(base, 0.02, seed=100 + k)
        paths[f"expert{k}"] = root / f"expert{k}"
        base.save_pretrained(paths[f"expert{k}"], safe_serialization=True)
    return paths


def write_data(path: Path) -> Path:
    g = torch.Generator().manual_seed(7)
    with open(path, "w") as f:
        for _ in range(6):
            n = int(torch.randint(10, 17, (1,), generator=g))
            f.write(json.dumps({"input_ids": torch.randint(0, VOCAB, (n,), generator=g).tolist()}) + "\n")
    return path


@dataclasses.dataclass
class Run:
    case: str
    family: dict[str, Path]
    work: Path
    manifest: object  # the plan
    done: object  # the calibrated execution's manifest
    plain_done: object
    replay_done: object
    arch: Arch


@pytest.fixture(scope="module", params=sorted(CASES))
def run(request, tmp_path_factory) -> Run:
    case = request.param
    work = tmp_path_factory.mktemp(f"featcal-{case}")
    family = build_family(work / "family", case)
    cfg = demo_config(family, "task_arithmetic")
    cfg["dtype"] = "float32"
    cfg.pop("out_dtype")
    cfg["calibrate"] = {"data": str(write_data(work / "calib.jsonl")), "parameters": dict(PARAMS)}
    (work / "fc.yml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    m = plan_merge(load_config(work / "fc.yml"), "100%", Catalog(work / "c.sqlite"))
    done = execute(m, work / "out")
    plain = execute(dataclasses.replace(m, stages=[]), work / "plain")
    replay = execute(load_manifest(work / "out" / MANIFEST_NAME), work / "replay")
    arch = Arch.from_config(family["base"] / "config.json", tensor_names=load_all(family["base"]))
    return Run(case, family, work, m, done, plain, replay, arch)


def expected_targets(arch: Arch, names) -> set[str]:
    """Every in-layer Linear weight/bias and norm weight/bias the adapter names, as stored."""
    names = set(names)
    out = set()
    for l in range(arch.n_layers):
        pre = arch.layer_prefix(l)
        for spec in arch.modules():
            assert f"{pre}{spec.name}.weight" in names, f"{pre}{spec.name}.weight"
            out.add(f"{pre}{spec.name}.weight")
            if f"{pre}{spec.name}.bias" in names:
                out.add(f"{pre}{spec.name}.bias")
    return out


def test_plan_records_the_calibration(run):
    c = calibration(run.manifest)
    assert c is not None and [s.kind for s in run.manifest.stages] == ["featcal"]
    assert run.arch.layer_prefix(0) == f"{ROOTS[run.case]}0."
    assert c.prefixes == [2] * EXPERTS  # 100%: every expert calibrates every layer
    assert c.sequences == [PARAMS["samples"]] * EXPERTS and len(c.data) == 1
    assert set(c.statistics) == {s.name for s in run.arch.modules()}
    d, inter = 32, 48
    first_linear = next(s.name for s in run.arch.modules() if s.kind == "linear")
    assert c.statistics[first_linear] == [d, d]
    down = "output.dense" if run.case.startswith("bert") else "mlp.down_proj"
    assert c.statistics[down] == [inter, inter]


def test_calibrates_exactly_the_layer_modules_and_leaves_the_rest(run):
    got, plain, base = load_all(run.work / "out"), load_all(run.work / "plain"), load_all(run.family["base"])
    assert got.keys() == plain.keys() == base.keys()
    diags = run.done.execution.diagnostics
    calibrated = {n for n, d in diags.items() if "featcal" in d}
    want = expected_targets(run.arch, base)
    assert calibrated == want
    biases = {n for n in want if n.endswith(".bias")}
    if run.case.startswith("bert"):  # every BERT Linear and LayerNorm has a bias
        assert len(biases) == len(want) // 2
    else:
        assert not biases
    for name, t in got.items():
        assert t.dtype == torch.float32, name
        if name in calibrated:
            f = diags[name]["featcal"]
            assert f["experts"] == list(range(EXPERTS)) and f["rel_change"] > 0, name
            assert f["rel_change"] == pytest.approx(rel_change(t, plain[name]), rel=1e-9), name
            assert not torch.equal(t, plain[name]), name
            assert torch.isfinite(t).all(), name
        else:
            assert torch.equal(t, plain[name]), name  # embeddings, final norm, heads: the merge's bytes
    # the uncalibrated tensors' recorded hashes agree too, and the sidecars are the merge's
    out_files, plain_files = run.done.execution.outputs, run.plain_done.execution.outputs
    assert out_files.keys() == plain_files.keys()
    for f, rec in out_files.items():
        for name, h in rec.tensors.items():
            assert (h == plain_files[f].tensors[name]) == (name not in calibrated), name
    for side in ("config.json", "generation_config.json"):
        if (run.work / "plain" / side).exists():
            assert (run.work / "out" / side).read_bytes() == (run.work / "plain" / side).read_bytes()
    assert not list(run.work.glob(".out.mergepipe-*"))


def test_matches_the_loop_run_on_the_plain_merge_in_memory(run):
    """The streamed stage (byte-range reads, in-place pwrite into the copied files) equals FeatCal's
    loop run directly on in-memory tensors of the plain merge, base and experts."""
    plain = load_all(run.work / "plain")
    base = load_all(run.family["base"])
    experts = [load_all(run.family[f"expert{k}"]) for k in range(1, EXPERTS + 1)]
    ids = load_calibration([run.work / "calib.jsonl"], EXPERTS, VOCAB, PARAMS["samples"], PARAMS["seq_len"]).ids
    assert [len(x) for x in ids] == calibration(run.manifest).sequences
    ref = {}
    calibrate(run.arch, TensorSource(base), TensorSource(plain), [TensorSource(e) for e in experts], ids,
              calibration(run.manifest).params, lambda n, t: ref.__setitem__(n, t.to(plain[n].dtype)),
              store_dtype=torch.float32)
    got = load_all(run.work / "out")
    assert ref.keys() == {n for n, d in run.done.execution.diagnostics.items() if "featcal" in d}
    for name, t in ref.items():
        assert torch.equal(got[name], t), name


def test_output_loads_with_transformers_and_runs(run):
    _, model_cls, auto_cls = CASES[run.case]
    model, info = auto_cls.from_pretrained(run.work / "out", output_loading_info=True)
    assert isinstance(model, model_cls)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    state = model.state_dict()
    for name, t in load_all(run.work / "out").items():
        assert torch.equal(state[name], t), name  # what was written is what the model runs
    ids = torch.tensor([[5, 9, 17, 3, 42, 8, 77, 1], [7, 5, 30, 11, 0, 0, 0, 0]])
    mask = torch.tensor([[1] * 8, [1] * 4 + [0] * 4])
    with torch.no_grad():
        out = model.eval()(input_ids=ids, attention_mask=mask)
    main = out.logits if hasattr(out, "logits") and out.logits is not None else out.last_hidden_state
    assert main.shape[:2] == ids.shape and torch.isfinite(main).all()
    if run.case in ("llama", "qwen3", "bert_mlm"):
        assert main.shape[-1] == VOCAB


def test_replay_of_the_saved_manifest_is_bit_exact(run):
    saved = load_manifest(run.work / "out" / MANIFEST_NAME)
    assert calibration(saved)
    assert run.replay_done.execution.root_hash == run.done.execution.root_hash
    assert run.plain_done.execution.root_hash != run.done.execution.root_hash
    a, b = load_all(run.work / "out"), load_all(run.work / "replay")
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)
    assert verify(saved, output=run.work / "replay").ok


def rel_change(new: torch.Tensor, old: torch.Tensor) -> float:
    new, old = new.double(), old.double()
    return float((new - old).norm() / max(float(old.norm()), 1e-30))


def test_mixed_dtype_checkpoint_calibrates_against_the_stored_weights(tmp_path):
    """A Llama family whose Linear weights are bf16 and whose norms and embeddings stay fp32, merged with
    no dtype (each tensor keeps the base's): every calibrated tensor's recorded rel_change must be
    the change of the stored tensor, as it is for single-dtype checkpoints (test above)."""
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**DECODER, tie_word_embeddings=False)).eval()
    _jitter(model, 0.2, seed=1)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    family = {}
    for k, name in enumerate(["base", "expert1", "expert2"]):
        model.load_state_dict(state)
        if k:
            _jitter(model, 0.02, seed=100 + k)
        family[name] = tmp_path / name
        model.save_pretrained(family[name], safe_serialization=True)
        tensors = {n: t.bfloat16() if n.endswith("_proj.weight") else t for n, t in load_all(family[name]).items()}
        save_file(tensors, str(family[name] / "model.safetensors"), metadata={"format": "pt"})
    cfg = demo_config(family, "task_arithmetic")
    cfg.pop("dtype")
    cfg.pop("out_dtype")
    cfg["calibrate"] = {"data": str(write_data(tmp_path / "calib.jsonl")), "parameters": dict(PARAMS)}
    (tmp_path / "fc.yml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    m = plan_merge(load_config(tmp_path / "fc.yml"), "100%", Catalog(tmp_path / "c.sqlite"))
    done = execute(m, tmp_path / "out")
    execute(dataclasses.replace(m, stages=[]), tmp_path / "plain")
    got, plain = load_all(tmp_path / "out"), load_all(tmp_path / "plain")
    calibrated = {n: d["featcal"] for n, d in done.execution.diagnostics.items() if "featcal" in d}
    assert {got[n].dtype for n in calibrated} == {torch.float32, torch.bfloat16}  # the setting is as meant
    off = {n: (f["rel_change"], rel_change(got[n], plain[n])) for n, f in calibrated.items()
           if f["rel_change"] != pytest.approx(rel_change(got[n], plain[n]), rel=1e-9)}
    assert not off, off

