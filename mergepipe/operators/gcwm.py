"""GCWM, Geometry-Conflict Wasserstein Merging (spec: shared/specs/gcwm.md; Wang et al., arXiv 2605.09608).

Each task update Delta_t of one projection matrix is summarised by the input-space covariance of its top
singular directions; the normalised Bures-Wasserstein spread of these covariances is the layer's
geometry conflict c. Their Gaussian Wasserstein barycenter defines a metric; a WUDI-style merge run in
that metric's whitened coordinates (the relation branch) is blended with the same merge run in plain
coordinates, with a logistic gate in c deciding how much the relation branch gets.

mergepipe's adaptations (the math is otherwise the reference implementation's, github.com/wyy-code/GCWM):
- T = 0 gives 0 and T = 1 gives Delta_1 without running the pipeline (the pipeline returns it anyway).
- The thin SVD is taken from an eigendecomposition of the smaller Gram matrix, and right singular
  directions whose singular value is numerical noise are left out of the union basis.
- The inner merge may use either of two Gram forms of the same gradient, or an exact ridge solve in
  fp64 (`solver=exact`: a different model, not a faster route to the default).
- The union basis drops dependent columns of [V_1|...|V_T] and redoes the QR, rather than dropping Q's
  columns, which can lose directions (only differs when a column is dependent, i.e. rarely in fp32).
- The k x k algebra (covariances, conflict, barycenter) runs on the CPU whatever device the deltas use.
- Target names match at dotted-name boundaries, so fused `qkv_proj`/`gate_up_proj` are not targets.
"""

from __future__ import annotations

import contextlib
import math
import os
from typing import Sequence

import torch

import numpy as np

from ..errors import MergepipeError
from . import Blockwise, Candidates, Certificate, Operator, Param, register
from .gcwm_stream import GcwmTensor

DEFAULT_TARGETS = ("q_proj.weight,k_proj.weight,v_proj.weight,o_proj.weight,"
                   "gate_proj.weight,up_proj.weight,down_proj.weight")
METRICS = ("barycenter", "mean")
GATES = ("sigmoid", "none")
SOLVERS = ("adam", "exact")
GRADIENTS = ("auto", "direct", "task_gram", "aggregated")
FORMS = ("direct", "task_gram", "aggregated")

ADAM_BETAS = (0.9, 0.999)
ADAM_EPS = 1e-8  # torch.optim.Adam's default, which the reference uses
NORM_FLOOR = 1e-12  # the reference's guard in e_t(j) and in the loss denominators
QR_DROP = 1e-8  # |R_jj| at or below this: a dependent column, left out of the union basis


def _finite(v) -> bool:
    return math.isfinite(v)


def _int_at_least(lo: int):
    # bool is an int subclass: `rank: true` must not read as 1
    return lambda v: not isinstance(v, bool) and v >= lo


def _patterns(targets: str) -> list[str]:
    return [t.strip() for t in targets.split(",") if t.strip()]


