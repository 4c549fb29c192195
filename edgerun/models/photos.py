"""Real photographs that install offline with packages, and a caption for each written by a person.

The photos are not copied into edge-run: `photos.json` names the package that ships each file
(scikit-image, scikit-learn, matplotlib, Debian's darknet and opencv-doc; a file may sit in a
folder below its package's root). The zoo recall test, its benchmark and `edge-run demo` use them.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

CAPTIONS = Path(__file__).with_name("photos.json")
DARKNET_DATA = Path("/usr/share/darknet/data")
OPENCV_EXAMPLES = Path("/usr/share/doc/opencv-doc/examples")
INSTALL = {"skimage": "pip install scikit-image", "sklearn": "pip install scikit-learn",
           "matplotlib": "pip install matplotlib", "darknet": "apt-get install -y darknet",
           "opencv": "apt-get install -y opencv-doc"}


@dataclass(frozen=True)
class Photo:
    source: str
    file: str  # relative to the source's root; may name a folder below it
    caption: str
    path: Path

    @property
    def flat_name(self) -> str:
        """A file name unique among all the photos, for a folder of links to them."""
        return f"{self.source}_{self.file.replace('/', '_')}"


def photo_roots() -> dict[str, Path | None]:
    """Where each source's photos are installed, or None where the package is missing."""
    roots: dict[str, Path | None] = {}
    for source, module, sub in (("skimage", "skimage", "data"), ("sklearn", "sklearn.datasets", "images")):
        try:
            mod = __import__(module, fromlist=["_"])
            roots[source] = Path(mod.__file__).parent / sub
        except ImportError:
            roots[source] = None
    try:
        import matplotlib

        roots["matplotlib"] = Path(matplotlib.get_data_path()) / "sample_data"
    except ImportError:
        roots["matplotlib"] = None
    roots["darknet"] = DARKNET_DATA if DARKNET_DATA.is_dir() else None
    roots["opencv"] = OPENCV_EXAMPLES if OPENCV_EXAMPLES.is_dir() else None
    return roots


def load_photos(captions: Path = CAPTIONS) -> tuple[list[Photo], dict[str, str]]:
    """The captioned photos that are present, and {missing source: the command that installs it}."""
    roots = photo_roots()
    photos, missing = [], {}
    for entry in json.loads(captions.read_text(encoding="utf-8"))["photos"]:
        root = roots.get(entry["source"])
        path = root / entry["file"] if root is not None else None
        if path is None or not path.is_file():
            missing[entry["source"]] = INSTALL[entry["source"]]
            continue
        photos.append(Photo(entry["source"], entry["file"], entry["caption"], path))
    return photos, missing
