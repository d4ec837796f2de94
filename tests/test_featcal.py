"""FeatCal: the properties of spec featcal.md §7 (items 1-7 and 9-12; item 8 belongs to the layer
adapter's tests), checked on fp64 synthetic statistics and on tiny random transformers models built
here. References are written independently: token-level least squares, brute-force grids, and a
direct non-streaming loop over whole transformers models."""

from __future__ import annotations

import json
import random
import re

import pytest
import torch
import transformers
from safetensors.torch import save_file

from mergepipe.checkpoint import Reader, open_model
from mergepipe.errors import MergepipeError
from mergepipe.featcal import solve as S
from mergepipe.featcal.calibrate import (FeatCalParams, SafetensorsSource, TensorSource, calibrate,
                                         plan_prefixes, unit_costs)
from mergepipe.featcal.data import batches, load_calibration
from mergepipe.featcal.layers import Arch

F64 = torch.float64
VOCAB = 300


pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------------------------------------
# fp64 synthetic statistics


def tokens(n: int, d: int, seed: int, scale: float = 1.0, shift: float = 0.3) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mix = torch.eye(d, dtype=F64) + 0.3 * torch.randn(d, d, generator=g, dtype=F64)
    return scale * (torch.randn(n, d, generator=g, dtype=F64) @ mix + shift)


def moments(xs: torch.Tensor, xt: torch.Tensor | None = None) -> S.Moments:
    st = S.LinearStats.zeros(xs.shape[1], same=xt is None)
    st.add(xs, xt, torch.ones(len(xs), dtype=F64))
    return st.moments()


def expert_data(k: int, d: int = 6, out: int = 4, n: int = 400):
    """k experts: student/teacher tokens at different scales, weights W_i, b_i."""
    g = torch.Generator().manual_seed(100)
    data = []
    for i in range(k):
        xs = tokens(n + 50 * i, d, seed=i, scale=1.0 + i)
        xt = xs + 0.2 * tokens(n + 50 * i, d, seed=10 + i)
        data.append((xs, xt, torch.randn(out, d, generator=g, dtype=F64), torch.randn(out, generator=g, dtype=F64)))
    anchor_w = torch.randn(out, d, generator=g, dtype=F64)
    anchor_b = torch.randn(out, generator=g, dtype=F64)
    return data, anchor_w, anchor_b


def fold_solve(data, a_w, a_b, lam, eps=1e-8):
    sums = S.LinearSums.zeros(a_w.shape[1])
    for xs, xt, w, b in data:
        S.fold_linear(sums, moments(xs, xt), {"m": (w, b)}, eps)
    return S.solve_linear(sums, {"m": (a_w, a_b)}, lam, eps)["m"]


def grad_j(w, data, a_w, lam, eps=1e-8):
    """∇J(W) = 2[Σ s_i (W C_ss,i − W_i C_ts,i) + λ(W − A) + ε_c W], from the tokens."""
    g = 2 * lam * (w - a_w) + 2 * eps * w
    for xs, xt, wi, _ in data:
        css, cts = xs.T @ xs / len(xs), xt.T @ xs / len(xs)
        s = 1 / max(float(torch.linalg.matrix_norm(css)), eps)
        g = g + 2 * s * (w @ css - wi @ cts)
    return g


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def norm_data(k: int, ch: int = 5, n: int = 300, layer: bool = False):
    """Per expert: merged norm inputs x, normalised z (fp64), and the expert's (γ_i, β_i)."""
    g = torch.Generator().manual_seed(7)
    out = []
    for i in range(k):
        x = tokens(n + 30 * i, ch, seed=20 + i, scale=1 + i, shift=0.5)
        z = S.normalize(x, "layernorm" if layer else "rmsnorm", 1e-6)
        out.append((x, z, 1 + 0.3 * torch.randn(ch, generator=g, dtype=F64), 0.2 * torch.randn(ch, generator=g, dtype=F64)))
    return out


def norm_sums(data, layer: bool) -> S.NormSums:
    sums = S.NormSums.zeros(data[0][0].shape[1])
    for x, _z, gam, bet in data:
        st = S.NormStats.zeros(x.shape[1])
        st.add(x[None], torch.ones(1, len(x), dtype=F64), "layernorm" if layer else "rmsnorm", 1e-6)
        m, e = st.moments()
        S.fold_norm(sums, m, e, gam, bet if layer else None)
    return sums


def test_single_expert_returns_its_weights():  # §7.1
    xs = tokens(2000, 8, seed=1)
    w1, b1 = torch.randn(5, 8, dtype=F64), torch.randn(5, dtype=F64)
    w, b = fold_solve([(xs, None, w1, b1)], torch.zeros(5, 8, dtype=F64), torch.zeros(5, dtype=F64), lam=0.0)
    assert rel(w, w1) < 1e-4 and rel(b, b1) < 1e-4
    for layer in (False, True):
        data = norm_data(1, layer=layer)
        sums = norm_sums(data, layer)
        if layer:
            g, bb = S.solve_layernorm(sums, torch.zeros(5), torch.zeros(5), 0.0, 1e-8)
            assert rel(g, data[0][2]) < 1e-10 and rel(bb, data[0][3]) < 1e-10
        else:
            assert rel(S.solve_rmsnorm(sums, torch.zeros(5), 0.0, 1e-8), data[0][2]) < 1e-12


