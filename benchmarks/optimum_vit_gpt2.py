"""Caption latency: edge-run against Hugging Face Optimum and transformers on the same ViT-GPT2 weights.

    python benchmarks/optimum_vit_gpt2.py all --workdir /tmp/vit-gpt2-optimum \\
        --optimum-python /work/optimum-venv/bin/python                 # everything, one side at a time
    python benchmarks/optimum_vit_gpt2.py all --workdir DIR --tiny ...  # a tiny model, to try the script
    python benchmarks/optimum_vit_gpt2.py all --workdir DIR --int8 --reuse-exports   # INT8 against INT8

Optimum pins an older transformers than edge-run, so it lives in an environment of its own, made
once with the versions in benchmarks/optimum-requirements.txt:

    python3 -m venv /work/optimum-venv
    /work/optimum-venv/bin/pip install -r benchmarks/optimum-requirements.txt

`all` runs from edge-run's environment. It builds a ViT-GPT2-shaped checkpoint (ViTConfig() and
GPT2Config() defaults, vocabulary 50257, seeded random weights from transformers' own initialisers,
a GPT-2-sized byte-level BPE tokenizer made locally), turns scikit-image's astronaut photo into
pixel values once (ViTImageProcessorPil), and exports it twice, each export in a process of its own:
  optimum-export  Optimum's ONNX exporter, task image-to-text-with-past, with its CLI's defaults
                  (merged decoder), in the Optimum environment;
  export          `edge-run export hf:DIR --task caption`.
Then each side runs in a process of its own, started one after another:
  optimum         ORTModelForVision2Seq.generate(), onnxruntime with 2 intra-op threads;
  torch           VisionEncoderDecoderModel.generate(), torch.set_num_threads(2);
  edgerun         edgerun.load(BUNDLE, threads=2).caption(pixel_values=...).
onnxruntime's threads are set alike on both of its sides (--pool): by default one process-wide
pool per process, as the `edge-run` command runs; `--pool per-session` gives each session a pool
of its own with spinning off, the library's default.
Each warms up (--warmup captions), then the sides take turns, one caption each per turn, for
--runs turns; a side that is not captioning waits blocked on its stdin, so two never run at once,
and a change in the load of the shared machine touches all sides of a turn alike. Every caption
decodes the same pixel values with 3 beams and exactly 20 new tokens (min_new_tokens =
max_new_tokens = 20), batch 1. The script reports per side the median caption time, split into
image encoder and the rest (decoding), peak RSS and size on disk; the speed-ups both as ratios of
medians and as medians of turn-by-turn ratios; whether the token ids agree; and the load average
before each turn. It prints a table and writes DIR/results.json.

With --int8 each library quantizes the same exports its own way before the turns (steps
optimum-quantize: ORTQuantizer with AutoQuantizationConfig.avx512_vnni(is_static=False), the
encoder and the merged decoder; calibrate: `edge-run calibrate --int8-head --variants cpu` on 64
crops and flips of the captioned photos the installed packages ship); torch's generate() stays the
float reference. It writes DIR/results-int8.json.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

OPTIONS = {"num_beams": 3, "max_new_tokens": 20, "min_new_tokens": 20}
END = "<|endoftext|>"
MARK = "@@bench "  # prefixes the lines a side process says to the orchestrator
GPT2_VOCAB = 50257
SEED = 0
REQUIREMENTS = Path(__file__).with_name("optimum-requirements.txt")
MAKE_ENV = (f"python3 -m venv /work/optimum-venv && /work/optimum-venv/bin/pip install "
            f"-r {REQUIREMENTS}")
TINY = {"encoder": {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
                    "intermediate_size": 64, "image_size": 32, "patch_size": 8},
        "decoder": {"n_embd": 32, "n_layer": 2, "n_head": 4, "n_inner": 64, "n_positions": 64},
        "vocab": 1000}


class BenchFailure(Exception):
    """A step failed; the message says which and why (printed as one line, no traceback)."""


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def load_average() -> str:
    """The 1, 5 and 15 minute load averages ("?" where /proc is missing)."""
    path = Path("/proc/loadavg")
    return " ".join(path.read_text().split()[:3]) if path.exists() else "?"


def dir_mb(path: Path) -> float:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 1e6


def summarise(info: dict, runs: list[dict], final: dict) -> dict:
    """One side's timed runs as medians (ms): the caption, its image encoder part and the rest
    (decoding), plus the edge-run stages where there are some, peak RSS and the token ids."""
    ms = [r["ms"] for r in runs]
    enc = [r["encoder_ms"] for r in runs]
    out = {**info, "median_ms": statistics.median(ms), "encoder_ms": statistics.median(enc),
           "decoder_ms": statistics.median(t - e for t, e in zip(ms, enc)), "runs_ms": ms,
           "peak_rss_mb": final["peak_rss_mb"], "token_ids": runs[-1]["token_ids"],
           "same_ids_every_run": all(r["token_ids"] == runs[0]["token_ids"] for r in runs)}
    if "stages_ms" in runs[0]:
        out["stages_ms"] = {k: statistics.median(r["stages_ms"][k] for r in runs) for k in runs[0]["stages_ms"]}
    return out


# ---------------------------------------------------------------- checkpoint (edge-run environment)

def gpt2_sized_tokenizer(vocab_size: int):
    """A GPT-2-layout byte-level BPE tokenizer with exactly `vocab_size` ids and no download: the 256
    byte symbols, then (vocab_size - 257) merges of two byte symbols in a fixed order, then
    `<|endoftext|>` at the last id, as in GPT-2."""
    from tokenizers import pre_tokenizers
    from transformers import GPT2Tokenizer

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {symbol: i for i, symbol in enumerate(alphabet)}
    merges = []
    for a in alphabet:
        for b in alphabet:
            if len(vocab) == vocab_size - 1:
                break
            vocab[a + b] = len(vocab)
            merges.append((a, b))
    vocab[END] = len(vocab)
    return GPT2Tokenizer(vocab=vocab, merges=merges)


def make_checkpoint(folder: Path, tiny: bool) -> Path:
    """ViTConfig() + GPT2Config(add_cross_attention=True) defaults (or a tiny variant), weights
    drawn by transformers' own initialisers from a fixed seed, saved with save_pretrained."""
    import torch
    from transformers import (
        GenerationConfig,
        GPT2Config,
        VisionEncoderDecoderConfig,
        VisionEncoderDecoderModel,
        ViTConfig,
    )

    if (folder / "config.json").exists():
        return folder
    tok = gpt2_sized_tokenizer(TINY["vocab"] if tiny else GPT2_VOCAB)
    end = tok.convert_tokens_to_ids(END)
    enc_cfg = ViTConfig(**(TINY["encoder"] if tiny else {}))
    dec_cfg = GPT2Config(**(TINY["decoder"] if tiny else {}), vocab_size=len(tok), bos_token_id=end,
                         eos_token_id=end, add_cross_attention=True, is_decoder=True)
    config = VisionEncoderDecoderConfig.from_encoder_decoder_configs(enc_cfg, dec_cfg)
    config.decoder_start_token_id = config.pad_token_id = config.eos_token_id = end
    torch.manual_seed(SEED)
    model = VisionEncoderDecoderModel(config).eval()
    model.generation_config = GenerationConfig(decoder_start_token_id=end, bos_token_id=end,
                                               eos_token_id=end, pad_token_id=end)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    size = enc_cfg.image_size
    processor = {"do_normalize": True, "do_rescale": True, "do_resize": True, "image_mean": [0.5] * 3,
                 "image_std": [0.5] * 3, "image_processor_type": "ViTImageProcessor", "resample": 2,
                 "rescale_factor": 1 / 255, "size": {"height": size, "width": size}}
    (folder / "preprocessor_config.json").write_text(json.dumps(processor, indent=2))
    return folder


