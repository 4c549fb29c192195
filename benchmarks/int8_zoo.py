"""INT8 quality of zoo:effnet-lite0-minilm against its float twin: retrieval recall and top-1 agreement.

    python benchmarks/int8_zoo.py photos DIR                 # DIR/images (the captioned photos), DIR/captions.json
    python benchmarks/int8_zoo.py recall FLOAT INT8          # recall@1/@5 both ways, each INT8 variant
    python benchmarks/int8_zoo.py top1 FLOAT INT8 --crops 1200   # EfficientNet-Lite0 top-1 agreement
    python benchmarks/int8_zoo.py top1 FLOAT INT8 --floor        # ... and the fp16-weights noise floor
    python benchmarks/int8_zoo.py top1 FLOAT INT8 --decompose    # ... and activations / weights INT8 alone
    python benchmarks/int8_zoo.py ranges FLOAT INT8 --crops 128  # activation scales searched for the output

Both INT8 variants run on onnxruntime's CPU provider: `cpu` (U8S8 Q/DQ, what `edgerun.load` picks on
CPU) and `tensorrt` (the symmetric S8 Q/DQ file TensorRT builds; onnxruntime runs the same
arithmetic). `top1` compares the classifier's ImageNet logits, read from inside the image graph
(the float Gemm before the temperature softmax), on random crops (55-90 % of each side, flipped half
of the time; `edgerun.calibration.sources.view`) of every real photo the installed packages ship
(scikit-image, scikit-learn, matplotlib, Debian's darknet), captioned or not. These crops are
not ImageNet photos: the classifier is unsure of most (median top-1 probability 0.28, median
top-1 - top-2 logit margin 0.80, 1 % of the crops under 0.01), so agreement is fragile: `--floor`
adds the float graph with its weights rounded to fp16, which agrees on 99.3 % of 1,200 crops.

The recall photos are the calibration photos' originals when the bundle was calibrated on crops
of them (`photos`, then `edge-run calibrate ... --augment`): the statistics saw crops of the
evaluated photos, not the photos themselves, and no labels.
"""
from __future__ import annotations

import argparse
import atexit
import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from zoo_recall import line, metrics

from edgerun.models.photos import load_photos, photo_roots

SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


def link_photos(folder: Path) -> None:
    """FOLDER/images/: links to the captioned photos; FOLDER/captions.json: their captions (COCO
    style, for `edge-run calibrate --eval`)."""
    photos, missing = load_photos()
    (folder / "images").mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for i, p in enumerate(photos):
        name = f"images/{p.flat_name}"
        if not (folder / name).exists():
            (folder / name).symlink_to(p.path)
        images.append({"id": i, "file_name": name})
        annotations.append({"id": i, "image_id": i, "caption": p.caption})
    doc = {"info": {"description": "edge-run's captioned photos (edgerun/models/photos.json)"},
           "images": images, "annotations": annotations}
    (folder / "captions.json").write_text(json.dumps(doc, indent=1), encoding="utf-8")
    print(f"{len(photos)} captioned photos in {folder}/images, captions in {folder}/captions.json; "
          f"missing: {missing or 'none'}")


def variant_files(bundle: Path) -> dict[str, dict[str, Path]]:
    """{variant: {module: file}} of an INT8 bundle: "cpu" (the modules themselves), "tensorrt"."""
    from edgerun.bundle import open_bundle

    b = open_bundle(bundle)
    out: dict[str, dict[str, Path]] = {"cpu": {}, "tensorrt": {}}
    for name, spec in b.manifest.modules.items():
        base, _, tag = name.partition("@")
        out[tag or "cpu"][base] = b.file(spec.file)
    return {k: v for k, v in out.items() if v}


