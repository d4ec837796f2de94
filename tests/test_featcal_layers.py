"""FeatCal architecture adapter: layers built from config + tensors and run alone reproduce the full
transformers model (spec §7 item 8), on tiny seeded models and a right-padded batch."""

import json

import pytest
import torch
import transformers

from mergepipe.errors import MergepipeError
from mergepipe.featcal.layers import Arch

DECODER = dict(vocab_size=50, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)

# model_type -> (config, model class); windows of 3 over 7 tokens exercise the sliding masks
CASES = {
    "llama": (transformers.LlamaConfig(**DECODER), transformers.LlamaForCausalLM),
    "mistral": (transformers.MistralConfig(**DECODER, sliding_window=3), transformers.MistralForCausalLM),
    # layer 0 full attention, layer 1 sliding; q/k/v biases
    "qwen2": (transformers.Qwen2Config(**DECODER, use_sliding_window=True, sliding_window=3, max_window_layers=1),
              transformers.Qwen2ForCausalLM),
    # head_dim 16 != hidden/heads, so per-head q_norm/k_norm widths come from the config
    "qwen3": (transformers.Qwen3Config(**DECODER, head_dim=16), transformers.Qwen3ForCausalLM),
    "bert": (transformers.BertConfig(vocab_size=50, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                     num_attention_heads=4, max_position_embeddings=64),
             transformers.BertForMaskedLM),
}

IDS = torch.tensor([[5, 9, 9, 17, 3, 42, 8], [7, 5, 30, 11, 0, 0, 0], [49, 2, 0, 0, 0, 0, 0]])
MASK = torch.tensor([[1] * 7, [1] * 4 + [0] * 3, [1] * 2 + [0] * 5])


def build(model_cls, config, seed=0):
    """Seeded model with every parameter jittered, so norms and biases are not at their 1/0 init."""
    torch.manual_seed(seed)
    model = model_cls(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    return model


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request):
    config, model_cls = CASES[request.param]
    model = build(model_cls, config)
    state = model.state_dict()
    with torch.no_grad():
        hidden = model(input_ids=IDS, attention_mask=MASK, output_hidden_states=True).hidden_states
    arch = Arch.from_config(config.to_dict(), tensor_names=state.keys())
    return arch, model, state, hidden


def layer_tensors(arch, state, l):
    prefix = arch.layer_prefix(l)
    return {n[len(prefix):]: state[n] for n in arch.layer_tensor_names(l, state)}


def embed(arch, state, requests=None):
    def rows(name, ids):
        if requests is not None:
            requests.append((name, ids.clone()))
        return state[name][ids]
    return arch.embed(IDS, rows, lambda name: state[name])


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_streamed_layers_match_full_model(case, attn):
    _, model, state, reference = case
    arch = Arch.from_config(model.config.to_dict(), tensor_names=state.keys(), attn_implementation=attn)
    real = MASK.bool()
    hidden = embed(arch, state)
    torch.testing.assert_close(hidden[real], reference[0][real], atol=1e-5, rtol=1e-5)
    for l in range(arch.n_layers):
        hidden = arch.forward_layer(arch.build_layer(l, layer_tensors(arch, state, l)), hidden, MASK)
        got = hidden
        if l == arch.n_layers - 1 and arch.model_type != "bert":
            # transformers 5 replaces the last hidden state by the final-norm output (tie_last_hidden_states)
            with torch.no_grad():
                got = model.model.norm(hidden)
        torch.testing.assert_close(got[real], reference[l + 1][real], atol=1e-5, rtol=1e-5)


def test_built_layer_is_fp32_eval_frozen(case):
    arch, _, state, _ = case
    tensors = {k: v.bfloat16() for k, v in layer_tensors(arch, state, 0).items()}
    layer = arch.build_layer(0, tensors)
    assert not layer.training
    assert all(p.dtype == torch.float32 and not p.requires_grad and p.device.type == "cpu"
               for p in layer.parameters())


def test_modules_exist_with_kind_and_groups_share_inputs(case):
    arch, _, state, _ = case
    layer = arch.build_layer(0, layer_tensors(arch, state, 0))
    specs = arch.modules()
    kinds = {"linear": torch.nn.Linear, "layernorm": torch.nn.LayerNorm}
    inputs, calls = {}, []
    for spec in specs:
        module = layer.get_submodule(spec.name)
        if spec.kind == "rmsnorm":
            assert type(module).__name__.endswith("RMSNorm")
            assert spec.eps == module.variance_epsilon
        else:
            assert isinstance(module, kinds[spec.kind])
            if spec.kind == "layernorm":
                assert spec.eps == module.eps

        def hook(mod, args, name=spec.name):
            inputs[name] = args[0]
            calls.append(name)
        module.register_forward_pre_hook(hook)
    # every Linear and norm in the layer is calibratable
    covered = {s.name for s in specs}
    assert {n for n, m in layer.named_modules()
            if isinstance(m, (torch.nn.Linear, torch.nn.LayerNorm)) or type(m).__name__.endswith("RMSNorm")} == covered

    arch.forward_layer(layer, embed(arch, state), MASK)
    groups = {}
    for spec in specs:
        groups.setdefault(spec.group, []).append(spec.name)
    for members in groups.values():
        assert all(torch.equal(inputs[m], inputs[members[0]]) for m in members)
    firsts = [inputs[members[0]] for members in groups.values()]
    assert all(not torch.equal(a, b) for i, a in enumerate(firsts) for b in firsts[i + 1:]
               if a.shape == b.shape)
    # groups appear in the order the forward first reaches them, members adjacent
    order = [s.group for s in specs]
    assert order == sorted(order, key=order.index)
    reached = [next(s.group for s in specs if s.name == c) for c in calls]
    assert list(dict.fromkeys(reached)) == list(groups)
    for spec in specs:
        if spec.per_head:
            assert inputs[spec.name].shape[-1] == arch.config.head_dim