class Gcwm(Operator):
    """Whole-tensor access: an expert tensor is read whole or not at all, and one that is not read
    leaves that tensor's active set (it is never zero-filled)."""
    name = "gcwm"
    unit = "tensor"
    continual = True
    params = (
        Param("weight", float, per_expert=True, default=1.0, check=lambda v: _finite(v) and v >= 0,
              expect="a number >= 0"),
        Param("lambda", float, per_expert=False, default=0.2, check=_finite, expect="a finite number"),
        Param("rank", int, per_expert=False, default=16, check=_int_at_least(1), expect="an integer >= 1"),
        Param("energy", float, per_expert=False, default=0.9, check=lambda v: 0 < v <= 1,
              expect="a fraction in (0, 1]"),
        Param("eps", float, per_expert=False, default=1e-6, check=lambda v: _finite(v) and v > 0,
              expect="a number > 0"),
        Param("metric", str, per_expert=False, default="barycenter", check=lambda v: v in METRICS,
              expect=" or ".join(METRICS)),
        Param("barycenter_iters", int, per_expert=False, default=50, check=_int_at_least(1),
              expect="an integer >= 1"),
        Param("barycenter_tol", float, per_expert=False, default=1e-5, check=lambda v: _finite(v) and v > 0,
              expect="a number > 0"),
        Param("barycenter_damping", float, per_expert=False, default=1.0, check=lambda v: 0 < v <= 1,
              expect="a fraction in (0, 1]"),
        Param("gate", str, per_expert=False, default="sigmoid", check=lambda v: v in GATES,
              expect=" or ".join(GATES)),
        Param("gate_sharpness", float, per_expert=False, default=12.0, check=lambda v: _finite(v) and v >= 0,
              expect="a number >= 0"),
        Param("gate_threshold", float, per_expert=False, default=0.12, check=lambda v: 0 <= v <= 1,
              expect="a number in [0, 1]"),
        Param("gate_min", float, per_expert=False, default=0.15, check=lambda v: 0 <= v <= 1,
              expect="a number in [0, 1]"),
        Param("gate_max", float, per_expert=False, default=0.95, check=lambda v: 0 <= v <= 1,
              expect="a number in [0, 1]"),
        Param("skip_tol", float, per_expert=False, default=0.05, check=lambda v: 0 <= v < 0.5,
              expect="a number in [0, 0.5)"),
        Param("solver", str, per_expert=False, default="adam", check=lambda v: v in SOLVERS,
              expect=" or ".join(SOLVERS)),
        Param("inner_steps", int, per_expert=False, default=100, check=_int_at_least(0),
              expect="an integer >= 0"),
        Param("inner_lr", float, per_expert=False, default=1e-5, check=lambda v: _finite(v) and v > 0,
              expect="a number > 0"),
        Param("gradient", str, per_expert=False, default="auto", check=lambda v: v in GRADIENTS,
              expect=", ".join(GRADIENTS)),
        Param("gram_max_bytes", int, per_expert=False, default=1 << 30, check=_int_at_least(0),
              expect="an integer >= 0"),
        Param("targets", str, per_expert=False, default=DEFAULT_TARGETS, check=lambda v: bool(_patterns(v)),
              expect="a comma-separated list of tensor-name patterns"),
    )

    def validate(self, shared: dict) -> None:
        _check_gate(shared)

    def readable(self, tensors: dict, shared: dict, where: str) -> set[str]:
        targets = shared["targets"]
        for n, info in tensors.items():
            if matches(n, targets) and not is_target(n, info.shape, info.is_float, targets):
                raise MergepipeError(f"{where}: tensor {n!r} {list(info.shape)} ({info.dtype}) matches the gcwm "
                                     f"targets {targets!r}, but gcwm merges 2-D floating matrices only")
        found = {n for n, info in tensors.items() if is_target(n, info.shape, info.is_float, targets)}
        if not found:
            raise MergepipeError(f"{where}: no tensor of the base model matches the gcwm targets {targets!r} (2-D floating "
                                 "tensors, not embed or lm_head)")
        return found

    def candidates(self, info, k, delta, tp, coef, data) -> Candidates:
        """Every expert, scored by weight * ||Delta||_F: at 100% all are active (a zero delta still
        shapes the basis)."""
        norm = float(np.sqrt(np.sum(delta.l2.astype(np.float64) ** 2)))
        return Candidates(np.zeros(1, np.int64), np.array([tp.experts[k]["weight"] * norm]), np.zeros(1))

    def certificate(self, bound, data=None) -> Certificate:
        return Certificate("none", None, "gcwm is not additive (SVD, barycenter and the inner solve are "
                           "non-linear): an unread expert tensor leaves that tensor's active set, and only "
                           "the measured deviation is reported")

    def check_plan(self, name: str, tp, experts: int) -> None:
        super().check_plan(name, tp, experts)
        if any(r not in ([], [[0, tp.blocks]]) for r in tp.selected + tp.candidates):
            raise MergepipeError(f"plan.tensors.{name}: gcwm reads whole tensors, so each expert's "
                                 f"runs must be [] or [[0, {tp.blocks}]]")

    def kernel(self, job, dev: str, scratch):
        if not any(job.exact):  # not a target, or no expert read: the base, bit for bit
            return Blockwise(job.name, self.passthrough)
        return GcwmTensor(job, torch.device(dev), tensor_delta, NonFiniteDelta)

    def passthrough(self, block) -> np.ndarray:
        return block.base_copy()