def run_recall(float_bundle: Path, int8_bundle: Path) -> None:
    from edgerun.calibration.collect import file_model

    photos, missing = load_photos()
    print(f"{len(photos)} captioned photos, one caption each; missing sources: {missing or 'none'}")
    images, captions = [str(p.path) for p in photos], [p.caption for p in photos]
    q = file_model(int8_bundle, {}).manifest.quantization
    print(f"{int8_bundle}: method {q['method']}, {q['samples']} samples, kept float "
          f"{ {m: len(e['kept_float']) for m, e in q['modules'].items()} }")
    models = {"float": file_model(float_bundle, {}, threads=2)}
    models.update({f"int8 {k}": file_model(float_bundle, files, threads=2)
                   for k, files in variant_files(int8_bundle).items()})
    ref = None
    for name, model in models.items():
        img, txt = model.embed_images(images), model.embed_texts(captions)
        extra = ""
        if ref is None:
            ref = img, txt
        else:
            extra = (f" | image cos {np.mean(np.sum(img * ref[0], 1)):.4f}"
                     f" text cos {np.mean(np.sum(txt * ref[1], 1)):.4f}")
        print(line(name, metrics(img @ txt.T)) + extra)


TOP1_SOURCES = ("skimage", "sklearn", "matplotlib", "darknet")  # the 38 photos of every top-1 figure so far


def all_photos() -> list[Path]:
    files = []
    for source, root in photo_roots().items():
        if root is not None and source in TOP1_SOURCES:
            files += sorted(p for p in root.iterdir() if p.suffix.lower() in SUFFIXES and p.is_file())
    return files


def photo_images() -> list[np.ndarray]:
    """Every real photo the installed packages ship, decoded (unreadable ones skipped)."""
    from edgerun.errors import InputError
    from edgerun.runtime.image import load_image

    images = []
    for path in all_photos():
        try:
            images.append(load_image(path))
        except (InputError, OSError):
            pass
    return images


def crops(n: int, seed: int) -> tuple[list[np.ndarray], int]:
    from edgerun.calibration.sources import view

    images = photo_images()
    rng = np.random.default_rng(seed)
    return [view(images[i % len(images)], rng) for i in range(n)], len(images)


def logits_session(path: Path, *, requantize: bool = True):
    """A session of the image graph that returns the classifier's logits (its last Gemm's output).
    `requantize=False` turns off onnxruntime's WeightBiasQuantization, which would quantize a
    float weight (per tensor) wherever its layer reads a dequantized activation."""
    import onnx
    import onnxruntime as ort

    from edgerun.calibration.collect import augment, session, session_options

    graph = onnx.load(str(path), load_external_data=False).graph
    gemm = [n for n in graph.node if n.op_type == "Gemm"][-1].output[0]
    if requantize:
        return session(augment(path, [gemm]), path.parent, 2, lean=False), gemm
    so = session_options(2)
    so.add_session_config_entry("session.model_external_initializers_file_folder_path", str(path.parent))
    return ort.InferenceSession(augment(path, [gemm]), so, providers=["CPUExecutionProvider"],
                                disabled_optimizers=["WeightBiasQuantization"]), gemm


