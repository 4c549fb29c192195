"""Recall of zoo:effnet-lite0-minilm on captioned real photos, and how its zero-shot options were chosen.

    python benchmarks/zoo_recall.py grid                 # top-k x temperature x centring, split-half check
    python benchmarks/zoo_recall.py bundle DIR           # recall of an exported bundle, through the runtime

The photos ship with packages (scikit-image, scikit-learn, matplotlib, Debian's darknet); the captions,
one per photo, are in tests/data/captions.json. Photos whose package is missing are left out and named.
Recall@k: the share of queries whose own match ranks in the top k (image->text: an image's caption
among all captions; text->image: a caption's photo among all photos). MRR is the mean reciprocal rank
of the match, averaged over both directions.

Measured (27 photos, ORT CPU; `bundle` and the torch grid agree):
                              image->text R@1  R@5 | text->image R@1  R@5 | MRR
    default: centred, T=3, top 20     0.630  0.889 |            0.593  0.778 | 0.714
    prototype: plain top-5 probs      0.370  0.593 |            0.444  0.741 | 0.547
    plain, all 1000 classes           0.222  0.556 |            0.519  0.815 | 0.525
Without darknet's photos (21): 0.524 0.857 | 0.524 0.714. One photo is 0.037 of a recall here.

How the defaults (top_k 20, temperature 3, centred) were chosen, and the guards against fitting 27 photos:
- the captions were written looking at each photo before any model ran on it, and not edited after;
- the preprocessing is TensorFlow's EfficientNet-Lite evaluation recipe, not tuned here;
- centring (subtracting the mean of the 1000 prompt embeddings from both sides) uses no photo or
  caption; it is the largest gain, mostly image->text: uncentred (T=3, top 20), one caption (the man
  with a camera, "black and white photo of ...") is the best match of 15 of the 27 photos; centred,
  no caption is the best match of more than 4;
- the selection criterion is MRR over both directions (it moves with every rank, so it is far less
  jumpy than recall on 27 items), never the recall figures reported;
- the default sits inside a plateau, not on the single best cell: every neighbour on the grid
  (temperature 2-4, top_k 15-30) is within 0.05 MRR of it, and it is within 0.03 of the best cell on
  the 15 everyday-object photos and on the 12 off-ImageNet ones (microscopy, textures, space) alone;
- `grid` also runs 500 random split-halves, picking the best cell on one half and scoring it on the
  other: held-out MRR 0.754, against 0.649 for the prototype's cell on the same halves, so the gain
  holds on photos the choice never saw (the fixed default scores 0.784, but it saw all photos).
Larger temperatures flatten the top-k weights: with a classifier this unsure on photos outside
ImageNet's classes, an average of the likely classes' prompts describes a photo better than its
single most probable class.
"""
from __future__ import annotations

import argparse
import itertools
import os
import sys

import numpy as np

from edgerun.models.photos import Photo, load_photos, photo_roots  # noqa: F401 (the tests use them here)

