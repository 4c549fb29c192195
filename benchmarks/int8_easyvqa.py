"""easy-VQA accuracy of a built-in family bundle, float against its INT8 twin, on the test split.

    edge-run demo                                             # trains and caches the caption+VQA bundle
    edge-run calibrate ~/.cache/edgerun/demo/easyvqa-caption-vqa \\
        --data ~/.cache/edgerun/demo/easy-vqa/images/train -o /tmp/evqa-int8 --samples 256
    python benchmarks/int8_easyvqa.py FLOAT INT8 [--data ~/.cache/edgerun/demo/easy-vqa] [--questions N]

Calibration reads training images only; the accuracy is over the test split's questions (all 9,673
by default; `--questions N` takes the first N), answered through `edgerun.load(...).answer_batch`
from the image files. Each INT8 variant is scored: `cpu` (what `edgerun.load` picks on CPU) and
`tensorrt` (the symmetric S8 Q/DQ files, run by onnxruntime on CPU). Also printed: how often the
INT8 answer is the float answer.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from int8_zoo import variant_files

DEMO_DATA = Path.home() / ".cache" / "edgerun" / "demo" / "easy-vqa"


def answers(model, data, questions, batch: int = 64) -> list[str]:
    out = []
    for i in range(0, len(questions), batch):
        chunk = questions[i:i + batch]
        found = model.answer_batch([str(data.images[q.image]) for q in chunk], [q.question for q in chunk],
                                   num_beams=1)
        out += [a.text for a in found]
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("float_bundle", type=Path)
    parser.add_argument("int8_bundle", type=Path)
    parser.add_argument("--data", type=Path, default=DEMO_DATA, help="a folder prepare_easy_vqa wrote")
    parser.add_argument("--questions", type=int, help="the first N test questions (default: all)")
    args = parser.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from edgerun.calibration.collect import file_model
    from edgerun.train.data import load_data
    from edgerun.train.easyvqa import prepare_easy_vqa
    from edgerun.train.metrics import mean_vqa_accuracy

    data = load_data(prepare_easy_vqa(args.data).test)
    questions = data.questions[:args.questions] if args.questions else data.questions
    truth = [q.answers for q in questions]
    images = len({q.image for q in questions})
    q = file_model(args.int8_bundle, {}).manifest.quantization
    print(f"{len(questions)} test questions on {images} test images; INT8: method {q['method']}, "
          f"{q['samples']} calibration images")
    models = {"float": file_model(args.float_bundle, {}, threads=2)}
    models.update({f"int8 {k}": file_model(args.float_bundle, files, threads=2)
                   for k, files in variant_files(args.int8_bundle).items()})
    ref = None
    for name, model in models.items():
        start = time.perf_counter()
        got = answers(model, data, questions)
        acc = mean_vqa_accuracy(got, truth)
        same = "" if ref is None else f" | same answer as float {sum(a == b for a, b in zip(got, ref)) / len(got):.4f}"
        ref = ref or got
        print(f"{name:14s} VQA accuracy {100 * acc:.2f} %{same} ({time.perf_counter() - start:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