def half_quantized(float_path: Path, int8_path: Path, keep: str) -> Path:
    """A copy of the INT8 graph at `int8_path` quantized on one side only. keep="activations": its
    convolutions and Gemms read the float weights and biases of `float_path` again (matched by node
    name); keep="weights": they read their float input instead of the dequantized one."""
    import tempfile

    import onnx

    floats = onnx.load(str(float_path))
    by_name = {n.name: n for n in floats.graph.node}
    tensors = {t.name: t for t in floats.graph.initializer}
    model = onnx.load(str(int8_path))
    graph = model.graph
    made = {o: n for n in graph.node for o in n.output}
    inits = {t.name for t in graph.initializer}
    for node in graph.node:
        if node.op_type not in ("Conv", "Gemm") or node.name not in by_name:
            continue
        dq = made.get(node.input[0])
        if keep == "weights" and dq is not None and dq.op_type == "DequantizeLinear" and dq.input[0] not in inits:
            q = made.get(dq.input[0])
            if q is not None and q.op_type == "QuantizeLinear":
                node.input[0] = q.input[0]
        if keep == "activations":
            for i in (1, 2):
                if i < len(node.input) and i < len(by_name[node.name].input):
                    copy = onnx.TensorProto()
                    copy.CopyFrom(tensors[by_name[node.name].input[i]])
                    copy.name = f"{node.name}_float_{i}"
                    graph.initializer.append(copy)
                    node.input[i] = copy.name
    folder = Path(tempfile.mkdtemp(prefix="int8_zoo_"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    out = folder / f"{keep}.onnx"
    onnx.save_model(model, str(out), save_as_external_data=True, location=out.name + ".data")
    return out


def fp16_weights(path: Path) -> Path:
    """A copy of the float graph at `path` whose weights are rounded to fp16 (and stored as fp32):
    a near-lossless change, the noise floor of the agreement figures."""
    import tempfile

    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    for t in model.graph.initializer:
        if t.data_type == onnx.TensorProto.FLOAT:
            w = numpy_helper.to_array(t)
            t.CopyFrom(numpy_helper.from_array(w.astype(np.float16).astype(np.float32), t.name))
    folder = Path(tempfile.mkdtemp(prefix="int8_zoo_"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    out = folder / path.name
    onnx.save_model(model, str(out), save_as_external_data=True, location=out.name + ".data")
    return out


def run_top1(float_bundle: Path, int8_bundle: Path, n: int, seed: int, batch: int = 32,
             floor: bool = False, decompose: bool = False) -> None:
    import edgerun

    model = edgerun.load(float_bundle, threads=2)
    pics, sources = crops(n, seed)
    print(f"{n} crops (seed {seed}) of {sources} real photos")
    files = {"float": model.bundle.file(model.bundle.module("image_embed").file)}
    if floor:
        files["fp16 weights"] = fp16_weights(files["float"])
    files.update({f"int8 {k}": v["image_embed"] for k, v in variant_files(int8_bundle).items()})
    if decompose:
        cpu = files["int8 cpu"]
        files["cpu, acts only"] = half_quantized(files["float"], cpu, "activations")
        files["cpu, weights only"] = half_quantized(files["float"], cpu, "weights")
    top = {}
    for name, path in files.items():
        sess, gemm = logits_session(path, requantize=not name.startswith("cpu, "))
        got = [sess.run([gemm], {"pixel_values": model.pixel_values(pics[i:i + batch])})[0]
               for i in range(0, n, batch)]
        top[name] = np.concatenate(got)
    ref = top["float"]
    order = np.sort(ref, 1)
    margin = order[:, -1] - order[:, -2]
    for name, logits in top.items():
        same = logits.argmax(1) == ref.argmax(1)
        rel = np.linalg.norm(logits - ref) / np.linalg.norm(ref)
        top5 = np.mean([len(set(a) & set(b)) / 5 for a, b in
                        zip(np.argsort(-ref, 1)[:, :5], np.argsort(-logits, 1)[:, :5])])
        print(f"{name:14s} top-1 agreement {same.mean():.4f} ({same.sum()}/{n}) | top-5 overlap {top5:.4f} | "
              f"logits rel. error {rel:.4f} | disagreements' median float margin "
              f"{np.median(margin[~same]) if (~same).any() else float('nan'):.3f} (all: {np.median(margin):.3f})")


def run_ranges(float_bundle: Path, int8_bundle: Path, n: int, factors=(0.8, 0.9, 1.1, 1.25),
               held_out: int = 1200) -> None:
    """Search the cpu variant's activation scales for the classifier's output: each in turn times
    each of `factors`, kept where the logits' relative error over `n` calibration crops (seed 11)
    falls by more than 0.2%; then top-1 agreement on `held_out` evaluation crops (seed 7)."""
    import time

    import onnx
    import onnxruntime as ort
    from onnx import numpy_helper

    import edgerun

    model = edgerun.load(float_bundle, threads=2)
    graphs = {"float": onnx.load(str(model.bundle.file(model.bundle.module("image_embed").file))),
              "int8": onnx.load(str(variant_files(int8_bundle)["cpu"]["image_embed"]))}
    heads = {}
    for name, g in graphs.items():  # the classifier logits as an output
        heads[name] = [n for n in g.graph.node if n.op_type == "Gemm"][-1].output[0]
        g.graph.output.append(onnx.helper.make_tensor_value_info(heads[name], onnx.TensorProto.FLOAT, None))

    def logits(name: str, pixels: np.ndarray) -> np.ndarray:
        so = ort.SessionOptions()
        so.intra_op_num_threads, so.log_severity_level = 2, 3
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        sess = ort.InferenceSession(graphs[name].SerializeToString(), so, providers=["CPUExecutionProvider"])
        return np.concatenate([sess.run([heads[name]], {"pixel_values": pixels[i:i + 64]})[0]
                               for i in range(0, len(pixels), 64)])

    def error(got: np.ndarray, ref: np.ndarray) -> float:
        return float(np.linalg.norm(got - ref) / np.linalg.norm(ref))

    calibration = model.pixel_values(crops(n, 11)[0])
    ref = logits("float", calibration)
    inits = {t.name: t for t in graphs["int8"].graph.initializer}
    scales = list(dict.fromkeys(nd.input[1] for nd in graphs["int8"].graph.node if nd.op_type == "QuantizeLinear"
                                and nd.input[0] not in inits and nd.input[1] in inits))
    evaluation = model.pixel_values(crops(held_out, 7)[0])
    float_eval = logits("float", evaluation)
    before = logits("int8", evaluation)
    start = best = error(logits("int8", calibration), ref)
    t0, moved = time.perf_counter(), {}
    for name in scales:
        tensor, pick = inits[name], 1.0
        original = numpy_helper.to_array(tensor).copy()
        for f in factors:
            tensor.CopyFrom(numpy_helper.from_array((original * f).astype(original.dtype), name))
            e = error(logits("int8", calibration), ref)
            if e < best * 0.998:
                best, pick = e, f
        tensor.CopyFrom(numpy_helper.from_array((original * pick).astype(original.dtype), name))
        if pick != 1.0:
            moved[name] = pick
    after = logits("int8", evaluation)
    print(f"{len(scales)} activation scales searched in {time.perf_counter() - t0:.0f} s on {n} crops: error "
          f"{start:.4f} -> {best:.4f}, {len(moved)} moved {moved}")
    for label, got in (("calibrate's scales", before), ("searched scales", after)):
        same = got.argmax(1) == float_eval.argmax(1)
        print(f"{label:18s} top-1 agreement {same.mean():.4f} ({same.sum()}/{held_out}) | logits rel. error "
              f"{error(got, float_eval):.4f}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("photos").add_argument("folder", type=Path)
    p = sub.add_parser("recall")
    p.add_argument("float_bundle", type=Path)
    p.add_argument("int8_bundle", type=Path)
    p = sub.add_parser("top1")
    p.add_argument("float_bundle", type=Path)
    p.add_argument("int8_bundle", type=Path)
    p.add_argument("--crops", type=int, default=1200)
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--floor", action="store_true", help="also the float graph with fp16-rounded weights")
    p.add_argument("--decompose", action="store_true",
                   help="also the cpu variant with only its activations, and only its weights, INT8")
    p = sub.add_parser("ranges")
    p.add_argument("float_bundle", type=Path)
    p.add_argument("int8_bundle", type=Path)
    p.add_argument("--crops", type=int, default=128)
    args = parser.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.cmd == "photos":
        link_photos(args.folder)
    elif args.cmd == "recall":
        run_recall(args.float_bundle, args.int8_bundle)
    elif args.cmd == "ranges":
        run_ranges(args.float_bundle, args.int8_bundle, args.crops)
    else:
        run_top1(args.float_bundle, args.int8_bundle, args.crops, args.seed, floor=args.floor,
                 decompose=args.decompose)
    return 0


if __name__ == "__main__":
    sys.exit(main())