def test_stationarity():  # §7.2
    data, a_w, a_b = expert_data(3)
    w, _ = fold_solve(data, a_w, a_b, lam=0.05)
    assert grad_j(w, data, a_w, 0.05).norm() <= 1e-8 * grad_j(a_w, data, a_w, 0.05).norm()
    assert grad_j(a_w, data, a_w, 0.05).norm() > 1e-3  # the anchor itself is not stationary


def test_anchor_limit():  # §7.3
    data, a_w, a_b = expert_data(3)
    data = [(xs / xs.norm(dim=1, keepdim=True), xt / xt.norm(dim=1, keepdim=True), w, b) for xs, xt, w, b in data]
    w, b = fold_solve(data, a_w, a_b, lam=1e8)
    assert rel(w, a_w) < 1e-6 and rel(b, a_b) < 1e-6
    nd = norm_data(3, layer=True)
    a_g, a_be = torch.full((5,), 0.7, dtype=F64), torch.full((5,), -0.1, dtype=F64)
    g, be = S.solve_layernorm(norm_sums(nd, True), a_g, a_be, 1e8, 1e-8)
    assert rel(g, a_g) < 1e-6 and rel(be, a_be) < 1e-6
    assert rel(S.solve_rmsnorm(norm_sums(norm_data(3), False), a_g, 1e8, 1e-8), a_g) < 1e-6


def test_bias_is_the_least_squares_solution():  # §7.4
    data, a_w, a_b = expert_data(3)
    lam = 0.05
    w, b = fold_solve(data, a_w, a_b, lam)
    # Σ_i s_i E‖W*x_s + b − W_i x_t − b_i‖² + λ‖b − a_b‖²: one row per token, b the only unknown
    rows, rhs = [], []
    for xs, xt, wi, bi in data:
        s = 1 / float(torch.linalg.matrix_norm(xs.T @ xs / len(xs)))
        r = (s / len(xs)) ** 0.5
        rows.append(torch.full((len(xs), 1), r, dtype=F64))
        rhs.append(r * (xt @ wi.T + bi - xs @ w.T))
    rows.append(torch.full((1, 1), lam ** 0.5, dtype=F64))
    rhs.append(lam ** 0.5 * a_b[None])
    ref = torch.linalg.lstsq(torch.cat(rows), torch.cat(rhs)).solution[0]
    assert rel(b, ref) < 1e-8


def test_rmsnorm_matches_brute_force():  # §7.5
    data = norm_data(3)
    lam, a = 0.05, torch.tensor([0.9, 1.1, 1.0, 0.5, 1.4], dtype=F64)
    got = S.solve_rmsnorm(norm_sums(data, False), a, lam, 1e-8)

    def objective(gam: torch.Tensor) -> torch.Tensor:  # gam [G, ch] -> [G, ch], from the tokens
        j = lam * (gam - a) ** 2
        for _x, z, gi, _ in data:
            j = j + ((gam[:, None, :] - gi) ** 2 * z ** 2).mean(1)
        return j
    grid = torch.linspace(-1, 3, 40001, dtype=F64)[:, None].expand(-1, 5)
    best = grid[objective(grid).argmin(0), torch.arange(5)]
    assert (got - best).abs().max() <= 1e-4  # the grid step
    for d in (1e-5, -1e-5):
        assert bool((objective(got[None])[0] < objective(got[None] + d)[0]).all())


def test_layernorm_matches_least_squares():  # §7.5
    data = norm_data(3, layer=True)
    lam = 0.05
    a_g, a_b = torch.linspace(0.5, 1.5, 5, dtype=F64), torch.linspace(-0.2, 0.2, 5, dtype=F64)
    g, b = S.solve_layernorm(norm_sums(data, True), a_g, a_b, lam, 1e-8)
    for k in range(5):
        rows, rhs = [], []
        for _x, z, gi, bi in data:
            r = (1 / len(z)) ** 0.5
            rows.append(r * torch.stack([z[:, k], torch.ones_like(z[:, k])], 1))
            rhs.append(r * (gi[k] * z[:, k] + bi[k]))
        rows.append(lam ** 0.5 * torch.eye(2, dtype=F64))
        rhs.append(lam ** 0.5 * torch.stack([a_g[k], a_b[k]]))
        ref = torch.linalg.lstsq(torch.cat(rows), torch.cat(rhs)[:, None]).solution[:, 0]
        assert abs(float(g[k] - ref[0])) < 1e-8 and abs(float(b[k] - ref[1])) < 1e-8