GCWM = register(Gcwm())


def defaults() -> dict:
    """The shared (not per-expert) parameters at their defaults: what `Operator.resolve` fills in."""
    return {p.name: p.default for p in GCWM.params if not p.per_expert}


def _check_gate(params: dict) -> None:
    """What one Param cannot see: the gate's range must not be inverted."""
    if params["gate_min"] > params["gate_max"]:
        raise MergepipeError(f"gate_min = {params['gate_min']!r} exceeds gate_max = {params['gate_max']!r}; "
                             "expected gate_min <= gate_max")


def check_params(params: dict, where: str = "gcwm") -> None:
    """Validate a shared-parameter dict as a config would be: unknown keys, ranges, gate_min <= gate_max."""
    GCWM.resolve(params, [], where)


def matches(name: str, targets: str = DEFAULT_TARGETS) -> bool:
    """The name holds one pattern as whole dotted components, and neither embed nor lm_head.

    A plain substring test would take Phi-3's fused `qkv_proj.weight` for a `v_proj.weight` and
    `gate_up_proj.weight` for an `up_proj.weight`, which spec section 2 says must stay the base's."""
    low = name.lower()  # the reference lower-cases for these two tests only
    if "embed" in low or "lm_head" in low:
        return False
    dotted = f".{name}."
    return any(f".{pat}." in dotted for pat in _patterns(targets))


def is_target(name: str, shape: Sequence[int], dtype_is_float: bool, targets: str = DEFAULT_TARGETS) -> bool:
    """Spec section 2: a 2-D floating tensor that `matches` the targets."""
    return len(shape) == 2 and dtype_is_float and matches(name, targets)


# ----------------------------------------------------------------------------------------------------
# Geometry: rank rule, right singular directions, union basis, covariances

def _rank_from_energy(sq: torch.Tensor, max_rank: int, energy: float) -> int:
    e = torch.cumsum(sq, 0) / (sq.sum() + NORM_FLOOR)
    r = int((e < energy).sum()) + 1  # cumsum of non-negatives is non-decreasing
    return max(1, min(r, max_rank, sq.numel()))


def rank_for(s: torch.Tensor, max_rank: int, energy: float) -> int:
    """r = the smallest j with sum_{l<=j} s_l^2 / (sum_l s_l^2 + 1e-12) >= energy, clipped to [1, max_rank].
    `s` sorted in decreasing order."""
    return _rank_from_energy(s * s, max_rank, energy)


