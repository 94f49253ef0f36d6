"""The sampled-threshold top-k (``coopsgd.compression.sparse.topk_indices``) against the full-row selection it
replaced, kept here verbatim as the reference (and randk's candidate selection against its full one, qsgd's blocked draws against the whole array): the same indices, values and decoded rows, bit for bit, for
rows with many ties, all-equal rows, zeros, NaN and ±inf, k = 1 and k = d, float32 and float64, and batches
that mix rows taking the fast path with rows that fall back to the full top-k."""

from __future__ import annotations

import math

import pytest
import torch

from coopsgd.compression import QSGD, TopK, sparse
from coopsgd.compression.base import int_dtype_for, row_sum
from coopsgd.compression.rng import STREAM_QSGD, STREAM_RANDK, hash_words_torch, row_keys, uniform53
from coopsgd.compression.sparse import TOPK_SAMPLE, _sample_positions, randk_indices, topk_indices, topk_mask


def reference_mask(rows: torch.Tensor, k: int) -> torch.Tensor:
    """The selection as implemented before the sampled threshold (one torch.topk over the whole row)."""
    mag = torch.nan_to_num(rows.abs(), nan=math.inf, posinf=math.inf)
    threshold = torch.topk(mag, k, dim=1, sorted=False).values.amin(dim=1, keepdim=True)
    above = mag > threshold
    at = mag == threshold
    room = k - above.sum(dim=1, keepdim=True)
    return above | (at & (torch.cumsum(at, dim=1) <= room))


class _FixedK(TopK):
    """``topk`` with k given directly (k/d as a fraction F may round to another k)."""

    def __init__(self, k: int) -> None:
        super().__init__(1.0)
        self.fixed = k

    def k(self, d: int) -> int:
        return self.fixed


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view({torch.float32: torch.int32, torch.float64: torch.int64}[t.dtype])


def _check(rows: torch.Tensor, k: int) -> None:
    r, d = rows.shape
    want = reference_mask(rows, k)
    want_idx = want.nonzero()[:, 1].reshape(r, k)
    got_idx = topk_indices(rows, k)
    assert got_idx.dtype == torch.int64
    assert torch.equal(got_idx, want_idx)
    assert torch.equal(topk_mask(rows, k), want)
    # the compressor's payload and decoded rows, as the old code formed them
    q = _FixedK(k)
    payload = q.compress(rows, round=0, nodes=range(r), seed=0)
    assert torch.equal(payload.parts["indices"].to(torch.int64), want_idx)
    assert torch.equal(_bits(payload.parts["values"]), _bits(torch.gather(rows, 1, want_idx)))
    old_decoded = torch.where(want, rows, torch.zeros((), dtype=rows.dtype))
    assert torch.equal(_bits(q.decompress(payload)), _bits(old_decoded))
    assert torch.equal(_bits(q.roundtrip(rows, round=0, nodes=range(r), seed=0).decoded), _bits(old_decoded))