def test_norms_keep_an_agreed_value():  # §7.5
    agreed_g, agreed_b = torch.tensor([0.8, 1.2, 1.0, 0.3, 2.0], dtype=F64), torch.full((5,), 0.25, dtype=F64)
    for layer in (False, True):
        data = [(x, z, agreed_g, agreed_b) for x, z, _, _ in norm_data(3, layer=layer)]
        sums = norm_sums(data, layer)
        if layer:
            g, b = S.solve_layernorm(sums, agreed_g, agreed_b, 0.05, 1e-8)
            assert rel(g, agreed_g) < 1e-12 and rel(b, agreed_b) < 1e-12
        else:
            assert rel(S.solve_rmsnorm(sums, agreed_g, 0.05, 1e-8), agreed_g) < 1e-12


def test_scale_invariance():  # §7.6
    data, a_w, a_b = expert_data(3)
    w, _ = fold_solve(data, a_w, a_b, 0.05)
    xs, xt, wi, bi = data[1]
    scaled = [data[0], (37.0 * xs, 37.0 * xt, wi, bi), data[2]]
    assert rel(fold_solve(scaled, a_w, a_b, 0.05)[0], w) < 1e-10


def test_padding_changes_no_statistic():  # §7.7
    g = torch.Generator().manual_seed(3)
    xs, xt = torch.randn(2, 7, 6, generator=g), torch.randn(2, 7, 6, generator=g)
    omega = torch.ones(2, 7)
    omega[0, 5:] = 0
    garbage_s, garbage_t = xs.clone(), xt.clone()
    garbage_s[0, 5:], garbage_t[0, 5:] = 1e6, -3e5
    a, b = S.LinearStats.zeros(6), S.LinearStats.zeros(6)
    a.add(xs[omega.bool()], xt[omega.bool()], torch.ones(int(omega.sum())))
    b.add(garbage_s, garbage_t, omega)
    for f in ("s", "t", "ss", "st"):
        assert torch.equal(getattr(a, f), getattr(b, f))
    assert a.weight == b.weight == 12
    heads = torch.randn(2, 7, 3, 4, generator=g)  # q_norm: rows are (token, head) pairs
    clean, padded = S.NormStats.zeros(4), S.NormStats.zeros(4)
    clean.add(heads[omega.bool()][None], torch.ones(1, 12), "rmsnorm", 1e-6)
    heads[0, 5:] = 1e6
    padded.add(heads, omega, "rmsnorm", 1e-6)
    assert torch.equal(clean.z, padded.z) and torch.equal(clean.z2, padded.z2) and padded.weight == 36


def test_fold_equals_all_at_once():  # §7.7
    data, a_w, a_b = expert_data(4)
    lam, eps = 0.05, 1e-8
    lhs, rhs = (lam + eps) * torch.eye(6, dtype=F64), lam * a_w
    for xs, xt, wi, _ in data:
        css, cts = xs.T @ xs / len(xs), xt.T @ xs / len(xs)
        s = 1 / float(torch.linalg.matrix_norm(css))
        lhs, rhs = lhs + s * css, rhs + s * wi @ cts
    ref = torch.linalg.solve(lhs, rhs, left=False)  # (Σ s W_i C_ts + λA)(Σ s C_ss + (λ+ε)I)⁻¹
    assert rel(fold_solve(data, a_w, a_b, lam)[0], ref) < 1e-10


def test_singular_left_hand_side_falls_back_to_pseudo_inverse():
    lhs = torch.tensor([[1.0, 2.0], [2.0, 4.0]], dtype=F64)  # rank 1: Cholesky fails
    solve = S.spd_solver(lhs)
    r = torch.tensor([[1.0], [2.0]], dtype=F64)
    assert torch.allclose(solve(r), torch.linalg.pinv(lhs) @ r)


# ---------------------------------------------------------------------------------------------
# Tiny models


def tiny_config(kind: str):
    common = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                  num_attention_heads=4, max_position_embeddings=64)
    if kind == "bert":
        return transformers.BertConfig(**common)
    extra = dict(num_key_value_heads=2, tie_word_embeddings=False)
    if kind == "qwen3":
        extra["head_dim"] = 8
    return {"qwen2": transformers.Qwen2Config, "llama": transformers.LlamaConfig,
            "qwen3": transformers.Qwen3Config}[kind](**common, **extra)


def hf_model(cfg, sd=None):
    model = (transformers.AutoModel if cfg.model_type == "bert" else transformers.AutoModelForCausalLM).from_config(cfg)
    if sd is not None:
        model.load_state_dict(sd)
    return model.eval()


