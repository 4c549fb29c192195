"""TensorRT optimization profiles: one per bucket of batch x beams x past length.

One wide profile (batch 1..8, past 0..512) makes TensorRT tune its kernels for one "opt" shape
and run every other shape slower, so engines carry several narrow profiles and the runner picks,
for each call, the narrowest one whose [min, max] holds the input shapes.

A `ProfileGrid` gives each axis its bucket upper bounds: `batch=1,4` makes the buckets [1, 1] and
[2, 4]; `past=16,64` makes [0, 16] and [17, 64]. The bundles' symbolic dims map onto the axes:

    batch -> batch            rows -> batch x beams (the decoder's rows)
    past  -> past length      new  -> 1 .. new (tokens per step: the prompt on the first step)
    seq   -> 1 .. seq (question / text tokens)

A module gets the distinct profiles of the axes its inputs use (the vision encoder, which has only
`batch`, gets one per batch bucket). A dim named anything else is covered by no profile: the lint
reports it and the builder refuses it.
"""
from __future__ import annotations

import itertools
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace

from ..errors import InputError, OptionError

GRID_AXES = ("batch", "beams", "past")
SCALAR_AXES = ("new", "seq")
DIM_AXES = {"batch": ("batch",), "rows": ("batch", "beams"), "past": ("past",), "new": ("new",),
            "seq": ("seq",)}


class ShapeOutsideProfilesError(InputError):
    """An input shape that no optimization profile of an engine covers."""


@dataclass(frozen=True)
class ProfileGrid:
    """Bucket upper bounds per axis; `new` and `seq` are single maxima. Defaults suit 1-4 images,
    1-4 beams and 64 positions."""

    batch: tuple[int, ...] = (1, 4)
    beams: tuple[int, ...] = (1, 4)
    past: tuple[int, ...] = (16, 64)
    new: int = 16
    seq: int = 32

    def __post_init__(self):
        for axis in GRID_AXES:
            bounds = getattr(self, axis)
            bounds = (bounds,) if isinstance(bounds, int) else tuple(bounds)
            low = 0 if axis == "past" else 1
            if not bounds or any(isinstance(b, bool) or not isinstance(b, int) or b < low for b in bounds):
                raise OptionError(f"profile axis {axis} takes integers >= {low}, got {list(bounds)}")
            if list(bounds) != sorted(set(bounds)):
                raise OptionError(f"profile axis {axis}: bucket bounds must increase, got {list(bounds)}")
            object.__setattr__(self, axis, bounds)
        for axis in SCALAR_AXES:
            value = getattr(self, axis)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise OptionError(f"profile axis {axis} takes one integer >= 1, got {value!r}")

    def ranges(self, axis: str) -> list[tuple[int, int]]:
        """[lo, hi] of each bucket of `axis`."""
        if axis in SCALAR_AXES:
            return [(1, getattr(self, axis))]
        low = 0 if axis == "past" else 1
        out = []
        for hi in getattr(self, axis):
            out.append((low, hi))
            low = hi + 1
        return out

    def to_dict(self) -> dict:
        return {a: list(getattr(self, a)) for a in GRID_AXES} | {a: getattr(self, a) for a in SCALAR_AXES}


def parse_grid(specs: Iterable[str], base: ProfileGrid | None = None, max_positions: int | None = None) -> ProfileGrid:
    """`["batch=1,4", "past=32,128"]` over `base`; without a `past` spec the last past bucket ends at
    `max_positions` (the decoder's limit)."""
    base = base or ProfileGrid()
    given: dict = {}
    for spec in specs:
        axis, eq, values = spec.partition("=")
        axis = axis.strip()
        if not eq or axis not in GRID_AXES + SCALAR_AXES:
            raise OptionError(f"profile spec {spec!r}: expected AXIS=N[,N...] with AXIS one of "
                              f"{', '.join(GRID_AXES + SCALAR_AXES)}, e.g. batch=1,4 or past=16,64")
        try:
            numbers = tuple(int(v) for v in values.split(","))
        except ValueError:
            raise OptionError(f"profile spec {spec!r}: bounds must be integers, e.g. past=16,64") from None
        given[axis] = numbers[-1] if axis in SCALAR_AXES else numbers
    if "past" not in given and max_positions:
        given["past"] = tuple(sorted({min(b, max_positions) for b in base.past} | {max_positions}))
    return replace(base, **given)