def make_pixels(folder: Path, out: Path) -> Path:
    """The astronaut photo (512x512 RGB) as pixel values, shape (1, 3, H, W) float32, saved as .npy."""
    import numpy as np
    from PIL import Image
    from skimage import data
    from transformers import ViTImageProcessorPil

    proc = ViTImageProcessorPil.from_pretrained(folder)
    pixels = proc(images=Image.fromarray(data.astronaut()), return_tensors="np")["pixel_values"]
    np.save(out, pixels.astype(np.float32))
    return out


# ---------------------------------------------------------------- the timed sides

def timed(generate: Callable, encoder_spent: list[float]) -> Callable[[], dict]:
    """One caption per call: its wall time, the image encoder's part of it (the encoder hook appends
    its seconds to `encoder_spent`) and the token ids of `generate()`, shape (1, len)."""
    def run_once() -> dict:
        encoder_spent.clear()
        start = time.perf_counter()
        ids = generate()
        return {"ms": (time.perf_counter() - start) * 1000, "encoder_ms": sum(encoder_spent) * 1000,
                "token_ids": [int(t) for t in ids[0]]}
    return run_once


def torch_side(folder: Path, pixels: Path, args) -> tuple[Callable[[], dict], dict]:
    import numpy as np
    import torch
    from transformers import VisionEncoderDecoderModel

    torch.set_num_threads(args.threads)
    model = VisionEncoderDecoderModel.from_pretrained(folder).eval()
    values = torch.from_numpy(np.load(pixels))
    spent: list[float] = []
    model.encoder.register_forward_pre_hook(lambda *_: spent.append(-time.perf_counter()))
    model.encoder.register_forward_hook(lambda *_: spent.append(time.perf_counter()))

    def generate():
        with torch.inference_mode():
            return model.generate(pixel_values=values, **OPTIONS)
    return timed(generate, spent), {"torch": torch.__version__}