def family(kind: str, experts: int = 2, seed: int = 0):
    """(config, base, [experts], TA-0.3 merge): fp32 state dicts, experts = base + small deltas."""
    cfg = tiny_config(kind)
    torch.manual_seed(seed)
    base = {k: v.detach().clone() for k, v in hf_model(cfg).state_dict().items()}
    g = torch.Generator().manual_seed(seed + 1)
    # transformers initialises norms to 1 and biases to 0: give them values worth calibrating
    base = {k: v + 0.1 * torch.randn(v.shape, generator=g) if v.dim() == 1 else v for k, v in base.items()}
    exps = [{k: v + 0.05 * v.abs().mean() * torch.randn(v.shape, generator=g) for k, v in base.items()}
            for _ in range(experts)]
    merged = {k: base[k] + 0.3 * sum(e[k] - base[k] for e in exps) for k in base}
    return cfg, base, exps, merged


def token_ids(experts: int, n: int = 6, seed: int = 0) -> list[list[list[int]]]:
    rng = random.Random(seed)
    return [[[rng.randrange(VOCAB) for _ in range(rng.randrange(3, 13))] for _ in range(n)] for _ in range(experts)]


def run(arch, base, merged, exps, ids, params=None, prefixes=None, **kw):
    """calibrate() into a dict. A dict of params without lambda gets 0.05: the few short sequences
    here leave C_ss near-singular, and module order's default ridge (1e-5) would let fp32 rounding
    of the statistics through where a test compares two runs."""
    if params is None or isinstance(params, dict):
        params = {"lambda": 0.05, **(params or {})}
    out: dict[str, torch.Tensor] = {}

    def emit(name, t):
        assert name not in out, f"{name} emitted twice"
        out[name] = t.clone()
    def src(x):
        return TensorSource(x) if isinstance(x, dict) else x
    diag = calibrate(arch, src(base), src(merged), [src(e) for e in exps], ids, params, emit, prefixes=prefixes, **kw)
    return out, diag


def arch_for(cfg, sd) -> Arch:
    return Arch.from_config(cfg.to_dict(), tensor_names=list(sd))


@pytest.fixture(scope="module")
def qwen2():
    return family("qwen2")


@pytest.mark.parametrize("order", ["block", "module"])
@pytest.mark.parametrize("kind", ["qwen2", "llama", "qwen3", "bert"])
def test_fixed_point(kind, order):  # §7.9
    cfg, base, (e1,), _ = family(kind, experts=1)
    # 8 short sequences leave C_ss near-singular: lambda 0.05 keeps the fp32 statistics' rounding small
    out, diag = run(arch_for(cfg, e1), base, e1, [e1], token_ids(1, n=8), {"rho": 1.0, "lambda": 0.05, "order": order})
    assert out and len(diag.layers) == 2
    for name, t in out.items():
        assert rel(t, e1[name]) < 1e-5, name


CALIBRATED = {"self_attn.q_proj.weight", "self_attn.q_proj.bias", "self_attn.k_proj.weight", "self_attn.k_proj.bias",
              "self_attn.v_proj.weight", "self_attn.v_proj.bias", "self_attn.o_proj.weight", "mlp.gate_proj.weight",
              "mlp.up_proj.weight", "mlp.down_proj.weight", "input_layernorm.weight", "post_attention_layernorm.weight"}


def test_only_calibratable_layer_tensors_are_emitted(qwen2):  # §7.10
    cfg, base, exps, merged = qwen2
    arch, ids = arch_for(cfg, merged), token_ids(2)
    out, _ = run(arch, base, merged, exps, ids)
    assert set(out) == {f"model.layers.{l}.{k}" for l in range(2) for k in CALIBRATED}
    out, _ = run(arch, base, merged, exps, ids, {"calibrate_bias": False, "calibrate_norms": False})
    assert set(out) == {f"model.layers.{l}.{k}" for l in range(2) for k in CALIBRATED
                        if not k.endswith("bias") and "layernorm" not in k}
    out, diag = run(arch, base, merged, exps, ids, prefixes=[1, 0])  # layer 1 has no active expert
    assert {n.split(".")[2] for n in out} == {"0"} and [r.experts for r in diag.layers] == [[0]]
    out, diag = run(arch, base, merged, exps, ids, prefixes=[0, 0])
    assert out == {} and diag.layers == []


# The direct reference: whole transformers models, all sequences in one padded batch, statistics and
# solves written out in fp64; layer 1's student inputs come from the merged model after layer 0 was
# overwritten with its calibrated tensors.
LINEAR_GROUPS = {"attn_in": ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
                 "attn_out": ["self_attn.o_proj"], "mlp_in": ["mlp.gate_proj", "mlp.up_proj"],
                 "mlp_down": ["mlp.down_proj"]}
NORMS = ["input_layernorm", "post_attention_layernorm"]


