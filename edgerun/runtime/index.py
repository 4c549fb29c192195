"""A persistent image index: embed a gallery once, search it by text or by image.

On disk an index is a directory:

    INDEX/index.json            metadata, see `IndexMeta`; replacing it is the commit point of every write
    INDEX/vectors-<gen>.npy     (count, dim) float32, L2-normalised; row i is item i
    INDEX/items-<gen>.jsonl     one {"path": ...} per line, absolute paths
    INDEX/ann-<gen>.usearch     optional HNSW graph (usearch, inner product), keys = row numbers
    INDEX/thumbs-<gen>.jpgs     optional thumbnails (edgerun.runtime.thumbnails), made at index time;
                                items lines then say where each row's JPEG lies: "thumb": [offset, size]

A write puts a new generation's files beside the old ones (each through a temporary name,
fsynced, renamed), then replaces index.json, then deletes the files it no longer names. A crash
at any point leaves index.json naming one complete generation. One writer at a time.

Search is exact by default where there is no graph (a matmul: vectors are normalised, so the inner
product is the cosine); an index built with an HNSW graph searches it unless `exact=True`.
"""
from __future__ import annotations

import json
import os
import re
import secrets
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from .. import __version__
from ..errors import EdgeRunError, InputError, MissingDependencyError, OptionError, require
from . import thumbnails as th
from .image import load_image

FORMAT = "edgerun-index"
VERSION = 1
META_NAME = "index.json"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")
IDENTITY_KEYS = ("source", "architecture", "weights_sha256")  # what a quantized twin shares
_DATA_FILE = re.compile(r"^(vectors|items|ann|thumbs)-[0-9a-f]{8}\.(npy|jsonl|usearch|jpgs)$")
_TEMP_FILE = re.compile(r"^\.tmp-[0-9a-f]{8}\.")
_SCORE_BUDGET = 1 << 23  # floats of (queries, gallery) scores held at once by exact search: 32 MB


class IndexFileError(EdgeRunError):
    """An index is missing, malformed, written by a newer edge-run, or a write would clobber something else."""


class IndexModelError(EdgeRunError):
    """A model is not the one that built the index, so its embeddings live in another space."""


