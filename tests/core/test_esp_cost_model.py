"""The ESP cluster cost model, its fit and its shipped profiles (all torch-free).

* ``cost_fit``: the relative-error NNLS recovers known coefficients (exact
  data, and 3% multiplicative noise), keeps them non-negative, reports
  unidentified parameters, and refuses singular designs.
* ``ESPCostModel``: DoP rows derived from the nearest fitted one, the
  tensor-parallel speed-up, chunk terms that add up to the whole prompt,
  the JSON round trip, the coefficient hash, invalid files.
* Profiles: the committed derived JSON is what its builder produces.
"""

from __future__ import annotations

import itertools
import json
import math
import random
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vllm_esp.core.esp.cost_fit import (
    DecodeSample,
    PrefillSample,
    SingularFitError,
    fit_decode,
    fit_decode_detailed,
    fit_prefill,
    mean_relative_error,
    ring_hop_from_rows,
    solve_linear,
)
from vllm_esp.core.esp.cost_model import (
    DecodeCoeffs,
    ESPCostModel,
    MigrationCoeffs,
    PrefillCoeffs,
    chunk_terms,
)
from vllm_esp.core.esp.profiles import (
    DERIVED_PROFILES,
    Roofline,
    derived_a800_profile,
    load_profile,
    profile_path,
)

BATCHES = (1, 2, 4, 8)
#: Up to where the quadratic term is about half the time, so C is determined.
LENGTHS = (64, 512, 4096, 32768)


def prefill_samples(a: float, b: float, c: float, noise: float = 0.0, seed: int = 0):
    """Batches of identical requests, LoongServe's profiling grid in small."""
    rng = random.Random(seed)
    out = []
    for n in BATCHES:
        for length in LENGTHS:
            sum_l, sum_l2 = n * length, n * length * length
            t = (a + b * sum_l + c * sum_l2) * (1 + rng.uniform(-noise, noise))
            out.append(PrefillSample(sum_l, sum_l2, t))
    return out


