"""`edge-run index` and `edge-run search`: build a persistent image index, search it by text or image.

The lead's cli.py registers both with `cli.add_command`. Bundles are opened through `load_model`,
the one seam tests replace with a fake model.
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import click

from .errors import InputError, OptionError


def load_model(bundle: str | os.PathLike):
    """Open a bundle for embedding (tests replace this with a fake)."""
    from .runtime.model import load

    return load(bundle)


@click.command("index")
@click.argument("bundle", type=click.Path())
@click.argument("paths", nargs=-1, required=True)
@click.option("-o", "--output", required=True, type=click.Path(), help="index directory to write")
@click.option("--add", is_flag=True, help="extend the index at OUTPUT, skipping the images it holds")
@click.option("--overwrite", is_flag=True, help="replace an existing index at OUTPUT")
@click.option("--ann", is_flag=True, help="also build an HNSW graph for fast approximate search "
              "(pip install 'edge-run[ann]')")
@click.option("--batch-size", type=int, default=32, show_default=True, help="images embedded per call")
@click.option("--thumbnails", "thumb_size", type=int, default=160, show_default=True,
              help="keep a JPEG thumbnail of each image, longest side this many pixels, for the kiosk "
              "page (edge-run serve); 0: none")
def index(bundle, paths, output, add, overwrite, ann, batch_size, thumb_size):
    """Embed the images in PATHS with BUNDLE into the index OUTPUT.

    PATHS are image files, folders (searched recursively for jpg, jpeg, png, webp, bmp, tif, tiff)
    and .txt files listing one path a line, relative to the list file.
    """
    from .runtime.index import build_index

    model = load_model(bundle)
    report = build_index(model, paths, output=output, add=add, overwrite=overwrite, ann=ann,
                         batch_size=batch_size, thumbnails=thumb_size or None, progress=_progress_printer())
    graph = (f"HNSW graph (M={report.ann.connectivity}, ef={report.ann.expansion_search})" if report.ann
             else "exact search only")
    already = f", {report.already} already indexed" if report.already else ""
    click.echo(f"added {report.added}, skipped {len(report.skipped)}{already}: {report.total} images in "
               f"{report.path} ({graph}, {report.seconds:.1f} s)")
    for item in report.skipped:
        click.echo(f"  skipped {item.path}: {item.reason}")


def _progress_printer():
    """A progress callback that redraws one line on a terminal, and prints nothing elsewhere."""
    if not sys.stderr.isatty():
        return None

    def show(done: int, total: int) -> None:
        click.echo(f"\r  {done}/{total} images", err=True, nl=done >= total)

    return show


@click.command("search")
@click.argument("index_path", metavar="INDEX", type=click.Path())
@click.argument("text", required=False)
@click.option("--image", type=click.Path(), help="query image: finds similar images, or ranks --texts")
@click.option("--texts", type=click.Path(), help="with --image: rank this file's lines (image -> text)")
@click.option("-k", "k", type=int, default=5, show_default=True, help="how many results")
@click.option("--bundle", type=click.Path(), help="embed the query with this bundle (a quantized twin of the "
              "one that built INDEX), not the one INDEX records")
@click.option("--exact", is_flag=True, help="exact search even where INDEX has an HNSW graph")
@click.option("--rerank", is_flag=True, help="text queries: re-order the top k by the bundle's image-text "
              "matching head (BLIP ITM); scores become match probabilities")
@click.option("--json", "as_json", is_flag=True, help="one JSON object")
def search(index_path, text, image, texts, k, bundle, exact, rerank, as_json):
    """Search INDEX for the images closest to TEXT, or to --image; or rank --texts for --image."""
    from .runtime.index import open_index, search_texts

    if (text is None) == (image is None):
        raise OptionError("give one query: a TEXT argument or --image, not both and not neither")
    if texts is not None and image is None:
        raise OptionError("--texts ranks texts for an image: give --image with it")
    if k < 1:
        raise OptionError(f"-k must be at least 1, got {k}")
    if rerank and text is None:
        raise OptionError("--rerank re-orders a text query's results: give TEXT with it")
    idx = open_index(index_path)
    model = load_model(_bundle_path(idx, bundle))
    start = time.perf_counter()
    if texts is not None:
        lines, numbers = _read_lines(texts)
        hits = search_texts(model, image, lines, k)
        results = [{"rank": r, "score": h.score, "text": h.item, "line": numbers[h.id]}
                   for r, h in enumerate(hits, 1)]
    else:
        hits = (idx.search_text(model, text, k, exact=exact) if image is None
                else idx.search_image(model, image, k, exact=exact))
        if rerank:
            hits = idx.rerank(model, text, hits)
        results = [{"rank": r, "score": h.score, "path": h.item, "id": h.id} for r, h in enumerate(hits, 1)]
    seconds = time.perf_counter() - start
    if as_json:
        query = {"text": text} if image is None else {"image": image, **({"texts": texts} if texts else {})}
        approximate = idx.meta.ann is not None and not exact and texts is None
        click.echo(json.dumps({"index": str(idx.path), "query": query, "approximate": approximate,
                               "results": results, "ms": round(seconds * 1000, 3)}, ensure_ascii=False))
        return
    for r in results:
        click.echo(f"{r['rank']:3d}  {r['score']:.4f}  {r.get('path', r.get('text'))}")


def _bundle_path(idx, bundle: str | None) -> str:
    if bundle is not None:
        return bundle
    if not Path(idx.meta.bundle).exists():
        raise InputError(f"the bundle that built index {idx.path}, {idx.meta.bundle}, is not there; "
                         "pass --bundle with it or a quantized twin of it")
    return idx.meta.bundle


def _read_lines(path: str) -> tuple[list[str], list[int]]:
    """The non-blank lines of a UTF-8 text file, stripped, and their 1-based line numbers."""
    try:
        raw = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"--texts file {path} could not be read: {exc}") from None
    numbered = [(n, line.strip()) for n, line in enumerate(raw, 1) if line.strip()]
    if not numbered:
        raise InputError(f"--texts file {path} has no non-blank lines")
    return [line for _, line in numbered], [n for n, _ in numbered]