def layer_inputs(model, layer: int, seqs) -> dict[str, torch.Tensor]:
    """Real-token rows of every hooked module input of `layer`, from one full-model forward."""
    width = max(map(len, seqs))
    ids = torch.tensor([s + [0] * (width - len(s)) for s in seqs])
    mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs])
    seen, handles = {}, []
    for name in [g[0] for g in LINEAR_GROUPS.values()] + NORMS:
        mod = model.model.layers[layer].get_submodule(name)
        handles.append(mod.register_forward_pre_hook(lambda m, a, name=name: seen.__setitem__(name, a[0])))
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask, use_cache=False)
    for h in handles:
        h.remove()
    return {k: v[mask.bool()].double() for k, v in seen.items()}


def direct_featcal(cfg, base, exps, merged, ids, p: FeatCalParams, prefixes):
    """The loop written out; `p.order` module re-collects a group's student inputs after the groups
    upstream of it were solved and put in the student, block collects them once per layer."""
    lam, rho, alpha, eps = p.lam, p.rho, p.alpha, p.eps
    student = hf_model(cfg, merged)
    teachers = [hf_model(cfg, e) for e in exps]
    steps = [("norm", NORMS[0]), ("linear", "attn_in"), ("linear", "attn_out"), ("norm", NORMS[1]),
             ("linear", "mlp_in"), ("linear", "mlp_down")]
    out = {}
    for layer in range(cfg.num_hidden_layers):
        pre = f"model.layers.{layer}."
        active = [i for i in range(len(exps)) if prefixes[i] > layer]
        xs = {i: layer_inputs(student, layer, ids[i]) for i in active}
        xe = {i: layer_inputs(teachers[i], layer, ids[i]) for i in active}
        solved = {}
        for kind, step in steps:
            if p.order == "module":
                xs = {i: layer_inputs(student, layer, ids[i]) for i in active}
            got = (_direct_linear(LINEAR_GROUPS[step], pre, xs, xe, exps, base, merged, active, lam, rho, alpha, eps)
                   if kind == "linear" else _direct_norm(step, pre, xs, exps, base, merged, active, lam, rho,
                                                         cfg.rms_norm_eps))
            solved.update(got)
            if p.order == "module":
                with torch.no_grad():
                    for k, v in got.items():
                        student.get_parameter(pre + k).copy_(v.float())
        with torch.no_grad():
            for k, v in solved.items():
                student.get_parameter(pre + k).copy_(v.float())
                out[pre + k] = v
    return out


def _direct_linear(names, pre, xs, xe, exps, base, merged, active, lam, rho, alpha, eps):
    solved = {}
    d = xs[active[0]][names[0]].shape[1]
    lhs, s_sum, s_mu = (lam + eps) * torch.eye(d, dtype=F64), 0.0, 0
    rhs, bias = {n: 0 for n in names}, {n: 0 for n in names}
    for i in active:
        x = xs[i][names[0]]
        t = alpha * xe[i][names[0]] + (1 - alpha) * x
        s = 1 / float(torch.linalg.matrix_norm(x.T @ x / len(x)))
        lhs, s_sum, s_mu = lhs + s * x.T @ x / len(x), s_sum + s, s_mu + s * x.mean(0)
        for n in names:
            wi = exps[i][pre + n + ".weight"].double()
            rhs[n] = rhs[n] + s * wi @ (t.T @ x / len(x))
            bias[n] = bias[n] + s * (exps[i].get(pre + n + ".bias", torch.zeros(wi.shape[0])).double() + wi @ t.mean(0))
    for n in names:
        a = {k: rho * merged[pre + n + k].double() + (1 - rho) * base[pre + n + k].double()
             for k in (".weight", ".bias") if pre + n + k in merged}
        w = torch.linalg.solve(lhs, rhs[n] + lam * a[".weight"], left=False)
        solved[n + ".weight"] = w
        if ".bias" in a:
            solved[n + ".bias"] = (bias[n] - w @ s_mu + lam * a[".bias"]) / (s_sum + lam)
    return solved


def _direct_norm(n, pre, xs, exps, base, merged, active, lam, rho, rms_eps):
    e_sum, eg_sum = 0, 0
    for i in active:
        x = xs[i][n]
        z = x / torch.sqrt((x ** 2).mean(1, keepdim=True) + rms_eps)
        e_sum, eg_sum = e_sum + (z ** 2).mean(0), eg_sum + (z ** 2).mean(0) * exps[i][pre + n + ".weight"].double()
    a = rho * merged[pre + n + ".weight"].double() + (1 - rho) * base[pre + n + ".weight"].double()
    return {n + ".weight": (eg_sum + lam * a) / (e_sum + lam)}


