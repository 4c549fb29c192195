"""`ckpt:PATH` sources: the built-in families' checkpoints (edgerun.models.families) as bundles.

    edge-run export ckpt:RUN_DIR/best.pt --task caption|vqa|retrieval|all -o BUNDLE

`all` exports every head of the model into one multi-task bundle. Whatever the tasks, the image
encoder is one module, `vision` (pixel_values -> image_features), that every task lists first; so
`Model.encode()` runs it once and every task reads its output. Modules and roles (`extra["role"]`):

| task      | modules (in order)                                                          |
|-----------|-----------------------------------------------------------------------------|
| caption   | vision (image_encoder), cross_kv (cross_kv), decoder (decoder)              |
| vqa, gen. | vision, question_encoder (question_encoder), vqa_cross_kv, vqa_decoder      |
| vqa, cls. | vision, vqa_classifier (answer_classifier; `extra["answers"]`: the classes)  |
| retrieval | vision, image_embed (image_embedder), text_embed (text_embedder)            |

The LSTM captioner's `cross_kv` module is its initial-state graph (image_features -> init_h,
init_c), and its decoder's `extra["cache"]` is `{"type": "rnn", ...}` where a transformer's is
`{"type": "kv", ...}`. Every graph is checked against the torch model on shapes other than the
trace's before anything is written.
"""
from __future__ import annotations

import datetime as _dt
import time
import warnings
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ..bundle import BundleWriter, sha256_file
from ..errors import OptionError, UnsupportedModelError
from ..manifest import Manifest, TaskSpec
from ..models.families import graphs as g
from ..models.families.tokenizer import BOS_ID, EOS_ID, PAD_ID
from .onnx import EXTERNAL_DATA_BYTES, GraphSpec, compare
from .pipeline import ExportReport, module_specs, write_graphs
from .retrieval import check_embeddings

PREFIX = "ckpt:"
TASKS = ("caption", "vqa", "retrieval", "all")
STEP_AXES = {"input_ids": {0: "rows", 1: "new"}, "past_key": {0: "past", 2: "rows"},
             "past_value": {0: "past", 2: "rows"}, "logits": {0: "rows"},
             "new_key": {0: "new", 2: "rows"}, "new_value": {0: "new", 2: "rows"}}
