"""`--auto`: the fewest most-sensitive layers to keep float so that the gate holds.

Layers are ranked worst first by the sensitivity pass; keeping the k worst float is one probe.
The search grows k by doubling (0, 1, 2, 4, ...) until a probe passes, then bisects k between
the last failing and the first passing size, so it stops at the smallest passing k along the way
(exactly the smallest one when passing is monotone in k), in about 2 log2(k) probes:

    search = FloatSearch(total=86)
    while (k := search.next()) is not None:
        search.record(k, gate_holds(k))
    search.best  # smallest passing k, None when even all float fails
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Probe:
    float_layers: int
    passed: bool
    worst: str = ""  # the worst gated metric, for the record

    def to_dict(self) -> dict:
        out: dict = {"float_layers": self.float_layers, "passed": self.passed}
        if self.worst:
            out["worst"] = self.worst
        return out


@dataclass
class FloatSearch:
    """Doubling, then bisection, over k = how many of the `total` ranked layers stay float."""

    total: int
    probes: list[Probe] = field(default_factory=list)

    @property
    def failing(self) -> int:
        """The largest k that failed (-1: none yet)."""
        return max((p.float_layers for p in self.probes if not p.passed), default=-1)

    @property
    def best(self) -> int | None:
        """The smallest k that passed."""
        return min((p.float_layers for p in self.probes if p.passed), default=None)

    def next(self) -> int | None:
        """The next k to probe, or None when the search is over."""
        best, low = self.best, self.failing
        if best is None:
            if low >= self.total:
                return None  # even every ranked layer float fails
            return min(self.total, 0 if low < 0 else max(1, 2 * low))
        if best - low <= 1:
            return None
        return (low + best) // 2

    def record(self, k: int, passed: bool, worst: str = "") -> None:
        self.probes.append(Probe(k, passed, worst))
