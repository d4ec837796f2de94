"""Operator kernels against mergekit 0.1.5's arithmetic, written out here as mergekit writes it."""

import numpy as np
import pytest
import torch

from mergepipe.operators import get
from mergepipe.operators.ta import merge_into
from mergepipe.sources import BlockInputs
from mergepipe.operators.ties_stream import Trim, elect_and_mean, trim_for
from mergepipe.errors import MergepipeError


def mergekit_combine(deltas, weights, lam, normalize, base, consensus):
    """generalized_task_arithmetic.merge_group after sparsification, verbatim in spirit."""
    w = torch.tensor(weights, dtype=deltas.dtype).view(-1, *([1] * base.dim()))
    deltas = deltas * w
    if consensus:
        majority = (deltas.sum(dim=0) >= 0).to(deltas.dtype) * 2 - 1
        mask = deltas.sign() == majority
        mixed = (deltas * mask).sum(dim=0)
        divisor = (w * mask).sum(dim=0)
        divisor[divisor == 0] = 1
    else:
        mixed = deltas.sum(dim=0)
        divisor = w.sum(dim=0)
        divisor[divisor.abs() < 1e-8] = 1
    if normalize:
        mixed /= divisor
    if lam != 1:
        mixed *= lam
    return base + mixed


def same_bits(a, b):
    return torch.equal(a.contiguous().view(torch.int32), b.contiguous().view(torch.int32))


@pytest.mark.parametrize("seed", range(6))
def test_elect_and_mean_is_mergekit_bit_for_bit(seed):
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(4, 5000, generator=g) * (torch.rand(4, 5000, generator=g) > 0.5)
    t[:, :50] = 0
    t[0, 50:100] = -0.0  # signed zeros, and sums that are exactly zero
    t[:, 100:200] = t[:, 100:200].abs() * torch.tensor([1, -1, 1, -1.0]).view(-1, 1)
    base = torch.randn(5000, generator=g)
    base[:20] = -0.0
    weights = [0.3, -0.2, 0.5, 1.0] if seed % 2 else [0.3] * 4
    for normalize in (True, False):
        ours = elect_and_mean(t.clone(), weights, 0.7, normalize, base)
        assert same_bits(ours, mergekit_combine(t, weights, 0.7, normalize, base, consensus=True))


@pytest.mark.parametrize("normalize, lam", [(False, 1.0), (True, 1.0), (False, 0.5)])
def test_ta_merge_into_is_mergekit_bit_for_bit(normalize, lam):
    g = torch.Generator().manual_seed(1)
    base = torch.randn(300_000, generator=g).bfloat16()
    experts = [(base.float() + torch.randn(300_000, generator=g) * 0.01).bfloat16() for _ in range(5)]
    weights = [0.3, 0.1, -0.2, 0.7, 0.25]
    out = torch.empty(300_000)
    raw = lambda t: t.view(torch.uint8).numpy()  # noqa: E731
    block = BlockInputs.of((raw(base), "BF16"), [(raw(e), "BF16") for e in experts], "F32")
    merge_into(out, block.base, [x for _, x in block.experts], weights, weights, lam, normalize, torch.device("cpu"))
    deltas = torch.stack([e.float() - base.float() for e in experts])
    assert same_bits(out, mergekit_combine(deltas, weights, lam, normalize, base.float(), consensus=False))


def test_trim_bin_brackets_the_kth_value():
    g = torch.Generator().manual_seed(0)
    d = torch.randn(100_000, generator=g).abs()
    fine = torch.bincount(d.view(torch.int32) >> 16, minlength=1 << 15).numpy()
    for density in (0.01, 0.2, 0.5, 0.9):
        t = trim_for(fine, d.numel(), density)
        k = int(density * d.numel())
        kth = float(d.topk(k).values[-1])
        assert t.lo <= kth < t.hi
        assert t.above == int((d >= t.hi).sum()) and t.need == k - t.above
    assert trim_for(fine, d.numel(), 1.0) == Trim(-1, 0, 0)


def test_operator_specs_reject_unknown_and_unused():
    ta = get("task_arithmetic")
    with pytest.raises(MergepipeError, match="takes no parameter 'seed'"):
        ta.resolve({"seed": 1}, [{"weight": 1}], "cfg")
    with pytest.raises(MergepipeError, match="'density' = 0.5, expected 1"):  # mergekit's, but a no-op here
        ta.resolve({}, [{"weight": 1, "density": 0.5}], "cfg")
    with pytest.raises(MergepipeError, match="takes no parameter 'seed'"):
        get("ties").resolve({"seed": 1}, [{"weight": 1}], "cfg")
    with pytest.raises(MergepipeError, match="'rescale' = 'yes', expected true or false"):
        get("ties").resolve({"rescale": "yes"}, [{"weight": 1}], "cfg")
    assert get("ties").resolve({"rescale": True}, [{"weight": 1}], "cfg")[0]["rescale"] is True
    shared, per = get("ties").resolve({"density": 0.4}, [{"weight": 1}], "cfg")
    assert per == [{"weight": 1.0, "density": 0.4}] and shared["normalize"] is True
    assert np.isclose(shared["lambda"], 1.0)