def optimum_side(onnx_dir: Path, pixels: Path, args) -> tuple[Callable[[], dict], dict]:
    """ORTModelForVision2Seq with the threads given to onnxruntime (--pool as for edge-run). torch's
    pool runs only generate()'s own work between sessions (log-softmax, top-k over beams x vocab)
    and gets --optimum-torch-threads: with 2, on a busy 2-core machine, its workers took the cores
    from onnxruntime (decoding 1.6x slower)."""
    import numpy as np
    import onnxruntime as ort
    import optimum.version
    import torch
    import transformers
    from optimum.onnxruntime import ORTModelForVision2Seq

    opts = ort.SessionOptions()
    if args.pool == "shared":  # its encoder and decoder sessions on one process-wide pool
        import onnxruntime.capi._pybind_state as C

        C.set_global_thread_pool_sizes(args.threads, 1)
        opts.use_per_session_threads = False
    else:
        opts.intra_op_num_threads = args.threads
        opts.inter_op_num_threads = 1
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    torch.set_num_threads(args.optimum_torch_threads)
    model = ORTModelForVision2Seq.from_pretrained(onnx_dir, session_options=opts, provider="CPUExecutionProvider")
    values = torch.from_numpy(np.load(pixels))
    spent: list[float] = []
    encoder_forward = model.encoder.forward

    def timed_encoder(*a, **kw):
        start = time.perf_counter()
        try:
            return encoder_forward(*a, **kw)
        finally:
            spent.append(time.perf_counter() - start)

    def generate():
        with torch.inference_mode():
            return model.generate(pixel_values=values, **OPTIONS)

    model.encoder.forward = timed_encoder
    info = {"decoder_file": Path(getattr(model.decoder, "path", "?")).name, "torch_threads": args.optimum_torch_threads,
            "optimum": optimum.version.__version__, "transformers": transformers.__version__,
            "onnxruntime": ort.__version__}
    return timed(generate, spent), info


def edgerun_side(bundle: Path, pixels: Path, args) -> tuple[Callable[[], dict], dict]:
    import numpy as np

    import edgerun

    model = edgerun.load(bundle, threads=args.threads)
    values = np.load(pixels)

    def run_once() -> dict:
        start = time.perf_counter()
        result = model.caption(pixel_values=values, **OPTIONS)
        ms = (time.perf_counter() - start) * 1000
        stages = {k: v * (1 if k == "decoder_calls" else 1000) for k, v in model.last_timings.items()}
        return {"ms": ms, "encoder_ms": stages["vision"], "stages_ms": stages,
                "token_ids": [int(t) for t in result.token_ids], "torch_imported": "torch" in sys.modules}
    return run_once, {"edgerun": edgerun.__version__}