def test_embed_requests_only_present_rows(case):
    arch, _, state, _ = case
    requests = []
    embed(arch, state, requests)
    [(name, ids)] = requests
    assert name == arch.stem_tensor_names()[0]
    assert ids.tolist() == sorted(set(IDS.flatten().tolist()))
    assert set(arch.stem_tensor_names()) <= set(state)


def test_build_layer_rejects_missing_unexpected_and_misshapen(case):
    arch, _, state, _ = case
    tensors = layer_tensors(arch, state, 1)
    name = sorted(tensors)[0]
    with pytest.raises(MergepipeError, match=f"missing tensor {name}") as err:
        arch.build_layer(1, {k: v for k, v in tensors.items() if k != name})
    assert "\n" not in str(err.value)
    with pytest.raises(MergepipeError, match="unexpected tensor extra.weight"):
        arch.build_layer(1, {**tensors, "extra.weight": torch.zeros(2)})
    with pytest.raises(MergepipeError, match=f"tensor {name} has shape"):
        arch.build_layer(1, {**tensors, name: tensors[name][..., :1]})


def test_legacy_rotary_buffer_is_ignored():
    config, model_cls = CASES["llama"]
    arch = Arch.from_config(config.to_dict())
    state = build(model_cls, config).state_dict()
    names = [*state, "model.layers.0.self_attn.rotary_emb.inv_freq"]
    assert "model.layers.0.self_attn.rotary_emb.inv_freq" not in arch.layer_tensor_names(0, names)
    arch.build_layer(0, {**layer_tensors(arch, state, 0), "self_attn.rotary_emb.inv_freq": torch.ones(4)})


def test_left_padding_is_rejected():
    config, model_cls = CASES["qwen2"]
    arch = Arch.from_config(config.to_dict())
    state = build(model_cls, config).state_dict()
    layer = arch.build_layer(0, layer_tensors(arch, state, 0))
    with pytest.raises(MergepipeError, match="right-padded"):
        arch.forward_layer(layer, torch.zeros(3, 7, 32), MASK.flip(1))


def test_unsupported_and_bad_configs(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(transformers.GPT2Config(n_layer=2).to_dict()))
    with pytest.raises(MergepipeError) as err:
        Arch.from_config(tmp_path)
    message = str(err.value)
    assert "'gpt2'" in message and "llama, mistral, qwen2, qwen3" in message and "\n" not in message
    with pytest.raises(MergepipeError, match="config.json not found"):
        Arch.from_config(tmp_path / "nowhere")
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(MergepipeError, match="not a valid config.json"):
        Arch.from_config(tmp_path / "config.json")
    with pytest.raises(MergepipeError, match="model_type None"):
        Arch.from_config({"hidden_size": 8})


def test_from_config_path_and_properties(tmp_path):
    config = CASES["qwen3"][0]
    config.save_pretrained(tmp_path)
    for source in (tmp_path, tmp_path / "config.json", config):
        arch = Arch.from_config(source)
        assert (arch.model_type, arch.n_layers, arch.hidden_size, arch.max_positions, arch.vocab_size) == (
            "qwen3", 2, 32, 64, 50)
        assert arch.layer_prefix(1) == "model.layers.1."
        assert arch.stem_tensor_names() == ["model.embed_tokens.weight"]
    assert arch.config is not config  # the caller's config object is never mutated
    assert [s.name for s in arch.modules() if s.per_head] == ["self_attn.q_norm", "self_attn.k_norm"]


@pytest.mark.parametrize("model_type, bare_cls, prefix", [
    ("bert", transformers.BertModel, "encoder.layer.0."),
    ("llama", transformers.LlamaModel, "layers.0."),
])
def test_name_root_detection(model_type, bare_cls, prefix):
    config = CASES[model_type][0]
    bare = bare_cls(config).state_dict().keys()
    assert Arch.from_config(config.to_dict(), tensor_names=bare).layer_prefix(0) == prefix
    assert Arch.from_config({**config.to_dict(), "architectures": [bare_cls.__name__]}).layer_prefix(0) == prefix
    assert Arch.from_config(config.to_dict()).layer_prefix(0) != prefix
    with pytest.raises(MergepipeError, match="no tensor named"):
        Arch.from_config(config.to_dict()).bind(["lm_head.weight"])
