"""Single-expert recovery on a really trained tiny family: calibrating a task-arithmetic merge toward
ONE expert, in module order, brings that expert's task NLL within 10% of the expert's own (and
closes most of the gap the merge opened). The family trains in seconds here: a 2-layer Qwen2 base
on two synthetic tasks, and per task an expert that fine-tunes the decoder layers only (embeddings
and head frozen), so everything an expert changed is something FeatCal calibrates."""

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from bench.quality.evaluate import evaluate_model  # noqa: E402
from bench.quality.family import Recipe, _encode, model_config, train  # noqa: E402
from bench.quality.tasks import BOS, EOS, encode, make_tokenizer, train_set  # noqa: E402
from mergepipe.featcal.calibrate import TensorSource, calibrate  # noqa: E402
from mergepipe.featcal.layers import Arch  # noqa: E402

TASKS = ("add", "rev")
RECIPE = Recipe(hidden=48, layers=2, heads=2, kv_heads=1, intermediate=96, pre_steps=100, pre_lr=3e-3,
                ft_steps=150, ft_lr=3e-3, ft_replay=0.25, batch=32, train_items=2000, threads=1, tasks=TASKS)


@pytest.fixture(scope="module")
def trained():
    from transformers import Qwen2ForCausalLM

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        data = {t: _encode(train_set(t, RECIPE.train_items, 0)) for t in TASKS}
        mix = [x for t in TASKS for x in data[t]]
        gen = torch.Generator().manual_seed(0)
        with torch.random.fork_rng():
            torch.manual_seed(0)  # transformers' init draws from the global generator
            model = Qwen2ForCausalLM(model_config(RECIPE)).float()
        train(model, mix, RECIPE.pre_steps, RECIPE.pre_lr, RECIPE.batch, gen)
        base = {k: v.detach().clone() for k, v in model.state_dict().items()}
        experts = {}
        for i, t in enumerate(TASKS):
            model.load_state_dict(base)
            for name, prm in model.named_parameters():
                prm.requires_grad_(".layers." in name)
            train(model, data[t], RECIPE.ft_steps, RECIPE.ft_lr, RECIPE.batch, torch.Generator().manual_seed(i + 1),
                  replay=mix, n_replay=8)
            experts[t] = {k: v.detach().clone() for k, v in model.state_dict().items()}
        yield model, base, experts
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("task", TASKS)
def test_calibrating_toward_one_expert_recovers_it(trained, task):
    model, base, experts = trained
    merged = {k: v + 0.3 * sum(e[k] - v for e in experts.values()) for k, v in base.items()}
    tok = make_tokenizer()

    def nll(weights):
        model.load_state_dict(weights)
        return evaluate_model(model, tok, (task,), n=100)[task]["nll"]
    ids = [[[BOS] + encode(p) + encode(a) + [EOS] for p, a in train_set(task, 64, seed=7)]]
    calibrated = dict(merged)
    calibrate(Arch.from_config(model.config.to_dict(), tensor_names=base), TensorSource(base), TensorSource(merged),
              [TensorSource(experts[task])], ids, {"samples": 64, "seq_len": 64}, calibrated.__setitem__)
    own, ta, cal = nll(experts[task]), nll(merged), nll(calibrated)
    assert ta > own + 0.05  # the merge really lost some of the expert's skill
    assert cal <= 1.1 * own, (own, ta, cal)
    assert (ta - cal) / (ta - own) > 0.9, (own, ta, cal)  # most of the gap closed
