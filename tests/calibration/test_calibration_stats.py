import numpy as np
import pytest

from edgerun.calibration.stats import BINS, TensorStats, entropy_threshold, tensor_range, threshold
from edgerun.errors import OptionError


def test_growing_range_rebins_exactly():
    rng = np.random.default_rng(0)
    stats, seen = TensorStats(512), []
    for scale in (0.5, 1, 3, 20):  # each batch past the bound doubles it
        x = rng.standard_normal(5000).astype(np.float32) * scale
        seen.append(x)
        stats.fold(x)
    x = np.concatenate(seen)
    direct, _ = np.histogram(x, np.linspace(-stats.bound, stats.bound, 2 * 512 + 1))
    assert stats.hist.sum() == x.size == stats.count
    assert np.abs(direct - stats.hist).sum() <= 0.001 * x.size  # float32 rounding at bin edges only
    assert stats.min == x.min() and stats.max == x.max()
    assert stats.bound / 2 < np.abs(x).max() <= stats.bound  # |x| spans more than half the bins


def test_memory_is_bounded():
    stats = TensorStats()
    for i in range(20):
        stats.fold(np.full(10_000, float(i), np.float32))
    assert stats.hist.shape == (2 * BINS,)


def test_methods_differ_on_skewed_data():
    rng = np.random.default_rng(1)
    x = rng.standard_normal(400_000).astype(np.float32)
    x[:40] = 60.0  # a few outliers stretch the range 15x
    stats = TensorStats()
    stats.fold(x)
    minmax, entropy, pct = (threshold(stats, m) for m in ("minmax", "entropy", "percentile"))
    assert minmax == pytest.approx(60.0)
    assert entropy < minmax / 4
    assert pct < minmax / 4
    assert len({round(minmax, 4), round(entropy, 4), round(pct, 4)}) == 3


def test_entropy_keeps_the_range_of_uniform_data():
    stats = TensorStats()
    stats.fold(np.random.default_rng(2).uniform(-1, 1, 200_000).astype(np.float32))
    assert threshold(stats, "entropy") > 0.9


def test_entropy_of_a_narrow_histogram():
    hist = np.zeros(1000)
    hist[:50] = 1
    assert entropy_threshold(hist, 0.1) == pytest.approx(5.0)


def test_ranges_hold_zero_and_clip_to_the_threshold():
    stats = TensorStats()
    stats.fold(np.linspace(0.5, 4.0, 1000, dtype=np.float32))  # all positive
    r = tensor_range(stats, "minmax")
    assert (r.low, r.high, r.amax) == (0.0, 4.0, 4.0)


def test_nonfinite_values_are_counted_not_binned():
    stats = TensorStats()
    stats.fold(np.array([1.0, np.nan, -2.0, np.inf], np.float32))
    assert stats.nonfinite == 2 and stats.count == 2 and stats.amax == 2.0


def test_bad_use():
    with pytest.raises(OptionError, match="no values"):
        threshold(TensorStats(), "minmax")
    stats = TensorStats()
    stats.fold(np.ones(3, np.float32))
    with pytest.raises(OptionError, match="minmax, entropy, percentile"):
        threshold(stats, "kl")


def test_entropy_ignores_exact_zeros():
    """After a ReLU6 most values are exactly 0; zeros are exact at any scale, so they must not pull
    the KL threshold into the bulk (it fell to ~5 % of the range and the zoo embedding collapsed)."""
    rng = np.random.default_rng(3)
    x = np.concatenate([np.zeros(900_000, np.float32), rng.uniform(0.0, 6.0, 100_000).astype(np.float32)])
    stats = TensorStats()
    stats.fold(x[:500_000])
    stats.fold(x[500_000:])
    assert stats.zeros == 900_000
    hist = stats.abs_hist(zeros=False)
    assert hist.sum() == 100_000 and stats.abs_hist().sum() == x.size
    assert threshold(stats, "entropy") > 0.8 * 6.0
    assert entropy_threshold(stats.abs_hist(), stats.width) < 0.5 * 6.0  # what counting the zeros gives


def test_auto_keeps_sparse_outliers_and_clips_a_dense_tail():
    """auto picks per tensor the least quantization error. Shaped like MiniLM's LayerNorm output
    (bulk within 7.7, 0.03 % of the values near 28): entropy clips the outliers to the bulk, auto keeps
    them. A dense Laplace tail: auto clips it (minmax would not)."""
    from edgerun.calibration.stats import choose, quantization_mse

    rng = np.random.default_rng(5)
    x = np.clip(rng.standard_normal(200_000) * 1.5, -7.7, 7.7).astype(np.float32)
    x[:60] = 28.0 - rng.uniform(0, 0.3, 60)
    sparse = TensorStats()
    sparse.fold(x)
    method, amax = choose(sparse)
    assert threshold(sparse, "entropy") < 8.0 and method != "entropy" and amax > 27.0

    dense = TensorStats()
    dense.fold(rng.laplace(0, 1, 400_000).astype(np.float32))
    method, amax = choose(dense)
    assert method != "minmax" and amax < 0.9 * threshold(dense, "minmax")
    errors = {m: quantization_mse(dense, threshold(dense, m)) for m in ("minmax", "entropy", "percentile")}
    assert quantization_mse(dense, amax) == min(errors.values())
    assert tensor_range(dense, "auto").amax == amax
    with pytest.raises(OptionError, match="unknown calibration method 'auto'"):
        threshold(dense, "auto")  # "auto" chooses among the thresholds; it is not one itself