@pytest.mark.parametrize("order", ["block", "module"])
@pytest.mark.parametrize("alpha,prefixes", [(0.25, [2, 2]), (0.0, [2, 2]), (0.5, [2, 1])])
def test_forward_order_matches_direct_loop(qwen2, alpha, prefixes, order):  # §7.11
    cfg, base, exps, merged = qwen2
    ids = token_ids(2, n=10)
    # lambda large enough that the direct fp64 solve and the streamed one agree to 1e-5
    p = FeatCalParams(alpha=alpha, batch_size=3, order=order, lam=0.05)
    out, diag = run(arch_for(cfg, merged), base, merged, exps, ids, p, prefixes)
    ref = direct_featcal(cfg, base, exps, merged, ids, p, prefixes)
    assert set(out) == set(ref)
    worst = max(rel(out[k], ref[k]) for k in ref)
    assert worst < 1e-5, worst
    assert [r.experts for r in diag.layers] == [[0, 1], [0, 1] if prefixes == [2, 2] else [0]]
    assert diag.layers[0].shapes["self_attn.q_proj"] == (32, 32) and diag.layers[0].shapes["mlp.down_proj"] == (48, 48)
    assert all(v > 0 for v in diag.layers[1].rel_change.values())


def test_the_orders_differ_and_module_order_is_the_default(qwen2):
    cfg, base, exps, merged = qwen2
    arch, ids = arch_for(cfg, merged), token_ids(2, n=10)
    mod, _ = run(arch, base, merged, exps, ids, {"lambda": 0.05, "rho": 2.2, "alpha": 0.25})
    blk, _ = run(arch, base, merged, exps, ids, {"order": "block"})  # the reference's defaults
    assert FeatCalParams().order == "module" and FeatCalParams(order="block").lam == 0.05
    first = "model.layers.0.input_layernorm.weight"  # nothing upstream of it: the same in both orders
    assert torch.equal(mod[first], blk[first])
    assert not torch.equal(mod["model.layers.0.mlp.down_proj.weight"], blk["model.layers.0.mlp.down_proj.weight"])


def test_result_does_not_depend_on_batch_size(qwen2):  # §7.7
    cfg, base, exps, merged = qwen2
    arch, ids = arch_for(cfg, merged), token_ids(2, n=7)
    ref, _ = run(arch, base, merged, exps, ids, {"batch_size": 7})
    for bs in (1, 3):
        out, _ = run(arch, base, merged, exps, ids, {"batch_size": bs})
        worst = max(rel(out[k], ref[k]) for k in ref)
        assert worst < 1e-5, (bs, worst)


@pytest.mark.parametrize("order", ["block", "module"])
def test_store_dtype_rounds_before_the_stream_advances(qwen2, order):
    cfg, base, exps, merged = qwen2
    arch, ids = arch_for(cfg, merged), token_ids(2)
    out, _ = run(arch, base, merged, exps, ids, {"order": order}, store_dtype=torch.bfloat16)
    ref, _ = run(arch, base, merged, exps, ids, {"order": order})
    assert all(torch.equal(t, t.bfloat16().float()) for t in out.values())
    # what was solved before anything rounded ran: layer 0 (block), its input norm (module order)
    layer0 = [k for k in ref if ".layers.0." in k and (order == "block" or "input_layernorm" in k)]
    assert all(torch.equal(out[k], ref[k].bfloat16().float()) for k in layer0)
    # layer 1 was calibrated against the rounded layer 0: close to, but not, the fp32 run rounded
    assert any(not torch.equal(out[k], ref[k].bfloat16().float()) for k in ref if k not in layer0)


def test_alpha_zero_skips_the_expert_forward(qwen2):
    cfg, base, exps, merged = qwen2
    asked: list[tuple[str, str]] = []

    class Recording(TensorSource):
        def get(self, name):
            asked.append(("get", name))
            return super().get(name)

        def rows(self, name, ids):
            asked.append(("rows", name))
            return super().rows(name, ids)
    run(arch_for(cfg, merged), base, merged, [Recording(e) for e in exps], token_ids(2), {"alpha": 0.0})
    assert asked and all(kind == "get" and name.split("model.layers.")[1].split(".", 1)[1] in CALIBRATED
                         for kind, name in asked)


def test_streams_spill_to_disk_bit_identically(qwen2, tmp_path):
    cfg, base, exps, merged = qwen2
    arch, ids = arch_for(cfg, merged), token_ids(2)
    ref, d0 = run(arch, base, merged, exps, ids)
    out, d1 = run(arch, base, merged, exps, ids, ram_limit=0, tmp_dir=tmp_path / "spill")
    tokens_all = sum(len(s) for x in ids for s in x)
    assert d0.spilled_bytes == 0 and d1.spilled_bytes == 2 * tokens_all * 32 * 4  # student + expert streams
    assert all(torch.equal(out[k], ref[k]) for k in ref)
    assert list((tmp_path / "spill").iterdir()) == []


# ---------------------------------------------------------------------------------------------
# Checkpoints on disk, data files


def save_model(folder, cfg, sd):
    folder.mkdir(parents=True, exist_ok=True)
    cfg.to_json_file(str(folder / "config.json"))
    save_file({k: v.contiguous() for k, v in sd.items()}, str(folder / "model.safetensors"))
    return folder