def right_factors(delta: torch.Tensor, max_rank: int, energy: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(V, s): the top-r right singular vectors (n x r) and singular values of delta (m x n).

    From eigh of the smaller Gram matrix rather than an SVD: only r <= 16 directions are kept, all with a
    large share of the energy, so squaring the condition number costs nothing that matters, and it is
    several times cheaper than a full thin SVD on the CPU (one GEMM plus a min(m,n)-sized eigh).
    Directions with a noise-level singular value (a zero delta, or r above the delta's rank) are returned
    as zero columns: an SVD would give arbitrary unit vectors there, which would add arbitrary directions
    to the union basis."""
    m, n = delta.shape
    if n <= m:
        lam, vecs = torch.linalg.eigh(delta.mT @ delta)
    else:
        lam, vecs = torch.linalg.eigh(delta @ delta.mT)
    lam = lam.flip(0).clamp_(min=0)
    r = _rank_from_energy(lam, max_rank, energy)
    top = vecs[:, -r:].flip(1)
    if n <= m:
        V = top.contiguous()
    else:
        V = delta.mT @ top
        norms = torch.linalg.vector_norm(V, dim=0)
        # Normalise by the measured norm, not sqrt(lambda): unit columns even where lambda is inexact
        V = V / torch.where(norms > 0, norms, torch.ones_like(norms))
    s = lam[:r].sqrt()
    noise = lam[:r] <= lam[0] * min(m, n) * torch.finfo(lam.dtype).eps
    if bool(noise.any()):
        V = V * (~noise).to(V.dtype)
    return V, s


def union_basis(bases: Sequence[torch.Tensor]) -> torch.Tensor:
    """Q (n x k): unpivoted QR of [V_1|...|V_T], keeping the columns with |R_jj| > 1e-8 (the first if none).

    |R_jj| <= 1e-8 says column j of the concatenation lies in the span of the columns before it. Dropping
    only Q's column j would lose directions: Q_j is then arbitrary, and every later column's component
    along it goes with it (V_2 = [a shared column, a new one] loses part of the new one). So the dependent
    columns are removed from the concatenation and the QR redone until none is left; when nothing is
    dependent (the usual case; in fp32 a dependent column's R_jj is rounding, ~1e-7, and passes) this is
    the single QR of the spec."""
    cat = torch.cat(list(bases), dim=1)
    first = None
    while True:
        Q, R = torch.linalg.qr(cat, mode="reduced")
        if first is None:
            first = Q[:, :1]
        keep = R.diagonal().abs() > QR_DROP
        if bool(keep.all()):
            return Q
        # columns past the diagonal (more columns than n) were not tested, and stay
        cols = torch.ones(cat.shape[1], dtype=torch.bool, device=cat.device)
        cols[:keep.numel()] = keep
        if not bool(cols.any()):
            return first
        cat = cat[:, cols]


def _sym(A: torch.Tensor) -> torch.Tensor:
    return 0.5 * (A + A.mT)


def covariances(Q: torch.Tensor, factors: Sequence[tuple[torch.Tensor, torch.Tensor]], eps: float) -> list[torch.Tensor]:
    """B_t = P_t diag(s_t^2) P_t^T + eps I with P_t = Q^T V_t, on the CPU (k x k)."""
    out = []
    for V, s in factors:
        P = (Q.mT @ V).cpu()
        s = s.cpu()
        B = _sym((P * (s * s)) @ P.mT)
        B.diagonal().add_(eps)
        out.append(B)
    return out


# ----------------------------------------------------------------------------------------------------
# PSD functions, Bures-Wasserstein distance, conflict, barycenter

def _eig_floor(A: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    mu, U = torch.linalg.eigh(_sym(A))
    return mu.clamp(min=eps), U


def psd_power(A: torch.Tensor, p: float, eps: float) -> torch.Tensor:
    """A^p := U diag(max(mu, eps)^p) U^T for A = sym(A) = U diag(mu) U^T."""
    mu, U = _eig_floor(A, eps)
    return (U * mu.pow(p)) @ U.mT


def bw_distance_sq(A: torch.Tensor, B: torch.Tensor, eps: float, A_half: torch.Tensor | None = None) -> float:
    """max(0, tr A + tr B - 2 tr (A^1/2 B A^1/2)^1/2), with the eps eigenvalue floor of every power."""
    A, B = _sym(A), _sym(B)
    if A_half is None:
        A_half = psd_power(A, 0.5, eps)
    mu = torch.linalg.eigvalsh(_sym(A_half @ B @ A_half)).clamp(min=eps)
    return max(0.0, float(A.trace() + B.trace() - 2.0 * mu.sqrt().sum()))


def _normalised(weights: Sequence[float]) -> list[float]:
    total = float(sum(weights))
    if total <= 0:  # every active weight zero: the reference falls back to equal weights
        return [1.0 / len(weights)] * len(weights)
    return [w / total for w in weights]


def conflict(covs: Sequence[torch.Tensor], pi: Sequence[float], eps: float) -> float:
    """c = sum_{i<j} pi_i pi_j d2(B_i,B_j)/(tr B_i + tr B_j + eps) / sum_{i<j} pi_i pi_j; 0 for one task."""
    T = len(covs)
    if T <= 1:
        return 0.0
    halves = [psd_power(B, 0.5, eps) for B in covs]
    num = den = plain = 0.0
    for i in range(T):
        for j in range(i + 1, T):
            cij = bw_distance_sq(covs[i], covs[j], eps, halves[i]) / (
                float(covs[i].trace() + covs[j].trace()) + eps)
            w = pi[i] * pi[j]
            num += w * cij
            den += w
            plain += cij
    # No pair with weight (one task carries all of it): the reference takes the unweighted mean
    return num / den if den > 0 else plain / (T * (T - 1) / 2)


def barycenter(covs: Sequence[torch.Tensor], pi: Sequence[float], eps: float, iters: int, tol: float,
               damping: float) -> tuple[torch.Tensor, int, bool]:
    """Fixed point of Alvarez-Esteban et al. (2016) for N(0, B_t + eps I): (Bbar, iterations, converged)."""
    k = covs[0].shape[0]
    eye = torch.eye(k, dtype=covs[0].dtype, device=covs[0].device)
    shifted = [_sym(B) + eps * eye for B in covs]
    Bbar = _sym(sum(w * B for w, B in zip(pi, shifted))) + eps * eye
    n, converged = 0, False
    for it in range(1, iters + 1):
        mu, U = _eig_floor(Bbar, eps)
        S = (U * mu.sqrt()) @ U.mT
        S_inv = (U * mu.rsqrt()) @ U.mT
        C = sum(w * psd_power(_sym(S @ B @ S), 0.5, eps) for w, B in zip(pi, shifted))
        new = _sym(S_inv @ (C @ C) @ S_inv) + eps * eye
        if damping < 1.0:
            new = _sym(damping * new + (1.0 - damping) * Bbar)
        rel = float(torch.linalg.matrix_norm(new - Bbar) / (torch.linalg.matrix_norm(Bbar) + eps))
        Bbar, n = new, it
        if rel < tol:
            converged = True
            break
    return _sym(Bbar), n, converged


def mean_metric(covs: Sequence[torch.Tensor], pi: Sequence[float]) -> torch.Tensor:
    """The `mean` alternative: Bbar = sum_t pi_t B_t."""
    return _sym(sum(w * B for w, B in zip(pi, covs)))


# ----------------------------------------------------------------------------------------------------
# Metric applied from the right: M_p = Q Bbar^p Q^T + eps^p (I - Q Q^T), never formed

def apply_metric(X: torch.Tensor, Q: torch.Tensor, K: torch.Tensor, scale: float) -> torch.Tensor:
    """(XQ) K Q^T + scale (X - XQ Q^T): one new m x n tensor."""
    XQ = X @ Q
    out = torch.addmm(X, XQ, Q.mT, alpha=-1)
    out.mul_(scale)
    out.addmm_(XQ @ K.to(X.device, X.dtype), Q.mT)
    return out


def whiten(X: torch.Tensor, Q: torch.Tensor, Bbar: torch.Tensor, eps: float) -> torch.Tensor:
    return apply_metric(X, Q, psd_power(Bbar, -0.5, eps), eps ** -0.5)


def recolor(Y: torch.Tensor, Q: torch.Tensor, Bbar: torch.Tensor, eps: float) -> torch.Tensor:
    return apply_metric(Y, Q, psd_power(Bbar, 0.5, eps), eps ** 0.5)


# ----------------------------------------------------------------------------------------------------
# Gate

def gate_value(c: float, mode: str = "sigmoid", sharpness: float = 12.0, threshold: float = 0.12,
               a_min: float = 0.15, a_max: float = 0.95) -> float:
    """a = clip(a_min + (a_max - a_min) sigma(sharpness (c - threshold)), a_min, a_max); 1 for mode none."""
    if mode == "none":
        return 1.0
    z = sharpness * (c - threshold)
    # the two branches keep exp() from overflowing at either end
    sig = 1.0 / (1.0 + math.exp(-z)) if z >= 0 else math.exp(z) / (1.0 + math.exp(z))
    return min(a_max, max(a_min, a_min + (a_max - a_min) * sig))


# ----------------------------------------------------------------------------------------------------
# Inner merge: L(v) = sum_t w_t ||(v - v_t) v_t^T||^2 / (||v_t||^2 + 1e-12)

def _loss_weights(vs: Sequence[torch.Tensor], weights: Sequence[float]) -> list[float]:
    return [w / (float(torch.linalg.vector_norm(v)) ** 2 + NORM_FLOOR) for v, w in zip(vs, weights)]


def choose_form(m: int, n: int, T: int, steps: int, gradient: str = "auto", gram_max_bytes: int = 1 << 30,
                itemsize: int = 4) -> str:
    """The gradient form for an m x n tensor: the one asked for, or under `auto` the fewest flops
    (precomputation included) among the forms whose n x n matrices fit in gram_max_bytes."""
    if gradient != "auto":
        return gradient
    if steps == 0:
        return "direct"  # nothing to precompute, nothing to run
    costs = {"direct": steps * 4 * T * m * m * n}
    if T * n * n * itemsize <= gram_max_bytes:
        costs["task_gram"] = 2 * T * m * n * n + steps * 2 * T * m * n * n
    # T = 1 excluded: v_1 A - R cancels to rounding and Adam turns rounding into full steps (spec 5)
    via_small = 2 * m < n
    if T >= 2 and (n * n + (m * m if via_small else n * n)) * itemsize <= gram_max_bytes:
        pre = T * (2 * m * n * n + (4 * m * m * n if via_small else 2 * m * n * n))
        costs["aggregated"] = pre + steps * 2 * m * n * n
    return min(costs, key=costs.get)  # ties go to the earlier, per-task form


class _Gradient:
    """grad L(x) into a preallocated buffer, in one of the three equivalent forms of spec 5."""

    def __init__(self, vs: Sequence[torch.Tensor], weights: Sequence[float], form: str):
        if form not in FORMS:
            raise MergepipeError(f"gcwm: gradient form {form!r}, expected one of {', '.join(FORMS)}")
        self.vs, self.form = list(vs), form
        self.q = _loss_weights(vs, weights)
        m, n = vs[0].shape
        like = vs[0]
        if form in ("direct", "task_gram"):
            self.D = torch.empty_like(like)
        if form == "direct":
            self.P = torch.empty((m, m), dtype=like.dtype, device=like.device)
        elif form == "task_gram":
            self.G = [v.mT @ v for v in vs]
        elif form == "aggregated":
            self.A, self.R = _grams(vs, self.q)

    def __call__(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        if self.form == "aggregated":
            return torch.addmm(self.R, x, self.A, beta=-2.0, alpha=2.0, out=out)
        out.zero_()
        for t, (v, q) in enumerate(zip(self.vs, self.q)):
            torch.sub(x, v, out=self.D)  # v - v_t first: exact zero where x = v_t
            if self.form == "direct":
                torch.mm(self.D, v.mT, out=self.P)
                out.addmm_(self.P, v, alpha=2.0 * q)
            else:
                out.addmm_(self.D, self.G[t], alpha=2.0 * q)
        return out


def _grams(vs: Sequence[torch.Tensor], q: Sequence[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """A = sum q_t v_t^T v_t (n x n) and R = sum q_t v_t v_t^T v_t (m x n), in the dtype of vs."""
    m, n = vs[0].shape
    like = vs[0]
    A = torch.zeros((n, n), dtype=like.dtype, device=like.device)
    R = torch.zeros((m, n), dtype=like.dtype, device=like.device)
    for v, qt in zip(vs, q):
        if 2 * m < n:  # R through the m x m Gram: 4m^2 n flops instead of 2mn^2
            A.addmm_(v.mT, v, alpha=qt)
            R.addmm_(v @ v.mT, v, alpha=qt)
        else:
            G = v.mT @ v
            A.add_(G, alpha=qt)
            R.addmm_(v, G, alpha=qt)
    return A, R


def inner_loss(x: torch.Tensor, vs: Sequence[torch.Tensor], weights: Sequence[float]) -> float:
    """L(x), for tests and diagnostics."""
    q = _loss_weights(vs, weights)
    return float(sum(qt * float(torch.linalg.matrix_norm((x - v) @ v.mT)) ** 2 for v, qt in zip(vs, q)))


def inner_grad(x: torch.Tensor, vs: Sequence[torch.Tensor], weights: Sequence[float], form: str = "direct") -> torch.Tensor:
    """grad L(x) in the given form."""
    return _Gradient(vs, weights, form)(x, torch.empty_like(x))


def _start(vs: Sequence[torch.Tensor]) -> torch.Tensor:
    x = vs[0].clone()
    for v in vs[1:]:
        x.add_(v)
    return x


def inner_adam(vs: Sequence[torch.Tensor], weights: Sequence[float], steps: int, lr: float,
               form: str = "direct") -> torch.Tensor:
    """From sum_t v_t, `steps` Adam steps on L: torch.optim.Adam's update (betas (0.9, 0.999), eps 1e-8,
    no weight decay) written out on four preallocated buffers (x, first and second moments, gradient)."""
    x = _start(vs)
    if steps == 0:
        return x
    grad = _Gradient(vs, weights, form)
    b1, b2 = ADAM_BETAS
    m = torch.zeros_like(x)
    s = torch.zeros_like(x)
    g = torch.empty_like(x)
    for k in range(1, steps + 1):
        grad(x, g)
        m.lerp_(g, 1 - b1)
        s.mul_(b2).addcmul_(g, g, value=1 - b2)
        # g is spent: it becomes the denominator, as torch computes it
        torch.sqrt(s, out=g).div_(math.sqrt(1 - b2 ** k)).add_(ADAM_EPS)
        x.addcdiv_(m, g, value=-lr / (1 - b1 ** k))
    return x


def inner_exact(vs: Sequence[torch.Tensor], weights: Sequence[float], delta_factor: float = 1e-6) -> torch.Tensor:
    """v* = (R + d v0)(A + d I)^-1 with v0 = sum v_t and d = delta_factor tr(A)/n, by Cholesky in fp64.

    A and R are formed in fp64 too: A is nearly singular (rank <= Tm) and its fp32 rounding
    (~1e-7 lambda_max) would exceed the ridge (1e-6 times the mean eigenvalue)."""
    dtype = vs[0].dtype
    v64 = [v.to(torch.float64) for v in vs]
    A, R = _grams(v64, _loss_weights(v64, weights))
    v0 = _start(v64)
    n = A.shape[0]
    tr = float(A.trace())
    if tr == 0:  # every v_t is zero, and so is the minimiser nearest v0
        return v0.to(dtype)
    d = delta_factor * tr / n
    A.diagonal().add_(d)
    R.add_(v0, alpha=d)
    del v64, v0
    L, info = torch.linalg.cholesky_ex(A)
    if int(info) != 0:
        raise MergepipeError(f"gcwm: the exact solver's system is not positive definite (ridge {d:.3g}); "
                             "use solver: adam")
    del A
    return torch.cholesky_solve(R.mT, L).mT.to(dtype).contiguous()


# ----------------------------------------------------------------------------------------------------
# One target tensor

class NonFiniteDelta(MergepipeError):
    """Delta `index` holds NaN or Inf; a caller that knows where the delta came from names the file."""

    def __init__(self, index: int) -> None:
        super().__init__(f"gcwm: delta {index} holds NaN or Inf values")
        self.index = index


def _check_inputs(deltas: Sequence[torch.Tensor], weights: Sequence[float]) -> None:
    if len(weights) != len(deltas):
        raise MergepipeError(f"gcwm: {len(deltas)} deltas but {len(weights)} weights")
    for i, w in enumerate(weights):
        if not (isinstance(w, (int, float)) and math.isfinite(w) and w >= 0):
            raise MergepipeError(f"gcwm: weight {i} = {w!r}, expected a number >= 0")
    shape = tuple(deltas[0].shape)
    if len(shape) != 2:
        raise MergepipeError(f"gcwm: deltas must be 2-D, got shape {list(shape)}")
    for i, d in enumerate(deltas):
        if tuple(d.shape) != shape:
            raise MergepipeError(f"gcwm: delta {i} has shape {list(d.shape)}, expected {list(shape)}")
        if not d.is_floating_point():
            raise MergepipeError(f"gcwm: delta {i} has dtype {d.dtype}, expected a floating dtype")


def _shortcut_diagnostics(T: int) -> dict:
    return {"active": T, "ranks": [], "union_rank": 0, "conflict": 0.0, "gate": None,
            "barycenter_iters": 0, "converged": True, "form": "shortcut", "branches": "none"}


def gcwm_delta(deltas: list[torch.Tensor], weights: list[float], p: dict, shortcut: bool = True, *,
               like: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
    """Delta* for one target tensor from the active experts' deltas and raw weights (lambda not applied).

    `p` holds GCWM parameters (missing ones take their defaults). Returns Delta* in the deltas' dtype and
    device, and JSON-ready diagnostics. T = 0 needs `like` for the shape; T = 1 returns deltas[0] itself
    unless shortcut=False. Shortcut diagnostics carry form "shortcut", branches "none" and gate None.
    Arithmetic is fp32, or fp64 for fp64 deltas."""
    p = {**defaults(), **p}
    check_params(p)
    T = len(deltas)
    if T == 0:
        if like is None:
            raise MergepipeError("gcwm: no active experts and no tensor to take the shape from")
        return torch.zeros_like(like), _shortcut_diagnostics(0)
    _check_inputs(deltas, weights)
    in_dtype = deltas[0].dtype
    work = torch.float64 if in_dtype == torch.float64 else torch.float32
    vs = [d.to(work) for d in deltas]
    for i, v in enumerate(vs):
        if not bool(torch.isfinite(v).all()):
            raise NonFiniteDelta(i)
    if T == 1 and shortcut:
        return deltas[0], _shortcut_diagnostics(1)

    omega = [float(w) for w in weights]
    if sum(omega) <= 0:  # the reference's fallback, for the loss weights as for pi
        omega = [1.0] * T
    pi = _normalised(omega)
    eps = p["eps"]
    m, n = vs[0].shape

    factors = [right_factors(v, p["rank"], p["energy"]) for v in vs]
    Q = union_basis([V for V, _ in factors])
    covs = covariances(Q, factors, eps)
    c = conflict(covs, pi, eps)
    if p["metric"] == "barycenter":
        Bbar, iters, converged = barycenter(covs, pi, eps, p["barycenter_iters"], p["barycenter_tol"],
                                            p["barycenter_damping"])
    else:
        Bbar, iters, converged = mean_metric(covs, pi), 0, True
    a = gate_value(c, p["gate"], p["gate_sharpness"], p["gate_threshold"], p["gate_min"], p["gate_max"])
    tol = p["skip_tol"]
    branches = "plain" if a <= tol else "relation" if a >= 1 - tol else "both"

    if p["solver"] == "exact":
        form = "exact"

        def inner(xs):
            return inner_exact(xs, omega)
    else:
        form = choose_form(m, n, T, p["inner_steps"], p["gradient"], p["gram_max_bytes"],
                           torch.finfo(work).bits // 8)

        def inner(xs):
            return inner_adam(xs, omega, p["inner_steps"], p["inner_lr"], form)

    out = None
    if branches != "plain":
        mu, U = _eig_floor(Bbar, eps)
        half = (U * mu.sqrt()) @ U.mT
        inv_half = (U * mu.rsqrt()) @ U.mT
        ws = [apply_metric(v, Q, inv_half, eps ** -0.5) for v in vs]
        out = apply_metric(inner(ws), Q, half, eps ** 0.5)
        del ws
    if branches != "relation":
        plain = inner(vs)
        if out is None:
            out = plain
        else:
            out.mul_(a).add_(plain, alpha=1.0 - a)
    diag = {"active": T, "ranks": [int(V.shape[1]) for V, _ in factors], "union_rank": int(Q.shape[1]),
            "conflict": float(c), "gate": float(a), "barycenter_iters": int(iters), "converged": bool(converged),
            "form": form, "branches": branches}
    return out.to(in_dtype), diag


# ----------------------------------------------------------------------------------------------------
# Thread policy of an execute

PARALLEL_NUMEL = 1 << 18  # from this many elements a tensor's GCWM uses every CPU core


@contextlib.contextmanager
def _all_cores(dev: torch.device, numel: int):
    """Streaming keeps torch single-threaded (its own threads do whole blocks); one large SVD or
    matmul on the CPU wants every core instead. Small tensors stay on one thread: OpenMP's barriers
    cost more than they save there (measured 15 ms against 3 us per tiny op on a busy 2-core box)."""
    before = torch.get_num_threads()
    if dev.type == "cpu":
        torch.set_num_threads((os.cpu_count() or 1) if numel >= PARALLEL_NUMEL else 1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def tensor_delta(deltas: list[torch.Tensor], weights: list[float], params: dict, dev: torch.device):
    """gcwm_delta under execute's thread policy. BLAS and LAPACK results depend on the thread count,
    so anything that must match an execute bit for bit (a replay, a test's reference) goes through here."""
    with _all_cores(dev, deltas[0].numel() if deltas else 0):
        return gcwm_delta(deltas, weights, params)