KS = (1, 3, 5, 10, 15, 20, 30, 50, None)
TEMPERATURES = (1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
PROTOTYPE = (False, 1.0, 5)  # (center, temperature, top_k) of the prototype: plain top-5 probabilities
OFF_IMAGENET = {"hubble_deep_field.jpg", "retina.jpg", "moon.png", "coins.png", "clock_motion.png", "brick.png",
                "grass.png", "gravel.png", "cell.png", "ihc.png", "page.png", "text.png"}


def ranks(sim: np.ndarray) -> np.ndarray:
    """sim (n, n), the match of row i in column i -> 0-based rank of each row's match (ties count against)."""
    return (sim >= np.diag(sim)[:, None]).sum(1) - 1


def metrics(sim: np.ndarray) -> dict[str, float]:
    """sim (n_images, n_texts) with image i captioned by text i -> recall@1/@5 both ways and MRR."""
    i2t, t2i = ranks(sim), ranks(sim.T)
    return {"i2t@1": float((i2t < 1).mean()), "i2t@5": float((i2t < 5).mean()),
            "t2i@1": float((t2i < 1).mean()), "t2i@5": float((t2i < 5).mean()),
            "mrr": float((np.mean(1 / (i2t + 1)) + np.mean(1 / (t2i + 1))) / 2)}


def line(name: str, m: dict[str, float]) -> str:
    return (f"{name:40s} image->text R@1 {m['i2t@1']:.3f} R@5 {m['i2t@5']:.3f} | "
            f"text->image R@1 {m['t2i@1']:.3f} R@5 {m['t2i@5']:.3f} | MRR {m['mrr']:.3f}")


# --- the bundle through the runtime ----------------------------------------------------------------


def subsets(photos: list[Photo]) -> dict[str, list[int]]:
    """The photo sets a test may see, by which optional sources are installed."""
    out = {"all": list(range(len(photos)))}
    optional = ("darknet", "matplotlib", "opencv")
    for k in (1, 2, 3):
        for drop in itertools.combinations(optional, k):
            out[f"without {', '.join(drop)}"] = [i for i, p in enumerate(photos) if p.source not in drop]
    return out


def run_bundle(bundle: str) -> None:
    photos, missing = load_photos()
    for source, cmd in missing.items():
        print(f"left out: {source} photos ({cmd})")
    import edgerun

    model = edgerun.load(bundle, threads=2)
    sim = model.embed_images([str(p.path) for p in photos]) @ model.embed_texts([p.caption for p in photos]).T
    print(f"{bundle}: {model.manifest.model.get('zero_shot')}")
    for name, idx in subsets(photos).items():
        print(line(f"{name} ({len(idx)} photos)", metrics(sim[np.ix_(idx, idx)])))


# --- the option grid, on torch features ------------------------------------------------------------


def torch_features(photos: list[Photo]):
    """(logits (n, 1000), prompt embeddings (1000, d), caption embeddings (n, d)), uncentred."""
    import torch

    from edgerun.models import zoo
    from edgerun.runtime.image import load_image
    from edgerun.runtime.preprocess import PreprocessConfig, preprocess

    torch.set_num_threads(2)
    model = zoo.get_model("effnet-lite0-minilm")
    pixels = preprocess([load_image(str(p.path)) for p in photos], PreprocessConfig(**model.preprocess))
    with torch.no_grad():
        logits = zoo.load_classifier()(torch.from_numpy(pixels))
    bert, tokenizer = zoo.load_text_model()
    prompts = zoo.embed_texts(bert, tokenizer, zoo.class_prompts())
    captions = zoo.embed_texts(bert, tokenizer, [p.caption for p in photos])
    return logits, prompts, captions


def similarities(logits, prompts, captions) -> dict[tuple, np.ndarray]:
    """(center, temperature, top_k) -> sim (n_images, n_texts) for every cell of the grid."""
    from edgerun.models import zoo

    mean = prompts.mean(0)
    out = {}
    for center in (False, True):
        texts = zoo.centred(captions, mean) if center else captions
        for t in TEMPERATURES:
            for k in KS:
                images = zoo.weight_prompts(logits, prompts, zoo.ZeroShotOptions(k, t, center))
                images = zoo.centred(images, mean) if center else images
                out[center, t, k] = (images @ texts.T).numpy()
    return out


def split_half(sims: dict, n: int, fixed: list[tuple], reps: int = 500, seed: int = 0) -> list[float]:
    """Mean held-out MRR over `reps` random split-halves of: the cell picked on the other half, then
    each cell of `fixed`, scored on the same held-out halves."""
    rng = np.random.default_rng(seed)
    scores = []
    for _ in range(reps):
        perm = rng.permutation(n)
        a, b = perm[: n // 2], perm[n // 2:]
        best = max(sims, key=lambda c: metrics(sims[c][np.ix_(a, a)])["mrr"])
        scores.append([metrics(sims[c][np.ix_(b, b)])["mrr"] for c in [best, *fixed]])
    return [float(v) for v in np.mean(scores, axis=0)]


def run_grid() -> None:
    from edgerun.models import zoo

    photos, missing = load_photos()
    for source, cmd in missing.items():
        print(f"left out: {source} photos ({cmd})")
    print(f"{len(photos)} photos")
    sims = similarities(*torch_features(photos))
    default = (True, zoo.DEFAULT_TEMPERATURE, zoo.DEFAULT_TOP_K)
    for center in (False, True):
        print(f"\nMRR, {'centred' if center else 'not centred'}: rows temperature, columns top_k "
              f"{', '.join(str(k or 'all') for k in KS)}")
        for t in TEMPERATURES:
            print(f"  T={t:<4}" + "".join(f"{metrics(sims[center, t, k])['mrr']:7.3f}" for k in KS))
    print()
    for cell in [(False, 1.0, k) for k in (1, 3, 5, 10, None)] + [(True, 1.0, 5), (True, 2.0, 10), default]:
        label = f"{'centred' if cell[0] else 'plain'} T={cell[1]} k={cell[2] or 'all'}"
        label += " (default)" if cell == default else " (prototype)" if cell == PROTOTYPE else ""
        print(line(label, metrics(sims[cell])))
    groups = {"objects": [i for i, p in enumerate(photos) if p.file not in OFF_IMAGENET],
              "off-ImageNet": [i for i, p in enumerate(photos) if p.file in OFF_IMAGENET]}
    print()
    for name, idx in groups.items():
        best = max(sims, key=lambda c: metrics(sims[c][np.ix_(idx, idx)])["mrr"])
        print(f"{name} ({len(idx)} photos): default MRR {metrics(sims[default][np.ix_(idx, idx)])['mrr']:.3f}, "
              f"best cell {best} {metrics(sims[best][np.ix_(idx, idx)])['mrr']:.3f}")
    picked, prototype, kept = split_half(sims, len(photos), [PROTOTYPE, default])
    print(f"\nsplit-half, 500 splits, held-out MRR: the cell picked on the other half {picked:.3f}; "
          f"the prototype's cell {prototype:.3f}; the default {kept:.3f} (picked on all photos: optimistic)")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("grid", help="zero-shot options grid on torch features")
    p = sub.add_parser("bundle", help="recall of an exported bundle through the runtime")
    p.add_argument("bundle")
    args = parser.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    run_grid() if args.cmd == "grid" else run_bundle(args.bundle)
    return 0


if __name__ == "__main__":
    sys.exit(main())