def decode_samples(
    a, b, c, e, f=0.0, g=0.0, noise: float = 0.0, seed: int = 0, remote: bool = True
):
    """Steps of ``n`` requests of ``ctx`` tokens, ``r`` of them striped (remote)."""
    rng = random.Random(seed)
    out = []
    for n in (1, 4, 16, 64):
        for ctx in (128, 2048, 16384):
            for r in (0, n // 2 + 1) if remote else (0,):
                striped = r * ctx
                t = a + b * n + c * n * ctx + ((e * r + f + g * striped) if r else 0.0)
                t *= 1 + rng.uniform(-noise, noise)
                out.append(DecodeSample(n, n * ctx, r, t, striped))
    return out


def model(**kw) -> ESPCostModel:
    base = dict(
        prefill={1: PrefillCoeffs(0.02, 4e-5, 1e-9)},
        decode=DecodeCoeffs(9e-3, 4e-5, 1.6e-7, 1e-6),
        migration=MigrationCoeffs(1e-3, 524288.0, 8e11),
        ring_hop_s=3e-4,
        tp_efficiency=0.9,
        source="derived",
    )
    base.update(kw)
    return ESPCostModel(**base)


# ------------------------------------------------------------------ solver
def test_solve_linear_solves_and_refuses_singular():
    matrix = [[0.0, 2.0, 1.0], [1.0, 1.0, 0.0], [3.0, 0.0, 1.0]]  # needs a row swap
    rhs = [5.0, 3.0, 6.0]
    x = solve_linear(matrix, rhs)
    assert [sum(a * v for a, v in zip(row, x)) for row in matrix] == pytest.approx(rhs)
    with pytest.raises(SingularFitError):
        solve_linear([[1.0, 2.0], [2.0, 4.0]], [1.0, 2.0])
    with pytest.raises(SingularFitError):
        solve_linear([[0.0, 0.0], [0.0, 0.0]], [0.0, 0.0])


# ------------------------------------------------------------------ fits
@settings(max_examples=60, deadline=None)
@given(
    a=st.floats(1e-3, 5e-2),
    b=st.floats(1e-6, 1e-4),
    c=st.floats(1e-11, 1e-8),
)
def test_fit_prefill_recovers_exact_coefficients(a, b, c):
    row = fit_prefill(prefill_samples(a, b, c))
    assert (row.A_s, row.B_s, row.C_s) == pytest.approx((a, b, c), rel=1e-6)
    assert row.mean_rel_err < 1e-9


@pytest.mark.parametrize("seed", range(5))
def test_fit_prefill_with_noise(seed):
    a, b, c = 0.02, 4e-5, 1e-9
    samples = prefill_samples(a, b, c, noise=0.03, seed=seed)
    row = fit_prefill(samples)
    assert row.mean_rel_err < 0.1
    # Every sample is predicted within the noise's order of magnitude.
    assert all(abs(row.time(s.sum_l, s.sum_l2) - s.seconds) / s.seconds < 0.1 for s in samples)
    assert row.A_s == pytest.approx(a, rel=0.15)
    assert row.B_s == pytest.approx(b, rel=0.15)
    assert row.C_s == pytest.approx(c, rel=0.15)


def test_fit_prefill_is_non_negative():
    # Times that fall with length beyond the intercept: unconstrained, B < 0.
    samples = [
        PrefillSample(n * length, n * length**2, 0.05 - 1e-6 * n * length + 1e-9 * n * length**2)
        for n in BATCHES
        for length in LENGTHS
    ]
    row = fit_prefill(samples)
    assert min(row.A_s, row.B_s, row.C_s) >= 0
    assert row.B_s == 0.0
    assert row.mean_rel_err == pytest.approx(
        mean_relative_error(
            (row.A_s, row.B_s, row.C_s),
            [(1.0, s.sum_l, s.sum_l2) for s in samples],
            [s.seconds for s in samples],
        )
    )


@pytest.mark.parametrize(
    "truth",
    [(9e-3, 4e-5, 1.6e-7, 1e-6, 0.0, 0.0), (9e-3, 4e-5, 1.6e-7, 1e-6, 4e-3, 2e-7)],
    ids=["no-step-terms", "step-terms"],
)
def test_fit_decode_recovers_coefficients(truth):
    exact = fit_decode(decode_samples(*truth))
    d = exact
    assert (d.a_s, d.b_s, d.c_s, d.e_s, d.f_s, d.g_s) == pytest.approx(truth, rel=1e-6, abs=1e-12)
    noisy = fit_decode(decode_samples(*truth, noise=0.03, seed=1))
    assert noisy.mean_rel_err < 0.1
    assert noisy.c_s == pytest.approx(truth[2], rel=0.15)
    assert noisy.a_s == pytest.approx(truth[0], rel=0.15)


def test_fit_decode_without_remote_samples_leaves_the_exchange_terms_at_zero():
    samples = decode_samples(9e-3, 4e-5, 1.6e-7, 0.0, remote=False)
    fit = fit_decode_detailed(samples)
    assert fit.unidentified == (3, 4, 5)
    assert fit.coeffs[3:] == (0.0, 0.0, 0.0)
    assert fit.coeffs[2] == pytest.approx(1.6e-7, rel=1e-6)


def test_singular_samples_raise():
    same = [PrefillSample(1024, 1024**2, 0.1)] * 6
    with pytest.raises(SingularFitError, match="singular"):
        fit_prefill(same)
    # One length only: sum_l2 = l * sum_l, B and C are not separable.
    one_len = [PrefillSample(n * 512, n * 512**2, 0.01 + 1e-4 * n) for n in BATCHES]
    with pytest.raises(SingularFitError):
        fit_prefill(one_len)
    with pytest.raises(SingularFitError):
        fit_prefill(prefill_samples(0.02, 4e-5, 1e-9)[:2])
    with pytest.raises(ValueError):
        fit_prefill([PrefillSample(1, 1, 0.0)] * 3)


def test_ring_hop_from_rows():
    rows = {1: PrefillCoeffs(0.010, 1e-5, 1e-9), 2: PrefillCoeffs(0.013, 5e-6, 5e-10)}
    assert ring_hop_from_rows(rows) == pytest.approx(3e-3)
    assert ring_hop_from_rows({1: rows[1]}) == 0.0
    shrinking = {1: rows[2], 2: rows[1]}
    assert ring_hop_from_rows({1: rows[1], 2: PrefillCoeffs(0.009, 0, 0)}) == 0.0
    assert ring_hop_from_rows(shrinking) == 0.0


# ------------------------------------------------------------------ the model
@pytest.mark.parametrize("dop", [2, 3, 4, 8])
def test_derived_dop_rows(dop):
    m = model()
    row = m.prefill_coeffs(dop)
    base = m.prefill[1]
    assert row.B_s == pytest.approx(base.B_s / dop)
    assert row.C_s == pytest.approx(base.C_s / dop)
    assert row.A_s == pytest.approx(base.A_s + m.ring_hop_s * (dop - 1))


def test_derived_rows_start_from_the_nearest_fitted_dop():
    m = model(prefill={1: PrefillCoeffs(0.02, 4e-5, 1e-9), 2: PrefillCoeffs(0.03, 3e-5, 6e-10)})
    row = m.prefill_coeffs(6)
    assert row.B_s == pytest.approx(3e-5 * 2 / 6)
    assert row.C_s == pytest.approx(6e-10 * 2 / 6)
    assert row.A_s == pytest.approx(0.03 + 4 * m.ring_hop_s)
    assert m.prefill_coeffs(2) is m.prefill[2]
    with pytest.raises(ValueError):
        m.prefill_coeffs(0)


def test_tensor_parallel_speedup():
    m = model()
    sum_l, sum_l2 = 8192.0, 8192.0**2
    base = m.prefill[1]
    for degree in (2, 4, 8):
        speedup = degree * m.tp_efficiency ** math.log2(degree)
        tp = m.prefill_time(degree, sum_l, sum_l2, tensor_parallel=True)
        assert tp == pytest.approx(base.A_s + (base.B_s * sum_l + base.C_s * sum_l2) / speedup)
        assert tp < m.prefill_time(1, sum_l, sum_l2)
        d = m.decode
        step = m.decode_time(16, 16 * 4096, tp_degree=degree)
        assert step == pytest.approx(d.a_s + (d.b_s * 16 + d.c_s * 16 * 4096) / speedup)
    assert m.prefill_time(1, sum_l, sum_l2, tensor_parallel=True) == m.prefill_time(
        1, sum_l, sum_l2
    )


@settings(max_examples=100, deadline=None)
@given(
    length=st.integers(1, 100_000),
    cuts=st.lists(st.floats(0.0, 1.0), max_size=6),
)
def test_chunks_add_up_to_the_whole_prompt(length, cuts):
    points = sorted({0, length, *(int(c * length) for c in cuts)})
    chunks = [(hi - lo, lo) for lo, hi in itertools.pairwise(points)]
    sum_l, sum_l2 = chunk_terms(chunks)
    assert sum_l == length
    assert sum_l2 == pytest.approx(float(length) ** 2, rel=1e-12)
    m = model()
    # Without the fixed cost, chunking changes nothing (each chunk pays A).
    whole = m.prefill_time(1, length, float(length) ** 2) - m.prefill[1].A_s
    assert m.chunks_time(1, chunks) - m.prefill[1].A_s == pytest.approx(whole, rel=1e-9)


def test_decode_and_migration_times():
    m = model()
    d = m.decode
    assert m.decode_time(0, 0) == 0.0
    assert m.decode_time(4, 1000, 2) == pytest.approx(d.a_s + 4 * d.b_s + 1000 * d.c_s + 2 * d.e_s)
    s = model(decode=DecodeCoeffs(9e-3, 4e-5, 1.6e-7, 1e-6, f_s=3e-3, g_s=5e-7))
    local = 9e-3 + 4 * 4e-5 + 1000 * 1.6e-7
    # The step terms apply only to a step that exchanges.
    assert s.decode_time(4, 1000, 0, 0) == pytest.approx(local)
    assert s.decode_time(4, 1000, 2, 600) == pytest.approx(local + 2e-6 + 3e-3 + 600 * 5e-7)
    assert m.migration_time(0) == 0.0
    assert m.migration_time(1000) == pytest.approx(1e-3 + 1000 * 524288 / 8e11)


# ------------------------------------------------------------------ io
def test_json_round_trip_and_hash(tmp_path):
    m = model(
        prefill={1: PrefillCoeffs(0.02, 4e-5, 1e-9, 0.05), 2: PrefillCoeffs(0.021, 2e-5, 5e-10)}
    )
    path = tmp_path / "cost.json"
    m.save(path)
    back = ESPCostModel.load(path)
    assert back == m
    assert back.to_json() == m.to_json()
    assert back.sha256() == m.sha256()
    # meta is provenance, not part of the hash; coefficients are.
    assert model(meta={"note": "x"}).sha256() == model().sha256()
    assert model(ring_hop_s=4e-4).sha256() != model().sha256()
    assert model(decode=DecodeCoeffs(9e-3, 4e-5, 1.7e-7, 1e-6)).sha256() != model().sha256()
    # Zero step terms are left out of the file (older files keep their hash);
    # nonzero ones round-trip.
    assert set(m.to_json()["decode"]) == {"a_s", "b_s", "c_s", "e_s", "mean_rel_err"}
    striped = model(decode=DecodeCoeffs(9e-3, 4e-5, 1.6e-7, 1e-6, f_s=3e-3, g_s=5e-7))
    striped.save(path)
    assert ESPCostModel.load(path) == striped
    assert striped.sha256() != model().sha256()


@pytest.mark.parametrize(
    "content",
    [
        "not json",
        json.dumps({"format": "something-else"}),
        json.dumps({"format": "vllm-esp-cost/1"}),
        "NEGATIVE",
        "NO_DOP1",
    ],
)
def test_invalid_files_raise_value_error(tmp_path, content):
    good = model().to_json()
    if content == "NEGATIVE":
        good["prefill"]["1"]["B_s"] = -1.0
        content = json.dumps(good)
    elif content == "NO_DOP1":
        good["prefill"] = {"2": good["prefill"]["1"]}
        content = json.dumps(good)
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(ValueError):
        ESPCostModel.load(path)
    with pytest.raises(ValueError):
        ESPCostModel.load(tmp_path / "missing.json")


# ------------------------------------------------------------------ profiles
@pytest.mark.parametrize("name", sorted(DERIVED_PROFILES))
def test_committed_profile_is_what_the_builder_makes(name):
    built = DERIVED_PROFILES[name]()
    committed = json.loads(profile_path(name).read_text())
    assert committed == built.to_json(), (
        f"{profile_path(name)} differs from its builder: run python -m vllm_esp.core.esp.profiles"
    )
    assert load_profile(name).sha256() == built.sha256()


def test_derived_a800_profile_shape():
    m = derived_a800_profile()
    r = Roofline()
    assert m.source == "derived"
    assert sorted(m.prefill) == [1, 2, 4, 8]
    assert m.meta["capacity_tokens"] == 210_000
    assert m.migration.bytes_per_token == 512 * 1024
    # Within a node, more instances make every variable term smaller.
    for lo, hi in ((1, 2), (2, 4)):
        assert m.prefill[hi].B_s < m.prefill[lo].B_s
        assert m.prefill[hi].C_s == pytest.approx(m.prefill[lo].C_s * lo / hi)
        assert m.prefill[hi].A_s > m.prefill[lo].A_s
    # DoP 8 crosses nodes (IB ring): the linear term grows, long prompts still gain.
    assert r.crosses_nodes(8) and not r.crosses_nodes(4)
    long_prompt = (500_000.0, 500_000.0**2)
    assert m.prefill_time(8, *long_prompt) < m.prefill_time(4, *long_prompt)
    # A more efficient GPU gives a faster profile (the roofline is wired through).
    faster = derived_a800_profile(Roofline(gemm_mfu=0.6))
    assert faster.prefill[1].B_s < m.prefill[1].B_s


def test_load_profile_errors_and_paths(tmp_path):
    with pytest.raises(ValueError, match="no ESP cost profile"):
        load_profile("no_such_profile")
    path = tmp_path / "mine.json"
    model().save(path)
    assert load_profile(str(path)) == model()
    assert Path(profile_path("a800_lwm7b_tp2")).name == "a800_lwm7b_tp2.json"