def export_optimum(folder: Path, out: Path) -> dict:
    """Optimum's exporter with its CLI's defaults for this task (post-processing merges the decoders)."""
    from optimum.exporters.onnx import main_export

    start = time.perf_counter()
    main_export(str(folder), output=str(out), task="image-to-text-with-past", do_validation=False)
    files = {p.name: round(p.stat().st_size / 1e6, 1) for p in sorted(out.iterdir()) if p.is_file()}
    return {"seconds": time.perf_counter() - start, "files_mb": files, "disk_mb": dir_mb(out),
            "peak_rss_mb": peak_rss_mb()}


def quantize_optimum(onnx_dir: Path, out: Path) -> dict:
    """Optimum's own INT8: ORTQuantizer with AutoQuantizationConfig.avx512_vnni(is_static=False)
    (dynamic, per-channel weights, onnxruntime's quantize_dynamic underneath) on the encoder and the
    merged decoder, saved under their usual names beside copies of the configs and tokenizer."""
    import shutil

    from optimum.onnxruntime import ORTQuantizer
    from optimum.onnxruntime.configuration import AutoQuantizationConfig

    start = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    config = AutoQuantizationConfig.avx512_vnni(is_static=False, per_channel=True)
    for name in ("encoder_model.onnx", "decoder_model_merged.onnx"):
        ORTQuantizer.from_pretrained(onnx_dir, file_name=name).quantize(config, save_dir=out, file_suffix=None)
    for p in onnx_dir.iterdir():
        if p.is_file() and p.suffix != ".onnx" and not (out / p.name).exists():
            shutil.copy2(p, out / p.name)
    files = {p.name: round(p.stat().st_size / 1e6, 1) for p in sorted(out.iterdir()) if p.is_file()}
    return {"seconds": time.perf_counter() - start, "files_mb": files, "disk_mb": dir_mb(out),
            "peak_rss_mb": peak_rss_mb()}


def calibrate_edgerun(bundle: Path, out: Path, images: Path) -> dict:
    """`edge-run calibrate BUNDLE --data IMAGES --augment --samples 64 --int8-head --variants cpu`."""
    from edgerun.calibration.pipeline import CalibrationOptions, calibrate
    from edgerun.models.photos import load_photos

    images.mkdir(parents=True, exist_ok=True)
    for photo in load_photos()[0]:  # the captioned photos the installed packages ship
        link = images / photo.flat_name
        if not link.exists():
            link.symlink_to(photo.path)
    start = time.perf_counter()
    options = CalibrationOptions(samples=64, augment=True, int8_head=True, variants=("cpu",), eval_samples=8,
                                 overwrite=True)
    calibrate(bundle, str(images), out, options, progress=lambda msg: print(msg, file=sys.stderr))
    return {"seconds": time.perf_counter() - start, "disk_mb": dir_mb(out), "peak_rss_mb": peak_rss_mb(),
            "max_abs_diff": None}


def export_edgerun(folder: Path, bundle: Path) -> dict:
    from edgerun.export.pipeline import export

    start = time.perf_counter()
    report = export(f"hf:{folder}", task="caption", output=bundle, overwrite=True)
    return {"seconds": time.perf_counter() - start, "stages": report.stage_seconds,
            "max_abs_diff": report.max_abs_diff, "disk_mb": dir_mb(bundle), "peak_rss_mb": peak_rss_mb()}


def say(message: dict) -> None:
    print(MARK + json.dumps(message), flush=True)


def serve(run_once: Callable[[], dict], info: dict, warmup: int) -> None:
    """A side's process: warm up, say ready, then one caption per "run" line on stdin until "done"."""
    for _ in range(warmup):
        run_once()
    say({"ready": True, **info})
    for line in sys.stdin:
        if line.strip() != "run":
            break
        say(run_once())
    say({"peak_rss_mb": peak_rss_mb()})


# ---------------------------------------------------------------- orchestration

