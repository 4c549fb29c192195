"""FloatSearch: the fewest ranked layers float that pass, in few probes."""
import pytest

from edgerun.calibration.autosearch import FloatSearch


def run(total, passes):
    search = FloatSearch(total)
    while (k := search.next()) is not None:
        search.record(k, passes(k))
    return search


@pytest.mark.parametrize("need", [0, 1, 2, 3, 5, 13, 16, 17, 28, 31, 33, 50, 86])
def test_finds_the_smallest_passing_count(need):
    search = run(86, lambda k: k >= need)
    assert search.best == need
    ks = [p.float_layers for p in search.probes]
    assert len(ks) == len(set(ks)) and len(ks) <= 2 * max(need, 1).bit_length() + 2
    assert search.probes[0].float_layers == 0


def test_doubling_then_bisection_order():
    search = run(86, lambda k: k >= 29)
    assert [p.float_layers for p in search.probes] == [0, 1, 2, 4, 8, 16, 32, 24, 28, 30, 29]


def test_never_passing_ends_at_every_layer():
    search = run(10, lambda k: False)
    assert [p.float_layers for p in search.probes] == [0, 1, 2, 4, 8, 10]
    assert search.best is None


def test_nothing_ranked():
    assert run(0, lambda k: True).best == 0
    search = run(0, lambda k: False)
    assert search.best is None and len(search.probes) == 1