def test_whole_tensor_buffers_are_reused_but_never_the_one_being_written():
    import torch
    from mergepipe.operators.whole import Spares
    spares, cpu = Spares(), torch.device("cpu")
    a, b = spares.take(1000, cpu), spares.take(1000, cpu)
    spares.settle(b)  # b's bytes are still queued for the writer: only a comes back
    again = spares.take(600, cpu)
    assert again.numel() == 600 and again.data_ptr() == a.data_ptr()
    fresh = spares.take(600, cpu)  # nothing free is left: a new one
    assert fresh.data_ptr() not in (a.data_ptr(), b.data_ptr())
    spares.release(fresh)  # done with early: the same merge's next take reuses it
    assert spares.take(10, cpu).data_ptr() == fresh.data_ptr()
    spares.settle(torch.empty(1))
    assert len(spares.free) <= 3  # at most one tensor's worth is kept
    spares.clear()
    assert not spares.free and not spares.loans()


@pytest.mark.parametrize("quantum", [0.0, 2.0 ** -12])  # 2^-12: bf16-like deltas, most magnitudes tied
def test_ranking_top_is_the_sorted_keys_top(quantum):
    """sparsify.Ranking picks, for every k, exactly the k largest magnitude_key entries (a full sort),
    ties at the cut included; breadcrumbs' mask is the band of ascending ranks it asks for."""
    from mergepipe.operators import positional as P
    from mergepipe.operators import sparsify as S
    g = torch.Generator().manual_seed(11)
    d = torch.randn(20_011, generator=g) * 0.01
    if quantum:
        d = torch.round(d / quantum) * quantum
    d[:50] = 0.0
    ranked = torch.argsort(P.magnitude_key(d.abs(), 5), descending=True)
    ranking = S.Ranking(d.abs(), 5)
    for k in (0, 1, 7, 50, 6_003, 20_000, 20_011):
        want = torch.zeros(d.numel())
        want[ranked[:k]] = 1
        assert torch.equal(ranking.top(k), want), k
    mask = S.outliers_mask(d, 0.3, 0.05, 5)
    n = d.numel()
    target, top = int(0.3 * n), int(0.05 * n)
    band = torch.zeros(n)
    band[ranked[top:top + target]] = 1  # descending ranks [top, top + target)
    assert torch.equal(mask, band) and int(mask.sum()) == target


def test_uniform_draws_are_the_same_on_numpy_and_torch():
    """The CPU's numpy splitmix64 and the torch one a GPU runs give the same draws, bit for bit."""
    from mergepipe.operators import positional as P
    for key in (5, -123456789012345, 2 ** 62):
        for start, n in ((0, 1), (7, 100_003), (2 ** 33, 5_000)):
            torch_draws = P._shr(P.mix(key, start, n, "cpu"), 40).to(torch.float32).mul_(P._U24)
            assert torch.equal(P.uniform(key, start, n, "cpu"), torch_draws), (key, start, n)


@pytest.mark.parametrize("start", [0, 5, 2 ** 32 - 700, 3 * 2 ** 32 + 11])
def test_della_row_order_is_the_argsort_of_its_keys(start):
    """DELLA's CPU row order (a sort of the keys, each key's position recovered from its tie order)
    is torch's argsort of magnitude_key, ties at equal magnitudes included, across 2^32 boundaries."""
    from mergepipe.operators import positional as P
    from mergepipe.operators.sparsify import _row_order_numpy
    g = torch.Generator().manual_seed(1)
    rows = (torch.randint(-6, 7, (37, 320), generator=g).float() * 2 ** -9)  # a few levels: many ties
    rows[3, :100] = -0.0
    key = 0xDEADBEEF12345
    want = torch.argsort(P.magnitude_key(rows.abs(), key, start).reshape(rows.shape), dim=1)
    assert torch.equal(_row_order_numpy(rows, key, start), want)
    pos = np.arange(start, start + 1000, dtype=np.int64)
    assert np.array_equal(P.position_of(key, P.order_numpy(key, pos)), (pos & 0xFFFFFFFF).astype(np.uint32))
    assert np.array_equal(P.order_numpy(key, pos), P.order_at(key, torch.from_numpy(pos)).numpy())


@pytest.mark.parametrize("p", [0.3, 0.5, 0.123456789, 2 ** -24, 3 * 2 ** -24, 1e-9, 0.0, 0.9999999999])
def test_dare_keeps_exactly_the_draws_below_its_density(p):
    """DARE's CPU mask (one uint64 comparison per entry) keeps what `uniform < density` keeps in
    float32, the GPU's form, entry for entry, at the edges of 24-bit draws too."""
    from mergepipe.operators import positional as P
    for start, n in ((0, 70_001), (123_456_789, 200_000)):
        draws = P.uniform(77, start, n, "cpu")
        assert torch.equal(torch.from_numpy(P.below(77, start, n, p)), (draws < p).to(torch.float32)), (p, start)
