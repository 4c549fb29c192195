"""Time saved by encoding a camera frame once: caption + VQA + embed of one frame.

    python benchmarks/encode_once.py [--config small-vit-all] [--runs 30] [--threads 2]

Builds the built-in multi-task config (caption, generative VQA and retrieval heads sharing one image
encoder) with weights fitted for a few steps on generated shapes, exports it with `--task all`, then
times, per frame, three separate calls (each preprocesses and encodes the frame) against
`encode()` once and the three calls with `state=`. Medians over --runs frames.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path


def build(config: str, folder: Path) -> Path:
    import torch

    from edgerun.export.builtin import export_checkpoint
    from edgerun.models.families import build_model, build_tokenizer, preprocess_config, save_checkpoint
    from edgerun.models.families.toydata import quick_fit, toy_dataset

    torch.manual_seed(0)
    data = toy_dataset(16, size=64, seed=0)
    tok = build_tokenizer(data.texts())
    model = build_model(config, vocab_size=tok.vocab_size, answers=data.answer_set())
    quick_fit(model, data.batch(tok, preprocess_config(model), data.answer_set()), steps=5)
    ckpt = save_checkpoint(model, folder / "best.pt", tokenizer=tok)
    return export_checkpoint(f"ckpt:{ckpt}", "all", folder / "bundle").path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="small-vit-all")
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    import numpy as np

    import edgerun

    with tempfile.TemporaryDirectory() as tmp:
        model = edgerun.load(build(args.config, Path(tmp)), threads=args.threads)
        rng = np.random.default_rng(0)
        frames = [rng.integers(0, 256, (480, 640, 3), dtype=np.uint8) for _ in range(args.runs + 2)]
        question = "what color is the shape?"
        separate, once = [], []
        for i, frame in enumerate(frames):
            start = time.perf_counter()
            a = (model.caption(frame), model.answer(frame, question), model.embed_images([frame]))
            mid = time.perf_counter()
            state = model.encode(frame)
            b = (model.caption(state=state), model.answer(question=question, state=state),
                 model.embed_images(state=state))
            end = time.perf_counter()
            assert a[0] == b[0] and a[1] == b[1] and np.allclose(a[2], b[2], atol=1e-6)
            if i >= 2:  # warm-up
                separate.append(mid - start)
                once.append(end - mid)
    s, o = statistics.median(separate) * 1000, statistics.median(once) * 1000
    print(f"{args.config}, 640x480 frames, {args.threads} threads, median of {args.runs}:")
    print(f"  caption + answer + embed, each from the frame: {s:8.2f} ms")
    print(f"  encode once, then the three from the state:    {o:8.2f} ms")
    print(f"  saved: {s - o:.2f} ms per frame ({(s - o) / s:.0%}); identical results")


if __name__ == "__main__":
    main()