@dataclass(frozen=True)
class Profile:
    """One optimization profile: the bucket it serves and (min, opt, max) per input."""

    bucket: dict[str, list[int]]  # axis -> [lo, hi]
    shapes: dict[str, dict[str, list[int]]] = field(default_factory=dict)  # input -> min/opt/max

    def covers(self, shapes: Mapping[str, Sequence[int]]) -> bool:
        for name, rng in self.shapes.items():
            shape = shapes.get(name)
            if shape is None or len(shape) != len(rng["min"]):
                return False
            if any(not lo <= s <= hi for s, lo, hi in zip(shape, rng["min"], rng["max"])):
                return False
        return True

    def volume(self) -> int:
        total = 0
        for rng in self.shapes.values():
            n = 1
            for d in rng["max"]:
                n *= max(d, 1)
            total += n
        return total

    def to_dict(self) -> dict:
        return {"bucket": {k: list(v) for k, v in self.bucket.items()},
                "shapes": {k: {s: list(v[s]) for s in ("min", "opt", "max")} for k, v in self.shapes.items()}}

    @classmethod
    def from_dict(cls, data: Mapping) -> Profile:
        return cls(dict(data["bucket"]), {k: dict(v) for k, v in data["shapes"].items()})


def dim_range(dim, bucket: Mapping[str, tuple[int, int]]) -> tuple[int, int, int] | None:
    """(min, opt, max) of one input dim in `bucket`; None for a symbolic name no axis covers."""
    if isinstance(dim, int):
        return dim, dim, dim
    if dim not in DIM_AXES:
        return None
    if dim == "rows":
        (blo, bhi), (klo, khi) = bucket["batch"], bucket["beams"]
        return blo * klo, bhi * khi, bhi * khi
    lo, hi = bucket[DIM_AXES[dim][0]]
    if dim == "new":
        return 1, 1, hi  # one token per step; the prompt only on the first
    if dim in ("past", "seq"):
        return lo, (lo + hi + 1) // 2, hi
    return lo, hi, hi


def uncovered_dims(inputs) -> list[tuple[str, int, str]]:
    """(input, axis index, name) of every symbolic dim that no profile axis covers."""
    return [(t.name, i, d) for t in inputs for i, d in enumerate(t.shape)
            if not isinstance(d, int) and d not in DIM_AXES]


def module_profiles(inputs, grid: ProfileGrid) -> list[Profile]:
    """The distinct profiles of a module's inputs (TensorSpecs with symbolic dims) over `grid`."""
    bad = uncovered_dims(inputs)
    if bad:
        shown = ", ".join(f"{name}[{i}] '{d}'" for name, i, d in bad)
        raise OptionError(f"dynamic dims {shown} are covered by no profile axis; axes: {', '.join(DIM_AXES)}")
    used = sorted({a for t in inputs for d in t.shape if not isinstance(d, int) for a in DIM_AXES[d]},
                  key=(GRID_AXES + SCALAR_AXES).index)
    profiles: list[Profile] = []
    for combo in itertools.product(*(grid.ranges(a) for a in used)):
        bucket = dict(zip(used, combo))
        shapes = {}
        for t in inputs:
            dims = [dim_range(d, bucket) for d in t.shape]
            shapes[t.name] = {k: [r[j] for r in dims] for j, k in enumerate(("min", "opt", "max"))}
        profile = Profile({a: list(r) for a, r in bucket.items()}, shapes)
        if profile.shapes not in [p.shapes for p in profiles]:
            profiles.append(profile)
    return profiles


def choose_profile(profiles: Sequence[Profile], shapes: Mapping[str, Sequence[int]], what: str = "engine") -> int:
    """Index of the narrowest profile covering `shapes` ({input: shape}); ShapeOutsideProfilesError
    naming the shapes and every profile's ranges when none does."""
    fits = [i for i, p in enumerate(profiles) if p.covers(shapes)]
    if fits:
        return min(fits, key=lambda i: profiles[i].volume())
    given = ", ".join(f"{k}{list(v)}" for k, v in shapes.items())
    ranges = "; ".join(_describe(i, p) for i, p in enumerate(profiles))
    raise ShapeOutsideProfilesError(
        f"{what}: input shapes {given} are outside every optimization profile ({ranges}); rebuild with "
        "wider buckets, e.g. edge-run engine build BUNDLE --rebuild --profiles past=16,64,128")


def _describe(i: int, p: Profile) -> str:
    return f"#{i} " + " ".join(f"{a}={lo}..{hi}" for a, (lo, hi) in p.bucket.items())


def ort_trt_shapes(profiles: Sequence[Profile]) -> dict[str, str]:
    """onnxruntime TensorRT provider options for explicit profiles: `trt_profile_{min,opt,max}_shapes`
    as "name:1x3x224x224,name2:..." (one entry per input per profile)."""
    out = {}
    for key in ("min", "opt", "max"):
        parts = [f"{name}:{'x'.join(str(d) for d in rng[key])}" for p in profiles for name, rng in p.shapes.items()]
        out[f"trt_profile_{key}_shapes"] = ",".join(parts)
    return out
