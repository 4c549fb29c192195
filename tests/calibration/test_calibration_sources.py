import cv2
import numpy as np
import pytest

from edgerun.calibration.sources import open_source
from edgerun.errors import InputError


def _image(i: int, size=(40, 48)) -> np.ndarray:
    rng = np.random.default_rng(i)
    return rng.integers(0, 256, (*size, 3), dtype=np.uint8)


@pytest.fixture()
def folder(tmp_path):
    (tmp_path / "sub" / "deeper").mkdir(parents=True)
    names = ["a.jpg", "b.PNG", "sub/c.webp", "sub/deeper/d.bmp", "sub/e.jpeg"]
    for i, name in enumerate(names):
        assert cv2.imwrite(str(tmp_path / name), _image(i))
    (tmp_path / "broken.jpg").write_bytes(b"not a jpeg at all")
    (tmp_path / "notes.txt").write_text("ignored")
    return tmp_path


def test_folder_is_searched_recursively_and_skips_unreadable(folder):
    source = open_source(str(folder), seed=0)
    got = list(source.calibration(10))
    assert len(got) == 5 and all(im.ndim == 3 and im.shape[2] == 3 for _, im in got)
    assert source.report.found == 6 and source.report.calibration == 5
    assert [n for n, _ in source.report.skipped] == [str(folder / "broken.jpg")]


def test_seed_picks_the_samples_deterministically(folder):
    def pick(seed):
        return [n for n, _ in open_source(str(folder), seed=seed).calibration(3)]

    assert pick(1) == pick(1)
    assert any(pick(s) != pick(1) for s in (2, 3, 4))


def test_held_out_images_differ_from_calibration_and_are_filled_with_views(folder):
    source = open_source(str(folder), seed=0)
    calib = {n for n, _ in source.calibration(3)}
    held = list(source.holdout(12))
    assert len(held) == 12
    names = [n for n, _ in held]
    assert not calib & set(names)
    assert sum("#view" in n for n in names) == source.report.views >= 10


def test_no_readable_images(tmp_path):
    (tmp_path / "x.jpg").write_bytes(b"garbage")
    with pytest.raises(InputError, match="no readable images.*1 unreadable"):
        list(open_source(str(tmp_path)).calibration(4))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(InputError, match="no readable images"):
        list(open_source(str(empty)).calibration(4))


def test_bad_specs(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        open_source(str(tmp_path / "nope"))
    (tmp_path / "x.csv").write_text("1,2")
    with pytest.raises(InputError, match="camera:INDEX"):
        open_source(str(tmp_path / "x.csv"))
    with pytest.raises(InputError, match="camera:INDEX"):
        open_source("camera:front")


def test_list_file(folder):
    (folder / "list.txt").write_text("a.jpg\n# a comment\nsub/c.webp\nmissing.png\n")
    source = open_source(str(folder / "list.txt"))
    assert len(list(source.calibration(5))) == 2
    assert len(source.report.skipped) == 1


def test_video_every_nth_frame(tmp_path):
    path = tmp_path / "clip.avi"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10, (32, 24))
    if not writer.isOpened():
        pytest.skip("this OpenCV build cannot write MJPG video")
    for i in range(20):
        writer.write(np.full((24, 32, 3), i * 10, np.uint8))
    writer.release()
    source = open_source(str(path), every=4)
    calib = [n for n, _ in source.calibration(100)]
    held = [n for n, _ in source.holdout(100)]
    assert calib == [f"{path}@{i}" for i in (0, 4, 8, 12, 16)]
    assert held == [f"{path}@{i}" for i in (2, 6, 10, 14, 18)]


def test_camera_that_cannot_open():
    with pytest.raises(InputError, match="camera 97 cannot be opened"):
        list(open_source("camera:97").calibration(2))


def test_augment_tops_a_small_folder_up_with_views_unlike_the_held_out_ones(folder):
    source = open_source(str(folder), seed=0)
    got = list(source.calibration(12, augment=True))
    assert len(got) == 12 and source.report.calibration == 12 and source.report.calibration_views == 7
    originals = {n for n, _ in got[:5]}
    assert all("#view" in n and n.split("#")[0] in originals for n, _ in got[5:])
    assert all(im.shape[0] < 40 or im.shape[1] < 48 for _, im in got[5:])  # crops, not the originals
    held = list(source.holdout(7))
    assert len(held) == 7 and source.report.views == 7 and source.report.held_out == 7
    calibration_views = {im.tobytes() for _, im in got[5:]}
    assert not any(im.tobytes() in calibration_views for _, im in held)
    plain = open_source(str(folder), seed=0)
    assert len(list(plain.calibration(12))) == 5  # without augment: what the folder holds