@dataclass(frozen=True)
class AnnSettings:
    """HNSW parameters (usearch). The defaults, from benchmarks/index_ann.py on a 100k x 512 clustered
    gallery (2 CPUs): recall@10 0.998, 0.5 ms per query (p90 0.7 ms), 56 s to build."""

    connectivity: int = 16  # graph edges per node ("M"); fixed once built
    expansion_add: int = 128  # search depth while inserting ("efConstruction")
    expansion_search: int = 64  # search depth per query ("ef"); raised to k when k is larger
    dtype: str = "f32"  # how the graph stores vectors: f32, f16 (half the memory) or i8

    def __post_init__(self):
        for name in ("connectivity", "expansion_add", "expansion_search"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 2:
                raise OptionError(f"ANN {name} must be an integer >= 2, got {value!r}")
        if self.dtype not in ("f32", "f16", "i8"):
            raise OptionError(f"ANN dtype must be f32, f16 or i8, got {self.dtype!r}")


@dataclass(frozen=True)
class IndexMeta:
    """The contents of index.json."""

    bundle: str  # the bundle that built the index, absolute
    identity: dict  # that bundle's identity (source, revision, architecture, weights_sha256)
    dim: int
    count: int
    created: str  # ISO 8601, UTC
    updated: str
    files: dict  # role (vectors, items, ann) -> file name in the index directory
    sizes: dict  # file name -> size in bytes
    ann: AnnSettings | None = None
    thumb_size: int | None = None  # longest side of the thumbnails, None where there are none
    edgerun_version: str = ""
    format: str = FORMAT
    version: int = VERSION

    def to_dict(self) -> dict:
        return {**asdict(self), "ann": asdict(self.ann) if self.ann else None}

    @classmethod
    def from_dict(cls, data, where: str) -> IndexMeta:
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise IndexFileError(f"{where} is not an edge-run index (format {FORMAT!r} expected)")
        version = data.get("version")
        if not isinstance(version, int) or isinstance(version, bool) or version < 1:
            raise IndexFileError(f"{where} has version {version!r}; expected a positive integer")
        if version > VERSION:
            raise IndexFileError(f"{where} is index format version {version}, written by a newer edge-run; "
                                 f"this one reads version {VERSION}: upgrade edge-run or rebuild the index")
        try:
            ann = AnnSettings(**data["ann"]) if data.get("ann") is not None else None
            meta = cls(**{**data, "ann": ann})
        except (TypeError, EdgeRunError) as exc:
            raise IndexFileError(f"{where} is malformed: {exc}") from None
        kinds = {"dim": int, "count": int, "identity": dict, "files": dict, "sizes": dict, "bundle": str}
        wrong = [k for k, kind in kinds.items() if not isinstance(getattr(meta, k), kind)]
        roles = ("vectors", "items") + (("ann",) if ann else ()) + (("thumbs",) if meta.thumb_size else ())
        if wrong or set(meta.files) != set(roles) or set(meta.files.values()) != set(meta.sizes):
            raise IndexFileError(f"{where} is malformed: bad {', '.join(wrong) or 'files or sizes'}")
        if not all(isinstance(name, str) and _DATA_FILE.match(name) for name in meta.files.values()):
            raise IndexFileError(f"{where} is malformed: file names {sorted(meta.files.values())}")
        return meta


@dataclass(frozen=True)
class Skipped:
    path: str
    reason: str


@dataclass(frozen=True)
class IndexReport:
    path: Path
    added: int  # images embedded and added by this run
    already: int  # images found that the index already held (add=True)
    total: int  # images in the index now
    skipped: list[Skipped]  # images that could not be read, with why
    seconds: float
    ann: AnnSettings | None  # the index's HNSW settings, None for exact search only


@dataclass(frozen=True)
class Hit:
    id: int  # row in the index (or position in the list of texts)
    item: str  # image path (or text)
    score: float  # cosine similarity


# -- finding images ---------------------------------------------------------------------------------


def collect_images(paths: Iterable[str | os.PathLike]) -> tuple[list[str], list[Skipped]]:
    """Expand files, folders (recursively, image suffixes only, any case) and .txt list files (one path
    a line, relative to the list; blank lines and # comments ignored) into absolute image paths,
    de-duplicated in order. What cannot be listed is returned as skipped, with why."""
    found: list[str] = []
    skipped: list[Skipped] = []
    for path in paths:
        _expand(Path(path), found, skipped, lists=True)
    return list(dict.fromkeys(found)), skipped


def _expand(path: Path, found: list[str], skipped: list[Skipped], lists: bool) -> None:
    if path.is_dir():
        def unreadable(exc: OSError):
            skipped.append(Skipped(str(exc.filename), f"folder could not be read: {exc.strerror or exc}"))

        for folder, dirs, names in os.walk(path, onerror=unreadable):
            dirs.sort()
            found.extend(os.path.abspath(os.path.join(folder, n)) for n in sorted(names)
                         if n.lower().endswith(IMAGE_SUFFIXES))
    elif not os.path.exists(path):
        skipped.append(Skipped(os.path.abspath(path), "does not exist"))
    elif lists and path.suffix.lower() == ".txt":
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            skipped.append(Skipped(str(path), f"list file could not be read: {exc}"))
            return
        for line in (ln.strip() for ln in lines):
            if line and not line.startswith("#"):
                _expand(path.parent / line, found, skipped, lists=False)
    else:
        found.append(os.path.abspath(path))


# -- building ---------------------------------------------------------------------------------------


def build_index(model, paths: Iterable[str | os.PathLike], *, output: str | os.PathLike, add: bool = False,
                overwrite: bool = False, ann: bool | AnnSettings = False, batch_size: int = 32,
                thumbnails: int | None = None,
                progress: Callable[[int, int], None] | None = None) -> IndexReport:
    """Embed the images under `paths` with `model` and write the index `output`.

    add : extend an existing index built by the same model (its quantized twin will do), skipping
        images it already holds; without it an existing index is refused unless `overwrite`.
    ann : also keep an HNSW graph for approximate search (True for the default `AnnSettings`). An
        index that has one extends it on `add` whatever `ann` says.
    thumbnails : also keep a JPEG thumbnail of each image, its longest side this many pixels (e.g.
        `thumbnails.DEFAULT_SIZE`), for galleries that must not decode full photos. An index that has
        them keeps making them on `add`, at its size; adding them to one without makes the old rows' too.
    progress : called as progress(images_done, images_total) after each batch.
    Unreadable images are skipped and reported, never fatal.
    """
    start = time.perf_counter()
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise OptionError(f"batch_size must be a positive integer, got {batch_size!r}")
    output = Path(os.path.abspath(output))
    old = _existing(output, add, overwrite)
    if old is not None:
        old.check_model(model)
    settings = old.meta.ann if old is not None and old.meta.ann else _ann_settings(ann)
    if settings is not None:
        _usearch()  # fail now, not after an hour of embedding
    thumb_size = (old.meta.thumb_size if old is not None and old.meta.thumb_size
                  else th.check_size(thumbnails) if thumbnails is not None else None)
    images, skipped = collect_images(paths)
    known = set(old.items) if old is not None else set()
    todo = [p for p in images if p not in known]
    vectors, kept, thumbs = _embed_images(model, todo, batch_size, progress, skipped, thumb_size)
    if old is None and not kept:
        why = (f"{len(skipped)} skipped, e.g. {skipped[0].path}: {skipped[0].reason}" if skipped
               else f"no {', '.join(IMAGE_SUFFIXES)} files found")
        raise InputError(f"no image could be indexed from {', '.join(map(str, paths))}: {why}")
    if kept or old is None or settings != old.meta.ann or thumb_size != old.meta.thumb_size:
        now = _now()
        meta = (replace(old.meta, updated=now, ann=settings, thumb_size=thumb_size) if old is not None else
                IndexMeta(os.path.abspath(model.bundle.path), dict(model.identity), 0, 0, now, now, {}, {}, settings,
                          thumb_size))
        _extend(output, meta, old, vectors, kept, thumbs)
    total = len(kept) + (len(old) if old is not None else 0)
    return IndexReport(output, len(kept), len(images) - len(todo), total, skipped,
                       time.perf_counter() - start, settings)


def _existing(output: Path, add: bool, overwrite: bool) -> Index | None:
    if not os.path.lexists(output):
        return None
    if not output.is_dir() or (not (output / META_NAME).exists() and any(output.iterdir())):
        raise IndexFileError(f"{output} exists and is not an edge-run index (no {META_NAME}); refusing to "
                             "write there: remove it or choose another path")
    if not (output / META_NAME).exists():
        return None
    if add:
        return open_index(output)
    if not overwrite:
        raise IndexFileError(f"index {output} already exists; pass add=True (--add) to extend it or "
                             "overwrite=True (--overwrite) to replace it")
    return None


def _ann_settings(ann: bool | AnnSettings) -> AnnSettings | None:
    return ann if isinstance(ann, AnnSettings) else (AnnSettings() if ann else None)


def _embed_images(model, paths: Sequence[str], batch_size: int, progress, skipped: list[Skipped],
                  thumb_size: int | None = None):
    """Decode and embed in batches -> ((n, d) float32 or None, the n paths kept, their n thumbnails or
    None without `thumb_size`); failures join `skipped`."""
    chunks, kept, thumbs = [], [], []
    for begin in range(0, len(paths), batch_size):
        batch, names = [], []
        for path in paths[begin:begin + batch_size]:
            try:
                batch.append(load_image(path))
                names.append(path)
            except InputError as exc:
                skipped.append(Skipped(path, str(exc).removeprefix(f"image {path}").lstrip(": ")))
        if batch:
            chunks.append(normalise(model.embed_images(batch)))
            kept += names
            if thumb_size:
                thumbs += [th.make_thumbnail(image, thumb_size) for image in batch]
        if progress is not None:
            progress(min(begin + batch_size, len(paths)), len(paths))
    return (np.concatenate(chunks) if chunks else None), kept, (thumbs if thumb_size else None)


def write_index(output: str | os.PathLike, vectors: np.ndarray, items: Sequence[str], *, bundle: str,
                identity: dict, ann: bool | AnnSettings = False, overwrite: bool = False) -> Index:
    """Write a new index from embeddings made elsewhere (a distributed job, a benchmark).

    vectors : shape = (n, d), one row per item; normalised here.
    """
    output = Path(os.path.abspath(output))
    _existing(output, add=False, overwrite=overwrite)
    vectors = normalise(vectors)
    if len(vectors) != len(items) or not len(items):
        raise InputError(f"need one vector per item and at least one: got {len(vectors)} vectors, "
                         f"{len(items)} items")
    now = _now()
    meta = IndexMeta(os.path.abspath(bundle), dict(identity), 0, 0, now, now, {}, {}, _ann_settings(ann))
    _extend(output, meta, None, vectors, [str(i) for i in items])
    return open_index(output)


def _extend(output: Path, meta: IndexMeta, old: Index | None, new: np.ndarray | None, kept: list[str],
            new_thumbs: list[bytes] | None = None) -> None:
    """Write `old`'s rows followed by `new` (one per path in `kept`, with its thumbnail where the
    index keeps them) as the index `output`."""
    parts = ([old.vectors] if old is not None else []) + ([new] if new is not None else [])
    vectors = np.concatenate(parts) if len(parts) > 1 else parts[0]
    items = (old.items if old is not None else []) + kept
    graph = _build_graph(old, vectors, meta.ann) if meta.ann else None
    thumbs = None
    if meta.thumb_size:
        old_thumbs = ([] if old is None else [old.thumbnail(i) for i in range(len(old))] if old.meta.thumb_size
                      else th.thumbnails_of(old.items, meta.thumb_size))
        thumbs = old_thumbs + (new_thumbs or [])
    _commit(output, replace(meta, dim=vectors.shape[1], count=len(items)), vectors, items, graph, thumbs)


def _build_graph(old: Index | None, vectors: np.ndarray, settings: AnnSettings):
    """The old index's graph extended with the rows it lacks, or a new graph over all rows."""
    if old is not None and old.meta.ann is not None:
        graph, begin = old._graph(view=False), len(old)
    else:
        graph = _usearch().Index(ndim=vectors.shape[1], metric="ip", dtype=settings.dtype,
                                 connectivity=settings.connectivity, expansion_add=settings.expansion_add,
                                 expansion_search=settings.expansion_search)
        begin = 0
    if begin < len(vectors):
        graph.add(np.arange(begin, len(vectors), dtype=np.uint64), vectors[begin:])
    return graph


def _commit(output: Path, meta: IndexMeta, vectors: np.ndarray, items: list[str], graph,
            thumbs: list[bytes | None] | None = None) -> None:
    """Write one generation, then index.json naming it, then delete what it no longer names."""
    gen = secrets.token_hex(4)
    files = {"vectors": f"vectors-{gen}.npy", "items": f"items-{gen}.jsonl"}
    if graph is not None:
        files["ann"] = f"ann-{gen}.usearch"
    blob, places = th.pack(thumbs) if thumbs is not None else (None, [None] * len(items))
    if blob is not None:
        files["thumbs"] = f"thumbs-{gen}.jpgs"
    made_dir = not output.exists()
    output.mkdir(parents=True, exist_ok=True)
    try:
        _write_file(output / files["vectors"], lambda tmp: np.save(tmp, vectors))
        lines = "".join(json.dumps({"path": p, **({"thumb": at} if at else {})}) + "\n"
                        for p, at in zip(items, places)).encode("ascii")
        _write_file(output / files["items"], lambda tmp: tmp.write_bytes(lines))
        if graph is not None:
            _write_file(output / files["ann"], lambda tmp: graph.save(str(tmp)))
        if blob is not None:
            _write_file(output / files["thumbs"], lambda tmp: tmp.write_bytes(blob))
        sizes = {name: (output / name).stat().st_size for name in files.values()}
        meta = replace(meta, files=files, sizes=sizes, edgerun_version=__version__)
        text = json.dumps(meta.to_dict(), indent=2, ensure_ascii=False) + "\n"
        _write_file(output / META_NAME, lambda tmp: tmp.write_bytes(text.encode("utf-8")))
    except BaseException:
        for name in files.values():
            (output / name).unlink(missing_ok=True)
        if made_dir and not any(output.iterdir()):
            output.rmdir()
        raise
    _fsync_dir(output)
    for entry in output.iterdir():  # the old generation, and leftovers of writers that crashed
        if (_DATA_FILE.match(entry.name) or _TEMP_FILE.match(entry.name)) and entry.name not in files.values():
            try:
                entry.unlink()
            except OSError:  # in use (Windows) or gone: the next write retries
                pass


def _write_file(path: Path, write: Callable[[Path], object]) -> None:
    """Write through a temporary name in the same directory, fsync, rename over `path`."""
    tmp = path.with_name(f".tmp-{secrets.token_hex(4)}.{path.name}")  # same suffix: np.save adds none
    try:
        write(tmp)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _fsync_dir(path: Path) -> None:
    if os.name == "posix":  # directories cannot be opened for fsync on Windows
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _usearch():
    return require("usearch.index", "ann")


def normalise(vectors) -> np.ndarray:
    """Rows scaled to unit length, float32. shape = (n, d) in and out."""
    v = np.asarray(vectors, dtype=np.float32)
    if v.ndim != 2 or v.shape[1] == 0:
        raise InputError(f"embeddings must have shape (n, d), got {v.shape}")
    return v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)


