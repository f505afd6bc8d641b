"""The crossbar arithmetic of the reram runtime against int64 numpy and an explicit per-conversion loop."""

import numpy as np
import pytest
from test_reram_helpers import slow_crossbar

from runtimes.reram.config import parse_options
from runtimes.reram.crossbar import Crossbar

SIGNS = ("differential", "offset", "differential_analog")


def crossbar(w, bits=None, mode="granular", **options):
    xbar = Crossbar(w, parse_options({"adc_range": mode, **options}))
    xbar.configure_adc(tuple(bits or xbar.full_bits) if bits is None or len(bits) > 1 else bits * xbar.slices, mode)
    return xbar


@pytest.mark.parametrize("k,m", [(300, 70), (128, 128), (1, 5), (513, 129), (200, 3)], ids=lambda v: str(v))
@pytest.mark.parametrize("sign", SIGNS)
@pytest.mark.parametrize("rows_per_read", [None, 100])
def test_full_resolution_adc_is_bit_exact(k, m, sign, rows_per_read):
    rng = np.random.default_rng(k * m)
    w = rng.integers(-127, 128, (k, m))
    u = rng.integers(0, 256, (9, k))
    u[0] = 255
    w[:, 0] = 127
    acc, counts = crossbar(w, sign=sign, parallel_rows=rows_per_read).matmul(u, input_bits=8)
    assert np.array_equal(acc.astype(np.int64), u @ w)
    assert counts.saturated.sum() == 0


def test_full_adc_bits_table():
    assert crossbar(np.full((128, 1), 127)).full_bits == [9, 9, 9, 8]
    assert crossbar(np.full((128, 1), 1), cell_bits=1).full_bits[0] == 8  # 0..128 needs 8 bits, not 7
    prime = Crossbar(np.full((256, 1), 127), parse_options({"rows": 256, "cell_bits": 4, "dac_bits": 3}))
    assert prime.full_bits == [15, 14]  # 256 · 15 · 7 = 26,880; the top 3-bit slice holds at most 7


def test_saturation_hand_case():
    w, u = np.full((128, 1), 127), np.full((1, 128), 255)
    exact, counts9 = crossbar(w, (9,)).matmul(u, 8)
    clipped, counts8 = crossbar(w, (8,)).matmul(u, 8)
    assert exact[0, 0] == 4_145_280 and counts9.saturated.sum() == 0
    assert clipped[0, 0] == 3_454_485
    assert counts8.conversions.sum() == 64 and counts8.saturated.sum() == 24
    assert list(counts8.saturated) == [8, 8, 8, 0]


@pytest.mark.parametrize("sign", SIGNS)
@pytest.mark.parametrize("mode,bits", [("granular", (4,)), ("granular", (5, 3, 6, 2)), ("max", (5,)), ("max", (2,))])
def test_matches_per_conversion_loop(sign, mode, bits):
    rng = np.random.default_rng(7)
    w = rng.integers(-127, 128, (150, 6))
    u = rng.integers(0, 256, (5, 150))
    options = {"sign": sign, "rows": 64, "parallel_rows": 40}
    xbar = crossbar(w, bits, mode, **options)
    acc, counts = xbar.matmul(u, 8)
    ref, conversions, saturated = slow_crossbar(u, w, rows=64, rows_per_read=40, adc_bits=bits, mode=mode, sign=sign)
    assert np.array_equal(acc.astype(np.int64), ref)
    assert counts.conversions.sum() == conversions
    assert counts.saturated.sum() == saturated
    assert saturated > 0 or mode == "max"


def test_conversion_count_formula_and_differential_doubles_analog():
    w, u = np.ones((300, 70), np.int64), np.ones((4, 300), np.int64)
    counts = crossbar(w).matmul(u, 8)[1]
    analog = crossbar(w, sign="differential_analog").matmul(u, 8)[1]
    # N · M · T · S · P · ceil(K / p)
    assert counts.conversions.sum() == 4 * 70 * 8 * 4 * 2 * 3
    assert counts.conversions.sum() == 2 * analog.conversions.sum()


def test_max_range_never_clips_and_rounds_to_its_lsb():
    w, u = np.full((128, 1), 127), np.full((1, 128), 255)
    for bits in range(1, 10):
        acc, counts = crossbar(w, (bits,), "max").matmul(u, 8)
        assert counts.saturated.sum() == 0
    assert crossbar(w, (9,), "max").matmul(u, 8)[0][0, 0] == 4_145_280


def test_fast_path_agrees_with_full_simulation():
    rng = np.random.default_rng(3)
    w = rng.integers(-127, 128, (260, 40))
    w[:, :20] //= 16  # small weights: provably non-saturating columns at 6 bits
    u = rng.integers(0, 256, (11, 260))
    fast = crossbar(w, (6,))
    full = crossbar(w, (6,), fast_path=False)
    assert 0 < fast.exact_columns.mean() < 1 and not full.exact_columns.any()
    (a, ca), (b, cb) = fast.matmul(u, 8), full.matmul(u, 8)
    assert np.array_equal(a, b)
    assert np.array_equal(ca.saturated, cb.saturated) and ca.saturated.sum() > 0


def test_int16_inputs_take_sixteen_cycles():
    rng = np.random.default_rng(5)
    w, u = rng.integers(-127, 128, (64, 9)), rng.integers(0, 1 << 16, (3, 64))
    acc, counts = crossbar(w).matmul(u, 16)
    assert np.array_equal(acc.astype(np.int64), u @ w) and counts.cycles == 16


NOISE = {"variation": 0.05, "stuck_at": "0.001", "read_noise": 0.01, "on_off": 100}


def noisy(seed, **noise):
    rng = np.random.default_rng(11)
    w, u = rng.integers(-127, 128, (200, 16)), rng.integers(0, 256, (6, 200))
    xbar = Crossbar(w, parse_options({"seed": seed, **noise}), np.random.default_rng([seed, 0]))
    xbar.configure_adc((8,) * 4, "granular")
    return xbar.matmul(u, 8, np.random.default_rng([seed, 1]))[0], u @ w


def test_noise_is_seeded_and_noise_off_ignores_the_seed():
    a, exact = noisy(1, **NOISE)
    assert np.array_equal(a, noisy(1, **NOISE)[0])
    assert not np.array_equal(a, noisy(2, **NOISE)[0])
    assert not np.array_equal(a, exact)
    assert np.array_equal(noisy(1)[0], noisy(2)[0])
    assert np.array_equal(noisy(1)[0], exact)


def test_read_noise_is_unbiased_and_grows_with_the_square_root_of_active_rows():
    w = np.ones((128, 1), np.int64)
    options = parse_options({"read_noise": 0.01})
    errors = {}
    for active in (32, 128):
        u = np.zeros((4000, 128), np.int64)
        u[:, :active] = 1
        xbar = Crossbar(w, options, np.random.default_rng(0))
        xbar.configure_adc((0,) * 4, "granular")
        acc = xbar.matmul(u, 8, np.random.default_rng(active))[0]
        errors[active] = acc[:, 0] - active
    for error in errors.values():
        assert abs(error.mean()) < 4 * error.std() / np.sqrt(error.size)
    assert errors[128].std() / errors[32].std() == pytest.approx(2.0, rel=0.1)