def save_tokenizer(folder):
    """A byte-level BPE trained here on a toy corpus: what transformers' Qwen2Tokenizer expects."""
    import tokenizers
    from tokenizers import decoders, models, pre_tokenizers, trainers
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    words = "the cat sat on a mat while red foxes jump over lazy dogs and birds sing".split()
    corpus = [" ".join(words[(i * 7 + j) % len(words)] for j in range(9)) for i in range(50)]
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<|endoftext|>"],
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>",
                                         pad_token="<|endoftext|>").save_pretrained(str(folder))
    return tok, corpus


@pytest.fixture(scope="module")
def on_disk(qwen2, tmp_path_factory):
    cfg, base, exps, merged = qwen2
    root = tmp_path_factory.mktemp("featcal")
    paths = {"base": save_model(root / "base", cfg, base), "merged": save_model(root / "merged", cfg, merged)}
    paths.update({f"e{i}": save_model(root / f"e{i}", cfg, e) for i, e in enumerate(exps)})
    tok, corpus = save_tokenizer(paths["base"])
    return paths, tok, corpus


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_safetensors_source_reads_exact_ranges(on_disk):
    paths, _, _ = on_disk
    model, reader = open_model(paths["e0"]), Reader()
    src = SafetensorsSource(model, reader)
    full = src.get("model.embed_tokens.weight")
    assert reader.bytes_read[str(paths["e0"] / "model.safetensors")] == VOCAB * 32 * 4
    ids = torch.tensor([0, 3, 4, 5, 9, VOCAB - 1])
    assert torch.equal(src.rows("model.embed_tokens.weight", ids), full[ids])
    assert reader.bytes_read[str(paths["e0"] / "model.safetensors")] == (VOCAB + 6) * 32 * 4


def test_budget_reads_match_unit_costs(on_disk):
    paths, _, _ = on_disk
    models = [open_model(paths[k]) for k in ("base", "merged", "e0", "e1")]
    ids = token_ids(2)
    arch = Arch.from_config(paths["base"], tensor_names=models[0].tensors)
    for alpha in (0.25, 0.0):
        p = FeatCalParams(alpha=alpha, batch_size=4)
        costs = unit_costs(arch, models[2:], ids, p)
        budget = sum(costs[0]) + costs[1][0]
        prefixes = plan_prefixes(costs, budget)
        assert prefixes == [2, 1]
        readers = [Reader() for _ in models]
        srcs = [SafetensorsSource(m, r) for m, r in zip(models, readers)]
        calibrate(arch, srcs[0], srcs[1], srcs[2:], ids, p, lambda n, t: None, prefixes=prefixes)
        spent = [sum(r.bytes_read.values()) for r in readers[2:]]
        assert spent == [sum(c[:k]) for c, k in zip(costs, prefixes)] and sum(spent) <= budget


def test_plan_prefixes():
    assert plan_prefixes([[5, 5, 5], [3, 3, 3]], 13) == [2, 1]  # layer-major: (0,0) (1,0) (0,1), then (1,1) refused
    assert plan_prefixes([[4, 4], [4, 4]], 4) == [1, 0]  # ties go to the lower expert index
    assert plan_prefixes([[1, 10, 1], [1, 1, 1]], 5) == [1, 3]  # a refused expert stops, the others go on
    assert plan_prefixes([[1, 1], [1, 1]], 0) == [0, 0]
    rng = random.Random(0)
    for _ in range(200):
        costs = [[rng.randrange(0, 20) for _ in range(5)] for _ in range(rng.randrange(1, 5))]
        budget = rng.randrange(0, 120)
        pre = plan_prefixes(costs, budget)
        assert sum(sum(c[:k]) for c, k in zip(costs, pre)) <= budget  # budget-sound
        assert plan_prefixes(costs, sum(map(sum, costs))) == [5] * len(costs)
        left = budget - sum(sum(c[:k]) for c, k in zip(costs, pre))
        assert all(k == 5 or c[k] > left for c, k in zip(costs, pre))  # maximal: no next unit still fits


def test_text_and_ids_give_identical_results(on_disk, qwen2, tmp_path):  # §7.12
    paths, tok, corpus = on_disk
    cfg, base, exps, merged = qwen2
    texts = [corpus[i] + (" dogs" * i) for i in range(6)]
    text_file = write_jsonl(tmp_path / "text.jsonl", [{"text": t} for t in texts])
    ids_file = write_jsonl(tmp_path / "ids.jsonl", [{"input_ids": tok.encode(t).ids} for t in texts])
    a = load_calibration([text_file], 2, VOCAB, n=6, seq_len=16, tokenizer_root=paths["base"])
    b = load_calibration([ids_file], 2, VOCAB, n=6, seq_len=16)
    assert a.ids == b.ids and a.ids[0] == [tok.encode(t).ids[:16] for t in texts] and a.ids[0] == a.ids[1]
    assert max(map(len, a.ids[0])) == 16 and min(map(len, a.ids[0])) < 16  # truncated and ragged
    assert set(a.tokenizer_hashes) >= {str(paths["base"] / "tokenizer.json")} and b.tokenizer_hashes == {}
    assert a.data_hashes[str(text_file)] != b.data_hashes[str(ids_file)]
    models = [open_model(paths[k]) for k in ("base", "merged", "e0", "e1")]
    arch = Arch.from_config(paths["base"], tensor_names=models[0].tensors)
    results = []
    for calib in (a, b):
        srcs = [SafetensorsSource(m, Reader()) for m in models]
        results.append(run(arch, srcs[0], srcs[1], srcs[2:], calib.ids, {"batch_size": 4})[0])
    assert results[0].keys() == results[1].keys() and all(torch.equal(results[0][k], results[1][k]) for k in results[0])