def check_optimum_env(python: Path) -> dict:
    """The Optimum environment's versions, or BenchFailure saying how to make it."""
    if not python.is_file():
        raise BenchFailure(f"no Optimum environment: {python} does not exist; make it with: {MAKE_ENV}")
    probe = ("import json, optimum.version, transformers, onnxruntime, torch;"
             "from optimum.onnxruntime import ORTModelForVision2Seq;"
             "print(json.dumps({'optimum': optimum.version.__version__, 'transformers': transformers.__version__,"
             "'onnxruntime': onnxruntime.__version__, 'torch': torch.__version__}))")
    out = subprocess.run([str(python), "-c", probe], capture_output=True, text=True, check=False)
    if out.returncode != 0:
        last = (out.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise BenchFailure(f"{python} cannot import Optimum's onnxruntime support ({last}); "
                           f"make the environment with: {MAKE_ENV}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def side_command(python: Path, step: str, args) -> list[str]:
    return [str(python), __file__, step, "--workdir", str(args.workdir), "--warmup", str(args.warmup),
            "--threads", str(args.threads), "--optimum-torch-threads", str(args.optimum_torch_threads),
            "--pool", args.pool, *(["--int8"] if args.int8 else [])]


def side_env(args) -> dict:
    """Each side's environment; edge-run's sessions share one pool as the `edge-run` command's do
    when --pool is shared (the Optimum side makes its own pool shared in optimum_side)."""
    return {**os.environ, "OMP_NUM_THREADS": str(args.threads),
            "EDGERUN_ORT_SHARED_POOL": "1" if args.pool == "shared" else "0"}


class Worker:
    """One side in a process of its own. It loads and warms up when started, then captions once per
    run() and waits in between, blocked on its stdin, so that only one side works at a time."""

    def __init__(self, python: Path, side: str, args):
        self.side, self.log_path = side, args.workdir / f"{side}.log"
        print(f"[{side}] starting, load average {load_average()}", file=sys.stderr, flush=True)
        with open(self.log_path, "w") as log:
            self.proc = subprocess.Popen(side_command(python, side, args), stdin=subprocess.PIPE,
                                         stdout=subprocess.PIPE, stderr=log, text=True, env=side_env(args))
        self.info = self.read()

    def read(self) -> dict:
        for line in self.proc.stdout:
            if line.startswith(MARK):
                return json.loads(line[len(MARK):])
        tail = " | ".join(self.log_path.read_text().strip().splitlines()[-3:]) or "(no output)"
        raise BenchFailure(f"the {self.side} side stopped (exit {self.proc.wait()}): {tail}")

    def send(self, line: str) -> dict:
        try:
            self.proc.stdin.write(line + "\n")
            self.proc.stdin.flush()
        except BrokenPipeError:
            pass  # it died: read() says how
        return self.read()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


def run_export(python: Path, step: str, output: str, args) -> dict:
    """Run an export step in a process of its own, or with --reuse-exports take the record of an
    earlier one whose output is there."""
    record = args.workdir / f"{step}.json"
    if args.reuse_exports and record.exists() and (args.workdir / output).is_dir():
        return {**json.loads(record.read_text()), "reused": True}
    print(f"[{step}] load average {load_average()}", file=sys.stderr, flush=True)
    out = subprocess.run(side_command(python, step, args), capture_output=True, text=True, env=side_env(args),
                         check=False)
    if out.returncode != 0:
        tail = " | ".join(out.stderr.strip().splitlines()[-3:]) or "(no output)"
        raise BenchFailure(f"step {step!r} failed (exit {out.returncode}): {tail}")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    record.write_text(json.dumps(result, indent=2))
    return result


def interleaved_runs(args, pythons: dict[str, Path]) -> tuple[dict, list[str]]:
    """Start the sides one after another, then take turns: one caption each, --runs times.
    Returns {side: summary} and the load average before each turn."""
    workers: dict[str, Worker] = {}
    runs: dict[str, list[dict]] = {side: [] for side in pythons}
    loads = []
    try:
        for side, python in pythons.items():
            workers[side] = Worker(python, side, args)
        for i in range(args.runs):
            loads.append(load_average())
            for side, worker in workers.items():
                runs[side].append(worker.send("run"))
            times = ", ".join(f"{s} {runs[s][-1]['ms']:.0f} ms" for s in runs)
            print(f"[turn {i + 1}/{args.runs}] load {loads[-1]}: {times}", file=sys.stderr, flush=True)
        finals = {side: worker.send("done") for side, worker in workers.items()}
    finally:
        for worker in workers.values():
            worker.stop()
    return {side: summarise(workers[side].info, runs[side], finals[side]) for side in pythons}, loads


def agreement(a: list[int], b: list[int]) -> dict:
    """Whether two id sequences are equal, and where they first differ (None when equal)."""
    first = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)
    if first is None and len(a) != len(b):
        first = min(len(a), len(b))
    return {"same": first is None, "first_difference": first}


def ratios(slow: dict, fast: dict) -> dict:
    """slow/fast: of the medians, and the median of the turn-by-turn ratios (the two sides' runs
    of one turn were seconds apart, so a change in the machine's load moves both)."""
    paired = [s / f for s, f in zip(slow["runs_ms"], fast["runs_ms"])]
    return {"of_medians": slow["median_ms"] / fast["median_ms"], "paired_median": statistics.median(paired),
            "paired_min": min(paired), "paired_max": max(paired)}


def run_all(args) -> dict:
    versions = check_optimum_env(args.optimum_python)
    folder = make_checkpoint(args.workdir / "checkpoint", args.tiny)
    make_pixels(folder, args.workdir / "pixels.npy")
    me = Path(sys.executable)
    results: dict = {"options": OPTIONS, "threads": args.threads, "pool": args.pool,
                     "optimum_torch_threads": args.optimum_torch_threads,
                     "runs": args.runs, "warmup": args.warmup, "tiny": args.tiny, "optimum_env": versions,
                     "checkpoint_mb": dir_mb(folder)}
    results["optimum_export"] = run_export(args.optimum_python, "optimum-export", "optimum-onnx", args)
    results["edgerun_export"] = run_export(me, "export", "bundle", args)
    if args.int8:  # both sides' own INT8 of the same exports; torch stays the float reference
        results["optimum_export"] = run_export(args.optimum_python, "optimum-quantize", "optimum-onnx-int8", args)
        results["edgerun_export"] = run_export(me, "calibrate", "bundle-int8", args)
    results["int8"] = args.int8
    sides, loads = interleaved_runs(args, {"optimum": args.optimum_python, "torch": me, "edgerun": me})
    results.update(sides)
    results["load_average_per_turn"] = loads
    t, o, e = sides["torch"], sides["optimum"], sides["edgerun"]
    results["token_ids_agree"] = {"optimum_vs_torch": agreement(o["token_ids"], t["token_ids"]),
                                  "edgerun_vs_torch": agreement(e["token_ids"], t["token_ids"]),
                                  "edgerun_vs_optimum": agreement(e["token_ids"], o["token_ids"])}
    results["speedup"] = {"edgerun_vs_optimum": ratios(o, e), "edgerun_vs_torch": ratios(t, e),
                          "optimum_vs_torch": ratios(t, o)}
    return results


def print_table(r: dict) -> None:
    t, o, e = r["torch"], r["optimum"], r["edgerun"]
    precision = "INT8 (Optimum: ORTQuantizer dynamic; edge-run: calibrate), torch float" if r["int8"] else "float"
    print(f"Optimum env: {r['optimum_env']}; {r['runs']} turns after {r['warmup']} warm-up runs; {precision}")
    print(f"{'':22s}{'torch':>12s}{'Optimum':>12s}{'edge-run':>12s}")
    for label, key, fmt in (("caption median (ms)", "median_ms", ".1f"), ("  image encoder (ms)", "encoder_ms", ".1f"),
                            ("  decoding (ms)", "decoder_ms", ".1f"), ("peak RSS (MB)", "peak_rss_mb", ".0f")):
        print(f"{label:22s}{t[key]:12{fmt}}{o[key]:12{fmt}}{e[key]:12{fmt}}")
    disk = (r["checkpoint_mb"], r["optimum_export"]["disk_mb"], r["edgerun_export"]["disk_mb"])
    print(f"{'on disk (MB)':22s}{disk[0]:12.0f}{disk[1]:12.0f}{disk[2]:12.0f}")
    for name, s in r["speedup"].items():
        print(f"speed-up {name.replace('_', ' ')}: {s['of_medians']:.2f}x of medians, {s['paired_median']:.2f}x "
              f"median turn by turn (range {s['paired_min']:.2f}-{s['paired_max']:.2f})")
    reused = " (reused from an earlier run)" if r["optimum_export"].get("reused") else ""
    print(f"export{reused}: Optimum {r['optimum_export']['seconds']:.0f} s {r['optimum_export']['files_mb']}; "
          f"edge-run {r['edgerun_export']['seconds']:.0f} s, max abs diff {r['edgerun_export']['max_abs_diff']}")
    print(f"edge-run stages (ms): { {k: round(v, 1) for k, v in e['stages_ms'].items()} }")
    print(f"token ids agree: {r['token_ids_agree']}; the same in every run: "
          f"{all(s['same_ids_every_run'] for s in (t, o, e))}")
    print(f"load average per turn: {r['load_average_per_turn']}")


def step(args) -> dict | None:
    """One side, in its own process: an export (returns its record) or a timed side (serves turns)."""
    w = args.workdir
    folder, pixels, onnx_dir, bundle = w / "checkpoint", w / "pixels.npy", w / "optimum-onnx", w / "bundle"
    if args.step == "optimum-export":
        return export_optimum(folder, onnx_dir)
    if args.step == "export":
        return export_edgerun(folder, bundle)
    if args.step == "optimum-quantize":
        return quantize_optimum(onnx_dir, w / "optimum-onnx-int8")
    if args.step == "calibrate":
        return calibrate_edgerun(bundle, w / "bundle-int8", w / "calibration-images")
    if args.int8:
        onnx_dir, bundle = w / "optimum-onnx-int8", w / "bundle-int8"
    make_side = {"optimum": lambda: optimum_side(onnx_dir, pixels, args),
                 "torch": lambda: torch_side(folder, pixels, args),
                 "edgerun": lambda: edgerun_side(bundle, pixels, args)}[args.step]
    serve(*make_side(), args.warmup)
    return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("step", choices=["all", "optimum-export", "optimum-quantize", "optimum", "torch", "export",
                                     "calibrate", "edgerun"])
    ap.add_argument("--workdir", type=Path, required=True)
    ap.add_argument("--optimum-python", type=Path, default=Path("/work/optimum-venv/bin/python"),
                    help="the Optimum environment's python (default: %(default)s)")
    ap.add_argument("--runs", type=int, default=10, help="timed turns: one caption per side each")
    ap.add_argument("--warmup", type=int, default=2, help="untimed captions per side first")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--optimum-torch-threads", type=int, default=1,
                    help="torch threads in the Optimum process, for generate()'s own work (default: %(default)s)")
    ap.add_argument("--pool", choices=["shared", "per-session"], default="shared",
                    help="onnxruntime threads, both sides alike: one process-wide pool (what the edge-run "
                    "command uses) or a pool per session with spinning off (the library's default)")
    ap.add_argument("--reuse-exports", action="store_true", help="keep the exports of an earlier `all` in WORKDIR")
    ap.add_argument("--tiny", action="store_true", help="a tiny model, to try the script quickly")
    ap.add_argument("--int8", action="store_true", help="INT8 against INT8: Optimum's ORTQuantizer (dynamic, "
                    "AVX512-VNNI config) against `edge-run calibrate --int8-head --variants cpu`; torch stays float")
    args = ap.parse_args()
    if min(args.runs, args.threads, args.optimum_torch_threads) < 1 or args.warmup < 0:
        ap.error("--runs, --threads and --optimum-torch-threads must be >= 1, --warmup >= 0")
    args.workdir = args.workdir.resolve()
    args.workdir.mkdir(parents=True, exist_ok=True)
    try:
        if args.step != "all":
            result = step(args)
            if result is not None:
                print(json.dumps(result))
            return
        results = run_all(args)
    except BenchFailure as err:
        sys.exit(f"error: {err}")
    (args.workdir / ("results-int8.json" if args.int8 else "results.json")).write_text(json.dumps(results, indent=2))
    print_table(results)


if __name__ == "__main__":
    main()