UNLIMITED_TEXT = 512  # max_text_length of text encoders without positions (bag of words, mean, GRU)
TEXT_INPUTS = ["input_ids", "attention_mask", "image_features"]
TEXT_AXES = {"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "seq"}}


def checkpoint_path(source: str | Path) -> Path:
    """`ckpt:PATH` (or a plain path) -> the checkpoint file."""
    text = str(source)
    path = Path(text.removeprefix(PREFIX)).expanduser()
    if not path.is_file():
        raise OptionError(f"checkpoint {path} does not exist; a ckpt: source is a .pt file written by "
                          "edgerun.models.families.save_checkpoint, e.g. ckpt:runs/1/best.pt")
    return path


def export_checkpoint(source: str | Path, task: str, output: str | Path, *, opset: int = 17,
                      revision: str | None = None, overwrite: bool = False, atol: float | None = None,
                      external_data_bytes: int = EXTERNAL_DATA_BYTES,
                      progress: Callable[[str], None] = lambda msg: None) -> ExportReport:
    """Export the checkpoint at `source` (`ckpt:PATH`) for `task` (or "all") into the bundle `output`."""
    from ..models.families import load_checkpoint

    start, stages = time.perf_counter(), {}
    if revision is not None:
        raise OptionError("--revision applies to hub names; a ckpt: source is one file")
    if isinstance(opset, bool) or not isinstance(opset, int) or not 14 <= opset <= 21:
        raise OptionError(f"opset must be between 14 and 21 (17 is the default), got {opset!r}")
    if task not in TASKS:
        raise OptionError(f"unknown task {task!r}; valid: {', '.join(TASKS)}")
    path = checkpoint_path(source)
    progress(f"loading {path}")
    t = time.perf_counter()
    ckpt = load_checkpoint(path)
    tasks = ckpt.model.tasks if task == "all" else (task,)
    if any(name not in ckpt.model.tasks for name in tasks):
        name = ckpt.config.get("name", ckpt.model.family)
        raise UnsupportedModelError(f"{path} ({name}) cannot be exported for task {task!r}; "
                                    f"it serves: {', '.join(ckpt.model.tasks)} (or all)")
    exporter = (LstmExporter if ckpt.model.family == "lstm" else TransformerExporter)(ckpt, tasks)
    stages["load"] = time.perf_counter() - t
    with BundleWriter(output, overwrite=overwrite) as writer, warnings.catch_warnings():
        # The recurrent graphs take their initial state as inputs, which is the exporter's own advice.
        warnings.filterwarnings("ignore", "Exporting a model to ONNX with a batch_size other than 1", UserWarning)
        specs, diffs = write_graphs(exporter, writer.dir, opset=opset, external_data_bytes=external_data_bytes,
                                    atol=atol, progress=progress, stages=stages)
        ckpt.tokenizer.save(writer.dir / "tokenizer.json")
        parts = exporter.manifest_parts()
        modules = module_specs(writer.dir, specs, diffs, parts["module_extra"], progress)
        manifest = Manifest(
            tasks={k: TaskSpec(tuple(v)) for k, v in parts["tasks"].items()}, modules=modules,
            preprocess=ckpt.preprocess.to_dict(), tokenizer={"file": "tokenizer.json"},
            decoding={"decoder_start_ids": [BOS_ID], "stop_ids": [EOS_ID], "pad_id": PAD_ID,
                      "prompt_add_special_tokens": False, "generation": {}},
            model=parts["model"], provenance=_provenance(path, ckpt, opset))
        out = writer.commit(manifest)
    bundle_bytes = sum(p.stat().st_size for p in Path(out).rglob("*") if p.is_file())
    return ExportReport(Path(out), time.perf_counter() - start, diffs, bundle_bytes, path.stat().st_size,
                        stages)


def _provenance(path: Path, ckpt, opset: int) -> dict:
    """`source` is the checkpoint's absolute path, so that the bundle's identity (source,
    architecture, weights digest) does not depend on how the path was spelt."""
    from .hf import library_versions

    return {"source": PREFIX + str(path.resolve()), "revision": None,
            "folder": str(path.resolve().parent), "weights_sha256": sha256_file(path),
            "architecture": ckpt.config.get("name") or f"edgerun-{ckpt.model.family}",
            "family": ckpt.model.family, "checkpoint_metadata": ckpt.metadata, "opset": opset,
            "exported_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "libraries": library_versions()}


# --- inputs for tracing and checking ---------------------------------------------------------------


def _pixels(size: int, batch: int, seed: int) -> torch.Tensor:
    return torch.randn((batch, 3, size, size), generator=torch.Generator().manual_seed(seed))


def _texts(vocab: int, lengths, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows `[BOS] words [EOS]` right-padded with [PAD], as the tokenizer makes them, and their mask."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.full((len(lengths), max(lengths)), PAD_ID, dtype=torch.int64)
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):
        ids[row, :n] = torch.randint(4, vocab, (n,), generator=gen)
        ids[row, 0], ids[row, n - 1] = BOS_ID, EOS_ID
        mask[row, :n] = 1
    return ids, mask


def _tol(atol, ref) -> float:
    return atol if atol is not None else max(1e-4, 1e-5 * float(np.abs(ref).max()))


def _check_steps(run, name: str, feeds: dict, state: dict, rows: int, vocab: int, full_logits, atol,
                 seed: int) -> float:
    """The prompt (2 tokens) in one call on the initial state, then single steps, against
    `full_logits(seq)`: the torch decoder's teacher-forcing forward over the whole sequence."""
    gen = np.random.default_rng(seed)
    seq = gen.integers(4, vocab, (rows, 6))
    seq[:, 0] = BOS_ID
    with torch.no_grad():
        full = full_logits(torch.from_numpy(seq)).numpy()
    worst, begin = 0.0, 0
    for end in range(2, seq.shape[1] + 1):
        out = run(name, {"input_ids": seq[:, begin:end].astype(np.int64), **state, **feeds})
        want = full[:, end - 1]
        worst = max(worst, compare(name, {"logits": out["logits"]}, {"logits": want}, _tol(atol, want)))
        state = state_update(state, out)
        begin = end
    return worst


def state_update(state: dict, out: dict) -> dict:
    if "past_key" in state:  # KV cache: append the new time steps
        return {k: np.concatenate([state[k], out["new_" + k[len("past_"):]]]) for k in state}
    return {k: out["new_" + k] for k in state}  # RNN: the state after the step


# --- the LSTM captioner --------------------------------------------------------------------------


class LstmExporter:
    def __init__(self, ckpt, tasks):
        self.model, self.ckpt = ckpt.model, ckpt
        self.size = self.model.image_size
        self.vocab = self.model.config["vocab_size"]
        self.vision = g.VisionGraph(self.model).eval()
        self.init = g.LstmInitGraph(self.model).eval()
        self.step = g.LstmStepGraph(self.model).eval()

    def graphs(self) -> list[GraphSpec]:
        with torch.no_grad():
            features = self.vision(_pixels(self.size, 2, 0))
            h, c = self.init(features)
        h, c = h.repeat_interleave(2, 1), c.repeat_interleave(2, 1)
        state_axes = {n: {1: "rows"} for n in ("h", "c", "new_h", "new_c")}
        return [
            GraphSpec("vision", self.vision, (_pixels(self.size, 2, 0),), ["pixel_values"],
                      ["image_features"],
                      {"pixel_values": {0: "batch"}, "image_features": {0: "batch"}}),
            GraphSpec("cross_kv", self.init, (features,), ["image_features"], ["init_h", "init_c"],
                      {"image_features": {0: "batch"}, "init_h": {1: "batch"}, "init_c": {1: "batch"}}),
            GraphSpec("decoder", self.step, (torch.randint(4, self.vocab, (4, 2)), h, c),
                      ["input_ids", "h", "c"], ["logits", "new_h", "new_c"],
                      {"input_ids": {0: "rows", 1: "new"}, "logits": {0: "rows"}, **state_axes}),
        ]

    def verify(self, run, atol) -> dict[str, float]:
        diffs = dict.fromkeys(("vision", "cross_kv", "decoder"), 0.0)
        for batch, beams in ((1, 3), (3, 2)):
            pixels = _pixels(self.size, batch, 10 + batch)
            with torch.no_grad():
                want = self.model.encode_image(pixels).numpy()
            feats = run("vision", {"pixel_values": pixels.numpy()})["image_features"]
            diffs["vision"] = max(diffs["vision"],
                                  compare("vision", {"f": feats}, {"f": want}, _tol(atol, want)))
            init = run("cross_kv", {"image_features": feats})
            with torch.no_grad():
                h0, c0 = self.model.init_state(torch.from_numpy(feats))
            ref = {"init_h": h0.numpy(), "init_c": c0.numpy()}
            diffs["cross_kv"] = max(diffs["cross_kv"],
                                    compare("cross_kv", init, ref, _tol(atol, ref["init_c"])))
            state = {"h": np.repeat(init["init_h"], beams, 1), "c": np.repeat(init["init_c"], beams, 1)}

            def full(seq, h0=h0, c0=c0, beams=beams):
                return self.model.step(seq, h0.repeat_interleave(beams, 1), c0.repeat_interleave(beams, 1))[0]

            diffs["decoder"] = max(diffs["decoder"], _check_steps(run, "decoder", {}, state, batch * beams,
                                                                  self.vocab, full, atol, batch))
        return diffs

    def manifest_parts(self) -> dict:
        m = self.model
        cache = {"type": "rnn", "layers": m.layers, "hidden": m.hidden, "state": ["h", "c"],
                 "init": ["init_h", "init_c"], "outputs": ["new_h", "new_c"],
                 "max_positions": m.max_positions}
        return {
            "tasks": {"caption": ["vision", "cross_kv", "decoder"]},
            "module_extra": {"vision": {"role": "image_encoder"}, "cross_kv": {"role": "cross_kv"},
                             "decoder": {"role": "decoder", "cache": cache}},
            "model": {"family": "lstm", "architecture": m.config.get("name", "lstm"),
                      "image_size": [self.size, self.size], "vocab_size": self.vocab,
                      "max_positions": m.max_positions, "pad_id": PAD_ID, "image_to": m.image_to},
        }


# --- the multimodal transformer family --------------------------------------------------------------


def _cross_names(n_layers: int) -> list[str]:
    return [f"cross_key_{i}" for i in range(n_layers)] + [f"cross_value_{i}" for i in range(n_layers)]


def _kv_dims(decoder) -> dict:
    width = decoder.embed.weight.shape[1]
    return {"type": "kv", "layout": "time,layer,row,head,dim", "layers": len(decoder.blocks),
            "heads": decoder.heads, "head_dim": width // decoder.heads,
            "max_positions": decoder.max_positions}


def _past(dims: dict, rows: int, past: int = 0, seed: int = 0) -> np.ndarray:
    shape = (past, dims["layers"], rows, dims["heads"], dims["head_dim"])
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


class TransformerExporter:
    def __init__(self, ckpt, tasks):
        m = self.model = ckpt.model
        self.tasks, self.size, self.vocab = tuple(tasks), m.image_size, m.config["vocab_size"]
        self.generative = "vqa" in tasks and m.vqa_mode == "generative"
        self.classifier = "vqa" in tasks and m.vqa_mode == "classifier"
        self.vision = g.VisionGraph(m).eval()

    def _decoder_specs(self, prefix: str, decoder, memory, memory_mask) -> list[GraphSpec]:
        """`{prefix}cross_kv` and `{prefix}decoder` over `memory` (the trace's, batch 2)."""
        dims, masked = _kv_dims(decoder), memory_mask is not None
        kv_graph, step = g.CrossKVGraph(decoder).eval(), g.DecoderStepGraph(decoder, cross_mask=masked).eval()
        with torch.no_grad():
            cross = kv_graph(memory)
        names, memory_in = _cross_names(dims["layers"]), "question_embeds" if masked else "image_features"
        per_item = {n: {0: "batch", 2: "memory"} for n in names}
        past = [torch.from_numpy(_past(dims, 4, 3, seed)) for seed in (1, 2)]
        mask_in = [memory_mask] if masked else []
        mask_names = ["cross_attention_mask"] if masked else []
        mask_axes = {"cross_attention_mask": {0: "batch", 1: "memory"}} if masked else {}
        return [
            GraphSpec(f"{prefix}cross_kv", kv_graph, (memory,), [memory_in], names,
                      {memory_in: {0: "batch", 1: "memory"}, **per_item}),
            GraphSpec(f"{prefix}decoder", step, (torch.randint(4, self.vocab, (4, 2)), *past, *mask_in, *cross),
                      ["input_ids", "past_key", "past_value", *mask_names, *names],
                      ["logits", "new_key", "new_value"], {**STEP_AXES, **mask_axes, **per_item}),
        ]

    def graphs(self) -> list[GraphSpec]:
        m, pixels = self.model, _pixels(self.size, 2, 0)
        with torch.no_grad():
            features = self.vision(pixels)
        feat_axes = {"image_features": {0: "batch"}}
        specs = [GraphSpec("vision", self.vision, (pixels,), ["pixel_values"], ["image_features"],
                           {"pixel_values": {0: "batch"}, **feat_axes})]
        if "caption" in self.tasks:
            specs += self._decoder_specs("", m.caption_head, features, None)
        ids, mask = _texts(self.vocab, [5, 3], seed=0)
        text_in = (ids, mask, features)
        if self.generative:
            question = g.QuestionGraph(m).eval()
            with torch.no_grad():
                tokens, fused_mask = question(*text_in)
            specs.append(GraphSpec("question_encoder", question, text_in, TEXT_INPUTS,
                                   ["question_embeds", "cross_attention_mask"],
                                   {**TEXT_AXES, **feat_axes, "question_embeds": {0: "batch", 1: "memory"},
                                    "cross_attention_mask": {0: "batch", 1: "memory"}}))
            specs += self._decoder_specs("vqa_", m.vqa_head, tokens, fused_mask)
        if self.classifier:
            specs.append(GraphSpec("vqa_classifier", g.ClassifierGraph(m).eval(), text_in, TEXT_INPUTS,
                                   ["answer_probs"],
                                   {**TEXT_AXES, **feat_axes, "answer_probs": {0: "batch"}}))
        if "retrieval" in self.tasks:
            specs += [GraphSpec("image_embed", g.ImageEmbedGraph(m).eval(), (features,), ["image_features"],
                                ["image_embeds"], {**feat_axes, "image_embeds": {0: "batch"}}),
                      GraphSpec("text_embed", g.TextEmbedGraph(m).eval(), (ids, mask), TEXT_INPUTS[:2],
                                ["text_embeds"], {**TEXT_AXES, "text_embeds": {0: "batch"}})]
        return specs

    def verify(self, run, atol) -> dict[str, float]:
        """Each graph on batch sizes and lengths other than the trace's, against the torch model;
        decoders step by step against their teacher-forcing forward. Returns max abs diff per graph."""
        m, diffs = self.model, {}

        def note(name, value):
            diffs[name] = max(diffs.get(name, 0.0), value)

        for batch, beams, lengths in ((1, 3, [4]), (3, 2, [7, 3, 5])):
            pixels = _pixels(self.size, batch, 10 + batch)
            with torch.no_grad():
                want = m.encode_image(pixels).numpy()
            feats = run("vision", {"pixel_values": pixels.numpy()})["image_features"]
            note("vision", compare("vision", {"f": feats}, {"f": want}, _tol(atol, want)))
            tf = torch.from_numpy(feats)
            ids, mask = _texts(self.vocab, lengths, seed=batch)
            if "caption" in self.tasks:
                for name, value in self._verify_decoder(run, "", m.caption_head, feats, None, beams,
                                                        atol).items():
                    note(name, value)
            if self.generative:
                out = run("question_encoder", {"input_ids": ids.numpy(), "attention_mask": mask.numpy(),
                                               "image_features": feats})
                with torch.no_grad():
                    fused = m.fuse(tf, ids, mask)
                if not np.array_equal(out["cross_attention_mask"], fused.mask.numpy()):
                    raise_parity("question_encoder", "cross_attention_mask differs from torch")
                ref = fused.tokens.numpy()
                note("question_encoder", compare("question_encoder", {"q": out["question_embeds"]},
                                                 {"q": ref}, _tol(atol, ref)))
                for name, value in self._verify_decoder(run, "vqa_", m.vqa_head, out["question_embeds"],
                                                        out["cross_attention_mask"], beams, atol).items():
                    note(name, value)
            if self.classifier:
                note("vqa_classifier", self._verify_classifier(run, feats, ids, mask, atol))
            if "retrieval" in self.tasks:
                with torch.no_grad():
                    img, txt = m.image_embeds(tf).numpy(), m.text_embeds(ids, mask).numpy()
                got = run("image_embed", {"image_features": feats})["image_embeds"]
                note("image_embed", check_embeddings("image_embed", got, img, atol))
                got = run("text_embed", {"input_ids": ids.numpy(),
                                         "attention_mask": mask.numpy()})["text_embeds"]
                note("text_embed", check_embeddings("text_embed", got, txt, atol))
        return diffs

    def _verify_decoder(self, run, prefix, decoder, memory: np.ndarray, memory_mask, beams, atol) -> dict:
        key = "question_embeds" if memory_mask is not None else "image_features"
        kv = run(f"{prefix}cross_kv", {key: memory})
        with torch.no_grad():
            cross = g.CrossKVGraph(decoder)(torch.from_numpy(memory))
        want = dict(zip(_cross_names(len(decoder.blocks)), (t.numpy() for t in cross)))
        out = {f"{prefix}cross_kv": compare(f"{prefix}cross_kv", kv, want, _tol(atol, want["cross_key_0"]))}
        mem = torch.from_numpy(memory).repeat_interleave(beams, 0)
        mask = None
        if memory_mask is not None:
            kv["cross_attention_mask"] = memory_mask
            mask = torch.from_numpy(memory_mask).repeat_interleave(beams, 0)
        rows, dims = memory.shape[0] * beams, _kv_dims(decoder)
        state = {"past_key": _past(dims, rows), "past_value": _past(dims, rows)}
        out[f"{prefix}decoder"] = _check_steps(run, f"{prefix}decoder", kv, state, rows, self.vocab,
                                               lambda seq: decoder(seq, mem, mask), atol, rows)
        return out

    def _verify_classifier(self, run, feats, ids, mask, atol) -> float:
        with torch.no_grad():
            want = self.model.answer_logits(torch.from_numpy(feats), ids, mask).softmax(dim=-1).numpy()
        got = run("vqa_classifier", {"input_ids": ids.numpy(), "attention_mask": mask.numpy(),
                                     "image_features": feats})
        diff = compare("vqa_classifier", got, {"answer_probs": want}, atol if atol is not None else 1e-5)
        if not np.array_equal(got["answer_probs"].argmax(-1), want.argmax(-1)):
            raise_parity("vqa_classifier", "the top answer differs from torch")
        return diff

    def manifest_parts(self) -> dict:
        m = self.model
        tasks, extra = {}, {"vision": {"role": "image_encoder"}}
        if "caption" in self.tasks:
            tasks["caption"] = ["vision", "cross_kv", "decoder"]
            extra.update(cross_kv={"role": "cross_kv"},
                         decoder={"role": "decoder", "cache": _kv_dims(m.caption_head)})
        if self.generative:
            tasks["vqa"] = ["vision", "question_encoder", "vqa_cross_kv", "vqa_decoder"]
            extra.update(question_encoder={"role": "question_encoder"}, vqa_cross_kv={"role": "cross_kv"},
                         vqa_decoder={"role": "decoder", "cache": _kv_dims(m.vqa_head)})
        if self.classifier:
            tasks["vqa"] = ["vision", "vqa_classifier"]
            extra["vqa_classifier"] = {"role": "answer_classifier", "answers": list(m.answers)}
        if "retrieval" in self.tasks:
            tasks["retrieval"] = ["vision", "image_embed", "text_embed"]
            extra.update(image_embed={"role": "image_embedder"}, text_embed={"role": "text_embedder"})
        decoders = [h for h in (m.caption_head if "caption" in self.tasks else None,
                                m.vqa_head if self.generative else None) if h is not None]
        text_cfg = m.config.get("text_encoder", {})
        model = {"family": "transformer", "architecture": m.config.get("name", "transformer"),
                 "image_size": [self.size, self.size], "vocab_size": self.vocab, "pad_id": PAD_ID,
                 "shared_image_encoder": "vision"}
        if decoders:
            model["max_positions"] = max(d.max_positions for d in decoders)
        if text_cfg:  # questions and retrieval texts are cut here; only a transformer has a position limit
            model["max_text_length"] = text_cfg.get("max_length", UNLIMITED_TEXT)
        if "vqa" in self.tasks:
            model["vqa_mode"] = m.vqa_mode
        if "retrieval" in self.tasks:
            model.update(embedding_dim=m.retrieval_head.image_proj.out_features, has_itm=False,
                         logit_scale=float(m.retrieval_head.logit_scale.detach().exp()))
        return {"tasks": tasks, "module_extra": extra, "model": model}


def raise_parity(name: str, problem: str):
    from ..errors import ExportError

    raise ExportError(f"{name}: {problem}; the export is wrong, no bundle was written")