# -- reading and searching --------------------------------------------------------------------------


def open_index(path: str | os.PathLike, *, mmap: bool = False) -> Index:
    """Open an index directory, checking its format, version and files. `mmap=True` maps the vectors
    instead of reading them: opens at once and shares the page cache, but exact search runs slower."""
    return Index(path, mmap=mmap)


class Index:
    """An open index: `meta`, `items` (paths), `vectors` (count, dim), and the HNSW graph where there
    is one, memory-mapped at once: a later write to the index deletes this generation's files."""

    def __init__(self, path: str | os.PathLike, *, mmap: bool = False):
        self.path = Path(os.path.abspath(path))
        self._graph_view = self._graph_error = None
        meta_file = self.path / META_NAME
        if not meta_file.is_file():
            raise IndexFileError(f"{self.path} is not an edge-run index: it has no {META_NAME}")
        try:
            data = json.loads(meta_file.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise IndexFileError(f"{meta_file} is not valid JSON ({exc}); the index is damaged: rebuild it") from None
        self.meta = IndexMeta.from_dict(data, str(meta_file))
        self._check_sizes()
        try:
            self.vectors = np.load(self.file("vectors"), mmap_mode="r" if mmap else None, allow_pickle=False)
            rows = [json.loads(line) for line in self.file("items").read_text(encoding="utf-8").splitlines()]
            self.items = [row["path"] for row in rows]
            self._thumb_places = [row.get("thumb") for row in rows]
            self._thumbs = self._open_thumbs()
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise IndexFileError(f"index {self.path} is damaged ({exc}): rebuild it") from None
        want = (self.meta.count, self.meta.dim)
        if self.vectors.dtype != np.float32 or self.vectors.shape != want or len(self.items) != self.meta.count:
            raise IndexFileError(f"index {self.path} is damaged: {META_NAME} says {want[0]} items of dimension "
                                 f"{want[1]}, the files hold {self.vectors.dtype} {list(self.vectors.shape)} "
                                 f"and {len(self.items)} items: rebuild it")
        if self.meta.ann is not None:
            try:
                self._graph_view = self._graph()
            except (MissingDependencyError, IndexFileError) as exc:  # exact search still works
                self._graph_error = exc

    def file(self, role: str) -> Path:
        return self.path / self.meta.files[role]

    def _open_thumbs(self):
        """The thumbnails file, memory-mapped; ValueError where an items line points outside it."""
        size = self.meta.sizes.get(self.meta.files.get("thumbs"), 0)
        for place in self._thumb_places:
            if place is not None and not (isinstance(place, list) and len(place) == 2
                                          and all(isinstance(v, int) and v >= 0 for v in place)
                                          and place[0] + place[1] <= size):
                raise ValueError(f"thumbnail place {place!r} is not within the {size}-byte thumbnails file")
        return np.memmap(self.file("thumbs"), np.uint8, "r") if size else b""

    @property
    def has_thumbnails(self) -> bool:
        return "thumbs" in self.meta.files

    def thumbnail(self, row: int) -> bytes | None:
        """Row `row`'s JPEG thumbnail (made at index time), or None where the index has none for it."""
        if not 0 <= row < len(self):
            raise InputError(f"row {row} is not in index {self.path}, which holds rows 0 to {len(self) - 1}")
        return th.unpack(self._thumbs, self._thumb_places[row])

    def _check_sizes(self) -> None:
        for name, size in self.meta.sizes.items():
            p = self.path / name
            if not p.is_file():
                raise IndexFileError(f"index {self.path} is missing {name}, which {META_NAME} names: rebuild it")
            if p.stat().st_size != size:
                raise IndexFileError(f"index {self.path} is damaged: {name} has {p.stat().st_size} bytes, "
                                     f"{META_NAME} says {size}: rebuild it")

    def __len__(self) -> int:
        return self.meta.count

    @property
    def dim(self) -> int:
        return self.meta.dim

    def check_model(self, model) -> None:
        """Refuse a model whose embeddings are not comparable with the index's: a different source,
        architecture or weights. A twin of the building bundle (quantized, FP16, moved) is accepted."""
        mine = {k: self.meta.identity.get(k) for k in IDENTITY_KEYS}
        theirs = {k: model.identity.get(k) for k in IDENTITY_KEYS}
        if mine != theirs:
            raise IndexModelError(
                f"index {self.path} was built by a different model ({_describe(mine)}) than bundle "
                f"{model.bundle.path} ({_describe(theirs)}); search it with {self.meta.bundle} or a quantized "
                "twin of it, or build a new index with this bundle")

    def search_vectors(self, queries, k: int = 10, *, exact: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """queries : shape = (q, d). Returns (scores, ids), each shape = (q, min(k, len(self))), best first.
        An approximate search may find fewer than k: missing places hold id -1 and score -inf."""
        q = normalise(queries)
        if q.shape[1] != self.dim:
            raise InputError(f"queries have dimension {q.shape[1]}; index {self.path} holds dimension {self.dim}")
        k = min(_check_k(k), len(self))
        if self.meta.ann is None or exact:
            return exact_search(self.vectors, q, k)
        return self._ann_search(q, k)

    def search_text(self, model, text: str, k: int = 10, *, exact: bool = False) -> list[Hit]:
        """The k images closest to `text`, best first."""
        if not isinstance(text, str) or not text.strip():
            raise InputError(f"text query must be a non-empty string, got {text!r}")
        self.check_model(model)
        return self._hits(*self.search_vectors(model.embed_texts([text]), k, exact=exact))

    def search_image(self, model, image, k: int = 10, *, exact: bool = False) -> list[Hit]:
        """The k images closest to `image` (a path, bytes or an RGB array), best first."""
        self.check_model(model)
        return self._hits(*self.search_vectors(model.embed_images([image]), k, exact=exact))

    def rerank(self, model, text: str, hits: list[Hit]) -> list[Hit]:
        """Re-order `hits` for `text` by the bundle's image-text matching head (BLIP ITM); each Hit's
        score becomes the match probability. Costs one ITM run per hit, so re-rank a short top-k."""
        self.check_model(model)
        scored = [Hit(h.id, h.item, float(model.itm_scores(h.item, [text])[0])) for h in hits]
        return sorted(scored, key=lambda h: -h.score)

    def _hits(self, scores: np.ndarray, ids: np.ndarray) -> list[Hit]:
        return [Hit(int(i), self.items[i], float(s)) for s, i in zip(scores[0], ids[0]) if i >= 0]

    def _ann_search(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        graph = self._graph()
        graph.expansion_search = max(self.meta.ann.expansion_search, k)
        found = graph.search(q, k)
        if hasattr(found, "counts"):  # BatchMatches: fixed-size rows, `counts` of them valid
            rows = [(found.keys[i, :c], found.distances[i, :c]) for i, c in enumerate(found.counts)]
        else:  # Matches, for a single query
            rows = [(found.keys, found.distances)]
        ids = np.full((len(q), k), -1, np.int64)
        scores = np.full((len(q), k), -np.inf, np.float32)
        for row, (keys, dist) in enumerate(rows):
            ids[row, :len(keys)] = keys
            scores[row, :len(keys)] = 1.0 - dist
        return scores, ids

    def _graph(self, view: bool = True):
        """The HNSW graph: memory-mapped for search, loaded (`view=False`) to be extended."""
        if view and self._graph_error is not None:
            raise self._graph_error
        if view and self._graph_view is not None:
            return self._graph_view
        try:
            ui = _usearch()
        except MissingDependencyError as exc:
            raise MissingDependencyError(f"{exc}; or search exactly (exact=True, --exact)") from None
        try:
            graph = ui.Index.restore(str(self.file("ann")), view=view)
        except (OSError, RuntimeError, ValueError) as exc:
            raise IndexFileError(f"HNSW graph {self.file('ann')} could not be read ({exc}); search with "
                                 "--exact, or rebuild the index") from None
        if graph is None or graph.ndim != self.dim or len(graph) != len(self):
            raise IndexFileError(f"HNSW graph {self.file('ann')} does not match the index's vectors: rebuild it")
        return graph


def exact_search(vectors: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Brute-force inner-product top-k. vectors : (n, d); queries : (q, d); 1 <= k <= n.
    Returns (scores, ids), each shape = (q, k), best first."""
    n = len(vectors)
    scores = np.empty((len(queries), k), np.float32)
    ids = np.empty((len(queries), k), np.int64)
    step = max(1, _SCORE_BUDGET // max(n, 1))
    for begin in range(0, len(queries), step):
        sims = queries[begin:begin + step] @ vectors.T  # (rows, n)
        top = np.argpartition(sims, n - k, axis=1)[:, n - k:] if k < n else np.tile(np.arange(n), (len(sims), 1))
        part = np.take_along_axis(sims, top, axis=1)
        order = np.argsort(-part, axis=1, kind="stable")
        ids[begin:begin + step] = np.take_along_axis(top, order, axis=1)
        scores[begin:begin + step] = np.take_along_axis(part, order, axis=1)
    return scores, ids


def search_texts(model, image, texts: Sequence[str], k: int = 10, batch_size: int = 256) -> list[Hit]:
    """Image -> text: rank `texts` by similarity to `image`, best first; Hit.id is the text's position."""
    texts = [texts] if isinstance(texts, str) else list(texts)
    if not texts or not all(isinstance(t, str) and t.strip() for t in texts):
        raise InputError("texts must be a non-empty list of non-empty strings")
    k = _check_k(k)
    query = normalise(model.embed_images([image]))
    gallery = np.concatenate([normalise(model.embed_texts(texts[i:i + batch_size]))
                              for i in range(0, len(texts), batch_size)])
    scores, ids = exact_search(gallery, query, min(k, len(texts)))
    return [Hit(int(i), texts[i], float(s)) for s, i in zip(scores[0], ids[0])]


def _check_k(k) -> int:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise OptionError(f"k must be a positive integer, got {k!r}")
    return int(k)


def _describe(identity: dict) -> str:
    digest = identity.get("weights_sha256")
    return (f"source {identity.get('source')}, architecture {identity.get('architecture')}, "
            f"weights sha256 {digest[:12] + '…' if isinstance(digest, str) else digest}")