@pytest.fixture
def full_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts the rows that take the full top-k (the fallback) in each call."""
    calls: list[int] = []
    real = sparse._topk_full

    def spy(mag: torch.Tensor, k: int) -> torch.Tensor:
        calls.append(mag.shape[0])
        return real(mag, k)

    monkeypatch.setattr(sparse, "_topk_full", spy)
    return calls


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gaussian_rows_take_the_fast_path(dtype: torch.dtype, full_calls: list[int]) -> None:
    g = torch.Generator().manual_seed(0)
    rows = torch.randn(4, 1 << 16, generator=g, dtype=dtype)
    for k in (1, 7, 656, 2000):
        _check(rows, k)
    assert full_calls == []  # every row resolved from its candidates


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("levels", [3, 11, 41])
def test_many_ties(dtype: torch.dtype, levels: int, full_calls: list[int]) -> None:
    g = torch.Generator().manual_seed(levels)
    d = 40_000
    rows = torch.randint(-levels, levels + 1, (5, d), generator=g).to(dtype) * 0.25
    for k in (1, 2, 100, 400, 4000):
        full_calls.clear()
        _check(rows, k)
        if levels == 41 and k <= 400:  # a few top levels hold the candidates: ties resolved among them
            assert full_calls == []
        if levels == 3 and k <= 400:  # the top level alone holds 2/7 of the row (> d/8): the full top-k
            assert full_calls and all(n == 5 for n in full_calls)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_all_equal_zero_and_sparse_rows_fall_back(dtype: torch.dtype, full_calls: list[int]) -> None:
    d = 20_000
    rows = torch.zeros(4, d, dtype=dtype)
    rows[0] = 1.5  # all equal
    rows[1] = -2.0
    # rows[2]: all zero
    rows[3, ::997] = torch.arange(1, 22, dtype=dtype)  # 21 nonzeros, fewer than k: ties among the zeros
    for k in (1, 50, 200):
        _check(rows, k)
    assert full_calls and all(n > 0 for n in full_calls)


def test_unlucky_sample_falls_back_for_that_row_only(full_calls: list[int]) -> None:
    """A row whose sampled positions hold its largest values has fewer than k candidates: that row alone takes
    the full top-k, the others in the batch keep the fast path, and the result is the definition's."""
    d, k = 1 << 16, 656
    g = torch.Generator().manual_seed(3)
    rows = torch.randn(3, d, generator=g)
    s = min(TOPK_SAMPLE, d // 4)
    pos = _sample_positions(d, s, rows.device)
    rows[1].mul_(1e-3)
    rows[1, pos[:300]] = 10.0 + torch.arange(300, dtype=torch.float32)
    _check(rows, k)
    assert full_calls and all(n == 1 for n in full_calls)  # one row of three, in each of _check's calls
    full_calls.clear()
    _check(rows[1:2].clone(), k)  # that row alone
    assert full_calls and all(n == 1 for n in full_calls)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_nan_and_inf(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(5)
    d = 30_000
    rows = torch.randn(4, d, generator=g, dtype=dtype)
    rows[0, [5, 17, 29_999]] = math.nan
    rows[1, [0, 100, 200]] = math.inf
    rows[1, [50, 150]] = -math.inf
    rows[2, :: 3] = math.nan  # a third of the row: more non-finite coordinates than k
    rows[3, 1000:1300] = -math.inf
    rows[3, 2000:2100] = math.nan
    for k in (1, 3, 300, 450):
        _check(rows, k)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_k_equals_d_and_small_rows(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(7)
    for d in (1, 2, 10, 4095, 4096, 5000):
        rows = torch.randint(-3, 4, (3, d), generator=g).to(dtype)
        for k in sorted({1, max(1, d // 3), d}):
            _check(rows, k)


def test_signed_zeros_keep_their_bits() -> None:
    d = 10_000
    rows = torch.full((2, d), -0.0)
    rows[0, 7] = 3.0
    rows[1, 9_000] = -1.0
    _check(rows, 5)  # the kept -0.0 coordinates stay -0.0, the others are +0.0


def test_a_row_alone_and_in_a_batch_agree() -> None:
    g = torch.Generator().manual_seed(9)
    rows = torch.randn(6, 50_000, generator=g)
    rows[2] = 1.0  # a fallback row in the batch
    rows[4, 100:1000] = 0.0
    k = 500
    batch = topk_indices(rows, k)
    for i in range(rows.shape[0]):
        assert torch.equal(topk_indices(rows[i : i + 1], k)[0], batch[i])


def test_random_mixtures() -> None:
    """Rows mixing Gaussian values, repeated levels, zeros and non-finite coordinates, at random sizes and k."""
    g = torch.Generator().manual_seed(11)
    for trial in range(24):
        r = int(torch.randint(1, 4, (1,), generator=g))
        d = int(torch.randint(4096, 40_000, (1,), generator=g))
        dtype = torch.float64 if trial % 2 else torch.float32
        rows = torch.randn(r, d, generator=g, dtype=dtype)
        u = torch.rand(r, d, generator=g)
        rows = torch.where(u < 0.2, torch.randint(-4, 5, (r, d), generator=g).to(dtype), rows)
        rows = torch.where(u > 0.9, torch.zeros((), dtype=dtype), rows)
        rows[u > 0.9995] = math.nan
        rows[(u > 0.9990) & (u <= 0.9995)] = -math.inf
        k = int(torch.randint(1, d // 20, (1,), generator=g)) if trial % 3 else 1
        _check(rows, k)


# ---------------------------------------------------------------- randk: candidates below a key threshold


def reference_randk(ids: torch.Tensor, d: int, k: int, *, seed: int, round: int) -> torch.Tensor:
    """randk's selection as implemented before the candidate threshold (one top-k over every order)."""
    keys = row_keys(ids, seed=seed, round=round, stream=STREAM_RANDK)
    j = torch.arange(d, dtype=torch.int64).reshape(1, -1)
    order = hash_words_torch(keys, d).bitwise_left_shift_(31).bitwise_or_(j)
    return torch.sort(torch.topk(order, k, dim=1, largest=False, sorted=False).indices, dim=1).values


@pytest.mark.parametrize(("r", "d", "k"), [(1, 1 << 16, 656), (5, 50_000, 500), (3, 4096, 1), (2, 10_000, 1250),
                                           (2, 10_000, 1251), (4, 5000, 5000), (1, 100, 7), (3, 70_000, 1)])
def test_randk_indices_equal_the_full_selection(r: int, d: int, k: int) -> None:
    for seed, rnd in ((0, 0), (3, 17), (2**40, 2**35)):
        ids = torch.arange(7, 7 + r)
        assert torch.equal(randk_indices(ids, d, k, seed=seed, round=rnd),
                           reference_randk(ids, d, k, seed=seed, round=rnd))


def test_randk_a_row_short_of_candidates_takes_the_full_selection(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fewer candidates than k (forced by a negative threshold): the full selection, the same result."""
    calls: list[int] = []
    real = sparse._smallest_orders

    def spy(words: torch.Tensor, k: int) -> torch.Tensor:
        calls.append(words.shape[0])
        return real(words, k)

    monkeypatch.setattr(sparse, "_smallest_orders", spy)
    ids = torch.arange(3)
    want = reference_randk(ids, 20_000, 200, seed=1, round=2)
    assert torch.equal(randk_indices(ids, 20_000, 200, seed=1, round=2), want) and calls == []
    monkeypatch.setattr(sparse, "RANDK_MARGIN", -1e9)  # a threshold below every key: no candidate
    assert torch.equal(randk_indices(ids, 20_000, 200, seed=1, round=2), want) and calls == [3]


# ---------------------------------------------------------------- qsgd: draws compared block by block


def reference_qsgd_levels(rows: torch.Tensor, levels: int, nodes: torch.Tensor, *, seed: int, round: int) -> torch.Tensor:
    """qsgd's levels as computed before the blocked comparison (the whole (r, d) array of uniforms first)."""
    norm = row_sum(rows * rows).sqrt()
    safe = torch.where(norm > 0, norm, torch.ones_like(norm))
    y = rows.abs() / safe * levels
    low = torch.floor(y)
    u = uniform53(row_keys(nodes, seed=seed, round=round, stream=STREAM_QSGD), rows.shape[1])
    xi = low + (u < (y - low).to(torch.float64)).to(rows.dtype)
    return (torch.sign(rows) * xi).to(int_dtype_for(levels))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(("r", "d", "levels"), [(1, 70_000, 4), (5, 9000, 1), (3, 100, 300), (2, 40_000, 127)])
def test_qsgd_levels_equal_the_unblocked_draws(dtype: torch.dtype, r: int, d: int, levels: int) -> None:
    g = torch.Generator().manual_seed(d)
    rows = torch.randn(r, d, generator=g, dtype=dtype)
    rows[0, :50] = 0.0
    rows[-1, 7] = -0.0
    nodes = torch.arange(3, 3 + r)
    got = QSGD(levels).compress(rows, round=9, nodes=nodes, seed=5).parts["levels"]
    assert torch.equal(got, reference_qsgd_levels(rows, levels, nodes, seed=5, round=9))


def test_non_contiguous_rows() -> None:
    g = torch.Generator().manual_seed(13)
    wide = torch.randn(30_000, 3, generator=g)
    _check(wide.t(), 300)  # a transposed (column-major) batch
    _check(torch.randn(2, 50_000, generator=g)[:, 7:40_007], 400)  # a column slice
