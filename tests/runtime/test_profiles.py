"""Optimization-profile buckets and the choice of one for a shape."""
import pytest

from edgerun.errors import OptionError
from edgerun.manifest import TensorSpec
from edgerun.runtime.profiles import (
    ProfileGrid,
    ShapeOutsideProfilesError,
    choose_profile,
    module_profiles,
    ort_trt_shapes,
    parse_grid,
)

DECODER = [TensorSpec("input_ids", "int64", ["rows", "new"]),
           TensorSpec("past_key", "float32", ["past", 2, "rows", 4, 8]),
           TensorSpec("cross_key_0", "float32", ["batch", 4, 17, 8])]
VISION = [TensorSpec("pixel_values", "float32", ["batch", 3, 32, 32])]


def test_buckets_split_each_axis_at_its_bounds():
    grid = ProfileGrid(batch=(1, 4), beams=(1, 3), past=(16, 64))
    assert grid.ranges("batch") == [(1, 1), (2, 4)]
    assert grid.ranges("past") == [(0, 16), (17, 64)]
    assert len(module_profiles(DECODER, grid)) == 8
    vision = module_profiles(VISION, grid)  # only the batch axis matters to it
    assert [p.shapes["pixel_values"]["max"] for p in vision] == [[1, 3, 32, 32], [4, 3, 32, 32]]


def test_rows_span_batch_times_beams_and_new_is_one_at_opt():
    profiles = module_profiles(DECODER, ProfileGrid(batch=(1, 4), beams=(1, 3), past=(16, 64), new=8))
    wide = [p for p in profiles if p.bucket == {"batch": [2, 4], "beams": [2, 3], "past": [17, 64], "new": [1, 8]}]
    assert wide[0].shapes["input_ids"] == {"min": [4, 1], "opt": [12, 1], "max": [12, 8]}
    assert wide[0].shapes["past_key"]["min"][0] == 17 and wide[0].shapes["past_key"]["max"][0] == 64


def test_the_narrowest_covering_profile_is_chosen():
    profiles = module_profiles(DECODER, ProfileGrid(batch=(1, 4), beams=(1, 3), past=(16, 64)))

    def shapes(rows, past, batch):
        return {"input_ids": (rows, 1), "past_key": (past, 2, rows, 4, 8), "cross_key_0": (batch, 4, 17, 8)}

    one = profiles[choose_profile(profiles, shapes(3, 5, 1))]
    assert one.bucket["batch"] == [1, 1] and one.bucket["beams"] == [2, 3] and one.bucket["past"] == [0, 16]
    late = profiles[choose_profile(profiles, shapes(3, 40, 1))]
    assert late.bucket["past"] == [17, 64]
    big = profiles[choose_profile(profiles, shapes(12, 0, 4))]
    assert big.bucket["batch"] == [2, 4] and big.bucket["beams"] == [2, 3]


def test_a_shape_outside_every_profile_is_a_clear_error():
    profiles = module_profiles(DECODER, ProfileGrid(batch=(1,), beams=(1, 3), past=(16,)))
    with pytest.raises(ShapeOutsideProfilesError, match=r"outside every optimization profile.*past=0..16.*--rebuild"):
        choose_profile(profiles, {"input_ids": (3, 1), "past_key": (20, 2, 3, 4, 8), "cross_key_0": (1, 4, 17, 8)})


def test_parse_grid_and_its_errors():
    grid = parse_grid(["batch=1,2,8", "seq=48"], max_positions=40)
    assert grid.batch == (1, 2, 8) and grid.seq == 48 and grid.past == (16, 40)
    for bad in ("batch", "colour=3", "past=8,4", "beams=x"):
        with pytest.raises(OptionError):
            parse_grid([bad])


def test_unknown_symbolic_dims_are_refused():
    with pytest.raises(OptionError, match=r"mystery"):
        module_profiles([TensorSpec("x", "float32", ["mystery", 3])], ProfileGrid())


def test_ort_trt_profile_strings_list_every_profile():
    opts = ort_trt_shapes(module_profiles(VISION, ProfileGrid(batch=(1, 4))))
    assert opts["trt_profile_min_shapes"] == "pixel_values:1x3x32x32,pixel_values:2x3x32x32"
    assert opts["trt_profile_max_shapes"] == "pixel_values:1x3x32x32,pixel_values:4x3x32x32"