@pytest.mark.parametrize("line,why", [
    ("not json", "not a JSON object"), ("[1, 2]", "not a JSON object"), ('{"input_ids": []}', "empty sequence"),
    ('{"input_ids": [1, 300]}', "outside [0, 300)"), ('{"input_ids": [1, true]}', "list of integers"),
    ('{"text": 5}', "must be a string"), ('{"text": "a", "input_ids": [1]}', "exactly one"),
    ('{"other": 1}', "exactly one"),
])
def test_bad_lines_fail_naming_file_and_line(tmp_path, line, why):  # §7.12
    f = tmp_path / "calib.jsonl"
    f.write_text('{"input_ids": [1, 2, 3]}\n\n' + line + "\n")
    with pytest.raises(MergepipeError, match=rf"^{re.escape(str(f))}:3: .*{re.escape(why)}"):
        load_calibration([f], 1, VOCAB, n=5, seq_len=8)


def test_missing_or_empty_files_fail(tmp_path):
    with pytest.raises(MergepipeError, match=rf"^{tmp_path / 'nope.jsonl'}: calibration file not found"):
        load_calibration([tmp_path / "nope.jsonl"], 1, VOCAB, n=5, seq_len=8)
    (tmp_path / "empty.jsonl").write_text("\n \n")
    with pytest.raises(MergepipeError, match=rf"^{tmp_path / 'empty.jsonl'}: calibration file is empty"):
        load_calibration([tmp_path / "empty.jsonl"], 1, VOCAB, n=5, seq_len=8)
    text = write_jsonl(tmp_path / "text.jsonl", [{"text": "hello"}])
    with pytest.raises(MergepipeError, match="text.jsonl:1: a text record needs"):
        load_calibration([text], 1, VOCAB, n=5, seq_len=8)


def test_first_n_records_and_task_routing(tmp_path):
    per = [write_jsonl(tmp_path / f"e{i}.jsonl", [{"input_ids": [i, k]} for k in range(5)]) for i in range(2)]
    got = load_calibration(per, 2, VOCAB, n=3, seq_len=8)
    assert got.ids == [[[0, 0], [0, 1], [0, 2]], [[1, 0], [1, 1], [1, 2]]] and len(got.data_hashes) == 2
    shared = write_jsonl(tmp_path / "shared.jsonl", [{"task": t, "input_ids": [k, j]}
                                                     for j in range(4) for k, t in enumerate(["math", "code"])])
    got = load_calibration([shared], 2, VOCAB, n=2, seq_len=8, tasks=["code", "math"])
    assert got.ids == [[[1, 0], [1, 1]], [[0, 0], [0, 1]]]
    with pytest.raises(MergepipeError, match="shared.jsonl: records carry"):
        load_calibration([shared], 2, VOCAB, n=2, seq_len=8)
    with pytest.raises(MergepipeError, match="shared.jsonl:1: task 'math' is not one of"):
        load_calibration([shared], 2, VOCAB, n=2, seq_len=8, tasks=["code", "chat"])
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text('{"task": "code", "input_ids": [1]}\n{"input_ids": [2]}\n')
    with pytest.raises(MergepipeError, match="mixed.jsonl:2: records must all carry"):
        load_calibration([mixed], 1, VOCAB, n=2, seq_len=8, tasks=["code"])


def test_batches_pad_on_the_right():
    (ids, mask), (ids2, mask2) = batches([[5, 6, 7], [8], [9, 9]], 2)
    assert ids.tolist() == [[5, 6, 7], [8, 0, 0]] and mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    assert ids2.tolist() == [[9, 9]] and mask2.tolist() == [[1, 1]]


def test_params_are_validated():
    assert FeatCalParams.from_dict({"lambda": 0.1, "samples": 8}) == FeatCalParams(lam=0.1, n=8)
    for bad in ({"lamda": 1}, {"alpha": 2}, {"lambda": -1}, {"batch_size": 0}, {"calibrate_bias": 1}):
        with pytest.raises(MergepipeError, match="^featcal: "):
            FeatCalParams.from_dict(bad)
